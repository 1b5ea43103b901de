"""Shared fixtures: scripts run as real subprocesses, W&B offline in a temporary folder.

    python -m pytest -q tests
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FLICKR = REPO.parent / "shared" / "data" / "flickr8k_224"

# A run that takes seconds: a 3-layer CNN from scratch and a small decoder on the built-in data.
TINY_TRAIN_ARGS = ["--encoder", "tiny_cnn", "--d_model", "64", "--num_layers", "2", "--num_heads", "2",
                   "--batch_size", "32", "--max_steps", "30", "--eval_interval", "30", "--log_interval", "10",
                   "--eval_max_images", "16", "--log_model", "False"]


def script_env(workdir, **extra):
    """Environment for a script run: W&B offline under workdir, no API key, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", WANDB_DIR=str(workdir), WANDB_SILENT="true", PYTHONUNBUFFERED="1",
               WANDB_CONFIG_DIR=str(Path(workdir) / ".wandb_config"), NETRC=str(Path(workdir) / ".netrc"))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script, args, workdir, timeout=600, env=None):
    """Run one of the repository's scripts in workdir; return the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=workdir,
                          env=env or script_env(workdir), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch, tmp_path):
    """Keep in-process W&B calls offline and out of the repository."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny completed training run shared by the tests that only read its checkpoint.

    Returns the work folder; the checkpoint is in workdir/saved_models/sweep_runs/.
    """
    workdir = tmp_path_factory.mktemp("tiny_run")
    result = run_script("train.py", TINY_TRAIN_ARGS, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run):
    paths = sorted((tiny_run / "saved_models" / "sweep_runs").glob("*.pth"))
    assert len(paths) == 1, paths
    return paths[0]


@pytest.fixture
def flickr_dir():
    if not (FLICKR / "captions.csv").exists():
        pytest.skip(f"Flickr8k copy not found at {FLICKR} (research-only data, never in the repository)")
    return FLICKR
