"""The ``lightning-3d`` command: LightningCLI with our tasks, data and logging defaults.

Usage::

    lightning-3d fit --config examples/configs/rt_minilm_baseline.yaml
    lightning-3d test --config examples/configs/rt_minilm_baseline.yaml --ckpt_path PATH
    lightning-3d fit --config examples/configs/hamlet_smollm2_lora.yaml --trainer.max_steps 50

What it adds to plain LightningCLI:

* the model's tokenizer is handed to the data module (``data.init_args.tokenizer`` is linked
  to the instantiated model), so the two can never disagree;
* when ``trainer.logger`` is left at its default, runs log to W&B (offline without credentials,
  see :mod:`lightning_3d.loggers`) and to CSV under ``trainer.default_root_dir``;
* ``--test_after_fit true`` tests the best checkpoint right after ``fit``;
* a top-level ``plan:`` (:class:`~lightning_3d.plan.ThreeDPlan`: ``data_budget``, ``trainable``,
  ``sparsity``, ``weight_bits``, ...) puts the plan's callbacks before ``trainer.callbacks``;
* every run is seeded (``seed_everything: 42`` unless set).
"""

from __future__ import annotations

import os
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_3d.strategies  # noqa: F401  (registers strategy names such as "fsdp_compressed")
from lightning_3d.loggers import default_loggers
from lightning_3d.plan import ThreeDPlan


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


def _tokenizer_of(model: Any) -> Any:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"{type(model).__name__} has no `tokenizer` attribute for the data module to use; "
            "lightning-3d tasks load one from their model"
        )
    return tokenizer


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-3d`` console script."""
    Lightning3DCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


if __name__ == "__main__":
    main()
