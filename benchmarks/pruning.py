"""ProgressivePruner against dense fine-tuning and Lightning's ``ModelPruning``: accuracy, model
bytes, CPU inference latency.

MiniLM fine-tuned on a Rotten Tomatoes training subset, each run in a fresh process:

* ``dense``: no pruning;
* ``magnitude@S`` / ``movement@S``: ``ProgressivePruner(target_sparsity=S)``, unstructured per
  tensor, cubic schedule from ``--start`` to ``--end`` (mask updates every ``--frequency``
  steps), the rest of the run recovers;
* ``2:4``: the same with ``pattern="2:4"`` (magnitude);
* ``structured@S``: ``pattern="heads+neurons"``, ``S`` of the heads and FFN neurons of every
  block, physically removed at export;
* ``lightning@S``: Lightning's ``ModelPruning("l1_unstructured")`` on the same linear weights,
  ``S`` per tensor in one shot at the end of the first epoch, made permanent at the end.

Every pruned set-up prunes the encoder's linear weights (not the embeddings, the pooler or the
classifier). Columns: test accuracy on the whole test split; the sparsity of those weights;
the exported model (``save_pretrained`` safetensors) in MiB, and gzipped (zeros compress, so
this is what unstructured sparsity saves on disk); CPU inference latency at batch 1 and 32
(sequence length ``--max-length``), measured after all training in one process that loads every
seed-0 export and times them round-robin, so the ratios compare like with like.

Usage::

    python benchmarks/pruning.py            # the figures in BENCHMARKS.md
    python benchmarks/pruning.py --seeds 0 --setups dense magnitude@0.5
    python benchmarks/pruning.py --summarize benchmarks/results/pruning*.json  # one table

Results are printed as a Markdown table and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

SETUPS = (
    "dense",
    "magnitude@0.5",
    "magnitude@0.7",
    "magnitude@0.9",
    "movement@0.5",
    "movement@0.7",
    "movement@0.9",
    "2:4",
    "structured@0.3",
    "lightning@0.5",
)
ENCODER_LINEARS = r"encoder\.layer\.\d+\..*\.weight$"


def callbacks_for(setup: str, args: argparse.Namespace, model: Any) -> list[Any]:
    from lightning.pytorch.callbacks import ModelPruning

    from lightning_3d.callbacks import ProgressivePruner

    if setup == "dense":
        return []
    window = {"start_step": args.start, "end_step": args.end, "frequency": args.frequency}
    if setup == "2:4":
        return [ProgressivePruner(pattern="2:4", target_sparsity=None, **window)]
    kind, sparsity = setup.split("@")
    if kind == "structured":
        return [ProgressivePruner(float(sparsity), pattern="heads+neurons", **window)]
    if kind == "lightning":
        return [
            ModelPruning(
                "l1_unstructured",
                amount=float(sparsity),
                parameters_to_prune=encoder_linears(model),
                use_global_unstructured=False,
                apply_pruning=lambda epoch: epoch == 0,
                make_pruning_permanent=True,
                verbose=0,
            )
        ]
    return [ProgressivePruner(float(sparsity), score=kind, include=ENCODER_LINEARS, **window)]


def encoder_linears(model: Any) -> list[tuple[Any, str]]:
    import re

    import torch

    return [
        (module, "weight")
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and re.search(ENCODER_LINEARS, name + ".weight")
    ]


class PeakMemory:
    """The highest resident memory of this process while the ``with`` block runs, above what it
    held when the block began (MiB), sampled every ``interval`` seconds from ``/proc``."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak_mib = 0.0

    @staticmethod
    def resident_mib() -> float:
        import os

        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> PeakMemory:
        import threading

        self._start, self._stop = self.resident_mib(), threading.Event()
        self._highest = self._start

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self._highest = max(self._highest, self.resident_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self._highest, self.resident_mib()) - self._start


def timed_fit(
    args: argparse.Namespace, seed: int, callbacks_of: Callable[[Any], list[Any]]
) -> tuple[Any, Any, Any, float, float]:
    """Seed, build MiniLM and the data subset, fine-tune on the CPU with ``callbacks_of(task)``
    (no validation, logging or checkpoints); return task, data, trainer, the fit seconds and the
    peak resident memory the fit added (MiB, :class:`PeakMemory`)."""
    import lightning.pytorch as pl

    sys.path.insert(0, str(Path(__file__).parent))
    from curriculum import prepare_data

    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(seed, verbose=False)
    task = SequenceClassificationTask(learning_rate=args.learning_rate)
    data = prepare_data(args, 0.0, task.tokenizer)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=callbacks_of(task),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    with PeakMemory() as memory:
        started = time.perf_counter()
        trainer.fit(task, datamodule=data)
        seconds = time.perf_counter() - started
    return task, data, trainer, seconds, memory.peak_mib


def run_one(setup: str, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    from lightning_3d.callbacks import ProgressivePruner

    task, data, trainer, train_seconds, _ = timed_fit(
        args, seed, lambda task: callbacks_for(setup, args, task.model)
    )
    test = trainer.test(task, datamodule=data, verbose=False)[0]
    weights = [module.weight for module, _ in encoder_linears(task.model)]
    sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    folder = args.export_dir / f"{setup}-seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    pruner = next((c for c in trainer.callbacks if isinstance(c, ProgressivePruner)), None)
    model = pruner.export(task, folder) if pruner else task.model
    if pruner is None:
        model.save_pretrained(folder)
    safetensors = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    gzipped = sum(len(gzip.compress(f.read_bytes(), 6)) for f in folder.glob("*.safetensors"))
    if seed != args.seeds[0]:
        shutil.rmtree(folder)  # latency is measured on the first seed's exports only
    return [
        {
            "setup": setup,
            "seed": seed,
            "test_acc": test["test/acc"],
            "sparsity": sparsity,
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_mib": safetensors / 2**20,
            "gzip_mib": gzipped / 2**20,
            "train_seconds": train_seconds,
            "steps": trainer.global_step,
        }
    ]


def measure_latency(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median forward time per set-up at batch 1 and 32, round-robin over the seed-0 exports."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lightning_3d.pruning import load_pruned

    torch.manual_seed(0)
    models = {}
    for setup in args.setups:
        folder = args.export_dir / f"{setup}-seed{args.seeds[0]}"
        if setup.startswith("structured"):
            models[setup] = load_pruned(folder)
        else:
            models[setup] = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    return round_robin_latency(models, args.max_length, args.latency_rounds)


def round_robin_latency(models: dict[str, Any], length: int, rounds: int) -> dict[str, Any]:
    """Median forward time in ms of each model at batch 1 and 32 (``length`` tokens), the models
    timed in turn ``rounds`` times (:func:`lightning_3d.export.round_robin_latency`)."""
    from lightning_3d.export import latency_inputs, torch_runner
    from lightning_3d.export import round_robin_latency as timed_in_turn

    runners = {setup: torch_runner(model) for setup, model in models.items()}
    medians = timed_in_turn(runners, latency_inputs(20000, length), rounds)
    return {
        s: {f"latency_b{b}_ms": ms for b, ms in by_batch.items()} for s, by_batch in medians.items()
    }


def by_setup(
    results: list[dict[str, Any]], setups: Iterable[str]
) -> Iterator[tuple[str, list[dict[str, Any]], float, float]]:
    """Each set-up of ``setups`` that has runs, in that order: its runs and their test accuracy
    in % (mean, and sample standard deviation; 0 for one run)."""
    for setup in setups:
        runs = [r for r in results if r["setup"] == setup]
        if runs:
            accs = [100 * r["test_acc"] for r in runs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            yield setup, runs, statistics.mean(accs), spread


def latency_cells(latency: dict[str, dict[str, float]], setup: str, reference: str) -> list[str]:
    """Table cells of ``setup``'s latency at batch 1 and 32: milliseconds and the speed-up over
    ``reference`` (``"-"`` where a figure is missing)."""
    cells = []
    for key in ("latency_b1_ms", "latency_b32_ms"):
        value, base = latency.get(setup, {}).get(key), latency.get(reference, {})
        if value is None:
            cells += ["-", "-"]
            continue
        cells += [f"{value:.1f}", f"{base[key] / value:.2f}x" if key in base else "-"]
    return cells


def summarize(results: list[dict[str, Any]], latency: dict[str, dict[str, float]]) -> str:
    lines = [
        "| set-up | sparsity % | test acc % (mean ± sd) (runs) | vs dense | parameters M | "
        "model MiB | gzip MiB | latency b1 ms | vs dense | latency b32 ms | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = [100 * r["test_acc"] for r in results if r["setup"] == "dense"]
    for setup, runs, accuracy, spread in by_setup(results, SETUPS):
        delta = f"{accuracy - statistics.mean(dense):+.2f}" if dense else "-"
        cells = latency_cells(latency, setup, "dense")
        lines.append(
            f"| {setup} | {100 * statistics.mean(r['sparsity'] for r in runs):.1f} | "
            f"{accuracy:.2f} ± {spread:.2f} ({len(runs)}) | {delta} | "
            f"{statistics.mean(r['parameters'] for r in runs) / 1e6:.2f} | "
            f"{statistics.mean(r['model_mib'] for r in runs):.1f} | "
            f"{statistics.mean(r['gzip_mib'] for r in runs):.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def child(flag: str, *extra: str, script: str = __file__) -> Any:
    """Run ``script`` again in a fresh process with this process's arguments plus ``flag`` and
    ``extra``; return the JSON of its last ``RESULT`` line."""
    command = [sys.executable, script, *sys.argv[1:], flag, *extra]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{flag} {extra} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def add_run_arguments(parser: argparse.ArgumentParser, export_dir: str, out: str) -> None:
    """The fine-tuning, latency and output arguments the model-axis benchmarks share."""
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=1600, help="0: the whole split")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--data-seed", type=int, default=1234)
    parser.add_argument("--latency-rounds", type=int, default=5)
    results = Path("benchmarks/results")
    parser.add_argument("--export-dir", type=Path, default=results / export_dir)
    parser.add_argument("--out", type=Path, default=results / out)
    parser.add_argument(
        "--summarize", type=Path, nargs="+", help="only print the table of these result files"
    )
    parser.add_argument("--one", nargs=2, metavar=("SETUP", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--latency-only", action="store_true", help=argparse.SUPPRESS)


def run_benchmark(
    args: argparse.Namespace,
    script: str,
    setups: Iterable[str],
    run_one: Callable[[str, int, argparse.Namespace], list[dict[str, Any]]],
    measure_latency: Callable[[argparse.Namespace], dict[str, Any]],
    summarize: Callable[[list[dict[str, Any]], dict[str, Any]], str],
) -> None:
    """The model-axis benchmarks' ``main``: print the table of ``--summarize`` files; or, in a
    child, one training run (``--one``) or the latency phase; or run every set-up in ``setups``
    for every seed in fresh processes, save the JSON after each, then time and print."""
    if args.summarize:
        files = [json.loads(path.read_text()) for path in args.summarize]
        latency = {k: v for f in files for k, v in f.get("latency", {}).items()}
        print(summarize([r for f in files for r in f["runs"]], latency))
        return
    args.val_samples = 0  # prepare_data's argument: validation is off (limit_val_batches=0)
    if args.one:  # a child process: one training run, one JSON line of rows
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]), args)), flush=True)
        return
    if args.latency_only:
        print("RESULT " + json.dumps(measure_latency(args)), flush=True)
        return

    def save(results: list[dict[str, Any]], latency: dict[str, Any]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        document = {"args": settings, "runs": results, "latency": latency}
        args.out.write_text(json.dumps(document, indent=1))

    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        for setup in setups:
            rows = child("--one", setup, str(seed), script=script)
            results += rows
            print("\n".join(json.dumps(r) for r in rows), flush=True)
            save(results, {})
    latency = child("--latency-only", script=script)
    save(results, latency)
    print(summarize(results, latency))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--start", type=int, default=10, help="first mask update (step)")
    parser.add_argument("--end", type=int, default=70, help="step of the final sparsity")
    parser.add_argument("--frequency", type=int, default=5, help="steps between mask updates")
    add_run_arguments(parser, "pruned", "pruning.json")
    args = parser.parse_args()
    run_benchmark(args, __file__, args.setups, run_one, measure_latency, summarize)


if __name__ == "__main__":
    main()
