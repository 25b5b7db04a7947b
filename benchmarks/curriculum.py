"""CurriculumSampler against plain shuffling: accuracy, training time, time-to-accuracy.

MiniLM fine-tuned on Rotten Tomatoes, three set-ups side by side in one run, each with every seed:

* ``baseline``: a plain shuffled DataLoader, every epoch on all training samples;
* ``curriculum``: ``CurriculumSampler(score="loss", pacing="linear")``: one warm-up epoch on all
  data, then the easiest share of the data, growing to all of it;
* ``curriculum+budget``: the same plus ``budget=0.5`` (after warm-up, the half with the lowest
  loss EMA, class shares kept);
* ``infobatch``: no pacing, ``budget=0.5`` reached by dropping well-learned samples at random,
  the kept ones' losses reweighted so the gradient stays unbiased.

With ``--noise 0.2`` the same runs repeat with 20% of the training labels flipped (validation and
test labels stay clean). Training time excludes validation. Time-to-accuracy is the training time
until validation accuracy first reaches the same seed's baseline final validation accuracy.

Usage::

    python benchmarks/curriculum.py                      # the figures in BENCHMARKS.md
    python benchmarks/curriculum.py --train-samples 0    # the whole training split

Results are printed as a Markdown table and written as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

SETUPS = ("baseline", "curriculum", "curriculum+budget", "infobatch")


def make_curriculum(setup: str, seed: int) -> list[Any]:
    from lightning_3d.callbacks import CurriculumSampler

    pacing = {"pacing": "linear", "start_fraction": 0.5, "full_at": 1.0}
    if setup == "curriculum":
        return [CurriculumSampler(score="loss", seed=seed, **pacing)]
    if setup == "curriculum+budget":
        return [CurriculumSampler(score="loss", budget=0.5, seed=seed, **pacing)]
    if setup == "infobatch":
        return [
            CurriculumSampler(
                budget=0.5, budget_drops="easiest_random", rescale_loss=True, seed=seed
            )
        ]
    return []


def training_clock() -> Any:
    """A callback with the training time so far, validation excluded, and the validation
    accuracy at each check: ``.checks = [(training seconds, val accuracy), ...]``."""
    from lightning.pytorch.callbacks import Callback

    class TrainingClock(Callback):
        def __init__(self) -> None:
            self.elapsed = 0.0
            self.started = 0.0
            self.checks: list[tuple[float, float]] = []

        def on_train_start(self, *args: Any) -> None:
            self.started = time.perf_counter()

        def on_validation_start(self, trainer: Any, *args: Any) -> None:
            if trainer.state.fn == "fit":  # not the validation after training
                self.elapsed += time.perf_counter() - self.started

        def on_validation_end(self, trainer: Any, *args: Any) -> None:
            self.checks.append((self.elapsed, float(trainer.callback_metrics["val/acc"])))
            self.started = time.perf_counter()

        def on_train_end(self, *args: Any) -> None:
            self.elapsed += time.perf_counter() - self.started

    return TrainingClock()


def prepare_data(args: argparse.Namespace, noise: float, tokenizer: Any) -> Any:
    """Rotten Tomatoes with a seeded training subset, optional flipped labels, a val subset."""
    import numpy as np

    from lightning_3d.data import IndexedDataset, RottenTomatoes, flip_labels

    data = RottenTomatoes(
        tokenizer=tokenizer, batch_size=args.batch_size, max_length=args.max_length
    )
    data.setup("fit")
    train, val = data.splits["train"], data.splits["val"]
    rng = np.random.default_rng(args.data_seed)
    chosen = np.arange(len(train))
    if 0 < args.train_samples < len(train):
        chosen = np.sort(rng.choice(len(train), args.train_samples, replace=False))
    labels = [train.labels[i] for i in chosen]
    if noise > 0:
        labels, data.flipped = flip_labels(labels, noise, 2, args.data_seed)
    data.splits["train"] = IndexedDataset([train.input_ids[i] for i in chosen], labels)
    if 0 < args.val_samples < len(val):
        data.splits["val"] = IndexedDataset(
            val.input_ids[: args.val_samples], val.labels[: args.val_samples]
        )
    return data


def run(setup: str, seed: int, noise: float, args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_3d.curriculum import budget_keep
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(seed, verbose=False)
    task = SequenceClassificationTask(learning_rate=args.learning_rate)
    data = prepare_data(args, noise, task.tokenizer)
    clock = training_clock()
    curriculum = make_curriculum(setup, seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        val_check_interval=1.0 / args.checks_per_epoch,
        callbacks=[clock, *curriculum],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    started = time.perf_counter()
    trainer.fit(task, datamodule=data)
    wall = time.perf_counter() - started
    trainer.validate(task, datamodule=data, verbose=False)  # the final model's check
    test = trainer.test(task, datamodule=data, verbose=False)[0]
    result = {
        "setup": setup,
        "seed": seed,
        "noise": noise,
        "test_acc": test["test/acc"],
        "train_seconds": clock.elapsed,
        "wall_seconds": wall,
        "steps": trainer.global_step,
        "checks": clock.checks,
    }
    if setup == "curriculum+budget" and data.flipped:
        # the half the budget drops at the final scores, and how much of it is mislabelled
        kept = set(budget_keep(curriculum[0].state.difficulty(), 0.5).tolist())
        dropped = set(range(len(data.splits["train"]))) - kept
        flipped = set(data.flipped)
        result["dropped_flipped_precision"] = len(dropped & flipped) / max(1, len(dropped))
        result["flipped_dropped_recall"] = len(dropped & flipped) / max(1, len(flipped))
    print(json.dumps({k: v for k, v in result.items() if k != "checks"}), flush=True)
    return result


def time_to_accuracy(run: dict[str, Any], target: float) -> float | None:
    for seconds, accuracy in run["checks"]:
        if accuracy >= target:
            return seconds
    return None


def summarize(results: list[dict[str, Any]]) -> str:
    lines = [
        "| labels | set-up | test acc % (mean ± sd) | training s | vs baseline | "
        "time to baseline val acc (vs baseline time) | reached |",
        "|---|---|---|---|---|---|---|",
    ]
    for noise in sorted({r["noise"] for r in results}):
        base = {r["seed"]: r for r in results if r["noise"] == noise and r["setup"] == "baseline"}
        for setup in SETUPS:
            runs = [r for r in results if r["noise"] == noise and r["setup"] == setup]
            if not runs:
                continue
            accs = [100 * r["test_acc"] for r in runs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            seconds = statistics.mean(r["train_seconds"] for r in runs)
            ratios, reached = [], 0
            for r in runs:
                target = base[r["seed"]]["checks"][-1][1]
                reach = time_to_accuracy(r, target)
                if reach is not None:
                    reached += 1
                    ratios.append(reach / base[r["seed"]]["train_seconds"])
            tta = f"{statistics.mean(ratios):.2f}" if ratios else "never"
            base_seconds = statistics.mean(b["train_seconds"] for b in base.values())
            label = "clean" if noise == 0 else f"{noise:.0%} flipped"
            lines.append(
                f"| {label} | {setup} | {statistics.mean(accs):.2f} ± {spread:.2f} | "
                f"{seconds:.0f} | {seconds / base_seconds:.2f} | {tta} | {reached}/{len(runs)} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--train-samples", type=int, default=2000, help="0: the whole split")
    parser.add_argument("--val-samples", type=int, default=500, help="0: the whole split")
    parser.add_argument("--checks-per-epoch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--data-seed", type=int, default=1234)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/curriculum.json"))
    args = parser.parse_args()

    results = []
    for noise in args.noise:
        for seed in args.seeds:
            for setup in args.setups:
                results.append(run(setup, seed, noise, args))
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(
                    json.dumps(
                        {"args": vars(args) | {"out": str(args.out)}, "runs": results}, indent=1
                    )
                )
    print(summarize(results))


if __name__ == "__main__":
    main()
