"""Train a captioning recipe on real photos and score it on the test split.

Train with train.py flags (everything after `--`), time the whole run, then score the best
checkpoint on the 875 Flickr8k test images with several decodings:
    python bench/caption_quality.py train --name default --data ../shared/data/flickr8k_224 \
        --decoding greedy beam3 -- --max_steps 2400
Score an existing checkpoint:
    python bench/caption_quality.py evaluate saved_models/sweep_runs/model_sweep_X.pth \
        --data ../shared/data/flickr8k_224 --decoding greedy beam3 beam5 sample sample_guarded
A tiny CPU run on the built-in synthetic data (about a minute):
    python bench/caption_quality.py train --name tiny --data builtin --decoding greedy -- \
        --encoder tiny_cnn --max_steps 60 --eval_max_images 16 --log_model False

Each scored decoding prints a Markdown table row (the columns of RESULTS.md), appends a JSON
record to --results and writes every caption with its image name to a JSON file under --out.
The train command's wall time includes everything train.py does: feature caching when the
cache is cold, training and validation. Scoring the test split is timed separately.
Exit status: 0 done, 1 training failed, 2 invalid arguments or data.
"""

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline import prepare_split  # noqa: E402
from dataset import DataError, load_captions, split_indices  # noqa: E402
from evaluation import caption_statistics, generate_captions, generation_options, score_captions  # noqa: E402
from model import CheckpointError, load_checkpoint  # noqa: E402

log = logging.getLogger("caption_quality")


class TrainingFailed(RuntimeError):
    """train.py exited with an error or wrote no checkpoint."""


def named_decoding(num_beams=1, no_repeat=0, penalty=1.0, rerank=0, **sampling):
    """generate() overrides of a named decoding; top_k and temperature in `sampling` turn sampling on."""
    return {"do_sample": bool(sampling), "num_beams": num_beams, "no_repeat_ngram_size": no_repeat,
            "repetition_penalty": penalty, "rerank_neighbors": rerank, **sampling}


# Named decodings: overrides of the checkpoint's stored decoding options for generate().
DECODINGS = {
    "greedy": named_decoding(),
    "greedy_guarded": named_decoding(no_repeat=3),
    "greedy_penalty": named_decoding(penalty=1.2),
    "beam3": named_decoding(3),
    "beam3_guarded": named_decoding(3, no_repeat=3),
    "beam5": named_decoding(5),
    "beam5_guarded": named_decoding(5, no_repeat=3),
    "beam8_guarded": named_decoding(8, no_repeat=3),
    "beam8_rerank15": named_decoding(8, no_repeat=3, rerank=15),
    "sample": named_decoding(top_k=50, temperature=1.0),
    "sample_guarded": named_decoding(no_repeat=3, penalty=1.2, top_k=50, temperature=1.0),
    "sample_t05": named_decoding(top_k=50, temperature=0.5),
}
TABLE_COLUMNS = ("recipe", "decoding", "seed", "wall min", "steps", "BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4",
                 "CIDEr", "ROUGE-L", "METEOR", "distinct %", "repeat3 %", "[UNK] %")


def parse_decoding(text):
    """Return the generate() overrides of a named decoding or of `key=value,...` (num_beams=4,...)."""
    if text in DECODINGS:
        return text, DECODINGS[text]
    overrides = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key not in ("do_sample", "num_beams", "top_k", "temperature", "no_repeat_ngram_size",
                                  "repetition_penalty", "max_length", "rerank_neighbors"):
            raise argparse.ArgumentTypeError(
                f"unknown decoding {text!r}; use one of {', '.join(DECODINGS)} or key=value pairs such as "
                f"num_beams=4,no_repeat_ngram_size=3")
        overrides[key] = value.lower() == "true" if key == "do_sample" else float(value)
    return text, overrides


def score_split(checkpoint_path, data_dir, split, decodings, cache_dir, batch_size=64, seed=0):
    """Caption every image of a split with each decoding; return a list of result dicts."""
    device = torch.device("cpu")
    model, tokenizer, checkpoint = load_checkpoint(checkpoint_path, device)
    data = load_captions(data_dir, seed=checkpoint["config"]["seed"])  # the built-in set depends on the seed
    indices = split_indices(data)[split]
    if not indices:
        raise DataError(f"{data_dir} has no {split} images; pass --split with a split it has (train, val, test)")
    config = {"cache_dir": cache_dir, "max_caption_length": checkpoint["config"]["max_caption_length"]}
    inputs = prepare_split(split, data, indices, model, tokenizer, config, device)
    rows = inputs.valid_rows
    references = {r: inputs.references[r] for r in rows}
    names = [os.path.basename(inputs.names[r]) for r in rows]
    if model.consensus is None and any(o.get("rerank_neighbors") for _, o in decodings):
        # A checkpoint trained without --rerank_neighbors: build the memory of its training
        # images here, as train.py would have stored it.
        from consensus import ConsensusMemory
        train = prepare_split("train", data, split_indices(data)["train"], model, tokenizer, config, device)
        model.consensus = ConsensusMemory.from_split(train)
    results = []
    for name, overrides in decodings:
        options = generation_options(checkpoint["decoding"], **overrides)
        torch.manual_seed(seed)  # sampling decodings repeat exactly
        start = time.time()
        hypotheses = generate_captions(model, tokenizer, inputs.image_batches(rows, batch_size), options, device)
        decode_s = time.time() - start
        scores = score_captions(references, dict(zip(rows, hypotheses)))
        results.append({"decoding": name, "options": options, "images": len(rows), "decode_s": decode_s,
                        "scores": scores, "statistics": caption_statistics(hypotheses),
                        "captions": [{"image": n, "caption": h} for n, h in zip(names, hypotheses)]})
        log.info("%s: BLEU-4 %.4f CIDEr %.4f in %.0f s", name, scores["bleu4"], scores["cider"], decode_s)
    return checkpoint["metadata"], results


def table_row(recipe, seed, wall_s, steps, result):
    """Return one Markdown row in the order of TABLE_COLUMNS."""
    s, stats = result["scores"], result["statistics"]
    meteor = f"{s['meteor']:.3f}" if "meteor" in s else "-"
    wall = f"{wall_s / 60:.1f}" if wall_s is not None else "-"
    cells = [recipe, result["decoding"], str(seed), wall, str(steps),
             *(f"{s[k]:.3f}" for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l")), meteor,
             f"{100 * stats['distinct']:.1f}", f"{100 * stats['repeat3']:.1f}", f"{100 * stats['unk']:.1f}"]
    return "| " + " | ".join(cells) + " |"


def report(args, checkpoint_path, metadata, results, wall_s=None, cpu_s=None):
    """Print the table rows and write the captions file and the results records."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = args.name or Path(checkpoint_path).stem
    seed = metadata["config"]["seed"]
    print("| " + " | ".join(TABLE_COLUMNS) + " |")
    print("|" + "---|" * len(TABLE_COLUMNS))
    for result in results:
        print(table_row(recipe, seed, wall_s, metadata["total_steps"], result))
    captions_path = out / f"{recipe}_seed{seed}_{args.split}_captions.json"
    write_json(captions_path, {"checkpoint": str(checkpoint_path), "split": args.split,
                               "decodings": {r["decoding"]: {"options": r["options"], "scores": r["scores"],
                                                             "captions": r["captions"]} for r in results}})
    print(f"captions: {captions_path}")
    if args.results:
        with open(args.results, "a", encoding="utf-8") as f:
            for r in results:
                record = {"recipe": recipe, "seed": seed, "wall_s": wall_s, "cpu_s": cpu_s, "steps": metadata["total_steps"],
                          "best_step": metadata["best_step"], "timing": metadata.get("timing"),
                          "config": metadata["config"], "checkpoint": str(checkpoint_path), "split": args.split,
                          **{k: v for k, v in r.items() if k != "captions"},
                          "examples": r["captions"][:8]}
                f.write(json.dumps(record, default=str) + "\n")


def write_json(path, payload):
    """Write JSON through a temporary file so that an interrupted run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def train_and_time(args):
    """Run train.py with the given flags in its own output folder; return (checkpoint, wall s, CPU s)."""
    output_dir = Path(args.out) / "runs" / (args.name or "run")
    flags = [a for a in args.train_args if a != "--"]
    command = [sys.executable, str(REPO / "train.py"), "--data", args.data, "--cache_dir", args.cache_dir,
               "--output_dir", str(output_dir), *flags]
    before = set(output_dir.glob("*.pth")) if output_dir.is_dir() else set()
    log.info("running: %s", " ".join(command))
    start, cpu_before = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    status = subprocess.run(command).returncode
    wall_s = time.time() - start
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = cpu.ru_utime + cpu.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    new = sorted(set(output_dir.glob("*.pth")) - before, key=lambda p: p.stat().st_mtime)
    if status != 0 or not new:
        raise TrainingFailed(f"train.py exited with status {status} after {wall_s / 60:.1f} min and wrote "
                           f"{len(new)} checkpoints in {output_dir}; see its log above")
    # CPU time shows how much of the wall time other processes on the machine took.
    log.info("train.py finished in %.1f min wall, %.1f min CPU: %s", wall_s / 60, cpu_s / 60, new[-1])
    return new[-1], wall_s, cpu_s


def build_parser():
    parser = argparse.ArgumentParser(description="Train and score captioning recipes on a test split.")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, help="dataset path as train.py's --data, or 'builtin'")
    common.add_argument("--split", default="test", help="split scored: test | val | train")
    common.add_argument("--decoding", nargs="+", type=parse_decoding, default=[parse_decoding("greedy")],
                        help=f"decodings scored: {', '.join(DECODINGS)} or key=value,... overrides")
    common.add_argument("--cache_dir", default="saved_models/cache", help="feature and image cache folder")
    common.add_argument("--out", default="saved_models/quality", help="folder of caption files and runs")
    common.add_argument("--results", default=None, help="append one JSON record per decoding to this file")
    common.add_argument("--name", default=None, help="recipe name in the table (default: checkpoint name)")
    train = sub.add_parser("train", parents=[common], help="run train.py, then score its checkpoint")
    train.add_argument("train_args", nargs=argparse.REMAINDER, help="train.py flags after --")
    evaluate = sub.add_parser("evaluate", parents=[common], help="score an existing checkpoint")
    evaluate.add_argument("checkpoint", help="a .pth written by train.py")
    return parser


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        # train.py accepts a prefix of an option (--output for --output_dir), as argparse does by default
        for flag in (a.split("=")[0] for a in args.train_args if a.startswith("--")):
            if len(flag) > 3 and any(name.startswith(flag) for name in ("--data", "--output_dir", "--cache_dir")):
                parser.error(f"{flag} after -- is set by this script (from its --data, --out and --cache_dir); "
                             f"drop it from the train.py flags")
    try:
        wall_s = cpu_s = None
        if args.command == "train":
            checkpoint_path, wall_s, cpu_s = train_and_time(args)
        else:
            checkpoint_path = args.checkpoint
        start = time.time()
        metadata, results = score_split(checkpoint_path, args.data, args.split, args.decoding, args.cache_dir)
        log.info("scored %s split in %.1f min", args.split, (time.time() - start) / 60)
    except TrainingFailed as e:
        log.error("%s", e)
        return 1
    except (CheckpointError, DataError) as e:
        log.error("%s", e)
        return 2
    report(args, checkpoint_path, metadata, results, wall_s, cpu_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
