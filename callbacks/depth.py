"""``DepthPruner``: the model axis's whole-block cut -- the decoder blocks that change their
input least removed before the first step, so every step of the run computes fewer blocks.

Life cycle: ``setup("fit")`` runs the first ``batches`` batches of the training data (the data
module's training dataset in order, not the epoch's sampler) through the model without
gradients, adds each block's influence over the ranks
(:func:`~lightning_3d.depth.block_influence`) and deletes the ``blocks`` of lowest influence
(:func:`~lightning_3d.depth.remove_blocks`), before the optimizer is built. A
``load_state_dict`` of weights that hold fewer blocks than the model (resume,
``trainer.test(ckpt_path=...)`` on a fresh model) first cuts the model to their depth (a load
pre-hook): every block's weights then come from the checkpoint.

Example:
    >>> from lightning import Trainer
    >>> trainer = Trainer(callbacks=[DepthPruner(blocks=6)])  # doctest: +SKIP
    >>> trainer.fit(task, datamodule=data)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_3d.checkpoints import refuse_late_checkpoint_loading
from lightning_3d.depth import (
    REMOVED_KEY,
    block_influence,
    cut_like_state,
    decoder_blocks,
    least_influential,
    remove_blocks,
)
from lightning_3d.loggers import log_axis_metrics
from lightning_3d.vocabulary import every_sample

log = logging.getLogger(__name__)


class DepthPruner(Callback):
    """Remove the ``blocks`` decoder blocks of lowest block influence before training.

    Args:
        blocks: how many blocks to remove, at least 1 (at least one block must stay).
        batches: training batches the influence is measured on (forward passes only).

    Logged: ``depth/removed_blocks`` and ``depth/kept_blocks``; the model's config records the
    removed blocks' original indices (``removed_layers``, saved with the model).

    Raises (at ``setup``, before training): ``ValueError`` when the LightningModule's ``model``
    (or the module itself) has no Hugging Face config with ``num_hidden_layers`` and a list of
    that many blocks, ``blocks`` leaves none, there is no data module, or the strategy loads
    checkpoints after building the optimizer (FSDP, DeepSpeed, model-parallel).

    Example:
        >>> DepthPruner(blocks=6).blocks
        6
        >>> DepthPruner(blocks=0)
        Traceback (most recent call last):
        ...
        ValueError: DepthPruner: blocks must be an integer >= 1, got 0
    """

    #: The plan's name of this axis.
    axis = "depth"

    def __init__(self, blocks: int, batches: int = 8) -> None:
        for name, value in (("blocks", blocks), ("batches", batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DepthPruner: {name} must be an integer >= 1, got {value!r}")
        self.blocks = blocks
        self.batches = batches
        #: the removed blocks' indices in the original model, once removed
        self.removed: list[int] = []
        self._hook: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = getattr(pl_module, "model", pl_module)
        blocks = decoder_blocks(model)  # refuses a model without a stack of blocks
        refuse_late_checkpoint_loading(trainer.strategy, "DepthPruner", "the removed blocks")
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *_: self._fit_depth(module, state, prefix)
            )
        cut_here = bool(self.removed) and getattr(model.config, REMOVED_KEY, None) == self.removed
        if stage != "fit" or cut_here:
            return  # cut already (fitted before in this process); loads cut themselves
        depth = len(blocks)
        if self.blocks >= depth:
            raise ValueError(
                f"DepthPruner: blocks={self.blocks} would remove every one of the model's "
                f"{depth} blocks; at most {depth - 1}"
            )
        if trainer.datamodule is None:
            raise ValueError(
                "DepthPruner measures block influence on the data module's training data "
                "(trainer.fit(..., datamodule=...))"
            )
        loader = every_sample(trainer.datamodule.train_dataloader())
        sums, tokens = block_influence(model, itertools.islice(loader, self.batches))
        if trainer.world_size > 1:  # every rank must remove the same blocks
            both = torch.cat([sums, tokens.reshape(1)]).to(trainer.strategy.root_device)
            both = trainer.strategy.reduce(both, reduce_op="sum").cpu()
            sums, tokens = both[:-1], both[-1]
        influence = sums / tokens
        self.removed = remove_blocks(model, least_influential(influence, self.blocks))
        log.info(
            "DepthPruner: removed blocks %s of %d (influence %s)",
            self.removed,
            depth,
            [round(float(v), 4) for v in influence],
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = getattr(pl_module, "model", pl_module)
        if self.removed:  # a resumed run's checkpoint says which blocks it removed
            setattr(model.config, REMOVED_KEY, list(self.removed))
        kept = len(decoder_blocks(model))
        metrics = {"depth/removed_blocks": len(self.removed), "depth/kept_blocks": kept}
        log_axis_metrics(trainer, metrics)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def state_dict(self) -> dict[str, Any]:
        return {"removed": list(self.removed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.removed = [int(i) for i in state_dict["removed"]]

    def _fit_depth(self, module: nn.Module, state: dict[str, Any], prefix: str) -> None:
        """Cut ``module``'s stack to the depth of the weights about to load (its children load
        after this)."""
        depth = cut_like_state(module, state, prefix)
        if depth is not None:
            log.info("DepthPruner: model cut to the checkpoint's %d blocks", depth)
