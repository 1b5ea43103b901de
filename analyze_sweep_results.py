"""Summarise a hyperparameter sweep: which settings won, by how much, and what mattered.

    python analyze_sweep_results.py                     # every run in saved_models/sweep_runs
    python analyze_sweep_results.py --metric val/cider --top 5 --csv runs.csv
    python analyze_sweep_results.py --sweep SWEEP_ID --no-plots
    python analyze_sweep_results.py --list-models       # the table inference.py --list-models prints

From Python:
    from analyze_sweep_results import analyze_sweep_results, get_best_model_path
    runs = analyze_sweep_results()   # pandas DataFrame, one row per run, best first
    path = get_best_model_path()     # the checkpoint inference.py picks

One row per run comes from the JSON summaries beside the checkpoints (no weights are loaded),
plus the runs that left no checkpoint: offline W&B runs that failed before their first
validation, and the runs of the local sweep database. Runs that failed, diverged, stopped early,
lack the metric or cannot be read are listed with their reason and never ranked.
Plots (PNG) go to saved_models/analysis/. Exit status: 0 done, 1 no runs found, 2 invalid option.
"""

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

import checkpoints
import sweep_sources
from checkpoints import CheckpointError

log = logging.getLogger("analyze")

# checkpoints.best_checkpoint_path's default, which inference.py uses too.
DEFAULT_METRIC = "val/loss"
DEFAULT_PLOTS_DIR = "saved_models/analysis"
FRONT_COLUMNS = ["rank", "run_id", "sweep_id", "status", "problem", "optimizer", "learning_rate", "scheduler"]
RUN_COLUMNS = ["final_train_loss", "total_steps", "best_step"]
# train.py settings that locate files, name the W&B project or pick the checkpoint; not searched over.
NOT_HYPERPARAMETERS = {"output_dir", "cache_dir", "resume_dir", "resume", "wandb_project", "wandb_entity",
                       "wandb_mode", "log_model", "log_interval", "device", "metric", "metric_goal"}


# --------------------------------------------------------------------------------------
# One row per run

def record_problem(record, metric):
    """Say why a checkpoint cannot be ranked by `metric`; empty when it can (RunRecord.selectable)."""
    if record.error:
        return record.error
    if record.status == "failed":
        return record.reason or "failed without a recorded reason"
    if record.status != checkpoints.SELECTABLE_STATUS:
        return (f"incomplete: status {record.status!r} after step {record.total_steps} "
                f"(still training, or the process was killed)")
    if metric not in record.metrics:
        return f"no {metric} in its metrics"
    if not math.isfinite(record.metric(metric)):
        return f"{metric} is {record.metrics[metric]}"
    return ""


def checkpoint_row(record, metric, rank):
    """Flatten a RunRecord and its JSON summary into one table row."""
    row = {"rank": rank, "run_id": record.run_id or None, "sweep_id": None,
           "status": "unreadable" if record.error else record.status, "problem": record_problem(record, metric),
           "optimizer": record.optimizer or None, "learning_rate": record.learning_rate,
           "scheduler": record.scheduler or None}
    for key, value in record.metrics.items():
        row[key] = float(value) if isinstance(value, (int, float)) else float("nan")
    row.update(final_train_loss=record.final_train_loss, total_steps=record.total_steps, best_step=None)
    if not record.error:
        try:
            summary = checkpoints.read_summary(record.path)
        except (OSError, CheckpointError) as e:  # replaced or deleted since the scan
            log.warning("failed to reread %s: %s", record.path, e)
            summary = {}
        row.update(sweep_id=summary.get("sweep_id"), best_step=summary.get("best_step"))
        row.update({k: v for k, v in record.config.items() if k not in row})
    row.update(source="checkpoint", path=record.path)
    return row


def order_columns(df, metric):
    """Order the columns: front ones, the metric first among metrics, run counters, settings, source."""
    metrics = [metric] + [m for m in checkpoints.TABLE_METRICS if m != metric]
    metrics += sorted(c for c in df.columns if c.startswith(("val/", "train/")) and c not in metrics)
    ordered = FRONT_COLUMNS + metrics + RUN_COLUMNS
    tail = ["source", "path"]
    hyper = [c for c in df.columns if c not in ordered and c not in tail]
    return df.reindex(columns=ordered + hyper + tail)


def analyze_sweep_results(runs_dir=checkpoints.DEFAULT_RUNS_DIR, metric=DEFAULT_METRIC, sweep_id=None,
                          wandb_dir=None, sweeps_dir=sweep_sources.DEFAULT_SWEEPS_DIR):
    """Return one row per run as a DataFrame, ranked runs first (best first), then the rest.

    Ranking is checkpoints.rank_records, the rule inference.py uses, so row 0 is the run of
    get_best_model_path() when it has a rank. Columns: rank (1 = best; missing for runs that
    cannot be ranked), run_id, sweep_id, status, problem (why a run is not ranked), optimizer,
    learning_rate, scheduler, every metric (val/...), final_train_loss, total_steps, best_step,
    every other train.py setting, source (checkpoint, wandb or sweep_db) and path.
    wandb_dir=None reads $WANDB_DIR/wandb (./wandb by default); pass False to skip W&B files.
    Raises ValueError when readable checkpoints exist but none has the metric.
    """
    records = checkpoints.scan_checkpoints(runs_dir)
    readable = [r for r in records if not r.error]
    if readable and not any(metric in r.metrics for r in readable):
        known = sorted({m for r in readable for m in r.metrics})
        raise ValueError(f"metric {metric} is in no run's metrics in {runs_dir}; use one of {', '.join(known)}")
    rows = []
    for position, record in enumerate(checkpoints.rank_records(records, metric), start=1):
        rows.append(checkpoint_row(record, metric, position if record.selectable(metric) else None))
    known_ids = {row["run_id"] for row in rows if row["run_id"]}
    extra = sweep_sources.sweep_database_rows(sweeps_dir, runs_dir)
    known_ids |= {row["run_id"] for row in extra}
    if wandb_dir is not False:
        extra += sweep_sources.wandb_rows(wandb_dir or sweep_sources.default_wandb_dir(), known_ids)
    df = pd.DataFrame(sweep_sources.merge_rows(rows, extra))
    if not df.empty:
        df["rank"] = df["rank"].astype("Int64")
    return select_sweep(order_columns(df, metric), sweep_id)


def select_sweep(df, sweep_id):
    """Keep the runs of one sweep (all runs for None) and number their ranks from 1 again."""
    if sweep_id is None or df.empty:
        return df.reset_index(drop=True)
    df = df[df["sweep_id"] == sweep_id].reset_index(drop=True)
    ranked = df["rank"].notna()
    df.loc[ranked, "rank"] = np.arange(1, ranked.sum() + 1)
    return df


def get_best_model_path(runs_dir=checkpoints.DEFAULT_RUNS_DIR, metric=DEFAULT_METRIC, sweep_id=None):
    """Return the best checkpoint's path by checkpoints.best_checkpoint_path, the rule inference.py uses.

    With sweep_id, only that sweep's checkpoints compete. Raises FileNotFoundError when no
    completed run has a finite value of the metric.
    """
    if sweep_id is None:
        return checkpoints.best_checkpoint_path(runs_dir, metric)
    records = [r for r in checkpoints.scan_checkpoints(runs_dir) if not r.error
               and checkpoints.read_summary(r.path).get("sweep_id") == sweep_id]
    ranked = [r for r in checkpoints.rank_records(records, metric) if r.selectable(metric)]
    if not ranked:
        raise FileNotFoundError(f"no completed run of sweep {sweep_id} with a finite {metric} in {runs_dir}; "
                                f"list the runs with `python analyze_sweep_results.py --sweep {sweep_id}`")
    return ranked[0].path


# --------------------------------------------------------------------------------------
# Statistics over the ranked runs

def ranked_runs(df):
    return df[df["rank"].notna()] if "rank" in df else df.iloc[0:0]


def metric_columns(df):
    columns = [c for c in df.columns if c.startswith("val/") and ranked_runs(df)[c].notna().any()]
    return columns + ["final_train_loss"]


def metric_summary(df):
    """Return the count, mean, std, min, median and max of each metric over the ranked runs."""
    table = ranked_runs(df)[metric_columns(df)].astype(float).describe().T
    return table[["count", "mean", "std", "min", "50%", "max"]].rename(columns={"50%": "median"})


def compare_groups(df, column, metric):
    """Return the count, mean, median, best and spread (standard deviation) of the metric per value of `column`."""
    best = "min" if checkpoints.metric_goal(metric) == "minimize" else "max"
    runs = ranked_runs(df)
    table = runs.groupby(runs[column].astype(str))[metric].agg(["count", "mean", "median", best, "std"])
    table = table.rename(columns={best: "best", "std": "spread (std)"})
    return table.sort_values("best", ascending=best == "min")


def varying_hyperparameters(df):
    """Return the settings with at least two distinct values among the ranked runs, learning rate first."""
    runs = ranked_runs(df)
    candidates = ["optimizer", "learning_rate", "scheduler"]
    excluded = set(candidates) | NOT_HYPERPARAMETERS | set(FRONT_COLUMNS + RUN_COLUMNS) | {"source", "path"}
    candidates += [c for c in df.columns if c not in excluded and not c.startswith(("val/", "train/"))]
    return [c for c in candidates if c in runs and runs[c].dropna().astype(str).nunique() > 1]


def is_numeric_setting(values):
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def hyperparameter_effects(df, metric):
    """Relate each varying hyperparameter to the metric over the ranked runs.

    Numeric settings get Spearman's rank correlation, which measures monotonic relations, so a
    log scale does not change it. Categorical settings get a Kruskal-Wallis test and its
    epsilon-squared, H / (n - 1): the share of the metric's rank variance that the groups explain.
    Rows are sorted by p-value. With few runs the p-values are rough.
    """
    runs = ranked_runs(df)
    minimize = checkpoints.metric_goal(metric) == "minimize"
    rows = []
    for column in varying_hyperparameters(df):
        values = runs[[column, metric]].dropna()
        row = {"hyperparameter": column, "runs": len(values), "spearman_rho": np.nan, "epsilon_sq": np.nan,
               "p_value": np.nan, "better": ""}
        if len(values) >= 3 and is_numeric_setting(values[column]):
            rho, p = stats.spearmanr(values[column], values[metric])
            row.update(spearman_rho=rho, p_value=p)
            if math.isfinite(rho) and rho != 0:
                row["better"] = "higher values" if (rho < 0) == minimize else "lower values"
        elif len(values) >= 3:
            groups = values.groupby(values[column].astype(str))[metric]
            medians = groups.median().sort_values(ascending=minimize)
            row["better"] = f"{column}={medians.index[0]}"
            try:
                h, p = stats.kruskal(*[g.to_numpy() for _, g in groups])
                row.update(epsilon_sq=h / (len(values) - 1), p_value=p)
            except ValueError:  # every value identical
                pass
        rows.append(row)
    return pd.DataFrame(rows, columns=["hyperparameter", "runs", "spearman_rho", "epsilon_sq", "p_value",
                                       "better"]).sort_values("p_value", na_position="last")


# --------------------------------------------------------------------------------------
# The report

def format_table(table, index=False):
    return table.to_string(index=index, float_format=lambda v: f"{v:.4g}", na_rep="-")


def section(title, body):
    print(f"\n== {title} ==\n{body}")


def describe_best(df, metric):
    """Name the best run and how far ahead it is of the runner-up and of the median run."""
    runs = ranked_runs(df)
    best = runs.iloc[0]
    lines = [f"best: run {best['run_id']}  {metric}={best[metric]:.4f}  ({best['optimizer']}, "
             f"lr {best['learning_rate']:.3g}, {best['scheduler']})  {best['path']}"]
    if len(runs) > 1:
        second, median = runs.iloc[1], runs[metric].median()
        lines.append(f"ahead of the runner-up (run {second['run_id']}, {second[metric]:.4f}) by "
                     f"{abs(best[metric] - second[metric]):.4f}, of the median of {len(runs)} ranked runs "
                     f"({median:.4f}) by {abs(best[metric] - median):.4f}")
    return "\n".join(lines)


def print_report(df, metric, top, source):
    """Print the overview, top runs, metric statistics, group comparisons, effects and problems."""
    goal = "lower" if checkpoints.metric_goal(metric) == "minimize" else "higher"
    runs, problems = ranked_runs(df), df[df["rank"].isna()]
    print(f"{len(df)} runs from {source}: {len(runs)} ranked by {metric} ({goal} is better), "
          f"{len(problems)} failed, incomplete or unreadable")
    chosen = df["metric"].dropna().astype(str).value_counts() if "metric" in df else pd.Series(dtype=int)
    if len(chosen) and chosen.index[0] != metric:
        print(f"note: most runs kept the checkpoint of their best {chosen.index[0]}; "
              f"pass --metric {chosen.index[0]} to rank by it")
    if runs.empty:
        print(f"no run completed with a finite {metric}, so nothing is ranked; see the problems below")
    else:
        print(describe_best(df, metric))
        hyper = [c for c in varying_hyperparameters(df) if c not in FRONT_COLUMNS]
        columns = ["rank", "run_id", "optimizer", "learning_rate", "scheduler", metric, *hyper,
                   *[m for m in checkpoints.TABLE_METRICS if m != metric and runs[m].notna().any()], "final_train_loss",
                   "total_steps"]
        section(f"Top {min(top, len(runs))} runs by {metric} ({goal} is better)",
                format_table(runs.head(top)[columns]))
        section("Metrics over the ranked runs", format_table(metric_summary(df), index=True))
        for column in ("optimizer", "scheduler"):
            section(f"{metric} by {column}", format_table(compare_groups(df, column, metric).reset_index()))
        effects = hyperparameter_effects(df, metric)
        if not effects["p_value"].notna().any():
            body = "needs at least 3 ranked runs and a hyperparameter with two or more values"
        elif len(runs) < 10:
            body = format_table(effects) + f"\n(p-values from only {len(runs)} runs are a hint, not evidence)"
        else:
            body = format_table(effects)
        section(f"How each hyperparameter relates to {metric}", body)
    if not problems.empty:
        section("Failed, diverged, incomplete or unreadable runs (not ranked)", format_problems(problems))


def format_problems(problems):
    """Format two lines per run: run id, status and file, then the reason indented below them."""
    run_ids = problems["run_id"].fillna("-").replace("", "-")
    width = max(len(run_id) for run_id in run_ids)
    lines = []
    for run_id, (_, row) in zip(run_ids, problems.iterrows()):
        lines.append(f"{run_id:<{width}}  {row['status']:<10}  {row['path']}")
        lines.append(f"{'':<{width}}  {row['problem']}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Summarise the runs of a hyperparameter sweep.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--metric", default=DEFAULT_METRIC,
                        help="validation metric to rank by; losses are minimised, caption scores maximised")
    parser.add_argument("--sweep", default=None, help="only the runs of this sweep id")
    parser.add_argument("--top", type=int, default=10,
                        help="number of runs in the top table, and in the curves plot (at most 5)")
    parser.add_argument("--csv", default=None, help="also write the whole table to this CSV file")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list-models", action="store_true",
                        help="print the checkpoint table (the same as inference.py --list-models) and exit")
    parser.add_argument("--runs-dir", default=checkpoints.DEFAULT_RUNS_DIR, help="folder of checkpoints")
    parser.add_argument("--plots-dir", default=DEFAULT_PLOTS_DIR, help="folder of the PNG plots")
    parser.add_argument("--wandb-dir", default=None,
                        help="folder of W&B run folders (None = $WANDB_DIR/wandb, or ./wandb without WANDB_DIR)")
    parser.add_argument("--sweeps-dir", default=sweep_sources.DEFAULT_SWEEPS_DIR,
                        help="folder of the local sweep database")
    args = parser.parse_args(argv)
    if args.top <= 0:
        parser.error(f"--top {args.top} must be a positive number of runs")
    return args


def write_csv(df, path):
    """Write the table to a temporary file and rename it, so a failed write leaves no partial CSV."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        df.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def list_models(runs_dir, metric, sweeps_dir=sweep_sources.DEFAULT_SWEEPS_DIR):
    """Print the checkpoint table (the same as inference.py --list-models); return the exit status."""
    records = checkpoints.scan_runs(runs_dir, sweeps_dir)
    if not records:
        print(f"no checkpoints in {runs_dir}; start a sweep with `python simple_sweep.py` or train "
              f"one run with `python train.py`", file=sys.stderr)
        return 1
    print(checkpoints.models_table(records, metric))
    return 0


def load_table(args):
    """Return (table, 0), or (None, exit status) after printing why there is nothing to analyse."""
    try:
        df = analyze_sweep_results(args.runs_dir, args.metric, None, args.wandb_dir, args.sweeps_dir)
    except ValueError as e:
        print(f"--metric {args.metric}: {e}", file=sys.stderr)
        return None, 2
    if df.empty:
        print(f"no runs found in {args.runs_dir} or in the W&B run folders; start a sweep with "
              f"`python simple_sweep.py` (or `wandb agent SWEEP_ID`), or train one run with `python train.py`",
              file=sys.stderr)
        return None, 1
    sweeps = sorted(str(s) for s in df["sweep_id"].dropna().unique())
    if args.sweep is None:
        outside = int(df["sweep_id"].isna().sum())
        if len(sweeps) + (outside > 0) > 1:
            # sweeps may fix different settings, and a pooled comparison would mistake those for effects
            groups = [f"{len(sweeps)} sweeps ({', '.join(sweeps)})"] if sweeps else []
            groups += [f"{outside} runs outside any sweep"] if outside else []
            print(f"note: this report pools {' and '.join(groups)}, whose fixed settings may differ; "
                  f"pass --sweep ID to analyse one sweep", file=sys.stderr)
        return df, 0
    df = select_sweep(df, args.sweep)
    if df.empty:
        print(f"--sweep {args.sweep}: no runs of this sweep in {args.runs_dir}; sweeps found there: "
              f"{', '.join(sweeps) or 'none (runs started without a sweep)'}", file=sys.stderr)
        return None, 2
    return df, 0


def main(argv=None):
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    args = parse_args(argv)
    if args.list_models:
        return list_models(args.runs_dir, args.metric, args.sweeps_dir)
    df, status = load_table(args)
    if df is None:
        return status

    print_report(df, args.metric, args.top, args.runs_dir + (f" (sweep {args.sweep})" if args.sweep else ""))
    try:
        if args.csv:
            write_csv(df, args.csv)
            print(f"\ntable of {len(df)} runs written to {args.csv}")
        if not args.no_plots and not ranked_runs(df).empty:
            import sweep_plots  # matplotlib is imported only when plots are drawn
            saved = sweep_plots.save_plots(df, args.metric, args.plots_dir, varying_hyperparameters(df),
                                           min(args.top, 5))
            print("\nplots:")
            for title, path in saved:
                print(f"  {title}: {path}")
    except OSError as e:
        print(f"cannot write {e.filename}: {e.strerror}; pass another --csv or --plots-dir, or --no-plots",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
