"""Caption images with a trained checkpoint, list the checkpoints, or score one on a dataset split.

Caption a photo with the best completed run in saved_models/sweep_runs (lowest val/loss):
    python inference.py photo.jpg
Several images, a folder and a glob in one call, with a chosen checkpoint, as JSON:
    python inference.py a.jpg photos/ "more/*.png" saved_models/sweep_runs/model_sweep_ID.pth --json
Pick the run with the highest CIDEr and decode with beam search instead of the run's sampling:
    python inference.py photo.jpg --metric val/cider --num-beams 5
Every checkpoint, best first (reads the JSON summaries, not the weights):
    python inference.py --list-models
Score the best checkpoint on the test split (a tiny CPU run on the built-in data):
    python inference.py --evaluate builtin --split test --max-images 64 --no-meteor

From Python:
    from model import load_checkpoint
    from inference import best_checkpoint_path, caption_images
    model, tokenizer, checkpoint = load_checkpoint(best_checkpoint_path(), "cpu")
    print(caption_images(model, tokenizer, checkpoint, ["photo.jpg"]))

Decoding follows the checkpoint's run (its top_k, temperature, beams and caption length)
unless --top-k, --temperature, --num-beams, --greedy or --max-length override it.
Exit status: 0 every image captioned, 1 some images could not be read (the others are
captioned and, for --evaluate, scored), 2 invalid options, checkpoint or data.
"""

import argparse
import gc
import glob
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

# torch, transformers and the model code are imported where they are used, so that
# --list-models starts without them.
from checkpoints import DEFAULT_RUNS_DIR, DEFAULT_SWEEPS_DIR, TABLE_METRICS, best_checkpoint_path, best_record
from checkpoints import logged_val_metrics, metric_goal, models_table, rank_records, scan_runs

__all__ = ["best_checkpoint_path", "caption_images", "decoding_options", "load_pixels"]

CHECKPOINT_SUFFIXES = (".pth", ".pt")
EVALUATIONS_DIR = "saved_models/evaluations"
EXIT_OK, EXIT_UNREADABLE_IMAGES, EXIT_INVALID = 0, 1, 2


# --------------------------------------------------------------------------------------
# Decoding and preprocessing, both taken from the checkpoint

def decoding_options(checkpoint, model=None, top_k=None, temperature=None, num_beams=None, greedy=False,
                     max_length=None, rerank_neighbors=None, path=None):
    """Return generate() options: the run's decoding settings with these overrides; raise ValueError.

    --top-k or --temperature turn sampling on; --num-beams alone turns it off (plain beam search);
    greedy means one beam and no sampling. max_length counts tokens including [BOS].
    rerank_neighbors picks among the beams by consensus with that many training images (0 = off).
    """
    from evaluation import generation_options
    from training import decoding_defaults
    sampling_given = top_k is not None or temperature is not None
    if greedy and (sampling_given or (num_beams or 1) > 1):
        raise ValueError("--greedy cannot be combined with --top-k, --temperature or --num-beams above 1")
    for name, value in (("--top-k", top_k), ("--num-beams", num_beams)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be at least 1")
    if temperature is not None and not 0 < temperature < math.inf:
        raise ValueError(f"--temperature={temperature} must be positive and finite")
    if rerank_neighbors is not None and rerank_neighbors < 0:
        raise ValueError(f"--rerank-neighbors={rerank_neighbors} must not be negative (0 turns reranking off)")
    decoding = checkpoint.get("decoding") or decoding_defaults(checkpoint["config"])
    do_sample = None  # None keeps the run's setting
    if sampling_given:
        do_sample = True
    elif greedy or num_beams is not None:
        do_sample = False
    options = generation_options(decoding, top_k=top_k, temperature=temperature, do_sample=do_sample,
                                 num_beams=1 if greedy else num_beams, max_length=max_length,
                                 rerank_neighbors=rerank_neighbors)
    if rerank_neighbors and options["num_beams"] < 2:
        raise ValueError(f"--rerank-neighbors={rerank_neighbors} chooses among beams, but decoding uses one; "
                         f"add --num-beams 2 or more")
    if options.get("rerank_neighbors") and options["do_sample"]:
        raise ValueError(f"rerank_neighbors={options['rerank_neighbors']} reranks beam-search captions, but "
                         f"--top-k/--temperature sample them; add --rerank-neighbors 0 to sample, or leave both out")
    if rerank_neighbors and model is not None and model.consensus is None:
        raise ValueError(f"--rerank-neighbors={rerank_neighbors}: {path or 'this checkpoint'} stores no training "
                         f"captions to rerank with; train with --rerank_neighbors N, or leave the option out")
    limit = None
    if model is not None:
        config = model.decoder.config
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if options["max_length"] < 2 or (limit and options["max_length"] > limit):
        raise ValueError(f"--max-length={options['max_length']} must be at least 2 and at most the decoder's "
                         f"{limit} positions (tokens including [BOS])")
    return options


def decoding_name(options):
    """Return a file-name tag of generate() options, such as greedy, beam8-norepeat3-rerank15 or sample-k50-t1."""
    beams = options.get("num_beams", 1)
    if options.get("do_sample"):
        parts = [f"sample-k{options['top_k']}-t{options['temperature']:g}"] + ([f"beam{beams}"] if beams > 1 else [])
    else:
        parts = ["greedy" if beams == 1 else f"beam{beams}"]
    if options.get("no_repeat_ngram_size"):
        parts.append(f"norepeat{options['no_repeat_ngram_size']}")
    if options.get("repetition_penalty"):
        parts.append(f"penalty{options['repetition_penalty']:g}")
    if options.get("rerank_neighbors"):
        parts.append(f"rerank{options['rerank_neighbors']}")
    return "-".join(parts)


def load_pixels(image, image_size):
    """Decode a path or a PIL image into uint8 (3, S, S) pixels as training does; raise OSError.

    Paths go through dataset.open_image (EXIF rotation, alpha on white, 16-bit rescaled).
    A PIL image is used as given: only its mode is converted, EXIF orientation is not applied.
    """
    from dataset import image_to_array, open_image, to_rgb
    img = to_rgb(image) if isinstance(image, Image.Image) else open_image(image)
    return image_to_array(img, image_size)


def caption_images(model, tokenizer, checkpoint, images, batch_size=32, seed=None, **decoding):
    """Caption PIL images or image paths with a model from model.load_checkpoint; return the captions.

    decoding takes decoding_options' overrides (top_k, temperature, num_beams, greedy, max_length,
    rerank_neighbors).
    seed (default: the run's seed) makes sampled captions repeatable for the same images and batch size.
    Raises OSError naming the first image that cannot be read, ValueError for invalid options.
    """
    import torch
    from captioning import iter_captions
    options = decoding_options(checkpoint, model, **decoding)
    preprocessing = checkpoint["preprocessing"]
    torch.manual_seed(checkpoint["config"].get("seed", 0) if seed is None else seed)
    captions = []
    for _, caption, error in iter_captions(model, tokenizer, preprocessing, list(images),
                                           lambda image: load_pixels(image, preprocessing["image_size"]),
                                           options, batch_size):
        if error:
            raise OSError(error)
        captions.append(caption)
    return captions


# --------------------------------------------------------------------------------------
# Command line: inputs and the checkpoint

def image_extensions():
    """File name extensions Pillow can open here (.jpg, .png, .gif, .webp, ...)."""
    return set(Image.registered_extensions())


def expand_inputs(arguments):
    """Turn image arguments (files, folders, glob patterns) into (image paths, [(argument, error)]).

    A folder contributes the files with an image extension, sorted and not recursive. A file
    named on the command line is tried whatever its extension, so a mislabelled file is
    reported rather than skipped.
    """
    images, errors = [], []
    extensions = image_extensions()
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in extensions and not p.name.startswith("."))
            if not found:
                errors.append((argument, "folder contains no image files"))
            images.extend(found)
        elif path.exists():
            images.append(argument)
        elif any(c in argument for c in "*?["):
            found = sorted(p for p in glob.glob(argument, recursive=True) if os.path.isfile(p))
            if not found:
                errors.append((argument, "no files match this pattern"))
            images.extend(found)
        else:
            errors.append((argument, "no such file or folder"))
    return images, errors


def split_inputs(args):
    """Separate a checkpoint given as a positional argument (.pth or .pt) from the image arguments."""
    checkpoints = [a for a in args.inputs if a.endswith(CHECKPOINT_SUFFIXES)]
    images = [a for a in args.inputs if not a.endswith(CHECKPOINT_SUFFIXES)]
    if args.checkpoint:
        checkpoints.insert(0, args.checkpoint)
    if len(checkpoints) > 1:
        raise ValueError(f"several checkpoints given ({', '.join(checkpoints)}); pass one")
    return images, checkpoints[0] if checkpoints else None


def choose_checkpoint(path, runs_dir, metric, data=None):
    """Return (checkpoint path, how it was chosen): the given file, or the best completed run
    (of the runs trained on `data`, when given)."""
    if path:
        return path, None
    record = best_record(runs_dir, metric, data)
    score = f"{record.metric(metric):.4f}"
    return record.path, f"best completed run in {runs_dir} by {metric}: {score}, run {record.run_id}"


def describe_checkpoint(path, chosen, checkpoint, metric):
    """Describe the checkpoint in one line: its path, score, run id and status."""
    if chosen:
        return f"checkpoint: {path} ({chosen})"
    meta = checkpoint["metadata"]
    value = (meta.get("metrics") or {}).get(metric)
    score = f"{value:.4f}" if isinstance(value, (int, float)) else "not recorded"
    return f"checkpoint: {path} ({metric} {score}, run {meta.get('run_id', '?')}, {meta.get('status', '?')})"


def json_safe(value):
    """Replace NaN and infinity by None, recursively, so the output is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def report_error(message):
    print(f"error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# Command line: the three commands

def list_models(args):
    """Print every checkpoint of --runs-dir, best first, from the JSON summaries."""
    runs_dir = Path(args.runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        report_error(f"--runs-dir {runs_dir} is a file; pass the folder of the checkpoints (train.py's --output_dir)")
        return EXIT_INVALID
    if not runs_dir.exists() and str(args.runs_dir) != DEFAULT_RUNS_DIR:
        report_error(f"--runs-dir {runs_dir}: no such folder; pass the folder of the checkpoints "
                     f"(train.py's --output_dir)")
        return EXIT_INVALID
    records = rank_records(scan_runs(args.runs_dir, args.sweeps_dir), args.metric)
    logged = logged_val_metrics(records)
    if logged and args.metric not in logged:
        report_error(f"--metric {args.metric}: no checkpoint in {args.runs_dir} logged it; they logged "
                     f"{', '.join(logged)}")
        return EXIT_INVALID
    if args.json:
        fields = [{k: v for k, v in asdict(r).items() if k != "config"} for r in records]
        print(json.dumps(json_safe(fields), indent=1))
    if not records:
        print(f"no checkpoints in {args.runs_dir}; train one with `python train.py` or run a sweep with "
              f"`python simple_sweep.py`", file=sys.stderr)
        return EXIT_OK
    if not args.json:
        files = sum(1 for r in records if r.source == "checkpoint")
        others = f" and {len(records) - files} sweep runs without one" if files < len(records) else ""
        noun = "checkpoint" if files == 1 else "checkpoints"
        print(f"{files} {noun} in {args.runs_dir}{others}, best first by {args.metric} "
              f"({metric_goal(args.metric)}):")
        print(models_table(records, args.metric))
    return EXIT_OK


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to caption with: the model, its tokenizer and the resolved decoding."""
    model: object     # model.ImageCaptioner
    tokenizer: object
    checkpoint: dict
    path: str
    description: str  # the line that names the checkpoint and its score
    options: dict     # generate() options
    seed: int


def load_for_command(args, checkpoint_arg):
    """Choose the checkpoint, load it on the device, resolve decoding and seed the sampler."""
    import torch
    from model import load_checkpoint
    from training import resolve_device
    from transformers.utils import logging as transformers_logging
    transformers_logging.set_verbosity_error()  # keep transformers warnings (padding advice) out of the output
    device = resolve_device(args.device)  # ValueError for a device this machine lacks
    path, chosen = choose_checkpoint(checkpoint_arg, args.runs_dir, args.metric, getattr(args, "evaluate", None))
    model, tokenizer, checkpoint = load_checkpoint(path, device)
    options = decoding_options(checkpoint, model, args.top_k, args.temperature, args.num_beams, args.greedy,
                               args.max_length, args.rerank_neighbors, path=path)
    seed = checkpoint["config"].get("seed", 0) if args.seed is None else args.seed
    torch.manual_seed(seed)
    return LoadedCheckpoint(model, tokenizer, checkpoint, str(path),
                            describe_checkpoint(path, chosen, checkpoint, args.metric), options, seed)


def caption_command(args, image_args, checkpoint_arg):
    """Caption every image argument; print one line per image, or one JSON document."""
    from captioning import iter_captions
    images, errors = expand_inputs(image_args)
    if not images:
        for argument, message in errors:
            report_error(f"{argument}: {message}")
        report_error("no images to caption; pass image files, folders or glob patterns")
        return EXIT_INVALID
    loaded = load_for_command(args, checkpoint_arg)
    if not args.json:
        print(loaded.description)
    for argument, message in errors:
        report_error(f"{argument}: {message}")

    # Captions are printed batch by batch, so a long folder shows progress; errors go to stderr.
    preprocessing = loaded.checkpoint["preprocessing"]
    results = []
    for image, caption, error in iter_captions(loaded.model, loaded.tokenizer, preprocessing, images,
                                               lambda path: load_pixels(path, preprocessing["image_size"]),
                                               loaded.options, args.batch_size):
        if error:
            report_error(error)
            errors.append((image, error))
            continue
        results.append({"image": image, "caption": caption})
        if not args.json:
            print(f"{image}: {caption}", flush=True)

    if args.json:
        meta = loaded.checkpoint["metadata"]
        print(json.dumps(json_safe({
            "checkpoint": loaded.path, "run_id": meta.get("run_id"), "metric": args.metric,
            "score": (meta.get("metrics") or {}).get(args.metric), "decoding": loaded.options, "seed": loaded.seed,
            "captions": results, "errors": [{"image": image, "error": error} for image, error in errors],
        }), indent=1))
    return EXIT_UNREADABLE_IMAGES if errors else EXIT_OK


def check_output(output):
    """Raise ValueError before scoring when --output cannot be written or would replace a checkpoint."""
    if output.suffix in (".pth", ".pt"):
        raise ValueError(f"--output {output} is a checkpoint file name; pass a .json file name")
    try:
        if output.with_suffix(".pth").is_file():
            raise ValueError(f"--output {output} is the summary of the checkpoint {output.with_suffix('.pth')}; "
                             f"pass another file name")
        blocking = next((p for p in output.parents if p.is_file()), None)
        if blocking is not None:
            raise ValueError(f"--output {output} is inside {blocking}, which is a file; pass a path in a folder")
        if output.is_dir():
            raise ValueError(f"--output {output} is a folder; pass a file name such as {output / 'captions.json'}")
        output.parent.mkdir(parents=True, exist_ok=True)
        existed = output.exists()
        with open(output, "a"):  # opened without truncating, so an existing file is kept as it is
            pass
        if not existed:
            output.unlink()
    except OSError as e:
        raise ValueError(f"cannot write --output {output} ({e.strerror or e}); pass another --output") from e


def evaluate_command(args, checkpoint_arg):
    """Caption and score a split of --evaluate DATA; print the scores and write every caption to JSON."""
    from captioning import evaluate_split, print_scores, write_json
    if args.evaluate != "builtin" and not Path(args.evaluate).expanduser().exists():
        raise ValueError(f"--evaluate {args.evaluate}: no such file or folder; pass a dataset path (a folder with "
                         f"captions.csv and images/, a Flickr8k, COCO or Karpathy caption file) or 'builtin'")
    loaded = load_for_command(args, checkpoint_arg)
    # The data, split, decoding and image limit are part of the default name, so scoring one
    # checkpoint two ways keeps both files.
    data_name = "builtin" if args.evaluate == "builtin" else Path(args.evaluate).resolve().stem
    tag = decoding_name(loaded.options)
    tag += f"-len{args.max_length}" if args.max_length else ""
    tag += f"-first{args.max_images}" if args.max_images else ""
    default = f"{Path(loaded.path).stem}_{data_name}_{args.split}_{tag}.json"
    output = Path(args.output or Path(EVALUATIONS_DIR) / default)
    check_output(output)
    result = evaluate_split(loaded.model, loaded.tokenizer, loaded.checkpoint, args.evaluate, args.split,
                            loaded.options, args.batch_size, args.max_images, meteor=not args.no_meteor)
    result = json_safe({"checkpoint": loaded.path, "seed": loaded.seed, **result})
    if args.json:
        summary = {k: v for k, v in result.items() if k != "captions"}
        print(json.dumps({**summary, "output": str(output)}, indent=1))
    else:
        print(loaded.description)
        print_scores(result)
        print(f"captions: {output}")
    try:
        write_json(output, result)
    except OSError as e:
        raise ValueError(f"cannot write the captions to {output} ({e}); the scores above are complete, "
                         f"pass another --output to keep the captions") from e
    return EXIT_UNREADABLE_IMAGES if result["skipped"] else EXIT_OK


# --------------------------------------------------------------------------------------

def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(description="Caption images with a trained checkpoint, list the checkpoints "
                                                 "or score one on a dataset split.")
    parser.add_argument("inputs", nargs="*", metavar="IMAGE",
                        help="image files, folders or glob patterns; an argument ending in .pth or .pt is the "
                             "checkpoint to use")
    parser.add_argument("--checkpoint", help="checkpoint file (default: the best completed run in --runs-dir)")
    parser.add_argument("--runs-dir", default=DEFAULT_RUNS_DIR, help="folder of run checkpoints (default: %(default)s)")
    parser.add_argument("--sweeps-dir", default=DEFAULT_SWEEPS_DIR,
                        help="local sweep database whose runs without a checkpoint --list-models also shows "
                             "(default: %(default)s)")
    parser.add_argument("--metric", default="val/loss",
                        help="validation metric that picks the best run: val/loss is minimised, "
                             f"caption scores ({', '.join(m for m in TABLE_METRICS if m != 'val/loss')}) maximised "
                             "(default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="images captioned per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:1 | mps")

    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list-models", action="store_true", help="list every checkpoint, best first, and exit")
    mode.add_argument("--evaluate", metavar="DATA",
                      help="caption and score a split of DATA ('builtin' or a dataset path, see dataset.py)")

    evaluate = parser.add_argument_group("--evaluate")
    evaluate.add_argument("--split", choices=("test", "val", "train"), help="split to score (default: test)")
    evaluate.add_argument("--max-images", type=positive_int, help="score only the split's first N images")
    evaluate.add_argument("--output", help=f"JSON file of every caption (default: {EVALUATIONS_DIR}/"
                                           f"CHECKPOINT_DATA_SPLIT_DECODING.json, DECODING such as beam8-norepeat3-rerank15, "
                                           f"with -lenN and -firstN for --max-length and --max-images)")
    evaluate.add_argument("--no-meteor", action="store_true",
                          help="skip METEOR, which starts a Java process (about 15 s on a 2-core CPU)")

    decoding = parser.add_argument_group("decoding (default: the checkpoint's run settings)")
    decoding.add_argument("--top-k", type=int, help="sample from the k most likely tokens (turns sampling on)")
    decoding.add_argument("--temperature", type=float, help="sampling temperature (turns sampling on)")
    decoding.add_argument("--num-beams", type=int, help="beam width; without --top-k/--temperature, no sampling")
    decoding.add_argument("--greedy", action="store_true", help="most likely token at each step, one beam")
    decoding.add_argument("--max-length", type=int, help="maximum caption length in tokens, [BOS] included")
    decoding.add_argument("--rerank-neighbors", type=int, metavar="N",
                          help="keep the beam that agrees most with the captions of the N nearest training images "
                               "(all of them at most); 0 turns it off (needs a checkpoint trained with "
                               "--rerank_neighbors)")
    decoding.add_argument("--seed", type=int, help="random seed of sampling (default: the run's seed)")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if not args.metric.startswith("val/"):
        report_error(f"--metric={args.metric} is not a validation metric; use one of {', '.join(TABLE_METRICS)} "
                     f"(or another val/ metric that train.py logs)")
        return EXIT_INVALID
    if args.list_models:
        if args.inputs or args.checkpoint:
            report_error("--list-models takes no images or checkpoint; pass --runs-dir to list another folder")
            return EXIT_INVALID
        return list_models(args)
    try:
        images, checkpoint_arg = split_inputs(args)
        if args.evaluate is not None:
            if images:
                raise ValueError(f"--evaluate scores a dataset split and takes no images (got {images[0]})")
            args.split = args.split or "test"
            return evaluate_command(args, checkpoint_arg)
        evaluate_only = [name for name, value in (("--split", args.split), ("--max-images", args.max_images),
                                                  ("--output", args.output), ("--no-meteor", args.no_meteor))
                         if value]
        if evaluate_only:
            verb, pronoun = ("applies", "it") if len(evaluate_only) == 1 else ("apply", "them")
            raise ValueError(f"{', '.join(evaluate_only)} only {verb} to --evaluate DATA; leave {pronoun} out to "
                             f"caption images")
        return caption_command(args, images, checkpoint_arg)
    except (ValueError, FileNotFoundError) as e:  # CheckpointError and DataError are ValueErrors
        report_error(str(e).replace("\n", " "))
        return EXIT_INVALID


if __name__ == "__main__":
    status = main()
    # Exclude every object left from the final garbage collection: walking the millions that torch,
    # transformers and timm create took 1.6 to 2 s of each call's exit (2-core CPU). Their finalizers are
    # not needed, because main() has printed everything and closed the files it wrote.
    gc.freeze()
    sys.exit(status)
