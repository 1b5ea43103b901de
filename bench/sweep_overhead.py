"""Per-trial overhead of a local sweep: (wall time of a sweep of N trials minus the sum of their
training-loop times) / N. Target: at most 5 s per trial.

The sweep is `python simple_sweep.py --local --yes --count N` with sweep_config.yaml (the built-in
synthetic data, a frozen EfficientNet-Lite0, 300 steps) in a scratch folder, W&B offline. A trial's
loop time is `timing.loop_s` in its checkpoint summary, which includes the validations. Before the
sweep, one untimed train.py run fills the feature cache, which a sweep computes once for all of
its trials. After the sweep, one more trial with the first run's parameters runs under a tracer
that splits its time into interpreter start, imports, W&B start, data, model, loop, saving,
W&B finish and interpreter exit.

    python bench/sweep_overhead.py
    python bench/sweep_overhead.py --trials 5 --set meteor=false --keep saved_models/bench_sweep
"""

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from timing_marks import mark_after

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 5.0


# --------------------------------------------------------------------------------------
# The traced trial: this script, run again with --trace, imports train.py and times its parts

def trace_trial(out_path, argv):
    """Run train.main(argv) as `python train.py` would and record when each part ends, then exit as train.py does."""
    marks = [("interpreter started", time.time())]
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401
    marks.append(("import torch", time.time()))
    import train
    import training
    marks.append(("import train.py and its modules", time.time()))
    # imported here to time them apart, with garbage collection paused as train.py imports them
    with training.gc_paused():
        import wandb  # noqa: F401
        marks.append(("import wandb", time.time()))
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401
        marks.append(("import transformers (GPT-2)", time.time()))
        import timm  # noqa: F401
        marks.append(("import timm", time.time()))

    mark_after(marks, training, "init_wandb", "W&B start (wandb.init)")
    mark_after(marks, training, "make_tokenizer", "data and tokenizer")
    mark_after(marks, training, "build_model", "model build, pretrained weights")
    mark_after(marks, training, "prepare", "feature cache opened, captions tokenized")
    mark_after(marks, training, "finish_wandb", "W&B finish")
    original_train = train.train

    def traced_train(config, run, ctx, stop, resume_state=None):
        status = original_train(config, run, ctx, stop, resume_state)
        marks.append(("loop, validations and final save", time.time()))
        return status

    train.train = traced_train
    status = train.main(argv)
    marks.append(("main() returned", time.time()))
    Path(out_path).write_text(json.dumps(marks))
    gc.freeze()  # as train.py's `if __name__ == "__main__"` block does before it exits
    sys.exit(status)


# --------------------------------------------------------------------------------------
# The sweep

def sweep_config(cache_dir, fixed):
    """Return sweep_config.yaml with every trial pointed at `cache_dir` and the `fixed` NAME=VALUE settings."""
    config = yaml.safe_load((REPO / "sweep_config.yaml").read_text())
    config["program"] = str(REPO / "train.py")
    config["parameters"]["cache_dir"] = {"value": str(cache_dir)}
    for setting in fixed:
        name, _, value = setting.partition("=")
        config["parameters"][name] = {"value": yaml.safe_load(value)}
    return config


def fixed_arguments(config):
    """train.py arguments of the sweep's fixed parameters (one `--name=value` token each)."""
    return [f"--{name}={spec['value']}" for name, spec in config["parameters"].items() if "value" in spec]


def environment(workdir):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(workdir), WANDB_SILENT="true",
               WANDB_CONFIG_DIR=str(Path(workdir) / ".wandb_config"), NETRC=str(Path(workdir) / ".netrc"))
    return env


def run(command, workdir, description):
    """Run a command in workdir and return its wall time in seconds. Exit with its output if it failed."""
    start = time.time()
    result = subprocess.run(command, cwd=workdir, env=environment(workdir), capture_output=True, text=True)
    seconds = time.time() - start
    if result.returncode != 0:
        sys.exit(f"{description} failed with exit status {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}")
    return seconds


def read_trials(workdir):
    """Return the sweep's runs from its database, each with the timing train.py stored in the checkpoint."""
    sys.path.insert(0, str(REPO))
    from local_sweep import list_runs
    trials = []
    for trial in list_runs(state_dir=str(Path(workdir) / "saved_models" / "sweeps")):
        if trial.state != "finished" or not trial.checkpoint:
            sys.exit(f"run {trial.run_id} ended {trial.state}; see {trial.log_path}")
        summary = json.loads(Path(workdir, trial.checkpoint).with_suffix(".json").read_text())
        trials.append((trial, summary["timing"]))
    return trials


def print_trials(trials, launched, wall, count):
    """Print each trial's timing and the sweep's totals, and return the sum of the loop times."""
    print(f"{'run':10} {'trial s':>8} {'setup s':>8} {'loop s':>7} {'eval s':>7} {'after loop s':>13}")
    for trial, timing in trials:
        duration = trial.ended - trial.started
        after = duration - timing["setup_s"] - timing["loop_s"]
        print(f"{trial.run_id:10} {duration:8.1f} {timing['setup_s']:8.1f} {timing['loop_s']:7.1f} "
              f"{timing['eval_s']:7.1f} {after:13.1f}")
    loops = sum(timing["loop_s"] for _, timing in trials)
    durations = sum(trial.ended - trial.started for trial, _ in trials)
    setups = sum(timing["setup_s"] for _, timing in trials)
    evals = sum(timing["eval_s"] for _, timing in trials)
    print(f"sweep wall time {wall:.1f} s for {count} trials; sum of training loops {loops:.1f} s "
          f"(of which validation {evals:.1f} s)")
    print(f"per trial: setup {setups / count:.1f} s (imports, W&B start, data, model), after the loop "
          f"{(durations - setups - loops) / count:.1f} s (final save, W&B finish, exit), agent "
          f"{(wall - durations) / count:.1f} s")
    before = trials[0][0].started - launched
    after = launched + wall - trials[-1][0].ended
    print(f"agent: {before:.1f} s before the first trial (simple_sweep.py start, config check, first proposal), "
          f"{(wall - durations - before - after) / max(count - 1, 1):.1f} s between two trials, "
          f"{after:.1f} s after the last")
    return loops


def print_breakdown(marks, launched, ended):
    """Print the traced trial's parts, from the process launch to its end."""
    print("one traced trial (same parameters as the first run):")
    previous = launched
    for label, moment in [("process launch to interpreter start", marks[0][1]), *marks[1:]]:
        print(f"  {moment - previous:6.2f} s  {label}")
        previous = moment
    print(f"  {ended - previous:6.2f} s  interpreter exit")
    print(f"  {ended - launched:6.2f} s  total")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="trials of the timed sweep")
    parser.add_argument("--cache_dir", default=str(REPO / "saved_models" / "cache"),
                        help="feature cache folder shared by the trials (filled before timing if cold)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="fix a train.py setting for every trial, e.g. --set meteor=false (repeatable)")
    parser.add_argument("--keep", help="run the sweep in this new folder and keep it (default: a temporary folder)")
    parser.add_argument("--trace", nargs=argparse.REMAINDER, metavar="OUT ARG",
                        help=argparse.SUPPRESS)  # internal: the traced trial, see trace_trial
    args = parser.parse_args()
    if args.trace:
        trace_trial(args.trace[0], args.trace[1:])
    if args.trials < 1:
        sys.exit(f"--trials {args.trials} must be at least 1")
    if args.keep and Path(args.keep).exists():
        sys.exit(f"--keep {args.keep} already exists; pass a new folder")
    for setting in args.set:
        if "=" not in setting:
            sys.exit(f"--set {setting} is not NAME=VALUE; write for example --set meteor=false")
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="sweep_overhead_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = sweep_config(Path(args.cache_dir).resolve(), args.set)
    config_path = workdir / "sweep.yaml"
    config_path.write_text(yaml.safe_dump(config))
    fixed = fixed_arguments(config)
    print(f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    try:
        seconds = run([sys.executable, str(REPO / "train.py"), *fixed, "--max_steps=1", "--eval_interval=1",
                       "--eval_max_images=1", "--meteor=False", "--wandb_mode=disabled",
                       f"--output_dir={workdir / 'warmup'}"], workdir, "the warm-up run of train.py")
        print(f"warm-up run (fills the feature cache if cold, not counted): {seconds:.1f} s")

        launched = time.time()
        wall = run([sys.executable, str(REPO / "simple_sweep.py"), "--config", str(config_path), "--local", "--yes",
                    "--count", str(args.trials)], workdir, "the sweep")
        trials = read_trials(workdir)
        loops = print_trials(trials, launched, wall, len(trials))

        argv = [*(f"--{name}={value}" for name, value in trials[0][0].params.items()),
                f"--output_dir={workdir / 'traced'}"]
        marks_path = workdir / "trace.json"
        launched = time.time()
        run([sys.executable, str(Path(__file__).resolve()), "--trace", str(marks_path), *argv], workdir,
            "the traced trial")
        print_breakdown(json.loads(marks_path.read_text()), launched, time.time())
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    overhead = (wall - loops) / len(trials)
    print(f"per-trial overhead (target <= {TARGET_S:.0f} s): {overhead:.1f} s")


if __name__ == "__main__":
    main()
