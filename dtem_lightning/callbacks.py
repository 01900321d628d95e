"""Callbacks: FLOPs logging for fit, the sweep writer (sweep.csv, tradeoff.png, printed table) and the final
``last.ckpt``."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

FIXED_COLUMNS = ["policy", "r", "gflops", "tokens"]


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log directory (the logger's versioned folder, else the trainer's root)."""
    logger = trainer.logger
    path = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(path or trainer.default_root_dir)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of sweep rows (floats with 4 significant decimals)."""
    if not rows:
        return "(empty sweep)"
    cols = list(rows[0])
    fmt = [f"{v:.4f}" if isinstance(v, float) else str(v) for r in rows for v in r.values()]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i in range(len(rows)):
        lines.append("| " + " | ".join(fmt[i * len(cols) : (i + 1) * len(cols)]) + " |")
    return "\n".join(lines)


def plot_tradeoff(
    curves: dict[str, list[tuple[float, float, object]]], out: Path, ylabel: str, stars: tuple[str, ...] = ()
) -> Path:
    """Plot ``ylabel`` vs GFLOPs: one line per curve (label -> (gflops, value, r) points, annotated with r);
    labels in ``stars`` (e.g. published numbers) are drawn as unannotated stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for label, pts in curves.items():
        # Sorted by GFLOPs and value only: r may be an int or a schedule label ("8,4,0"), which do not compare.
        pts = sorted((p for p in pts if not (math.isnan(p[0]) or math.isnan(p[1]))), key=lambda p: p[:2])
        if not pts:
            continue
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if label in stars:
            ax.plot(xs, ys, "*", ms=10, label=label)
            continue
        ax.plot(xs, ys, marker="o", label=label)
        for g, m, r in pts:
            ax.annotate(f"r{r}", (g, m), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("GFLOPs (GMACs per image)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_sweep(rows: list[dict[str, Any]], out_dir: Path, metric: str | None = None) -> tuple[Path, Path]:
    """Write ``sweep.csv`` and ``tradeoff.png`` (``metric`` vs GFLOPs, one curve per policy) to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = FIXED_COLUMNS + [c for c in rows[0] if c not in FIXED_COLUMNS]
    csv_path = out_dir / "sweep.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    metric = metric or cols[len(FIXED_COLUMNS)]
    curves: dict[str, list[tuple[float, float, object]]] = {}
    for r in rows:
        curves.setdefault(r["policy"], []).append((r["gflops"], r[metric], r["r"]))
    return csv_path, plot_tradeoff(curves, out_dir / "tradeoff.png", metric)


class SweepWriter(L.Callback):
    """After ``test``, write the task's r-sweep to ``sweep.csv`` and ``tradeoff.png`` and print the table.

    Args:
        metric: column plotted against GFLOPs (default: the first metric column).
        out_dir: where to write (default: the run's log directory).
    """

    def __init__(self, metric: str | None = None, out_dir: str | None = None) -> None:
        self.metric, self.out_dir = metric, out_dir

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = getattr(pl_module, "sweep_results", [])
        if not rows:
            return
        out = Path(self.out_dir) if self.out_dir else run_dir(trainer)
        csv_path, png_path = write_sweep(rows, out, self.metric)
        print(f"\n{format_table(rows)}\n\nsweep written to {csv_path} and {png_path}")


class FlopsLogger(L.Callback):
    """Log ``val/gflops`` and ``val/tokens``: the evaluated (hard-merging) model at the policy's own r."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        size = pl_module.input_size_for_flops(trainer)
        if size is None:
            return
        gf = pl_module.gmacs(size)
        tokens = pl_module.policy.token_counts(pl_module.num_input_tokens(size))[-1]
        for logger in trainer.loggers:
            logger.log_metrics({"val/gflops": gf, "val/tokens": tokens}, step=0)
        pl_module.print(
            f"{type(pl_module.policy).__name__} r={pl_module.policy.r}: {gf:.3f} GFLOPs, {tokens} tokens"
        )


class FinalCheckpoint(L.Callback):
    """At the end of a fit, write the final weights to ``last.ckpt``, whatever the monitored metric did.

    Lightning 2.6's ``ModelCheckpoint(save_last=True)`` refreshes ``last.ckpt`` only together with a top-k save,
    so a run whose last epochs did not improve the metric ends with ``last.ckpt`` at an older step, and every
    ``dtem test --ckpt_path …/last.ckpt`` would evaluate stale weights. The ``dtem`` CLI always adds this
    callback. Each checkpoint callback with ``save_last`` rewrites its ``last.ckpt`` (its best-by-metric files
    are untouched; with ``save_last: link`` the link is replaced by a file); when none has ``save_last``, the
    first checkpoint callback's folder gets one. A fit that stops on an exception writes nothing here (the last
    good checkpoint is kept).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        for cb in [cb for cb in callbacks if cb.save_last] or callbacks[:1]:
            saves_last = cb.save_last
            cb.save_last = True  # also for "link": a real file, the best checkpoint stays as it is
            try:
                # Lightning's own writer: the version counter, last_model_path and removal of the old file; it
                # writes a temporary file and renames it over last.ckpt (also over a link to the best file).
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            finally:
                cb.save_last = saves_last
