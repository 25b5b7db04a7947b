"""Deployable formats of trained runs: bytes, test accuracy and CPU latency per format, beside
PyTorch fp32 eager, and the ONNX Runtime int8 schemes side by side.

Two measurements, each one process that times everything it compares round-robin:

* ``--run NAME:CONFIG:CKPT`` (repeatable): ``lightning-3d export`` of the checkpoint to ``hf``,
  ``onnx``, ``onnx-int8`` (and ``torchao`` when the run has a ``QATHook``), evaluated on the
  whole test split, timed at batch 1 and 32 of 64 tokens; one JSON file per run under
  ``--results`` (``export_<NAME>_<machine>.json``), with the export's wall and CPU seconds.
* ``--schemes NAME:CONFIG:CKPT``: the fp32 ONNX graph of that checkpoint quantized with every
  :data:`~lightning_3d.export.INT8_SCHEMES` entry, evaluated on the test split and timed
  round-robin with PyTorch fp32 eager and ONNX fp32 (``export_int8_schemes_<machine>.json``).

``--summarize FILES`` prints the Markdown tables of BENCHMARKS.md from those files.

Usage::

    python benchmarks/export.py --run main:examples/configs/rt_minilm_baseline.yaml:BEST.ckpt
    python benchmarks/export.py --schemes main:examples/configs/rt_minilm_baseline.yaml:BEST.ckpt
    python benchmarks/export.py --summarize benchmarks/results/export_*_cpu-2c.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning_3d.export import DEFAULT_INT8_SCHEME

RESULTS = Path(__file__).parent / "results"


def _spec(text: str) -> tuple[str, str, str]:
    name, config, checkpoint = text.split(":", 2)
    return name, config, checkpoint


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _portable(report: dict[str, Any]) -> dict[str, Any]:
    """The report with its folders relative to the repository root (results are committed)."""
    root = Path(__file__).resolve().parent.parent

    def relative(path: str | None) -> str | None:
        return None if path is None else os.path.relpath(Path(path).resolve(), root)

    report["output_dir"] = relative(report["output_dir"])
    for row in report["rows"]:
        row["path"] = relative(row["path"])
    return report


def export_run(spec: str, args: argparse.Namespace) -> Path:
    """``lightning-3d export`` of one run in a child process; its report with timings."""
    name, config, checkpoint = _spec(spec)
    text = Path(config).read_text()
    formats = ["hf", "onnx", "onnx-int8", *(["torchao"] if "QATHook" in text else [])]
    output = args.export_dir / name
    command = [
        sys.executable, "-m", "lightning_3d.cli", "export", "--config", config,
        "--ckpt_path", checkpoint, "--output", str(output), "--overwrite",
        "--formats", *formats, "--int8_scheme", args.int8_scheme,
        "--latency_rounds", str(args.latency_rounds),
    ]  # fmt: skip
    cpu, started = _children_cpu_seconds(), time.perf_counter()
    subprocess.run(command, check=True)
    report = _portable(json.loads((output / "report.json").read_text()))
    report.update(
        run=name,
        config=config,
        checkpoint=Path(checkpoint).name,
        int8_scheme=args.int8_scheme,
        export_wall_seconds=time.perf_counter() - started,
        export_cpu_seconds=_children_cpu_seconds() - cpu,
    )
    target = args.results / f"export_{name}_{args.machine}.json"
    target.write_text(json.dumps(report, indent=1))
    return target


def compare_schemes(spec: str, args: argparse.Namespace) -> Path:
    """Every int8 scheme of one checkpoint's ONNX graph, evaluated and timed side by side."""
    import torch

    from lightning_3d.cli import load_run
    from lightning_3d.export import (
        BASELINE,
        INT8_SCHEMES,
        batches_of,
        dense_float_model,
        evaluate,
        export_onnx,
        latency_inputs,
        onnx_runner,
        quantize_onnx_int8,
        round_robin_latency,
        torch_runner,
    )

    name, config, checkpoint = _spec(spec)
    task, data, _, _ = load_run(["--config", config], checkpoint)
    model, _, _ = dense_float_model(task.model)
    data.setup("test")
    test = batches_of(data.test_dataloader())
    data.setup("fit")
    calibration = [(i, m) for i, m, _ in batches_of(data.train_dataloader())][:8]
    runners = {BASELINE: torch_runner(model)}
    sizes = {BASELINE: sum(p.numel() * p.element_size() for p in model.parameters())}
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        export_onnx(model, fp32, (test[0][0][:2], test[0][1][:2]))
        runners["onnx"], sizes["onnx"] = onnx_runner(fp32), fp32.stat().st_size
        for scheme in INT8_SCHEMES:
            target = Path(scratch) / f"{scheme}.onnx"
            quantize_onnx_int8(fp32, target, scheme, calibration)
            runners[scheme], sizes[scheme] = onnx_runner(target), target.stat().st_size
        reference = evaluate(runners[BASELINE], test)["logits"]
        rows = []
        for key, runner in runners.items():
            measured = evaluate(runner, test, reference)
            rows.append(
                {
                    "format": key,
                    "bytes": sizes[key],
                    "accuracy": measured["accuracy"],
                    "agreement": measured["agreement"],
                    "max_logit_difference": measured["max_logit_difference"],
                }
            )
        vocabulary = int(model.config.vocab_size)
        timed = round_robin_latency(runners, latency_inputs(vocabulary), args.latency_rounds)
    for row in rows:
        row["latency_b1_ms"], row["latency_b32_ms"] = (
            timed[row["format"]][1],
            timed[row["format"]][32],
        )
        row["speedup_b1"] = timed[BASELINE][1] / row["latency_b1_ms"]
        row["speedup_b32"] = timed[BASELINE][32] / row["latency_b32_ms"]
    result = {
        "run": name,
        "config": config,
        "checkpoint": Path(checkpoint).name,
        "rows": rows,
        "evaluated_samples": sum(len(i) for i, _, _ in test),
        "threads": torch.get_num_threads(),
    }
    target = args.results / f"export_int8_schemes_{args.machine}.json"
    target.write_text(json.dumps(result, indent=1))
    return target


def _cells(row: dict[str, Any], base: dict[str, Any], dense_accuracy: float) -> list[str]:
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    accuracy = row.get("accuracy")
    return [
        f"{row['bytes'] / 2**20:.1f}",
        ratio(base["bytes"] / row["bytes"]),
        "-" if accuracy is None else f"{100 * accuracy:.2f}",
        "-" if accuracy is None else f"{100 * (accuracy - dense_accuracy):+.2f}",
        "-" if row.get("agreement") is None else f"{100 * row['agreement']:.2f}",
        ms(row.get("latency_b1_ms")),
        ratio(row.get("speedup_b1")),
        ms(row.get("latency_b32_ms")),
        ratio(row.get("speedup_b32")),
    ]


def summarize(files: list[Path]) -> str:
    """The tables of BENCHMARKS.md: one line per run and format; the int8 schemes."""
    reports = [json.loads(f.read_text()) for f in files]
    runs = [r for r in reports if "output_dir" in r]
    schemes = [r for r in reports if "output_dir" not in r]
    main = next((r for r in runs if r["run"] == "main"), runs[0] if runs else None)
    dense = main["rows"][0]["accuracy"] if main else 0.0
    header = (
        "| run | format | MiB | smaller | test acc % | vs main fp32 | agreement % | "
        "b1 ms | vs fp32 | b32 ms | vs fp32 |"
    )
    lines = [header, "|" + "---|" * 11]
    for report in runs:
        base = report["rows"][0]
        for row in report["rows"]:
            lines.append(f"| {report['run']} | {row['format']} | " + " | ".join(
                _cells(row, base, dense)) + " |")  # fmt: skip
    for report in runs:
        lines.append(
            f"\n`{report['run']}`: export {report['export_wall_seconds']:.0f} s wall, "
            f"{report['export_cpu_seconds']:.0f} s CPU; " + "; ".join(report["notes"])
        )
    for report in schemes:
        own = report["rows"][0]["accuracy"]
        title = f"int8 schemes on `{report['run']}` ({report['evaluated_samples']} test rows):"
        scheme_header = header.replace("| run | format", "| int8 scheme").replace(
            "vs main fp32", "vs fp32 acc"
        )
        lines += ["", title, "", scheme_header, "|" + "---|" * 10]
        base = report["rows"][0]
        for row in report["rows"]:
            lines.append(f"| {row['format']} | " + " | ".join(_cells(row, base, own)) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", default=[], help="NAME:CONFIG:CKPT")
    parser.add_argument("--schemes", help="NAME:CONFIG:CKPT: compare the int8 schemes")
    parser.add_argument("--summarize", nargs="+", type=Path)
    parser.add_argument("--int8-scheme", default=DEFAULT_INT8_SCHEME)
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--machine", default="cpu-2c")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--export-dir", type=Path, default=RESULTS / "exported")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    args.results.mkdir(parents=True, exist_ok=True)
    written = [export_run(spec, args) for spec in args.run]
    if args.schemes:
        written.append(compare_schemes(args.schemes, args))
    print(summarize(written))


if __name__ == "__main__":
    main()
