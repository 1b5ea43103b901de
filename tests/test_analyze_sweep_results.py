"""analyze_sweep_results.py: ranking, problems, group statistics, effects, plots and the API.

    python -m pytest -q tests/test_analyze_sweep_results.py

The runs are real checkpoints: the tiny training run's file rewritten with known metrics,
settings and status, plus a corrupt file and one of an older format version. One real
train.py run diverges before its first validation, so it exists only as an offline W&B run.
"""

import copy
import math
import shutil
import statistics

import pandas as pd
import pytest
import torch
from PIL import Image

import checkpoints
import sweep_sources
import training
from analyze_sweep_results import (analyze_sweep_results, compare_groups, get_best_model_path,
                                   hyperparameter_effects, metric_summary)
from conftest import TINY_TRAIN_ARGS, run_script

# run_id: (optimizer, learning_rate, scheduler, sweep_id, status, metrics). dropout rises with
# val/loss among the ranked runs, so its rank correlation with val/loss is exactly +1.
RUNS = {
    "adamw1": ("adamw", 1e-4, "cosine", "sw1", "completed", {"val/loss": 2.0, "val/cider": 0.50}),
    "adam1": ("adam", 1e-4, "cosine", "sw1", "completed", {"val/loss": 2.2, "val/cider": 0.60}),
    "adamw2": ("adamw", 3e-4, "linear", "sw1", "completed", {"val/loss": 2.5, "val/cider": 0.40}),
    "adamw3": ("adamw", 1e-3, "constant", "sw1", "completed", {"val/loss": 3.0, "val/cider": 0.45}),
    "adam2": ("adam", 3e-5, "linear", "sw2", "completed", {"val/loss": 3.5, "val/cider": 0.20}),
    "adam3": ("adam", 1e-5, "constant", "sw2", "completed", {"val/loss": 4.0, "val/cider": 0.10}),
    # better numbers than any ranked run, but none of these may be ranked by val/loss
    "diverged": ("adamw", 1e-2, "cosine", "sw1", "failed", {"val/loss": 1.0, "val/cider": 0.99}),
    "nanloss": ("adam", 3e-3, "linear", "sw1", "completed", {"val/loss": float("nan"), "val/cider": float("nan")}),
    "nolossm": ("adamw", 2e-4, "constant", "sw1", "completed", {"val/cider": 0.30}),
    "stopped": ("adam", 5e-5, "cosine", "sw2", "running", {"val/loss": 1.2, "val/cider": 0.98}),
}
RANKED_BY_LOSS = ["adamw1", "adam1", "adamw2", "adamw3", "adam2", "adam3"]
RANKED_BY_CIDER = ["adam1", "adamw1", "adamw3", "adamw2", "nolossm", "adam2", "adam3"]


def write_run(template, runs_dir, run_id, spec):
    """Rewrite the tiny checkpoint as run `run_id` with the settings and metrics of `spec`."""
    optimizer, lr, scheduler, sweep_id, status, metrics = spec
    checkpoint = copy.copy(template)
    metadata = copy.deepcopy(template["metadata"])
    loss = metrics.get("val/loss", 3.0)
    config = {**metadata["config"], "optimizer": optimizer, "learning_rate": lr, "scheduler": scheduler,
              "output_dir": str(runs_dir), "dropout": round(loss / 10, 3) if math.isfinite(loss) else 0.0}
    history = [{"step": s, "train/loss": loss + 2.0 / s} for s in (10, 20, 30)]
    history += [{"step": s, **{k: v + (30 - s) / 100 for k, v in metrics.items()}} for s in (15, 30)]
    metadata.update(run_id=run_id, wandb_run_id=run_id, sweep_id=sweep_id, status=status, optimizer=optimizer,
                    learning_rate=lr, scheduler=scheduler, metrics=metrics, config=config, history=history,
                    final_train_loss=loss + 0.1, total_steps=30, best_step=30,
                    status_reason="diverged: 10 consecutive non-finite steps at step 12" if status == "failed" else "")
    checkpoint.update(metadata=metadata, config=config, metrics=metrics, status=status, wandb_run_id=run_id)
    path = training.checkpoint_path(config, run_id)
    training.write_run_files(path, checkpoint)
    return path


@pytest.fixture(scope="module")
def runs_dir(tiny_checkpoint, tmp_path_factory):
    """Checkpoints with known metrics, a corrupt file and one of format version 0."""
    runs_dir = tmp_path_factory.mktemp("sweep") / "saved_models" / "sweep_runs"
    template = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    for run_id, spec in RUNS.items():
        write_run(template, runs_dir, run_id, spec)
    (runs_dir / "model_sweep_corrupt_adamw_lr0.001_cosine.pth").write_bytes(b"PK\x03\x04 truncated")
    old = write_run(template, runs_dir, "oldformat", ("adamw", 1e-4, "cosine", "sw1", "completed",
                                                      {"val/loss": 0.5, "val/cider": 0.99}))
    checkpoint = torch.load(old, map_location="cpu", weights_only=True)
    checkpoint["format_version"] = checkpoint["metadata"]["format_version"] = 0
    training.write_run_files(old, checkpoint)
    return runs_dir


def analyze(runs_dir, metric="val/loss", **kwargs):
    return analyze_sweep_results(str(runs_dir), metric, wandb_dir=False, **kwargs)


def test_ranking_by_loss(runs_dir):
    df = analyze(runs_dir)
    ranked = df[df["rank"].notna()]
    assert list(ranked["run_id"]) == RANKED_BY_LOSS
    assert list(ranked["rank"]) == list(range(1, 7))
    assert list(df["run_id"][:6]) == RANKED_BY_LOSS
    assert len(df) == len(RUNS) + 2


def test_ranking_by_cider(runs_dir):
    df = analyze(runs_dir, "val/cider")
    assert list(df[df["rank"].notna()]["run_id"]) == RANKED_BY_CIDER


def test_problems_reported_not_ranked(runs_dir):
    df = analyze(runs_dir)
    by_id = {row["run_id"]: row for _, row in df.iterrows() if row["run_id"]}
    by_file = {row["path"].split("/")[-1]: row for _, row in df.iterrows()}
    assert "diverged" in by_id["diverged"]["problem"]
    assert by_id["diverged"]["status"] == "failed"
    assert "val/loss is nan" in by_id["nanloss"]["problem"]
    assert "no val/loss" in by_id["nolossm"]["problem"]
    assert "incomplete" in by_id["stopped"]["problem"]
    corrupt = by_file["model_sweep_corrupt_adamw_lr0.001_cosine.pth"]
    assert corrupt["status"] == "unreadable"
    assert "corrupt" in corrupt["problem"]
    old = by_file["model_sweep_oldformat_adamw_lr0.0001_cosine.pth"]
    assert old["status"] == "unreadable"
    assert "format version 0" in old["problem"]
    assert (df["problem"] == "").sum() == len(RANKED_BY_LOSS)


def test_table_columns(runs_dir):
    df = analyze(runs_dir)
    best = df.iloc[0]
    assert best["sweep_id"] == "sw1"
    assert best["final_train_loss"] == pytest.approx(2.1)
    assert best["total_steps"] == 30
    assert best["best_step"] == 30
    assert best["dropout"] == pytest.approx(0.2)
    assert best["batch_size"] == 32
    assert best["source"] == "checkpoint"
    for column in ("optimizer", "learning_rate", "scheduler", "val/loss", "val/cider", "batch_size", "path"):
        assert column in df.columns


def test_group_statistics(runs_dir):
    df = analyze(runs_dir)
    table = compare_groups(df, "optimizer", "val/loss")
    losses = {run_id: spec[5]["val/loss"] for run_id, spec in RUNS.items() if run_id in RANKED_BY_LOSS}
    for optimizer in ("adam", "adamw"):
        values = [v for run_id, v in losses.items() if RUNS[run_id][0] == optimizer]
        row = table.loc[optimizer]
        assert row["count"] == 3
        assert row["mean"] == pytest.approx(statistics.mean(values))
        assert row["median"] == pytest.approx(statistics.median(values))
        assert row["best"] == pytest.approx(min(values))
        assert row["spread (std)"] == pytest.approx(statistics.stdev(values))
    assert list(table.index) == ["adamw", "adam"]  # best group first


def test_group_best_is_max_for_scores(runs_dir):
    table = compare_groups(analyze(runs_dir, "val/cider"), "scheduler", "val/cider")
    assert table.loc["cosine", "best"] == pytest.approx(0.60)
    assert table.index[0] == "cosine"


def test_metric_summary_counts_ranked(runs_dir):
    summary = metric_summary(analyze(runs_dir))
    assert summary.loc["val/loss", "count"] == 6
    assert summary.loc["val/loss", "min"] == pytest.approx(2.0)
    assert summary.loc["val/cider", "max"] == pytest.approx(0.60)


def test_hyperparameter_effects(runs_dir):
    effects = hyperparameter_effects(analyze(runs_dir), "val/loss").set_index("hyperparameter")
    assert effects.loc["dropout", "spearman_rho"] == pytest.approx(1.0)
    assert effects.loc["dropout", "better"] == "lower values"
    assert effects.loc["optimizer", "better"] == "optimizer=adamw"
    assert effects.loc["optimizer", "epsilon_sq"] >= 0
    assert effects.loc["scheduler", "better"] == "scheduler=cosine"
    assert "warmup_steps" not in effects.index  # the same in every run
    assert "output_dir" not in effects.index


def test_best_path_same_as_checkpoints(runs_dir):
    for metric, expected in (("val/loss", "adamw1"), ("val/cider", "adam1")):
        best = get_best_model_path(str(runs_dir), metric)
        assert best == checkpoints.best_checkpoint_path(str(runs_dir), metric)
        assert f"_{expected}_" in best
        assert analyze(runs_dir, metric).iloc[0]["path"] == best
    assert get_best_model_path(str(runs_dir)) == checkpoints.best_checkpoint_path(str(runs_dir))


def test_sweep_filter(runs_dir):
    df = analyze(runs_dir, sweep_id="sw2")
    assert set(df["run_id"]) == {"adam2", "adam3", "stopped"}
    assert list(df[df["rank"].notna()]["rank"]) == [1, 2]
    assert "_adam2_" in get_best_model_path(str(runs_dir), sweep_id="sw2")
    with pytest.raises(FileNotFoundError, match="sweep nosuch"):
        get_best_model_path(str(runs_dir), sweep_id="nosuch")


def test_unknown_metric_raises(runs_dir):
    with pytest.raises(ValueError, match="val/cidr"):
        analyze(runs_dir, "val/cidr")


def test_empty_folder_returns_empty(tmp_path):
    df = analyze(tmp_path / "nothing")
    assert df.empty
    assert "rank" in df.columns
    with pytest.raises(FileNotFoundError, match="simple_sweep.py"):
        get_best_model_path(str(tmp_path / "nothing"))


def test_merge_rows_checkpoint_wins():
    checkpoint_rows = [{"run_id": "a", "sweep_id": None, "source": "checkpoint", "status": "completed"}]
    extra = [{"run_id": "a", "sweep_id": "s1", "source": "sweep_db", "status": "failed"},
             {"run_id": "b", "sweep_id": "s1", "source": "sweep_db", "status": "failed"},
             {"run_id": "b", "sweep_id": None, "source": "wandb", "status": "incomplete"}]
    merged = sweep_sources.merge_rows(checkpoint_rows, extra)
    assert [(r["run_id"], r["source"]) for r in merged] == [("a", "checkpoint"), ("b", "sweep_db")]
    assert merged[0]["sweep_id"] == "s1"
    assert merged[0]["status"] == "completed"


def test_first_error_line():
    console = [{"line": "20:00:01 INFO train: step 10/30 | loss 4.5"},
               {"line": "20:00:02 ERROR train: run x failed: diverged: 2 consecutive non-finite steps"},
               {"line": "20:00:02 ERROR train: no checkpoint saved"}]
    assert sweep_sources.first_error_line(console) == "run x failed: diverged: 2 consecutive non-finite steps"
    traceback = [{"line": "Traceback (most recent call last):"}, {"line": "  File \"train.py\", line 3"},
                 {"line": "RuntimeError: CUDA out of memory"}]
    assert sweep_sources.first_error_line(traceback) == "RuntimeError: CUDA out of memory"
    assert sweep_sources.first_error_line([{"line": "step 3"}, {"line": ""}]) == "step 3"
    assert sweep_sources.first_error_line([]) == ""


# --------------------------------------------------------------------------------------
# The command, end to end: the fixture runs, the tiny run, and a run that diverges early

@pytest.fixture(scope="module")
def sweep_workdir(runs_dir, tiny_run, tmp_path_factory):
    """A work folder with the fixture checkpoints, the tiny run's checkpoint and W&B folder,
    and the W&B folder of a real train.py run that diverged before its first validation."""
    workdir = tmp_path_factory.mktemp("cli")
    shutil.copytree(runs_dir, workdir / "saved_models" / "sweep_runs")
    for path in (tiny_run / "saved_models" / "sweep_runs").iterdir():
        shutil.copy2(path, workdir / "saved_models" / "sweep_runs" / path.name)
    shutil.copytree(tiny_run / "wandb", workdir / "wandb", symlinks=True)
    diverge = [*TINY_TRAIN_ARGS, "--learning_rate", "1e4", "--grad_clip", "0", "--max_bad_steps", "2",
               "--warmup_steps", "0", "--max_train_samples", "64", "--max_val_samples", "16"]
    result = run_script("train.py", diverge, workdir)
    assert result.returncode == 1, result.stderr[-2000:]
    assert not list((workdir / "saved_models" / "sweep_runs").glob("*_lr1e+04_*"))
    return workdir


def test_wandb_run_without_checkpoint(sweep_workdir):
    df = analyze_sweep_results(str(sweep_workdir / "saved_models" / "sweep_runs"),
                               wandb_dir=str(sweep_workdir / "wandb"))
    wandb_rows = df[df["source"] == "wandb"]
    assert len(wandb_rows) == 1  # the tiny run has a checkpoint, so its W&B folder is skipped
    row = wandb_rows.iloc[0]
    assert row["status"] == "failed"
    assert "diverged" in row["problem"]
    assert "exit code 1" in row["problem"]
    assert row["learning_rate"] == 1e4
    assert pd.isna(row["rank"])
    assert len(df) == len(RUNS) + 2 + 1 + 1


def test_cli_report_csv_and_plots(sweep_workdir):
    result = run_script("analyze_sweep_results.py", ["--csv", "exports/runs.csv", "--top", "3"], sweep_workdir)
    assert "note: this report pools 2 sweeps (sw1, sw2) and " in result.stderr
    assert "pass --sweep ID to analyse one sweep" in result.stderr
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for title in ("== Top 3 runs by val/loss (lower is better) ==", "== Metrics over the ranked runs ==",
                  "== val/loss by optimizer ==", "== val/loss by scheduler ==",
                  "== How each hyperparameter relates to val/loss ==",
                  "== Failed, diverged, incomplete or unreadable runs (not ranked) =="):
        assert title in out
    top = out.split("== Top 3")[1].split("==\n")[1].split("\n\n")[0].splitlines()
    assert len(top) == 4  # header and three runs
    assert "adamw1" in top[1]
    problems = out.split("(not ranked) ==")[1]
    for run_id in ("diverged", "nanloss", "nolossm", "stopped", "corrupt"):
        assert run_id in problems
    assert "exit code 1" in problems
    csv = pd.read_csv(sweep_workdir / "exports" / "runs.csv")
    assert len(csv) == len(RUNS) + 4
    assert csv.iloc[0]["run_id"] == "adamw1"

    plots = sorted((sweep_workdir / "saved_models" / "analysis").glob("*.png"))
    names = [p.name for p in plots]
    assert names == ["val_loss_by_group.png", "val_loss_curves.png", "val_loss_parallel.png", "val_loss_vs_lr.png"]
    for path in plots:
        assert str(path.relative_to(sweep_workdir)) in out
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 500
            assert image.height > 300
    assert not list((sweep_workdir / "saved_models" / "analysis").glob(".*tmp"))


def test_cli_no_plots_and_metric(sweep_workdir, tmp_path):
    result = run_script("analyze_sweep_results.py", ["--no-plots", "--metric", "val/cider", "--plots-dir",
                                                     str(tmp_path / "plots")], sweep_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    # the fixture runs ranked by val/cider and the tiny run
    assert f"== Top {len(RANKED_BY_CIDER) + 1} runs by val/cider (higher is better) ==" in result.stdout
    assert "plots:" not in result.stdout
    assert not (tmp_path / "plots").exists()


def test_cli_list_models_same_table(sweep_workdir, monkeypatch):
    result = run_script("analyze_sweep_results.py", ["--list-models"], sweep_workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    monkeypatch.chdir(sweep_workdir)
    expected = checkpoints.models_table(checkpoints.scan_checkpoints(), "val/loss")
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("args, message", [
    (["--metric", "val/cidr"], "--metric val/cidr"),
    (["--sweep", "nosuch"], "--sweep nosuch"),
    (["--top", "0"], "--top 0"),
])
def test_cli_invalid_option(sweep_workdir, args, message):
    result = run_script("analyze_sweep_results.py", [*args, "--no-plots"], sweep_workdir)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_csv_unwritable(sweep_workdir):
    (sweep_workdir / "a_file").write_text("not a folder")
    result = run_script("analyze_sweep_results.py", ["--no-plots", "--csv", "a_file/runs.csv"], sweep_workdir)
    assert result.returncode == 1
    assert "cannot write" in result.stderr
    assert "a_file" in result.stderr
    assert "Traceback" not in result.stderr
    assert (sweep_workdir / "a_file").read_text() == "not a folder"


def test_cli_no_runs(tmp_path):
    result = run_script("analyze_sweep_results.py", [], tmp_path)
    assert result.returncode == 1
    assert "no runs found" in result.stderr
    assert "python simple_sweep.py" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "saved_models").exists()


def test_cli_one_sweep_has_no_pooling_note(sweep_workdir):
    result = run_script("analyze_sweep_results.py", ["--no-plots", "--sweep", "sw2"], sweep_workdir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pools" not in result.stderr
