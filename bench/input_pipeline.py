"""Input-pipeline overhead: the time of a training step on the real data path over the time of
the same step on batches already in memory. Target: at most 1.05.

The real path is what train.py does each step: index the memory-mapped feature cache of the
Flickr8k photos (frozen EfficientNet-Lite0), tokenized captions, forward, backward, step.
The in-memory path steps on batch tensors built before timing. Blocks of steps alternate
between the two, so that load from other processes affects both sides alike.

    python bench/input_pipeline.py --data ../shared/data/flickr8k_224
    python bench/input_pipeline.py --data builtin --blocks 4
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import training  # noqa: E402
from data_pipeline import prefetch, train_batches  # noqa: E402
from model import caption_loss  # noqa: E402


def step(model, optimizer, params, batch, config):
    inputs, input_ids, attention_mask, targets = batch
    logits = model(input_ids, attention_mask, **inputs)
    loss = caption_loss(logits, targets, config["label_smoothing"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/flickr8k_224")
    parser.add_argument("--max_train_samples", type=int, default=None, help="images (None = whole train split)")
    parser.add_argument("--blocks", type=int, default=6, help="alternating blocks per side")
    parser.add_argument("--block_steps", type=int, default=10, help="steps per block")
    args = parser.parse_args()
    if args.data != "builtin" and not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a dataset path, or --data builtin")

    config = {**train.DEFAULTS, "data": args.data, "max_train_samples": args.max_train_samples,
              "max_val_samples": 8, "wandb_mode": "disabled"}
    ctx = training.DistContext(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model, _, train_inputs, _, _ = training.prepare(config, ctx, None)
    model.train()
    optimizer = training.make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    indices = train_batches(train_inputs, config["batch_size"], 1, 0, config["seed"])
    in_memory = [train_inputs.caption_batch(next(indices)[1]) for _ in range(args.block_steps)]
    batches = prefetch(train_inputs.caption_batch(idx) for _, idx in indices)  # as train.py does

    for batch in in_memory[:3]:  # warm-up: allocator, thread pool, first-touch of pages
        step(model, optimizer, params, batch, config)
    real_time = memory_time = 0.0
    for _ in range(args.blocks):
        start = time.perf_counter()
        for _ in range(args.block_steps):
            step(model, optimizer, params, next(batches), config)
        real_time += time.perf_counter() - start
        start = time.perf_counter()
        for batch in in_memory:
            step(model, optimizer, params, batch, config)
        memory_time += time.perf_counter() - start

    steps = args.blocks * args.block_steps
    print(f"data {args.data}: {len(train_inputs)} training captions, batch {config['batch_size']}, {steps} steps a side")
    print(f"real data path: {1000 * real_time / steps:.1f} ms/step")
    print(f"batches in memory: {1000 * memory_time / steps:.1f} ms/step")
    print(f"ratio (target <= 1.05): {real_time / memory_time:.3f}")


if __name__ == "__main__":
    main()
