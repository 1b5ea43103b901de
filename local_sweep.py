"""Local sweeps: their state in SQLite and W&B's open-source search engine, for when W&B's sweep
server is out of reach (no API key, no network, or `python simple_sweep.py --local`).

Every local sweep and run lives in saved_models/sweeps/sweeps.db, which any number of agents on
this machine share (sweep_agent.py runs the trials). The `sweeps` package, the engine behind
W&B's sweep server, proposes each run (grid, random, bayes) and decides hyperband stops from the
records a W&B server would hold: each run's state, config, summary metrics and metric history.

    python simple_sweep.py --list                           local sweeps and their progress
    python -c "import local_sweep; [print(r.run_id, r.state, r.checkpoint) for r in local_sweep.list_runs()]"
"""

import json
import logging
import math
import os
import secrets
import socket
import sqlite3
import string
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from checkpoints import DEFAULT_RUNS_DIR, CheckpointError, read_summary

with warnings.catch_warnings():
    # sweeps 0.3 declares pydantic-1 config keys, which pydantic 2 warns about on import
    warnings.simplefilter("ignore")
    import sweeps

log = logging.getLogger("local_sweep")

STATE_DIR = "saved_models/sweeps"
DB_NAME = "sweeps.db"
# Local run states and the W&B run state passed to the engine for each. A run that hyperband ended
# is "stopped" here and "killed" for the engine, which, like W&B, scores it as a failed run in bayes.
ENGINE_STATES = {"running": "running", "finished": "finished", "failed": "failed", "crashed": "crashed",
                 "stopped": "killed", "preempted": "preempted"}
FAILED_STATES = ("failed", "crashed")
BUSY_TIMEOUT_S = 60  # how long a write waits for another agent's transaction before it fails

SCHEMA = """
CREATE TABLE IF NOT EXISTS sweeps (
    sweep_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,            -- the validated sweep config, JSON
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,         -- also the W&B run id and part of the checkpoint name
    sweep_id TEXT NOT NULL REFERENCES sweeps (sweep_id),
    state TEXT NOT NULL,
    params TEXT NOT NULL,            -- {name: value} passed to the trial, JSON
    agent TEXT,                      -- process token of the agent running it
    trial TEXT,                      -- process token of the trial itself
    exit_code INTEGER,
    error_tail TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '{}',   -- metrics of the run's best validation point, JSON
    history TEXT NOT NULL DEFAULT '[]',   -- every logged value of the sweep's metric, JSON
    checkpoint TEXT,
    log_path TEXT,
    created REAL NOT NULL,
    started REAL,
    ended REAL
);
CREATE INDEX IF NOT EXISTS runs_by_sweep ON runs (sweep_id);
"""
JSON_COLUMNS = ("params", "summary", "history")


@dataclass
class LocalRun:
    """One trial of a local sweep, as the database stores it."""
    run_id: str
    sweep_id: str
    state: str
    params: dict
    agent: str = None
    trial: str = None
    exit_code: int = None
    error_tail: str = ""
    summary: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    checkpoint: str = None
    log_path: str = None
    created: float = None
    started: float = None
    ended: float = None


# --------------------------------------------------------------------------------------
# Processes

def process_token(pid):
    """Return "host:pid:start" for a process; the start time distinguishes it from a later one with the same pid."""
    start = ""
    try:
        # field 22 of /proc/PID/stat is the start time; the fields after the ")" of the name start at field 3
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass  # no /proc (macOS): the pid alone identifies the process
    return f"{socket.gethostname()}:{pid}:{start}"


def process_alive(token):
    """Return True while the process of a token runs; processes of other hosts count as running."""
    host, pid, _ = token.rsplit(":", 2)
    if host != socket.gethostname():
        # NOTE: another machine's process cannot be checked. SQLite over a network file system is
        # unsafe anyway, so local sweeps are meant for the agents of one machine.
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_token(int(pid)) == token


# --------------------------------------------------------------------------------------
# The engine

def to_plain(value):
    """Convert the engine's numpy scalars (in lists and dicts too) to Python values for JSON and str()."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    return value


def run_metric(run, metric, goal="minimize"):
    """Return a run's result: the metric in its summary (train.py's best validation point), else
    the best logged value (a program other than train.py), else None."""
    value = run.summary.get(metric)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    values = [row[metric] for row in run.history if isinstance(row.get(metric), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    return min(values) if goal == "minimize" else max(values)


def engine_runs(config, runs):
    """Return the runs as the engine's SweepRun records.

    Bayes scores a failed run with the worst metric of the finished runs, but with no finished
    run to take it from it scores 0.0, which for a loss is the best possible value. Until a run
    finishes with a finite metric, failed, crashed and stopped runs are left out of bayes.
    """
    metric = (config.get("metric") or {}).get("name")
    scored = any(r.state == "finished" and run_metric(r, metric) is not None for r in runs)
    records = []
    for run in runs:
        if config["method"] == "bayes" and not scored and run.state in (*FAILED_STATES, "stopped"):
            continue
        records.append(sweeps.SweepRun(name=run.run_id, state=ENGINE_STATES[run.state],
                                       config={k: {"value": v} for k, v in run.params.items()},
                                       summary_metrics=run.summary, history=run.history))
    return records


def propose(config, runs):
    """Return the parameters of the next run ({name: value}), or None when the grid is exhausted."""
    proposal = sweeps.next_runs(config, engine_runs(config, runs), validate=True, n=1)[0]
    if proposal is None:
        return None
    return {name: to_plain(spec["value"]) for name, spec in proposal.config.items()}


def runs_to_stop(config, runs):
    """Return the ids of running runs that hyperband stops, from every run's metric history."""
    records = [sweeps.SweepRun(name=r.run_id, state=ENGINE_STATES[r.state], history=r.history) for r in runs]
    return {record.name for record in sweeps.stop_runs(config, records, validate=True)}


# --------------------------------------------------------------------------------------
# What a trial leaves behind

def checkpoint_for(run_id, params):
    """Return the checkpoint train.py wrote for a run, or None (its name starts with the run id)."""
    runs_dir = Path(params.get("output_dir") or DEFAULT_RUNS_DIR)
    paths = sorted(p for p in runs_dir.glob(f"model_sweep_{run_id}_*.pth") if not p.name.startswith("."))
    return paths[-1] if paths else None


def read_results(run_id, params, metric):
    """Return (status, summary, history, checkpoint) from the run's checkpoint summary.

    status is train.py's ("completed", "failed", "running") or None when the run saved no checkpoint.
    """
    path = checkpoint_for(run_id, params)
    if path is None:
        return None, {}, [], None
    try:
        meta = read_summary(path)
    except (CheckpointError, OSError):
        return None, {}, [], str(path)
    history = [{"_step": row.get("step"), metric: row[metric]} for row in meta.get("history") or [] if metric in row]
    return meta.get("status"), meta.get("metrics") or {}, history, str(path)


def wandb_history(run_id, metric, wandb_dir):
    """Return every logged value of `metric` from the run's offline W&B files, or None if unreadable.

    Reads them with `wandb leet inspect --json` (wandb 0.31), which also works while the run is
    still writing. A running process's values show up late: W&B stores a history row once the
    next step is logged, and with wandb 0.31 here it wrote its file about every 15 s.
    """
    run_dirs = sorted(Path(wandb_dir, "wandb").glob(f"offline-run-*-{run_id}"))  # a resumed run has several
    if not run_dirs:
        return None
    history = []
    for run_dir in run_dirs:
        command = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return None
        if result.returncode != 0:
            return None
        for line in result.stdout.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("type") != "history":
                continue
            row = (record.get("history") or {}).get("item") or {}
            if metric in row:
                history.append({"_step": row.get("_step"), metric: row[metric]})
    return history


# --------------------------------------------------------------------------------------
# The database

def new_id():
    """Return a random 8-character id of lowercase letters and digits, the form of W&B's run and sweep ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class SweepStore:
    """The local sweeps database; each agent opens its own connection."""

    def __init__(self, state_dir=STATE_DIR):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.state_dir / DB_NAME
        self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer
        self.db.executescript(SCHEMA)

    def close(self):
        self.db.close()

    @contextmanager
    def transaction(self):
        """Hold the write lock: no other agent reads stale runs and proposes the same one."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def create_sweep(self, config):
        with self.transaction():
            sweep_id = new_id()
            while self.db.execute("SELECT 1 FROM sweeps WHERE sweep_id = ?", (sweep_id,)).fetchone():
                sweep_id = new_id()
            self.db.execute("INSERT INTO sweeps VALUES (?, ?, ?)", (sweep_id, json.dumps(config), time.time()))
        return sweep_id

    def sweeps(self):
        """Return [(sweep_id, config, created)], oldest first."""
        rows = self.db.execute("SELECT * FROM sweeps ORDER BY created").fetchall()
        return [(row["sweep_id"], json.loads(row["config"]), row["created"]) for row in rows]

    def sweep_config(self, sweep_id):
        """Return a sweep's config; raise KeyError when there is no such local sweep."""
        row = self.db.execute("SELECT config FROM sweeps WHERE sweep_id = ?", (sweep_id,)).fetchone()
        if row is None:
            raise KeyError(sweep_id)
        return json.loads(row["config"])

    def runs(self, sweep_id=None):
        """Return the runs of one sweep (or of all), in the order they were proposed."""
        if sweep_id is None:
            return self._select_runs("1", ())
        return self._select_runs("sweep_id = ?", (sweep_id,))

    def run(self, run_id):
        return self._select_runs("run_id = ?", (run_id,))[0]

    def _select_runs(self, condition, args):
        runs = []
        for row in self.db.execute(f"SELECT * FROM runs WHERE {condition} ORDER BY rowid", args).fetchall():
            values = dict(row)
            for key in JSON_COLUMNS:
                values[key] = json.loads(values[key])
            runs.append(LocalRun(**values))
        return runs

    def update_run(self, run_id, **values):
        for key in JSON_COLUMNS:
            if key in values:
                values[key] = json.dumps(values[key])
        assignments = ", ".join(f"{key} = ?" for key in values)
        self.db.execute(f"UPDATE runs SET {assignments} WHERE run_id = ?", (*values.values(), run_id))

    def claim_run(self, sweep_id, agent):
        """Give the agent a run: a preempted one to continue, else a new proposal; None when done."""
        config = self.sweep_config(sweep_id)
        with self.transaction():
            self.reconcile(sweep_id)
            runs = self.runs(sweep_id)
            preempted = [r for r in runs if r.state == "preempted"]
            if preempted:
                run = preempted[0]
                self.update_run(run.run_id, state="running", agent=agent, trial=None, exit_code=None,
                                started=time.time(), ended=None)
                return self.run(run.run_id)
            if config.get("run_cap") and len(runs) >= config["run_cap"]:
                return None
            params = propose(config, runs)
            if params is None:
                return None
            run_id = new_id()
            while self.db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone():
                run_id = new_id()
            log_path = self.state_dir / "logs" / sweep_id / f"{run_id}.log"
            self.db.execute("INSERT INTO runs (run_id, sweep_id, state, params, agent, log_path, created, started) "
                            "VALUES (?, ?, 'running', ?, ?, ?, ?, ?)",
                            (run_id, sweep_id, json.dumps(params), agent, str(log_path), time.time(), time.time()))
        return self.run(run_id)

    def reconcile(self, sweep_id=None):
        """Close runs whose agent and trial have both ended without recording the outcome.

        That happens when an agent is killed (SIGKILL, power loss). The trial runs in its own
        session, so it may outlive its agent and finish, and then its checkpoint summary gives the
        outcome. Call inside a transaction.
        """
        for run in self.runs(sweep_id):
            if run.state != "running" or (run.agent and process_alive(run.agent)):
                continue
            if run.trial and process_alive(run.trial):
                continue  # still training without its agent; a later reconcile records it
            metric = (self.sweep_config(run.sweep_id).get("metric") or {}).get("name", "")
            status, summary, history, checkpoint = read_results(run.run_id, run.params, metric)
            state = "finished" if status == "completed" else "crashed"
            reason = "" if state == "finished" else f"its agent ({run.agent}) ended while the run was in progress"
            self.update_run(run.run_id, state=state, summary=summary, history=history, checkpoint=checkpoint,
                            error_tail=reason, ended=time.time())


def list_runs(sweep_id=None, state_dir=STATE_DIR):
    """Return the runs of a local sweep (or of all local sweeps) with their state, error tail,
    parameters and checkpoint path; runs whose agent died are recorded as crashed first."""
    if not (Path(state_dir) / DB_NAME).exists():
        return []
    store = SweepStore(state_dir)
    try:
        try:
            with store.transaction():
                store.reconcile(sweep_id)
        except sqlite3.OperationalError as e:  # another agent held the write lock for BUSY_TIMEOUT_S
            log.warning("runs of dead agents in %s are still shown as running: %s", store.path, e)
        return store.runs(sweep_id)
    finally:
        store.close()
