"""Step time of the MiniLM decoder with its vocabulary cut to the training captions' tokens.
Target: the cut vocabulary at least 1.3 times the full one's captions/s.

Both sides are train.py's real path on Flickr8k (cached EfficientNet-Lite0 features, batches
of 64 captions grouped by length, bf16 autocast, AdamW): one model built with
`--decoder_vocab captions` (6,670 of MiniLM's 30,522 WordPiece tokens) and one with
`--decoder_vocab full`. Each side trains on the same captions, in blocks of steps that
alternate between the sides, so a change in machine load hits both. A third side, the cut
vocabulary in fp32, gives the cost of leaving out `--precision bf16`.

    python bench/decoder_vocab.py --cache_dir /path/to/saved_models/cache
"""

import argparse
import itertools
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
import training  # noqa: E402
from data_pipeline import train_batches  # noqa: E402
from model import caption_loss  # noqa: E402

FLICKR = os.path.join(os.path.dirname(REPO), "shared", "data", "flickr8k_224")


class Side:
    """One model with its optimizer and its own tokenization of the training captions."""

    def __init__(self, config, ctx, precision):
        torch.manual_seed(0)
        self.model, self.tokenizer, self.inputs, _, _ = training.prepare(config, ctx, None)
        self.model.train()
        self.optimizer = training.make_optimizer(self.model, config)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast, _ = training.autocast_factory(precision, ctx.device)
        self.config = config

    def block(self, batches):
        start = time.perf_counter()
        for idx in batches:
            inputs, input_ids, attention_mask, targets = self.inputs.caption_batch(idx)
            with self.autocast():
                logits = self.model(input_ids, attention_mask, **inputs)
                loss = caption_loss(logits, targets, self.config["label_smoothing"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, self.config["grad_clip"])
            loss.item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=FLICKR, help="dataset path (default: %(default)s)")
    parser.add_argument("--cache_dir", default=os.path.join(REPO, "saved_models", "cache"),
                        help="feature cache folder (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side, alternating")
    parser.add_argument("--block_steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a folder of captions.csv and images/")
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    ctx = training.DistContext(0, 1, 0, torch.device("cpu"))
    base = {**train.DEFAULTS, "data": os.path.abspath(args.data), "cache_dir": os.path.abspath(args.cache_dir),
            "decoder": "minilm", "wandb_mode": "disabled"}
    kinds = [("captions", "bf16"), ("full", "bf16"), ("captions", "fp32")]
    sides = {kind: Side({**base, "decoder_vocab": kind[0]}, ctx, kind[1]) for kind in kinds}
    # The same caption rows on both sides; each side tokenizes them with its own vocabulary.
    batches = train_batches(sides[kinds[0]].inputs, base["batch_size"], 1, 0, base["seed"], group_by_length=True)
    rows = [idx for _, idx in itertools.islice(batches, 1 + args.blocks * args.block_steps)]
    for side in sides.values():
        side.block(rows[:1])  # warm-up: allocator, thread pool, first touch of the cache pages

    seconds = dict.fromkeys(sides, 0.0)
    for block in range(args.blocks):
        batches = rows[1 + block * args.block_steps:1 + (block + 1) * args.block_steps]
        order = list(sides) if block % 2 == 0 else list(reversed(sides))
        for kind in order:
            seconds[kind] += sides[kind].block(batches)

    steps = args.blocks * args.block_steps
    for (vocab, precision), side in sides.items():
        print(f"--decoder_vocab {vocab}, {precision}: {side.tokenizer.vocab_size} tokens, "
              f"{sum(p.numel() for p in side.params) / 1e6:.1f}M trained parameters, "
              f"{steps * base['batch_size'] / seconds[vocab, precision]:.1f} captions/s "
              f"({1000 * seconds[vocab, precision] / steps:.0f} ms a step)")
    print(f"fp32 step time over bf16, cut vocabulary: {seconds['captions', 'fp32'] / seconds['captions', 'bf16']:.2f}")
    print(f"ratio (target >= 1.3): {seconds['full', 'bf16'] / seconds['captions', 'bf16']:.2f}")


if __name__ == "__main__":
    main()
