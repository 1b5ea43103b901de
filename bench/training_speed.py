"""Training speed against the common recipe, on the same model and the same Flickr8k photos.

Ours: train.py's default path (EfficientNet-Lite0 frozen, its features computed once into a
memory-mapped cache, captions tokenized once); a training step only indexes that cache.
Common recipe: what a transformers VisionEncoderDecoderModel script does each step: open each
JPEG with PIL, run an image processor (resize, rescale, normalise), run the frozen encoder,
then the decoder forward and backward.
Both sides train the same model from the same weights with the same batch size; blocks of
steps alternate between them. Prints images/s of each and their ratio (target: at least 1.5),
plus our rate with the one-time feature caching spread over one epoch.

    python bench/training_speed.py --data ../shared/data/flickr8k_224
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
import training  # noqa: E402
from data_pipeline import train_batches  # noqa: E402
from model import caption_loss  # noqa: E402


def optimizer_step(model, optimizer, params, inputs, input_ids, attention_mask, targets, config):
    logits = model(input_ids, attention_mask, **inputs)
    loss = caption_loss(logits, targets, config["label_smoothing"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def common_recipe_inputs(processor, train_inputs, idx):
    """Decode and preprocess the batch's JPEGs from disk, as a per-step data collator does."""
    from PIL import Image
    rows = train_inputs.caption_rows[idx].tolist()
    images = [Image.open(train_inputs.names[r]).convert("RGB") for r in rows]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/flickr8k_224")
    parser.add_argument("--blocks", type=int, default=3, help="alternating blocks per side")
    parser.add_argument("--block_steps", type=int, default=5, help="steps per block")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a folder of captions.csv and images/")
    from transformers import EfficientNetImageProcessor

    config = {**train.DEFAULTS, "data": args.data, "max_val_samples": 8, "wandb_mode": "disabled"}
    ctx = training.DistContext(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    start = time.perf_counter()
    model, _, train_inputs, _, _ = training.prepare(config, ctx, None)
    setup_seconds = time.perf_counter() - start  # includes feature caching when the cache is cold
    model.train()
    optimizer = training.make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    mc = model.model_config
    processor = EfficientNetImageProcessor(size={"height": mc["image_size"], "width": mc["image_size"]},
                                           do_center_crop=False, image_mean=mc["mean"], image_std=mc["std"],
                                           rescale_factor=1 / 255, include_top=False)
    batches = train_batches(train_inputs, config["batch_size"], 1, 0, config["seed"])

    ours = common = 0.0
    for _ in range(args.blocks):
        begin = time.perf_counter()
        for _ in range(args.block_steps):
            inputs, input_ids, attention_mask, targets = train_inputs.caption_batch(next(batches)[1])
            optimizer_step(model, optimizer, params, inputs, input_ids, attention_mask, targets, config)
        ours += time.perf_counter() - begin
        begin = time.perf_counter()
        for _ in range(args.block_steps):
            idx = next(batches)[1]
            _, input_ids, attention_mask, targets = train_inputs.caption_batch(idx)
            inputs = common_recipe_inputs(processor, train_inputs, idx)
            optimizer_step(model, optimizer, params, inputs, input_ids, attention_mask, targets, config)
        common += time.perf_counter() - begin

    images = args.blocks * args.block_steps * config["batch_size"]
    ours_rate, common_rate = images / ours, images / common
    epoch = len(train_inputs)
    amortized = epoch / (setup_seconds + epoch / ours_rate)
    print(f"data {args.data}: {epoch} training captions of {len(train_inputs.names)} images, batch {config['batch_size']}")
    print(f"ours, steady state: {ours_rate:.1f} images/s")
    print(f"ours, one epoch including {setup_seconds:.0f} s of setup and feature caching: {amortized:.1f} images/s")
    print(f"common recipe (PIL + image processor + encoder every step): {common_rate:.1f} images/s")
    print(f"ratio (target >= 1.5): {ours_rate / common_rate:.2f}")


if __name__ == "__main__":
    main()
