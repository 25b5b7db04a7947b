"""The ``lightning-3d`` command: LightningCLI with our tasks, data and logging defaults.

Usage::

    lightning-3d fit --config examples/configs/rt_minilm_baseline.yaml
    lightning-3d test --config examples/configs/rt_minilm_baseline.yaml --ckpt_path PATH
    lightning-3d fit --config examples/configs/hamlet_smollm2_lora.yaml --trainer.max_steps 50
    lightning-3d export --config RUN.yaml --ckpt_path BEST.ckpt --formats hf onnx-int8 --output DIR

What it adds to plain LightningCLI:

* the model's tokenizer is handed to the data module (``data.init_args.tokenizer`` is linked
  to the instantiated model), so the two can never disagree;
* when ``trainer.logger`` is left at its default, runs log to W&B (offline without credentials,
  see :mod:`lightning_3d.loggers`) and to CSV under ``trainer.default_root_dir``;
* ``--test_after_fit true`` tests the best checkpoint right after ``fit``;
* a top-level ``plan:`` (:class:`~lightning_3d.plan.ThreeDPlan`: ``data_budget``, ``trainable``,
  ``sparsity``, ``weight_bits``, ``distill``, ...) puts the plan's callbacks before
  ``trainer.callbacks``; a ``plan.budget`` (``time``, ``size``, ...) is solved first
  (:func:`solve_plan`), and a plan that shortens the run sets ``trainer.max_steps``;
* every run is seeded (``seed_everything: 42`` unless set);
* ``export`` (:func:`run_export`) reads a run's YAML and checkpoint and writes deployable formats
  with :func:`lightning_3d.export.export`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_3d.strategies  # noqa: F401  (registers strategy names such as "fsdp_compressed")
from lightning_3d.loggers import default_loggers
from lightning_3d.plan import ThreeDPlan

log = logging.getLogger(__name__)


#: What ``lightning-3d --help`` says above LightningCLI's subcommands.
DESCRIPTION = (
    "Fine-tuning made cheaper along data, parameters and model (LightningCLI: fit, validate, "
    "test, predict; a `plan:` section adds the axes). `lightning-3d export --help`: a run's "
    "checkpoint as hf, onnx, onnx-int8, torchao or ONNX Runtime GenAI decoders."
)


class Lightning3DCLI(LightningCLI):
    """LightningCLI with the tokenizer link, default loggers and test-after-fit."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=False,
            help="fit only: run `test` on the best checkpoint (the last weights if none) after fit",
        )
        parser.add_argument(
            "--plan",
            type=Optional[ThreeDPlan],  # noqa: UP045  (jsonargparse reads the annotation)
            default=None,
            help="a co-optimization plan: its callbacks run before trainer.callbacks",
        )
        parser.link_arguments(
            "model", "data.init_args.tokenizer", compute_fn=_tokenizer_of, apply_on="instantiate"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # left at the Trainer default
            root = config.get("default_root_dir") or os.getcwd()
            kwargs["logger"] = default_loggers(root)
        plan = self._get(self.config_init, "plan", default=None)
        if plan is not None:
            if plan.budget is not None:
                plan = solve_plan(plan, self.model, self.datamodule, config, save_cost=True)
                kwargs.update(plan.trainer_arguments())
            own = config.get("callbacks") or []
            kwargs["callbacks"] = [*plan.callbacks(), *(own if isinstance(own, list) else [own])]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if not self._get(self.config, "test_after_fit", default=False):
            return
        checkpoint = self.trainer.checkpoint_callback
        has_best = isinstance(checkpoint, ModelCheckpoint) and checkpoint.best_model_path
        self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path="best" if has_best else None
        )


COST_MODEL_FILE = "cost_model.json"


def solve_plan(
    plan: ThreeDPlan, model: Any, datamodule: Any, trainer_config: Any, save_cost: bool = False
) -> ThreeDPlan:
    """``plan`` with its budget solved for this run (:meth:`ThreeDPlan.solve`).

    The reference run is the trainer's ``max_epochs`` of optimizer steps over the training data
    (per rank, with ``accumulate_grad_batches`` and ``limit_train_batches``), or its
    ``max_steps`` when fewer. Without ``plan.budget.calibration``, ``fit`` (``save_cost``)
    measures the step-cost model on the first training batch (``model.score_batch``, on the
    GPU when the run uses one) and saves it as ``cost_model.json`` under
    ``trainer.default_root_dir``; ``export`` reads that file back and never measures, so it
    rebuilds the plan the run trained with. Several processes need a calibration file (each
    would measure, and could solve, differently).
    """
    import math

    import torch

    from lightning_3d.budget import CostModel, measure_cost_model
    from lightning_3d.curriculum import token_share
    from lightning_3d.sampling import read_lengths
    from lightning_3d.vocabulary import trimmed_copy

    assert plan.budget is not None
    epochs = trainer_config.get("max_epochs")
    if not epochs or epochs < 1:
        raise ValueError("a plan with a budget needs trainer.max_epochs (the reference run)")
    if datamodule is None:
        raise ValueError("a plan with a budget needs a data module to measure the run on")
    devices, nodes = trainer_config.get("devices", 1), trainer_config.get("num_nodes") or 1
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    world = (len(devices) if isinstance(devices, list | tuple) else devices) * nodes
    if not isinstance(world, int) or world < 1:
        raise ValueError(
            f"a plan with a budget needs trainer.devices as a number or a list, got {devices!r}"
        )
    if world > 1 and plan.budget.calibration is None:
        raise ValueError(
            "a plan with a budget on several processes needs plan.budget.calibration (a "
            "cost_model.json measured once, e.g. by a one-device run): every process would "
            "measure its own and could solve a different plan"
        )
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batches = math.ceil(len(loader) / world)
    limit = trainer_config.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = max(1, int(batches * limit))
    per_epoch = math.ceil(batches / (trainer_config.get("accumulate_grad_batches") or 1))
    reference_steps = epochs * per_epoch
    max_steps = trainer_config.get("max_steps")
    if max_steps is not None and 0 < max_steps < reference_steps:
        reference_steps, epochs = max_steps, math.ceil(max_steps / per_epoch)
    cost = None
    saved = Path(trainer_config.get("default_root_dir") or os.getcwd()) / COST_MODEL_FILE
    if plan.budget.calibration is None:
        if not save_cost:
            if not saved.exists():
                raise ValueError(
                    f"the run's plan has a budget but {saved} (the step-cost model its fit "
                    "measured) is missing: set plan.budget.calibration to that file"
                )
            cost = CostModel.load(saved)
        else:
            if not callable(getattr(model, "score_batch", None)):
                raise ValueError(
                    "measuring the step cost needs a `score_batch(batch)` method on the model "
                    "(the built-in tasks have one), or set plan.budget.calibration"
                )
            accelerator = trainer_config.get("accelerator") or "auto"
            on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
            device = torch.device("cuda" if on_gpu else "cpu")
            batch = {
                k: v.to(device) if torch.is_tensor(v) else v for k, v in next(iter(loader)).items()
            }
            model.to(device)
            try:
                cost = measure_cost_model(
                    model, batch, lambda m, b: m.score_batch(b)["per_sample_loss"].mean()
                )
            finally:
                model.to("cpu")
            saved.parent.mkdir(parents=True, exist_ok=True)
            cost.save(saved)
            log.info("plan budget: the step-cost model was measured and saved to %s", saved)
    share, priced = 0.0, model
    if plan.vocabulary == "train":  # priced as the run's VocabularyTrimmer will leave it
        priced, share = trimmed_copy(model, loader, _tokenizer_of(model))
    tokens = 1.0
    if plan.group_by_length:  # the padding the run's grouped batches will compute
        lengths = read_lengths(loader.dataset, "input_ids")
        batch = (loader.batch_size or 1) * world
        tokens = token_share(lengths, batch, plan.group_by_length, plan.seed)
    return plan.solve(
        priced, reference_steps=reference_steps, epochs=epochs, cost=cost,
        vocabulary_share=share, token_share=tokens,
    )  # fmt: skip


def _tokenizer_of(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(model).__name__} has no `tokenizer` attribute for the data module to use; "
            "lightning-3d tasks load one from their model"
        )
    return tokenizer


class _ExportCLI(Lightning3DCLI):
    """The run's configuration (model, data, callbacks, plan) without its Trainer settings:
    the run's callbacks are kept in :attr:`run_callbacks`; the Trainer is a bare one-process
    CPU Trainer that logs nothing and writes no checkpoints."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        # a run's saved config.yaml carries fit's own ckpt_path and weights_only (ignored here:
        # export takes --ckpt_path itself)
        parser.add_argument("--ckpt_path", type=Optional[str], default=None)  # noqa: UP045
        parser.add_argument("--weights_only", type=Optional[bool], default=None)  # noqa: UP045

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init.get("trainer") or {}
        own = config.get("callbacks") or []
        plan = self.config_init.get("plan")
        if plan is not None and plan.budget is not None:  # the plan the run trained with
            plan = solve_plan(plan, self.model, self.datamodule, config)
        self.run_callbacks = [
            *(plan.callbacks() if plan else []),
            *(own if isinstance(own, list) else [own]),
        ]
        return Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )


def _export_parser() -> argparse.ArgumentParser:
    from lightning_3d.export import DEFAULT_INT8_SCHEME, FORMATS, INT8_SCHEMES
    from lightning_3d.generation import GENERATOR_FORMATS

    parser = argparse.ArgumentParser(
        prog="lightning-3d export",
        allow_abbrev=False,  # a prefix of an export option must reach the run's options
        description="Write a trained run as deployable models and measure them. Every other "
        "option (--config RUN.yaml, --model..., --data...) is the run's, as for `fit`.",
    )
    parser.add_argument("--ckpt_path", required=True, help="checkpoint file or sharded folder")
    parser.add_argument("--output", required=True, help="folder to write (must be empty)")
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["hf", "onnx", "onnx-int8"],
        help=f"of {FORMATS}, and for causal LMs {tuple(GENERATOR_FORMATS)} (ONNX Runtime "
        "GenAI: KV-cache decoder, timed in tokens/s)",
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty folder")
    parser.add_argument(
        "--int8_scheme", default=DEFAULT_INT8_SCHEME, help=f"onnx-int8: one of {INT8_SCHEMES}"
    )
    parser.add_argument(
        "--embedding_bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="onnx-int8 and genai-int8: bits of the token-embedding table (4: blocks of 32 "
        "with a scale each); default: the run's plan's embedding_bits, else 8",
    )
    parser.add_argument(
        "--unseen_token_bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="onnx-int8: bits of the untrained rows a trimmed vocabulary holds apart "
        "(unseen_tokens='pretrained'); default: the run's plan's unseen_token_bits, else "
        "--embedding_bits",
    )
    parser.add_argument(
        "--eval_split", default="test", choices=("test", "val", "none"), help="data to evaluate"
    )
    parser.add_argument("--eval_samples", type=int, default=None, help="at most this many")
    parser.add_argument(
        "--calibration_samples", type=int, default=256, help="training samples, static int8"
    )
    parser.add_argument("--latency_rounds", type=int, default=5, help="0: no timing")
    parser.add_argument("--sequence_length", type=int, default=64, help="tokens in the timing")
    return parser


def _samples(loader: Any, limit: int | None) -> Iterator[Any]:
    """The batches of ``loader`` cut to ``limit`` samples in all (all of them for ``None``)."""
    left = limit
    for batch in loader:
        if left is not None and left <= 0:
            return
        size = len(batch["input_ids"])
        if left is not None and size > left:
            batch = {k: v[:left] for k, v in batch.items()}
        yield batch
        if left is not None:
            left -= size


def load_run(
    config_args: Sequence[str], ckpt_path: str | os.PathLike[str], needs_quantization: bool = False
) -> tuple[Any, Any, Any, Any]:
    """The task and data module a run's configuration builds (``config_args`` as for ``fit``:
    ``["--config", "RUN.yaml", ...]``) with the checkpoint's weights, converted as the run's
    ``QATHook`` would; returns ``(task, datamodule, QATHook or None, ThreeDPlan or None)``.

    Raises:
        ValueError: ``needs_quantization`` and the run has no ``QATHook``; the checkpoint does
            not fit the configured model.
    """
    from lightning_3d.callbacks import PlanCoordinator, QATHook
    from lightning_3d.checkpoints import load_run_weights

    cli = _ExportCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        run=False,
        args=list(config_args),
    )
    qat = next((c for c in cli.run_callbacks if isinstance(c, QATHook)), None)
    if needs_quantization and qat is None:
        raise ValueError(
            "format 'torchao' holds a model quantized by QATHook, and this run's configuration "
            "has none: use onnx-int8 for an int8 model"
        )
    plan = next((c.plan for c in cli.run_callbacks if isinstance(c, PlanCoordinator)), None)
    return load_run_weights(cli.model, ckpt_path, qat), cli.datamodule, qat, plan


def run_export(args: Sequence[str]) -> Any:
    """``lightning-3d export``: check the options, build the run's model and data from its
    configuration, load the checkpoint (converted as the run's ``QATHook`` would), then
    :func:`lightning_3d.export.export`; prints the report's table and returns the report."""
    from lightning_3d.export import INT8_SCHEMES, check_formats, export, prepare_output_dir
    from lightning_3d.generation import GENERATOR_FORMATS, check_generator_arguments
    from lightning_3d.tasks import CausalLMTask
    from lightning_3d.vocabulary import rows_held_apart

    options, run_args = _export_parser().parse_known_args(list(args))
    generators = [f for f in dict.fromkeys(options.formats) if f in GENERATOR_FORMATS]
    requested = [f for f in options.formats if f not in GENERATOR_FORMATS]
    try:
        formats = check_formats(requested) if requested or not generators else ()
    except ValueError as error:
        raise ValueError(f"{error}; for causal LMs also {tuple(GENERATOR_FORMATS)}") from error
    if generators:
        check_generator_arguments(None, 32)  # onnxruntime-genai is installed
    if options.int8_scheme not in INT8_SCHEMES:
        raise ValueError(f"--int8_scheme {options.int8_scheme!r}: choose from {INT8_SCHEMES}")
    if not os.path.exists(options.ckpt_path):
        raise FileNotFoundError(f"--ckpt_path {options.ckpt_path} does not exist")
    static = "onnx-int8" in formats and options.int8_scheme == "static"
    if static and options.calibration_samples < 1:
        raise ValueError(f"--calibration_samples must be >= 1, got {options.calibration_samples}")
    created = not os.path.exists(options.output)
    if not options.overwrite:
        prepare_output_dir(options.output)  # refuses a non-empty folder before any work
    try:
        task, data, qat, plan = load_run(
            run_args, options.ckpt_path, needs_quantization="torchao" in formats
        )
        if generators and not isinstance(task, CausalLMTask):
            raise ValueError(
                f"formats {generators} are decoders for generation: this run's model is a "
                f"{type(task).__name__}, not a CausalLMTask"
            )
        if options.unseen_token_bits is not None and not rows_held_apart(task.model):
            raise ValueError(
                f"--unseen_token_bits {options.unseen_token_bits} sets the bits of the rows a "
                "trimmed vocabulary holds apart, and this run's model holds none apart (its "
                "plan needs vocabulary='train' and unseen_tokens='pretrained')"
            )
    except Exception:
        if created and os.path.isdir(options.output) and not os.listdir(options.output):
            os.rmdir(options.output)  # leave nothing behind for a run that did not start
        raise
    eval_data = calibration = None
    if options.eval_split != "none":
        data.setup("test" if options.eval_split == "test" else "validate")
        loader = data.test_dataloader() if options.eval_split == "test" else data.val_dataloader()
        eval_data = list(_samples(loader, options.eval_samples))
    if static:
        data.setup("fit")
        calibration = list(_samples(data.train_dataloader(), options.calibration_samples))
    report = None
    if formats:
        report = export(
            task.model,
            task.tokenizer,
            options.output,
            formats,
            eval_data,
            quantization=qat.recipe if qat else None,
            int8_scheme=options.int8_scheme,
            embedding_bits=options.embedding_bits or getattr(plan, "embedding_bits", None) or 8,
            unseen_token_bits=(
                options.unseen_token_bits or getattr(plan, "unseen_token_bits", None)
            ),
            calibration_data=calibration,
            overwrite=options.overwrite,  # (checked above, before the model was built)
            latency_rounds=options.latency_rounds,
            sequence_length=options.sequence_length,
        )
        print(report.table())
    if generators:
        table = options.embedding_bits or getattr(plan, "embedding_bits", None)
        _export_generators(task, data, options, generators, table)
    print(f"written to {options.output} (reports beside the formats)")
    return report


def _export_generators(
    task: Any, data: Any, options: Any, formats: list[str], embedding_bits: int | None
) -> None:
    """The GenAI formats of ``lightning-3d export``: scored on the evaluation split when its
    samples are prompts with answers (``RottenTomatoesPrompts``), timed in tokens/s; LoRA
    adapters kept beside a base trained on the runtime's grid (the task's ``lora_deployment``);
    ``genai-int8``'s token table at ``embedding_bits``."""
    from lightning_3d.generation import export_generators, generator_table

    dataset = None if options.eval_split == "none" else data.splits.get(options.eval_split)
    scored = dataset is not None and hasattr(dataset, "answers")
    count = len(dataset) if scored else 0
    if scored and options.eval_samples is not None:
        count = min(count, options.eval_samples)
    reports = export_generators(
        task.model,
        task.tokenizer,
        options.output,
        formats,
        prompts=list(dataset.prompts[:count]) if scored else None,
        answers=dataset.answers if scored else None,
        labels=list(dataset.classes[:count]) if scored else None,
        rounds=options.latency_rounds,
        overwrite=options.overwrite,
        lora=task.lora_deployment,
        embedding_bits=embedding_bits,
    )
    print(generator_table(reports))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-3d`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("lightning_3d").setLevel(logging.INFO)
        run_export(argv[1:])
        return
    Lightning3DCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        args=None if args is None else argv,  # None: LightningCLI reads sys.argv itself
    )


if __name__ == "__main__":
    main()
