"""What the data axis knows and resumes from, without Lightning: :class:`CurriculumState`.

The state of a curriculum run is its per-sample scores (a :class:`~lightning_3d.sampling.
SampleScores` table), the plan of the current epoch (:class:`~lightning_3d.sampling.EpochPlan`,
made from the scores by a :class:`~lightning_3d.curriculum.CurriculumSchedule`) and the position
in that plan. ``CurriculumSampler`` decides *when* to record, fold, plan and save; this class
does it, and everything here is testable on a list of dicts.

Example:
    >>> from lightning_3d.curriculum import CurriculumSchedule
    >>> schedule = CurriculumSchedule(budget=0.5, warmup_epochs=0, epochs=2)
    >>> state = CurriculumState(schedule, score="quality")
    >>> state.attach([{"index": i, "quality": float(i)} for i in range(4)], "quality")
    >>> plan, made = state.plan_for(epoch=0)
    >>> sorted(plan.order.tolist()), made  # the budget keeps the two of highest quality
    ([2, 3], True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_3d.curriculum import (
    CurriculumSchedule,
    group_by_length,
    padded_tokens,
    rank_shard,
    shard_length,
)
from lightning_3d.sampling import (
    ATTACH_HELP,
    INDEX_HELP,
    EpochPlan,
    SampleScores,
    batch_values,
    describe,
    limited_batches,
    read_lengths,
    read_quality,
    score_quantiles,
)

STATE_VERSION = 1
#: Added to an epoch's shuffle seed (``seed * 1_000_003 + epoch``) for the generator that
#: orders its length-grouped batches, so the two draws never share a seed.
GROUPING_SEED_OFFSET = 2**40
log = logging.getLogger(__name__)


class CurriculumState:
    """Per-sample scores, the current epoch's plan and the batches of it done.

    It is the :class:`~lightning_3d.sampling.PlanSource` of the curriculum's sampler: the epoch
    comes from ``clock`` (the trainer's current epoch; set by the callback), and every new plan
    is announced through ``report``.

    Args:
        schedule: warm-up, budget and pacing of the run.
        score: ``"loss"``, ``"el2n"``, ``"grand"`` or ``"quality"`` (see ``CurriculumSampler``).
        ema_decay: weight of the previous score when an epoch's values are folded in.
        seed: seeds every epoch's shuffle and random drop (with the epoch number).
        balance_classes: plan within each class when every seen sample has a class label.
        gather_every: batches of values kept on the device before one gather (see
            :class:`~lightning_3d.sampling.SampleScores`).
        report: where a new plan's one-line summary goes (``logging`` by default).
        length_window: batches per window of :func:`~lightning_3d.curriculum.group_by_length`
            (every plan's batches then hold items of similar length, read at :meth:`attach`
            from ``length_key``); 0 leaves the plans' order as it is.
        length_key: the item key whose ``len`` is an item's length (its tokens).
    """

    def __init__(
        self,
        schedule: CurriculumSchedule,
        score: str = "loss",
        ema_decay: float = 0.5,
        seed: int = 0,
        balance_classes: bool = True,
        gather_every: int = 32,
        report: Callable[[str], None] = log.info,
        length_window: int = 0,
        length_key: str = "input_ids",
    ) -> None:
        self.schedule = schedule
        self.score = score
        self.ema_decay = ema_decay
        self.seed = seed
        self.balance_classes = balance_classes
        self.gather_every = gather_every
        self.report = report
        self.clock: Callable[[], int] | None = None
        self.batch_size = 1
        self.replicas = 1
        self.length_window, self.length_key = length_window, length_key
        self.lengths: torch.Tensor | None = None
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._table: SampleScores | None = None
        self.plan: EpochPlan | None = None
        self.batches_done = 0
        self.samples_seen = 0

    @property
    def attached(self) -> bool:
        """Whether the table exists (after :meth:`attach` or a loaded state)."""
        return self._table is not None

    @property
    def table(self) -> SampleScores:
        """The score table; a ``RuntimeError`` before :meth:`attach` or a loaded state."""
        if self._table is None:
            raise RuntimeError(
                f"CurriculumSampler has not seen the training data yet: {ATTACH_HELP}"
            )
        return self._table

    def set_gather(self, gather: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """How the table gathers every rank's values (``None`` on one process)."""
        self.gather = gather
        if self._table is not None:
            self._table.gather = gather

    def attach(
        self, dataset: Any, quality_key: str, needs_index: bool = True, batch_size: int = 1
    ) -> None:
        """Make (or check) the table for ``dataset`` (loaded ``batch_size`` samples a batch);
        read ``quality_key`` scores once.

        Raises:
            ValueError: the dataset's length differs from the table's (a checkpoint of another
                dataset), its items carry no ``"index"`` while ``needs_index``, no
                ``quality_key`` for ``score="quality"``, or no ``length_key`` with a
                ``length_window``; the state is unchanged then.
        """
        count = len(dataset)
        if self._table is not None and self._table.count != count:
            raise ValueError(
                f"the training dataset has {count} samples but CurriculumSampler's state was "
                f"built for {self._table.count} (a checkpoint of another dataset?)"
            )
        item = dataset[0]
        if needs_index and (not isinstance(item, Mapping) or "index" not in item):
            raise ValueError(f"{INDEX_HELP}; the first item is {describe(item)}")
        unscored = self._table is None or not bool(self._table.seen.all())
        quality = None
        if self.score == "quality" and unscored:
            quality = read_quality(dataset, quality_key)
        lengths = read_lengths(dataset, self.length_key) if self.length_window else None
        # every check passed: only now does the state change
        if self._table is None:
            self._table = SampleScores(count, self.gather_every, self.gather)
        self.batch_size, self.lengths = batch_size, lengths
        if quality is not None:
            scores, labels = quality
            self._table.scores.copy_(scores)
            self._table.seen.fill_(True)
            if labels is not None:
                self._table.labels.copy_(labels)

    def difficulty(self) -> torch.Tensor:
        """Per-sample difficulty (lower is easier); unseen samples get the mean of seen ones."""
        return self.table.difficulty(higher_is_easier=self.score == "quality")

    def epoch_size(self, epoch: int) -> int:
        """Samples epoch ``epoch`` visits (known without scores)."""
        return self.schedule.epoch_size(self.table.count, epoch)

    def plan_for(self, epoch: int) -> tuple[EpochPlan, bool]:
        """The plan of ``epoch`` and whether it was made now (from the current scores, the
        position reset to its start) rather than kept from an earlier call or a checkpoint."""
        if self.plan is not None and self.plan.epoch == epoch:
            return self.plan, False
        labels = self.table.labels
        groups = labels if self.balance_classes and bool((labels >= 0).any()) else None
        order, weights = self.schedule.plan(self.difficulty(), epoch, self.seed, groups)
        if self.lengths is not None:
            epoch_seed = self.seed * 1_000_003 + epoch
            generator = torch.Generator().manual_seed(epoch_seed + GROUPING_SEED_OFFSET)
            batch = self.batch_size * self.replicas  # rank_shard deals consecutive items out
            order = group_by_length(order, self.lengths, batch, self.length_window, generator)
        self.plan, self.batches_done = EpochPlan(epoch, order, weights), 0
        return self.plan, True

    def current_epoch(self) -> int:
        """The run's epoch, read from ``clock``."""
        if self.clock is None:
            raise RuntimeError("CurriculumSampler is not attached to a training run")
        return self.clock()

    def current_plan(self) -> EpochPlan:
        """The plan of the run's current epoch, made on first request from current scores."""
        plan, made = self.plan_for(self.current_epoch())
        if made:
            count, kept = self.table.count, plan.order.numel()
            grouped = ""
            if self.lengths is not None:
                grouped = f"; batches grouped by length: {self.padding_ratio(plan):.2f}"
                grouped += " padded tokens per token"
            self.report(
                f"CurriculumSampler: epoch {plan.epoch} trains on {kept:,} of {count:,} samples "
                f"({kept / count:.1%}){grouped}"
            )
        return plan

    def padding_ratio(self, plan: EpochPlan) -> float:
        """Tokens ``plan``'s batches compute (each padded to its longest item) per token of its
        items (:func:`~lightning_3d.curriculum.padded_tokens`; needs a ``length_window``)."""
        if self.lengths is None:
            raise RuntimeError("padding_ratio needs the items' lengths (a length_window)")
        batch = self.batch_size * self.replicas
        return padded_tokens(self.lengths, plan.order, batch) / int(self.lengths[plan.order].sum())

    def current_epoch_size(self) -> int:
        """Samples the run's current epoch visits (known without scores)."""
        return self.epoch_size(self.current_epoch())

    @property
    def consumed_samples(self) -> int:
        """Samples of this rank's part of the current epoch already trained on."""
        return self.batches_done * self.batch_size

    def position(self) -> tuple[int, int]:
        """``(epoch of the current plan, batches of it done)``; epoch -1 before the first."""
        return (-1 if self.plan is None else self.plan.epoch), self.batches_done

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Continue the plan of ``epoch`` after ``batches_done`` batches (a loader's resume)."""
        if epoch != self.position()[0]:
            raise ValueError(
                f"the training DataLoader's checkpoint is at epoch {epoch} but "
                f"CurriculumSampler's state holds the plan of epoch {self.position()[0]}"
            )
        self.batches_done = batches_done

    def record(self, outputs: Any, batch: Any, features: torch.Tensor | None = None) -> None:
        """Add one batch's values (see :func:`~lightning_3d.sampling.batch_values`)."""
        self.table.record(*batch_values(self.score, outputs, batch, features))

    def fold(self) -> None:
        """Fold the values recorded since the last fold into the EMA scores."""
        self.table.fold(self.ema_decay)

    def epoch_metrics(self, epoch: int) -> dict[str, float]:
        """Shares of the data in play and kept in ``epoch``, and score quantiles."""
        count, plan = self.table.count, self.plan_for(epoch)[0]
        metrics = {
            "curriculum/fraction_in_play": plan.order.numel() / count,
            "curriculum/kept_fraction": self.schedule.kept_size(count, epoch) / count,
        }
        if self.lengths is not None:
            metrics["curriculum/padding_ratio"] = self.padding_ratio(plan)
        scored = self.table.scores[self.table.seen]
        if scored.numel():
            metrics.update({f"curriculum/{k}": v for k, v in score_quantiles(scored).items()})
        return metrics

    def scoring_order(self, rank: int, replicas: int, seed: int | None = None) -> torch.Tensor:
        """This rank's part of every sample for a scoring pass: in dataset order, or shuffled
        with ``seed`` (so the first batches are a random draw)."""
        count = self.table.count
        order = torch.arange(count)
        if seed is not None:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        return rank_shard(order, rank, replicas)

    def planned_steps(
        self,
        epochs: int,
        replicas: int,
        batch_size: int,
        drop_last: bool,
        limit: int | float = 1.0,
        accumulate: int = 1,
        max_steps: int = -1,
    ) -> int:
        """Optimizer steps of ``epochs`` epochs under this schedule, each epoch
        ``ceil(limited(batches) / accumulate)`` with ``batches`` from its planned size on one
        of ``replicas`` ranks, capped by ``max_steps`` (``-1``: no cap)."""
        total = 0
        for epoch in range(epochs):
            part = shard_length(self.epoch_size(epoch), replicas)
            batches = part // batch_size if drop_last else math.ceil(part / batch_size)
            total += math.ceil(limited_batches(batches, limit) / accumulate)
        return min(total, max_steps) if max_steps != -1 else total

    def state_dict(self) -> dict[str, Any]:
        """Tables, plan and position (flushes first: collective with a ``gather``)."""
        if self._table is None:
            return {}
        self.table.flush()
        plan = self.plan
        return {
            "version": STATE_VERSION,
            "count": self.table.count,
            **self.table.state_dict(),
            "plan": None if plan is None else (plan.epoch, plan.order, plan.weights),
            "batches_done": self.batches_done,
            "samples_seen": self.samples_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; refuse one of another dataset's size."""
        if not state_dict:
            return
        count = int(state_dict["count"])
        if self._table is not None and self._table.count != count:
            raise ValueError(
                f"the training dataset has {self.table.count} samples but the checkpoint's "
                f"CurriculumSampler state was built for {count} (a checkpoint of another "
                "dataset?)"
            )
        self._table = SampleScores(count, self.gather_every, self.gather)
        self._table.load_state_dict(state_dict)
        plan = state_dict["plan"]
        self.plan = None if plan is None else EpochPlan(*plan)
        self.batches_done = int(state_dict["batches_done"])
        self.samples_seen = int(state_dict["samples_seen"])


__all__ = ["GROUPING_SEED_OFFSET", "STATE_VERSION", "CurriculumState"]
