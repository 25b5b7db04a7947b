"""``VocabularyTrimmer``: the model axis's cheapest cut -- embedding rows of tokens the data never
uses.

Life cycle: ``setup("fit")`` reads every training sample once (the data module's training
dataset in order, not the epoch's sampler; or ``token_ids`` given), takes the union of the ids
over the ranks, and replaces the model's input embedding by a
:class:`~lightning_3d.vocabulary.TrimmedEmbedding` of those ids and the tokenizer's special
tokens, before the optimizer is built (so it never holds state for the dropped rows). A
``load_state_dict`` of weights (resume, ``trainer.test(ckpt_path=...)``) first makes the
model's embedding fit them (a load pre-hook): trimmed like the checkpoint (its table of rows
wins over the data's), or whole again for a checkpoint of an untrimmed run.

Example:
    >>> from lightning import Trainer
    >>> trainer = Trainer(callbacks=[VocabularyTrimmer()])  # doctest: +SKIP
    >>> trainer.fit(task, datamodule=data)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_3d.checkpoints import refuse_late_checkpoint_loading
from lightning_3d.loggers import log_axis_metrics
from lightning_3d.vocabulary import (
    UNSEEN,
    TrimmedEmbedding,
    every_sample,
    observed_token_ids,
    special_token_ids,
    trim_like_state,
    trim_vocabulary,
)

log = logging.getLogger(__name__)


def _language_model(pl_module: LightningModule) -> nn.Module:
    """The Hugging Face model of a task (``pl_module.model``), or the module itself."""
    model = getattr(pl_module, "model", pl_module)
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise ValueError(
            "VocabularyTrimmer needs a Hugging Face model: the LightningModule's `model` "
            f"attribute (or the module itself) with get_input_embeddings; got "
            f"{type(model).__name__}"
        )
    return model


class VocabularyTrimmer(Callback):
    """Keep only the input-embedding rows of the tokens in the training data.

    Args:
        token_ids: the ids to keep besides the tokenizer's special tokens; ``None``: every id
            in the ``input_ids`` of the data module's training dataset (read once, in order,
            before the first step; torch's global random state is left as it was), united
            over the ranks.
        unknown_token_id: the tokenizer's unknown token (always kept); ``None``: the task's
            ``tokenizer.unk_token_id``.
        unseen: what an id that was not kept reads: ``"unknown"``, the unknown token's row, or
            ``"nearest"``, the row of the kept token nearest to its own pretrained row (cosine
            similarity, :func:`~lightning_3d.vocabulary.nearest_kept`): a word first seen at
            test time is read as a similar word rather than as unknown, at no cost in size;
            or ``"pretrained"``, its own pretrained row, held apart and never trained: the
            model computes what the untrimmed one would (AdamW's update of a row without
            gradient is zero), the exports keep every row, and training still saves the
            dropped rows' gradients and optimizer state.

    Logged: ``vocabulary/kept_ids`` and ``vocabulary/kept_share`` (of the tokenizer's ids).

    Raises (at ``setup``, before training): ``ValueError`` when the model is not a Hugging
    Face model, its input embedding is not a plain ``nn.Embedding`` or shares its weight (a
    tied language-model head), there is neither ``token_ids`` nor a data module, no unknown
    token is known, or the strategy loads checkpoints after building the optimizer (FSDP,
    DeepSpeed, model-parallel).

    Example:
        >>> VocabularyTrimmer(token_ids=[101, 102, 2204]).token_ids
        [101, 102, 2204]
    """

    #: The plan's name of this axis.
    axis = "vocabulary"

    def __init__(
        self,
        token_ids: Sequence[int] | None = None,
        unknown_token_id: int | None = None,
        unseen: str = "unknown",
    ) -> None:
        if token_ids is not None and any(int(i) < 0 for i in token_ids):
            raise ValueError("token_ids must be non-negative token ids")
        if unseen not in UNSEEN:
            raise ValueError(f"unseen must be one of {UNSEEN}, got {unseen!r}")
        self.unseen = unseen
        self.token_ids = None if token_ids is None else [int(i) for i in token_ids]
        self.unknown_token_id = unknown_token_id
        self._hook: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        model = _language_model(pl_module)
        refuse_late_checkpoint_loading(trainer.strategy, "VocabularyTrimmer", "a trimmed embedding")
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._before_state_load)
        if stage != "fit" or isinstance(model.get_input_embeddings(), TrimmedEmbedding):
            return  # trimmed already (fitted before in this process); loads trim themselves
        special, unknown = self._specials(pl_module)
        kept = observed_token_ids(self._training_ids(trainer), always=special)
        if trainer.world_size > 1:  # ranks may hold different data: keep every rank's ids
            present = torch.zeros(model.get_input_embeddings().num_embeddings)
            present[kept] = 1.0
            present = trainer.strategy.reduce(
                present.to(trainer.strategy.root_device), reduce_op="sum"
            )
            kept = torch.nonzero(present.cpu() > 0).flatten()
        trim_vocabulary(model, kept, unknown, self.unseen)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        embedding = _language_model(pl_module).get_input_embeddings()
        if not isinstance(embedding, TrimmedEmbedding):  # resumed from an untrimmed run
            rank_zero_warn(
                "VocabularyTrimmer: the run resumed from a checkpoint of an untrimmed model; "
                "the vocabulary stays whole (trimming now would drop optimizer state)"
            )
            return
        share = embedding.kept / embedding.num_embeddings
        metrics = {"vocabulary/kept_ids": embedding.kept, "vocabulary/kept_share": share}
        log_axis_metrics(trainer, metrics)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _specials(self, pl_module: LightningModule) -> tuple[list[int], int]:
        tokenizer = getattr(pl_module, "tokenizer", None)
        if self.unknown_token_id is not None:
            special = getattr(tokenizer, "all_special_ids", ())
            return sorted({*special, self.unknown_token_id}), self.unknown_token_id
        if tokenizer is None:
            raise ValueError(
                "VocabularyTrimmer: the module has no `tokenizer` to take the unknown token "
                "from; pass unknown_token_id"
            )
        return special_token_ids(tokenizer)

    def _training_ids(self, trainer: Trainer) -> Any:
        if self.token_ids is not None:
            return [torch.tensor(self.token_ids)]
        if trainer.datamodule is None:
            raise ValueError(
                "VocabularyTrimmer reads the training data from the data module "
                "(trainer.fit(..., datamodule=...)); without one, pass token_ids"
            )
        return every_sample(trainer.datamodule.train_dataloader())

    def _before_state_load(
        self, module: nn.Module, state: dict[str, Any], prefix: str, *_: Any
    ) -> None:
        """Make ``module``'s embedding fit the state about to load (its children load after
        this): trimmed like it, or whole again."""
        local = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        for name in trim_like_state(module, local):
            log.info("vocabulary at %s made to fit the checkpoint", name)
