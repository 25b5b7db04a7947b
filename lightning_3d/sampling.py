"""The data axis at run time: per-sample score tables, the sampler that serves an epoch plan, and
the ``DataLoader`` that carries it into a Lightning run through public seams only.

* :class:`SampleScores` keeps one value per training sample: the EMA score
  ``s <- decay * s + (1 - decay) * m`` (``m`` the sample's mean in the epoch, see
  :func:`~lightning_3d.curriculum.fold_epoch_scores`), whether it was seen, its class label, and
  this epoch's running sums. Values of several batches wait on the device and reach the sums in
  one gather and one host copy (:meth:`SampleScores.flush`).
* :func:`batch_values` reads a batch's sample indices, score values and class labels from what
  ``training_step`` returned: the training loss, EL2N or last-layer GraNd.
* :class:`CurriculumOrder` is the sampler: this rank's part of the current epoch plan.
* :class:`CurriculumDataLoader` is a ``DataLoader`` with that sampler and the ``state_dict`` /
  ``load_state_dict`` pair Lightning documents for resumable loaders, so a mid-epoch checkpoint
  resumes at the next unseen sample. :func:`with_curriculum` is the one line a ``train_dataloader``
  hook needs; the built-in data modules call it.

Example:
    >>> table = SampleScores(4)
    >>> table.record(torch.tensor([0, 2]), torch.tensor([1.0, 3.0]), None)
    >>> table.fold(decay=0.5)
    >>> table.scores.tolist(), table.seen.tolist()
    ([1.0, 0.0, 3.0, 0.0], [True, False, True, False])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset

from lightning_3d.curriculum import (
    el2n,
    fold_epoch_scores,
    grand_last_layer,
    rank_shard,
    shard_length,
)

#: How ``CurriculumSampler`` measures difficulty.
SCORES = ("loss", "el2n", "grand", "quality")
INDEX_HELP = (
    "CurriculumSampler attaches scores to samples by their dataset position: each item must be a "
    "dict with an 'index' entry (the built-in data modules do this; wrap another map-style "
    "dataset in lightning_3d.data.WithIndex)"
)
ATTACH_HELP = (
    "return `with_curriculum(self.trainer, loader)` (from lightning_3d.sampling) from your "
    "train_dataloader hook (the built-in data modules do), or pass "
    "`curriculum.wrap_train_dataloader(loader)` to trainer.fit"
)


@dataclass
class EpochPlan:
    """The global order of one epoch and, with ``budget_drops="easiest_random"``, item weights."""

    epoch: int
    order: torch.Tensor
    weights: torch.Tensor | None


class PlanSource(Protocol):
    """What :class:`CurriculumOrder` reads: the current plan, its size and the position in it."""

    def current_plan(self) -> EpochPlan: ...

    def current_epoch_size(self) -> int: ...

    @property
    def consumed_samples(self) -> int: ...

    def position(self) -> tuple[int, int]: ...

    def resume_at(self, epoch: int, batches_done: int) -> None: ...


@runtime_checkable
class TrainLoaderWrapper(Protocol):
    """A callback that puts its own sampler into the training ``DataLoader``."""

    def wrap_train_dataloader(self, loader: DataLoader) -> DataLoader: ...


#: The per-sample tables of :class:`SampleScores`, as its state dict names them.
_TABLES = ("scores", "seen", "epoch_sum", "epoch_count", "labels")


class SampleScores:
    """Per-sample scores of a training set, filled batch by batch and folded once an epoch.

    ``record`` keeps a batch's ``[3, B]`` table (index, value, class) on its device; every
    ``gather_every`` batches ``flush`` concatenates them, gathers every rank's with ``gather``
    (``[3, N] -> [world, 3, N]``, or ``None`` on one process) and adds them to the epoch's sums
    on the host. ``fold`` turns the sums into the EMA scores.

    Example:
        >>> table = SampleScores(3, gather_every=2)
        >>> table.record(torch.tensor([1]), torch.tensor([2.0]), torch.tensor([1]))
        >>> table.epoch_count.tolist()  # still waiting on the device
        [0, 0, 0]
        >>> table.flush()
        >>> table.epoch_count.tolist(), table.labels.tolist()
        ([0, 1, 0], [-1, 1, -1])
    """

    def __init__(
        self,
        count: int,
        gather_every: int = 1,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError(f"count must be a positive number of samples, got {count}")
        self.count = count
        self.gather_every = gather_every
        self.gather = gather
        self.scores = torch.zeros(count, dtype=torch.float32)
        self.seen = torch.zeros(count, dtype=torch.bool)
        self.epoch_sum = torch.zeros(count, dtype=torch.float64)
        self.epoch_count = torch.zeros(count, dtype=torch.int64)
        self.labels = torch.full((count,), -1, dtype=torch.int64)  # -1: not known
        self._pending: list[torch.Tensor] = []

    def record(
        self, index: torch.Tensor, values: torch.Tensor, classes: torch.Tensor | None
    ) -> None:
        """Keep one batch's values (and class labels); flush every ``gather_every`` batches."""
        rows = [index, values, index.new_full(index.shape, -1) if classes is None else classes]
        self._pending.append(torch.stack([row.detach().double() for row in rows]))
        if len(self._pending) >= self.gather_every:
            self.flush()

    def flush(self) -> None:
        """Add the kept batches of every rank to the epoch's sums. Collective when ``gather`` is
        set: every rank must call it at the same points (after the same number of batches, at
        epoch ends and checkpoints)."""
        if not self._pending:
            return
        table = torch.cat(self._pending, dim=1)  # [3, N]: the same N on every rank
        self._pending.clear()
        if self.gather is not None:
            table = self.gather(table).permute(1, 0, 2).reshape(3, -1)
        table = table.cpu()
        positions = table[0].long()
        self.epoch_sum.index_add_(0, positions, table[1])
        self.epoch_count.index_add_(0, positions, torch.ones_like(positions))
        self.labels[positions] = table[2].long()

    def discard_pending(self) -> None:
        """Drop values not yet flushed (they belong to a run that stopped)."""
        self._pending.clear()

    def fold(self, decay: float) -> None:
        """Flush, fold the epoch's sums into the EMA scores and start new sums."""
        self.flush()
        fold_epoch_scores(self.scores, self.seen, self.epoch_sum, self.epoch_count, decay)
        self.epoch_sum.zero_()
        self.epoch_count.zero_()

    def difficulty(self, higher_is_easier: bool = False) -> torch.Tensor:
        """Per-sample difficulty (lower is easier): ``-scores`` for a quality score, else the
        scores with unseen samples at the mean of the seen ones."""
        if higher_is_easier:
            return -self.scores
        seen_mean = self.scores[self.seen].mean() if self.seen.any() else torch.tensor(0.0)
        return torch.where(self.seen, self.scores, seen_mean)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tables (flush first: values still pending are not in them)."""
        return {name: getattr(self, name).clone() for name in _TABLES}

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        tables = {name: getattr(self, name) for name in _TABLES}
        for name, table in tables.items():  # every shape checked before anything changes
            if state_dict[name].shape != table.shape:
                raise ValueError(
                    f"the checkpoint's {name!r} holds {state_dict[name].numel()} samples, this "
                    f"table {table.numel()}"
                )
        for name, table in tables.items():
            table.copy_(state_dict[name])


def is_class_label(labels: Any) -> bool:
    """One integer class per sample: a Python int, or an integer tensor of at most 1 dimension."""
    if isinstance(labels, int) and not isinstance(labels, bool):
        return True
    return torch.is_tensor(labels) and labels.dim() <= 1 and not labels.is_floating_point()


def describe(item: Any) -> str:
    """A short description of a dataset item or batch for error messages."""
    if isinstance(item, Mapping):
        return f"a dict with keys {sorted(item)}"
    return f"a {type(item).__name__}"


def batch_values(
    score: str, outputs: Any, batch: Any, features: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One batch's sample indices, score values and class labels.

    Indices come from ``outputs["index"]`` or ``batch["index"]``; values are
    ``outputs["per_sample_loss"]`` (``score="loss"``), ``el2n(logits, labels)`` or
    ``grand_last_layer(logits, labels, features)`` with ``features`` the head's input; class
    labels are ``batch["class_label"]`` (prompt-and-answer batches), else ``labels`` when they
    are one class per sample, else ``None``.

    Example:
        >>> index, values, classes = batch_values(
        ...     "loss", {"per_sample_loss": torch.tensor([0.5])}, {"index": torch.tensor([7])})
        >>> index.tolist(), values.tolist(), classes
        ([7], [0.5], None)
    """
    outputs = outputs if isinstance(outputs, Mapping) else {}
    batch_map = batch if isinstance(batch, Mapping) else {}
    index = outputs.get("index", batch_map.get("index"))
    if index is None:
        raise RuntimeError(f"{INDEX_HELP}; this batch has no 'index'")
    labels = batch_map.get("class_label", outputs.get("labels", batch_map.get("labels")))
    classes = labels if is_class_label(labels) and labels.shape == index.shape else None
    if score == "loss":
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
            f"score={score!r} needs [batch, classes] 'logits' in training_step's output and "
            "'labels' in the batch (classification only)"
        )
    if score == "el2n":
        return index, el2n(logits, labels), classes
    if features is None:
        raise RuntimeError("score='grand': the head's forward hook saw no input")
    return index, grand_last_layer(logits, labels, features), classes


def check_curriculum_arguments(
    score: str,
    warmup_epochs: int,
    prescore: bool,
    epochs: int | None,
    rescale_loss: bool,
    budget_drops: str,
    anneal: float,
    ema_decay: float,
    scoring_epochs: Sequence[int],
    gather_every: int,
    group_by_length: int = 0,
) -> None:
    """Check ``CurriculumSampler``'s arguments that the schedule does not (pacing, budget and
    warm-up are :class:`~lightning_3d.curriculum.CurriculumSchedule`'s).

    Raises:
        ValueError: naming the argument, the value and what is allowed.

    Example:
        >>> check_curriculum_arguments("loss", 0, False, None, False, "hardest", 0.0, 0.5, (), 32)
        Traceback (most recent call last):
        ...
        ValueError: score='loss' is measured during training, so warmup_epochs must be >= 1 ...
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
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
    check_group_by_length(group_by_length)


def check_group_by_length(value: Any) -> None:
    """Refuse a ``group_by_length`` that is not a count of batches >= 0 (0: off).

    Example:
        >>> check_group_by_length(-1)
        Traceback (most recent call last):
        ...
        ValueError: group_by_length must be >= 0 (0: off), got -1
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            "group_by_length is the number of batches sorted by length together (0: off), "
            f"an integer; got {value!r}"
        )
    if value < 0:
        raise ValueError(f"group_by_length must be >= 0 (0: off), got {value}")


def check_weighted_loss(outputs: Any, batch: Mapping[str, Any], accumulate: int = 1) -> None:
    """Raise unless ``training_step``'s loss is ``mean(per_sample_loss * sample_weight)``
    (possibly divided by the gradient accumulation, as Lightning does).

    Example:
        >>> losses, weights = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 1.0])
        >>> check_weighted_loss({"loss": (losses * weights).mean(), "per_sample_loss": losses},
        ...                     {"sample_weight": weights})
    """
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


def read_quality(dataset: Any, key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every item's static ``key`` score, and its class labels when every item has one.

    Example:
        >>> read_quality([{"q": 0.5, "labels": 1}, {"q": 2.0, "labels": 0}], "q")
        (tensor([0.5000, 2.0000]), tensor([1, 0]))
    """
    items = [dataset[i] for i in range(len(dataset))]
    if not isinstance(items[0], Mapping) or key not in items[0]:
        raise ValueError(
            f"score='quality' reads each item's {key!r} value; the first item is "
            f"{describe(items[0])}. Set quality_key to the right column."
        )
    scores = torch.tensor([float(item[key]) for item in items])
    if all(is_class_label(item.get("labels")) for item in items):
        return scores, torch.tensor([int(item["labels"]) for item in items])
    return scores, None


def read_lengths(dataset: Any, key: str) -> torch.Tensor:
    """Every item's length, ``len(item[key])`` (its tokens, for ``key="input_ids"``).

    Example:
        >>> read_lengths([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}], "input_ids")
        tensor([3, 1])
    """
    first = dataset[0] if len(dataset) else None
    if not isinstance(first, Mapping) or not hasattr(first.get(key), "__len__"):
        raise ValueError(
            f"group_by_length reads the length of each item's {key!r}; the first item is "
            f"{describe(first)}. Set length_key to the column that holds the tokens."
        )
    return torch.tensor([len(dataset[i][key]) for i in range(len(dataset))])


def score_quantiles(scores: torch.Tensor) -> dict[str, float]:
    """The 10th, 50th and 90th percentiles of ``scores``, as ``score_q10`` ... metric names.

    Example:
        >>> score_quantiles(torch.arange(11.0))
        {'score_q10': 1.0, 'score_q50': 5.0, 'score_q90': 9.0}
    """
    levels = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    values = torch.quantile(scores.double(), levels).tolist()
    return {f"score_q{round(100 * q)}": v for q, v in zip(levels.tolist(), values, strict=True)}


def find_head(module: torch.nn.Module, name: str | None = None) -> torch.nn.Module:
    """The submodule called ``name``, or the last ``torch.nn.Linear`` of ``module``.

    Example:
        >>> find_head(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)))
        Linear(in_features=3, out_features=1, bias=True)
    """
    modules = dict(module.named_modules())
    if name is not None:
        if name not in modules:
            raise ValueError(
                f"head={name!r} is not a module of {type(module).__name__}; its last modules "
                f"are {list(modules)[-5:]}"
            )
        return modules[name]
    linears = [m for m in modules.values() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError("score='grand' needs a torch.nn.Linear head; name it with `head=`")
    return linears[-1]


class CurriculumOrder(DistributedSampler):
    """Yields this rank's part of the current epoch plan, after the samples already consumed.

    A ``DistributedSampler`` subclass, so Lightning never replaces or re-wraps it. Its length is
    that of the whole part even after a mid-epoch resume: Lightning counts the batches it already
    ran, and this sampler skips them. ``num_replicas`` and ``rank`` may be set after construction
    (a loader wrapped before ``trainer.fit`` learns them when the run starts).
    """

    def __init__(self, dataset: Any, source: PlanSource, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.source = source

    def __len__(self) -> int:
        return shard_length(self.source.current_epoch_size(), self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        # The body runs at the first ``next``, once the epoch has started and its plan is final.
        part = rank_shard(self.source.current_plan().order, self.rank, self.num_replicas)
        yield from part[self.source.consumed_samples :].tolist()


class CurriculumDataLoader(DataLoader):
    """A ``DataLoader`` whose sampler is a :class:`CurriculumOrder`, resumable mid-epoch.

    ``state_dict``/``load_state_dict`` are the interface Lightning calls on resumable training
    loaders: the state is the position in the epoch plan, ``{"epoch": e, "batches_done": b}``;
    loading it makes the sampler continue after the ``b`` batches already trained on.
    """

    def __init__(self, dataset: Any, *, sampler: CurriculumOrder, **kwargs: Any) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)

    @property
    def curriculum(self) -> PlanSource:
        assert isinstance(self.sampler, CurriculumOrder)
        return self.sampler.source

    def state_dict(self) -> dict[str, int]:
        epoch, batches_done = self.curriculum.position()
        return {"epoch": epoch, "batches_done": batches_done}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.curriculum.resume_at(int(state_dict["epoch"]), int(state_dict["batches_done"]))


_REBUILT_ARGUMENTS = tuple(
    name
    for name in inspect.signature(DataLoader.__init__).parameters
    if name not in ("self", "dataset", "sampler", "batch_sampler", "shuffle")
)


def with_sampler(loader: DataLoader, sampler: CurriculumOrder) -> CurriculumDataLoader:
    """A :class:`CurriculumDataLoader` with ``loader``'s dataset and settings (batch size,
    workers, collate function, ...) and ``sampler`` in place of its sampler.

    Example:
        >>> class Fixed:  # a plan source of one epoch over 4 items
        ...     consumed_samples = 0
        ...     def current_epoch_size(self): return 4
        ...     def current_plan(self): return EpochPlan(0, torch.tensor([3, 1, 0, 2]), None)
        >>> data = list(range(10, 14))
        >>> loader = with_sampler(DataLoader(data, batch_size=2),
        ...                       CurriculumOrder(data, Fixed(), num_replicas=1, rank=0))
        >>> [batch.tolist() for batch in loader]
        [[13, 11], [10, 12]]
    """
    check_loader(loader)
    settings = {name: getattr(loader, name) for name in _REBUILT_ARGUMENTS if hasattr(loader, name)}
    return CurriculumDataLoader(loader.dataset, sampler=sampler, **settings)


def check_loader(loader: Any) -> None:
    """Raise unless ``loader`` is a ``DataLoader`` :func:`with_sampler` can rebuild: a plain
    ``torch.utils.data.DataLoader`` over a map-style dataset, with ``batch_size``."""
    if not isinstance(loader, DataLoader):
        raise ValueError(
            "CurriculumSampler orders a single torch DataLoader; the training data is a "
            f"{type(loader).__name__}"
        )
    if type(loader).__init__ is not DataLoader.__init__:
        raise ValueError(
            f"CurriculumSampler rebuilds the training DataLoader with its own sampler, but "
            f"{type(loader).__name__} has its own __init__; use a torch.utils.data.DataLoader"
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


def with_curriculum(trainer: Any, loader: DataLoader) -> DataLoader:
    """``loader`` with the sampler of the trainer's curriculum callback, if it has one.

    The one line a user's ``train_dataloader`` hook needs (the built-in data modules have it):

    >>> def train_dataloader(self):  # doctest: +SKIP
    ...     return with_curriculum(self.trainer, DataLoader(self.train_set, batch_size=32))

    Returns ``loader`` unchanged without a trainer or without a curriculum.
    """
    for callback in getattr(trainer, "callbacks", None) or ():
        if isinstance(callback, TrainLoaderWrapper):
            loader = callback.wrap_train_dataloader(loader)
    return loader


def check_same_on_all_ranks(strategy: Any, count: int, what: str) -> None:
    """Raise unless every rank has the same ``count`` (one ``strategy.all_gather``; nothing on
    one process). ``strategy`` is a Lightning strategy or anything with ``world_size``,
    ``root_device`` and ``all_gather``.

    Example:
        >>> class OneProcess:
        ...     world_size = 1
        >>> check_same_on_all_ranks(OneProcess(), 10, "training dataset length")
    """
    if strategy.world_size == 1:
        return
    counts = strategy.all_gather(torch.tensor([count], device=strategy.root_device)).flatten()
    if counts.min() != counts.max():
        raise ValueError(
            f"CurriculumSampler needs the same {what} on every rank; they are {counts.tolist()}"
        )


def limited_batches(batches: int, limit: int | float) -> int:
    """Batches an epoch runs under ``Trainer(limit_train_batches=limit)``: at most ``limit``
    batches for an int, ``int(batches * limit)`` for a fraction.

    Example:
        >>> limited_batches(10, 4), limited_batches(10, 0.25), limited_batches(10, 1.0)
        (4, 2, 10)
    """
    if isinstance(limit, int):
        return min(batches, limit)
    return int(batches * limit)


__all__ = [
    "ATTACH_HELP",
    "INDEX_HELP",
    "SCORES",
    "CurriculumDataLoader",
    "CurriculumOrder",
    "EpochPlan",
    "PlanSource",
    "SampleScores",
    "TrainLoaderWrapper",
    "batch_values",
    "check_curriculum_arguments",
    "check_loader",
    "check_same_on_all_ranks",
    "check_weighted_loss",
    "describe",
    "find_head",
    "is_class_label",
    "limited_batches",
    "read_quality",
    "score_quantiles",
    "with_curriculum",
    "with_sampler",
]
