"""Register a hyperparameter sweep and run it on W&B's sweep server when an API key is set up.
Otherwise run it as a local sweep on this machine with W&B's own search engine (the `sweeps`
package), whose runs log to W&B offline for `wandb sync` to upload later.

    python simple_sweep.py                           # check sweep_config.yaml, register it, offer to start
    python simple_sweep.py --yes --count 3           # ... and run three trials now (minutes on a laptop CPU)
    python simple_sweep.py --local --no              # a local sweep even with an API key; only register it
    python simple_sweep.py --agent SWEEP_ID --count 4    # one more local agent (a terminal, a GPU)
    python simple_sweep.py --list                    # local sweeps and their progress
    python simple_sweep.py --list SWEEP_ID           # one local sweep's runs, with the errors of failed ones
    wandb agent ENTITY/PROJECT/SWEEP_ID              # an agent of a W&B sweep, on any machine

Exit status: 0 done, 1 runs kept failing (or every run failed) or W&B failed, 2 invalid config or arguments, 130 Ctrl-C.
"""

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from local_sweep import DB_NAME, FAILED_STATES, STATE_DIR, SweepStore, list_runs, run_metric
from sweep_agent import MAX_FAILURES, run_agent
from sweep_validation import TRAIN_PROGRAM, SweepConfigError, check_sweep_config, load_sweep_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "sweep_config.yaml"
OFFLINE_MODES = ("offline", "disabled", "dryrun")


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(description="Register a W&B hyperparameter sweep and run it, "
                                                 "on W&B's sweep server or locally.")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--agent", metavar="SWEEP_ID", help="run an agent of an existing local sweep")
    action.add_argument("--list", nargs="?", const="", metavar="SWEEP_ID",
                        help="show the local sweeps, or one local sweep's runs")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep config file in W&B's format")
    parser.add_argument("--local", action="store_true",
                        help="run the sweep on this machine even when a W&B API key is set up")
    answer = parser.add_mutually_exclusive_group()
    answer.add_argument("--yes", action="store_true", help="start an agent without asking")
    answer.add_argument("--no", action="store_true", help="only register the sweep and print how to start agents")
    parser.add_argument("--count", type=positive_int, help="trials this agent runs (default: until the sweep ends)")
    parser.add_argument("--max_failures", type=positive_int, default=MAX_FAILURES,
                        help="consecutive failed trials after which the agent stops")
    parser.add_argument("--project", help="W&B project of the sweep's runs (default: the config's project, "
                                          "else train.py's --wandb_project)")
    parser.add_argument("--entity", help="W&B entity (user or team) of the sweep's runs")
    parser.add_argument("--data", help="dataset every trial trains on, as train.py's --data ('builtin' or a path)")
    return parser


def prepare_config(args, local):
    """Load the sweep config, apply --data/--project/--entity and check it; raise SweepConfigError."""
    config = load_sweep_config(args.config)
    parameters = config.get("parameters") if isinstance(config.get("parameters"), dict) else {}
    is_train = Path(str(config.get("program", ""))).name == TRAIN_PROGRAM
    overrides = {"data": args.data}
    if local:
        overrides.update(wandb_project=args.project, wandb_entity=args.entity)
    if args.data is not None and args.data != "builtin" and not Path(args.data).exists():
        raise SweepConfigError(f"--data {args.data} was not found; pass a dataset folder or file (see the README's "
                               f"'Train on your own data') or builtin")
    for name, value in overrides.items():
        if value is not None and not is_train:
            raise SweepConfigError(f"{args.config}: --{name.split('_')[-1]} is passed to train.py as --{name}, "
                                   f"but this sweep runs {config.get('program')}; set it in the config instead")
    if local and is_train:
        # W&B's server sends a sweep's runs to the sweep's project; a local sweep passes it to train.py
        overrides["wandb_project"] = overrides["wandb_project"] or config.get("project")
        overrides["wandb_entity"] = overrides["wandb_entity"] or config.get("entity")
    for name, value in overrides.items():
        if value is not None:
            parameters[name] = {"value": value}
    problems = check_sweep_config(config)
    if problems:
        raise SweepConfigError("\n".join(f"{args.config}: {problem}" for problem in problems))
    return config


def choose_mode(args, environ=None):
    """Return "online" (W&B's sweep server) or "local", and the reason for a local sweep."""
    from training import wandb_api_key_configured
    environ = os.environ if environ is None else environ
    if args.local:
        return "local", "--local"
    if environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return "local", f"WANDB_MODE={environ['WANDB_MODE']}"
    if not wandb_api_key_configured():
        return "local", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    return "online", ""


def confirm_start(args):
    """Return whether to start an agent now: --yes, --no, else the answer on a terminal, else False."""
    if args.yes or args.no:
        return args.yes
    if not sys.stdin.isatty():
        return False
    try:
        return input("Start the agent now? [y/N] ").strip().lower() in ("y", "yes")
    except (EOFError, KeyboardInterrupt):
        print()
        return False


def agent_command(sweep_id, project, entity):
    """Return the `wandb agent` command for a W&B sweep; without an entity W&B uses the default one."""
    if entity:
        return f"wandb agent {entity}/{project}/{sweep_id}"
    return f"wandb agent --project {project} {sweep_id}"


def run_online(args, config):
    import inspect
    import wandb
    from train import DEFAULTS
    project = args.project or config.get("project") or DEFAULTS["wandb_project"]
    entity = args.entity or config.get("entity")
    try:
        sweep_id = wandb.sweep(config, project=project, entity=entity)
    except (wandb.errors.Error, OSError) as e:
        print(f"error: registering the sweep with W&B failed ({str(e).splitlines()[0]}); check the network "
              f"and `wandb login`, or run the sweep on this machine with --local", file=sys.stderr)
        return 1
    if entity is None:
        try:
            entity = wandb.Api().default_entity
        except (wandb.errors.Error, OSError):
            pass  # the printed command then names only the project, and W&B uses the default entity
    print(f"Registered W&B sweep {sweep_id}. Start agents on any machine with:")
    print(f"    {agent_command(sweep_id, project, entity)}")
    if not confirm_start(args):
        return 0
    kwargs = {"entity": entity, "project": project, "count": args.count}
    # wandb 0.31 stops its agent after this many failed runs in a row; older versions lack the option
    if "max_consecutive_failed_runs" in inspect.signature(wandb.agent).parameters:
        kwargs["max_consecutive_failed_runs"] = args.max_failures
    wandb.agent(sweep_id, **kwargs)
    return 0


def run_local(args, config, reason):
    store = SweepStore()
    try:
        sweep_id = store.create_sweep(config)
    finally:
        store.close()
    metric = config.get("metric") or {}
    target = f", {metric.get('goal', 'minimize')} {metric['name']}" if metric.get("name") else ""
    print(f"Created local sweep {sweep_id} ({config['method']}{target}; local because of {reason}).")
    print("Start more agents (another terminal, or one per GPU with CUDA_VISIBLE_DEVICES=N):")
    print(f"    python simple_sweep.py --agent {sweep_id} --count 4")
    print(f"Progress: python simple_sweep.py --list {sweep_id}")
    if not confirm_start(args):
        return 0
    return start_local_agent(sweep_id, args)


def start_local_agent(sweep_id, args):
    status = run_agent(sweep_id, args.count, args.max_failures)
    print_summary(sweep_id)
    wandb_dir = Path(os.environ.get("WANDB_DIR") or ".", "wandb")
    print(f"Upload the offline W&B runs later with: wandb sync {wandb_dir}/offline-run-*")
    return status


def print_summary(sweep_id):
    """Print a sweep's run counts and best run; `--list SWEEP_ID` shows every run."""
    store = SweepStore()
    try:
        metric = store.sweep_config(sweep_id).get("metric") or {}
    finally:
        store.close()
    runs = list_runs(sweep_id)
    states = sorted({r.state for r in runs})
    counts = ", ".join(f"{sum(r.state == state for r in runs)} {state}" for state in states)
    print(f"Sweep {sweep_id}: {len(runs)} runs ({counts or 'none yet'}); details: "
          f"python simple_sweep.py --list {sweep_id}")
    value, best = best_value(runs, metric.get("name"), metric.get("goal", "minimize"))
    if best is not None:
        print(f"Best so far: run {best.run_id}, {metric['name']}={value:.4f}, checkpoint {best.checkpoint}")


def best_value(runs, metric, goal):
    """Return (value, run) of the best finished run by the metric, or (None, None)."""
    scored = [(run_metric(run, metric, goal), run) for run in runs if run.state == "finished" and metric]
    scored = [(value, run) for value, run in scored if value is not None]
    if not scored:
        return None, None
    sign = 1.0 if goal == "minimize" else -1.0
    return min(scored, key=lambda pair: sign * pair[0])


def print_sweeps():
    path = Path(STATE_DIR) / DB_NAME
    if not path.exists():
        print(f"No local sweeps in {path}; start one with `python simple_sweep.py --local`.")
        return
    store = SweepStore()
    try:
        sweeps = store.sweeps()
    finally:
        store.close()
    runs = list_runs()
    print(f"{'sweep':10} {'method':7} {'metric':24} {'created':17} {'runs':>4} {'done':>4} {'failed':>6} "
          f"{'running':>7} {'stopped':>7}  best")
    for sweep_id, config, created in sweeps:
        metric = config.get("metric") or {}
        own = [r for r in runs if r.sweep_id == sweep_id]
        count = {state: sum(r.state == state for r in own) for state in ("finished", "running", "stopped")}
        failed = sum(r.state in FAILED_STATES for r in own)
        value, best = best_value(own, metric.get("name"), metric.get("goal", "minimize"))
        best_text = f"{value:.4f} (run {best.run_id})" if best else "-"
        target = f"{metric.get('name', '-')} {metric.get('goal', '')}".strip()
        print(f"{sweep_id:10} {config['method']:7} {target:24} {time.strftime('%Y-%m-%d %H:%M', time.localtime(created)):17} "
              f"{len(own):>4} {count['finished']:>4} {failed:>6} {count['running']:>7} {count['stopped']:>7}  {best_text}")


def format_value(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_runs(sweep_id):
    store = SweepStore()
    try:
        config = store.sweep_config(sweep_id)
    finally:
        store.close()
    metric = (config.get("metric") or {}).get("name", "")
    goal = (config.get("metric") or {}).get("goal", "minimize")
    searched = [name for name, spec in config["parameters"].items() if "value" not in spec]
    print(f"Sweep {sweep_id}: {config['method']}, program {config['program']}")
    for run in list_runs(sweep_id):
        value = run_metric(run, metric, goal) if metric else None
        result = f"{metric}={value:.4f}" if value is not None else f"{metric}=-"
        params = " ".join(f"{name}={format_value(run.params.get(name))}" for name in searched)
        print(f"  {run.run_id}  {run.state:9} {result}  {params}")
        if run.checkpoint:
            print(f"      checkpoint: {run.checkpoint}")
        if run.state in FAILED_STATES and run.error_tail:
            print(f"      error: {run.error_tail.splitlines()[-1]}  (output: {run.log_path})")


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    args = build_parser().parse_args(argv)
    if args.list is not None:
        if not args.list:
            print_sweeps()
            return 0
        args.agent = args.list
    if args.agent:
        store = SweepStore() if (Path(STATE_DIR) / DB_NAME).exists() else None
        known = store is not None and any(sweep_id == args.agent for sweep_id, _, _ in store.sweeps())
        if store is not None:
            store.close()
        if not known:
            print(f"error: no local sweep {args.agent} in {Path(STATE_DIR) / DB_NAME}; list the local sweeps with "
                  f"`python simple_sweep.py --list`, and run agents of a W&B sweep with `wandb agent "
                  f"ENTITY/PROJECT/{args.agent}`", file=sys.stderr)
            return 2
        if args.list is not None:
            print_runs(args.agent)
            return 0
        return start_local_agent(args.agent, args)

    mode, reason = choose_mode(args)
    try:
        config = prepare_config(args, local=mode == "local")
    except SweepConfigError as e:
        print("\n".join(f"error: {line}" for line in str(e).splitlines()), file=sys.stderr)
        print("error: the sweep was not registered; fix the config and run again", file=sys.stderr)
        return 2
    if mode == "online":
        return run_online(args, config)
    return run_local(args, config, reason)


if __name__ == "__main__":
    sys.exit(main())
