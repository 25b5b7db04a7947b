"""Large-model fine-tuning: SmolLM2-135M-Instruct (Llama architecture) with LoRA, Standard
against the 3D plan at the same task, on the CPU.

Regime: the packaged SmolLM2-135M-Instruct, LoRA r=16 (alpha 32, dropout 0.05) on ``q_proj``,
``k_proj``, ``v_proj`` and ``o_proj`` (``examples/configs/rt_smollm2_lora.yaml``), answering
``Review: <text>\\nSentiment:`` with `` negative`` / `` positive`` (loss on the answer token), a
label-stratified 4,000-review training subset (``train_samples``, split seed 1234: the same
subset for every run), 96 tokens, batch 8, AdamW at 2e-4 with a linear warm-up over 6% of the
run then linear decay; 1 epoch for ``Standard``. Validation is off during training; the
trained model is tested on the whole test split.

Set-ups (:data:`SETUPS`): keyword arguments of a :class:`~lightning_3d.plan.ThreeDPlan` plus
``steps``, the share of ``Standard``'s optimizer steps the run takes (the trainer's
``max_steps``, the learning-rate schedule spans them; the batches are the first ones of the
same seeded shuffle, so a shorter run sees a random part of the subset):

* ``Standard``: LoRA as configured, every step; deployed in fp32.
* ``Standard-half``: the same with half the steps: the equal-budget baseline.
  ``Standard-300``: the same in 0.6 of the steps, the steps of ``3D-int8-table8-all``.
* ``3D``: the adapters of the lower half of the blocks frozen from the start (``trainable=0.5``,
  ``freeze_by="depth"``: backward stops at the lowest trainable adapter, the one way freezing
  saves time under LoRA), 0.6 of the steps, 4-bit weights at export (``quantize_at="export"``)
  with the base rounded to the runtime's int4 grid before training
  (``LoRASettings(base_quantization="int4")``) and the adapters deployed beside it, in float
  (``lora="separate"``): the deployed decoder computes what was trained.
  The data axis is off: its scores need a pass over every sample, which within one epoch costs
  more than the samples it would drop save. Pruning is off: merged LoRA updates are dense.
* ``3D-all-linear``: ``3D`` with adapters on every linear projection of the blocks (the MLP's
  ``gate_proj``, ``up_proj`` and ``down_proj`` too), as QLoRA places them on a 4-bit base: the
  MLPs hold three quarters of the rounded block weights.
* ``3D-int8``: ``3D`` with the blocks on the runtime's int8 grid and the tied token table on
  its int4 grid (``LoRASettings(base_quantization="int8", base_embedding_bits=4)``), deployed
  on exactly that grid (``export_generator(..., 8, embedding_bits=4)``: 3.6x smaller than
  fp32 with the adapters beside it), and batches grouped by length
  (``group_by_length=50``: a step computes 0.67 of random batches' padded tokens on this
  data), which buys 0.9 of the steps in the time ``3D``'s 0.6 take.
* ``3D-int8-untied``: ``3D-int8`` with the output layer given its own copy of the table on the
  int8 grid (``LoRASettings(..., untie_output=True)``; the input embedding stays int4),
  deployed so (an int8 ``lm_head`` product, an int4 Gather): 3.1x smaller than fp32.
* ``3D-int8-random`` and ``3D-int8-all``: diagnostics of where ``3D-int8``'s points go: the
  batches in random order (no grouping), and every adapter training (``trainable=1.0``, no
  depth freezing). Each costs time that ``3D-int8``'s budget does not have.
  ``3D-int8-all-table8``: ``3D-int8-all`` with the table on the int8 grid too (deployed at int8
  everywhere): what the int4 table costs, a diagnostic (its run, before the shared int8 table,
  deployed the table in fp32 beside an int8 head: 278 MB).
* ``3D-int8-warm``: ``3D-int8`` with every adapter training for the first quarter of the steps
  (``warmup=0.25``), then the lower half frozen.
* ``3D-int8-epoch``: ``3D-int8`` over the whole epoch (``Standard``'s 500 steps).
* ``3D-int8-quarter``: ``3D-int8`` with only the lower quarter of the adapters frozen
  (``trainable=0.75``) in 0.8 of the steps: depth traded for steps.
* ``3D-int8-table8``: ``3D-int8-quarter`` with the tied token table on the int8 grid of the
  blocks (``LoRASettings(base_quantization="int8")``; the packaged table is Q8_0, int8 blocks
  of 32, so the runtime's int8 grid moves it by 0.5% of its norm where its int4 grid moves it
  by 11%), stored once in int8 for the embedding and the output layer
  (``export_generator(..., 8)``: 3.3x smaller than fp32 with the adapters beside it).
  ``3D-int8-table8-all``: the same with every adapter training (``trainable=1.0``) in 0.6 of
  the steps; ``3D-int8-table8-all-360`` in 0.72 of them (the steps that fit half of
  ``Standard``'s time at the measured step costs).
* ``3D-int8-merged-all``: ``3D-int8-table8-all`` on the float base (nothing rounded before
  training): the adapters merged into it and the whole model rounded to the runtime's int8 grid
  at export (``lora="merge"``), the table stored once: 3.5x smaller than fp32.
* ``Standard-lr4e-4`` and ``3D-int8-merged-all-lr4e-4``: both at twice the peak learning rate
  (4e-4): whether a rate for short runs closes the plan's gap to the plain recipe's last steps.
* ``3D-int8-nodrop-360`` and ``Standard-lr4e-4-nodrop``: the two without LoRA dropout (the
  plan in 0.72 of the steps); ``3D-int8-nodrop-400``: the plan without dropout in the steps that
  fit half of ``Standard-lr4e-4``'s time at the step cost measured for ``3D-int8-nodrop-360``.
* ``3D-int8-depth24``: ``3D-int8-nodrop-400`` with 6 of the 30 decoder blocks removed before
  the first step (``drop_blocks=6``: those of lowest block influence on the first 8 training
  batches, :class:`~lightning_3d.callbacks.DepthPruner`), over the whole epoch; deployed with
  24 blocks.
* ``3D-int8-nodrop-epoch``: ``3D-int8-nodrop-400`` over the whole epoch, a diagnostic: the
  plan's recipe at the plain recipe's steps (its time is above the goal's half).
* ``3D-int8-nodrop-quarter``: ``3D-int8-nodrop-400`` with the adapters of the lower quarter of
  the blocks frozen from the first step (``trainable=0.75``, ``freeze_by="depth"``: backward
  stops above them), over the whole epoch: the parameter axis's cut of a step in place of
  ``3D-int8-depth24``'s model-axis one.

Each run is a fresh process; it writes ``<SETUP>_seed<N>_<machine>.json`` under ``--results-dir``
(skipped when present; ``--force`` reruns):

* ``test_acc``: accuracy of the *deployed* model on the test split in percent: ``Standard`` and
  ``Standard-half`` deploy fp32 (``trainer.test``, the answer of highest log-probability), the
  3D plans deploy their integer ONNX Runtime GenAI model, scored in that runtime
  (:func:`lightning_3d.generation.answer_accuracy`); ``trained_acc`` is the PyTorch model's;
  ``int4_acc``: the run's model exported to 4 bits and scored the same way, for every set-up
  (what post-training 4-bit costs each);
* ``train_s`` (fit wall time) and ``cpu_s`` (process CPU time during the fit);
* ``peak_train_mib`` (resident memory above the start of the fit) and ``peak_rss_mib`` (the
  process's highest resident memory, model and data included: what must fit the machine);
* ``model_bytes``: the deployed folder (``model.onnx`` + weights + config + tokenizer);
  ``tokens_per_s``: its greedy generation speed at batch 1, 64 new tokens after a test prompt,
  median of 3 (:func:`lightning_3d.generation.tokens_per_second`).

``--summarize`` merges the machine's result files into ``--summary`` (by default
``llm_summary_<machine>.json`` beside the results) and prints the table (mean ± sd over seeds)
and the goals of each plan of :data:`GOAL_SETUPS` against the strongest plain baseline (the most
accurate set-up of :data:`PLAIN` measured on the machine). A result file with a
``"contended"`` entry (a note saying why) comes from a run that shared the CPU with other work:
its accuracy and sizes count, its times (``train_s``, ``cpu_s``, ``tokens_per_s``) are left out.

``--speed`` times the greedy generation of every deployed form (fp32, int8, int4 merged, int4
with the adapters beside the base) in turn in one process (``speed_<machine>.json``).

``--keep-models DIR`` saves each run's fp32 base and adapters; ``--export-variants DIR/SETUP_seedN``
exports one of them at 4 and 8 bits and scores both on the test split
(``export_variants_<model>_<machine>.json``).

Usage::

    python benchmarks/llm.py                           # every set-up, its seeds
    python benchmarks/llm.py --setups 3D --seeds 1     # a part of the sweep
    python benchmarks/llm.py --summarize               # the table
    python benchmarks/llm.py --setups Standard --seeds 0 --train-samples 32 \\
        --test-samples 16 --machine smoke --results-dir SCRATCH   # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import shutil
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from ablation import cpu_seconds, git_commit, quiet_trainer, record_missing, seed_major
from pruning import PeakMemory

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "benchmarks" / "results" / "llm"
ADAPTER, DEPLOYMENT = "adapter", "lora_deployment.txt"  # of a --keep-models folder
STEPS = "steps"
BASE = "base_quantization"  # of the LoRA base: not a plan argument
BASE_TABLE = "base_embedding_bits"  # the LoRA base's token-table grid: not a plan argument
UNTIE = "untie_output"  # the LoRA base's output layer apart from its table: not a plan argument
TARGETS = "target_modules"  # the set-up's LoRA targets, when not the regime's: not a plan argument
LEARNING_RATE = "learning_rate"  # the set-up's peak rate, when not --learning-rate: not a plan one
DROPOUT = "dropout"  # the set-up's LoRA dropout, when not the regime's: not a plan argument
THREE_D = {
    "trainable": 0.5,
    "freeze_by": "depth",
    "warmup": 0.0,
    "weight_bits": 4,
    "quantize_at": "export",
    STEPS: 0.6,
    BASE: "int4",
}
SETUPS: dict[str, dict[str, Any]] = {
    "Standard": {},
    "Standard-half": {STEPS: 0.5},
    # Standard's recipe in the 3D-int8-table8-all plan's 300 steps: what grouping by length and
    # the int8 grid change at equal steps
    "Standard-300": {STEPS: 0.6},
    "3D": THREE_D,
    "3D-all-linear": THREE_D
    | {TARGETS: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
    # the blocks on the int8 grid and the tied token table on the int4 one (trained on it,
    # deployed on it), batches grouped by length (a step computes 0.67 of random batches'
    # padded tokens here), so 0.9 of the steps fit the time the 3D row's 0.6 take
    "3D-int8": {
        **THREE_D,
        "weight_bits": 8,
        "embedding_bits": 4,
        "group_by_length": 50,
        STEPS: 0.9,
        BASE: "int8",
        BASE_TABLE: 4,
    },
}
# 3D-int8 with the output layer untied from the int4 table, on the int8 grid (it scores every
# answer): what the int4 head costs in training, for about 28 MB more
SETUPS["3D-int8-untied"] = SETUPS["3D-int8"] | {UNTIE: True}


def without(setup: str, *keys: str) -> dict[str, Any]:
    """The settings of ``setup`` less ``keys``."""
    return {k: v for k, v in SETUPS[setup].items() if k not in keys}


# where 3D-int8's points go: the same run with batches in random order (not grouped), and with
# every adapter training (no depth freezing); each costs time, so both are diagnostics
SETUPS["3D-int8-random"] = without("3D-int8", "group_by_length")
SETUPS["3D-int8-all"] = SETUPS["3D-int8"] | {"trainable": 1.0}


def table_on_int8(setup: str) -> dict[str, Any]:
    """``setup`` with the token table on the blocks' int8 grid (no int4 table to train on or
    deploy)."""
    return without(setup, BASE_TABLE, "embedding_bits")


# what the int4 table costs when every adapter trains: the table on the blocks' int8 grid, a
# diagnostic
SETUPS["3D-int8-all-table8"] = table_on_int8("3D-int8-all")
# 3D-int8 with every adapter training over the first quarter of the steps before the lower
# half freezes (the plan's dense warm-up): the lower blocks' adapters adapt where most is learnt
SETUPS["3D-int8-warm"] = SETUPS["3D-int8"] | {"warmup": 0.25}
# 3D-int8 over the whole epoch (every batch, 500 steps): what the last tenth of the data buys
SETUPS["3D-int8-epoch"] = SETUPS["3D-int8"] | {STEPS: 1.0}
# depth traded for steps: the lower quarter of the adapters frozen, 0.8 of the steps
SETUPS["3D-int8-quarter"] = SETUPS["3D-int8"] | {"trainable": 0.75, STEPS: 0.8}
# 3D-int8-quarter with the tied table on the int8 grid of the blocks (the packaged table is
# Q8_0: 0.5% of its norm moves, 11% on int4), stored once in int8 for both of its uses
SETUPS["3D-int8-table8"] = table_on_int8("3D-int8-quarter")
# depth traded for steps once more: every adapter training with the int8 table, in 0.6 of the steps
SETUPS["3D-int8-table8-all"] = SETUPS["3D-int8-table8"] | {"trainable": 1.0, STEPS: 0.6}
# 3D-int8-table8-all in the steps that fit half of Standard's time (1.15 s a step against 1.70 s
# measured: 0.72 of the steps, 360)
SETUPS["3D-int8-table8-all-360"] = SETUPS["3D-int8-table8-all"] | {STEPS: 0.72}
# 3D-int8-table8-all on the float base (no rounding before training): the adapters merged into it
# and the whole model exported to the int8 grid after training (post-training rounding)
SETUPS["3D-int8-merged-all"] = without("3D-int8-table8-all", BASE)
# the learning rate for short runs: twice the regime's 2e-4 for the plain recipe and for the plan
# (the plain recipe with it is a baseline as much as with 2e-4: the plan counts against the better)
SETUPS["Standard-lr4e-4"] = {LEARNING_RATE: 4e-4}
SETUPS["3D-int8-merged-all-lr4e-4"] = SETUPS["3D-int8-merged-all"] | {LEARNING_RATE: 4e-4}
# 3D-int8-merged-all-lr4e-4 without LoRA dropout (its Bernoulli masks, one per adapter input, took
# a tenth of a profiled CPU step; the runs measured a fifth), in 360 steps: what the saved time buys
# when spent on more of the epoch
SETUPS["3D-int8-nodrop-360"] = SETUPS["3D-int8-merged-all-lr4e-4"] | {DROPOUT: 0.0, STEPS: 0.72}
# 3D-int8-nodrop-360 in the steps that fit half of Standard-lr4e-4's time at its measured step
# cost (1.33 s a step against 1,124 s for the plain run: 422 steps, less 5% for the spread of the
# machine's speed: 0.8 of the steps, 400)
SETUPS["3D-int8-nodrop-400"] = SETUPS["3D-int8-nodrop-360"] | {STEPS: 0.8}
# the model axis's whole-block cut: 3D-int8-nodrop-400 with the 6 of 30 decoder blocks of lowest
# block influence on the first 8 training batches removed before the first step (every step then
# computes 24 blocks: about 0.8 of 3D-int8-nodrop-400's, so the whole epoch fits half of the
# plain run's time), deployed without them (one seed: 3 points below 3D-int8-nodrop-400 at seed 0)
SETUPS["3D-int8-depth24"] = SETUPS["3D-int8-nodrop-400"] | {"drop_blocks": 6, STEPS: 1.0}
# 3D-int8-nodrop-400 over the whole epoch (Standard's 500 steps), a diagnostic: what the plan's
# recipe (grouped batches, merged int8 export) reaches at the plain recipe's steps
SETUPS["3D-int8-nodrop-epoch"] = SETUPS["3D-int8-nodrop-400"] | {STEPS: 1.0}
# the parameter axis's depth cut instead of the model's: 3D-int8-nodrop-400 with the adapters of
# the lower quarter of the blocks frozen from the first step (backward stops above them: every
# step then skips a quarter of the blocks' backward), so the whole epoch fits half of the plain
# run's time (one seed: 0.7 points below 3D-int8-nodrop-epoch at seed 0)
SETUPS["3D-int8-nodrop-quarter"] = SETUPS["3D-int8-nodrop-400"] | {"trainable": 0.75, STEPS: 1.0}
# the plain recipe at 4e-4 without LoRA dropout: what dropping the masks saves the plain run
SETUPS["Standard-lr4e-4-nodrop"] = SETUPS["Standard-lr4e-4"] | {DROPOUT: 0.0}
# the plain recipe over the whole epoch, at either rate, with or without LoRA dropout: the
# baselines a plan is read against
PLAIN = ("Standard", "Standard-lr4e-4", "Standard-lr4e-4-nodrop")
THREE_SEEDS = (
    *PLAIN,
    "3D",
    "3D-int8",
    "3D-int8-table8",
    "3D-int8-table8-all",
    "3D-int8-merged-all",
    "3D-int8-merged-all-lr4e-4",
    "3D-int8-nodrop-360",
    "3D-int8-nodrop-400",
    "3D-int8-nodrop-epoch",
)
# the plans the goals are read from: every 3-seed set-up but the plain ones
GOAL_SETUPS = tuple(setup for setup in THREE_SEEDS if setup not in PLAIN)
LORA = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.05,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
NEW_TOKENS = 64
PER_SEED = ("test_acc", "trained_acc", "int4_acc", "train_s", "cpu_s", "peak_rss_mib")
TIMES = ("train_s", "cpu_s", "tokens_per_s")  # not comparable from a contended run


# a set-up's LoRA settings, not plan arguments
LORA_KEYS = (TARGETS, BASE, BASE_TABLE, UNTIE, DROPOUT)


def plan_arguments(setup: str) -> dict[str, Any]:
    return without(setup, STEPS, LEARNING_RATE, *LORA_KEYS)


def lora_of(setup: str) -> dict[str, Any]:
    """The LoRA settings of ``setup``: the regime's, with the set-up's targets and base grid."""
    return LORA | {key: SETUPS[setup][key] for key in LORA_KEYS if key in SETUPS[setup]}


def seeds_of(setup: str, args: argparse.Namespace) -> list[int]:
    if args.seeds is not None:
        return args.seeds
    return [0, 1, 2] if setup in THREE_SEEDS else [0]


def result_path(args: argparse.Namespace, setup: str, seed: int) -> Path:
    return args.results_dir / f"{setup}_seed{seed}_{args.machine}.json"


def peak_rss_mib() -> float:
    """The process's highest resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _deployed_name(plan: Any) -> str:
    """``int4``, ``int8``, or ``int8, int4 table``: the integer form a plan deploys."""
    table = plan.embedding_bits not in (None, plan.weight_bits)
    return f"int{plan.weight_bits}" + (f", int{plan.embedding_bits} table" if table else "")


def run_one(setup: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Seed, build, fit, test, export and time one set-up (in a child process)."""
    import lightning
    import lightning.pytorch as pl
    import onnxruntime_genai
    import torch
    import transformers

    from lightning_3d.data import PromptDataset, RottenTomatoesPrompts
    from lightning_3d.generation import answer_accuracy, export_generator, tokens_per_second
    from lightning_3d.plan import ThreeDPlan
    from lightning_3d.tasks import LoRASettings, PromptClassificationTask

    plan = ThreeDPlan(**plan_arguments(setup), seed=seed)
    pl.seed_everything(seed, verbose=False)
    settings = LoRASettings(**lora_of(setup))
    learning_rate = SETUPS[setup].get(LEARNING_RATE, args.learning_rate)
    started = time.perf_counter()
    task = PromptClassificationTask(lora=settings, learning_rate=learning_rate, warmup_ratio=0.06)
    load_s = time.perf_counter() - started
    data = RottenTomatoesPrompts(
        tokenizer=task.tokenizer,
        max_length=args.max_length,
        batch_size=args.batch_size,
        train_samples=args.train_samples,
    )
    data.setup("fit")
    if args.test_samples:
        full = data.splits["test"]
        cut = args.test_samples
        data.splits["test"] = PromptDataset(full.prompts[:cut], full.answers, full.classes[:cut])
    train_rows = len(data.splits["train"])
    standard_steps = math.ceil(train_rows / args.batch_size)
    fraction = SETUPS[setup].get(STEPS)
    max_steps = -1 if fraction is None else math.ceil(fraction * standard_steps)
    trainer = quiet_trainer(max_epochs=1, max_steps=max_steps, callbacks=plan.callbacks())
    with PeakMemory() as memory:
        cpu, started = cpu_seconds(), time.perf_counter()
        trainer.fit(task, datamodule=data)
        train_s, cpu_s = time.perf_counter() - started, cpu_seconds() - cpu
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    trained = 100 * trainer.test(task, datamodule=data, verbose=False)[0]["test/acc"]

    test = data.splits["test"]
    prompts = [[int(t) for t in prompt] for prompt in test.prompts]
    folder = args.export_dir / f"{setup}_seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    int4 = export_generator(
        task.model, task.tokenizer, folder / "int4", weight_bits=4, lora=settings.deployment
    )
    int4_acc = 100 * answer_accuracy(int4.path, prompts, test.answers, test.classes)
    deployed = int4 if plan.weight_bits == 4 else None
    if plan.weight_bits == 8:  # int8 blocks (and the token table at the plan's bits)
        deployed = export_generator(
            task.model, task.tokenizer, folder / "int8", 8, lora=settings.deployment,
            embedding_bits=plan.embedding_bits,
        )  # fmt: skip
    if deployed is None:  # a float deployment: fp32 weights
        deployed = export_generator(task.model, task.tokenizer, folder / "fp32", weight_bits=None)
    deployed_acc = trained
    if deployed.weight_bits is not None:  # an integer deployment: scored in its runtime
        deployed_acc = (
            int4_acc
            if deployed is int4
            else 100 * answer_accuracy(deployed.path, prompts, test.answers, test.classes)
        )
    speed = tokens_per_second(deployed.path, prompts[0], NEW_TOKENS, rounds=3)
    export_s = time.perf_counter() - started
    shutil.rmtree(folder)
    if args.keep_models is not None:  # the base and its adapters, for later export variants
        kept = args.keep_models / f"{setup}_seed{seed}"
        task.model.save_pretrained(kept / ADAPTER)
        copy.deepcopy(task.model).unload().save_pretrained(kept)
        task.tokenizer.save_pretrained(kept)
        (kept / DEPLOYMENT).write_text(settings.deployment)
    row = {
        "test_acc": deployed_acc,
        "trained_acc": trained,
        "int4_acc": int4_acc,
        "train_s": train_s,
        "cpu_s": cpu_s,
        "peak_train_mib": memory.peak_mib,
        "peak_rss_mib": peak_rss_mib(),
        "steps": trainer.global_step,
        "trainable_params": trainable,
        "deployed": "fp32" if deployed.weight_bits is None else _deployed_name(plan),
        "model_bytes": deployed.bytes,
        "int4_bytes": int4.bytes,
        "tokens_per_s": speed,
        "export_s": export_s,
        "load_s": load_s,
    }
    run = {
        "train_rows": train_rows,
        "test_rows": len(prompts),
        "standard_steps": standard_steps,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "plan": plan_arguments(setup),
        "lora": lora_of(setup) | {"deployed": settings.deployment},
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "lightning": lightning.__version__,
            "transformers": transformers.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__,
        },
    }
    return {"row": row, "run": run}


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("train_samples", "test_samples", "max_length", "batch_size", "learning_rate")
    return {key: getattr(args, key) for key in keys} | {"machine": args.machine}


def sweep(args: argparse.Namespace) -> int:
    """Every selected (set-up, seed) without a result file, each in a fresh process, seed 0 of
    every set-up first; returns the number of failed runs."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    pairs = seed_major(args.setups, lambda setup: seeds_of(setup, args))
    target_of = partial(result_path, args)
    failed = record_missing(pairs, target_of, args, settings_of(args), __file__)
    if failed:
        print(f"failed: {', '.join(failed)}", flush=True)
    return len(failed)


def export_variants(args: argparse.Namespace) -> None:
    """The model of one run (``--keep-models``: base and adapters) exported at 4 and 8 bits as
    the run deployed it (adapters merged or beside the base) and scored on the test split side
    by side: what the deployment's bit width costs that model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lightning_3d.data import RottenTomatoesPrompts
    from lightning_3d.generation import export_generators, generator_table
    from lightning_3d.models import load_tokenizer

    source = args.export_variants
    tokenizer = load_tokenizer(str(source))
    base = AutoModelForCausalLM.from_pretrained(source)
    model = PeftModel.from_pretrained(base, source / ADAPTER)
    deployment = (source / DEPLOYMENT).read_text().strip()
    data = RottenTomatoesPrompts(tokenizer=tokenizer, max_length=args.max_length)
    data.setup("test")
    test = data.splits["test"]
    folder = args.export_dir / f"{source.name}_variants"
    shutil.rmtree(folder, ignore_errors=True)
    reports = export_generators(
        model, tokenizer, folder, ["genai-int4", "genai-int8"],
        test.prompts, test.answers, test.classes, rounds=3, new_tokens=NEW_TOKENS,
        lora=deployment,
    )  # fmt: skip
    shutil.rmtree(folder)
    print(generator_table(reports), flush=True)
    variants = {
        r.format.removeprefix("genai-"): {
            "bytes": r.bytes, "acc": 100 * r.accuracy, "tokens_per_s": r.tokens_per_s
        }
        for r in reports
    }  # fmt: skip
    target = args.results_dir / f"export_variants_{source.name}_{args.machine}.json"
    document = {
        "model": str(source.name), "lora": deployment, "commit": git_commit(), "variants": variants
    }  # fmt: skip
    target.write_text(json.dumps(document, indent=1) + "\n")


#: The deployed forms timed side by side by ``--speed``: (export bits, LoRA deployment).
SPEED_FORMS = {
    "fp32 (Standard)": (None, "merge"),
    "int8, merged": (8, "merge"),
    "int4, merged": (4, "merge"),
    "int4, adapters beside (3D)": (4, "separate"),
}


def speed(args: argparse.Namespace) -> None:
    """Greedy tokens/s of every deployed form (:data:`SPEED_FORMS`) timed in turn in one
    process, ``--speed-rounds`` rounds, medians: SmolLM2 with fresh LoRA adapters of the
    regime's shape (speed depends on the shapes and formats, not on the trained values), 64 new
    tokens after the first test prompt, batch 1. Writes ``speed_<machine>.json``."""
    from lightning_3d.data import RottenTomatoesPrompts
    from lightning_3d.generation import export_generator, tokens_per_second
    from lightning_3d.tasks import LoRASettings, PromptClassificationTask

    task = PromptClassificationTask(lora=LoRASettings(**LORA))
    data = RottenTomatoesPrompts(tokenizer=task.tokenizer, max_length=args.max_length)
    data.setup("test")
    prompt = [int(t) for t in data.splits["test"].prompts[0]]
    folder = args.export_dir / "speed"
    shutil.rmtree(folder, ignore_errors=True)
    built = {
        name: export_generator(task.model, task.tokenizer, folder / str(i), bits, lora=lora)
        for i, (name, (bits, lora)) in enumerate(SPEED_FORMS.items())
    }
    rounds: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.speed_rounds):
        for name, export in built.items():
            rounds[name].append(tokens_per_second(export.path, prompt, NEW_TOKENS, rounds=1))
    shutil.rmtree(folder)
    baseline = statistics.median(rounds["fp32 (Standard)"])
    print("| deployed form | MB | tokens/s | vs fp32 |\n|---|---|---|---|")
    for name, export in built.items():
        median = statistics.median(rounds[name])
        print(f"| {name} | {export.bytes / 1e6:.0f} | {median:.1f} | {median / baseline:.2f}x |")
    document = {
        "commit": git_commit(),
        "machine": args.machine,
        "new_tokens": NEW_TOKENS,
        "forms": {
            name: {"bytes": built[name].bytes, "tokens_per_s": rounds[name]} for name in built
        },
    }
    target = args.results_dir / f"speed_{args.machine}.json"
    target.write_text(json.dumps(document, indent=1) + "\n")


# ----------------------------------------------------------------------------- summary
def merge(args: argparse.Namespace) -> dict[str, Any]:
    """The result files of ``--machine`` as ``{"regime": ..., "setups": {NAME: ...}}``."""
    paths = sorted(args.results_dir.glob(f"*_seed*_{args.machine}.json"))
    documents = [
        document
        for document in map(json.loads, (path.read_text() for path in paths))
        if "setup" in document  # not an export-variants file
    ]
    setups: dict[str, Any] = {}
    for setup in SETUPS:
        runs = sorted((d for d in documents if d["setup"] == setup), key=lambda d: d["seed"])
        if not runs:
            continue
        rows = [
            {k: None if k in TIMES and run.get("contended") else v for k, v in run["row"].items()}
            for run in runs
        ]
        speeds = [row["tokens_per_s"] for row in rows if row["tokens_per_s"] is not None]
        setups[setup] = {
            "seeds": [run["seed"] for run in runs],
            "commits": sorted({run["commit"] for run in runs}),
            "contended": [run["seed"] for run in runs if run.get("contended")],
            **{key: [row[key] for row in rows] for key in PER_SEED},
            "deployed": rows[0]["deployed"],
            "model_bytes": rows[0]["model_bytes"],
            "tokens_per_s": statistics.median(speeds) if speeds else None,
            "steps": rows[0]["steps"],
            "trainable_params": rows[0]["trainable_params"],
        }
    regime = documents[0]["settings"] if documents else {}
    return {"regime": regime, "setups": setups}


def measured(values: list[float | None]) -> list[float]:
    """The values a run measured (a contended run's times are ``None``)."""
    return [value for value in values if value is not None]


def mean_of(values: list[float | None]) -> float:
    kept = measured(values)
    return statistics.mean(kept) if kept else math.nan


def shown(value: float, spec: str, suffix: str = "") -> str:
    """``value`` formatted, or ``-`` when it was not measured (NaN)."""
    return "-" if math.isnan(value) else f"{value:{spec}}{suffix}"


def mean_sd(values: list[float | None]) -> str:
    kept = measured(values)
    if not kept:
        return "-"
    if len(kept) == 1:
        return f"{kept[0]:.2f}"
    return f"{statistics.mean(kept):.2f} ± {statistics.stdev(kept):.2f}"


def strongest_plain(setups: dict[str, Any]) -> str | None:
    """The plain set-up of :data:`PLAIN` with the highest mean deployed accuracy among
    ``setups`` (what a plan is read against), or ``None`` when none was measured.

    Example:
        >>> strongest_plain({"Standard": {"test_acc": [85.0, 84.0]},
        ...                  "Standard-lr4e-4": {"test_acc": [85.5]}})
        'Standard-lr4e-4'
    """
    plain = [name for name in PLAIN if name in setups]
    return max(plain, key=lambda name: mean_of(setups[name]["test_acc"]), default=None)


def table(summary: dict[str, Any]) -> str:
    setups = summary["setups"]
    base_name = strongest_plain(setups)
    base = setups[base_name] if base_name else None
    lines = [
        "| set-up | seeds | test acc % (deployed) | trained acc % | 4-bit export acc % "
        f"| train s | x {base_name or 'Standard'} | CPU s | peak RSS MiB | deployed MB | x smaller "
        "| tokens/s | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in setups.items():
        train = mean_of(row["train_s"])
        time_ratio = train / mean_of(base["train_s"]) if base else math.nan
        smaller = base["model_bytes"] / row["model_bytes"] if base else math.nan
        speed = "-" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:.1f}"
        lines.append(
            f"| {name} ({row['deployed']}) | {len(row['seeds'])} | {mean_sd(row['test_acc'])} "
            f"| {mean_sd(row['trained_acc'])} | {mean_sd(row['int4_acc'])} | {shown(train, '.0f')} "
            f"| {shown(time_ratio, '.2f', 'x')} | {shown(mean_of(row['cpu_s']), '.0f')} "
            f"| {max(row['peak_rss_mib']):.0f} | {row['model_bytes'] / 1e6:.0f} "
            f"| {shown(smaller, '.2f', 'x')} "
            f"| {speed} | {row['steps']} |"
        )
    return "\n".join(lines)


def paired_time_ratios(base: dict[str, Any], plan: dict[str, Any]) -> dict[int, float]:
    """``plan``'s training time over ``base``'s, seed by seed, where both runs of the seed have
    a clean time: the sweep runs a seed's set-ups one after the other, so a pair shares the
    machine's speed of the moment, which drifts by about 20% within an hour.

    Example:
        >>> paired_time_ratios({"seeds": [0, 1], "train_s": [None, 1000.0]},
        ...                    {"seeds": [0, 1], "train_s": [300.0, 450.0]})
        {1: 0.45}
    """
    times = {seed: t for seed, t in zip(base["seeds"], base["train_s"], strict=True) if t}
    return {
        seed: t / times[seed]
        for seed, t in zip(plan["seeds"], plan["train_s"], strict=True)
        if t and seed in times
    }


def goals(summary: dict[str, Any]) -> str:
    """The issue's goals for every plan of :data:`GOAL_SETUPS` measured beside the strongest
    plain baseline (:func:`strongest_plain`)."""
    setups = summary["setups"]
    plans = [name for name in GOAL_SETUPS if name in setups]
    base_name = strongest_plain(setups)
    if base_name is None or not plans:
        return f"goals: one of {', '.join(PLAIN)} and one of {', '.join(GOAL_SETUPS)} needed"
    base = setups[base_name]
    lines = []
    for name in plans:
        plan = setups[name]
        kept = mean_of(plan["test_acc"]) / mean_of(base["test_acc"])
        time_ratio = mean_of(plan["train_s"]) / mean_of(base["train_s"])
        smaller = base["model_bytes"] / plan["model_bytes"]
        paired = paired_time_ratios(base, plan)
        pairs = ", ".join(f"seed {seed}: {ratio:.2f}x" for seed, ratio in paired.items()) or "none"
        timed = "met" if time_ratio <= 0.5 else "missed" if time_ratio > 0.5 else "not measured"
        lines += [
            f"{name} against {base_name} (seeds {plan['seeds']} and {base['seeds']}):",
            f"- accuracy kept: {100 * kept:.1f}% (goal >= 99%): "
            f"{'met' if kept >= 0.99 else 'missed'}",
            f"- training time: {shown(time_ratio, '.2f', 'x')} (goal <= 0.5x): {timed}"
            f"; paired by seed (clean runs of a seed, run one after the other): {pairs}",
            f"- deployed model: {smaller:.2f}x smaller (goal >= 3x): "
            f"{'met' if smaller >= 3 else 'missed'}",
        ]
    return "\n".join(lines)


def summarize(args: argparse.Namespace) -> None:
    summary = merge(args)
    target = args.summary or RESULTS.parent / f"llm_summary_{args.machine}.json"
    target.write_text(json.dumps(summary, indent=1) + "\n")
    print(table(summary))
    print()
    print(goals(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument("--test-samples", type=int, default=0, help="0: the whole test split")
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--machine", default="cpu")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--export-dir", type=Path, default=Path("runs") / "llm_exports")
    parser.add_argument(
        "--summary", type=Path, default=None, help="default: llm_summary_<machine>.json in results"
    )
    parser.add_argument("--force", action="store_true")
    parser.add_argument(
        "--keep-models", type=Path, default=None, help="save each run's base and adapters here"
    )
    parser.add_argument("--summarize", action="store_true")
    parser.add_argument(
        "--export-variants", type=Path, help="a kept model folder: its 4- and 8-bit exports"
    )
    parser.add_argument(
        "--speed", action="store_true", help="tokens/s of every deployed form, side by side"
    )
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("SETUP", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = run_one(args.one[0], int(args.one[1]), args)
        print("RESULT " + json.dumps(result), flush=True)
    elif args.summarize:
        summarize(args)
    elif args.export_variants:
        export_variants(args)
    elif args.speed:
        speed(args)
    else:
        sys.exit(1 if sweep(args) else 0)


if __name__ == "__main__":
    main()
