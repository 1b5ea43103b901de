"""simple_sweep.py end to end: a local sweep of three real train.py runs on the built-in data,
--list, the online/local choice and the arguments of the online path.

    python -m pytest -q tests/test_simple_sweep.py

The online path needs W&B's server, so only its argument handling is tested here.
"""

import math
import warnings
from pathlib import Path

import pytest
import yaml

from checkpoints import scan_checkpoints
from conftest import REPO, run_script
from local_sweep import SweepStore, engine_runs
from simple_sweep import agent_command, choose_mode, prepare_config
from sweep_validation import SweepConfigError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import sweeps

TINY_VALUES = {"encoder": "tiny_cnn", "d_model": 64, "num_layers": 2, "num_heads": 2, "batch_size": 32,
               "max_steps": 5, "eval_interval": 5, "log_interval": 5, "eval_max_images": 8, "log_model": False, "meteor": False}


def tiny_config_file(workdir):
    """sweep_config.yaml with its search space kept and fixed settings shrunk to seconds a run."""
    config = yaml.safe_load((REPO / "sweep_config.yaml").read_text())
    config["program"] = str(REPO / "train.py")
    for name, value in TINY_VALUES.items():
        config["parameters"][name] = {"value": value}
    path = workdir / "tiny_sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def three_run_sweep(tmp_path_factory):
    """`python simple_sweep.py --yes --count 3` with no W&B account; returns (workdir, result, sweep_id, runs)."""
    workdir = tmp_path_factory.mktemp("three_runs")
    result = run_script("simple_sweep.py", ["--config", tiny_config_file(workdir), "--yes", "--count", "3"], workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    store = SweepStore(workdir / "saved_models" / "sweeps")
    [(sweep_id, _, _)] = store.sweeps()
    runs = store.runs(sweep_id)
    store.close()
    return workdir, result, sweep_id, runs


def test_three_runs_leave_three_checkpoints(three_run_sweep):
    workdir, _, _, runs = three_run_sweep
    records = scan_checkpoints(workdir / "saved_models" / "sweep_runs")
    assert len(records) == 3
    assert sorted(r.run_id for r in records) == sorted(r.run_id for r in runs)
    assert {r.status for r in records} == {"completed"}


def test_three_results_recorded(three_run_sweep):
    workdir, _, _, runs = three_run_sweep
    records = {r.run_id: r for r in scan_checkpoints(workdir / "saved_models" / "sweep_runs")}
    assert [r.state for r in runs] == ["finished"] * 3
    for run in runs:
        assert run.exit_code == 0
        assert run.summary["val/loss"] == records[run.run_id].metrics["val/loss"]
        assert math.isfinite(run.summary["val/loss"])
        assert run.history and all("val/loss" in row for row in run.history)
        assert run.checkpoint == str(Path(records[run.run_id].path).relative_to(workdir))


def test_trials_got_the_proposed_parameters(three_run_sweep):
    workdir, _, _, runs = three_run_sweep
    records = {r.run_id: r for r in scan_checkpoints(workdir / "saved_models" / "sweep_runs")}
    for run in runs:
        config = records[run.run_id].config
        for name in ("optimizer", "learning_rate", "weight_decay", "scheduler", "grad_clip", "top_k", "temperature"):
            assert config[name] == run.params[name], name
        assert 1e-5 <= run.params["learning_rate"] <= 5e-5


def test_runs_logged_to_wandb_offline(three_run_sweep):
    workdir, result, _, runs = three_run_sweep
    for run in runs:
        run_dirs = list((workdir / "wandb").glob(f"offline-run-*-{run.run_id}"))
        assert len(run_dirs) == 1, run.run_id
    assert "wandb sync" in result.stdout


def test_bayes_uses_recorded_results(three_run_sweep):
    workdir, _, sweep_id, runs = three_run_sweep
    config = yaml.safe_load(tiny_config_file(workdir).read_text())
    records = engine_runs(config, runs)
    assert [r.state for r in records] == ["finished"] * 3
    assert [r.summary_metrics["val/loss"] for r in records] == [r.summary["val/loss"] for r in runs]

    # the Gaussian process fitted to the three results predicts a val/loss near them
    proposal = sweeps.next_runs(config, records, validate=True, n=1)[0]
    observed = [r.summary["val/loss"] for r in runs]
    margin = max(observed) - min(observed) + 0.1
    assert proposal.search_info["warnings"] == ""
    assert min(observed) - margin < proposal.search_info["predicted_value"] < max(observed) + margin

    # the same runs without their results: the engine scores each 0.0 and predicts 0.0
    for record in records:
        record.summary_metrics, record.history = {}, []
    blind = sweeps.next_runs(config, records, validate=True, n=1)[0]
    assert abs(blind.search_info["predicted_value"]) < 1e-6


def test_list_shows_progress(three_run_sweep):
    workdir, _, sweep_id, runs = three_run_sweep
    result = run_script("simple_sweep.py", ["--list"], workdir)
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if line.startswith(sweep_id)]
    best = min(runs, key=lambda r: r.summary["val/loss"])
    fields = line.split()  # sweep, method, metric, goal, created (date, time), runs, done, failed, running, stopped
    assert fields[:4] == [sweep_id, "bayes", "val/loss", "minimize"]
    assert fields[6:11] == ["3", "3", "0", "0", "0"]
    assert line.endswith(f"{best.summary['val/loss']:.4f} (run {best.run_id})")

    result = run_script("simple_sweep.py", ["--list", sweep_id], workdir)
    assert result.returncode == 0, result.stderr
    for run in runs:
        assert f"{run.run_id}  finished  val/loss={run.summary['val/loss']:.4f}" in result.stdout


def test_no_terminal_registers_without_running(tmp_path):
    result = run_script("simple_sweep.py", ["--config", tiny_config_file(tmp_path)], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "python simple_sweep.py --agent " in result.stdout
    store = SweepStore(tmp_path / "saved_models" / "sweeps")
    [(sweep_id, _, _)] = store.sweeps()
    assert store.runs(sweep_id) == []
    store.close()


def test_unknown_agent_sweep_rejected(tmp_path):
    result = run_script("simple_sweep.py", ["--agent", "abcd1234"], tmp_path)
    assert result.returncode == 2
    assert "no local sweep abcd1234" in result.stderr
    assert "wandb agent ENTITY/PROJECT/abcd1234" in result.stderr
    assert "Traceback" not in result.stderr


def parse(*argv):
    from simple_sweep import build_parser
    return build_parser().parse_args(list(argv))


def test_mode_online_with_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert choose_mode(parse()) == ("online", "")
    assert choose_mode(parse("--local"))[0] == "local"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert choose_mode(parse()) == ("local", "WANDB_MODE=offline")


def test_mode_local_without_api_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    mode, reason = choose_mode(parse())
    assert mode == "local"
    assert "no W&B API key" in reason


def test_agent_command_names_entity_project_id():
    assert agent_command("abc123", "captions", "team") == "wandb agent team/captions/abc123"
    assert agent_command("abc123", "captions", None) == "wandb agent --project captions abc123"


def test_project_and_data_reach_local_trials(tmp_path):
    args = parse("--config", str(tiny_config_file(tmp_path)), "--project", "captions", "--entity", "team",
                 "--data", "builtin")
    config = prepare_config(args, local=True)
    assert config["parameters"]["wandb_project"] == {"value": "captions"}
    assert config["parameters"]["wandb_entity"] == {"value": "team"}
    assert config["parameters"]["data"] == {"value": "builtin"}

    online = prepare_config(args, local=False)  # W&B's server sends the runs to the sweep's project itself
    assert "wandb_project" not in online["parameters"]


def test_missing_data_rejected_before_registering(tmp_path):
    result = run_script("simple_sweep.py", ["--data", str(tmp_path / "no_such_data"), "--yes", "--count", "1"],
                        tmp_path)
    assert result.returncode == 2
    assert f"--data {tmp_path / 'no_such_data'} was not found" in result.stderr
    assert "the sweep was not registered" in result.stderr
    assert not (tmp_path / "saved_models" / "sweeps").exists()


def test_project_rejected_for_other_programs(tmp_path):
    program = tmp_path / "other.py"
    program.write_text("")
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump({"program": str(program), "method": "random",
                                    "parameters": {"a": {"values": [1, 2]}}}))
    with pytest.raises(SweepConfigError, match="--project is passed to train.py as --wandb_project"):
        prepare_config(parse("--config", str(path), "--project", "p"), local=True)


def test_yes_and_no_exclusive(tmp_path):
    result = run_script("simple_sweep.py", ["--yes", "--no"], tmp_path)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
