"""Scale-out paths on CPU: a 2-process torchrun (gloo) run, bf16 autocast, and SIGTERM + resume.

    python -m pytest -q tests/test_distributed.py
"""

import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_TRAIN_ARGS, run_script, script_env

# Dropout off, so that one process and two processes compute the same function of the same batches.
DDP_ARGS = [*TINY_TRAIN_ARGS, "--dropout", "0", "--max_steps", "12", "--eval_interval", "12", "--meteor", "False"]


def only_checkpoint(workdir):
    paths = sorted((workdir / "saved_models" / "sweep_runs").glob("*.pth"))
    assert len(paths) == 1, paths
    return torch.load(paths[0], weights_only=True)


def test_torchrun_two_processes_match_one(tmp_path):
    single, double = tmp_path / "one", tmp_path / "two"
    single.mkdir()
    double.mkdir()
    result = run_script("train.py", DDP_ARGS, single)
    assert result.returncode == 0, result.stderr[-3000:]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(REPO / "train.py"), *DDP_ARGS]
    result = subprocess.run(command, cwd=double, env=script_env(double, OMP_NUM_THREADS=1), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stderr
    one, two = only_checkpoint(single), only_checkpoint(double)
    assert two["total_steps"] == one["total_steps"] == 12
    # Gradients are averaged per process, not per token, so the two runs differ by rounding only.
    assert two["metrics"]["val/loss"] == pytest.approx(one["metrics"]["val/loss"], rel=2e-2)
    assert len(list(double.glob("wandb/offline-run-*"))) == 1  # only rank 0 logs
    assert not any(k.startswith("module.") for k in two["decoder_state_dict"])  # saved unwrapped


def test_bf16_autocast_on_cpu(tmp_path):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--precision", "bf16", "--max_steps", "6",
                                     "--eval_interval", "6", "--meteor", "False"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bf16" in result.stderr
    checkpoint = only_checkpoint(tmp_path)
    assert torch.isfinite(torch.tensor(checkpoint["final_train_loss"]))
    assert checkpoint["metadata"]["skipped_steps"] == 0


def run_until_step(args, workdir, step):
    """Start train.py, send SIGTERM once it logs `step`, and return (exit code, stderr)."""
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=workdir,
                               env=script_env(workdir), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines = []
    for line in process.stderr:
        lines.append(line)
        if f"step {step}/" in line:
            process.send_signal(signal.SIGTERM)
    return process.wait(timeout=600), "".join(lines)


def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
    args = [*TINY_TRAIN_ARGS, "--max_steps", "40", "--eval_interval", "20", "--log_interval", "5",
            "--meteor", "False"]
    full, split = tmp_path / "full", tmp_path / "split"
    full.mkdir()
    split.mkdir()
    result = run_script("train.py", args, full)
    assert result.returncode == 0, result.stderr[-3000:]

    code, log = run_until_step(args, split, 25)
    assert code == 143, log[-3000:]
    (state,) = (split / "saved_models" / "resume").glob("*.pt")
    assert "resumable state" in log
    # A resumed run keeps its settings: another rate is an error, not silently dropped.
    result = run_script("train.py", [*args, "--resume", state, "--learning_rate", "0.01"], split)
    assert result.returncode == 2
    assert f"continues run {state.stem} with its saved settings, so --learning_rate=0.01 would be ignored" in result.stderr
    assert state.exists()
    copy = split / "copy.pt"
    copy.write_bytes(state.read_bytes())
    result = run_script("train.py", [*args, "--resume", state, "--output_dir", "saved_models/sweep_runs/"], split)
    assert result.returncode == 0, result.stderr[-3000:]  # the same folder, written another way
    assert not state.exists()  # removed once the run completed
    # A leftover copy of the state would replace the finished run's checkpoint, so it is rejected.
    (path,) = (split / "saved_models" / "sweep_runs").glob("*.pth")
    before = path.read_bytes()
    result = run_script("train.py", [*args, "--resume", copy], split)
    assert result.returncode == 2
    assert "which already has a completed checkpoint" in result.stderr
    assert path.read_bytes() == before

    uninterrupted, resumed = only_checkpoint(full), only_checkpoint(split)
    assert resumed["total_steps"] == uninterrupted["total_steps"] == 40
    assert resumed["metrics"]["val/loss"] == pytest.approx(uninterrupted["metrics"]["val/loss"], rel=1e-4)
    assert resumed["final_train_loss"] == pytest.approx(uninterrupted["final_train_loss"], rel=1e-4)
    assert resumed["wandb_run_id"] in state.name


def test_rerun_with_same_wandb_run_id_resumes(tmp_path):
    """What a scheduler or `wandb agent` does after preemption: start the same run id again."""
    args = [*TINY_TRAIN_ARGS, "--max_steps", "20", "--eval_interval", "20", "--log_interval", "5",
            "--meteor", "False", "--wandb_mode", "disabled"]
    env = script_env(tmp_path, WANDB_RUN_ID="rerun123")
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    for line in process.stderr:
        if "step 10/" in line:
            process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=600) == 143
    assert (tmp_path / "saved_models" / "resume" / "rerun123.pt").exists()
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming run rerun123" in result.stderr
    checkpoint = only_checkpoint(tmp_path)
    assert checkpoint["total_steps"] == 20
    assert checkpoint["wandb_run_id"] == "rerun123"

    # Once the run has finished, the same id again would replace its checkpoint, so it is rejected.
    (path,) = (tmp_path / "saved_models" / "sweep_runs").glob("*.pth")
    before = path.read_bytes()
    result = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2
    assert "WANDB_RUN_ID=rerun123 names run rerun123, which already has a completed checkpoint" in result.stderr
    assert path.read_bytes() == before
    # An id that only starts the same way is another run.
    other = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                           env=script_env(tmp_path, WANDB_RUN_ID="rerun"), capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
