"""``CurriculumSampler``: which samples each epoch trains on, and in what order.

The callback decides *when* to record scores, fold them, plan an epoch and save; the state and
the algorithms are :class:`lightning_3d.curriculum_state.CurriculumState`,
:class:`lightning_3d.curriculum.CurriculumSchedule` and :mod:`lightning_3d.sampling`.

Example:
    >>> from lightning import Trainer
    >>> curriculum = CurriculumSampler(pacing="linear", budget=0.5)
    >>> trainer = Trainer(max_epochs=3, callbacks=[curriculum])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.data import extract_batch_size
from torch.utils.data import DataLoader

from lightning_3d.curriculum import CurriculumSchedule
from lightning_3d.curriculum_state import CurriculumState
from lightning_3d.loggers import log_histogram
from lightning_3d.models import evaluation_mode
from lightning_3d.sampling import (
    ATTACH_HELP,
    INDEX_HELP,
    SCORES,
    CurriculumDataLoader,
    CurriculumOrder,
    EpochPlan,
    check_curriculum_arguments,
    check_loader,
    check_same_on_all_ranks,
    check_weighted_loss,
    describe,
    find_head,
    with_sampler,
)


class CurriculumSampler(Callback):
    """Score samples while training, pace them from easy to hard, and train on a data budget.

    A Lightning ``Callback`` that chooses the training samples; the ``torch`` sampler it puts
    into the training loader is :class:`~lightning_3d.sampling.CurriculumOrder` (the name is
    kept: configurations and checkpoints, whose callback states Lightning keys by class name,
    refer to it).

    Each epoch ``e`` (see :class:`~lightning_3d.curriculum.CurriculumSchedule` for the math):
    ``warmup_epochs`` epochs of all data in random order first; then the budget keeps
    ``ceil(budget * n)`` samples, pacing keeps the easiest ``c(t)`` fraction of those, and the
    epoch visits them once in a seeded random order. Scores are per-sample values folded into an
    EMA across epochs (``s <- ema_decay * s + (1 - ema_decay) * epoch_mean``):

    * ``"loss"``: the training loss; ``"el2n"``: ``||softmax(z) - onehot(y)||``;
    * ``"grand"``: the last layer's per-sample gradient norm ``||p - y|| sqrt(||h||^2 + 1)``, with
      ``h`` the input of the ``head`` module caught by a forward hook (no extra backward);
    * ``"quality"``: a static column ``item[quality_key]``, higher is better, read once.

    What it needs from the user's code: the training loader passed through
    :func:`~lightning_3d.sampling.with_curriculum` in ``train_dataloader`` (the built-in data
    modules do) or ``wrap_train_dataloader(loader)`` for a loader given to ``trainer.fit``; items
    with their dataset position under ``"index"`` (:class:`lightning_3d.data.WithIndex`);
    ``training_step`` returning ``"loss"`` and ``"per_sample_loss"`` (``score="loss"``) or
    ``"logits"`` with ``batch["labels"]``; with ``rescale_loss``, the loss weighted by
    ``batch["sample_weight"]``; for ``scoring_epochs``/``prescore``, a ``score_batch(batch)``
    method. Every rank plans from the same gathered scores with the same seeds; the loader is
    reloaded every epoch (epoch lengths follow the plan), and :meth:`planned_optimizer_steps`
    gives the run's exact number of steps for learning-rate schedules.

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
        group_by_length: batches of items of similar length (0: off). A batch is padded to
            its longest item, so random batches of short texts compute mostly padding (on
            Rotten Tomatoes at 64 tokens and batch 32, 1.9 tokens per real token). With
            ``k > 0`` each epoch's order is cut into windows of ``k`` global batches, each
            window sorted by length and cut into batches, and the batches shuffled
            (:func:`~lightning_3d.curriculum.group_by_length`): the same samples and steps,
            1.02 tokens per real token at ``k=50`` there. Lengths are
            ``len(item[length_key])``, read once.
        length_key: the item key whose length ``group_by_length`` sorts by.
        gather_every: batches whose per-sample values each rank keeps on its device before one
            ``all_gather`` (and one copy to the host) adds every rank's to the epoch's sums;
            the sums are complete at every epoch's end and in every checkpoint, so the plans do
            not depend on it. 1 gathers after every batch.

    Example:
        >>> CurriculumSampler(score="loss", budget=0.3).schedule.budget
        0.3
    """

    #: The plan's name of this axis; ``PlanCoordinator`` finds the callback by it.
    axis = "data"

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
        group_by_length: int = 0,
        length_key: str = "input_ids",
    ) -> None:
        self._warmup_defaulted = warmup_epochs is None
        if warmup_epochs is None:
            warmup_epochs = 0 if score == "quality" or prescore else 1
        check_curriculum_arguments(
            score, warmup_epochs, prescore, epochs, rescale_loss, budget_drops, anneal,
            ema_decay, scoring_epochs, gather_every, group_by_length,
        )  # fmt: skip
        # Validates pacing, budget and warm-up now; ``epochs`` is settled in ``setup``.
        schedule = CurriculumSchedule(
            pacing, start_fraction, full_at, stages, hardest_first, budget, budget_drops,
            warmup_epochs, epochs or warmup_epochs + 1,
        )  # fmt: skip
        self.state = CurriculumState(
            schedule, score, ema_decay, seed, balance_classes, gather_every, rank_zero_info,
            group_by_length, length_key,
        )  # fmt: skip
        self.score, self.prescore, self.rescale_loss = score, prescore, rescale_loss
        self.anneal, self.quality_key, self.head = anneal, quality_key, head
        self.scoring_epochs = frozenset(scoring_epochs)
        self.sampler: CurriculumOrder | None = None
        self._epochs = epochs
        self._replicas, self._rank = 1, 0
        self._loader: DataLoader | None = None  # the user's loader the sampler was put into
        self._head_hook: Any = None
        self._features: torch.Tensor | None = None
        self._weights_checked = False

    # -- life cycle ---------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._settle_schedule(trainer, pl_module)
        if self.state.attached:
            self.state.table.discard_pending()  # an earlier fit's leftovers belong to no epoch
        if trainer.reload_dataloaders_every_n_epochs != 1:
            rank_zero_info(
                "CurriculumSampler: epoch lengths follow the plan, so the training DataLoader is "
                "reloaded every epoch (reload_dataloaders_every_n_epochs=1)"
            )
            trainer.reload_dataloaders_every_n_epochs = 1
        self.state.clock = lambda: trainer.current_epoch
        shards = trainer.distributed_sampler_kwargs or {}
        self._replicas, self._rank = shards.get("num_replicas", 1), shards.get("rank", 0)
        self.state.replicas = self._replicas
        if self.sampler is not None:  # wrapped before the run knew its ranks
            self.sampler.num_replicas, self.sampler.rank = self._replicas, self._rank
        self.state.set_gather(None if trainer.world_size == 1 else trainer.strategy.all_gather)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.score == "grand":
            head = find_head(pl_module, self.head)
            self._head_hook = head.register_forward_hook(self._catch_features)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._require_attached(trainer)
        check_same_on_all_ranks(trainer.strategy, self.state.table.count, "training dataset length")
        if self.prescore and not self.seen.any():  # not scored by a coordinator or a checkpoint
            self._scoring_pass(trainer, pl_module)
            self.fold_scores()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        plan = self.current_plan()
        if self.rescale_loss and plan.weights is not None:
            if not isinstance(batch, Mapping) or "index" not in batch:
                raise RuntimeError(f"{INDEX_HELP}; the batch is {describe(batch)}")
            index = batch["index"]
            batch["sample_weight"] = plan.weights[index.cpu()].to(index.device)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.state.batches_done += 1
        self.state.samples_seen += self._replicas * extract_batch_size(batch)
        if self.rescale_loss and not self._weights_checked and "sample_weight" in batch:
            check_weighted_loss(outputs, batch, trainer.accumulate_grad_batches)
            self._weights_checked = True
        if self.score != "quality":
            self.record_outputs(outputs, batch)
        pl_module.log("curriculum/samples_seen", float(self.samples_seen), on_step=True)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = self.current_plan().epoch
        if trainer.current_epoch in self.scoring_epochs:
            self._scoring_pass(trainer, pl_module)
        if self.score != "quality":
            self.fold_scores()
        if self.seen.any():
            log_histogram(trainer, "curriculum/scores", self.scores[self.seen].float().numpy())
        pl_module.log_dict(self.state.epoch_metrics(epoch), on_step=False, on_epoch=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self._head_hook is not None:
            self._head_hook.remove()
            self._head_hook = None

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()  # collective under several ranks, as saving is

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state.load_state_dict(state_dict)

    # -- the training DataLoader ----------------------------------------------------------------
    def wrap_train_dataloader(self, loader: DataLoader) -> CurriculumDataLoader:
        """``loader`` rebuilt with this callback's sampler (a :class:`CurriculumDataLoader`):
        what :func:`~lightning_3d.sampling.with_curriculum` calls in a ``train_dataloader``
        hook. Pass the result to ``trainer.fit`` for a plain ``DataLoader``.

        Example:
            >>> curriculum = CurriculumSampler(budget=0.5)
            >>> data = [{"index": i, "x": float(i)} for i in range(8)]
            >>> loader = curriculum.wrap_train_dataloader(DataLoader(data, batch_size=4))
            >>> type(loader).__name__, loader.batch_size
            ('CurriculumDataLoader', 4)
        """
        if isinstance(loader, CurriculumDataLoader) and loader.curriculum is self.state:
            return loader
        check_loader(loader)
        sampler = CurriculumOrder(loader.dataset, self.state, self._replicas, self._rank)
        needs_index = self.score != "quality" or self.rescale_loss
        self.state.attach(loader.dataset, self.quality_key, needs_index, loader.batch_size or 1)
        self.sampler, self._loader = sampler, with_sampler(loader, sampler)
        return self._loader

    def _require_attached(self, trainer: Trainer | None = None) -> CurriculumDataLoader:
        loader = self._loader if trainer is None else trainer.train_dataloader
        if not isinstance(loader, CurriculumDataLoader) or loader.curriculum is not self.state:
            raise RuntimeError(
                "CurriculumSampler chooses the training samples through its own sampler, and "
                f"the training DataLoader does not have it: {ATTACH_HELP}"
            )
        return loader

    # -- scores and plans ---------------------------------------------------------------------
    @property
    def schedule(self) -> CurriculumSchedule:
        """Warm-up, budget and pacing (``epochs`` settled at ``setup``)."""
        return self.state.schedule

    @property
    def scores(self) -> torch.Tensor:
        """Per-sample EMA scores (``quality`` values for ``score="quality"``)."""
        return self.state.table.scores

    @property
    def seen(self) -> torch.Tensor:
        """Which samples have a score."""
        return self.state.table.seen

    @property
    def labels(self) -> torch.Tensor:
        """Per-sample class labels, ``-1`` where not known."""
        return self.state.table.labels

    @property
    def samples_seen(self) -> int:
        """Samples trained on so far, over all ranks."""
        return self.state.samples_seen

    def current_plan(self) -> EpochPlan:
        """The plan of the trainer's current epoch, made on first request from current scores."""
        return self.state.current_plan()

    def record_outputs(self, outputs: Any, batch: Any) -> None:
        """Add one batch's scores (from ``training_step``/``score_batch`` outputs) of every rank
        to this epoch's sums; :meth:`fold_scores` folds them into the scores."""
        self.state.record(outputs, batch, self._features if self.score == "grand" else None)

    def fold_scores(self) -> None:
        """Fold the sums recorded since the last fold into the per-sample EMA scores."""
        self.state.fold()

    def scoring_batches(self, trainer: Trainer, seed: int | None = None) -> Iterator[Any]:
        """This rank's part of every training sample, batched like training and on the device:
        what a scoring pass reads. In dataset order, or shuffled with ``seed``."""
        loader = self._require_attached(trainer)
        part = self.state.scoring_order(self._rank, self._replicas, seed)
        batches = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=part.tolist(),
            collate_fn=loader.collate_fn,
        )
        for batch in batches:
            yield trainer.strategy.batch_to_device(batch)

    def planned_optimizer_steps(self, trainer: Trainer) -> int | float:
        """Optimizer steps of the whole run under this plan (Lightning's estimate assumes every
        epoch is as long as the first); use it for learning-rate schedules."""
        estimated = trainer.estimated_stepping_batches  # loads the training data if needed
        loader = self._loader
        if not self.state.attached or loader is None or trainer.max_epochs in (None, -1):
            return estimated
        return self.state.planned_steps(
            trainer.max_epochs, self._replicas, int(loader.batch_size or 1), loader.drop_last,
            trainer.limit_train_batches, trainer.accumulate_grad_batches, trainer.max_steps,
        )  # fmt: skip

    # -- helpers ------------------------------------------------------------------------------
    def _settle_schedule(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fix the epochs of the schedule; score before training when there is no warm-up
        epoch to score in and the module can score."""
        epochs = self._epochs or trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                "CurriculumSampler paces over epochs: set Trainer(max_epochs=...) or "
                "CurriculumSampler(epochs=...)"
            )
        scorable = callable(getattr(pl_module, "score_batch", None))
        may_prescore = self._warmup_defaulted and scorable
        self.state.schedule, prescore = self.schedule.for_run(epochs, self.anneal, may_prescore)
        if prescore:
            rank_zero_info(
                f"CurriculumSampler: {epochs} epoch(s) leave no room for a warm-up epoch, so "
                "every sample is scored by a forward-only pass before training (prescore=True, "
                "warmup_epochs=0)"
            )
            self.prescore = True
        if (self.scoring_epochs or self.prescore) and not scorable:
            raise ValueError(
                "scoring_epochs and prescore need a `score_batch(batch)` method on the "
                "LightningModule that returns what training_step returns (per_sample_loss, "
                "index, logits) without logging; the built-in tasks have one"
            )

    def _catch_features(self, module: torch.nn.Module, inputs: tuple, output: Any) -> None:
        self._features = inputs[0].detach()

    def _scoring_pass(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Score every sample with ``pl_module.score_batch`` in eval mode, without gradients."""
        with evaluation_mode(pl_module), torch.no_grad():
            for batch in self.scoring_batches(trainer):
                self.record_outputs(pl_module.score_batch(batch), batch)


__all__ = ["SCORES", "CurriculumDataLoader", "CurriculumOrder", "CurriculumSampler", "EpochPlan"]
