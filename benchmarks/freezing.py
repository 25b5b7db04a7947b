"""SensitivityFreezer against full fine-tuning and two baselines: accuracy, speed, memory.

MiniLM fine-tuned on a Rotten Tomatoes training subset, every set-up with every seed, each run in
a fresh process so its memory peak is its own:

* ``full``: every parameter trains;
* ``sensitivity@F``: ``SensitivityFreezer(target_trainable=F)`` (Fisher, per tensor) after
  ``--warmup`` steps of measurement;
* ``random@F``: the same budget filled with tensors in a seeded random order;
* ``depth@F``: the same budget kept at the top of the network, so the lowest layers freeze first
  (what Composer's ``LayerFreezing`` does).

All freezing happens at the same step. Columns: test accuracy on the whole test split; step time
(median over the steps after freezing, forward + backward + optimizer); peak training memory (peak
resident memory after freezing minus the resident memory before training began, so the process,
the model weights and the data are not counted); optimizer state bytes at the end.
``full`` gets the same measurements from the same step.

Usage::

    python benchmarks/freezing.py            # the figures in BENCHMARKS.md
    python benchmarks/freezing.py --seeds 0 --setups full sensitivity@0.1
    python benchmarks/freezing.py --summarize benchmarks/results/freezing*.json  # one table

Results are printed as a Markdown table and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETUPS = (
    "full",
    "sensitivity@0.1",
    "random@0.1",
    "depth@0.1",
    "sensitivity@0.03",
    "random@0.03",
    "depth@0.03",
)


def resident_kib(field: str = "VmRSS") -> int:
    """A memory figure of this process from ``/proc/self/status`` in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_memory() -> None:
    """Return freed heap memory to the system, then restart the peak (``VmHWM``) from now."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def probe(from_step: int) -> Any:
    """A callback that, from optimizer step ``from_step`` on, times steps and tracks the peak."""
    from lightning.pytorch.callbacks import Callback

    from lightning_3d.sensitivity import optimizer_state_bytes

    class Probe(Callback):
        def __init__(self) -> None:
            self.step_seconds: list[float] = []
            self.started = 0.0
            self.optimizer_bytes = 0
            self.peak_kib = 0

        def on_train_batch_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == from_step:  # after the freezer acted (it runs first)
                reset_peak_memory()
            elif trainer.global_step > from_step + 2:  # skip the steps right after freezing
                self.step_seconds.append(time.perf_counter() - self.started)

        def on_train_end(self, trainer: Any, *args: Any) -> None:
            self.peak_kib = resident_kib("VmHWM")
            self.optimizer_bytes = sum(optimizer_state_bytes(o) for o in trainer.optimizers)

    return Probe()


def run_one(setup: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl

    sys.path.insert(0, str(Path(__file__).parent))
    from curriculum import prepare_data

    from lightning_3d.callbacks import SensitivityFreezer
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(seed, verbose=False)
    task = SequenceClassificationTask(learning_rate=args.learning_rate)
    data = prepare_data(args, 0.0, task.tokenizer)
    callbacks: list[Any] = []
    if setup != "full":
        metric, fraction = setup.split("@")
        metric = "fisher" if metric == "sensitivity" else metric
        freezer = SensitivityFreezer(
            target_trainable=float(fraction), metric=metric, warmup_steps=args.warmup, seed=seed
        )
        callbacks.append(freezer)
    measure = probe(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        callbacks=[*callbacks, measure],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    gc.collect()
    before_kib = resident_kib()
    trainer.fit(task, datamodule=data)
    test = trainer.test(task, datamodule=data, verbose=False)[0]
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    return {
        "setup": setup,
        "seed": seed,
        "test_acc": test["test/acc"],
        "trainable_fraction": trainable / sum(p.numel() for p in task.parameters()),
        "step_seconds": statistics.median(measure.step_seconds),
        "training_memory_mib": (measure.peak_kib - before_kib) / 1024,
        "peak_rss_mib": measure.peak_kib / 1024,
        "optimizer_state_mib": measure.optimizer_bytes / 2**20,
        "steps": trainer.global_step,
    }


def summarize(results: list[dict[str, Any]]) -> str:
    lines = [
        "| set-up | trainable % | test acc % (mean ± sd) (runs) | step s | speed-up vs full | "
        "training memory MiB | vs full | optimizer state MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    full = {r["seed"]: r for r in results if r["setup"] == "full"}
    for setup in SETUPS:
        runs = [r for r in results if r["setup"] == setup]
        if not runs:
            continue
        accs = [100 * r["test_acc"] for r in runs]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        step = statistics.mean(r["step_seconds"] for r in runs)
        memory = statistics.mean(r["training_memory_mib"] for r in runs)
        paired = [r for r in runs if r["seed"] in full]
        speed = ratio = "-"
        if paired:  # ratios to the same seed's full fine-tuning
            speed = "{:.2f}x".format(
                statistics.mean(full[r["seed"]]["step_seconds"] / r["step_seconds"] for r in paired)
            )
            ratio = "{:.2f}x".format(
                statistics.mean(
                    r["training_memory_mib"] / full[r["seed"]]["training_memory_mib"]
                    for r in paired
                )
            )
        lines.append(
            f"| {setup} | {100 * statistics.mean(r['trainable_fraction'] for r in runs):.1f} | "
            f"{statistics.mean(accs):.2f} ± {spread:.2f} ({len(runs)}) | {step:.3f} | {speed} | "
            f"{memory:.0f} | {ratio} | "
            f"{statistics.mean(r['optimizer_state_mib'] for r in runs):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20, help="optimizer steps before freezing")
    parser.add_argument("--train-samples", type=int, default=1600, help="0: the whole split")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--data-seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/freezing.json"))
    parser.add_argument(
        "--summarize", type=Path, nargs="+", help="only print the table of these result files"
    )
    parser.add_argument("--one", nargs=2, metavar=("SETUP", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.summarize:
        runs = [r for path in args.summarize for r in json.loads(path.read_text())["runs"]]
        print(summarize(runs))
        return
    args.val_samples = 0  # prepare_data's argument: validation is off (limit_val_batches=0)

    if args.one:  # a child process: one run, one JSON line
        print("RESULT " + json.dumps(run_one(args.one[0], int(args.one[1]), args)), flush=True)
        return
    results = []
    for seed in args.seeds:
        for setup in args.setups:
            command = [sys.executable, __file__, *sys.argv[1:], "--one", setup, str(seed)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"{setup} seed {seed} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(json.dumps(results[-1]), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": results}, indent=1)
            )
    print(summarize(results))


if __name__ == "__main__":
    main()
