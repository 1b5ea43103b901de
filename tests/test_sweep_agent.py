"""The local sweep agent: trial command lines, several agents on one sweep, failures, Ctrl-C,
hyperband, and real train.py trials (booleans, divergence, missing data, SIGKILL mid-save).

Trials are real subprocesses: small programs this file writes, or train.py on tiny settings.

    python -m pytest -q tests/test_sweep_agent.py
"""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train
from checkpoints import scan_checkpoints
from conftest import REPO, run_script, script_env
from local_sweep import SweepStore, propose
from sweep_agent import Agent, ForkedTrial, forkable_args, trial_command
from sweep_validation import check_sweep_config, load_sweep_config

# train.py settings of a trial that takes seconds: five steps, one validation, which writes the checkpoint
TINY_TRIAL = {"encoder": "tiny_cnn", "d_model": 64, "num_layers": 2, "num_heads": 2, "batch_size": 32,
              "max_steps": 5, "eval_interval": 5, "log_interval": 5, "eval_max_images": 8, "log_model": False, "meteor": False}


def create_sweep(workdir, config):
    """Register a local sweep in workdir's database, as `simple_sweep.py --no` would; return its id."""
    store = SweepStore(Path(workdir) / "saved_models" / "sweeps")
    try:
        return store.create_sweep(config)
    finally:
        store.close()


def sweep_runs(workdir, sweep_id):
    store = SweepStore(Path(workdir) / "saved_models" / "sweeps")
    try:
        return store.runs(sweep_id)
    finally:
        store.close()


def write_program(workdir, name, body):
    path = Path(workdir) / name
    path.write_text(body)
    return str(path)


def train_sweep(method, parameters, **fixed):
    """A sweep config that runs the real train.py on tiny settings; checked like any user config."""
    values = {**TINY_TRIAL, **fixed}
    config = {"program": str(REPO / "train.py"), "method": method,
              "metric": {"name": "val/loss", "goal": "minimize"},
              "parameters": {**parameters, **{k: {"value": v} for k, v in values.items()}}}
    assert check_sweep_config(config) == []
    return config


def start_agent(workdir, sweep_id, *args):
    return subprocess.Popen([sys.executable, str(REPO / "simple_sweep.py"), "--agent", sweep_id, *args], cwd=workdir,
                            env=script_env(workdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# --------------------------------------------------------------------------------------
# Command lines

def test_argv_of_sweep_config_accepted_by_train(tmp_path):
    config = load_sweep_config(REPO / "sweep_config.yaml")
    for _ in range(5):
        params = propose({**config, "method": "random"}, [])
        argv = trial_command(config, params, tmp_path / "args.json")

        assert argv[:3] == ["/usr/bin/env", sys.executable, "train.py"]
        assert argv[3:] == [f"--{name}={value}" for name, value in params.items()]
        parsed = train.parse_config(argv[3:])
        for name, value in params.items():
            assert parsed[name] == value, name
        train.validate_config(parsed)


def test_boolean_false_reaches_train(tmp_path):
    config = {"program": "train.py", "method": "grid", "parameters": {"freeze_encoder": {"values": [True, False]}}}
    argv = trial_command(config, {"freeze_encoder": False}, tmp_path / "args.json")
    assert argv[-1] == "--freeze_encoder=False"
    assert train.parse_config(argv[3:])["freeze_encoder"] is False
    argv = trial_command(config, {"freeze_encoder": True}, tmp_path / "args.json")
    assert train.parse_config(argv[3:])["freeze_encoder"] is True


def test_command_macros(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEP_TEST_DEVICE", "cuda:1")
    params = {"lr": 2.5e-05, "flag": False, "on": True, "name": "a b"}
    config = {"program": "train.py", "command": [
        "${env}", "${interpreter}", "${program}", "--device=${envvar:SWEEP_TEST_DEVICE}", "${args_no_boolean_flags}",
        "${args_no_hyphens}", "${args_json}", "${args_json_file}"]}
    argv = trial_command(config, params, tmp_path / "args.json")
    assert argv == ["/usr/bin/env", sys.executable, "train.py", "--device=cuda:1",
                    "--lr=2.5e-05", "--on", "--name=a b",
                    "lr=2.5e-05", "flag=False", "on=True", "name=a b",
                    '{"lr": 2.5e-05, "flag": false, "on": true, "name": "a b"}', str(tmp_path / "args.json")]
    assert (tmp_path / "args.json").read_text() == argv[-2]


# --------------------------------------------------------------------------------------
# Several agents, failures, Ctrl-C, hyperband (small programs)

RECORDING_PROGRAM = """
import os, sys, time
with open("calls.txt", "a") as f:
    f.write(os.environ["WANDB_RUN_ID"] + " " + " ".join(sys.argv[1:]) + "\\n")
# the first trial waits for the other agent's first trial, so both agents are surely at work together
deadline = time.time() + 60
while time.time() < deadline and len(open("calls.txt").read().splitlines()) < 2:
    time.sleep(0.1)
time.sleep(0.2)
"""


def test_two_agents_run_each_grid_point_once(tmp_path):
    program = write_program(tmp_path, "record.py", RECORDING_PROGRAM)
    config = {"program": program, "method": "grid",
              "parameters": {"a": {"values": [1, 2, 3, 4, 5]}, "b": {"values": ["x", "y"]}}}
    sweep_id = create_sweep(tmp_path, config)

    agents = [start_agent(tmp_path, sweep_id) for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]

    assert [agent.returncode for agent in agents] == [0, 0], outputs
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    points = sorted(tuple(line.split()[1:]) for line in calls)
    expected = sorted((f"--a={a}", f"--b={b}") for a in range(1, 6) for b in "xy")
    assert points == expected
    runs = sweep_runs(tmp_path, sweep_id)
    assert len(runs) == 10
    assert {r.state for r in runs} == {"finished"}
    assert sorted(line.split()[0] for line in calls) == sorted(r.run_id for r in runs)
    assert len({r.agent for r in runs}) == 2


FAILING_PROGRAM = """
import sys
a = int(sys.argv[1].split("=")[1])
print("loading shard", a)
if a != 3:
    print("OSError: shard %d is unreadable on /scratch" % a, file=sys.stderr)
    sys.exit(1)
"""


def test_failures_in_a_row_stop_agent(tmp_path):
    program = write_program(tmp_path, "fail.py", FAILING_PROGRAM)
    sweep_id = create_sweep(tmp_path, {"program": program, "method": "grid",
                                       "parameters": {"a": {"values": [1, 2, 4, 5, 6, 3]}}})

    result = run_script("simple_sweep.py", ["--agent", sweep_id], tmp_path)

    assert result.returncode == 1
    runs = sweep_runs(tmp_path, sweep_id)
    assert [r.state for r in runs] == ["failed"] * 3
    assert [r.exit_code for r in runs] == [1, 1, 1]
    assert runs[0].error_tail.splitlines()[-1] == "OSError: shard 1 is unreadable on /scratch"
    assert all(r.summary == {} and r.history == [] for r in runs)  # no score, not even zero
    output = result.stdout + result.stderr
    assert "stopping the agent: 3 runs in a row failed" in output
    assert output.count("OSError: shard 1 is unreadable") == 1
    assert "shard 2 is unreadable" not in output


def test_agent_all_runs_failed_exits_1(tmp_path):
    program = write_program(tmp_path, "fail.py", FAILING_PROGRAM)
    sweep_id = create_sweep(tmp_path, {"program": program, "method": "grid",
                                       "parameters": {"a": {"values": [1, 2]}}})

    result = run_script("simple_sweep.py", ["--agent", sweep_id], tmp_path)

    assert result.returncode == 1
    assert [r.state for r in sweep_runs(tmp_path, sweep_id)] == ["failed"] * 2
    output = result.stdout + result.stderr
    assert "every run of this agent failed (2 of 2) and no run of the sweep finished" in output
    assert "OSError: shard 1 is unreadable" in output


def test_success_resets_failure_count(tmp_path):
    program = write_program(tmp_path, "fail.py", FAILING_PROGRAM)
    sweep_id = create_sweep(tmp_path, {"program": program, "method": "grid",
                                       "parameters": {"a": {"values": [1, 2, 3, 4, 5]}}})

    result = run_script("simple_sweep.py", ["--agent", sweep_id], tmp_path)

    assert result.returncode == 0, result.stderr
    assert [r.state for r in sweep_runs(tmp_path, sweep_id)] == ["failed", "failed", "finished", "failed", "failed"]


SLOW_PROGRAM = """
import os, signal, sys, time
from pathlib import Path
run_id = os.environ["WANDB_RUN_ID"]
with open("starts.txt", "a") as f:
    f.write(run_id + "\\n")
if Path("resumable-" + run_id).exists():
    sys.exit(0)  # continued after a preemption: finish at once

def save_and_exit(signum, frame):
    Path("resumable-" + run_id).touch()
    sys.exit(143)  # what train.py does after saving its resumable state

signal.signal(signal.SIGTERM, save_and_exit)
Path("started").touch()
time.sleep(120)
"""


def test_ctrl_c_preempts_and_rerun_continues(tmp_path):
    program = write_program(tmp_path, "slow.py", SLOW_PROGRAM)
    sweep_id = create_sweep(tmp_path, {"program": program, "method": "random",
                                       "parameters": {"a": {"values": [1, 2, 3]}}})
    agent = start_agent(tmp_path, sweep_id, "--count", "1")
    deadline = time.time() + 120
    while not (tmp_path / "started").exists():
        assert agent.poll() is None, agent.communicate()[0]
        assert time.time() < deadline, "the trial did not start within 120 s"
        time.sleep(0.1)

    agent.send_signal(signal.SIGINT)
    output = agent.communicate(timeout=60)[0]

    assert agent.returncode == 130, output
    assert "continue the sweep with: python simple_sweep.py --agent" in output
    assert "Traceback" not in output
    [run] = sweep_runs(tmp_path, sweep_id)
    assert run.state == "preempted"
    assert run.exit_code == 143

    result = run_script("simple_sweep.py", ["--agent", sweep_id, "--count", "1"], tmp_path)

    assert result.returncode == 0, result.stderr
    [run] = sweep_runs(tmp_path, sweep_id)
    assert run.state == "finished"
    assert (tmp_path / "starts.txt").read_text().split() == [run.run_id, run.run_id]


LOGGING_PROGRAM = """
import sys, time
import wandb
quality = float(sys.argv[1].split("=")[1])
# the trailing run lasts long enough for W&B to write its file (every ~15 s) while it runs
pause = 0.02 if quality < 2 else 0.5
run = wandb.init(project="hyperband-test")
for step in range(1, 81):
    run.log({"val/loss": quality + 1.0 / step}, step=step)
    time.sleep(pause)
run.finish()
"""


def test_hyperband_stops_trailing_run(tmp_path, monkeypatch):
    program = write_program(tmp_path, "logging_program.py", LOGGING_PROGRAM)
    config = {"program": program, "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
              "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 3},
              "parameters": {"quality": {"values": [1.0, 5.0]}}}
    assert check_sweep_config(config) == []
    store = SweepStore(tmp_path / "saved_models" / "sweeps")
    sweep_id = store.create_sweep(config)
    monkeypatch.chdir(tmp_path)

    status = Agent(sweep_id, store, poll_s=1).run()

    assert status == 0
    good, bad = store.runs(sweep_id)
    store.close()
    assert good.state == "finished"
    assert len(good.history) == 80
    assert bad.state == "stopped"
    assert 2 <= len(bad.history) < 80  # stopped before its last step


# --------------------------------------------------------------------------------------
# Real train.py trials

@pytest.fixture(scope="module")
def two_agent_train_sweep(tmp_path_factory):
    """Two agents started together on a grid of four train.py runs: a boolean setting (True and
    False) times a sane and a diverging learning rate. Returns (workdir, runs, agent outputs)."""
    workdir = tmp_path_factory.mktemp("two_agents")
    # a diverging run fails after two non-finite steps, before its first validation
    config = train_sweep("grid", {"learning_rate": {"values": [1.0e6, 3.0e-5]},
                                  "do_sample": {"values": [True, False]}}, max_bad_steps=2)
    sweep_id = create_sweep(workdir, config)
    agents = [start_agent(workdir, sweep_id) for _ in range(2)]
    outputs = [agent.communicate(timeout=900)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    return workdir, sweep_runs(workdir, sweep_id), outputs


def test_two_agents_train_every_point_once(two_agent_train_sweep):
    _, runs, _ = two_agent_train_sweep
    points = sorted((r.params["learning_rate"], r.params["do_sample"]) for r in runs)
    assert points == [(3e-05, False), (3e-05, True), (1e6, False), (1e6, True)]
    assert len({r.agent for r in runs}) == 2


def test_two_agents_trained_at_once(two_agent_train_sweep):
    _, runs, _ = two_agent_train_sweep
    overlapping = [(a, b) for a in runs for b in runs
                   if a.agent != b.agent and a.started < b.ended and b.started < a.ended]
    assert overlapping


def test_each_run_has_own_checkpoint(two_agent_train_sweep):
    workdir, runs, _ = two_agent_train_sweep
    finished = [r for r in runs if r.state == "finished"]
    assert len(finished) == 2
    paths = {r.checkpoint for r in finished}
    assert len(paths) == 2
    for run in finished:
        assert run.run_id in Path(run.checkpoint).name
        assert (workdir / run.checkpoint).is_file()
        assert run.summary["val/loss"] > 0
    records = scan_checkpoints(workdir / "saved_models" / "sweep_runs")
    assert sorted(r.run_id for r in records) == sorted(r.run_id for r in finished)


def test_boolean_false_in_checkpoint(two_agent_train_sweep):
    workdir, runs, _ = two_agent_train_sweep
    records = {r.run_id: r for r in scan_checkpoints(workdir / "saved_models" / "sweep_runs")}
    for run in runs:
        if run.state == "finished":
            assert records[run.run_id].config["do_sample"] is run.params["do_sample"]


def test_diverged_run_failed_and_agent_went_on(two_agent_train_sweep):
    _, runs, _ = two_agent_train_sweep
    diverged = [r for r in runs if r.params["learning_rate"] == 1e6]
    assert [r.state for r in diverged] == ["failed", "failed"]
    for run in diverged:
        assert run.exit_code == 1
        assert "diverged" in run.error_tail
        assert run.checkpoint is None
        assert run.summary == {}
        later = [r for r in runs if r.agent == run.agent and r.started > run.ended]
        others = [r for r in runs if r.started > run.ended]
        assert later or not others, "the agent stopped after a diverged run while runs were left"


def test_missing_data_stops_after_three(tmp_path):
    missing = tmp_path / "flickr8k_unmounted"
    sweep_id = create_sweep(tmp_path, train_sweep("random", {"seed": {"values": [0, 1, 2, 3, 4]}}, data=str(missing)))

    result = run_script("simple_sweep.py", ["--agent", sweep_id], tmp_path)

    assert result.returncode == 1
    runs = sweep_runs(tmp_path, sweep_id)
    assert [r.state for r in runs] == ["failed"] * 3
    assert [r.exit_code for r in runs] == [2, 2, 2]
    cause = f"data path {missing} does not exist"
    assert all(cause in r.error_tail for r in runs)
    output = result.stdout + result.stderr
    assert "stopping the agent: 3 runs in a row failed" in output
    assert output.count(cause) == 1


KILL_WHILE_SAVING = """
import os, runpy, signal, sys
from pathlib import Path
if Path("killed-once").exists():
    sys.exit(0)  # the sweep's next trial: nothing more to show, so it ends at once
import torch

def write_half_then_die(obj, f, *args, **kwargs):
    f.write(b"PK\\x03\\x04 half of a checkpoint")
    f.flush()
    Path("killed-once").touch()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = write_half_then_die
sys.path.insert(0, {repo!r})
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


def test_sigkill_while_saving(tmp_path):
    program = write_program(tmp_path, "kill_while_saving.py",
                            KILL_WHILE_SAVING.format(repo=str(REPO), train=str(REPO / "train.py")))
    config = train_sweep("random", {"seed": {"values": [0, 1, 2]}})
    config["program"] = program
    sweep_id = create_sweep(tmp_path, config)
    runs_dir = tmp_path / "saved_models" / "sweep_runs"

    result = run_script("simple_sweep.py", ["--agent", sweep_id, "--count", "1"], tmp_path)

    assert result.returncode == 1, result.stderr  # its only run crashed
    [run] = sweep_runs(tmp_path, sweep_id)
    assert run.state == "crashed"
    assert run.exit_code == -signal.SIGKILL
    assert run.error_tail.endswith("killed by signal SIGKILL")
    leftovers = [p.name for p in runs_dir.iterdir()]
    assert leftovers and all(name.startswith(".") and name.endswith(".tmp") for name in leftovers), leftovers
    assert scan_checkpoints(runs_dir) == []

    result = run_script("simple_sweep.py", ["--agent", sweep_id, "--count", "1"], tmp_path)

    assert result.returncode == 0, result.stderr
    crashed, continued = sweep_runs(tmp_path, sweep_id)
    assert crashed.state == "crashed"
    assert continued.state == "finished"


# ---------------------------------------------------------------------------------------
# Trials forked from the fork server

def tiny_trial_args(**overrides):
    return [f"--{k}={v}" for k, v in {**TINY_TRIAL, **overrides}.items()]


def test_forkable_only_for_this_train_py(tmp_path, monkeypatch):
    config = {"program": str(REPO / "train.py"), "method": "grid", "parameters": {"seed": {"values": [1]}}}
    argv = trial_command(config, {"seed": 1}, tmp_path / "args.json")
    assert forkable_args(argv) == ["--seed=1"]
    other = write_program(tmp_path, "train.py", "print('another train.py')\n")
    assert forkable_args(["/usr/bin/env", sys.executable, str(other), "--seed=1"]) is None
    assert forkable_args(["/usr/bin/env", "/usr/bin/python3", str(REPO / "train.py")]) is None
    monkeypatch.setenv("LOCAL_SWEEP_FORK", "0")
    assert forkable_args(argv) is None


def test_forked_trial_trains_and_exits(tmp_path):
    env = script_env(tmp_path, WANDB_RUN_ID="forked01")
    log_path = tmp_path / "trial.log"
    proc = ForkedTrial(tiny_trial_args(output_dir=tmp_path / "runs"), env, log_path)
    assert proc.wait(timeout=300) == 0
    assert proc.poll() == 0
    records = scan_checkpoints(tmp_path / "runs")
    assert [r.run_id for r in records] == ["forked01"]
    assert records[0].status == "completed"
    assert "completed checkpoint" in log_path.read_text()


def test_forked_trial_invalid_setting_exits_2(tmp_path):
    proc = ForkedTrial(tiny_trial_args(batch_size=0), script_env(tmp_path), tmp_path / "trial.log")
    assert proc.wait(timeout=120) == 2
    assert "--batch_size=0 must be positive" in (tmp_path / "trial.log").read_text()


def test_forked_trial_sigterm_saves_resumable_state(tmp_path):
    env = script_env(tmp_path, WANDB_RUN_ID="forked02")
    log_path = tmp_path / "trial.log"
    args = tiny_trial_args(max_steps=100000, eval_interval=100000, log_interval=1, resume_dir=tmp_path / "resume")
    proc = ForkedTrial(args, env, log_path)
    deadline = time.monotonic() + 300
    while "step 2/" not in (log_path.read_text() if log_path.exists() else ""):
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert (tmp_path / "resume" / "forked02.pt").exists()
