"""Sweep config checks: W&B's schema through the `sweeps` package, plus what train.py accepts and logs.

    python -m pytest -q tests/test_sweep_validation.py
"""

import copy
import sqlite3

import pytest
import yaml

import train
from conftest import REPO, run_script
from sweep_validation import SweepConfigError, check_sweep_config, load_sweep_config

CONFIG_PATH = REPO / "sweep_config.yaml"


@pytest.fixture(scope="module")
def base_config():
    return load_sweep_config(CONFIG_PATH)


def test_default_config_is_valid(base_config):
    assert check_sweep_config(base_config, cwd=REPO) == []


def test_default_config_search_space(base_config):
    parameters = base_config["parameters"]
    assert base_config["program"] == "train.py"
    assert base_config["method"] == "bayes"
    assert base_config["metric"] == {"name": "val/loss", "goal": "minimize"}
    assert parameters["optimizer"] == {"values": ["adamw", "adam"]}
    assert parameters["learning_rate"] == {"distribution": "log_uniform_values", "min": 1e-5, "max": 5e-5}
    assert parameters["weight_decay"] == {"distribution": "uniform", "min": 0.01, "max": 0.05}
    assert parameters["scheduler"] == {"values": ["cosine", "linear", "constant"]}
    assert parameters["grad_clip"] == {"distribution": "uniform", "min": 0.5, "max": 1.0}
    assert parameters["top_k"] == {"distribution": "int_uniform", "min": 20, "max": 100}
    assert parameters["temperature"] == {"distribution": "uniform", "min": 0.8, "max": 1.2}
    assert parameters["data"] == {"value": "builtin"}


def test_metric_is_logged_by_train(base_config):
    assert base_config["metric"]["name"] in train.LOGGED_METRICS


def test_hyperband_config_is_valid(base_config):
    config = copy.deepcopy(base_config)
    config["early_terminate"] = {"type": "hyperband", "min_iter": 1, "eta": 3}
    assert check_sweep_config(config, cwd=REPO) == []


def rename(mapping, old, new):
    mapping[new] = mapping.pop(old)


# (case, change to the default config, text the one-line message must contain)
REJECTED = [
    ("misspelled top-level key", lambda c: rename(c, "parameters", "paramters"), "paramters: unknown key; did you mean 'parameters'"),
    ("misspelled metric key", lambda c: rename(c["metric"], "name", "nmae"), "metric.nmae: unknown key"),
    ("misspelled spec key", lambda c: rename(c["parameters"]["learning_rate"], "distribution", "distrbution"),
     "parameters.learning_rate.distrbution: unknown key; did you mean 'distribution'"),
    ("misspelled setting", lambda c: rename(c["parameters"], "weight_decay", "weight_decy"),
     "parameters.weight_decy: train.py has no setting 'weight_decy'; did you mean 'weight_decay'"),
    ("misspelled distribution", lambda c: c["parameters"]["learning_rate"].update(distribution="loguniform_values"),
     "parameters.learning_rate.distribution: unknown distribution 'loguniform_values'"),
    ("metric never logged", lambda c: c["metric"].update(name="val/accuracy"), "metric.name: train.py never logs 'val/accuracy'"),
    ("log_uniform with raw limits", lambda c: c["parameters"]["learning_rate"].update(distribution="log_uniform"),
     "parameters.learning_rate: log_uniform takes natural-log exponents"),
    ("min above max", lambda c: c["parameters"]["weight_decay"].update(min=0.5),
     "parameters.weight_decay: min 0.5 is not below max 0.05"),
    ("number read as text", lambda c: c["parameters"]["learning_rate"].update(min="1e-5"),
     "parameters.learning_rate.min: '1e-5' is not a number; YAML reads 1e-5 as text, write it as 1.0e-05"),
    ("float distribution for an int", lambda c: c["parameters"].update(top_k={"distribution": "uniform", "min": 20, "max": 100.0}),
     "parameters.top_k: train.py --top_k takes an integer"),
    ("value train.py rejects", lambda c: c["parameters"]["optimizer"].update(values=["adamw", "sgd"]),
     "parameters.optimizer: 'sgd' is not one of train.py's --optimizer choices"),
    ("metric other than the kept one", lambda c: c["metric"].update(name="val/cider", goal="maximize"),
     "add `metric: {value: val/cider}` and `metric_goal: {value: maximize}` under parameters"),
    ("meteor metric with meteor off", lambda c: c["metric"].update(name="val/meteor", goal="maximize"),
     "metric.name: val/meteor is never logged, because parameters set meteor: false"),
    ("unknown method", lambda c: c.update(method="bayesian"), "method: 'bayesian' is not one of"),
    ("value out of train.py's range", lambda c: c["parameters"]["batch_size"].update(value=0),
     "parameters.batch_size: train.py would reject 0: --batch_size=0 must be positive"),
    ("range bound out of train.py's range", lambda c: c["parameters"]["top_k"].update(min=0),
     "parameters.top_k: train.py would reject 0: --top_k=0 must be positive"),
    ("unknown command macro", lambda c: c.update(command=["${env}", "${interpreter}", "${program}", "${argz}"]),
     "command: unknown macro ${argz}"),
    ("missing program", lambda c: c.update(program="trian.py"), "program: trian.py not found"),
    ("grid over a range", lambda c: c.update(method="grid"), "W&B's sweep engine rejects the config: Parameter"),
    ("hyperband key typo", lambda c: c.update(early_terminate={"type": "hyperband", "miniter": 1}),
     "early_terminate.miniter: unknown key; did you mean 'min_iter'"),
]


@pytest.mark.parametrize("case, change, expected", REJECTED, ids=[case for case, _, _ in REJECTED])
def test_invalid_config_rejected(base_config, case, change, expected):
    config = copy.deepcopy(base_config)
    change(config)
    problems = check_sweep_config(config, cwd=REPO)
    assert problems, f"{case} was accepted"
    assert any(expected in problem for problem in problems), problems
    assert all("\n" not in problem for problem in problems)


def test_boolean_values_accepted(base_config):
    config = copy.deepcopy(base_config)
    config["parameters"]["do_sample"] = {"values": [True, False]}
    assert check_sweep_config(config, cwd=REPO) == []


def test_missing_file_named(tmp_path):
    with pytest.raises(SweepConfigError, match="not found; pass an existing file with --config"):
        load_sweep_config(tmp_path / "absent.yaml")


def test_invalid_yaml_gives_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("program: train.py\nparameters:\n  lr: [1, 2\n")
    with pytest.raises(SweepConfigError, match=r"broken.yaml is not valid YAML at line \d"):
        load_sweep_config(path)


def test_cli_rejects_without_registering(tmp_path):
    config = load_sweep_config(CONFIG_PATH)
    config["program"] = str(REPO / "train.py")
    config["metric"]["name"] = "val/los"
    config["parameters"]["learning_rate"]["min"] = 1e-3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))

    result = run_script("simple_sweep.py", ["--config", path, "--yes", "--count", "1"], tmp_path)

    assert result.returncode == 2
    assert "metric.name: train.py never logs 'val/los', so no run would have a result; did you mean 'val/loss'?" in result.stderr
    assert "parameters.learning_rate: min 0.001 is not below max 5e-05" in result.stderr
    assert "the sweep was not registered" in result.stderr
    assert "Traceback" not in result.stderr
    database = tmp_path / "saved_models" / "sweeps" / "sweeps.db"
    if database.exists():
        assert sqlite3.connect(database).execute("SELECT COUNT(*) FROM sweeps").fetchone()[0] == 0
    assert not (tmp_path / "saved_models" / "sweep_runs").exists()
