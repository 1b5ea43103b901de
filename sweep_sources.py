"""Runs that left no checkpoint, for analyze_sweep_results.py: offline W&B run folders and the
local sweep database.

A checkpoint exists only once a run reached a finite validation point, so a run that crashed,
diverged or was stopped before that is known only to W&B and to the sweep engine. Each source
returns rows shaped like analyze_sweep_results' checkpoint rows: run_id, sweep_id, status,
problem (the reason, never empty), optimizer, learning_rate, scheduler, the other train.py
settings, final_train_loss, total_steps, source and path. They never get a rank.

    python -c "import sweep_sources as s; print(s.wandb_rows(s.default_wandb_dir(), set()))"
"""

import json
import logging
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("analyze")

DEFAULT_SWEEPS_DIR = "saved_models/sweeps"
INSPECT_TIMEOUT_S = 60
ERROR_LINE = re.compile(r"\bERROR\b|^\w*(Error|Exception)\b")
LOG_PREFIX = re.compile(r"^[\d:]+ ERROR \w+: ")  # train.py's "20:32:17 ERROR train: " prefix


def default_wandb_dir():
    """Return the folder where wandb.init puts run folders: $WANDB_DIR/wandb, else ./wandb."""
    return str(Path(os.environ.get("WANDB_DIR", ".")) / "wandb")


# --------------------------------------------------------------------------------------
# Offline (and synced) W&B run folders

def wandb_run_dirs(wandb_dir):
    """Map run id to run folder for every `offline-run-DATE-ID` or `run-DATE-ID` under wandb_dir."""
    wandb_dir = Path(wandb_dir)
    if not wandb_dir.is_dir():
        return {}
    folders = {}
    for path in sorted(wandb_dir.glob("*run-*-*")):
        if path.is_dir() and not path.is_symlink() and any(path.glob("run-*.wandb")):
            folders[path.name.rsplit("-", 1)[-1]] = path
    return folders


def inspect_wandb_run(run_dir):
    """Return the parsed `wandb leet inspect --summary --json` of a run folder: state, exit code,
    summary, config and console tail, read from its .wandb transaction log. Raise RuntimeError."""
    command = [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", str(run_dir)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=INSPECT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"`wandb leet inspect` timed out after {INSPECT_TIMEOUT_S} s on {run_dir}") from e
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no output"]
        raise RuntimeError(f"`wandb leet inspect` failed on {run_dir}: {lines[-1][:300]}")
    try:
        return json.loads(result.stdout)
    except ValueError as e:
        raise RuntimeError(f"`wandb leet inspect` printed no JSON for {run_dir} ({e})") from e


def first_error_line(console):
    """Return the first error line of a console tail, without train.py's log prefix.

    The first, because later error lines are usually its consequences ("no checkpoint saved").
    Returns the last line when no line looks like an error.
    """
    lines = [entry.get("line", "").strip() for entry in console or []]
    errors = [line for line in lines if ERROR_LINE.search(line)]
    if errors:
        return LOG_PREFIX.sub("", errors[0])[:300]
    return next((line[:300] for line in reversed(lines) if line), "")


def wandb_problem(info):
    """Return (status, reason) of a W&B run that has no checkpoint."""
    step, code = info.get("step") or 0, info.get("exit_code")
    error = first_error_line(info.get("console"))
    if not info.get("config"):
        return "incomplete", ("no checkpoint and an empty W&B log (the process was killed right after it "
                              "started, or it is starting now)")
    if info.get("state") == "running" or code is None:
        return "incomplete", (f"no checkpoint and no exit record after step {step} (still running before "
                              f"its first validation, or the process was killed)")
    if code == 143:
        return "preempted", (f"stopped by SIGTERM at step {step} before its first validation; continue with "
                             f"`python train.py --resume saved_models/resume/{info.get('run_id')}.pt`")
    if code == 0:
        return "completed", f"finished without a checkpoint (no finite validation metric): {error}"
    kind = "invalid settings or data" if code == 2 else "crashed or diverged before its first validation"
    return "failed", f"{kind} (exit code {code}): {error or 'no error message in the console'}"


def wandb_row(info, run_dir):
    """Build the table row of a train.py run with no checkpoint from its inspected summary."""
    config = {k: v for k, v in (info.get("config") or {}).items() if not k.startswith("_")}
    status, problem = wandb_problem(info)
    train_loss = (info.get("summary") or {}).get("train/loss")
    return {"rank": None, "run_id": info.get("run_id") or Path(run_dir).name.rsplit("-", 1)[-1],
            "sweep_id": None, "status": status, "problem": problem, **config,
            "final_train_loss": float(train_loss) if isinstance(train_loss, (int, float)) else float("nan"),
            "total_steps": info.get("step") or 0, "source": "wandb", "path": str(run_dir)}


def is_train_run_without_checkpoint(info):
    """Return True for a train.py run (its config has the optimizer settings) whose summary
    names no checkpoint.

    A log with no config at all also counts. A process killed within its first seconds leaves
    only the file header, so its run cannot be distinguished from another program's.
    """
    config = info.get("config") or {}
    if not config:
        return True
    return "optimizer" in config and "learning_rate" in config and "checkpoint" not in (info.get("summary") or {})


def wandb_rows(wandb_dir, known_ids):
    """Rows for the train.py runs under wandb_dir whose run id has no checkpoint in known_ids.

    Runs with a checkpoint are skipped before their files are read, so a large sweep costs one
    `wandb leet inspect` process per run that failed early, not one per run. Each took 0.6 s on
    a 2-core CPU with wandb 0.31, and four run at a time.
    Runs whose summary names a checkpoint elsewhere (another --runs-dir) are skipped too.
    """
    folders = {run_id: path for run_id, path in wandb_run_dirs(wandb_dir).items() if run_id not in known_ids}
    if not folders:
        return []
    log.info("reading %d W&B run folders in %s that have no checkpoint", len(folders), wandb_dir)
    rows, failures = [], []
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {run_id: pool.submit(inspect_wandb_run, path) for run_id, path in folders.items()}
        for run_id, future in futures.items():
            try:
                info = future.result()
            except RuntimeError as e:
                failures.append(f"run {run_id}: {e}")
                continue
            if is_train_run_without_checkpoint(info):
                rows.append(wandb_row(info, folders[run_id]))
    if failures:  # one line, because one cause (such as a wandb without `leet inspect`) fails every folder
        log.warning("skipped %d of %d W&B run folders that could not be read, so runs without a checkpoint "
                    "may be missing from the table; first error: %s", len(failures), len(folders), failures[0])
    return rows


# --------------------------------------------------------------------------------------
# The local sweep database

def sweep_database_rows(sweeps_dir=DEFAULT_SWEEPS_DIR, runs_dir=None):
    """Return a row for every run the local sweep engine recorded in its database under sweeps_dir.

    merge_rows keeps the checkpoint's own row where there is one and takes only its sweep_id
    from here; runs that left no checkpoint (failed, crashed, stopped, still running) keep
    this row, with the agent's recorded error as the problem. With runs_dir, only runs whose
    checkpoints go there count.
    """
    import checkpoints
    rows = []
    for record in checkpoints.sweep_run_records(set(), sweeps_dir, runs_dir):
        rows.append({"rank": None, "run_id": record.run_id, "sweep_id": record.sweep_id,
                     "status": record.status, "problem": record.reason, **record.config,
                     "final_train_loss": float("nan"), "total_steps": record.total_steps, "source": "sweep_db",
                     "path": record.path})
    return rows


def merge_rows(checkpoint_rows, extra_rows):
    """Append the runs known only to W&B or the sweep database. A checkpoint's own row wins.

    An extra row for a run that has a checkpoint only fills in a missing sweep_id, and the
    first extra row of a run id wins over later ones (the sweep database is passed first).
    """
    by_id = {row["run_id"]: row for row in checkpoint_rows if row["run_id"]}
    merged = list(checkpoint_rows)
    for row in extra_rows:
        existing = by_id.get(row["run_id"])
        if existing is None:
            by_id[row["run_id"]] = row
            merged.append(row)
        elif existing.get("source") == "checkpoint" and existing.get("sweep_id") is None:
            existing["sweep_id"] = row.get("sweep_id")
    return merged
