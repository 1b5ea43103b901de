"""Training speed against the common recipe, on the same model and the same Flickr8k photos.
Target: ours at least 1.5 times the common recipe's images/s.

Ours: train.py's default path. EfficientNet-Lite0 is frozen, its features are computed once
into a memory-mapped cache and the captions are tokenized once. A background thread assembles
each batch from that cache while the previous step runs.
Common recipe: what a transformers VisionEncoderDecoderModel script does each step: open each
JPEG with PIL, run an image processor (resize, rescale, normalise), run the frozen encoder,
then the decoder forward and backward.
Both sides train the same model with the same batch size, one image per caption as a
per-caption data collator loads them, and blocks of steps alternate between them. Also
printed: the rate of filling the feature cache, and our rate over a first epoch that has to
fill it.

    python bench/training_speed.py --cache_dir /path/to/saved_models/cache
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import train  # noqa: E402
import training  # noqa: E402
from data_pipeline import compute_features, prefetch, train_batches  # noqa: E402
from model import caption_loss  # noqa: E402

FLICKR = os.path.join(os.path.dirname(REPO), "shared", "data", "flickr8k_224")


def optimizer_step(model, optimizer, params, inputs, input_ids, attention_mask, targets, config):
    logits = model(input_ids, attention_mask, **inputs)
    loss = caption_loss(logits, targets, config["label_smoothing"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, config["grad_clip"])
    loss.item()  # train.py reads the loss every step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def common_recipe_inputs(processor, train_inputs, idx):
    """Decode and preprocess the batch's JPEGs from disk, as a per-step data collator does."""
    from PIL import Image
    rows = train_inputs.caption_rows[idx].tolist()
    images = []
    for row in rows:
        with Image.open(train_inputs.names[row]) as image:
            images.append(image.convert("RGB"))
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixel_values}


def feature_caching_rate(model, data, indices):
    """Images/s of filling the feature cache (decode, resize, encoder forward), timed on `indices`."""
    mc = model.model_config
    fill = compute_features(model, data, indices, mc["image_size"], mc["mean"], mc["std"], torch.device("cpu"))
    out = np.empty((len(indices), mc["num_image_tokens"], mc["encoder_dim"]), dtype=np.float16)
    start = time.perf_counter()
    fill(out)
    return len(indices) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=FLICKR, help="dataset path (default: %(default)s)")
    parser.add_argument("--cache_dir", default=os.path.join(REPO, "saved_models", "cache"),
                        help="feature cache folder, whose keys include the absolute image paths (default: %(default)s)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks per side, alternating")
    parser.add_argument("--block_steps", type=int, default=4, help="steps per block")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a folder of captions.csv and images/")
    from transformers import EfficientNetImageProcessor
    from dataset import load_captions, split_indices
    data_path = os.path.abspath(args.data)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    config = {**train.DEFAULTS, "data": data_path, "cache_dir": os.path.abspath(args.cache_dir),
              "wandb_mode": "disabled"}
    ctx = training.DistContext(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model, _, train_inputs, _, _ = training.prepare(config, ctx, None)
    model.train()
    optimizer = training.make_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    mc = model.model_config
    processor = EfficientNetImageProcessor(size={"height": mc["image_size"], "width": mc["image_size"]},
                                           do_center_crop=False, image_mean=mc["mean"], image_std=mc["std"],
                                           rescale_factor=1 / 255, include_top=False)
    ours_batches = prefetch(train_inputs.caption_batch(idx) for _, idx in
                            train_batches(train_inputs, config["batch_size"], 1, 0, config["seed"]))
    common_indices = train_batches(train_inputs, config["batch_size"], 1, 0, config["seed"] + 1)

    def ours_block(steps):
        start = time.perf_counter()
        for _ in range(steps):
            inputs, input_ids, attention_mask, targets = next(ours_batches)
            optimizer_step(model, optimizer, params, inputs, input_ids, attention_mask, targets, config)
        return time.perf_counter() - start

    def common_block(steps):
        start = time.perf_counter()
        for _ in range(steps):
            idx = next(common_indices)[1]
            _, input_ids, attention_mask, targets = train_inputs.caption_batch(idx)
            inputs = common_recipe_inputs(processor, train_inputs, idx)
            optimizer_step(model, optimizer, params, inputs, input_ids, attention_mask, targets, config)
        return time.perf_counter() - start

    ours_block(2)  # warm-up of both paths: allocator, thread pool, first touch of the cache pages
    common_block(1)
    ours = common = 0.0
    for block in range(args.blocks):
        if block % 2 == 0:
            ours += ours_block(args.block_steps)
            common += common_block(args.block_steps)
        else:
            common += common_block(args.block_steps)
            ours += ours_block(args.block_steps)

    dataset = load_captions(data_path, seed=config["seed"])
    sample = split_indices(dataset, config["val_fraction"], config["seed"])["train"][:64]
    caching_rate = feature_caching_rate(model, dataset, sample)

    images = args.blocks * args.block_steps * config["batch_size"]
    ours_rate, common_rate = images / ours, images / common
    epoch, cached_images = len(train_inputs), len(train_inputs.names)
    first_epoch = epoch / (epoch / ours_rate + cached_images / caching_rate)
    print(f"data {data_path}: {epoch} training captions of {cached_images} images, batch {config['batch_size']}, "
          f"{images} images a side")
    print(f"ours, steady state: {ours_rate:.1f} images/s")
    print(f"filling the feature cache (decode, resize, encoder forward): {caching_rate:.1f} images/s")
    print(f"ours, first epoch including filling the cache: {first_epoch:.1f} images/s")
    print(f"common recipe (PIL + image processor + encoder every step): {common_rate:.1f} images/s")
    print(f"ratio (target >= 1.5): {ours_rate / common_rate:.2f}")


if __name__ == "__main__":
    main()
