"""PNG plots of a sweep's runs for analyze_sweep_results.py.

Figures are built with matplotlib's object API (Figure + its Agg canvas), never pyplot, so no
display is needed and no global state is touched. Each file is written under a temporary name
and renamed, so an interrupted run leaves no half-written PNG.

    python analyze_sweep_results.py   # calls save_plots(table, metric, out_dir, hyperparameters)
"""

import os
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

import checkpoints

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
DPI = 120


def ranked_runs(df):
    return df[df["rank"].notna()]


def goal_label(metric):
    return f"{metric} ({'lower' if checkpoints.metric_goal(metric) == 'minimize' else 'higher'} is better)"


def save_figure(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return str(path)


def color_map(values):
    palette = colormaps["tab10"]
    return {value: palette(i % 10) for i, value in enumerate(sorted(values))}


def plot_metric_vs_lr(df, metric, path):
    """Plot the metric against the learning rate (log axis): colour = optimizer, marker = scheduler, star = best.

    Runs that have a learning rate but no value (failed, diverged, incomplete) are drawn as
    grey crosses along the bottom edge, which shows where training breaks down.
    """
    runs = ranked_runs(df)
    fig = Figure(figsize=(8, 5))
    ax = fig.add_subplot()
    colors = color_map(runs["optimizer"].astype(str).unique())
    markers = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sorted(runs["scheduler"].astype(str).unique()))}
    for (optimizer, scheduler), group in runs.groupby([runs["optimizer"].astype(str), runs["scheduler"].astype(str)]):
        ax.scatter(group["learning_rate"], group[metric], color=colors[optimizer], marker=markers[scheduler],
                   s=50, alpha=0.85, edgecolors="black", linewidths=0.5, label=f"{optimizer}, {scheduler}")
    best = runs.iloc[0]
    ax.scatter([best["learning_rate"]], [best[metric]], marker="*", s=350, facecolors="none", edgecolors="red",
               linewidths=1.5, label=f"best: {best['run_id']}")
    failed = df[df["rank"].isna() & (df["learning_rate"].astype(float) > 0)]
    if len(failed):
        ax.plot(failed["learning_rate"].astype(float), np.zeros(len(failed)), "x", color="grey", markersize=9,
                transform=ax.get_xaxis_transform(), clip_on=False, label=f"not ranked ({len(failed)})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(goal_label(metric))
    ax.set_title(f"{metric} against learning rate, {len(runs)} ranked runs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_metric_by_group(df, metric, path):
    """Draw box plots of the metric per optimizer and per scheduler, every run drawn as a dot."""
    runs = ranked_runs(df)
    fig = Figure(figsize=(10, 4.5))
    axes = fig.subplots(1, 2, sharey=True)
    rng = np.random.default_rng(0)  # fixed jitter, so reruns draw the same picture
    for ax, column in zip(axes, ("optimizer", "scheduler")):
        names = sorted(runs[column].astype(str).unique())
        values = [runs.loc[runs[column].astype(str) == name, metric].to_numpy(float) for name in names]
        ax.boxplot(values, showfliers=False, widths=0.5)
        for i, v in enumerate(values, start=1):
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, s=18, alpha=0.7, color="tab:blue", zorder=3)
        ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(v)})" for n, v in zip(names, values)])
        ax.set_xlabel(column)
        ax.set_title(f"{metric} by {column}")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel(goal_label(metric))
    return save_figure(fig, path)


def axis_positions(values, log):
    """Map one hyperparameter's values onto [0, 1]; return (positions, [(position, tick label)])."""
    if values.dtype.kind in "if" and values.dtype != bool:
        numbers = values.astype(float).to_numpy()
        scaled = np.log10(numbers) if log else numbers
        low, high = np.nanmin(scaled), np.nanmax(scaled)
        span = (high - low) or 1.0
        # Label every value when there are few of them (a grid sweep), else five even steps.
        distinct = np.unique(scaled[~np.isnan(scaled)])
        marks = distinct if len(distinct) <= 6 else np.linspace(low, high, 5)
        ticks = [((m - low) / span, f"{10 ** m if log else m:.3g}") for m in marks]
        return (scaled - low) / span, ticks
    labels = sorted(values.astype(str).unique())
    step = 1.0 / max(len(labels) - 1, 1)
    index = {label: i * step for i, label in enumerate(labels)}
    return values.astype(str).map(index).to_numpy(float), [(p, label) for label, p in index.items()]


def plot_parallel_coordinates(df, metric, columns, path):
    """Draw one vertical axis per varying hyperparameter plus the metric, and one line per ranked run.

    pandas.plotting.parallel_coordinates puts every column on one shared scale, so a learning
    rate of 1e-4 next to a batch size of 64 becomes a flat line. Here each axis is scaled to its
    own range (log10 for the learning rate) and labelled with its own values.
    `columns` are the hyperparameters to draw; returns None when there are none.
    """
    runs = ranked_runs(df)
    if not columns:
        return None
    axes_data = [axis_positions(runs[c], log=c == "learning_rate") for c in columns + [metric]]
    fig = Figure(figsize=(max(7, 1.8 * (len(columns) + 1)), 5))
    ax = fig.add_subplot()
    cmap = colormaps["viridis" if checkpoints.metric_goal(metric) == "maximize" else "viridis_r"]
    values = runs[metric].to_numpy(float)
    # With many runs a few outliers would squeeze every other colour together, so the colour
    # scale spans the 5th to 95th percentile and values outside it get the end colours.
    clipped = len(values) >= 20
    low, high = np.nanpercentile(values, [5, 95]) if clipped else (np.nanmin(values), np.nanmax(values))
    norm = Normalize(low, high, clip=True)
    alpha = 0.7 if len(runs) < 50 else 0.35
    x = np.arange(len(columns) + 1)
    for i in range(len(runs))[::-1]:  # best run last, so it is drawn on top
        y = [positions[i] for positions, _ in axes_data]
        ax.plot(x, y, color="red" if i == 0 else cmap(norm(values[i])), linewidth=3 if i == 0 else 1.2,
                alpha=1.0 if i == 0 else alpha, zorder=3 if i == 0 else 2)
    for xi, (_, ticks) in zip(x, axes_data):
        ax.axvline(xi, color="black", linewidth=0.8)
        for position, label in ticks:
            ax.text(xi + 0.04, position, label, fontsize=8, va="center", ha="left", zorder=4,
                    bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
    ax.set_xticks(x, [*(f"{c}\n(log)" if c == "learning_rate" else c for c in columns), metric])
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlim(-0.2, len(columns) + 0.6)
    colorbar = fig.colorbar(ScalarMappable(norm, cmap), ax=ax, pad=0.02, extend="both" if clipped else "neither")
    colorbar.set_label(goal_label(metric))
    ax.legend([Line2D([0], [0], color="red", linewidth=3)], [f"best run {runs.iloc[0]['run_id']}"],
              loc="upper left", bbox_to_anchor=(0, -0.12), fontsize=8)
    ax.set_title(f"Hyperparameters of {len(runs)} ranked runs, coloured by {metric}")
    return save_figure(fig, path)


def history_series(history, key):
    points = [(h["step"], h[key]) for h in history if key in h and isinstance(h[key], (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(df, metric, path, count):
    """Plot the training and validation curves of the best `count` runs, from their checkpoints' history.

    Left: train/loss (solid) and val/loss (dashed); right: the ranking metric, or val/cider
    when ranking by val/loss. Returns None when none of the runs has a history.
    """
    runs = ranked_runs(df).head(count)
    score = "val/cider" if metric == "val/loss" else metric
    fig = Figure(figsize=(12, 4.5))
    loss_ax, score_ax = fig.subplots(1, 2)
    colors = colormaps["tab10"]
    drawn = 0
    for i, (_, run) in enumerate(runs.iterrows()):
        try:
            history = checkpoints.read_summary(run["path"]).get("history") or []
        except (OSError, ValueError):
            continue
        label = (f"#{run['rank']} {run['run_id']} ({run['optimizer']}, lr {run['learning_rate']:.2g}, "
                 f"{run['scheduler']})")
        color = colors(i % 10)
        loss_ax.plot(*history_series(history, "train/loss"), color=color, label=label)
        loss_ax.plot(*history_series(history, "val/loss"), "--o", color=color, markersize=3)
        score_ax.plot(*history_series(history, score), "-o", color=color, markersize=3, label=label)
        drawn += bool(history)
    if not drawn:
        return None
    loss_ax.set_title("training (solid) and validation (dashed) loss")
    loss_ax.set_ylabel("cross-entropy loss (nats per token)")
    score_ax.set_title(f"{score} at each validation")
    score_ax.set_ylabel(goal_label(score))
    for ax in (loss_ax, score_ax):
        ax.set_xlabel("optimizer step")
        ax.grid(True, alpha=0.3)
    score_ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Top {len(runs)} runs by {metric}")
    return save_figure(fig, path)


def save_plots(df, metric, out_dir, hyperparameters, curves=5):
    """Write every plot of analyze_sweep_results' table under out_dir; return [(title, path or skip reason)].

    `hyperparameters` are the parallel-coordinates axes; `curves` is how many top runs get curves.
    """
    out_dir = Path(out_dir)
    slug = metric.replace("/", "_")
    plots = [("metric against learning rate", plot_metric_vs_lr(df, metric, out_dir / f"{slug}_vs_lr.png")),
             ("metric by optimizer and scheduler", plot_metric_by_group(df, metric, out_dir / f"{slug}_by_group.png")),
             ("parallel coordinates", plot_parallel_coordinates(df, metric, hyperparameters,
                                                                  out_dir / f"{slug}_parallel.png")),
             ("training and validation curves", plot_curves(df, metric, out_dir / f"{slug}_curves.png", curves))]
    skipped = {"parallel coordinates": "skipped, no hyperparameter has two values among the ranked runs",
               "training and validation curves": "skipped, the top runs' checkpoints have no history"}
    return [(title, path or skipped[title]) for title, path in plots]
