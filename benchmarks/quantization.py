"""QATHook against float training and post-training quantization: accuracy, bytes, CPU latency.

MiniLM fine-tuned on a Rotten Tomatoes training subset, each training run in a fresh process:

* ``fp32``: float fine-tuning; then, on copies of the same trained model,
  ``ptq:<preset>``: post-training quantization (``QATConfig`` prepare then convert, no training
  in between), and ``fp32→fbgemm``: PyTorch's dynamic int8 path (``quantize_dynamic``,
  per-channel int8 weights, fbgemm kernels; linear layers only), the fastest int8 path on x86;
* ``qat:<preset>``: the same fine-tuning with ``QATHook(preset, start_step=--qat-start)``,
  converted at the end (``qat:<preset>@fake`` is its accuracy before conversion);
  ``qat:int8_weight_only→fbgemm`` puts that run's float weights through the fbgemm path.

Presets: ``int8_dynamic_act_int4_weight`` (int4 weights per group of 32, int8 activations) and
``int8_weight_only`` (int8 per row); embeddings are quantized too (weights only), the
classifier and the pooler stay float. Columns: test accuracy on the whole test split, the
exported file in MiB (int4 packed two per byte), and CPU inference latency at batch 1 and 32
(sequence length ``--max-length``), timed round-robin in one process: fp32 and fbgemm on the
seed-0 fp32 export, each preset on that export quantized (the same tensors as its PTQ and QAT
rows; speed depends on the format, not the values).

Usage::

    python benchmarks/quantization.py            # the figures in BENCHMARKS.md
    python benchmarks/quantization.py --seeds 0 --presets int8_weight_only
    python benchmarks/quantization.py --summarize benchmarks/results/quantization*.json

Results are printed as a Markdown table and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from pruning import (
    add_run_arguments,
    by_setup,
    latency_cells,
    round_robin_latency,
    run_benchmark,
    timed_fit,
)

PRESETS = ("int8_dynamic_act_int4_weight", "int8_weight_only")
FBGEMM = "→fbgemm"


def fbgemm_int8(model: Any) -> Any:
    """PyTorch's dynamic int8 quantization of the linear layers (per-channel weights), after
    swapping any fake-quantized module back to a plain one (same weights)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    unwrap = QATConfig(step="convert")
    quantize_(model, unwrap, filter_fn=lambda module, fqn: hasattr(module, "weight_fake_quantizer"))
    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})


def serialized_mib(model: Any) -> float:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def run_one(setup: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    import lightning.pytorch as pl

    from lightning_3d.callbacks import QATHook
    from lightning_3d.pruning import DEFAULT_EXCLUDE
    from lightning_3d.quantization import QuantizationRecipe, export_quantized, prepare
    from lightning_3d.quantization import select_modules as selected

    preset = setup.removeprefix("qat:") if setup.startswith("qat:") else None
    hook = QATHook(preset, start_step=args.qat_start, convert_at_end=False) if preset else None
    task, data, trainer, train_seconds, _ = timed_fit(
        args, seed, lambda task: [hook] if hook else []
    )

    tester = pl.Trainer(  # no callbacks: a QATHook must not touch the fbgemm copies
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )

    def accuracy(module: Any, evaluator: Any = trainer) -> float:
        return evaluator.test(module, datamodule=data, verbose=False)[0]["test/acc"]

    def folder(name: str) -> Path:
        path = args.export_dir / f"{name.replace(':', '-')}-seed{seed}"
        shutil.rmtree(path, ignore_errors=True)
        return path

    def row(name: str, acc: float, mib: float, **extra: Any) -> dict[str, Any]:
        return {"setup": name, "seed": seed, "test_acc": acc, "model_mib": mib, **extra}

    timing = {"train_seconds": train_seconds, "steps": trainer.global_step}
    rows = []
    if hook is None:
        path = folder("fp32")
        task.model.save_pretrained(path)
        mib = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        rows.append(row("fp32", accuracy(task), mib, **timing))
        for name in args.presets:
            quantized = copy.deepcopy(task)
            recipe = QuantizationRecipe.from_preset(name)
            prepare(quantized, recipe, selected(quantized, exclude=DEFAULT_EXCLUDE))
            report = export_quantized(quantized.model, folder(f"ptq:{name}"), recipe)
            rows.append(row(f"ptq:{name}", accuracy(quantized), report["file_bytes"] / 2**20))
        dynamic = copy.deepcopy(task)
        dynamic.model = fbgemm_int8(dynamic.model)
        rows.append(row("fp32" + FBGEMM, accuracy(dynamic, tester), serialized_mib(dynamic.model)))
        return rows
    if preset == "int8_weight_only":
        dynamic = copy.deepcopy(task)
        dynamic.model = fbgemm_int8(dynamic.model)
        rows.append(row(setup + FBGEMM, accuracy(dynamic, tester), serialized_mib(dynamic.model)))
    fake_acc = accuracy(task)
    report = hook.export(task.model, folder(setup))
    rows.append(row(setup + "@fake", fake_acc, float("nan")))
    rows.append(row(setup, accuracy(task), report["file_bytes"] / 2**20, **timing))
    return rows


def measure_latency(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median forward time at batch 1 and 32, round-robin over fp32, fbgemm and each preset.

    Speed depends on the format, not on the values: each preset is timed once, on the seed-0
    fp32 export quantized with it, and the figure stands for both its ``ptq:`` and ``qat:``
    rows (the same torchao tensors).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    from lightning_3d.pruning import DEFAULT_EXCLUDE
    from lightning_3d.quantization import QuantizationRecipe, convert, prepare, select_modules

    torch.manual_seed(0)
    fp32 = args.export_dir / f"fp32-seed{args.seeds[0]}"
    models = {"fp32": AutoModelForSequenceClassification.from_pretrained(fp32).eval()}
    models["fp32" + FBGEMM] = fbgemm_int8(copy.deepcopy(models["fp32"]))
    for preset in args.presets:
        model, recipe = copy.deepcopy(models["fp32"]), QuantizationRecipe.from_preset(preset)
        prepare(model, recipe, select_modules(model, exclude=DEFAULT_EXCLUDE))
        convert(model, recipe)
        models[preset] = model
    medians = round_robin_latency(models, args.max_length, args.latency_rounds)
    for preset in args.presets:
        medians[f"ptq:{preset}"] = medians[f"qat:{preset}"] = medians.pop(preset)
    return medians


def order(setup: str) -> tuple[int, str]:
    kinds = ("fp32", "ptq", "qat")
    return kinds.index(setup.split(":")[0].split("→")[0]), setup


def summarize(results: list[dict[str, Any]], latency: dict[str, dict[str, float]]) -> str:
    lines = [
        "| set-up | test acc % (mean ± sd) (runs) | vs fp32 | model MiB | smaller | "
        "latency b1 ms | vs fp32 | latency b32 ms | vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp32 = [100 * r["test_acc"] for r in results if r["setup"] == "fp32"]
    fp32_mib = [r["model_mib"] for r in results if r["setup"] == "fp32"]
    setups = sorted({r["setup"] for r in results}, key=order)
    for setup, runs, accuracy, spread in by_setup(results, setups):
        delta = f"{accuracy - statistics.mean(fp32):+.2f}" if fp32 else "-"
        mib = statistics.mean(r["model_mib"] for r in runs)
        size = "-" if mib != mib else f"{mib:.1f}"  # NaN: the fake-quantized model, not saved
        smaller = "-" if mib != mib or not fp32_mib else f"{statistics.mean(fp32_mib) / mib:.2f}x"
        cells = latency_cells(latency, setup, "fp32")
        lines.append(
            f"| {setup} | {accuracy:.2f} ± {spread:.2f} ({len(runs)}) | {delta} | "
            f"{size} | {smaller} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--qat-start", type=int, default=0, help="step fake quantization starts")
    add_run_arguments(parser, "quantized", "quantization.json")
    args = parser.parse_args()
    setups = ("fp32", *(f"qat:{p}" for p in args.presets))
    run_benchmark(args, __file__, setups, run_one, measure_latency, summarize)


if __name__ == "__main__":
    main()
