"""Gather ``sweep.csv`` files of several runs into one CSV + Markdown table and one accuracy-vs-GFLOPs plot."""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from dtem_lightning import merge as M
from dtem_lightning.callbacks import interval_columns, plot_tradeoff, tradeoff_series
from dtem_lightning.io import write_csv, write_text

FIXED = ["policy", "r", "gflops", "tokens"]
INTERVAL_NOTE = (
    "d_<metric>: the row's metric minus the d_ref row's at the same r (of the same run), with its paired "
    "bootstrap 95 % interval over the test samples (each run's sweep.md gives the resamples)."
)

LABEL_NOTE = (
    "DTEM (trained): the run's learned embedding, evaluated with hard merging; DTEM (untrained): the same policy "
    "freshly initialised (the control); NoMerge: no merging, the row of every policy at r = 0."
)

CHECKPOINT_NOTE = (
    "X [name]: the policy and weights of the run's test checkpoint name (its sweep.md gives the file), evaluated in "
    "the same test pass with hard merging; NoMerge [name]: that checkpoint's weights without merging."
)

# Published numbers (docs/design.md §13), accuracies as fractions like the sweeps. r is empty where the paper
# states no r; GFLOPs are the papers' (bias-free) figures, within 0.5 % of our convention.
PUBLISHED: dict[str, list[dict[str, object]]] = {
    "deit_s_imagenet": [
        {
            "policy": "DeiT-S (no merging)",
            "r": 0,
            "gflops": 4.6,
            "acc1": 0.7980,
            "ref": "DeiT (Touvron et al. 2021)",
        },
        {"policy": "DTEM", "r": "", "gflops": 2.89, "acc1": 0.7985, "ref": "DTEM abstract: -37.2 % FLOPs"},
        {"policy": "ToMe (trained)", "r": 8, "gflops": 3.4, "acc1": 0.797, "ref": "ToMe (Bolya et al. 2023)"},
        {
            "policy": "ToMe (trained)",
            "r": 13,
            "gflops": 2.7,
            "acc1": 0.794,
            "ref": "ToMe (Bolya et al. 2023)",
        },
        {
            "policy": "ToMe (trained)",
            "r": 16,
            "gflops": 2.3,
            "acc1": 0.791,
            "ref": "ToMe (Bolya et al. 2023)",
        },
        {
            "policy": "ToMe (off-the-shelf)",
            "r": 13,
            "gflops": 2.7,
            "acc1": 0.788,
            "ref": "ToMe (Bolya et al. 2023)",
        },
        {"policy": "MCTF", "r": "", "gflops": 2.6, "acc1": 0.801, "ref": "MCTF (Lee et al. 2024)"},
        {"policy": "DiffRate", "r": "", "gflops": 2.9, "acc1": 0.7954, "ref": "DiffRate (Chen et al. 2023)"},
    ],
}


def find_sweeps(paths: list[str]) -> list[tuple[str, Path]]:
    """(run label, sweep.csv path) for each argument: a file, a folder searched recursively, or ``LABEL=path``.

    The default label is the path of the file's folder relative to the common ``runs``-style root (e.g.
    ``demo/test``), so rows of different runs stay apart.

    Raises:
        FileNotFoundError: an argument names nothing, or a folder holds no sweep.csv.
    """
    found: list[tuple[str, Path]] = []
    for arg in paths:
        label, _, path = arg.rpartition("=") if "=" in arg else ("", "", arg)
        p = Path(path)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(p.rglob("sweep.csv"))
            if not files:
                raise FileNotFoundError(f"no sweep.csv under {p}")
        else:
            raise FileNotFoundError(f"{p} does not exist")
        for f in files:
            name = label or "/".join(f.parent.parts[-2:])
            if label and len(files) > 1:
                name = f"{label}/{f.parent.name}"
            found.append((name, f))
    names = [n for n, _ in found]
    # Two files in one folder would share a label and mix their rows: tell them apart by file name.
    return [(f"{n}/{f.stem}" if names.count(n) > 1 else n, f) for n, f in found]


def _num(v: str) -> object:
    try:
        return int(v)
    except ValueError:
        try:
            return float(v)
        except ValueError:
            return v


def _cell(key: str, value: str) -> object:
    """A sweep.csv cell: ``policy`` as text, ``r`` as an int or a per-block schedule label ("8,4,0"), numbers."""
    if key == "policy":
        return value
    if key == "r" and value != "":
        return M.r_label(M.parse_r(value))
    return _num(value)


def read_rows(sweeps: list[tuple[str, Path]]) -> list[dict[str, object]]:
    """Rows of every sweep with a ``run`` column; numbers parsed, ``r`` an int or a schedule label ("8,4,0").

    Raises:
        ValueError: a file lacks the fixed columns ``policy, r, gflops, tokens``, or has a malformed ``r``.
    """
    rows: list[dict[str, object]] = []
    for run, path in sweeps:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in FIXED if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path} lacks the columns {missing}")
            for row in reader:
                rows.append({"run": run, **{k: _cell(k, v) for k, v in row.items()}})
    return rows


def published_rows(setting: str | None) -> list[dict[str, object]]:
    """Published reference rows for ``setting`` (none when the setting has no published numbers)."""
    if setting is None:
        return []
    if setting not in PUBLISHED:
        raise ValueError(f"unknown setting {setting!r}; known: {sorted(PUBLISHED)}")
    return [{"run": "published", "tokens": "", **row} for row in PUBLISHED[setting]]


def columns(rows: list[dict[str, object]]) -> list[str]:
    """Column order: run, the fixed sweep columns, the metrics in first-seen order, then ``ref``."""
    cols = ["run", *FIXED]
    for row in rows:
        cols += [k for k in row if k not in cols and k != "ref"]
    return cols + (["ref"] if any("ref" in r for r in rows) else [])


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def markdown(rows: list[dict[str, object]], cols: list[str]) -> str:
    """GitHub Markdown table; published rows are marked in the ``run`` column, paired intervals merged into one
    ``d_<metric> [95 % CI]`` column, and a line below says what they are."""
    shown_cols, shown = interval_columns(rows, cols)
    lines = ["| " + " | ".join(shown_cols) + " |", "|" + "---|" * len(shown_cols)]
    for row in shown:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in shown_cols) + " |")
    if shown_cols != cols:
        lines += ["", INTERVAL_NOTE]
    policies = {str(r.get("policy", "")) for r in rows}
    if any("(trained" in p or "(untrained" in p for p in policies):
        lines += ["", LABEL_NOTE]
    if any(p.endswith("]") and " [" in p for p in policies):
        lines += ["", CHECKPOINT_NOTE]
    return "\n".join(lines)


def check_metric(rows: list[dict[str, object]], metric: str) -> None:
    """Refuse to plot sweeps of which some lack ``metric`` (e.g. a segmentation and a classification sweep).

    Raises:
        ValueError: a run has no ``metric`` values; the message names the run and the metrics it has.
    """
    for run in dict.fromkeys(r["run"] for r in rows):
        mine = [r for r in rows if r["run"] == run]
        if all(r.get(metric, "") == "" for r in mine):
            skip = {"run", *FIXED, "d_ref"}
            have = [c for c in mine[0] if c not in skip and not c.startswith("d_")]
            raise ValueError(
                f"sweep {run} has no {metric!r} column (its metrics: {', '.join(have) or 'none'}): one figure "
                "plots one metric, so collect each task's sweeps separately or pass --metric"
            )


def plot(rows: list[dict[str, object]], out: Path, metric: str = "acc1") -> Path:
    """``metric`` vs GFLOPs: one line per (run, policy) of measured rows, stars for published rows, the NoMerge
    level of each run, and a panel of paired differences when the sweeps have ``d_<metric>`` intervals."""
    measured = [r for r in rows if r["run"] != "published"]
    check_metric(measured, metric)
    many = len({r["run"] for r in measured}) > 1
    curves, baselines, differences, reference = tradeoff_series(
        measured, metric, lambda r: f"{r['run']}: {r['policy']}" if many else str(r["policy"])
    )
    stars = []
    for r in rows:
        if r["run"] == "published" and r.get(metric, "") != "":
            label = f"{r['policy']} (published)"
            stars.append(label)
            curves.setdefault(label, []).append((float(r["gflops"]), float(r[metric]), r["r"]))
    return plot_tradeoff(curves, out, metric, tuple(stars), baselines, differences, reference)


def collect(
    paths: list[str], out_dir: str | Path, setting: str | None = None, metric: str = "acc1"
) -> list[dict]:
    """Write ``sweep.csv``, ``sweep.md`` and ``tradeoff.png`` for the given sweeps into ``out_dir``.

    Args:
        paths: sweep.csv files, folders holding them, or ``LABEL=path``.
        out_dir: output folder (created).
        setting: add the published rows of this setting (e.g. ``deit_s_imagenet``), marked ``published``.
        metric: the plotted column.

    Returns:
        The collected rows (measured, then published).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = read_rows(find_sweeps(paths)) + published_rows(setting)
    check_metric([r for r in rows if r["run"] != "published"], metric)  # before anything is written
    cols = columns(rows)
    write_csv(out / "sweep.csv", rows, cols)
    write_text(out / "sweep.md", markdown(rows, cols) + "\n")
    plot(rows, out / "tradeoff.png", metric)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python experiments/collect.py runs/a runs/b/version_0/sweep.csv --out results/x``."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="+", help="sweep.csv files, folders searched for them, or LABEL=path")
    ap.add_argument("--out", required=True, help="output folder for sweep.csv, sweep.md, tradeoff.png")
    ap.add_argument(
        "--setting", choices=sorted(PUBLISHED), help="add the published reference rows of a setting"
    )
    ap.add_argument("--metric", default="acc1", help="column plotted against GFLOPs")
    args = ap.parse_args(argv)
    try:
        rows = collect(args.paths, args.out, args.setting, args.metric)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(markdown(rows, columns(rows)))
    print(f"\nwritten to {args.out}/sweep.csv, sweep.md, tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
