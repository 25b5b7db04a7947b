"""The ablation table: what each axis of a :class:`~lightning_3d.plan.ThreeDPlan` buys alone, what
they buy together, and what each axis adds to the co-optimized plan.

Regime: all-MiniLM-L6-v2 fine-tuned on the whole Rotten Tomatoes training split
(``--train-samples 0``), 64 tokens, batch 32, AdamW with the main job's recipe
(``examples/configs/rt_minilm_baseline.yaml``: learning rate 5e-5, weight decay 0.01, linear
warm-up over 6% of the run, then linear decay to 0), 2 epochs for ``Standard``, on the CPU.
Validation is off during training; the trained model is tested on the whole test split.

Every set-up is a row of :data:`SETUPS`: the keyword arguments of its ``ThreeDPlan`` (every other
field at its default, ``seed`` the run's seed, so a plan's data order varies by seed as a plain
run's shuffle does; ``--data-seed`` fixes the split), plus an optional ``"steps"``: the fraction of
``Standard``'s optimizer steps (``epochs * ceil(train rows / batch)``) the run may take, which
becomes the trainer's ``max_steps`` (rounded up); the learning-rate schedule then spans those
steps. ``3D-no-data``, ``3D-no-params`` and ``3D-no-model`` are the ``3D`` row less one axis.

Each run (one set-up, one seed) is a fresh process that seeds, builds, fits and measures:

* ``test_acc``: test accuracy in percent (``trainer.test`` on the whole test split);
* ``train_s``: the fit's wall time (the plan's signal pass included) and ``cpu_s``: the CPU
  time of the process during the fit (user + system, every thread);
* ``peak_train_mib``: the highest resident memory during the fit above what the process held
  before it (sampled from ``/proc`` every 5 ms), so gradients, optimizer state, activations;
* ``steps``: optimizer steps done, and the trainable parameters at the end of training;
* the deployed model: :func:`lightning_3d.export.export` to ``onnx-int8`` when the plan has
  ``weight_bits`` (ONNX Runtime's int8 of the trained model: post-training with
  ``quantize_at="export"``, of the QAT-converted model otherwise), else ``onnx`` (the fp32
  graph, pruned heads and neurons removed): ``model_bytes`` of that file, and the exported
  graph's accuracy on the test split (``export_acc``) with its agreement with the trained model.
  With ``quantize_at="export"`` the row's ``test_acc`` is that int8 graph's accuracy (what is
  deployed) and ``trained_acc`` the float model's. Every run exports both graphs
  (``onnx_acc``, ``onnx_int8_acc``): the pair measures what int8 at export costs.

Each run writes ``<SETUP>_seed<N>_<machine>.json`` under ``--results-dir`` (the row, the
settings, the git commit) and is skipped when that file exists (``--force`` reruns it), so a
sweep can be done in parts. The seed-0 export of each set-up stays under ``--export-dir``. A
file with a ``"contended"`` entry (a note saying why) comes from a run whose times cannot be
compared with the other rows': it shared the CPU with other work, or ran on another instance of
the machine that trains at another speed. Its accuracy counts, its times are left out of the
means (``null`` in the summary).

``--latency`` then loads the ONNX file of every set-up's seed-0 export in one process and times
them round-robin at batch 1 and 32 of ``--max-length`` tokens (median of ``--latency-rounds``
turns), into ``latency_<machine>.json``.

``--summarize`` merges the result files of ``--machine`` that trained their set-up's current
row (a row follows the solver's allocation; files of an earlier one are left out, with a
warning) and its latency file into
``--summary`` (JSON), prints a Markdown table (mean ± sd over seeds, ratios against
``Standard``) and the goals of ``3D`` against ``Standard``, draws the Pareto plot (accuracy
against training time and against model bytes) to ``--plot``, and with ``--write`` replaces the
ablation section of BENCHMARKS.md.

The ``3D`` row is the budget solver's: ``--calibrate`` measures this regime's step-cost model
(``cost_model_<machine>.json``) and ``--solve TIME SIZE`` writes the allocation
(``allocation_<machine>.json`` in ``--results-dir``) the row reads, from the prior accuracy
curves or ``--curves``, quantizing where ``--quantize-at`` says (default: at export), for a plan
that trims the vocabulary with ``--vocabulary train`` (the solver then prices the exports
without the embedding rows of tokens the training split never uses; with ``--unseen-tokens
pretrained`` those rows are held apart, untrained, and exported again) and, with
``--embedding-bits 4``, exports the token table in 4-bit blocks (``--unseen-token-bits 4``:
only the rows held apart); ``--group-by-length 50`` groups the 3D row's batches by length and
prices its steps at what a grouped step costs: with ``--calibrate``, a line through the step
periods of 80 steps of a real grouped run against their batches' padded lengths, with a
one-off cost for each new length (:class:`lightning_3d.budget.PaddedStepFit`), applied to
every batch of a whole grouped run and of a whole random one
(``grouped_steps_<machine>.json``, through
:meth:`lightning_3d.budget.CostModel.token_share_of`); without it, the padded tokens grouping
leaves (:func:`lightning_3d.curriculum.token_share` of the training split). ``--summarize``
saves the curves the finished runs measured (``curves_<machine>.json``, see
:func:`measured_curves`).
Until an allocation exists, ``3D`` is every axis off (not run) and the single-axis rows take their
default strengths.

Usage::

    python benchmarks/ablation.py --calibrate           # the solver's step-cost model
    python benchmarks/ablation.py --solve 0.5 0.25 \\
        --curves benchmarks/results/ablation/curves_cpu-2c-b.json   # the 3D row
    python benchmarks/ablation.py                       # every set-up, seeds 0 1 2 / 0
    python benchmarks/ablation.py --setups Standard 3D --seeds 1   # a part of the sweep
    python benchmarks/ablation.py --latency             # after the seed-0 runs
    python benchmarks/ablation.py --summarize --write   # the figures in BENCHMARKS.md
    python benchmarks/ablation.py --summarize --also-results benchmarks/results/ablation/cpu-2c-e
        # ... with the accuracy of set-ups run on another instance in the curves
    python benchmarks/ablation.py --calibrate --solve 0.5 0.25 --vocabulary train \\
        --curves benchmarks/results/ablation/curves_cpu-2c-b.json --machine cpu-2c-xeon \\
        --results-dir benchmarks/results/ablation/cpu-2c-xeon   # another machine's 3D row
    python benchmarks/ablation.py --solve 0.5 0.25 --vocabulary train --unseen-tokens pretrained \
        --embedding-bits 4 --curves benchmarks/results/ablation/curves_cpu-2c-b.json \
        --machine cpu-2c-xeon --results-dir benchmarks/results/ablation/cpu-2c-xeon-held
    python benchmarks/ablation.py --setups Standard DataOpt --seeds 0 --train-samples 64 \\
        --epochs 1 --machine smoke --results-dir SCRATCH --export-dir SCRATCH/exported  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from pruning import PeakMemory, child

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results"
STEPS = "steps"  # the key of a row that is not a ThreeDPlan field
DEFAULT_MACHINE = "cpu-2c-b"


def allocation_path(argv: Sequence[str] | None = None) -> Path:
    """The budget solver's allocation the 3D row trains: ``allocation_<machine>.json`` in the
    results folder (``--calibrate``, then ``--solve 0.5 0.25``), read from the command line
    before the set-ups are built (every run's child process gets the same arguments)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--machine", default=DEFAULT_MACHINE)
    early.add_argument("--results-dir", type=Path, default=RESULTS / "ablation")
    known, _ = early.parse_known_args(sys.argv[1:] if argv is None else argv)
    return known.results_dir / f"allocation_{known.machine}.json"


ALLOCATION = allocation_path()


def solver_row(path: Path = ALLOCATION) -> dict[str, Any]:
    """The 3D row: the solver's strengths (the axes it turned on), heads+neurons pruning, and
    ``"steps"`` when it shortens the run."""
    document = json.loads(path.read_text())
    strengths = document["strengths"]
    off = {"data_budget": 1.0, "trainable": 1.0, "sparsity": 0.0, "weight_bits": None}
    row = {k: v for k, v in strengths.items() if k in off and v != off[k]}
    if strengths.get("distill", 0.0) > 0:
        row["distill"] = strengths["distill"]
    if row.get("sparsity"):
        row["prune_pattern"] = "heads+neurons"
    if row.get("weight_bits") and document.get("quantize_at", "train") != "train":
        row["quantize_at"] = document["quantize_at"]
    if strengths.get(STEPS, 1.0) < 1:
        row[STEPS] = strengths[STEPS]
    if document.get("vocabulary", "full") != "full":
        row["vocabulary"] = document["vocabulary"]
        if document.get("unseen_tokens", "unknown") != "unknown":
            row["unseen_tokens"] = document["unseen_tokens"]
    for bits in ("embedding_bits", "unseen_token_bits"):
        if row.get("weight_bits") and document.get(bits) is not None:
            row[bits] = document[bits]
    if document.get("group_by_length"):
        row["group_by_length"] = document["group_by_length"]
    return row


#: Each set-up: the keyword arguments of its ThreeDPlan, and optionally ``"steps"``, the fraction
#: of Standard's optimizer steps it may take (the trainer's ``max_steps``). The single-axis rows
#: are fixed strengths, the points of the measured accuracy curves the solver reads (it
#: interpolates between them and the axis off); 3D is the solver's allocation for time 0.5 and
#: size 0.25, and the leave-one-out rows measure what each of its axes adds.
THREE_D = solver_row() if ALLOCATION.exists() else {}
MODEL_AXIS = (
    "sparsity", "prune_pattern", "weight_bits", "quantize_at", "vocabulary", "unseen_tokens",
    "embedding_bits", "unseen_token_bits",
)  # fmt: skip
#: The model-axis row: the smallest sparsity of the solver's grid, with int8 weights quantized at
#: export (the deployment this CPU runs fastest).
DEFAULT_MODEL = {
    "sparsity": 0.2,
    "prune_pattern": "heads+neurons",
    "weight_bits": 8,
    "quantize_at": "export",
}
SETUPS: dict[str, dict[str, Any]] = {
    "Standard": {},
    "Standard-half": {STEPS: 0.5},
    "DataOpt": {"data_budget": 0.5},
    # the data axis's other lever: batches of reviews of similar length (windows of 50
    # batches, as Hugging Face's group_by_length), every step of Standard, so each step pads
    # less; what the solver assumes it costs in accuracy (nothing) is measured here
    "DataOpt-grouped": {"group_by_length": 50},
    "ParamOpt": {"trainable": 0.5},
    # the parameter axis by depth from the first step: the embeddings and the lower blocks
    # frozen, so backward stops at the lowest trainable block and keeps no activations below
    # it (what saves memory and backward time; the solver's curves do not price it yet). On
    # all-MiniLM-L6-v2: 25% trainable = blocks 3-5 and the head, 40% = blocks 1-5 and the head
    "ParamOpt-depth-25": {"trainable": 0.25, "freeze_by": "depth", "warmup": 0.0},
    "ParamOpt-depth-40": {"trainable": 0.4, "freeze_by": "depth", "warmup": 0.0},
    "ModelOpt": DEFAULT_MODEL,
    # the model axis inside half of Standard's steps: what pruning costs with fewer steps to
    # recover (the single-axis curves add ModelOpt's loss to Standard-half's, so they cannot
    # see it; 3D trains that short)
    "ModelOpt-half": {**DEFAULT_MODEL, STEPS: 0.5},
    "Distill": {"distill": 0.5},
    # the embedding rows of the tokens in the training data only: the model axis's cut that
    # costs no training steps (the rows it drops get no gradient)
    "VocabOpt": {"vocabulary": "train"},
    "3D": THREE_D,
}
#: The 3D row less one axis each (derived, so they follow the 3D row when it is tuned).
WITHOUT = {
    "3D-no-data": ("data_budget", "group_by_length"),
    "3D-no-params": ("trainable",),
    "3D-no-model": (*MODEL_AXIS, "distill"),
    "3D-no-distill": ("distill",),  # the teacher alone, out of the model axis
}
SETUPS.update(
    {
        name: {k: v for k, v in SETUPS["3D"].items() if k not in keys}
        for name, keys in WITHOUT.items()
    }
)
if "trainable" in THREE_D:  # the parameter axis's other policy: it may freeze pruned tensors
    SETUPS["3D-freeze-any"] = {**THREE_D, "freeze": "any"}
#: What an int8 ONNX export adds beyond its int8 weights, as a share of the fp32 export: the
#: main job's export measured 1 / 3.84 of fp32 (BENCHMARKS.md, Deployment), not 1 / 4.
QUANTIZED_OVERHEAD = 1 / 3.84 - 1 / 4
THREE_SEEDS = ("Standard", "Standard-half", "3D")  # the set-ups run with seeds 0 1 2 by default
SINGLE_AXIS = ("DataOpt", "DataOpt-grouped", "ParamOpt", "ModelOpt", "Distill", "VocabOpt")
BATCHES = (1, 32)  # latency batch sizes
#: Every run exports both: the int8 graph of a float-trained model measures what quantizing at
#: export costs (the ``weight_bits`` point of ``quantize_at="export"`` in the accuracy curves).
EXPORTS = ("onnx", "onnx-int8")
PER_SEED = ("test_acc", "train_s", "cpu_s", "peak_train_mib")  # the summary's per-seed lists
#: Figures a run whose times are not comparable (``"contended"`` in its file) cannot give.
TIMES = ("train_s", "cpu_s")
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


# ----------------------------------------------------------------------------- set-ups
def plan_arguments(setup: str) -> dict[str, Any]:
    """The ThreeDPlan keyword arguments of ``setup`` (its row without ``"steps"``)."""
    return {k: v for k, v in SETUPS[setup].items() if k != STEPS}


def build_plan(setup: str, seed: int = 0) -> Any:
    """``setup``'s plan for the run of ``seed``: its data order and random drops follow the
    run's seed, as a plain run's shuffle does."""
    from lightning_3d.plan import ThreeDPlan

    return ThreeDPlan(**plan_arguments(setup), seed=seed)


def twins(setup: str) -> list[str]:
    """The set-ups with the same row as ``setup`` (itself first): their runs are each other's."""
    others = [name for name in SETUPS if name != setup and SETUPS[name] == SETUPS[setup]]
    return [setup, *others]


def runs_by_setup(documents: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each set-up's runs by seed: its own result files and, for seeds it has none of, those of
    set-ups with the same row (one of them was run, the others not again)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for setup in SETUPS:
        by_seed: dict[int, dict[str, Any]] = {}
        for name in twins(setup):
            for document in documents:
                if document["setup"] == name:
                    by_seed.setdefault(document["seed"], document)
        if by_seed:
            runs[setup] = [by_seed[seed] for seed in sorted(by_seed)]
    return runs


def same_as(setup: str) -> str:
    """The first set-up with the same row as ``setup`` (``setup`` itself when none comes
    before it): such a row is not run again; its results are the other's."""
    return next(other for other in SETUPS if SETUPS[other] == SETUPS[setup])


def export_format(setup: str) -> str:
    """The deployed form: int8 ONNX when the plan quantizes weights, else fp32 ONNX."""
    return "onnx-int8" if SETUPS[setup].get("weight_bits") else "onnx"


def quantized_at_export(setup: str) -> bool:
    """Whether the set-up trains in float and its export quantizes (its accuracy is then the
    int8 export's)."""
    row = SETUPS[setup]
    return bool(row.get("weight_bits")) and row.get("quantize_at") == "export"


def seeds_of(setup: str, args: argparse.Namespace) -> list[int]:
    if args.seeds is not None:
        return list(args.seeds)
    return [0, 1, 2] if setup in THREE_SEEDS else [0]


def result_path(args: argparse.Namespace, setup: str, seed: int) -> Path:
    return args.results_dir / f"{setup}_seed{seed}_{args.machine}.json"


def export_folder(args: argparse.Namespace, setup: str, seed: int) -> Path:
    return args.export_dir / f"{setup}-seed{seed}"


def export_arguments(description: str, export_help: str) -> argparse.Namespace:
    """The arguments of the scripts that measure one finished run's export (``--export``, the
    test split's ``--max-length``, ``--machine`` and ``--results-dir``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--export", type=Path, required=True, help=export_help)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--machine", default="cpu")
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args()


def git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPOSITORY,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip() or "unknown"


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The regime settings a result file records (no folders)."""
    keys = (
        "train_samples",
        "epochs",
        "max_length",
        "batch_size",
        "learning_rate",
        "weight_decay",
        "warmup_ratio",
        "data_seed",
        "machine",
    )
    return {key: getattr(args, key) for key in keys}


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- one run
def quiet_trainer(**settings: Any) -> Any:
    """A CPU Trainer that trains only: no validation, logging, checkpoints or progress bar."""
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        **settings,
    )


def run_one(setup: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seed, build, fit, test and export one set-up (in a child process)."""
    import lightning
    import lightning.pytorch as pl
    import onnxruntime
    import torch
    import transformers
    from curriculum import prepare_data

    from lightning_3d.export import export
    from lightning_3d.tasks import SequenceClassificationTask

    trainable: list[int] = []

    class CountTrainable(pl.Callback):  # at the end of training, before QAT conversion
        def on_train_end(self, trainer: Any, module: Any) -> None:
            trainable.append(sum(p.numel() for p in module.parameters() if p.requires_grad))

    plan = build_plan(setup, seed)
    pl.seed_everything(seed, verbose=False)
    task = SequenceClassificationTask(
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
    )
    data = prepare_data(args, 0.0, task.tokenizer)
    train_rows = len(data.splits["train"])
    standard_steps = args.epochs * math.ceil(train_rows / args.batch_size)
    fraction = SETUPS[setup].get(STEPS)
    max_steps = -1 if fraction is None else math.ceil(fraction * standard_steps)
    trainer = quiet_trainer(
        max_epochs=args.epochs, max_steps=max_steps, callbacks=[*plan.callbacks(), CountTrainable()]
    )
    with PeakMemory() as memory:
        cpu, started = cpu_seconds(), time.perf_counter()
        trainer.fit(task, datamodule=data)
        train_s, cpu_s = time.perf_counter() - started, cpu_seconds() - cpu
    accuracy = trainer.test(task, datamodule=data, verbose=False)[0]["test/acc"]

    kind = export_format(setup)
    folder = export_folder(args, setup, seed)
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    report = export(
        task.model,
        task.tokenizer,
        folder,
        formats=EXPORTS,
        eval_data=data.test_dataloader(),
        latency_rounds=0,  # timed later, every set-up side by side (--latency)
        sequence_length=args.max_length,
        embedding_bits=plan.embedding_bits or 8,
        unseen_token_bits=plan.unseen_token_bits,
    )
    export_s = time.perf_counter() - started
    exported, dense, int8 = report.row(kind), report.row("onnx"), report.row("onnx-int8")
    if seed != 0:
        shutil.rmtree(folder)  # latency is measured on the seed-0 exports only
    trained = 100 * accuracy
    percent = None if exported.accuracy is None else 100 * exported.accuracy
    row = {
        # the deployed model's accuracy when the export quantizes, else the trained model's
        "test_acc": percent if quantized_at_export(setup) else trained,
        "trained_acc": trained,
        "train_s": train_s,
        "cpu_s": cpu_s,
        "peak_train_mib": memory.peak_mib,
        "steps": trainer.global_step,
        "trainable_params": trainable[0] if trainable else None,
        "model_bytes": exported.bytes,
        "export_acc": percent,
        "export_agreement": exported.agreement,
        "onnx_acc": None if dense.accuracy is None else 100 * dense.accuracy,
        "onnx_int8_acc": None if int8.accuracy is None else 100 * int8.accuracy,
        "onnx_int8_bytes": int8.bytes,
        "export_s": export_s,
    }
    run = {
        "train_rows": train_rows,
        "test_rows": report.evaluated_samples,
        "standard_steps": standard_steps,
        "max_steps": max_steps,
        "plan": plan_arguments(setup),
        "export_format": kind,
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
    }
    return {"row": row, "run": run}


def sweep(args: argparse.Namespace) -> int:
    """Every selected (set-up, seed) without a result file, each in a fresh process; returns the
    number of failed runs."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    setups = []
    for setup in args.setups:  # refuse set-ups whose plan cannot be built, before any training
        try:
            build_plan(setup)
            setups.append(setup)
        except (TypeError, ValueError) as error:
            failed.append(setup)
            print(f"{setup}: cannot build its ThreeDPlan ({error}); skipped", flush=True)
    for setup in [s for s in setups if same_as(s) != s]:
        print(f"{setup}: the same plan as {same_as(setup)}; not run again", flush=True)
    pairs = seed_major([s for s in setups if same_as(s) == s], lambda s: seeds_of(s, args))
    failed += record_missing(
        pairs, lambda s, seed: result_path(args, s, seed), args, settings_of(args), __file__
    )
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return len(failed)


def seed_major(
    setups: Sequence[str], seeds_of: Callable[[str], Sequence[int]]
) -> list[tuple[str, int]]:
    """Every (set-up, seed), seed 0 of every set-up first (a complete picture early).

    Example:
        >>> seed_major(["A", "B"], lambda setup: [0, 1] if setup == "A" else [0])
        [('A', 0), ('B', 0), ('A', 1)]
    """
    seeds = sorted({seed for setup in setups for seed in seeds_of(setup)})
    return [(setup, seed) for seed in seeds for setup in setups if seed in seeds_of(setup)]


def record_missing(
    pairs: Sequence[tuple[str, int]],
    target_of: Callable[[str, int], Path],
    args: argparse.Namespace,
    settings: dict[str, Any],
    script: str,
) -> list[str]:
    """:func:`record_run` for each of ``pairs`` without a result file (every one with
    ``args.force``), in order; returns the failed ones as ``"SETUP seed N"``."""
    failed = []
    for setup, seed in pairs:
        target = target_of(setup, seed)
        if target.exists() and not args.force:
            print(f"{setup} seed {seed}: {target.name} exists; skipped", flush=True)
        elif not record_run(setup, seed, target, args.machine, settings, script):
            failed.append(f"{setup} seed {seed}")
    return failed


def record_run(
    setup: str, seed: int, target: Path, machine: str, settings: dict[str, Any], script: str
) -> bool:
    """Run ``script --one SETUP SEED`` in a fresh process and write its result document to
    ``target`` (the set-up, seed, machine, commit, ``settings`` plus the run's own, the row);
    ``False`` (and the error printed) when the run failed."""
    try:
        measured = child("--one", setup, str(seed), script=script)
    except RuntimeError as error:
        print(f"{setup} seed {seed}: failed\n{error}", flush=True)
        return False
    document = {
        "setup": setup,
        "seed": seed,
        "machine": machine,
        "commit": git_commit(),  # per run: a sweep in parts may span commits
        "settings": {**settings, **measured["run"]},
        "row": measured["row"],
    }
    target.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{setup} seed {seed}: {json.dumps(measured['row'])}", flush=True)
    return True


# ----------------------------------------------------------------------------- latency
def measure_latency(args: argparse.Namespace) -> Path:
    """Median ms per call of every set-up's seed-0 ONNX export at batch 1 and 32, timed
    round-robin in this one process; written to ``latency_<machine>.json``."""
    import onnxruntime
    import torch
    from transformers import AutoTokenizer

    from lightning_3d.export import ONNX_FILE, latency_inputs, onnx_runner, round_robin_latency

    runners, formats, vocabulary = {}, {}, None
    for setup in args.setups:
        if same_as(setup) != setup:
            continue
        kind = export_format(setup)
        path = export_folder(args, setup, 0) / kind / ONNX_FILE
        if not path.exists():
            print(f"{setup}: no seed-0 export ({kind}) under --export-dir; not timed", flush=True)
            continue
        runners[setup], formats[setup] = onnx_runner(path), kind
        if vocabulary is None:
            vocabulary = len(AutoTokenizer.from_pretrained(path.parent))
    if not runners:
        raise SystemExit("no seed-0 exports to time: run the set-ups with seed 0 first")
    assert vocabulary is not None
    inputs = latency_inputs(vocabulary, args.max_length, BATCHES)
    timed = round_robin_latency(runners, inputs, args.latency_rounds)
    document = {
        "machine": args.machine,
        "commit": git_commit(),
        "max_length": args.max_length,
        "rounds": args.latency_rounds,
        "threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__,
        "formats": formats,
        "latency": {
            setup: {f"latency_b{b}_ms": ms for b, ms in by_batch.items()}
            for setup, by_batch in timed.items()
        },
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    target = args.results_dir / f"latency_{args.machine}.json"
    target.write_text(json.dumps(document, indent=1) + "\n")
    for setup, by_batch in document["latency"].items():
        print(f"{setup}: " + ", ".join(f"{k} {v:.2f}" for k, v in by_batch.items()), flush=True)
    return target


# ----------------------------------------------------------------------------- summary
def trained_as_now(document: dict[str, Any]) -> bool:
    """Whether a result file trained its set-up's current row (the plan and the run length):
    a row follows the solver's allocation, so files of an earlier allocation are stale."""
    settings = document["settings"]
    fraction = SETUPS[document["setup"]].get(STEPS)
    steps = -1 if fraction is None else math.ceil(fraction * settings["standard_steps"])
    return settings.get("plan") == plan_arguments(document["setup"]) and (
        settings.get("max_steps") == steps
    )


def current_documents(
    args: argparse.Namespace, folder: Path | None = None, machine: str | None = None
) -> list[dict[str, Any]]:
    """The result files of ``--machine`` (or ``machine``; ``"*"``: any) in ``--results-dir``
    (or ``folder``) that trained their set-up's current row."""
    folder, machine = folder or args.results_dir, machine or args.machine
    documents = []
    for path in sorted(folder.glob(f"*_seed*_{machine}.json")):
        document = json.loads(path.read_text())
        if machine != "*" and document.get("machine") != machine:
            continue
        if document.get("setup") not in SETUPS:
            continue
        if not trained_as_now(document):
            print(f"warning: {path.name} trained another {document['setup']} row; left out")
            continue
        documents.append(document)
    return documents


def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The summary document from ``--machine``'s result files and latency file."""
    documents = current_documents(args)
    if not documents:
        raise SystemExit(f"no result files of machine {args.machine!r} in --results-dir")
    latency_path = args.results_dir / f"latency_{args.machine}.json"
    latency = json.loads(latency_path.read_text()) if latency_path.exists() else {}

    regime: dict[str, Any] = {}
    keys = ("train_rows", "test_rows", *settings_of(args), "standard_steps", "threads")
    for key in keys:
        values = sorted({json.dumps(d["settings"].get(key)) for d in documents})
        if len(values) > 1:
            print(f"warning: the result files disagree on {key}: {', '.join(values)}")
        parsed = [json.loads(v) for v in values]
        regime[key] = parsed[0] if len(parsed) == 1 else parsed
    regime["optimizer"] = "AdamW, linear warm-up then linear decay to 0"
    regime["commits"] = sorted({d["commit"] for d in documents})
    regime["latency"] = {
        key: latency.get(key) for key in ("commit", "rounds", "threads", "max_length")
    }

    setups: dict[str, Any] = {}
    every_run = runs_by_setup(documents)  # a leave-one-out row may be the 3D row itself
    for setup in SETUPS:
        runs = every_run.get(setup)
        if not runs:
            continue
        entry: dict[str, Any] = {"seeds": [d["seed"] for d in runs]}
        for key in PER_SEED:  # a contended run's times are null: they are not comparable
            entry[key] = [
                None if key in TIMES and d.get("contended") else d["row"][key] for d in runs
            ]
        first = next((d for d in runs if d["seed"] == 0), None)
        entry["model_bytes"] = None if first is None else int(first["row"]["model_bytes"])
        measured = latency.get("latency", {})
        timed = next((measured[name] for name in twins(setup) if name in measured), {})
        for batch in BATCHES:
            key = f"latency_b{batch}_ms"
            entry[key] = None if timed.get(key) is None else float(timed[key])
        setups[setup] = entry
    # the budget solver's choice for the 3D row, with its predicted training time
    regime["allocation"] = json.loads(ALLOCATION.read_text()) if ALLOCATION.exists() else {}
    return {"regime": regime, "setups": setups}


def measured_values(values: list[float | None] | None) -> list[float]:
    """The values that were measured (a contended run's times are ``None``)."""
    return [value for value in values or [] if value is not None]


def mean(values: list[float | None] | None) -> float | None:
    kept = measured_values(values)
    return statistics.mean(kept) if kept else None


def spread(values: list[float | None]) -> float:
    kept = measured_values(values)
    return statistics.stdev(kept) if len(kept) > 1 else 0.0


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None or base == 0 else value / base


def times(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else f"{value:{spec}}x"


def table(summary: dict[str, Any]) -> str:
    """Markdown: one row per set-up, mean ± sd over seeds, ratios against Standard."""
    setups = summary["setups"]
    base = setups.get("Standard", {})
    lines = [
        "| set-up | seeds | test acc % | kept | train s | vs Standard | CPU s | vs Standard | "
        "peak train MiB | vs Standard | model MiB | smaller | b1 ms | faster | b32 ms | faster |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def measured(entry: dict[str, Any], key: str, spec: str) -> str:
        values = measured_values(entry[key])
        if not values:
            return "-"
        text = f"{statistics.mean(values):{spec}}"
        text = f"{text} ± {spread(values):{spec}}" if len(values) > 1 else text
        left_out = len(entry[key]) - len(values)
        return f"{text} ({len(values)} of {len(entry[key])})" if left_out else text

    def versus(entry: dict[str, Any], key: str) -> str:
        return times(ratio(mean(entry[key]), mean(base.get(key))))

    for name, entry in setups.items():
        kept = ratio(mean(entry["test_acc"]), mean(base.get("test_acc")))
        size, base_size = entry["model_bytes"], base.get("model_bytes")
        cells = [
            name,
            " ".join(map(str, entry["seeds"])),
            measured(entry, "test_acc", ".2f"),
            "-" if kept is None else f"{100 * kept:.1f}%",
            measured(entry, "train_s", ".0f"),
            versus(entry, "train_s"),
            measured(entry, "cpu_s", ".0f"),
            versus(entry, "cpu_s"),
            measured(entry, "peak_train_mib", ".0f"),
            versus(entry, "peak_train_mib"),
            "-" if size is None else f"{size / 2**20:.1f}",
            times(ratio(base_size, size)),
        ]
        for batch in BATCHES:
            key = f"latency_b{batch}_ms"
            cells += [
                "-" if entry[key] is None else f"{entry[key]:.1f}",
                times(ratio(base.get(key), entry[key])),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The goals of 3D against Standard: (goal, measured, met), ``met`` ``None`` where a figure
    is missing."""
    setups = summary["setups"]
    plan, base = setups.get("3D", {}), setups.get("Standard", {})

    def average(entry: dict[str, Any], key: str) -> float | None:
        value = entry.get(key)
        return mean(value) if isinstance(value, list) else value

    def row(
        goal: str,
        value: float | None,
        passes: Callable[[float], bool],
        text: Callable[[float], str],
    ) -> None:
        if value is None:
            rows.append((goal, "not measured", None))
        else:
            rows.append((goal, text(value), bool(passes(value))))

    rows: list[tuple[str, str, bool | None]] = []
    accuracy, plan_time = average(plan, "test_acc"), average(plan, "train_s")

    def versus(key: str, inverse: bool = False) -> float | None:
        """3D over Standard (``inverse``: Standard over 3D)."""
        standard, planned = average(base, key), average(plan, key)
        return ratio(standard, planned) if inverse else ratio(planned, standard)

    row(
        "keeps >= 99% of Standard's accuracy",
        versus("test_acc"),
        lambda v: v >= 0.99,
        lambda v: f"{100 * v:.1f}%",
    )
    row("trains in <= 0.5x Standard's time", versus("train_s"), lambda v: v <= 0.5, times)
    half = average(setups.get("Standard-half", {}), "test_acc")
    row(
        "beats Standard-half's mean accuracy",
        None if accuracy is None or half is None else accuracy - half,
        lambda v: v > 0,
        lambda v: f"{accuracy:.2f}% vs {half:.2f}% ({v:+.2f} points)",
    )
    row("model >= 4x smaller", versus("model_bytes", inverse=True), lambda v: v >= 4, times)
    for batch in BATCHES:
        faster = versus(f"latency_b{batch}_ms", inverse=True)
        row(f">= 2x faster inference at batch {batch}", faster, lambda v: v >= 2, times)
    row("peak training memory <= 0.6x", versus("peak_train_mib"), lambda v: v <= 0.6, times)
    predicted = summary["regime"].get("allocation", {}).get("predicted_train_s")
    row(
        "the solver's predicted training time within 15% of the measured",
        None if predicted is None or plan_time is None else plan_time / predicted,
        lambda v: abs(v - 1) <= 0.15,
        lambda v: f"{plan_time:.0f} s measured, {predicted:.0f} s predicted ({v:.2f}x)",
    )
    for name in SINGLE_AXIS:
        other = setups.get(name, {})
        goal = f"dominates {name} (as accurate, less train time)"
        other_accuracy, other_time = average(other, "test_acc"), average(other, "train_s")
        if accuracy is None or other_accuracy is None:
            rows.append((goal, "not measured", None))
            continue
        if plan_time is None or other_time is None:  # less accurate fails without the times
            text = f"{accuracy:.2f}% vs {other_accuracy:.2f}%, times not comparable"
            rows.append((goal, text, False if accuracy < other_accuracy else None))
            continue
        text = f"{accuracy:.2f}% vs {other_accuracy:.2f}%, {plan_time:.0f} s vs {other_time:.0f} s"
        rows.append((goal, text, accuracy >= other_accuracy and plan_time < other_time))
    return rows


def goals_table(rows: list[tuple[str, str, bool | None]]) -> str:
    lines = ["| goal (3D against Standard) | measured | met |", "|---|---|---|"]
    for goal, measured, met in rows:
        lines.append(f"| {goal} | {measured} | {'-' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines)


def regime_line(summary: dict[str, Any]) -> str:
    regime = summary["regime"]
    return (
        f"Machine {regime['machine']}: {regime['train_rows']} training rows, epochs "
        f"{regime['epochs']}, {regime['max_length']} tokens, batch {regime['batch_size']}, "
        f"AdamW lr {regime['learning_rate']}, tested on {regime['test_rows']} rows; commits "
        + ", ".join(regime["commits"])
        + "."
    )


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and accuracy (higher)."""
    best, kept = -math.inf, []
    for cost, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            kept.append((cost, accuracy))
            best = accuracy
    return kept


def pareto_plot(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy against training time and against model bytes, one point per plan (mean, the
    seeds' spread as error bars; set-ups with one plan share a point and a label), the Pareto
    frontier as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, panels = plt.subplots(1, 2, figsize=(12, 4.6))
    axes = (("train_s", "training wall time (s)"), ("model_bytes", "exported model (MiB)"))
    for panel, (key, label) in zip(panels, axes, strict=True):
        points = []
        for name, entry in summary["setups"].items():
            if name not in SETUPS or same_as(name) != name:
                continue  # drawn with the first set-up of its plan
            accuracy, accuracy_sd = mean(entry["test_acc"]), spread(entry["test_acc"])
            if key == "model_bytes":
                if entry[key] is None:
                    continue
                x, x_sd = entry[key] / 2**20, 0.0
            else:
                x, x_sd = mean(entry[key]), spread(entry[key])
                if x is None:
                    continue
            panel.errorbar(x, accuracy, xerr=x_sd, yerr=accuracy_sd, fmt="o", capsize=3)
            alike = [
                other for other in summary["setups"] if other in SETUPS and same_as(other) == name
            ]
            panel.annotate(
                " = ".join(alike), (x, accuracy), textcoords="offset points", xytext=(5, 5)
            )
            points.append((x, accuracy))
        if len(points) > 1:
            line = frontier(points)
            panel.step(*zip(*line, strict=True), where="post", linestyle="--", color="grey")
        panel.set_xlabel(label)
        panel.set_ylabel("test accuracy (%)")
        panel.grid(alpha=0.3)
    figure.suptitle("MiniLM on Rotten Tomatoes: accuracy against cost (up and left is better)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_benchmarks(text: str, path: Path = REPOSITORY / "BENCHMARKS.md") -> None:
    """Replace what lies between the ablation markers of BENCHMARKS.md with ``text``."""
    document = path.read_text()
    if BEGIN not in document or END not in document:
        raise ValueError(f"{path} has no {BEGIN} ... {END} section to replace")
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", document))


def summarize(args: argparse.Namespace) -> None:
    summary = merge(args)
    args.summary.parent.mkdir(parents=True, exist_ok=True)
    args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    text = "\n\n".join([regime_line(summary), table(summary), goals_table(goals(summary))]).rstrip()
    print(text)
    pareto_plot(summary, args.plot)
    if args.write:
        write_benchmarks(text)
    measured_curves(args)


def measured_curves(args: argparse.Namespace) -> None:
    """The accuracy curves these runs measured, saved for ``--solve`` and
    ``plan.budget.curves``: each single-axis row against Standard, and, since every run exports
    both an fp32 and an int8 graph of one trained model, two readings per float-trained set-up:
    its fp32 exports (the set-up without ``weight_bits``) and its int8 exports (the set-up with
    ``weight_bits=8`` quantized at export). The int8 reading is the fp32 mean plus the mean
    change from fp32 to int8 over the runs that have both, so it is paired run by run even when
    only some runs have an int8 export. Standard's int8 reading gives the ``weight_bits`` point,
    a pruned set-up's fp32 reading the ``sparsity`` point, a frozen set-up's reading the
    ``trainable`` point at the share its freezer reached (whole tensors: not its target), and
    a pruned set-up of fewer steps (``ModelOpt-half``) against the unpruned one of the same
    length a point of the sparsity curve at that length. Rows that trim the vocabulary are left
    out (the curves have no vocabulary axis), and so are rows that freeze by another order than
    the plan's default (``ParamOpt-depth-*``: the curve has one ``trainable`` axis, priced as
    Fisher-ranked freezing), and rows that group batches by length (the solver prices grouping
    by the tokens it saves, its accuracy assumed unchanged: ``DataOpt-grouped`` measures that
    assumption). A row with several names (a
    leave-one-out row equal to another) is read once. ``--also-results`` folders add the runs
    of rows ``--machine`` has none of (of any machine instance: accuracy does not depend on it,
    and no time is read here), so no seed counts twice."""
    from lightning_3d.budget import AXES, AccuracyCurves

    readings: dict[str, list[float]] = {}
    changes: dict[str, list[float]] = {}  # set-up -> int8 - fp32, run by run
    strengths: dict[str, dict[str, Any]] = {}
    documents = current_documents(args)
    own = set(runs_by_setup(documents))  # the rows this machine ran (under any of their names)
    for folder in args.also_results or ():
        documents += [
            document
            for document in current_documents(args, folder, machine="*")
            if document["setup"] not in own
        ]
    # the freezer keeps whole tensors: a trainable point is the share it reached, not the target
    every_parameter = max(
        (d["row"].get("trainable_params", 0) for d in documents if d["setup"] == "Standard"),
        default=0,
    )
    runs = [
        (setup, document)
        for setup, documents_of_row in runs_by_setup(documents).items()
        if same_as(setup) == setup  # a row with several names is read once
        for document in documents_of_row
    ]
    for setup, document in runs:
        if SETUPS[setup].get("vocabulary", "full") != "full":
            continue  # the curves have no vocabulary axis: the solver prices trimming by size
        if SETUPS[setup].get("freeze_by", "fisher") != "fisher":
            continue  # the trainable curve is the plan's default freezer's (Fisher-ranked)
        if SETUPS[setup].get("group_by_length"):
            continue  # the solver prices grouping by its tokens, not by an accuracy curve
        row = document["row"]
        axes = {k: v for k, v in SETUPS[setup].items() if k in AXES}
        if "trainable" in axes and every_parameter and row.get("trainable_params"):
            axes["trainable"] = row["trainable_params"] / every_parameter
        if axes.get("weight_bits") and not quantized_at_export(setup):
            readings.setdefault(setup, []).append(row["test_acc"])  # QAT: quantized in training
            strengths[setup] = axes
            continue
        fp32 = row.get("onnx_acc")  # older files hold the fp32 export's accuracy as export_acc
        if fp32 is None and document["settings"].get("export_format") == "onnx":
            fp32 = row["export_acc"]
        if fp32 is None:
            continue
        float_axes = {k: v for k, v in axes.items() if k != "weight_bits"}
        readings.setdefault(f"{setup} fp32", []).append(fp32)
        strengths[f"{setup} fp32"] = float_axes
        if row.get("onnx_int8_acc") is not None:
            changes.setdefault(setup, []).append(row["onnx_int8_acc"] - fp32)
            strengths[f"{setup} int8"] = {**float_axes, "weight_bits": 8}
    for setup, deltas in changes.items():
        base = statistics.fmean(readings[f"{setup} fp32"])
        readings[f"{setup} int8"] = [base + statistics.fmean(deltas)]
    document = {
        "unit": "percent",
        "setups": {name: {"test_acc": values} for name, values in readings.items()},
        "strengths": strengths,
    }
    try:
        curves = AccuracyCurves.from_ablation_summary(document, baseline="Standard fp32")
    except ValueError as error:
        print(f"no measured accuracy curves yet: {error}")
        return
    path = args.results_dir / f"curves_{args.machine}.json"
    curves.save(path)
    print(f"measured accuracy curves: {json.dumps(curves.to_dict())}")


# ----------------------------------------------------------------------------- budget
def cost_model_path(args: argparse.Namespace) -> Path:
    return args.results_dir / f"cost_model_{args.machine}.json"


def timed_steps(
    args: argparse.Namespace, steps: int = 80, group_by_length: int = 0
) -> list[tuple[int, float]]:
    """The first ``steps`` - 1 steps of a real Standard run (same trainer settings as
    :func:`run_one`) as ``(padded length, seconds)``, what the component timings miss
    included; with ``group_by_length``, of the same run with its batches grouped by length (as
    the ``DataOpt-grouped`` row)."""
    import lightning.pytorch as pl
    from curriculum import prepare_data

    from lightning_3d.plan import ThreeDPlan
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(0, verbose=False)
    task = SequenceClassificationTask(
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
    )
    data = prepare_data(args, 0.0, task.tokenizer)
    starts: list[tuple[int, float]] = []

    class Starts(pl.Callback):  # a step's period: from one batch's start to the next one's
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, *_: Any) -> None:
            starts.append((batch["input_ids"].shape[1], time.perf_counter()))

    callbacks: list[Any] = [Starts()]
    if group_by_length:
        callbacks += ThreeDPlan(group_by_length=group_by_length, seed=0).callbacks()
    trainer = quiet_trainer(max_epochs=args.epochs, max_steps=steps, callbacks=callbacks)
    with PeakMemory():  # the same sampling thread as the measured runs
        trainer.fit(task, datamodule=data)
    return [(length, b - a) for (length, a), (_, b) in itertools.pairwise(starts)]


def run_batch_lengths(args: argparse.Namespace, lengths: Any, window: int = 0) -> list[int]:
    """The padded lengths of every batch of a run of the recipe's epochs over items of
    ``lengths``, shuffled each epoch, grouped by length in windows of ``window`` batches."""
    import torch

    from lightning_3d.curriculum import group_by_length, padded_lengths

    batches: list[int] = []
    for epoch in range(args.epochs):
        generator = torch.Generator().manual_seed(epoch)
        order = torch.randperm(lengths.numel(), generator=generator)
        if window:
            order = group_by_length(order, lengths, args.batch_size, window, generator)
        batches += padded_lengths(lengths, order, args.batch_size).tolist()
    return batches


def grouped_steps_path(args: argparse.Namespace) -> Path:
    return args.results_dir / f"grouped_steps_{args.machine}.json"


def calibrate(args: argparse.Namespace) -> None:
    """Measure the step-cost model of this regime (a training batch of MiniLM, AdamW, int8 fake
    quantization, freezing what the plan's freezer may freeze), scaled to the step period of a
    real run's first steps, and save it as the budget solver's calibration."""
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from curriculum import prepare_data

    from lightning_3d.budget import measure_cost_model
    from lightning_3d.plan import DEFAULT_PRUNE_INCLUDE
    from lightning_3d.sensitivity import DEFAULT_HEAD
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(0, verbose=False)
    task = SequenceClassificationTask(learning_rate=args.learning_rate)
    data = prepare_data(args, 0.0, task.tokenizer)
    batch = next(iter(data.train_dataloader()))

    def loss_fn(model: Any, batch: dict[str, Any]) -> Any:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(logits.logits, batch["labels"])

    pruned, head = re.compile(DEFAULT_PRUNE_INCLUDE), re.compile(DEFAULT_HEAD)

    def frozen(name: str) -> bool:  # what the plan's freezer may freeze: neither pruned nor head
        return not pruned.search(name) and not head.search(name)

    cost = measure_cost_model(
        task.model, batch, loss_fn, repeats=5, qat_preset="int8_weight_only", frozen=frozen
    )
    skip = 5  # the framework's own first steps
    random_steps = timed_steps(args)
    cost = cost.scaled_to(statistics.median(seconds for _, seconds in random_steps[skip:]))
    path = cost_model_path(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    cost.save(path)
    print(json.dumps(cost.to_dict(), indent=1))
    if args.group_by_length:  # what a grouped step costs, measured in the same real loop
        from lightning_3d.budget import PaddedStepFit
        from lightning_3d.sampling import read_lengths

        # the line through one grouped run's steps: its lengths span the random ones' too, and
        # one run is one state of the machine (its speed drifts by 10-20% within minutes, so
        # two runs' means, one after the other, would measure the drift as well)
        grouped_steps = timed_steps(args, group_by_length=args.group_by_length)
        fit = PaddedStepFit.fit([grouped_steps], skip=skip)
        lengths = read_lengths(data.splits["train"], "input_ids")
        random_run = run_batch_lengths(args, lengths)
        grouped_run = run_batch_lengths(args, lengths, args.group_by_length)
        ratio = fit.step_ratio(grouped_run, random_run)
        document = {
            "group_by_length": args.group_by_length,
            "timed_steps": {"random": random_steps, "grouped": grouped_steps, "skip": skip},
            "fit": dataclasses.asdict(fit),
            "mean_padded_length": {
                "random": statistics.fmean(random_run),
                "grouped": statistics.fmean(grouped_run),
            },
            "distinct_lengths": {"random": len(set(random_run)), "grouped": len(set(grouped_run))},
            "step_ratio": ratio,
            "token_share": cost.token_share_of(ratio),
        }
        grouped_steps_path(args).write_text(json.dumps(document, indent=1) + "\n")
        print(json.dumps(document, indent=1))


def export_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The plan settings of ``--unseen-tokens``, ``--embedding-bits``,
    ``--unseen-token-bits`` and ``--group-by-length`` that are not defaults."""
    settings: dict[str, Any] = {}
    if args.group_by_length:
        settings["group_by_length"] = args.group_by_length
    if args.unseen_tokens != "unknown":
        settings["unseen_tokens"] = args.unseen_tokens
    if args.embedding_bits != 8:
        settings["embedding_bits"] = args.embedding_bits
    if args.unseen_token_bits is not None:
        settings["unseen_token_bits"] = args.unseen_token_bits
    return settings


def grouped_token_share(args: argparse.Namespace, train: Any) -> float:
    """The ``token_share`` of ``--group-by-length``: from the step-period fit ``--calibrate``
    measured with the same window (``grouped_steps_<machine>.json``), else the padded-token
    share of the training split's lengths (the same to first order)."""
    from lightning_3d.curriculum import token_share
    from lightning_3d.sampling import read_lengths

    path = grouped_steps_path(args)
    if path.exists():
        measured = json.loads(path.read_text())
        if measured["group_by_length"] == args.group_by_length:
            print(f"grouped steps priced from {path.name}: {measured['token_share']:.3f}")
            return float(measured["token_share"])
        print(f"{path.name} measured another window ({measured['group_by_length']}): ignored")
    lengths = read_lengths(train, "input_ids")
    share = token_share(lengths, args.batch_size, args.group_by_length)
    print(f"grouped steps priced at the training split's padded-token share: {share:.3f}")
    return share


def solve(args: argparse.Namespace) -> None:
    """The budget solver's plan for ``--solve TIME SIZE`` from the calibration file: print the
    allocation, its reasons and the predicted cost, and save them beside the results."""
    from curriculum import prepare_data

    from lightning_3d.plan import ThreeDPlan, freezable_units, parameter_shares
    from lightning_3d.tasks import SequenceClassificationTask
    from lightning_3d.vocabulary import input_embedding_share, trimmed_copy

    time_budget, size_budget = args.solve
    # a combination of settings the plan refuses fails here, before the data and the model
    ThreeDPlan(vocabulary=args.vocabulary, quantize_at=args.quantize_at, **export_settings(args))
    task = SequenceClassificationTask()
    data = prepare_data(args, 0.0, task.tokenizer)
    per_epoch = math.ceil(len(data.splits["train"]) / args.batch_size)
    model, share = task.model, 0.0
    if args.vocabulary == "train":  # priced as the run's VocabularyTrimmer will leave it
        model, share = trimmed_copy(model, data.train_dataloader(), task.tokenizer)
    compressible, head = parameter_shares(model)
    tokens = 1.0
    if args.group_by_length:
        tokens = grouped_token_share(args, data.splits["train"])
    plan = ThreeDPlan.for_budget(
        time_budget, size_budget,
        cost=cost_model_path(args), reference_steps=args.epochs * per_epoch,
        epochs=args.epochs, compressible_share=compressible, head_share=head,
        quantized_overhead=QUANTIZED_OVERHEAD, curves=args.curves,
        quantize_at=args.quantize_at, freezable=freezable_units(model),
        vocabulary=args.vocabulary, vocabulary_share=share, token_share=tokens,
        embedding_share=input_embedding_share(model), **export_settings(args),
    )  # fmt: skip
    allocation = plan.allocation
    assert allocation is not None
    document = {
        "budget": {"time": time_budget, "size": size_budget},
        "curves": "prior" if args.curves is None else args.curves.name,
        "vocabulary": args.vocabulary,
        "vocabulary_share": share,
        "token_share": tokens,
        **export_settings(args),
        "quantize_at": allocation.quantize_at,
        "strengths": allocation.strengths,
        "trainable_reached": allocation.trainable_reached,
        "predicted_train_s": allocation.time_s,
        "time_fraction": allocation.time_fraction,
        "size_fraction": allocation.size_fraction,
        "accuracy_change": allocation.accuracy_change,
        "breakdown": dict(allocation.breakdown),
        "reason": allocation.reason,
    }
    path = args.results_dir / f"allocation_{args.machine}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(json.dumps(document, indent=1))


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    default_seeds = f"0 1 2 for {', '.join(THREE_SEEDS)}, 0 for the rest"
    parser.add_argument(
        "--seeds", type=int, nargs="+", help=f"for every set-up (default: {default_seeds})"
    )
    parser.add_argument("--train-samples", type=int, default=0, help="0: the whole split")
    parser.add_argument("--epochs", type=int, default=2, help="Standard's epochs")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--data-seed", type=int, default=1234)
    parser.add_argument("--machine", default=DEFAULT_MACHINE, help="names the result files")
    parser.add_argument("--results-dir", type=Path, default=RESULTS / "ablation")
    parser.add_argument("--export-dir", type=Path, default=RESULTS / "exported" / "ablation")
    parser.add_argument(
        "--also-results", type=Path, nargs="+",
        help="--summarize: result folders whose runs of other set-ups (any machine) add to the "
        "accuracy curves",
    )  # fmt: skip
    parser.add_argument("--force", action="store_true", help="rerun runs that have a file")
    parser.add_argument("--latency", action="store_true", help="time the seed-0 exports")
    parser.add_argument("--latency-rounds", type=int, default=5)
    parser.add_argument("--summarize", action="store_true", help="merge, print, plot")
    parser.add_argument("--summary", type=Path, default=RESULTS / "ablation_summary.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "ablation_pareto.png")
    parser.add_argument(
        "--write", action="store_true", help="summarize and replace BENCHMARKS.md's section"
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="measure the budget solver's step-cost model"
    )
    parser.add_argument(
        "--solve", type=float, nargs=2, metavar=("TIME", "SIZE"),
        help="the budget solver's allocation for these budgets (after --calibrate)",
    )  # fmt: skip
    parser.add_argument(
        "--curves", type=Path, help="--solve with these accuracy curves (default: the prior)"
    )
    parser.add_argument(
        "--quantize-at", choices=("train", "export"), default="export",
        help="--solve: where the plan quantizes (default: at export, ONNX Runtime int8)",
    )  # fmt: skip
    parser.add_argument("--one", nargs=2, metavar=("SETUP", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--vocabulary", choices=("full", "train"), default="full",
        help="--solve for a plan that trims the vocabulary to the training data's tokens",
    )  # fmt: skip
    parser.add_argument(
        "--unseen-tokens", choices=("unknown", "nearest", "pretrained"), default="unknown",
        help="--solve with --vocabulary train: what tokens the training data never had read",
    )  # fmt: skip
    parser.add_argument(
        "--embedding-bits", type=int, choices=(8, 4), default=8,
        help="--solve: bits of the token table in the int8 export (4: blocks of 32)",
    )  # fmt: skip
    parser.add_argument(
        "--unseen-token-bits", type=int, choices=(8, 4), default=None,
        help="--solve with --unseen-tokens pretrained: bits of the rows held apart in the int8 "
        "export (default: --embedding-bits)",
    )  # fmt: skip
    parser.add_argument(
        "--group-by-length", type=int, default=0,
        help="--solve: batches of similar length, sorted in windows of this many batches (0: "
        "off); the solver prices the steps at the padding this leaves",
    )  # fmt: skip
    args = parser.parse_args()
    args.val_samples = 0  # prepare_data's argument: validation is off (limit_val_batches=0)

    if args.one:  # a child process: one run, one JSON line
        result = run_one(args.one[0], int(args.one[1]), args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    if args.calibrate or args.solve:
        if args.calibrate:
            calibrate(args)
        if args.solve:
            solve(args)
        return
    if not (args.latency or args.summarize or args.write):
        sys.exit(1 if sweep(args) else 0)
    if args.latency:
        measure_latency(args)
    if args.summarize or args.write:
        summarize(args)


if __name__ == "__main__":
    main()
