"""What ``CurriculumSampler`` adds to a training step, on one process and on 2 (DDP, gloo).

A small classifier on fixed random points (so the step itself is cheap and the callback's share
shows), trained for ``--epochs`` epochs of ``--samples`` samples at ``--batch-size``, three
set-ups side by side in one run, each in fresh processes, repeated ``--repeats`` times:

* ``plain``: no curriculum, a shuffled ``DataLoader``;
* ``curriculum, gather every batch``: ``CurriculumSampler(score="loss", gather_every=1)``
  (per-sample losses gathered from every rank and copied to the host after every batch);
* ``curriculum, gather every 32``: the default ``gather_every=32``.

Per set-up: the median time of an optimizer step (the ``on_train_batch_start`` to
``on_train_batch_end`` span, which includes the callback's own hooks) over the run's steps after
the first epoch, and its ratio to ``plain``.

``--baseline PYTHON SCRIPT`` also runs the two curriculum set-ups with another build of the
library, in the same round robin: ``PYTHON`` an interpreter whose environment has that build
installed and ``SCRIPT`` that build's copy of this file (for example a ``git worktree`` of an
earlier commit), labelled ``(baseline)``. ``--pin CORE`` runs every 1-process child on that
core (``taskset``), so no set-up gains or loses by where the scheduler puts it.

Usage::

    python benchmarks/curriculum_overhead.py --devices 1 2 --out results.json
    python benchmarks/curriculum_overhead.py --devices 1 --baseline OTHER/bin/python \\
        OTHER_TREE/benchmarks/curriculum_overhead.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SETUPS = {
    "plain": None,
    "curriculum, gather every batch": 1,
    "curriculum, gather every 32": 32,
}


def train(setup: str, args: argparse.Namespace) -> list[float]:
    """One run of ``setup`` on ``args.devices`` processes: the step times of rank 0."""
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_3d.callbacks import CurriculumSampler
    from lightning_3d.sampling import with_curriculum

    torch.set_num_threads(1)

    class Points(torch.utils.data.Dataset):
        def __init__(self) -> None:
            generator = torch.Generator().manual_seed(0)
            self.x = torch.randn(args.samples, 64, generator=generator)

        def __len__(self) -> int:
            return len(self.x)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"x": self.x[i], "labels": int(self.x[i, 0] > 0), "index": i}

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2)
            )

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
            losses = torch.nn.functional.cross_entropy(
                self.net(batch["x"]), batch["labels"], reduction="none"
            )
            return {"loss": losses.mean(), "per_sample_loss": losses.detach(),
                    "index": batch["index"]}  # fmt: skip

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._started = 0.0

        def on_train_batch_start(self, *_: Any) -> None:
            self._started = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, *_: Any) -> None:
            if trainer.current_epoch >= 1:  # after the warm-up epoch the curriculum plans
                self.seconds.append(time.perf_counter() - self._started)

    timer = StepTimer()
    callbacks: list[Any] = [timer]  # last: its end hook runs after the curriculum's
    every = SETUPS[setup]
    if every is not None:
        callbacks.insert(0, CurriculumSampler(score="loss", gather_every=every))
    strategy: Any = "auto"
    if args.devices > 1:
        strategy = DDPStrategy(process_group_backend="gloo")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(Points(), batch_size=args.batch_size, shuffle=True)
    trainer.fit(Classifier(), train_dataloaders=with_curriculum(trainer, loader))
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--baseline", nargs=2, metavar=("PYTHON", "SCRIPT"), default=None)
    parser.add_argument("--pin", type=int, default=None, help="the core of 1-process runs")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child: one run, its step times on the last line
        args.devices = args.devices[0]
        seconds = train(args.one, args)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print("STEPS " + json.dumps(seconds), flush=True)
        return
    runs = {setup: (sys.executable, __file__, setup) for setup in SETUPS}
    if args.baseline:
        python, script = args.baseline
        for setup in SETUPS:
            if SETUPS[setup] is not None:
                runs[f"{setup} (baseline)"] = (python, script, setup)
    results: dict[str, Any] = {}
    for devices in args.devices:
        medians: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(args.repeats):
            for label, (python, script, setup) in runs.items():  # round robin: drift hits all
                command = [python, script, "--one", setup, "--devices", str(devices),
                           "--samples", str(args.samples), "--batch-size", str(args.batch_size),
                           "--epochs", str(args.epochs)]  # fmt: skip
                if args.pin is not None and devices == 1:
                    command = ["taskset", "-c", str(args.pin), *command]
                done = subprocess.run(command, capture_output=True, text=True, check=True)
                line = next(x for x in done.stdout.splitlines() if x.startswith("STEPS "))
                medians[label].append(statistics.median(json.loads(line[6:])))
        results[str(devices)] = {
            label: {"median_s": statistics.median(v), "repeats_s": v}
            for label, v in medians.items()
        }
    print("| processes | set-up | median step ms (repeats) | vs plain |")
    print("|---|---|---|---|")
    for devices, row in results.items():
        for label, figures in row.items():
            ratio = figures["median_s"] / row["plain"]["median_s"]
            repeats = ", ".join(f"{1e3 * x:.3f}" for x in figures["repeats_s"])
            print(
                f"| {devices} | {label} | {1e3 * figures['median_s']:.3f} ({repeats}) | "
                f"{ratio:.2f}x |"
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
