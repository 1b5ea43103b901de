"""Time inference.py: one call on N images against single-image calls, where a cold call's time
goes, and --list-models over many checkpoints against loading each one with torch.load.
Targets: one call at least 5x faster per image, and --list-models at least 20x faster than
torch.load and under 1 s warm.

    python bench/inference_speed.py saved_models/bench_memory/model_sweep_ID.pth
A quick run:
    python bench/inference_speed.py CHECKPOINT --checkpoints 200 --images 8 --single_calls 2

The images are the first N of Flickr8k's validation split when ../shared/data/flickr8k_224
exists, else rendered images of the built-in data. Single-image calls are timed on the first
--single_calls images, and their mean stands for each of the N calls. The many-checkpoint
folder is made of hard links to one checkpoint, each with its own JSON summary, so it costs
almost no disk. Every timing is the wall time of a real subprocess, process start and imports
included. "Cold" means a new process, while the operating system's file cache is warm.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing_marks import mark_after

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k_224"
LOAD_ALL = ("import sys, glob, torch\n"
            "for path in sorted(glob.glob(sys.argv[1] + '/*.pth')):\n"
            "    torch.load(path, map_location='cpu', weights_only=True)\n")


# --------------------------------------------------------------------------------------
# The traced call: this script, run again with --trace, imports inference.py and times its parts

def trace_call(out_path, argv):
    """Run inference.main(argv) as `python inference.py` would, recording when each part ends."""
    marks = [("interpreter started", time.time())]
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401
    marks.append(("import torch", time.time()))
    import captioning
    import inference
    import model
    marks.append(("import inference.py and its modules", time.time()))
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    marks.append(("import transformers (GPT-2)", time.time()))
    import timm  # noqa: F401
    marks.append(("import timm", time.time()))

    mark_after(marks, model, "load_checkpoint", "checkpoint load (read, build the model, load weights)")
    mark_after(marks, inference, "load_pixels", "image decode and resize")
    mark_after(marks, captioning, "model_inputs", "normalise and encoder forward")
    mark_after(marks, captioning, "generate_captions", "generate (decoder) and print")
    status = inference.main(argv)
    marks.append(("main() returned", time.time()))
    Path(out_path).write_text(json.dumps(marks))
    gc.freeze()  # as inference.py's `if __name__ == "__main__"` block does before it exits
    sys.exit(status)


# --------------------------------------------------------------------------------------

def timed_run(command, cwd, env=None):
    """Run a command and return (seconds, CompletedProcess). Exit with its output if it failed."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(map(str, command[:4]))} ... failed:\n{result.stderr[-2000:]}")
    return seconds, result


def inference_run(args, cwd):
    return timed_run([sys.executable, str(REPO / "inference.py"), *map(str, args)], cwd)


def make_runs_dir(checkpoint, folder, count):
    """Hard-link the checkpoint `count` times with a JSON summary each (metrics vary per run)."""
    checkpoint = Path(checkpoint)
    summary = json.loads(checkpoint.with_suffix(".json").read_text())
    folder.mkdir(parents=True)
    for i in range(count):
        path = folder / f"model_sweep_bench{i:05d}_adamw_lr0.001_cosine.pth"
        path.hardlink_to(checkpoint)
        stat = path.stat()
        metrics = {**summary.get("metrics", {}), "val/loss": 1.0 + i / count}
        path.with_suffix(".json").write_text(json.dumps({**summary, "run_id": f"bench{i:05d}", "metrics": metrics,
                                                         "checkpoint_size": stat.st_size,
                                                         "checkpoint_mtime_ns": stat.st_mtime_ns}))


def sample_images(count, folder):
    """Return `count` image paths: Flickr8k validation photos, else rendered built-in images."""
    sys.path.insert(0, str(REPO))
    from dataset import load_captions, render_builtin, split_indices
    if (FLICKR / "captions.csv").exists():
        data = load_captions(str(FLICKR))
        return [data.images[i] for i in split_indices(data)["val"][:count]]
    paths = []
    for i in range(count):
        paths.append(folder / f"image{i}.png")
        render_builtin(1080 + i % 120, 0).save(paths[-1])
    return paths


def time_listing(checkpoint, count, tmp):
    """Print the times of --list-models (first, warm, without summaries) and of torch.load, and return their ratio."""
    runs_dir = tmp / "runs"
    make_runs_dir(checkpoint, runs_dir, count)
    first, result = inference_run(["--list-models", "--runs-dir", runs_dir], tmp)
    warm, _ = inference_run(["--list-models", "--runs-dir", runs_dir], tmp)
    rows = len(result.stdout.splitlines()) - 2
    size_mb = Path(checkpoint).stat().st_size / 2**20
    print(f"--list-models, {rows} checkpoints of {size_mb:.0f} MB: {first:.2f} s first, {warm:.2f} s warm")
    for summary in runs_dir.glob("*.json"):
        summary.unlink()
    rebuild, _ = inference_run(["--list-models", "--runs-dir", runs_dir], tmp)
    print(f"--list-models without JSON summaries (reads each checkpoint's metadata, writes the summaries): "
          f"{rebuild:.2f} s")
    load_all, _ = timed_run([sys.executable, "-c", LOAD_ALL, str(runs_dir)], tmp)
    print(f"torch.load of each of the {count} checkpoints (weights_only, one process): {load_all:.2f} s")
    return load_all / warm, warm


def time_captioning(checkpoint, images, single_calls, tmp):
    """Print one call on all images against single-image calls, and return the per-image ratio."""
    one_call, _ = inference_run([*images, checkpoint, "--greedy"], tmp)
    print(f"one call on {len(images)} images: {one_call:.2f} s ({one_call / len(images):.3f} s an image)")
    singles = [inference_run([image, checkpoint, "--greedy"], tmp)[0] for image in images[:single_calls]]
    single = sum(singles) / len(singles)
    print(f"single-image calls: {single:.2f} s each, mean of {len(singles)} "
          f"(min {min(singles):.2f} s, max {max(singles):.2f} s); {len(images)} of them: {single * len(images):.1f} s")
    return single / (one_call / len(images))


def traced_parts(checkpoint, image, tmp, env=None):
    """Run one cold single-image call under the tracer and return [(part, seconds)] from launch to exit."""
    marks_path = tmp / "trace.json"
    launched = time.time()
    timed_run([sys.executable, str(Path(__file__).resolve()), "--trace", marks_path, image, checkpoint, "--greedy"],
              tmp, env)
    ended = time.time()
    marks = json.loads(marks_path.read_text())
    parts, previous = [], launched
    for label, moment in [("process launch to interpreter start", marks[0][1]), *marks[1:]]:
        parts.append((label, moment - previous))
        previous = moment
    return parts + [("interpreter exit", ended - previous), ("total", ended - launched)]


def trace_single_call(checkpoint, image, tmp):
    """Print where the time of a cold single-image call goes, with torch's default threads and with one."""
    default = traced_parts(checkpoint, image, tmp)
    one_thread = traced_parts(checkpoint, image, tmp, {**os.environ, "OMP_NUM_THREADS": "1"})
    print("one cold single-image call, traced (seconds; the second column with OMP_NUM_THREADS=1):")
    for (label, seconds), (_, single_thread_seconds) in zip(default, one_thread):
        print(f"  {seconds:6.2f} {single_thread_seconds:6.2f}  {label}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint written by train.py (its JSON summary beside it)")
    parser.add_argument("--checkpoints", type=int, default=1000, help="checkpoints in the --list-models folder")
    parser.add_argument("--images", type=int, default=64, help="images of the one call")
    parser.add_argument("--single_calls", type=int, default=8, help="single-image calls timed (at most --images)")
    parser.add_argument("--trace", nargs=argparse.REMAINDER, metavar="OUT ARG",
                        help=argparse.SUPPRESS)  # internal: the traced call, see trace_call
    args = parser.parse_args()
    if args.trace:
        trace_call(args.trace[0], args.trace[1:])
    if not args.checkpoint:
        sys.exit("no checkpoint given; pass a .pth written by train.py, for example the one bench/memory.py "
                 "leaves in saved_models/bench_memory/")
    if not Path(args.checkpoint).with_suffix(".json").is_file():
        sys.exit(f"checkpoint {args.checkpoint} or its JSON summary not found; pass a .pth written by train.py, "
                 f"for example the one bench/memory.py leaves in saved_models/bench_memory/")
    checkpoint = str(Path(args.checkpoint).resolve())
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = sample_images(args.images, tmp)
        trace_single_call(checkpoint, images[0], tmp)
        caption_ratio = time_captioning(checkpoint, images, min(args.single_calls, len(images)), tmp)
        listing_ratio, warm = time_listing(checkpoint, args.checkpoints, tmp)
    print(f"ratio, one call against single-image calls, per image (target >= 5): {caption_ratio:.1f}")
    print(f"ratio, torch.load of every checkpoint against --list-models warm (target >= 20, and warm < 1 s): "
          f"{listing_ratio:.1f} ({warm:.2f} s warm)")


if __name__ == "__main__":
    main()
