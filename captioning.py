"""Batched captioning with a loaded checkpoint, and the scoring of a dataset split.

inference.py uses both: iter_captions for the images a user names, evaluate_split for
`python inference.py --evaluate DATA --split test`. Images become model inputs exactly as in
training: dataset.py decodes and resizes them, normalize_images scales them with the
checkpoint's mean and std, and a frozen encoder's features are rounded to float16 as the
training cache stores them.
"""

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from dataset import DataError, load_captions, load_image_array, normalize_images, split_indices
from evaluation import METRIC_KEYS, caption_statistics, generate_captions, score_captions

log = logging.getLogger("inference")

PROGRESS_EVERY = 10  # batches between progress lines of --evaluate


@torch.no_grad()
def model_inputs(model, arrays, preprocessing):
    """Stack uint8 (3, S, S) pixel arrays into the model's input: pixel values, or encoder features."""
    device = next(model.parameters()).device
    pixels = torch.from_numpy(np.stack(arrays)).to(device)  # (B, 3, S, S) uint8
    pixel_values = normalize_images(pixels, preprocessing["mean"], preprocessing["std"])
    if model.model_config["freeze_encoder"]:
        # Training read a frozen encoder's features from a float16 cache (data_pipeline.py); round the same way.
        return {"features": model.encoder.forward_backbone(pixel_values).to(torch.float16).float()}
    return {"pixel_values": pixel_values}


def iter_captions(model, tokenizer, preprocessing, items, load, options, batch_size):
    """Caption items in batches; yield (item, caption, error) in input order, error None on success.

    load(item) returns uint8 (3, S, S) pixels or raises OSError, which skips only that item.
    options are generate() options (see evaluation.generation_options).
    """
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        arrays, errors = {}, {}
        for position, item in enumerate(batch):
            try:
                arrays[position] = load(item)
            except OSError as e:
                errors[position] = str(e).replace("\n", " ")
        captions = {}
        if arrays:
            inputs = model_inputs(model, list(arrays.values()), preprocessing)
            captions = dict(zip(arrays, generate_captions(model, tokenizer, [inputs], options, device)))
        for position, item in enumerate(batch):
            yield item, captions.get(position), errors.get(position)


def image_name(dataset, index):
    """Name an image in the evaluation file: its path, or builtin:INDEX for the synthetic data."""
    return f"builtin:{dataset.images[index]}" if dataset.builtin is not None else str(dataset.images[index])


def select_split(checkpoint, data, split, max_images):
    """Load DATA and return (dataset, image indices of the split), split as the run's training did."""
    config = checkpoint["config"]
    seed = config.get("seed", 0)
    dataset = load_captions(data, seed=seed)
    # Without an official split, the run's seed and val_fraction rebuild the validation set it held out.
    indices = split_indices(dataset, config.get("val_fraction", 0.1), seed)[split]
    if not indices:
        official = any(s is not None for s in dataset.splits)
        hint = "" if official else " (it has no official split, so only train and val exist)"
        raise DataError(f"{data} has no {split} images{hint}; pass another --split")
    return dataset, indices[:max_images] if max_images else indices


def evaluate_split(model, tokenizer, checkpoint, data, split, options, batch_size=32, max_images=None,
                   meteor=True):
    """Caption every image of a split of DATA and score the captions against the references.

    Returns a JSON-able dict: the scores of evaluation.score_captions, caption statistics,
    the images that could not be read, and every caption with its image and references.
    Raises DataError when the split is empty or none of its images can be read.
    """
    dataset, indices = select_split(checkpoint, data, split, max_images)
    preprocessing = checkpoint["preprocessing"]
    size = preprocessing["image_size"]
    log.info("captioning %d %s images of %s", len(indices), split, data)
    rows, skipped = [], []
    results = iter_captions(model, tokenizer, preprocessing, indices,
                            lambda index: load_image_array(dataset, index, size), options, batch_size)
    for done, (index, caption, error) in enumerate(results, start=1):
        if error:
            log.warning("skipping unreadable image: %s", error)
            skipped.append({"image": image_name(dataset, index), "error": error})
        else:
            rows.append({"image": image_name(dataset, index), "caption": caption,
                         "references": dataset.captions[index]})
        if done % (PROGRESS_EVERY * batch_size) == 0:
            log.info("captioned %d/%d images", done, len(indices))
    if not rows:
        raise DataError(f"none of the {len(indices)} {split} images of {data} could be read")

    references = {i: row["references"] for i, row in enumerate(rows)}
    hypotheses = {i: row["caption"] for i, row in enumerate(rows)}
    scores = score_captions(references, hypotheses, meteor=meteor)
    statistics = caption_statistics([row["caption"] for row in rows])
    return {"data": str(data), "split": split, "decoding": options, "num_images": len(rows),
            "skipped": skipped, "metrics": scores, "statistics": statistics, "captions": rows}


def print_scores(result):
    """Print an evaluation result as aligned `name value` lines."""
    print(f"{result['split']} split of {result['data']}: {result['num_images']} images captioned, "
          f"{len(result['skipped'])} unreadable")
    for key in METRIC_KEYS:
        if key in result["metrics"]:
            print(f"{key:<9} {result['metrics'][key]:.4f}")
    labels = {"distinct": "share of captions that are unique", "repeat3": "share with a word 3 times in a row",
              "unk": "share with [UNK]"}
    for key, value in result["statistics"].items():
        print(f"{key:<9} {value:.4f}  {labels.get(key, '')}".rstrip())


def write_json(path, document):
    """Write a JSON file atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:100]}.{os.getpid()}.tmp")  # short enough for a 255-character name
    try:
        tmp.write_text(json.dumps(document, indent=1))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
