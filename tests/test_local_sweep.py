"""Local sweep state and engine: claims under concurrency, run_cap, preempted runs, failed runs in
bayes, hyperband decisions, and runs whose agent died.

    python -m pytest -q tests/test_local_sweep.py
"""

import json
import os
import subprocess
import sys

import pytest

import local_sweep
from conftest import REPO
from local_sweep import SweepStore, engine_runs, list_runs, process_alive, process_token, runs_to_stop

GRID = {"program": "train.py", "method": "grid", "parameters": {"optimizer": {"values": ["adamw", "adam"]},
                                                               "top_k": {"values": [20, 50, 100]}}}
BAYES = {"program": "train.py", "method": "bayes", "metric": {"name": "val/loss", "goal": "minimize"},
         "parameters": {"learning_rate": {"distribution": "log_uniform_values", "min": 1e-5, "max": 5e-5}}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints are looked up under saved_models/ of the working folder
    store = SweepStore(tmp_path / "sweeps")
    yield store
    store.close()


def dead_process_token():
    """The token of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])
    token = process_token(child.pid)
    child.wait()
    return token


def test_grid_claims_each_point_then_none(store):
    sweep_id = store.create_sweep(GRID)
    agent = process_token(os.getpid())
    claimed = [store.claim_run(sweep_id, agent) for _ in range(6)]

    points = sorted((r.params["optimizer"], r.params["top_k"]) for r in claimed)
    assert points == sorted((o, k) for o in ("adamw", "adam") for k in (20, 50, 100))
    assert len({r.run_id for r in claimed}) == 6
    assert all(r.state == "running" and r.agent == agent for r in claimed)
    assert store.claim_run(sweep_id, agent) is None


CLAIMER = """
import json, sys
sys.path.insert(0, {repo!r})
from local_sweep import SweepStore, process_token
import os
store = SweepStore({state_dir!r})
claimed = []
while True:
    run = store.claim_run({sweep_id!r}, process_token(os.getpid()))
    if run is None:
        break
    claimed.append(run.params["n"])
print(json.dumps(claimed))
"""


def test_concurrent_claims_never_repeat(tmp_path):
    state_dir = tmp_path / "sweeps"
    store = SweepStore(state_dir)
    sweep_id = store.create_sweep({"program": "p.py", "method": "grid",
                                   "parameters": {"n": {"values": list(range(40))}}})
    store.close()
    code = CLAIMER.format(repo=str(REPO), state_dir=str(state_dir), sweep_id=sweep_id)

    claimers = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    results = [json.loads(c.communicate(timeout=300)[0]) for c in claimers]

    assert [c.returncode for c in claimers] == [0] * 4
    claimed = [n for result in results for n in result]
    assert sorted(claimed) == list(range(40))


def test_run_cap_limits_runs(store):
    sweep_id = store.create_sweep({**BAYES, "method": "random", "run_cap": 2})
    agent = process_token(os.getpid())
    assert store.claim_run(sweep_id, agent) is not None
    assert store.claim_run(sweep_id, agent) is not None
    assert store.claim_run(sweep_id, agent) is None


def test_preempted_run_claimed_first(store):
    sweep_id = store.create_sweep(GRID)
    agent = process_token(os.getpid())
    first = store.claim_run(sweep_id, agent)
    store.update_run(first.run_id, state="preempted", exit_code=143)

    again = store.claim_run(sweep_id, agent)

    assert again.run_id == first.run_id
    assert again.params == first.params
    assert again.state == "running"
    assert again.exit_code is None


def finish(store, run, state, value=None):
    summary = {} if value is None else {"val/loss": value}
    store.update_run(run.run_id, state=state, summary=summary, exit_code=0 if state == "finished" else 1)


def test_failed_runs_left_out_until_a_result(store):
    sweep_id = store.create_sweep(BAYES)
    agent = process_token(os.getpid())
    for _ in range(2):
        finish(store, store.claim_run(sweep_id, agent), "failed")

    # with no finished run, bayes would score a failed run 0.0, the best possible loss
    assert engine_runs(BAYES, store.runs(sweep_id)) == []

    finish(store, store.claim_run(sweep_id, agent), "finished", 2.5)
    records = engine_runs(BAYES, store.runs(sweep_id))
    assert [r.state for r in records] == ["failed", "failed", "finished"]
    assert records[2].summary_metrics == {"val/loss": 2.5}


def test_grid_keeps_failed_runs(store):
    sweep_id = store.create_sweep(GRID)
    agent = process_token(os.getpid())
    finish(store, store.claim_run(sweep_id, agent), "failed")
    assert len(engine_runs(GRID, store.runs(sweep_id))) == 1
    assert len({tuple(store.claim_run(sweep_id, agent).params.items()) for _ in range(5)}) == 5
    assert store.claim_run(sweep_id, agent) is None  # the failed point is not proposed again


def test_hyperband_stops_trailing_running_run(store):
    config = {**BAYES, "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3}}
    sweep_id = store.create_sweep(config)
    agent = process_token(os.getpid())
    good, bad, young = (store.claim_run(sweep_id, agent) for _ in range(3))
    store.update_run(good.run_id, state="finished", history=[{"val/loss": v} for v in (3.0, 2.0, 1.5, 1.2)])
    store.update_run(bad.run_id, history=[{"val/loss": v} for v in (3.5, 3.4)])
    store.update_run(young.run_id, history=[{"val/loss": 9.0}])  # below the first band: too early to judge

    assert runs_to_stop(config, store.runs(sweep_id)) == {bad.run_id}


def test_dead_agent_run_recorded_crashed(store, tmp_path):
    sweep_id = store.create_sweep(GRID)
    run = store.claim_run(sweep_id, dead_process_token())

    runs = list_runs(sweep_id, state_dir=tmp_path / "sweeps")

    assert [r.state for r in runs] == ["crashed"]
    assert "ended while the run was in progress" in runs[0].error_tail
    assert runs[0].run_id == run.run_id


def test_live_agent_run_left_running(store, tmp_path):
    sweep_id = store.create_sweep(GRID)
    store.claim_run(sweep_id, process_token(os.getpid()))
    assert [r.state for r in list_runs(sweep_id, state_dir=tmp_path / "sweeps")] == ["running"]


def test_orphan_run_that_completed_recorded_finished(store, tmp_path):
    """The agent died, its trial finished on its own: the checkpoint summary tells the outcome."""
    sweep_id = store.create_sweep({**GRID, "metric": {"name": "val/loss", "goal": "minimize"}})
    run = store.claim_run(sweep_id, dead_process_token())
    runs_dir = tmp_path / "saved_models" / "sweep_runs"
    runs_dir.mkdir(parents=True)
    checkpoint = runs_dir / f"model_sweep_{run.run_id}_adam_lr3e-05_cosine.pth"
    checkpoint.write_bytes(b"weights")
    stat = checkpoint.stat()
    summary = {"status": "completed", "metrics": {"val/loss": 1.25}, "history": [{"step": 30, "val/loss": 1.25}],
               "checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns}
    checkpoint.with_suffix(".json").write_text(json.dumps(summary))

    [recorded] = list_runs(sweep_id, state_dir=tmp_path / "sweeps")

    assert recorded.state == "finished"
    assert recorded.summary == {"val/loss": 1.25}
    assert recorded.history == [{"_step": 30, "val/loss": 1.25}]
    assert recorded.checkpoint == str(checkpoint.relative_to(tmp_path))


def test_process_token_tells_reused_pid():
    token = process_token(os.getpid())
    assert process_alive(token)
    host, pid, start = token.rsplit(":", 2)
    if start:  # only where /proc gives start times
        assert not process_alive(f"{host}:{pid}:{int(start) + 1}")
    assert not process_alive(dead_process_token())


def test_list_runs_without_database(tmp_path):
    assert list_runs(state_dir=tmp_path / "nothing") == []
    assert not (tmp_path / "nothing").exists()


def test_ids_look_like_wandb_ids():
    ids = {local_sweep.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 8 and i.isalnum() and i == i.lower() for i in ids)
