"""Find, summarise and rank the run checkpoints in saved_models/sweep_runs without loading weights.

This module imports no torch, so that listing checkpoints starts fast. inference.py and analyze_sweep_results.py share this module, so both pick the same best
model. A checkpoint's summary comes from the JSON file train.py writes beside it; when that
file is missing or older than the checkpoint, the checkpoint itself is read memory-mapped
(weights_only), which touches only its small metadata record.
"""

import json
import os
import math
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1  # of the checkpoint dict written by train.py; bump when a key changes meaning
DEFAULT_RUNS_DIR = "saved_models/sweep_runs"
DEFAULT_SWEEPS_DIR = "saved_models/sweeps"
SELECTABLE_STATUS = "completed"


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, unsafe or incompatible; the message names the file."""


def metric_goal(metric):
    """Return "minimize" for losses and the repeat and [UNK] rates, "maximize" for caption scores."""
    return "minimize" if metric.endswith(("loss", "repeat3", "unk")) else "maximize"


@dataclass
class RunRecord:
    """One checkpoint file as the scanners see it; `error` is set when it could not be read."""
    path: str
    size: int
    mtime: float
    run_id: str = ""
    sweep_id: str = ""
    status: str = "unreadable"
    reason: str = ""
    optimizer: str = ""
    learning_rate: float = float("nan")
    scheduler: str = ""
    metrics: dict = field(default_factory=dict)
    final_train_loss: float = float("nan")
    total_steps: int = 0
    config: dict = field(default_factory=dict)
    data_path: str = ""  # --data resolved when the run trained ("" for builtin and older checkpoints)
    error: str = ""
    source: str = "checkpoint"  # or "sweep": a local sweep run that left no checkpoint

    def metric(self, name):
        value = self.metrics.get(name)
        return float(value) if isinstance(value, (int, float)) else float("nan")

    def selectable(self, metric):
        """Only completed runs with a finite value of the metric can be the best model."""
        return self.status == SELECTABLE_STATUS and not self.error and math.isfinite(self.metric(metric))


def read_summary(path):
    """Return the metadata dict of a checkpoint without loading its weights; raise CheckpointError."""
    path = Path(path)
    stat = path.stat()
    sidecar = path.with_suffix(".json")
    try:
        summary = json.loads(sidecar.read_text())
        if summary.get("checkpoint_size") == stat.st_size and summary.get("checkpoint_mtime_ns") == stat.st_mtime_ns:
            return summary
    except (OSError, ValueError):
        pass
    from model import read_checkpoint_metadata, write_summary
    summary = read_checkpoint_metadata(path)
    try:
        write_summary(path)  # so that the next scan reads the JSON file instead
    except OSError:
        pass  # a read-only folder: listing still works, only slower
    return summary


def load_record(path):
    """Build the RunRecord of one checkpoint file; unreadable files get `error` set, never raise."""
    path = Path(path)
    stat = path.stat()
    record = RunRecord(path=str(path), size=stat.st_size, mtime=stat.st_mtime)
    try:
        meta = read_summary(path)
    except CheckpointError as e:
        record.error = str(e)
        return record
    if meta.get("format_version") != FORMAT_VERSION:
        record.error = f"format version {meta.get('format_version')}, this code reads {FORMAT_VERSION}"
        return record
    record.run_id = meta.get("run_id", "")
    record.sweep_id = meta.get("sweep_id") or ""
    record.status = meta.get("status", "unknown")
    record.reason = meta.get("status_reason", "")
    record.optimizer = meta.get("optimizer", "")
    record.learning_rate = meta.get("learning_rate", float("nan"))
    record.scheduler = meta.get("scheduler", "")
    record.metrics = meta.get("metrics") or {}
    record.final_train_loss = meta.get("final_train_loss", float("nan"))
    record.total_steps = meta.get("total_steps", 0)
    record.config = meta.get("config") or {}
    record.data_path = meta.get("data_path") or ""
    return record


def scan_checkpoints(runs_dir=DEFAULT_RUNS_DIR):
    """Return a RunRecord for every *.pth in runs_dir (temporary files of unfinished writes are skipped)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    paths = sorted(p for p in runs_dir.glob("*.pth") if not p.name.startswith("."))
    return [load_record(p) for p in paths]


def sweep_run_records(known_run_ids, sweeps_dir=DEFAULT_SWEEPS_DIR, runs_dir=None):
    """Return RunRecords of the local sweep runs that have no checkpoint file among known_run_ids.

    Those are runs that failed, crashed or were stopped before their first finite validation
    point, or are still before it. Their `reason` is the last line of the error the sweep
    agent recorded, and `path` is the trial's log file. With runs_dir, only runs that write
    their checkpoints there (train.py's --output_dir) are returned.
    """
    if not (Path(sweeps_dir) / "sweeps.db").exists():
        return []
    import local_sweep  # imports the sweeps engine, so only when a local sweep exists
    records = []
    for run in local_sweep.list_runs(state_dir=sweeps_dir):
        if run.run_id in known_run_ids:
            continue
        output_dir = str(run.params.get("output_dir", DEFAULT_RUNS_DIR))
        if runs_dir is not None and os.path.realpath(output_dir) != os.path.realpath(runs_dir):
            continue
        tail = [line for line in (run.error_tail or "").splitlines() if line.strip()]
        reason = tail[-1].strip() if tail else ("still before its first validation" if run.state == "running"
                                                 else "no checkpoint was written")
        history = run.history or []
        steps = max((h.get("_step", h.get("step", 0)) or 0 for h in history), default=0)
        records.append(RunRecord(path=run.log_path or "", size=0, mtime=run.ended or run.started or run.created or 0,
                                 run_id=run.run_id, sweep_id=run.sweep_id, status=run.state, reason=reason,
                                 optimizer=str(run.params.get("optimizer", "")),
                                 learning_rate=float(run.params.get("learning_rate", float("nan"))),
                                 scheduler=str(run.params.get("scheduler", "")), total_steps=int(steps),
                                 config=dict(run.params), source="sweep"))
    return records


def scan_runs(runs_dir=DEFAULT_RUNS_DIR, sweeps_dir=DEFAULT_SWEEPS_DIR):
    """Return the checkpoint records plus the local sweep's runs that left no checkpoint."""
    records = scan_checkpoints(runs_dir)
    return records + sweep_run_records({r.run_id for r in records if r.run_id}, sweeps_dir, runs_dir)


def logged_val_metrics(records):
    """Return the sorted names of the validation metrics that any of the records logged."""
    return sorted({name for r in records for name in r.metrics if name.startswith("val/")})


def rank_records(records, metric="val/loss"):
    """Sort records best first: selectable runs by the metric, then all others."""
    sign = 1.0 if metric_goal(metric) == "minimize" else -1.0
    selectable = sorted((r for r in records if r.selectable(metric)), key=lambda r: sign * r.metric(metric))
    rest = [r for r in records if not r.selectable(metric)]
    return selectable + rest


def same_data(trained_on, data):
    """Tell whether a run's --data names the dataset `data` ('builtin' or a path, compared resolved)."""
    if trained_on is None or data is None or "builtin" in (trained_on, data):
        return trained_on == data
    return os.path.realpath(os.path.expanduser(trained_on)) == os.path.realpath(os.path.expanduser(data))


def best_record(runs_dir=DEFAULT_RUNS_DIR, metric="val/loss", data=None):
    """Return the best completed run's RunRecord, or raise FileNotFoundError saying how to train one.

    With `data`, only runs trained on that dataset compete.
    """
    records = scan_checkpoints(runs_dir)
    if data is not None:
        trained = [r for r in records
                   if same_data(r.config.get("data"), data) or (r.data_path and same_data(r.data_path, data))]
        if records and not trained:
            raise FileNotFoundError(f"none of the {len(records)} checkpoints in {runs_dir} was trained on {data}; "
                                    f"pass the checkpoint to score, or --runs-dir with runs trained on it")
        records = trained
    ranked = [r for r in rank_records(records, metric) if r.selectable(metric)]
    if not ranked:
        logged = logged_val_metrics(records)
        if logged and metric not in logged:
            raise FileNotFoundError(f"no checkpoint in {runs_dir} logged --metric {metric}; they logged "
                                    f"{', '.join(logged)}")
        found = f"{len(records)} checkpoints, none completed with a finite {metric}" if records else "no checkpoints"
        raise FileNotFoundError(f"{found} in {runs_dir}; train one with `python train.py` "
                                f"or run a sweep with `python simple_sweep.py`")
    return ranked[0]


def best_checkpoint_path(runs_dir=DEFAULT_RUNS_DIR, metric="val/loss"):
    """Path of the best completed checkpoint by `metric` (lowest loss, highest caption score)."""
    return best_record(runs_dir, metric).path


def format_number(value, spec):
    """Format a number, or "-" for a missing (NaN) one."""
    return format(value, spec) if math.isfinite(value) else "-"


def describe_size(num_bytes):
    return f"{num_bytes / 2**20:.1f} MB"


def file_date(record):
    from datetime import datetime
    return datetime.fromtimestamp(record.mtime).strftime("%Y-%m-%d %H:%M")


TABLE_METRICS = ("val/loss", "val/bleu4", "val/cider", "val/rouge_l")


def models_table(records, metric="val/loss"):
    """Render records (ranked best first) as a plain-text table, one line per checkpoint."""
    columns = ["#", "run_id", "optimizer", "lr", "scheduler", *TABLE_METRICS, "train_loss", "steps", "status",
               "size", "date", "path"]
    rows = []
    for rank, r in enumerate(rank_records(records, metric), start=1):
        if r.source == "sweep":
            rows.append([str(rank), r.run_id, r.optimizer, format_number(r.learning_rate, ".3g"), r.scheduler,
                         *["-"] * len(TABLE_METRICS), "-", str(r.total_steps), f"{r.status}, no checkpoint", "-",
                         file_date(r), f"{r.path}  ({r.reason})"])
            continue
        if r.error:
            rows.append([str(rank), "-", "-", "-", "-", *["-"] * len(TABLE_METRICS), "-", "-", "unreadable",
                         describe_size(r.size), file_date(r), f"{r.path}  ({r.error})"])
            continue
        metrics = [f"{r.metric(m):.4f}" if math.isfinite(r.metric(m)) else "-" for m in TABLE_METRICS]
        status = r.status if r.selectable(metric) or r.status != SELECTABLE_STATUS else f"{r.status} (no {metric})"
        rows.append([str(rank), r.run_id, r.optimizer, format_number(r.learning_rate, ".3g"), r.scheduler, *metrics,
                     format_number(r.final_train_loss, ".4f"), str(r.total_steps), status, describe_size(r.size), file_date(r),
                     r.path])
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
