"""Summarize a finished `lightning-3d fit` run from its CSV metrics, as one BENCHMARKS.md row.

Usage:
    python benchmarks/summarize_run.py runs/rt_minilm_baseline [--wall-seconds 812]

Prints the steps and epochs trained, the best and last validation accuracy, the test accuracy
(present when the run used ``test_after_fit``), the median training throughput and the peak
memory.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the newest ``csv/version_*/metrics.csv`` under ``run_dir``."""
    candidates = sorted(
        run_dir.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])
    )
    if not candidates:
        raise SystemExit(f"no csv/version_*/metrics.csv under {run_dir}")
    with open(candidates[-1]) as handle:
        return list(csv.DictReader(handle))


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


def summarize(rows: list[dict[str, str]]) -> dict[str, float | None]:
    val_acc, test_acc = column(rows, "val/acc"), column(rows, "test/acc")
    throughput, memory = column(rows, "train/samples_per_sec"), column(rows, "train/peak_memory_mb")
    train_rows = [row for row in rows if row.get("train/loss")]
    return {
        # global step when the last row was logged: the optimizer steps taken
        "steps": max(column(rows, "step")) if rows else None,
        "epochs_trained": max(column(train_rows, "epoch")) + 1 if train_rows else None,
        "best_val_acc": max(val_acc) if val_acc else None,
        "last_val_acc": val_acc[-1] if val_acc else None,
        "test_acc": test_acc[-1] if test_acc else None,
        "median_samples_per_sec": statistics.median(throughput) if throughput else None,
        "peak_memory_mb": max(memory) if memory else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--wall-seconds", type=float, help="wall time of the run, if measured")
    args = parser.parse_args()
    summary = summarize(read_metrics(args.run_dir))
    if args.wall_seconds is not None:
        summary["wall_minutes"] = args.wall_seconds / 60
    for key, value in summary.items():
        print(f"{key:>24}: {'-' if value is None else round(value, 4)}")


if __name__ == "__main__":
    main()
