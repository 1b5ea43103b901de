"""Time inference.py: --list-models over many checkpoints, and one call on N images against N calls.

    python bench/inference_speed.py saved_models/sweep_runs/model_sweep_ID.pth --checkpoints 1000 --images 64
A quick run (75 s on a busy 2-core CPU):
    python bench/inference_speed.py CHECKPOINT --checkpoints 200 --images 4

The many-checkpoint folder is made of hard links to one checkpoint, each with its own JSON
summary, so it costs almost no disk. Every number is wall time of a real subprocess, process
start and imports included, on the machine that runs this script.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(args, cwd):
    """Run inference.py with args; return (seconds, CompletedProcess), raising if it failed."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "inference.py"), *map(str, args)], cwd=cwd,
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"inference.py {' '.join(map(str, args))} failed:\n{result.stderr[-2000:]}")
    return seconds, result


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a checkpoint written by train.py (its JSON summary beside it)")
    parser.add_argument("--checkpoints", type=int, default=1000, help="checkpoints in the --list-models folder")
    parser.add_argument("--images", type=int, default=64, help="images of the one-call against N-calls timing")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs_dir = tmp / "runs"
        make_runs_dir(args.checkpoint, runs_dir, args.checkpoints)
        seconds, result = timed(["--list-models", "--runs-dir", runs_dir], tmp)
        rows = len(result.stdout.splitlines()) - 2
        print(f"--list-models, {rows} checkpoints: {seconds:.2f} s")

        sys.path.insert(0, str(REPO))
        from dataset import render_builtin
        images = []
        for i in range(args.images):
            images.append(tmp / f"image{i}.png")
            render_builtin(1080 + i % 120, 0).save(images[-1])
        one_call, _ = timed([*images, args.checkpoint, "--greedy"], tmp)
        print(f"one call on {args.images} images: {one_call:.2f} s")
        many_calls = sum(timed([image, args.checkpoint, "--greedy"], tmp)[0] for image in images)
        print(f"{args.images} calls on one image each: {many_calls:.2f} s "
              f"({many_calls / args.images:.2f} s a call, {many_calls / one_call:.1f}x the single call)")


if __name__ == "__main__":
    main()
