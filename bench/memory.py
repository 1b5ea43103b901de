"""Peak resident memory of training the default model on Flickr8k with the feature cache.
Target: under 4 GB.

Runs train.py with its default settings as a child process (W&B disabled) and reports:
- train.py's own peak resident set size (VmHWM in /proc, which the kernel tracks exactly),
  and its split into anonymous memory and mapped files at the sample where it was highest.
  Pages of the memory-mapped feature cache count as resident once touched, and the kernel
  can drop them again under memory pressure.
- the peak of train.py plus its child processes (the METEOR scorer's Java VM), sampled
  every 0.2 s.

    python bench/memory.py --cache_dir /path/to/saved_models/cache --max_steps 200
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLICKR = os.path.join(os.path.dirname(REPO), "shared", "data", "flickr8k_224")
LIMIT_GB = 4.0  # 10^9 bytes
SAMPLE_S = 0.2


def status_kb(pid):
    """Return the kB fields of /proc/PID/status (VmRSS, VmHWM, RssAnon, RssFile, ...), {} once it has exited."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            fields[name] = int(value.split()[0])
    return fields


def children(pid):
    """Return the pids of all descendants of a process."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            found += map(int, kids)
            queue += map(int, kids)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=FLICKR, help="dataset path (default: %(default)s)")
    parser.add_argument("--cache_dir", default=os.path.join(REPO, "saved_models", "cache"),
                        help="feature cache folder, whose keys include the absolute image paths (default: %(default)s)")
    parser.add_argument("--max_steps", type=int, default=200, help="optimizer steps of the run (default: %(default)s)")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "saved_models", "bench_memory"),
                        help="where train.py writes its checkpoint (default: %(default)s)")
    args = parser.parse_args()
    if not os.path.exists(args.data):
        sys.exit(f"data {args.data} not found; pass --data with a folder of captions.csv and images/")
    data = os.path.abspath(args.data)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    command = [sys.executable, os.path.join(REPO, "train.py"), "--data", data, "--max_steps", str(args.max_steps),
               "--eval_interval", str(args.max_steps), "--wandb_mode", "disabled", "--output_dir", args.output_dir,
               "--cache_dir", os.path.abspath(args.cache_dir)]
    start = time.time()
    log_path = Path(args.output_dir) / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        peak, peak_tree, at_peak = 0, 0, {}
        while process.poll() is None:
            own = status_kb(process.pid)
            tree = own.get("VmRSS", 0) + sum(status_kb(pid).get("VmRSS", 0) for pid in children(process.pid))
            if own.get("VmRSS", 0) >= at_peak.get("VmRSS", 0):
                at_peak = own
            peak, peak_tree = max(peak, own.get("VmHWM", 0)), max(peak_tree, tree)
            time.sleep(SAMPLE_S)
    if process.returncode != 0:
        sys.exit(f"train.py failed with exit status {process.returncode}; its output is in {log_path}")

    gb = 1e6  # kB per GB (10^9 bytes)
    print(f"train.py --data {data} --max_steps {args.max_steps}: {time.time() - start:.0f} s (output: {log_path})")
    print(f"train.py peak resident memory: {peak / gb:.2f} GB; at the highest sample {at_peak.get('VmRSS', 0) / gb:.2f} GB "
          f"= {at_peak.get('RssAnon', 0) / gb:.2f} GB anonymous + {at_peak.get('RssFile', 0) / gb:.2f} GB mapped files")
    print(f"train.py and its child processes together, highest sample: {peak_tree / gb:.2f} GB")
    print(f"ratio to the {LIMIT_GB:.0f} GB target (target < 1): {peak / gb / LIMIT_GB:.2f} for train.py, "
          f"{peak_tree / gb / LIMIT_GB:.2f} with its child processes")


if __name__ == "__main__":
    main()
