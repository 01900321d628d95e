"""Callbacks: FLOPs logging for fit, the sweep writer (sweep.csv, sweep.md, tradeoff.png, printed table) and the
final ``last.ckpt``."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dtem_lightning.io import atomic_write, write_csv, write_text

FIXED_COLUMNS = ["policy", "r", "gflops", "tokens"]


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log directory (the logger's versioned folder, else the trainer's root)."""
    logger = trainer.logger
    path = getattr(logger, "log_dir", None) if logger is not None else None
    return Path(path or trainer.default_root_dir)


def interval_columns(rows: list[dict[str, Any]], cols: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows for a table to read: each ``d_<m>``, ``d_<m>_lo``, ``d_<m>_hi`` triple becomes one
    column ``d_<m> [95 % CI]`` whose cells read "+0.0123 [-0.0040, +0.0290]" (empty where a row has none)."""
    triples = [c for c in cols if c.startswith("d_") and f"{c}_lo" in cols and f"{c}_hi" in cols]
    if not triples:
        return cols, rows
    out_cols = []
    for c in cols:
        if c in triples:
            out_cols.append(f"{c} [95 % CI]")
        elif not any(c in (f"{t}_lo", f"{t}_hi") for t in triples):
            out_cols.append(c)
    out_rows = []
    for row in rows:
        new = {k: v for k, v in row.items() if k in out_cols}
        for t in triples:
            d, lo, hi = (row.get(k) for k in (t, f"{t}_lo", f"{t}_hi"))
            numbers = all(isinstance(v, int | float) and not math.isnan(v) for v in (d, lo, hi))
            new[f"{t} [95 % CI]"] = f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]" if numbers else ""
        out_rows.append(new)
    return out_cols, out_rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of sweep rows (floats with 4 decimals, None empty, intervals merged into one column)."""
    if not rows:
        return "(empty sweep)"
    cols, rows = interval_columns(rows, list(rows[0]))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = (
            "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v) for v in map(row.get, cols)
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Axis labels in words for the metric columns of the tasks (other columns are shown as they are named).
METRIC_NAMES = {
    "acc1": "top-1 accuracy",
    "acc5": "top-5 accuracy",
    "miou": "mean IoU",
    "pixel_acc": "pixel accuracy",
    "cider": "CIDEr-D",
    "bleu1": "BLEU-1",
    "bleu4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINESTYLES = ("-", "--", "-.", ":")


def metric_name(column: str) -> str:
    """The words for a metric column on an axis ("acc1" -> "top-1 accuracy")."""
    return METRIC_NAMES.get(column, column)


def tag_of(label: str) -> str:
    """A row label as a TensorBoard tag part: letters, digits, ``_ . - =`` ("DTEM (trained)" -> "DTEM_trained")."""
    return re.sub(r"[^A-Za-z0-9_.\-=]+", "_", label).strip("_") or "row"


# Neither y-axis spans less than this many times the widest interval: a difference inside the noise looks small.
MIN_SPAN_INTERVALS = 4.0


def _limits(values: list[float], min_span: float) -> tuple[float, float]:
    """y-limits holding ``values`` with a margin, at least ``min_span`` wide (centred on the values)."""
    lo, hi = min(values), max(values)
    span = max(hi - lo, min_span)
    if span == 0:
        span = 0.1 * abs(hi) or 1.0
    mid = (lo + hi) / 2
    return mid - 0.55 * span, mid + 0.55 * span


def plot_tradeoff(
    curves: dict[str, list[tuple[float, float, object]]],
    out: Path,
    ylabel: str,
    stars: tuple[str, ...] = (),
    baselines: dict[str, float] | None = None,
    differences: dict[str, list[tuple[float, float, float, float]]] | None = None,
    reference: str = "the reference",
) -> Path:
    """Plot ``ylabel`` vs GFLOPs, and below it the differences to a reference row with their intervals.

    Args:
        curves: label -> (gflops, value, r) points: one line each, annotated with r.
        out: PNG file.
        ylabel: the metric.
        stars: labels drawn as unannotated stars (e.g. published numbers).
        baselines: label -> value, drawn as dashed horizontal lines (the NoMerge model); the y-axis holds them.
        differences: label -> (gflops, d, lo, hi) points: a second panel of differences to ``reference`` with
            their intervals as error bars, each in the colour of the curve of the same label.
        reference: what the differences are taken against (names the zero line).

    The top axis spans the values and the baselines; when there are intervals, neither axis spans less than
    :data:`MIN_SPAN_INTERVALS` times the widest one, so a difference inside the noise is drawn small.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def finite(*vs: float) -> bool:
        return all(isinstance(v, int | float) and math.isfinite(v) for v in vs)

    diffs = {k: sorted(p for p in pts if finite(*p)) for k, pts in (differences or {}).items()}
    diffs = {k: pts for k, pts in diffs.items() if pts}
    min_span = MIN_SPAN_INTERVALS * max(
        (hi - lo for pts in diffs.values() for _, _, lo, hi in pts), default=0.0
    )
    if diffs:
        fig, (ax, bx) = plt.subplots(2, 1, figsize=(6, 6.4), sharex=True, height_ratios=[3, 2])
    else:
        fig, ax = plt.subplots(figsize=(6, 4.2))
    colours: dict[str, str] = {}
    styles: dict[str, dict[str, Any]] = {}
    ys: list[float] = []
    for n, (label, pts) in enumerate(curves.items()):
        # Sorted by GFLOPs and value only: r may be an int or a schedule label ("8,4,0"), which do not compare.
        pts = sorted((p for p in pts if finite(p[0], p[1])), key=lambda p: p[:2])
        if not pts:
            continue
        xs, vs = [p[0] for p in pts], [p[1] for p in pts]
        ys += vs
        if label in stars:
            colours[label] = ax.plot(xs, vs, "*", ms=10, label=label)[0].get_color()
            continue
        if label in (baselines or {}) and len(pts) == 1:  # the NoMerge point: drawn with its level line below
            ax.plot(xs, vs, "o", color="0.35", ms=6, zorder=3)
            continue
        # Each curve its own marker and dash, later ones smaller: curves that coincide stay visible.
        style = {"marker": MARKERS[n % len(MARKERS)], "ls": LINESTYLES[n % len(LINESTYLES)]}
        styles[label] = {**style, "ms": max(3.0, 8.0 - 1.2 * n), "lw": max(0.8, 2.2 - 0.3 * n), "alpha": 0.85}
        colours[label] = ax.plot(xs, vs, label=label, **styles[label])[0].get_color()
        for g, m, r in pts:
            ax.annotate(f"r{r}", (g, m), fontsize=7, textcoords="offset points", xytext=(3, 3))
    for label, v in (baselines or {}).items():
        if finite(v):
            ax.axhline(v, color="0.35", ls=(0, (4, 3)), lw=1, label=f"{label} (r = 0)")
            ys.append(v)
    if ys:
        ax.set_ylim(*_limits(ys, min_span))
    ax.set_ylabel(metric_name(ylabel))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if diffs:
        bx.axhline(0.0, color="0.35", ls="--", lw=1, label=f"= {reference}")
        ds = [0.0]
        for label, pts in diffs.items():
            xs, d, lo, hi = (list(v) for v in zip(*pts))
            err = [[max(0.0, a - b) for a, b in zip(d, lo)], [max(0.0, b - a) for a, b in zip(d, hi)]]
            style = styles.get(label, {"marker": "o", "ms": 4})
            bx.errorbar(xs, d, yerr=err, capsize=3, color=colours.get(label), label=label, **style)
            ds += lo + hi + d
        bx.set_ylim(*_limits(ds, min_span))
        bx.set_ylabel(f"{metric_name(ylabel)} − {reference}\n(paired 95 % interval)", fontsize=8)
        bx.grid(alpha=0.3)
        bx.legend(fontsize=7)
        ax = bx
    ax.set_xlabel("GMACs per image (the gflops column)")
    fig.tight_layout()
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(out).suffix[1:] or "png"))
    finally:
        plt.close(fig)
    return out


def tradeoff_series(
    rows: list[dict[str, Any]], metric: str, label: Callable[[dict[str, Any]], str] | None = None
) -> tuple[dict[str, list], dict[str, float], dict[str, list], str]:
    """The arguments of :func:`plot_tradeoff` from sweep rows: curves, NoMerge baselines, differences, reference.

    Args:
        rows: sweep rows (``policy``, ``r``, ``gflops``, ``metric`` and, when present, ``d_<metric>``,
            ``d_<metric>_lo``, ``d_<metric>_hi``, ``d_ref``); empty cells are None or "".
        metric: the plotted column.
        label: row -> curve label (default: its policy).
    """
    label = label or (lambda row: str(row["policy"]))
    d = f"d_{metric}"
    curves: dict[str, list] = {}
    baselines: dict[str, float] = {}
    differences: dict[str, list] = {}
    refs = []
    for row in rows:
        if row.get(metric) in (None, ""):
            continue
        name = label(row)
        curves.setdefault(name, []).append((float(row["gflops"]), float(row[metric]), row["r"]))
        if str(row["policy"]).partition(" [")[0] == "NoMerge":  # a test checkpoint's too: NoMerge [name]
            baselines[name] = float(row[metric])
        if row.get(d) not in (None, ""):
            differences.setdefault(name, []).append(
                (float(row["gflops"]), float(row[d]), float(row[f"{d}_lo"]), float(row[f"{d}_hi"]))
            )
            refs.append(str(row.get("d_ref") or "the reference"))
    ref = refs[0] if len(set(refs)) == 1 else "the reference"
    return curves, baselines, differences, ref if ref == "NoMerge" else f"{ref} at the same r"


def write_sweep(
    rows: list[dict[str, Any]], out_dir: Path, metric: str | None = None, note: str = ""
) -> tuple[Path, Path]:
    """Write ``sweep.csv``, ``sweep.md`` (the table, then ``note``) and ``tradeoff.png`` (``metric`` vs GFLOPs,
    one curve per policy, the NoMerge level, and the paired differences when the rows have them) to ``out_dir``,
    each through :func:`~dtem_lightning.io.atomic_write` (an interrupted write keeps the previous file).

    Returns:
        The paths of sweep.csv and tradeoff.png.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    cols = FIXED_COLUMNS + [c for c in rows[0] if c not in FIXED_COLUMNS]
    csv_path = write_csv(out_dir / "sweep.csv", rows, cols)  # None (no interval) is written as an empty cell
    table = format_table([{c: r.get(c) for c in cols} for r in rows])
    write_text(out_dir / "sweep.md", f"{table}\n" + (f"\n{note}\n" if note else ""))
    metric = metric or cols[len(FIXED_COLUMNS)]
    curves, baselines, differences, reference = tradeoff_series(rows, metric)
    png = plot_tradeoff(curves, out_dir / "tradeoff.png", metric, (), baselines, differences, reference)
    return csv_path, png


def log_sweep(
    loggers: list[Logger], rows: list[dict[str, Any]], figure: Path | None = None, table: str = ""
) -> None:
    """Log a sweep as curves over r: one value per row label and constant r (schedules only in the figure and the
    table), each curve starting at the NoMerge row (r = 0), for every metric column, ``gflops`` and ``tokens``.

    Every logger gets ``sweep/<column>/<label>`` at step r; TensorBoard also a custom-scalars layout with one
    chart per column and a line per label (its CUSTOM SCALARS tab), the trade-off figure as an image and the
    table as text.
    """
    columns = [c for c in rows[0] if c not in ("policy", "r", "d_ref") and not c.endswith(("_lo", "_hi"))]
    base = next((row for row in rows if row["policy"] == "NoMerge"), None)
    points: dict[int, dict[str, dict[str, float]]] = {}  # r -> column -> label -> value
    for row in rows:
        targets = [row["policy"]] if row is not base else [x["policy"] for x in rows if x is not base]
        if not isinstance(row["r"], int):
            continue
        for c in columns:
            v = row.get(c)
            if isinstance(v, int | float) and math.isfinite(v) and not (row is base and c.startswith("d_")):
                for label in targets or [row["policy"]]:
                    points.setdefault(row["r"], {}).setdefault(c, {})[tag_of(label)] = float(v)
    for logger in loggers:
        writer = getattr(logger, "experiment", None) if isinstance(logger, TensorBoardLogger) else None
        for r, by_column in sorted(points.items()):
            logger.log_metrics(
                {f"sweep/{c}/{k}": v for c, vs in by_column.items() for k, v in vs.items()}, step=r
            )
        if writer is not None:
            charts = {c: ["Multiline", [f"sweep/{re.escape(c)}/.*"]] for c in columns}
            writer.add_custom_scalars({"sweep (metric vs r)": charts})
            if figure is not None and figure.is_file():
                from PIL import Image

                with Image.open(figure) as img:
                    writer.add_image("sweep/tradeoff", np.asarray(img.convert("RGB")), dataformats="HWC")
            if table:
                writer.add_text("sweep/table", table)
        logger.save()


class SweepWriter(L.Callback):
    """After ``test``, write the task's r-sweep to ``sweep.csv``, ``sweep.md`` and ``tradeoff.png`` and print the
    table (with the task's ``sweep_note`` on its intervals).

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
        note = getattr(pl_module, "sweep_note", "")
        csv_path, png_path = write_sweep(rows, out, self.metric, note)
        log_sweep(trainer.loggers, rows, png_path, format_table(rows) + (f"\n\n{note}" if note else ""))
        print(f"\n{format_table(rows)}\n" + (f"\n{note}\n" if note else ""))
        print(f"sweep written to {csv_path}, {csv_path.with_name('sweep.md')} and {png_path}")


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
    good checkpoint is kept), except on SIGTERM (:meth:`on_exception`): that stop is a resumable pause.

    It also makes sure the final weights are validated: a fit that reaches ``max_steps`` in mid-epoch would
    stop without validating them, so at that step it asks the trainer to stop, which runs validation first.
    And it warns when a fit ends on ``max_epochs`` before ``max_steps`` (a config made for a larger data set).
    """

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step and trainer.enable_validation:
            # Lightning validates before it stops on should_stop (not when it stops on max_steps).
            trainer.should_stop = True

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """On SIGTERM during a fit (pre-emption, ``docker stop``) write ``last.ckpt`` as the end of a fit does.

        Lightning stops at the end of the current batch by raising ``SIGTERMException``, a ``SystemExit`` that
        would exit 0 without a checkpoint. The checkpoint holds the mid-epoch state, so it resumes; the step and
        its path are recorded on the exception for the CLI, which exits 143. Nothing is written before the first
        step; any other exception writes nothing (the last good checkpoint is kept).
        """
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        exception.dtem_step = trainer.global_step  # type: ignore[attr-defined]
        if trainer.global_step == 0:
            return
        paths = [cb.last_model_path for cb in self._write_last(trainer) if cb.last_model_path]
        exception.dtem_checkpoint = paths[0] if paths else None  # type: ignore[attr-defined]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epochs = trainer.fit_loop.epoch_progress.current.processed
        max_epochs = trainer.max_epochs
        if (
            0 < trainer.global_step < trainer.max_steps
            and max_epochs is not None
            and 0 < max_epochs <= epochs
        ):
            rank_zero_warn(
                f"the fit ended on max_epochs={max_epochs} after {trainer.global_step} of max_steps="
                f"{trainer.max_steps} steps (the data set has fewer batches than the config expects): raise "
                "--trainer.max_epochs (or set it to -1) to train for max_steps"
            )
        self._write_last(trainer)

    @staticmethod
    def _write_last(trainer: L.Trainer) -> list[ModelCheckpoint]:
        """Rewrite ``last.ckpt`` of each checkpoint callback with ``save_last`` (else the first one's); returns
        the callbacks written."""
        callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
        written = [cb for cb in callbacks if cb.save_last] or callbacks[:1]
        for cb in written:
            saves_last = cb.save_last
            cb.save_last = True  # also for "link": a real file, the best checkpoint stays as it is
            try:
                # Lightning's own writer: the version counter, last_model_path and removal of the old file; it
                # writes a temporary file and renames it over last.ckpt (also over a link to the best file).
                # Private methods, pinned by tests/test_pins.py.
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            finally:
                cb.save_last = saves_last
        return written
