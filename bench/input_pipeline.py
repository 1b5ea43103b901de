"""Input-pipeline overhead: the time of a training step on the real data path over the time of
the same step on batches already in memory. Target: at most 1.05.

The real path is what train.py does each step: a background thread indexes the memory-mapped
feature cache of the Flickr8k photos (frozen EfficientNet-Lite0) and the tokenized captions,
while the main thread runs forward, backward and the optimizer step. The in-memory path steps
on copies of the same batches, built before timing, so both sides see the same caption
lengths. Blocks of steps alternate between the two sides in pairs, so that load from other
processes affects both alike. The ratio is the median over the pairs, which a burst of load
in one block moves less than the ratio of the totals (also printed).

    python bench/input_pipeline.py --cache_dir /path/to/saved_models/cache
    python bench/input_pipeline.py --data builtin --blocks 4
"""

import argparse
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
import training  # noqa: E402
from data_pipeline import prefetch, train_batches  # noqa: E402
from model import caption_loss  # noqa: E402

FLICKR = os.path.join(os.path.dirname(REPO), "shared", "data", "flickr8k_224")


def step(model, optimizer, params, batch, config):
    """One optimizer step as train.py takes it (fp32 on the CPU, so no gradient scaler)."""
    inputs, input_ids, attention_mask, targets = batch
    logits = model(input_ids, attention_mask, **inputs)
    loss = caption_loss(logits, targets, config["label_smoothing"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
    loss.item()  # train.py reads the loss every step, which waits for the step to finish
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=FLICKR, help="dataset path, or builtin (default: %(default)s)")
    parser.add_argument("--cache_dir", default=os.path.join(REPO, "saved_models", "cache"),
                        help="feature cache folder, whose keys include the absolute image paths (default: %(default)s)")
    parser.add_argument("--max_train_samples", type=int, default=None, help="images (None = whole train split)")
    parser.add_argument("--blocks", type=int, default=12, help="blocks per side, run in pairs")
    parser.add_argument("--block_steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    if args.data != "builtin" and not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a dataset path, or --data builtin")
    data = args.data if args.data == "builtin" else os.path.abspath(args.data)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    config = {**train.DEFAULTS, "data": data, "max_train_samples": args.max_train_samples,
              "cache_dir": os.path.abspath(args.cache_dir), "wandb_mode": "disabled"}
    ctx = training.DistContext(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model, _, train_inputs, _, _ = training.prepare(config, ctx, None)
    model.train()
    optimizer = training.make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]

    # One sequence of batches (plus warm-up); the in-memory side gets materialised copies of them.
    order = train_batches(train_inputs, config["batch_size"], 1, 0, config["seed"], 0, config["group_by_length"])
    warmup = 3
    indices = [next(order)[1] for _ in range(warmup + args.blocks * args.block_steps)]
    in_memory = [train_inputs.caption_batch(idx) for idx in indices]
    batches = prefetch(train_inputs.caption_batch(idx) for idx in indices)  # as train.py does

    for batch in in_memory[:warmup]:  # allocator, thread pool, first touch of the cache pages
        step(model, optimizer, params, batch, config)
        next(batches)

    def run_block(first, real):
        start = time.perf_counter()
        for position in range(first, first + args.block_steps):
            step(model, optimizer, params, next(batches) if real else in_memory[position], config)
        return time.perf_counter() - start

    # Pairs of blocks in the order real-memory, memory-real, ... so that a load trend favours neither side.
    pairs = []
    for block in range(args.blocks):
        first = warmup + block * args.block_steps
        if block % 2 == 0:
            real = run_block(first, True)
            memory = run_block(first, False)
        else:
            memory = run_block(first, False)
            real = run_block(first, True)
        pairs.append((real, memory))

    start = time.perf_counter()
    for idx in indices[:10]:
        train_inputs.caption_batch(idx)
    assembly_ms = 100 * (time.perf_counter() - start)

    steps = args.blocks * args.block_steps
    real_time = sum(real for real, _ in pairs)
    memory_time = sum(memory for _, memory in pairs)
    lower, median, upper = statistics.quantiles([real / memory for real, memory in pairs], n=4)
    print(f"data {data}: {len(train_inputs)} training captions, batch {config['batch_size']}, "
          f"{steps} steps a side, {torch.get_num_threads()} torch threads")
    print(f"real data path: {1000 * real_time / steps:.1f} ms/step (assembling a batch alone: {assembly_ms:.1f} ms, "
          f"done in the background thread)")
    print(f"batches in memory: {1000 * memory_time / steps:.1f} ms/step")
    print(f"ratio (target <= 1.05): {median:.3f} median of {len(pairs)} block pairs (quartiles {lower:.3f} and "
          f"{upper:.3f}), {real_time / memory_time:.3f} of the total times")


if __name__ == "__main__":
    main()
