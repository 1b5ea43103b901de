"""Turn a split of a CaptionData into model inputs that stay in memory (or memory-mapped)
for the whole run: images decoded once, or backbone features computed once for a frozen
encoder, plus every caption tokenized once. Training steps then only index tensors.
"""

import logging
import math
import queue
import threading
import time

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from dataset import cache_images, cache_key, cached_array, image_list_fingerprint, load_image_array, normalize_images

log = logging.getLogger(__name__)


class SplitInputs:
    """One split: an image array (features or uint8 pixels), its captions and references.

    images:       (N, T, C) float16 backbone features, or (N, 3, S, S) uint8 pixels
    caption_ids:  (M, L) token ids, [BOS] ... [EOS] then padding
    caption_rows: (M,) row of `images` that each caption describes
    """

    def __init__(self, images, kind, caption_ids, lengths, caption_rows, references, names, mean, std):
        self.images, self.kind = images, kind
        self.caption_ids, self.lengths, self.caption_rows = caption_ids, lengths, caption_rows
        self.references, self.names = references, names
        self.mean, self.std = mean, std

    def __len__(self):
        return len(self.caption_ids)

    def image_batch(self, rows):
        """Model inputs for image rows: {"features": (B, T, C)} or {"pixel_values": (B, 3, S, S)}."""
        rows = np.asarray(rows)
        array = torch.from_numpy(np.ascontiguousarray(self.images[rows]))
        if self.kind == "features":
            return {"features": array.float()}
        return {"pixel_values": normalize_images(array, self.mean, self.std)}

    def caption_batch(self, idx):
        """Return (inputs, input_ids, attention_mask, targets) for caption indices `idx`.

        input_ids are tokens 0..L-2 and targets tokens 1..L-1 of each sequence, so position t
        predicts token t+1; targets past the [EOS] are -100 and ignored by the loss.
        """
        idx = torch.as_tensor(idx)
        lengths = self.lengths[idx]
        width = int(lengths.max())
        ids = self.caption_ids[idx, :width]
        positions = torch.arange(width - 1).unsqueeze(0)
        attention_mask = (positions < (lengths - 1).unsqueeze(1)).long()  # (B, width-1)
        targets = ids[:, 1:].masked_fill(attention_mask == 0, -100)
        inputs = self.image_batch(self.caption_rows[idx].numpy())
        return inputs, ids[:, :-1], attention_mask, targets

    def image_batches(self, rows, batch_size):
        for start in range(0, len(rows), batch_size):
            yield self.image_batch(rows[start:start + batch_size])


def compute_features(model, dataset, indices, image_size, mean, std, device, batch_size=32):
    """Return a fill(out) function that writes backbone features of the images into `out`."""

    def fill(out):
        failed, start = [], time.time()
        for begin in range(0, len(indices), batch_size):
            rows, arrays = [], []
            for row in range(begin, min(begin + batch_size, len(indices))):
                try:
                    arrays.append(load_image_array(dataset, indices[row], image_size))
                    rows.append(row)
                except OSError as e:
                    log.warning("skipping unreadable image: %s", e)
                    failed.append(row)
            if rows:
                pixels = normalize_images(torch.from_numpy(np.stack(arrays)), mean, std).to(device)
                with torch.inference_mode():
                    features = model.encoder.forward_backbone(pixels).float().cpu().numpy()
                out[rows] = features.astype(np.float16)
            done = min(begin + batch_size, len(indices))
            if (begin // batch_size) % 20 == 0 or done == len(indices):
                rate = done / max(time.time() - start, 1e-6)
                log.info("caching image features: %d/%d images (%.0f img/s)", done, len(indices), rate)
        return failed

    return fill


def prepare_split(name, dataset, indices, model, tokenizer, config, device):
    """Build the SplitInputs of one split, using the on-disk caches under config['cache_dir']."""
    mc = model.model_config
    size, mean, std = mc["image_size"], mc["mean"], mc["std"]
    if mc["freeze_encoder"]:
        # "eval-bn": caches written before the backbone ran in eval mode hold other features.
        key = "features-" + cache_key(image_list_fingerprint(dataset, indices), size, mean, std,
                                      mc["encoder"], mc.get("timm_name"), "eval-bn")
        shape = (len(indices), mc["num_image_tokens"], mc["encoder_dim"])
        fill = compute_features(model, dataset, indices, size, mean, std, device)
        images, failed = cached_array(config["cache_dir"], key, shape, np.float16, fill)
        kind = "features"
    else:
        images, failed = cache_images(dataset, indices, size, config["cache_dir"])
        kind = "pixels"
    if failed:
        log.warning("%s split: %d of %d images unreadable and skipped", name, len(failed), len(indices))
    bad = set(failed)
    references = [dataset.captions[i] for i in indices]
    texts, rows = [], []
    for row, refs in enumerate(references):
        if row not in bad:
            texts.extend(refs)
            rows.extend([row] * len(refs))
    caption_ids, lengths = tokenizer.encode(texts, config["max_caption_length"])
    names = [str(dataset.images[i]) for i in indices]
    split = SplitInputs(images, kind, caption_ids, lengths, torch.tensor(rows, dtype=torch.long), references,
                        names, mean, std)
    split.valid_rows = [r for r in range(len(indices)) if r not in bad]
    return split


def grouped_batches(lengths, batch_size, seed, epoch, group=50):
    """One epoch of batches of similar caption lengths, in random order.

    A seeded permutation is cut into runs of `group` batches. Each run is sorted by length and
    cut into batches. The batches of the whole epoch are then shuffled, so consecutive steps do
    not go from long captions to short ones. The permutation is padded with its own start to
    whole batches, so every batch is full.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(len(lengths), generator=g)
    steps = math.ceil(len(perm) / batch_size)
    perm = torch.cat([perm, perm[:steps * batch_size - len(perm)]])
    batches = []
    for start in range(0, len(perm), group * batch_size):
        run = perm[start:start + group * batch_size]
        run = run[torch.argsort(lengths[run], descending=True, stable=True)]
        batches.extend(run.split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def train_batches(split, batch_size, world_size, rank, seed, start_step=0, group_by_length=False):
    """Yield (epoch, caption indices) for this rank forever, starting after `start_step` batches.

    Every rank draws from the same seeded order per epoch, so the union of the ranks' batches at
    a step is the batch a single process would take. With group_by_length, a batch contains
    captions of similar length (grouped_batches), so it pads to a length close to its captions'
    own instead of the longest caption of a random draw.
    """
    if batch_size % world_size:
        raise ValueError(f"--batch_size {batch_size} is not divisible by the {world_size} processes; "
                         f"pass a multiple of {world_size}")
    per_rank = batch_size // world_size
    sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    steps_per_epoch = math.ceil(len(sampler) / per_rank)
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        if group_by_length:
            # rank r takes every world_size-th caption of each global batch
            batches = [b[rank::world_size].tolist() for b in grouped_batches(split.lengths, batch_size, seed, epoch)]
        else:
            sampler.set_epoch(epoch)
            order = list(sampler)
            batches = [order[b * per_rank:(b + 1) * per_rank] for b in range(steps_per_epoch)]
        for b in range(skip, len(batches)):
            yield epoch, batches[b]
        skip = 0
        epoch += 1


def prefetch(iterable, depth=2):
    """Iterate over `iterable` in a background thread, `depth` items ahead of the consumer.

    Batch assembly (index the cache, convert to float, slice the captions) then overlaps the
    previous step's forward and backward, which release the GIL in torch's kernels.
    """
    items = queue.Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in iterable:
                items.put(item)
        except BaseException as e:  # handed to the consumer, which re-raises it
            items.put(e)
        items.put(done)

    threading.Thread(target=produce, daemon=True, name="batch-prefetch").start()
    while True:
        item = items.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
