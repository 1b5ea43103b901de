"""A sweep trial that crashes before its first validation leaves no checkpoint; the listing of
inference.py and analyze_sweep_results.py still show it, as crashed, from the sweep database.

    python -m pytest -q tests/test_crashed_runs.py
"""

import pytest

from conftest import REPO, run_script
from test_sweep_agent import create_sweep, sweep_runs, train_sweep, write_program

# train.py, killed by SIGKILL when its first validation starts: after some training steps,
# before any checkpoint exists. The sweep's second trial trains normally.
CRASH_AT_FIRST_VALIDATION = """
import os, runpy, signal, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
if not Path("crashed-once").exists():
    import training

    def crash(*args, **kwargs):
        Path("crashed-once").touch()
        os.kill(os.getpid(), signal.SIGKILL)

    training.evaluate = crash
sys.argv = [{train!r}] + sys.argv[1:]
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def sweep_with_crash(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crash")
    program = write_program(workdir, "crash_at_validation.py",
                            CRASH_AT_FIRST_VALIDATION.format(repo=str(REPO), train=str(REPO / "train.py")))
    config = train_sweep("grid", {"seed": {"values": [0, 1]}})
    config["program"] = program
    sweep_id = create_sweep(workdir, config)
    result = run_script("simple_sweep.py", ["--agent", sweep_id], workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    crashed, finished = sweep_runs(workdir, sweep_id)
    assert crashed.state == "crashed" and crashed.checkpoint is None
    assert finished.state == "finished"
    return workdir, crashed, finished


def test_list_models_shows_crashed_run(sweep_with_crash):
    workdir, crashed, finished = sweep_with_crash
    result = run_script("inference.py", ["--list-models"], workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    crashed_line = next(line for line in lines if crashed.run_id in line)
    assert "crashed, no checkpoint" in crashed_line
    assert "SIGKILL" in crashed_line
    finished_line = next(line for line in lines if finished.run_id in line)
    assert "completed" in finished_line
    assert lines.index(finished_line) < lines.index(crashed_line)  # ranked runs first


def test_list_models_other_folder_omits_sweep(sweep_with_crash):
    workdir, crashed, finished = sweep_with_crash
    (workdir / "other_runs").mkdir(exist_ok=True)
    result = run_script("inference.py", ["--list-models", "--runs-dir", "other_runs"], workdir)
    assert result.returncode == 0, result.stderr
    assert crashed.run_id not in result.stdout + result.stderr
    assert "no checkpoints" in result.stderr


def test_analysis_reports_crashed_run(sweep_with_crash):
    workdir, crashed, finished = sweep_with_crash
    result = run_script("analyze_sweep_results.py", ["--no-plots"], workdir)
    assert result.returncode == 0, result.stderr
    assert crashed.run_id in result.stdout
    assert "crashed" in result.stdout
    assert finished.run_id in result.stdout


def test_analysis_api_row_for_crashed_run(sweep_with_crash, monkeypatch):
    workdir, crashed, finished = sweep_with_crash
    monkeypatch.chdir(workdir)
    from analyze_sweep_results import analyze_sweep_results, get_best_model_path
    df = analyze_sweep_results()
    row = df[df["run_id"] == crashed.run_id].iloc[0]
    assert row["status"] == "crashed"
    assert row["sweep_id"] == crashed.sweep_id
    assert "SIGKILL" in row["problem"]
    assert df[df["run_id"] == finished.run_id].iloc[0]["sweep_id"] == finished.sweep_id
    assert finished.run_id in get_best_model_path()
