"""The ablation table: what each axis buys alone, and what the co-optimized plan buys together.

MiniLM fine-tuned on a Rotten Tomatoes training subset, each run a :class:`ThreeDPlan` in a
fresh process (seeds ``--seeds``):

* ``Standard``: ``ThreeDPlan()``, plain fine-tuning;
* ``DataOpt``: ``data_budget`` (the curriculum keeps that share of the samples each epoch,
  chosen by loss within each class, scored before the first epoch by the signal pass);
* ``ParamOpt``: ``trainable`` (the freezer keeps that share of the parameters training, chosen
  from the signal pass's gradient statistics before the first step);
* ``ModelOpt``: ``sparsity`` + ``weight_bits`` (pruning of the transformer blocks' linear
  weights to half of the run, QAT from ``qat_start``, int weights at the end);
* ``3D``: all of them in one plan.

Columns: test accuracy on the whole test split (mean ± sd over seeds), the fit's wall time
(signal pass included), trainable parameters at the end of training, the peak resident memory
the fit adds (sampled from ``/proc`` every 5 ms), the exported model (``save_pretrained``
safetensors, or the QAT export with int4 packed two per byte) and CPU inference latency at batch
1 and 32 (sequence length ``--max-length``) of the seed-0 exports, timed round-robin in one
process. Ratios are against ``Standard``, measured side by side in the same run.

It also draws accuracy against training time and against model bytes (the Pareto view) to
``--plot``, logs the table and the plot to W&B (offline without credentials), and with
``--write`` replaces the ablation section of BENCHMARKS.md.

Usage::

    python benchmarks/ablation.py --write                  # the figures in BENCHMARKS.md
    python benchmarks/ablation.py --seeds 0 --setups Standard 3D
    python benchmarks/ablation.py --summarize benchmarks/results/ablation*.json --write
"""

from __future__ import annotations

import argparse
import re
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

SETUPS = ("Standard", "DataOpt", "ParamOpt", "ModelOpt", "3D")
AXES_OF = {
    "Standard": (),
    "DataOpt": ("data_budget",),
    "ParamOpt": ("trainable",),
    "ModelOpt": ("sparsity", "weight_bits"),
    "3D": ("data_budget", "trainable", "sparsity", "weight_bits"),
}
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"
REPOSITORY = Path(__file__).resolve().parents[1]


def plan_for(setup: str, args: argparse.Namespace) -> Any:
    from lightning_3d.plan import ThreeDPlan

    chosen = {name: getattr(args, name) for name in AXES_OF[setup]}
    return ThreeDPlan(
        **chosen, prune_end=args.prune_end, qat_start=args.qat_start, seed=args.data_seed
    )


def run_one(setup: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from lightning.pytorch import Callback

    from lightning_3d.callbacks import QATHook

    trainable: list[int] = []

    class CountTrainable(Callback):  # before conversion at on_fit_end
        def on_train_end(self, trainer: Any, module: Any) -> None:
            trainable.append(sum(p.numel() for p in module.parameters() if p.requires_grad))

    plan = plan_for(setup, args)
    task, data, trainer, seconds, peak_mib = timed_fit(
        args, seed, lambda task: [*plan.callbacks(), CountTrainable()]
    )
    accuracy = trainer.test(task, datamodule=data, verbose=False)[0]["test/acc"]
    folder = args.export_dir / f"{setup}-seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    qat = next((c for c in trainer.callbacks if isinstance(c, QATHook)), None)
    if qat is not None:
        model_bytes = qat.export(task.model, folder)["file_bytes"]
    else:
        task.model.save_pretrained(folder)
        model_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    if seed != args.seeds[0]:
        shutil.rmtree(folder)  # latency is measured on the first seed's exports only
    return [
        {
            "setup": setup,
            "seed": seed,
            "test_acc": accuracy,
            "train_seconds": seconds,
            "steps": trainer.global_step,
            "trainable_params": trainable[0],
            "peak_memory_mib": peak_mib,
            "model_mib": model_bytes / 2**20,
        }
    ]


def measure_latency(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median forward time per set-up at batch 1 and 32, round-robin over the seed-0 exports."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lightning_3d.quantization import load_quantized

    torch.manual_seed(0)
    models = {}
    for setup in args.setups:
        folder = args.export_dir / f"{setup}-seed{args.seeds[0]}"
        if "weight_bits" in AXES_OF[setup]:
            models[setup] = load_quantized(folder).eval()
        else:
            models[setup] = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return round_robin_latency(models, args.max_length, args.latency_rounds)


def mean_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.mean(r[key] for r in runs)


def summarize(results: list[dict[str, Any]], latency: dict[str, dict[str, float]]) -> str:
    """The table: one row per set-up, ratios against Standard."""
    lines = [
        "| set-up | test acc % (mean ± sd) (runs) | vs Standard | train s | vs Standard | "
        "trainable M | peak train MiB | vs Standard | model MiB | smaller | "
        "latency b1 ms | speed-up | latency b32 ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = [r for r in results if r["setup"] == "Standard"]
    for setup, runs, accuracy, spread in by_setup(results, SETUPS):

        def versus(key: str, runs: list[dict[str, Any]] = runs, invert: bool = False) -> str:
            if not base:
                return "-"
            ratio = mean_of(runs, key) / mean_of(base, key)
            return f"{1 / ratio:.2f}x" if invert else f"{ratio:.2f}x"

        cells = latency_cells(latency, setup, "Standard")
        kept = (
            f"{100 * mean_of(runs, 'test_acc') / mean_of(base, 'test_acc'):.1f}%" if base else "-"
        )
        lines.append(
            f"| {setup} | {accuracy:.2f} ± {spread:.2f} ({len(runs)}) | {kept} | "
            f"{mean_of(runs, 'train_seconds'):.0f} | {versus('train_seconds')} | "
            f"{mean_of(runs, 'trainable_params') / 1e6:.2f} | "
            f"{mean_of(runs, 'peak_memory_mib'):.0f} | {versus('peak_memory_mib')} | "
            f"{mean_of(runs, 'model_mib'):.1f} | {versus('model_mib', invert=True)} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def claims(results: list[dict[str, Any]], latency: dict[str, dict[str, float]]) -> str:
    """The seed's claims beside what this run measured for 3D against Standard."""
    base = [r for r in results if r["setup"] == "Standard"]
    plan = [r for r in results if r["setup"] == "3D"]
    if not base or not plan:
        return ""
    kept = mean_of(plan, "test_acc") / mean_of(base, "test_acc")
    memory = 1 - mean_of(plan, "peak_memory_mib") / mean_of(base, "peak_memory_mib")
    time = mean_of(plan, "train_seconds") / mean_of(base, "train_seconds")
    size = mean_of(base, "model_mib") / mean_of(plan, "model_mib")
    rows = [
        "| claim | measured (3D against Standard) |",
        "|---|---|",
        f"| at least 98% of the accuracy kept (goal: 99%) | {100 * kept:.1f}% |",
        f"| 40% less training memory | {100 * memory:.0f}% less peak memory added by the fit |",
        f"| (goal) at most 50% of the training time | {100 * time:.0f}% |",
        f"| (goal) a model at least 4x smaller | {size:.2f}x smaller |",
    ]
    for batch in (1, 32):
        key = f"latency_b{batch}_ms"
        if key in latency.get("3D", {}) and key in latency.get("Standard", {}):
            faster = latency["Standard"][key] / latency["3D"][key] - 1
            rows.append(f"| 30% faster inference (batch {batch}, CPU) | {100 * faster:+.0f}% |")
    return "\n".join(rows)


def pareto_plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Accuracy against training time and against model size, one point per set-up (mean,
    with the seeds' spread as error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(11, 4.2))
    for setup, runs, accuracy, spread in by_setup(results, SETUPS):
        for panel, key in zip(panels, ("train_seconds", "model_mib"), strict=True):
            x = mean_of(runs, key)
            panel.errorbar(x, accuracy, yerr=spread, fmt="o", capsize=3)
            panel.annotate(setup, (x, accuracy), textcoords="offset points",
                           xytext=(5, 5))  # fmt: skip
    panels[0].set_xlabel("training wall time (s)")
    panels[1].set_xlabel("exported model (MiB)")
    for panel in panels:
        panel.set_ylabel("test accuracy (%)")
        panel.grid(alpha=0.3)
    figure.suptitle("MiniLM on Rotten Tomatoes: accuracy against cost (up and left is better)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def log_to_wandb(table: str, plot: Path, args: argparse.Namespace) -> None:
    """The table and the plot as one W&B run (offline without credentials)."""
    import os

    import wandb

    from lightning_3d.loggers import wandb_credentials_available

    mode = "online" if wandb_credentials_available() or "WANDB_MODE" in os.environ else "offline"
    settings = {k: str(v) for k, v in vars(args).items()}
    run = wandb.init(
        project="lightning-3d", name="ablation", dir=str(plot.parent), mode=mode, config=settings
    )
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]
    run.log(
        {
            "ablation/table": wandb.Table(columns=rows[0], data=rows[2:]),
            "ablation/pareto": wandb.Image(str(plot)),
        }
    )
    run.finish()


def write_benchmarks(text: str, path: Path = REPOSITORY / "BENCHMARKS.md") -> None:
    """Replace what lies between the ablation markers of BENCHMARKS.md with ``text``."""
    document = path.read_text()
    if BEGIN not in document or END not in document:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section to replace")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", document))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--data-budget", dest="data_budget", type=float, default=0.4)
    parser.add_argument("--trainable", type=float, default=0.1)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--weight-bits", dest="weight_bits", type=int, default=4)
    parser.add_argument("--prune-end", dest="prune_end", type=float, default=0.5)
    parser.add_argument("--qat-start", dest="qat_start", type=float, default=0.75)
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/ablation_pareto.png"))
    parser.add_argument("--write", action="store_true", help="replace BENCHMARKS.md's section")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B")
    add_run_arguments(parser, "ablation", "ablation.json")
    args = parser.parse_args()

    def report(results: list[dict[str, Any]], latency: dict[str, dict[str, float]]) -> str:
        table = summarize(results, latency)
        plot = pareto_plot(results, args.plot)
        if not args.no_wandb:
            log_to_wandb(table, plot, args)
        text = f"{table}\n\n{claims(results, latency)}"
        if args.write:
            write_benchmarks(text)
        return text

    run_benchmark(args, __file__, args.setups, run_one, measure_latency, report)


if __name__ == "__main__":
    main()
