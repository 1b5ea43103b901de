"""Peak resident memory of training the default model on Flickr8k with the feature cache.
Target: under 4 GB.

Runs train.py as a child process (W&B disabled) and reads the child's peak resident set size
from getrusage. Pages of the memory-mapped feature cache count as resident once touched.

    python bench/memory.py --data ../shared/data/flickr8k_224 --max_steps 200
"""

import argparse
import os
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_GB = 4.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/flickr8k_224")
    parser.add_argument("--max_steps", type=int, default=200)
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a folder of captions.csv and images/")
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data", args.data, "--max_steps",
               str(args.max_steps), "--eval_interval", str(args.max_steps), "--wandb_mode", "disabled",
               "--output_dir", "saved_models/bench_memory"]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"train.py failed with exit status {result.returncode}:\n{result.stderr[-2000:]}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    print(f"train.py --data {args.data} --max_steps {args.max_steps}: {time.time() - start:.0f} s")
    print(f"peak resident memory: {peak_gb:.2f} GB")
    print(f"ratio to the {LIMIT_GB:.0f} GB target (target < 1): {peak_gb / LIMIT_GB:.2f}")


if __name__ == "__main__":
    main()
