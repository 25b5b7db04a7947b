"""``CurriculumSampler``: which samples each epoch trains on, and in what order.

The callback scores every training sample from what the normal training steps already compute,
plans each epoch with :class:`lightning_3d.curriculum.CurriculumSchedule` (warm-up, data budget,
pacing from easy to hard) and serves that plan through a sampler it puts into the training
``DataLoader`` itself. What it needs from a user's code:

* items that carry their dataset position under ``"index"`` (the built-in data modules do; wrap any
  other map-style dataset in :class:`lightning_3d.data.WithIndex`);
* ``training_step`` returning a dict with ``"loss"`` and, for ``score="loss"``,
  ``"per_sample_loss"`` (detached, ``[B]``); for ``"el2n"``/``"grand"``, ``"logits"`` (``[B, C]``)
  with ``batch["labels"]``;
* with ``rescale_loss=True``: the loss weighted by ``batch["sample_weight"]`` when present,
  ``loss = (per_sample_loss * batch["sample_weight"]).mean()``;
* with ``scoring_epochs``: a ``score_batch(batch)`` method returning what ``training_step`` does.

Every rank plans from the same all-gathered scores with the same seeded generators, so the global
order is identical everywhere and each rank takes an equal-length part of it. Epoch lengths change
with the plan; the callback makes Lightning reload the training ``DataLoader`` every epoch to pick
them up, and :meth:`CurriculumSampler.planned_optimizer_steps` gives the exact number of steps of
the run for learning-rate schedules (the built-in tasks use it).

Example:
    >>> from lightning import Trainer
    >>> curriculum = CurriculumSampler(pacing="linear", budget=0.5)
    >>> trainer = Trainer(max_epochs=3, callbacks=[curriculum])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.data_connector import _parse_num_batches
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import _update_dataloader, extract_batch_size
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_3d.curriculum import (
    CurriculumSchedule,
    el2n,
    fold_epoch_scores,
    grand_last_layer,
    rank_shard,
    shard_length,
)
from lightning_3d.loggers import log_histogram

SCORES = ("loss", "el2n", "grand", "quality")
STATE_VERSION = 1
_INDEX_HELP = (
    "CurriculumSampler attaches scores to samples by their dataset position: each item must be a "
    "dict with an 'index' entry (the built-in data modules do this; wrap another map-style "
    "dataset in lightning_3d.data.WithIndex)"
)


@dataclass
class EpochPlan:
    """The global order of one epoch and, with ``budget_drops="easiest_random"``, item weights."""

    epoch: int
    order: torch.Tensor
    weights: torch.Tensor | None


class CurriculumOrder(DistributedSampler):
    """Yields this rank's part of the current epoch plan, after the samples already consumed.

    A ``DistributedSampler`` subclass, so Lightning never replaces or re-wraps it (with
    ``use_distributed_sampler`` on or off). Its length is that of the whole part even after a
    mid-epoch resume: Lightning counts the batches it already ran, and this sampler skips them.
    """

    def __init__(
        self, dataset: Any, curriculum: CurriculumSampler, num_replicas: int, rank: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.curriculum = curriculum

    def __len__(self) -> int:
        return shard_length(self.curriculum.current_epoch_size(), self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        # The body runs at the first ``next``, once the epoch has started and its plan is final.
        part = rank_shard(self.curriculum.current_plan().order, self.rank, self.num_replicas)
        yield from part[self.curriculum.consumed_samples :].tolist()


class CurriculumSampler(Callback):
    """Score samples while training, pace them from easy to hard, and train on a data budget.

    Each epoch ``e`` (see :class:`~lightning_3d.curriculum.CurriculumSchedule` for the math):
    ``warmup_epochs`` epochs of all data in random order first; then the budget keeps
    ``ceil(budget * n)`` samples, pacing keeps the easiest ``c(t)`` fraction of those, and the
    epoch visits them once in a seeded random order. Scores are per-sample values folded into an
    EMA across epochs (``s <- ema_decay * s + (1 - ema_decay) * epoch_mean``):

    * ``"loss"``: the training loss; ``"el2n"``: ``||softmax(z) - onehot(y)||``;
    * ``"grand"``: the last layer's per-sample gradient norm ``||p - y|| sqrt(||h||^2 + 1)``, with
      ``h`` the input of the ``head`` module caught by a forward hook (no extra backward);
    * ``"quality"``: a static column ``item[quality_key]``, higher is better, read once.

    Args:
        score: how difficulty is measured, one of ``"loss"``, ``"el2n"``, ``"grand"``,
            ``"quality"``.
        pacing: ``"none"``, ``"linear"``, ``"root"``, ``"step"`` or ``"exponential"``.
        start_fraction: share of the kept data in play at the first curriculum epoch.
        full_at: progress (0-1 over the curriculum epochs) at which all kept data is in play.
        stages: number of steps of the ``"step"`` pacing.
        hardest_first: anti-curriculum: pace from hard to easy instead.
        budget: share of the data kept every epoch after warm-up (1 keeps all).
        budget_drops: ``"hardest"`` drops the highest-difficulty samples (quality filtering:
            mislabelled samples end up there), ``"easiest_random"`` drops well-learned samples at
            random (InfoBatch).
        rescale_loss: with ``"easiest_random"``, put ``batch["sample_weight"]`` in every batch
            so that weighting per-sample losses with it keeps the epoch's gradient unbiased.
        anneal: share of the epochs at the end that train on all data again (InfoBatch's
            annealing; ``floor(anneal * epochs)`` epochs), in ``[0, 1)``.
        warmup_epochs: epochs on all data before the curriculum starts; default 1 for
            training-signal scores (they need one epoch of observations), 0 for ``"quality"``.
            When the default would leave no epoch for the curriculum (a budget in a one-epoch
            run), the samples are scored by a forward-only pass before training instead
            (``prescore``, logged), so ``budget=0.5`` with ``max_epochs=1`` trains on half.
        epochs: epochs the pacing spans; default ``Trainer(max_epochs)``.
        ema_decay: weight of the previous score in the per-epoch EMA.
        quality_key: item key of the static score for ``score="quality"``.
        scoring_epochs: after these epochs (0-based), score every sample in an extra
            forward-only pass (``pl_module.score_batch``), so dropped samples are re-scored too.
        prescore: score every sample in a forward-only pass before the first epoch, so the
            curriculum needs no warm-up epoch (``warmup_epochs=0`` with any score); a
            :class:`~lightning_3d.callbacks.PlanCoordinator` does it in its signal pass.
        head: name of the classifier module whose input ``"grand"`` uses; default: the last
            ``torch.nn.Linear`` of the module.
        balance_classes: choose the budget's and the pacing's samples within each class (from
            one integer ``labels`` value per sample), keeping every class's share of the data;
            choosing by loss alone can keep mostly one class. Ignored for other labels.
        seed: seeds every epoch's shuffle and random drop (with the epoch number).
        gather_every: batches whose per-sample values each rank keeps on its device before one
            ``all_gather`` (and one copy to the host) adds every rank's to the epoch's sums;
            the sums are complete at every epoch's end and in every checkpoint, so the plans do
            not depend on it. 1 gathers after every batch.

    Example:
        >>> CurriculumSampler(score="loss", budget=0.3).schedule.budget
        0.3
    """

    def __init__(
        self,
        score: str = "loss",
        pacing: str = "none",
        start_fraction: float = 0.2,
        full_at: float = 0.5,
        stages: int = 4,
        hardest_first: bool = False,
        budget: float = 1.0,
        budget_drops: str = "hardest",
        rescale_loss: bool = False,
        anneal: float = 0.0,
        warmup_epochs: int | None = None,
        epochs: int | None = None,
        ema_decay: float = 0.5,
        quality_key: str = "quality",
        scoring_epochs: Sequence[int] = (),
        prescore: bool = False,
        head: str | None = None,
        balance_classes: bool = True,
        seed: int = 0,
        gather_every: int = 32,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        self._warmup_defaulted = warmup_epochs is None
        if warmup_epochs is None:
            warmup_epochs = 0 if score == "quality" or prescore else 1
        # Validates pacing, budget and warm-up now; ``epochs`` is settled in ``setup``.
        self.schedule = CurriculumSchedule(
            pacing, start_fraction, full_at, stages, hardest_first, budget, budget_drops,
            warmup_epochs, epochs or warmup_epochs + 1,
        )  # fmt: skip
        if warmup_epochs == 0 and score != "quality" and not prescore:
            raise ValueError(
                f"score={score!r} is measured during training, so warmup_epochs must be >= 1 "
                "(one epoch on all data scores every sample) or prescore=True (a forward pass "
                "scores them before training); got 0. A static score needs no warm-up: "
                "score='quality' with a quality_key column."
            )
        if prescore and score == "quality":
            raise ValueError("prescore scores from the model; score='quality' is static")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        if rescale_loss and budget_drops != "easiest_random":
            raise ValueError(
                "rescale_loss=True needs budget_drops='easiest_random': only a random drop of "
                f"well-learned samples can be made unbiased by weights (got {budget_drops!r})"
            )
        if not 0.0 <= anneal < 1.0:
            raise ValueError(f"anneal must be in [0, 1), got {anneal}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if any(epoch < 0 for epoch in scoring_epochs):
            raise ValueError(f"scoring_epochs must be epoch numbers >= 0, got {scoring_epochs}")
        if scoring_epochs and score == "quality":
            raise ValueError("scoring_epochs re-scores from the model; score='quality' is static")
        if isinstance(gather_every, bool) or not isinstance(gather_every, int) or gather_every < 1:
            raise ValueError(f"gather_every must be a positive integer, got {gather_every!r}")
        self.score = score
        self.prescore = prescore
        self.rescale_loss = rescale_loss
        self.anneal = anneal
        self.ema_decay = ema_decay
        self.quality_key = quality_key
        self.scoring_epochs = frozenset(scoring_epochs)
        self.head = head
        self.balance_classes = balance_classes
        self.seed = seed
        self.gather_every = gather_every
        self._pending: list[torch.Tensor] = []  # [3, B] per batch: index, value, class
        self._epochs = epochs
        self._trainer: Trainer | None = None
        self._count: int | None = None
        self._plan: EpochPlan | None = None
        self._batches_done = 0
        self._batch_size = 1
        self._drop_last = False
        self._collate: Any = None
        self._dataset: Any = None
        self.sampler: CurriculumOrder | None = None
        self.samples_seen = 0
        self._restore_source: Any = None
        self._head_hook: Any = None
        self._features: torch.Tensor | None = None
        self._weights_checked = False

    # -- state --------------------------------------------------------------------------------
    def _init_scores(self, count: int) -> None:
        self._count = count
        self.scores = torch.zeros(count, dtype=torch.float32)
        self.seen = torch.zeros(count, dtype=torch.bool)
        self._epoch_sum = torch.zeros(count, dtype=torch.float64)
        self._epoch_count = torch.zeros(count, dtype=torch.int64)
        self.labels = torch.full((count,), -1, dtype=torch.int64)  # -1: not known

    @property
    def consumed_samples(self) -> int:
        """Samples of this rank's part of the current epoch already trained on."""
        return self._batches_done * self._batch_size

    def difficulty(self) -> torch.Tensor:
        """Per-sample difficulty (lower is easier); unseen samples get the mean of seen ones."""
        if self.score == "quality":
            return -self.scores
        seen_mean = self.scores[self.seen].mean() if self.seen.any() else torch.tensor(0.0)
        return torch.where(self.seen, self.scores, seen_mean)

    def _current_epoch(self) -> int:
        if self._trainer is None or self._count is None:
            raise RuntimeError("CurriculumSampler is not attached to a training run")
        return self._trainer.current_epoch

    def current_epoch_size(self) -> int:
        """Samples the trainer's current epoch visits (known without scores)."""
        epoch = self._current_epoch()
        assert self._count is not None  # checked by _current_epoch
        return self.schedule.epoch_size(self._count, epoch)

    def current_plan(self) -> EpochPlan:
        """The plan of the trainer's current epoch, made on first request from current scores."""
        epoch = self._current_epoch()
        if self._plan is None or self._plan.epoch != epoch:
            known = self.labels >= 0
            groups = self.labels if self.balance_classes and known.any() else None
            order, weights = self.schedule.plan(self.difficulty(), epoch, self.seed, groups)
            self._plan = EpochPlan(epoch, order, weights)
            self._batches_done = 0
            rank_zero_info(
                f"CurriculumSampler: epoch {epoch} trains on {order.numel():,} of "
                f"{self._count:,} samples ({order.numel() / self._count:.1%})"
            )
        return self._plan

    def state_dict(self) -> dict[str, Any]:
        if self._count is None:
            return {}
        self._flush()  # every rank saves a checkpoint together: the gather is collective
        plan = self._plan
        return {
            "version": STATE_VERSION,
            "count": self._count,
            "scores": self.scores.clone(),
            "seen": self.seen.clone(),
            "epoch_sum": self._epoch_sum.clone(),
            "epoch_count": self._epoch_count.clone(),
            "labels": self.labels.clone(),
            "plan": None if plan is None else (plan.epoch, plan.order, plan.weights),
            "batches_done": self._batches_done,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._init_scores(int(state_dict["count"]))
        self.scores.copy_(state_dict["scores"])
        self.seen.copy_(state_dict["seen"])
        self._epoch_sum.copy_(state_dict["epoch_sum"])
        self._epoch_count.copy_(state_dict["epoch_count"])
        self.labels.copy_(state_dict["labels"])
        plan = state_dict["plan"]
        self._plan = None if plan is None else EpochPlan(*plan)
        self._batches_done = int(state_dict["batches_done"])
        self.samples_seen = int(state_dict["samples_seen"])

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pending.clear()  # what an earlier fit stopped with belongs to no epoch of this one
        epochs = self._epochs or trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                "CurriculumSampler paces over epochs: set Trainer(max_epochs=...) or "
                "CurriculumSampler(epochs=...)"
            )
        schedule = self.schedule
        annealed = int(self.anneal * epochs)
        no_room = schedule.warmup_epochs + annealed >= epochs and (
            schedule.pacing != "none" or schedule.budget < 1
        )
        scorable = callable(getattr(pl_module, "score_batch", None))
        if no_room and self._warmup_defaulted and annealed < epochs and scorable:
            rank_zero_info(
                f"CurriculumSampler: {epochs} epoch(s) leave no room for a warm-up epoch, so "
                "every sample is scored by a forward-only pass before training (prescore=True, "
                "warmup_epochs=0)"
            )
            self.prescore, no_room = True, False
            schedule = dataclasses.replace(schedule, warmup_epochs=0)
        if no_room:
            raise ValueError(
                f"warmup_epochs={schedule.warmup_epochs} and {annealed} annealing epochs leave "
                f"no epoch for the curriculum out of epochs={epochs}; train longer, lower "
                "warmup_epochs or anneal, or give the LightningModule a `score_batch(batch)` "
                "method (then a forward-only pass scores the samples before training)"
            )
        self.schedule = dataclasses.replace(schedule, epochs=epochs, anneal_epochs=annealed)
        if (self.scoring_epochs or self.prescore) and not callable(
            getattr(pl_module, "score_batch", None)
        ):
            raise ValueError(
                "scoring_epochs and prescore need a `score_batch(batch)` method on the "
                "LightningModule that returns what training_step returns (per_sample_loss, "
                "index, logits) without logging; the built-in tasks have one"
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            rank_zero_info(
                "CurriculumSampler: epoch lengths follow the plan, so the training DataLoader is "
                "reloaded every epoch (reload_dataloaders_every_n_epochs=1)"
            )
            trainer.reload_dataloaders_every_n_epochs = 1
        # Lightning cannot see that this callback's state resumes the sampler mid-epoch.
        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
        self._trainer = trainer
        source = trainer.fit_loop._data_source
        request = source.dataloader
        source.dataloader = lambda: self._attach(trainer, request())
        self._restore_source = source

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.score == "grand":
            head = self._find_head(pl_module)
            self._head_hook = head.register_forward_hook(self._catch_features)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.prescore and not self.seen.any():  # not scored by a coordinator or a checkpoint
            self._scoring_pass(trainer, pl_module)
            self.fold_scores()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self._restore_source is not None:
            del self._restore_source.dataloader  # the instance attribute hid the method
            self._restore_source = None
        if self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def _find_head(self, pl_module: LightningModule) -> torch.nn.Module:
        modules = dict(pl_module.named_modules())
        if self.head is not None:
            if self.head not in modules:
                raise ValueError(
                    f"head={self.head!r} is not a module of {type(pl_module).__name__}; "
                    f"its last modules are {list(modules)[-5:]}"
                )
            return modules[self.head]
        linears = [m for m in modules.values() if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError("score='grand' needs a torch.nn.Linear head; name it with `head=`")
        return linears[-1]

    def _catch_features(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        self._features = inputs[0].detach()

    def _attach(self, trainer: Trainer, loader: Any) -> DataLoader:
        """Put a :class:`CurriculumOrder` into the user's training ``DataLoader``."""
        if not isinstance(loader, DataLoader):
            raise ValueError(
                "CurriculumSampler orders a single torch DataLoader; the training data is a "
                f"{type(loader).__name__}"
            )
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                "CurriculumSampler needs a map-style dataset (with __len__ and __getitem__) to "
                "choose samples; the training dataset is iterable"
            )
        if loader.batch_size is None:
            raise ValueError(
                "CurriculumSampler chooses samples through the DataLoader's sampler; this "
                "DataLoader has a custom batch_sampler. Use batch_size= instead."
            )
        count = len(dataset)
        self._check_same_length_on_all_ranks(trainer, count)
        if self._count is None:
            self._init_scores(count)
        elif self._count != count:
            raise ValueError(
                f"the training dataset has {count} samples but CurriculumSampler's state was "
                f"built for {self._count} (a checkpoint of another dataset?)"
            )
        item = dataset[0]
        needs_index = self.score != "quality" or self.rescale_loss
        if needs_index and (not isinstance(item, Mapping) or "index" not in item):
            raise ValueError(f"{_INDEX_HELP}; the first item is {_describe(item)}")
        if self.score == "quality" and not self.seen.all():
            self._read_quality(dataset, item)
        self._batch_size = int(loader.batch_size)
        self._drop_last = loader.drop_last
        self._collate = loader.collate_fn
        self._dataset = dataset
        dp = trainer.distributed_sampler_kwargs or {}
        shard = trainer._accelerator_connector.use_distributed_sampler
        replicas, rank = (dp.get("num_replicas", 1), dp.get("rank", 0)) if shard else (1, 0)
        self.sampler = CurriculumOrder(dataset, self, replicas, rank)
        return _update_dataloader(loader, self.sampler, mode=RunningStage.TRAINING)

    def _check_same_length_on_all_ranks(self, trainer: Trainer, count: int) -> None:
        if trainer.world_size == 1:
            return
        device = trainer.strategy.root_device
        lengths = trainer.strategy.all_gather(torch.tensor([count], device=device)).flatten()
        if lengths.min() != lengths.max():
            raise ValueError(
                "CurriculumSampler needs the same training dataset on every rank; their lengths "
                f"are {lengths.tolist()}"
            )

    def _read_quality(self, dataset: Any, item: Any) -> None:
        if not isinstance(item, Mapping) or self.quality_key not in item:
            raise ValueError(
                f"score='quality' reads each item's {self.quality_key!r} value; the first item "
                f"is {_describe(item)}. Set quality_key to the right column."
            )
        items = [dataset[i] for i in range(len(dataset))]
        self.scores.copy_(torch.tensor([float(item[self.quality_key]) for item in items]))
        self.seen.fill_(True)
        if all(_is_class_label(item.get("labels")) for item in items):
            self.labels.copy_(torch.tensor([int(item["labels"]) for item in items]))

    # -- training -----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        plan = self.current_plan()
        if self.rescale_loss and plan.weights is not None:
            index = _batch_index(batch)
            batch["sample_weight"] = plan.weights[index.cpu()].to(index.device)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._batches_done += 1
        replicas = 1 if self.sampler is None else self.sampler.num_replicas
        self.samples_seen += replicas * extract_batch_size(batch)
        if self.rescale_loss and not self._weights_checked and "sample_weight" in batch:
            self._check_weighted_loss(outputs, batch, trainer.accumulate_grad_batches)
        if self.score != "quality":
            self._record(*self._values(outputs, batch))
        pl_module.log("curriculum/samples_seen", float(self.samples_seen), on_step=True)

    def _values(
        self, outputs: Any, batch: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """This batch's sample indices, score values and class labels (``class_label`` when the
        batch has it, as prompt-and-answer batches do; else ``labels`` when they are one class
        per sample; else ``None``) from ``training_step``'s outputs and the batch."""
        outputs = outputs if isinstance(outputs, Mapping) else {}
        batch_map = batch if isinstance(batch, Mapping) else {}
        index = outputs.get("index", batch_map.get("index"))
        if index is None:
            raise RuntimeError(f"{_INDEX_HELP}; this batch has no 'index'")
        labels = batch_map.get("class_label", outputs.get("labels", batch_map.get("labels")))
        classes = labels if _is_class_label(labels) and labels.shape == index.shape else None
        if self.score == "loss":
            values = outputs.get("per_sample_loss")
            if values is None:
                raise RuntimeError(
                    "score='loss' needs per-sample losses: return {'loss': loss, "
                    "'per_sample_loss': losses.detach(), 'index': batch['index']} from "
                    "training_step (the built-in tasks do)"
                )
            return index, values, classes
        logits = outputs.get("logits")
        if logits is None or labels is None or logits.dim() != 2:
            raise RuntimeError(
                f"score={self.score!r} needs [batch, classes] 'logits' in training_step's "
                "output and 'labels' in the batch (classification only)"
            )
        if self.score == "el2n":
            return index, el2n(logits, labels), classes
        if self._features is None:
            raise RuntimeError("score='grand': the head's forward hook saw no input")
        return index, grand_last_layer(logits, labels, self._features), classes

    def record_outputs(self, trainer: Trainer, outputs: Any, batch: Any) -> None:
        """Add one batch's scores (from ``training_step``/``score_batch`` outputs) of every rank
        to this epoch's sums; :meth:`fold_scores` folds them into the scores."""
        self._record(*self._values(outputs, batch))

    def fold_scores(self) -> None:
        """Fold the sums recorded since the last fold into the per-sample EMA scores."""
        self._flush()
        fold_epoch_scores(
            self.scores, self.seen, self._epoch_sum, self._epoch_count, self.ema_decay
        )
        self._epoch_sum.zero_()
        self._epoch_count.zero_()

    def _record(
        self,
        index: torch.Tensor,
        values: torch.Tensor,
        classes: torch.Tensor | None,
    ) -> None:
        """Keep one batch's values (and class labels); every ``gather_every`` batches, add those
        of every rank to this epoch's sums."""
        rows = [index, values, index.new_full(index.shape, -1) if classes is None else classes]
        self._pending.append(torch.stack([row.detach().double() for row in rows]))
        if len(self._pending) >= self.gather_every:
            self._flush()

    def _flush(self) -> None:
        """Add the kept batches of every rank to this epoch's sums: one ``all_gather`` and one
        host copy. Every rank calls it at the same points (after the same number of batches,
        at epoch ends and checkpoints), so the collective matches."""
        if not self._pending:
            return
        table = torch.cat(self._pending, dim=1)  # [3, N]: the same N on every rank
        self._pending.clear()
        assert self._trainer is not None  # set in setup, before anything is recorded
        strategy = self._trainer.strategy
        if strategy.world_size > 1:
            table = strategy.all_gather(table)  # [world, 3, N]
            table = table.permute(1, 0, 2).reshape(3, -1)
        table = table.cpu()
        positions = table[0].long()
        self._epoch_sum.index_add_(0, positions, table[1])
        self._epoch_count.index_add_(0, positions, torch.ones_like(positions))
        self.labels[positions] = table[2].long()

    def _check_weighted_loss(self, outputs: Any, batch: Any, accumulate: int) -> None:
        losses = outputs.get("per_sample_loss") if isinstance(outputs, Mapping) else None
        if losses is None:
            raise RuntimeError(
                "rescale_loss=True checks that the loss is weighted; return 'per_sample_loss' "
                "from training_step"
            )
        weighted = (losses.float() * batch["sample_weight"].float()).mean()
        loss = outputs["loss"].float()
        if not any(torch.allclose(loss * k, weighted, rtol=1e-4) for k in (1, accumulate)):
            raise RuntimeError(
                "rescale_loss=True but training_step ignored batch['sample_weight']: compute "
                "loss = (per_sample_loss * batch['sample_weight']).mean() when the key is there "
                f"(got loss {float(loss):.6g}, weighted mean {float(weighted):.6g})"
            )
        self._weights_checked = True

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plan = self.current_plan()
        if trainer.current_epoch in self.scoring_epochs:
            self._scoring_pass(trainer, pl_module)
        if self.score != "quality":
            self.fold_scores()
        assert self._count is not None
        kept = self.schedule.kept_size(self._count, plan.epoch)
        metrics = {
            "curriculum/fraction_in_play": plan.order.numel() / self._count,
            "curriculum/kept_fraction": kept / self._count,
        }
        scored = self.scores[self.seen]
        if scored.numel():
            quantiles = torch.quantile(scored.double(), torch.tensor([0.1, 0.5, 0.9]).double())
            for name, value in zip(("q10", "q50", "q90"), quantiles.tolist(), strict=True):
                metrics[f"curriculum/score_{name}"] = value
            log_histogram(trainer, "curriculum/scores", scored.float().numpy())
        pl_module.log_dict(metrics, on_step=False, on_epoch=True)

    def scoring_batches(self, trainer: Trainer, seed: int | None = None) -> Iterator[Any]:
        """This rank's part of every training sample, batched like training and moved to the
        device: what a scoring pass reads. In dataset order, or in an order shuffled with
        ``seed`` (so the first batches are a random draw)."""
        if self._count is None or self.sampler is None:
            raise RuntimeError("CurriculumSampler: the training data is not loaded yet")
        order = torch.arange(self._count)
        if seed is not None:
            order = torch.randperm(self._count, generator=torch.Generator().manual_seed(seed))
        part = rank_shard(order, self.sampler.rank, self.sampler.num_replicas)
        loader = DataLoader(
            self._dataset,
            batch_size=self._batch_size,
            sampler=part.tolist(),
            collate_fn=self._collate,
        )
        for batch in loader:
            yield trainer.strategy.batch_to_device(batch)

    def _scoring_pass(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score every sample with ``pl_module.score_batch`` in eval mode, without gradients."""
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            with torch.no_grad():
                for batch in self.scoring_batches(trainer):
                    self.record_outputs(trainer, pl_module.score_batch(batch), batch)
        finally:
            for module, training in modes.items():
                module.training = training

    # -- planning help ------------------------------------------------------------------------
    def planned_optimizer_steps(self, trainer: Trainer) -> int | float:
        """Optimizer steps of the whole run under this plan (Lightning's estimate assumes every
        epoch is as long as the first); use it for learning-rate schedules."""
        estimated = trainer.estimated_stepping_batches  # loads the training data if needed
        if self._count is None or self.sampler is None or trainer.max_epochs in (None, -1):
            return estimated
        total, replicas, size = 0, self.sampler.num_replicas, self._batch_size
        for epoch in range(trainer.max_epochs):
            part = shard_length(self.schedule.epoch_size(self._count, epoch), replicas)
            batches = part // size if self._drop_last else math.ceil(part / size)
            batches = _parse_num_batches(
                RunningStage.TRAINING, batches, trainer.limit_train_batches
            )
            total += math.ceil(batches / trainer.accumulate_grad_batches)
        return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def _batch_index(batch: Any) -> torch.Tensor:
    if not isinstance(batch, Mapping) or "index" not in batch:
        raise RuntimeError(f"{_INDEX_HELP}; the batch is {_describe(batch)}")
    return batch["index"]


def _is_class_label(labels: Any) -> bool:
    """One integer class per sample: a Python int, or an integer tensor of at most 1 dimension."""
    if isinstance(labels, int) and not isinstance(labels, bool):
        return True
    return torch.is_tensor(labels) and labels.dim() <= 1 and not labels.is_floating_point()


def _describe(item: Any) -> str:
    if isinstance(item, Mapping):
        return f"a dict with keys {sorted(item)}"
    return f"a {type(item).__name__}"


__all__ = ["SCORES", "CurriculumOrder", "CurriculumSampler", "EpochPlan"]
