"""The data axis, as pure functions: per-sample scores, pacing, curriculum order, data budget.

Scores (lower means easier; computed from what a normal training step already has):

* **loss EMA**: ``s <- decay * s + (1 - decay) * m`` per sample and epoch, ``m`` the sample's mean
  loss in that epoch, started at the first observed value (not at zero), so one noisy epoch does
  not decide a sample's place (:func:`fold_epoch_scores`).
* **EL2N** (Paul et al. 2021): ``||softmax(z) - onehot(y)||_2``.
* **GraNd, last layer**: the norm of the cross-entropy gradient with respect to the classifier's
  weight and bias, ``||p - y|| * sqrt(||h||^2 + 1)`` for penultimate features ``h`` (the gradient
  is ``(p - y) h^T`` and ``p - y``), with no extra backward pass.

Pacing gives the fraction ``c(t)`` of the data in play at training progress ``t`` in [0, 1]
(``c0`` the starting fraction, ``T`` the progress at which all data is in):

* ``none``: ``c = 1``
* ``linear``: ``c = min(1, c0 + (1 - c0) * t / T)``
* ``root`` (competence-based, Platanios et al. 2019): ``c = min(1, sqrt(c0^2 + (1 - c0^2) t / T))``
* ``step``: ``c = min(1, c0 + (1 - c0) * floor(n * t / T) / n)`` for ``n`` stages
* ``exponential``: ``c = min(1, c0 * (1 / c0) ** (t / T))``

Example:
    >>> round(pacing_fraction(0.25, "linear", start_fraction=0.2, full_at=0.5), 4)
    0.6
    >>> curriculum_order(torch.tensor([0.9, 0.1, 0.5, 0.3]), 0.5, seed=0).sort().values.tolist()
    [1, 3]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

PACINGS = ("none", "linear", "root", "step", "exponential")
BUDGET_DROPS = ("hardest", "easiest_random")


def fold_epoch_scores(
    scores: torch.Tensor,
    seen: torch.Tensor,
    epoch_sum: torch.Tensor,
    epoch_count: torch.Tensor,
    decay: float,
) -> None:
    """Fold one epoch's observations into the per-sample EMA, in place.

    For every item observed this epoch (``epoch_count > 0``) with mean value
    ``m = epoch_sum / epoch_count``: ``s <- m`` on its first epoch (``seen`` false), else
    ``s <- decay * s + (1 - decay) * m``. Items not observed keep their score.

    Example:
        >>> scores, seen = torch.tensor([2.0, 0.0, 5.0]), torch.tensor([True, False, True])
        >>> fold_epoch_scores(scores, seen, torch.tensor([4.0, 3.0, 0.0]),
        ...                   torch.tensor([2, 1, 0]), decay=0.5)
        >>> scores.tolist(), seen.tolist()
        ([2.0, 3.0, 5.0], [True, True, True])
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    observed = epoch_count > 0
    mean = epoch_sum[observed].double() / epoch_count[observed]
    previous = scores[observed].double()
    first = ~seen[observed]
    folded = torch.where(first, mean, decay * previous + (1.0 - decay) * mean)
    scores[observed] = folded.to(scores.dtype)
    seen |= observed


def el2n(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N per sample: ``||softmax(z) - onehot(y)||_2`` for ``[B, C]`` logits, ``[B]`` labels."""
    error = torch.softmax(logits.detach().float(), dim=-1)
    error[torch.arange(len(labels)), labels] -= 1.0
    return error.norm(dim=-1)


def grand_last_layer(
    logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """Norm of the last layer's per-sample cross-entropy gradient: ``||p - y|| sqrt(||h||^2 + 1)``.

    ``features`` are the classifier's inputs ``h`` (``[B, H]``); the bias counts as a feature 1.
    """
    return el2n(logits, labels) * (features.detach().float().pow(2).sum(-1) + 1.0).sqrt()


def pacing_fraction(
    progress: float,
    pacing: str,
    start_fraction: float = 0.2,
    full_at: float = 0.5,
    stages: int = 4,
) -> float:
    """Fraction of the data in play at ``progress`` in [0, 1] (formulas in the module docstring)."""
    check_pacing(pacing, start_fraction, full_at, stages)
    if pacing == "none":
        return 1.0
    c0, t = start_fraction, min(max(progress, 0.0), 1.0) / full_at
    if pacing == "linear":
        c = c0 + (1.0 - c0) * t
    elif pacing == "root":
        c = math.sqrt(c0**2 + (1.0 - c0**2) * t)
    elif pacing == "step":
        c = c0 + (1.0 - c0) * math.floor(stages * t) / stages
    else:
        c = c0 * (1.0 / c0) ** t
    return min(1.0, c)


def check_pacing(pacing: str, start_fraction: float, full_at: float, stages: int) -> None:
    """Raise ``ValueError`` naming the first bad pacing argument."""
    if pacing not in PACINGS:
        raise ValueError(f"pacing must be one of {PACINGS}, got {pacing!r}")
    if not 0.0 < start_fraction <= 1.0:
        raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction}")
    if not 0.0 < full_at <= 1.0:
        raise ValueError(f"full_at must be in (0, 1], got {full_at}")
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")


def pool_size(fraction: float, count: int) -> int:
    """Samples in play for a fraction of ``count``: ``ceil(fraction * count)``, at least 1."""
    return min(count, max(1, math.ceil(fraction * count - 1e-9)))


def curriculum_order(
    scores: torch.Tensor,
    fraction: float,
    seed: int,
    hardest_first: bool = False,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The easiest ``ceil(fraction * n)`` items (hardest with ``hardest_first``), shuffled.

    Ranking is by score with ties broken by the lower index, and the shuffle uses its own seeded
    generator, so every rank computes the same order from the same scores and seed. With
    ``groups`` (e.g. class labels) the items are chosen within each group, in proportion to its
    size (:func:`lowest_per_group`).
    """
    return shuffled_pool(scores, pool_size(fraction, scores.numel()), seed, hardest_first, groups)


def shuffled_pool(
    scores: torch.Tensor,
    size: int,
    seed: int,
    hardest_first: bool = False,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``size`` lowest-scoring items (highest with ``hardest_first``) in a seeded order."""
    pool = lowest_per_group(-scores if hardest_first else scores, size, groups)
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(pool.numel(), generator=generator)]


def proportional_counts(group_sizes: torch.Tensor, total: int) -> torch.Tensor:
    """Split ``total`` across groups in proportion to their sizes, summing exactly to ``total``.

    Largest-remainder rule: each group gets ``floor(total * size / n)``, and the items left over
    go one each to the groups with the largest fractional parts (ties to the lower group).

    Example:
        >>> proportional_counts(torch.tensor([5, 3, 2]), 5).tolist()
        [3, 1, 1]
    """
    quota = group_sizes.double() * total / group_sizes.sum()
    counts = quota.floor().long()
    remainder = total - int(counts.sum())
    by_fraction = torch.sort(-(quota - counts), stable=True).indices
    counts[by_fraction[:remainder]] += 1
    return counts


def lowest_per_group(
    scores: torch.Tensor, count: int, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the ``count`` lowest-scoring items, ascending by index.

    Without ``groups`` the lowest overall (ties to the lower index); with ``groups`` (one integer
    per item, e.g. its class label) each group contributes its lowest items, as many as
    :func:`proportional_counts` gives it, so selection keeps the groups' shares of the data
    (selecting by loss alone can keep mostly one class).
    """
    if groups is None:
        return ranking(scores)[:count].sort().values
    names, members_of = torch.unique(groups, return_inverse=True)
    sizes = torch.bincount(members_of, minlength=names.numel())
    chosen = []
    for group, take in enumerate(proportional_counts(sizes, count).tolist()):
        members = torch.nonzero(members_of == group).flatten()
        chosen.append(members[ranking(scores[members])[:take]])
    return torch.cat(chosen).sort().values


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices by ascending score, ties broken by the lower index."""
    return torch.sort(scores.detach().float().cpu(), stable=True).indices


def budget_keep(
    difficulty: torch.Tensor, budget: float, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the ``ceil(budget * n)`` items with the lowest difficulty (sorted by index),
    chosen within each of ``groups`` when given (:func:`lowest_per_group`).

    With loss-based difficulty this drops the samples the model fits worst, which is where
    mislabelled samples end up.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    return lowest_per_group(difficulty, pool_size(budget, difficulty.numel()), groups)


def shard_length(count: int, world_size: int) -> int:
    """Length of every rank's part of ``count`` items (:func:`rank_shard`): ``ceil(count / W)``."""
    return math.ceil(count / world_size)


def rank_shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of ``order``: every rank gets the same length (the order is extended by
    its own beginning to a multiple of ``world_size``, as ``DistributedSampler`` does), so no
    rank runs out of batches before the others and a collective never waits forever."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    total = shard_length(order.numel(), world_size) * world_size
    repeats = math.ceil(total / max(order.numel(), 1))
    extended = order.repeat(repeats)[:total]
    return extended[rank::world_size]


def group_by_length(
    order: torch.Tensor,
    lengths: torch.Tensor,
    batch_size: int,
    window: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``order`` rearranged so that each batch holds items of similar length, the epoch still
    a random order of the same items.

    A batch is padded to its longest item, so a random batch of ``B`` items costs about
    ``B * max(lengths)`` tokens of compute where its items hold ``sum(lengths)``. Here the order
    is cut into windows of ``window * batch_size`` consecutive items, each window is sorted by
    ``lengths[item]`` and cut into batches of ``batch_size``, and the full batches of the whole
    epoch are shuffled with ``generator``; the short batch (``len(order) % batch_size`` items,
    the longest of the last window) stays last. Which items an epoch visits and how many
    batches it has do not change; only which items share a batch. ``batch_size`` is the
    *global* batch (per-rank batch times ranks): :func:`rank_shard` deals every run of
    ``world_size`` consecutive items to the ranks, so each rank's batch comes from one group.

    Example:
        >>> lengths = torch.tensor([5, 40, 7, 38, 6, 41])
        >>> grouped = group_by_length(torch.arange(6), lengths, 2, 3, torch.Generator())
        >>> sorted(lengths[grouped].view(3, 2).tolist())
        [[5, 6], [7, 38], [40, 41]]
    """
    if batch_size < 1 or window < 1:
        raise ValueError(f"batch_size and window must be >= 1, got {batch_size}, {window}")
    size = window * batch_size
    windows = []
    for start in range(0, order.numel(), size):
        chunk = order[start : start + size]
        windows.append(chunk[torch.sort(lengths[chunk], stable=True).indices])
    grouped = torch.cat(windows) if windows else order
    full = grouped.numel() // batch_size * batch_size
    batches = grouped[:full].view(-1, batch_size)
    shuffled = batches[torch.randperm(batches.shape[0], generator=generator)].reshape(-1)
    return torch.cat([shuffled, grouped[full:]])


def padded_lengths(lengths: torch.Tensor, order: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The length each batch is padded to (its longest item) for ``order`` cut into batches of
    ``batch_size`` (the last may be short).

    Example:
        >>> padded_lengths(torch.tensor([5, 40, 7, 38]), torch.tensor([0, 2, 1, 3]), 2)
        tensor([ 7, 40])
    """
    maxima = [
        lengths[order[start : start + batch_size]].max()
        for start in range(0, order.numel(), batch_size)
    ]
    return torch.stack(maxima) if maxima else lengths.new_zeros(0)


def padded_tokens(lengths: torch.Tensor, order: torch.Tensor, batch_size: int) -> int:
    """Tokens a padded epoch computes: ``sum over batches of len(batch) * max length in it``,
    for ``order`` cut into batches of ``batch_size`` (the last may be short).

    Example:
        >>> padded_tokens(torch.tensor([5, 40, 7, 38]), torch.tensor([0, 1, 2, 3]), 2)
        156
    """
    maxima = padded_lengths(lengths, order, batch_size)
    if not maxima.numel():
        return 0
    sizes = torch.full_like(maxima, batch_size)
    sizes[-1] = order.numel() - batch_size * (maxima.numel() - 1)
    return int((sizes * maxima).sum())


def token_share(lengths: torch.Tensor, batch_size: int, window: int, seed: int = 0) -> float:
    """Padded tokens of an epoch in batches grouped by length (:func:`group_by_length`) as a
    share of the same epoch in random batches, for one seeded shuffle of every item: what
    grouping saves of a step's forward and backward, to first order (the budget solver's
    ``token_share``).

    Example:
        >>> lengths = torch.tensor([5, 40, 7, 38, 6, 41, 8, 39])
        >>> round(token_share(lengths, batch_size=2, window=4), 3)
        0.746
    """
    generator = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(lengths.numel(), generator=generator)
    grouped = group_by_length(shuffled, lengths, batch_size, window, generator)
    padded = padded_tokens(lengths, grouped, batch_size)
    return padded / padded_tokens(lengths, shuffled, batch_size)


def infobatch_keep(
    difficulty: torch.Tensor, budget: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep ``ceil(budget * n)`` items by dropping well-learned ones at random (InfoBatch).

    With ``D = n - ceil(budget * n)`` items to drop, the candidates are the items whose
    difficulty is below the mean (InfoBatch's well-learned samples), or the ``min(n, 2D)``
    easiest when those are more: ``m = max(#below mean, min(n, 2D))`` candidates, of which ``D``
    are dropped uniformly at random (so at most half of the candidates while
    ``budget >= 0.5``). Each kept candidate gets the weight ``m / (m - D)`` and every
    other kept item ``1``, so for any per-item values ``x``,
    ``E[sum_kept w_i x_i] = sum_all x_i``: weighting kept losses this way leaves the expected
    gradient of the epoch unchanged.

    Returns:
        ``(kept, weights)``: kept indices (ascending) and a weight per item (0 for dropped ones).

    Example:
        >>> kept, w = infobatch_keep(torch.tensor([0.1, 0.2, 0.9, 0.8]), 0.75,
        ...                          torch.Generator().manual_seed(0))
        >>> len(kept), float(w.sum())
        (3, 4.0)
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    count = difficulty.numel()
    drop = count - pool_size(budget, count)
    weights = torch.ones(count, dtype=torch.float32)
    if drop == 0:
        return torch.arange(count), weights
    below_mean = int((difficulty < difficulty.mean()).sum())
    candidates = ranking(difficulty)[: max(below_mean, min(count, 2 * drop))]
    dropped = candidates[torch.randperm(candidates.numel(), generator=generator)[:drop]]
    weights[candidates] = candidates.numel() / (candidates.numel() - drop)
    weights[dropped] = 0.0
    return torch.nonzero(weights).flatten(), weights


@dataclass(frozen=True)
class CurriculumSchedule:
    """What each epoch trains on: warm-up, data budget and pacing, as numbers only.

    Epochs ``e < warmup_epochs`` see all ``n`` items in a seeded random order (that is where
    loss-type scores come from), and so do the last ``anneal_epochs`` epochs (InfoBatch's
    annealing: the run ends on all data). Afterwards, with progress ``t = (e - w) / (epochs - w)``:

    1. the budget keeps ``k = ceil(budget * n)`` items: the lowest-difficulty ones
       (``budget_drops="hardest"``) or all but a random draw of well-learned ones
       (``"easiest_random"``, :func:`infobatch_keep`);
    2. pacing keeps the easiest ``ceil(c(t) * k)`` of those (hardest with ``hardest_first``),
       ``c`` from :func:`pacing_fraction`;
    3. the epoch visits that pool once, shuffled by a generator seeded with ``(seed, e)``.

    Sizes depend only on ``n`` and the epoch, never on scores, so the number of steps of a run
    is known before it starts (:meth:`epoch_size`); the order depends on the scores.

    Example:
        >>> schedule = CurriculumSchedule(pacing="linear", start_fraction=0.5, full_at=1.0,
        ...                               budget=0.5, warmup_epochs=1, epochs=3)
        >>> [schedule.epoch_size(100, e) for e in range(3)]
        [100, 25, 38]
    """

    pacing: str = "none"
    start_fraction: float = 0.2
    full_at: float = 0.5
    stages: int = 4
    hardest_first: bool = False
    budget: float = 1.0
    budget_drops: str = "hardest"
    warmup_epochs: int = 1
    epochs: int = 1
    anneal_epochs: int = 0

    def __post_init__(self) -> None:
        check_pacing(self.pacing, self.start_fraction, self.full_at, self.stages)
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"budget must be in (0, 1], got {self.budget}")
        if self.budget_drops not in BUDGET_DROPS:
            raise ValueError(
                f"budget_drops must be one of {BUDGET_DROPS}, got {self.budget_drops!r}"
            )
        if self.warmup_epochs < 0 or self.anneal_epochs < 0:
            raise ValueError(
                f"warmup_epochs and anneal_epochs must be >= 0, got {self.warmup_epochs}, "
                f"{self.anneal_epochs}"
            )
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")

    def progress(self, epoch: int) -> float:
        """Pacing progress ``t`` of ``epoch`` in [0, 1] (0 during warm-up)."""
        span = max(1, self.epochs - self.warmup_epochs)
        return min(1.0, max(0, epoch - self.warmup_epochs) / span)

    def kept_size(self, count: int, epoch: int) -> int:
        """Items the budget keeps in ``epoch`` out of ``count``."""
        return count if self.on_all_data(epoch) else pool_size(self.budget, count)

    def on_all_data(self, epoch: int) -> bool:
        """Whether ``epoch`` visits every item: a warm-up or an annealing epoch."""
        annealing = self.anneal_epochs > 0 and epoch >= self.epochs - self.anneal_epochs
        return epoch < self.warmup_epochs or annealing

    def for_run(
        self, epochs: int, anneal: float, may_prescore: bool
    ) -> tuple[CurriculumSchedule, bool]:
        """This schedule over a run of ``epochs`` with ``floor(anneal * epochs)`` annealing
        epochs, and whether the samples must be scored before training instead of in a warm-up
        epoch (when the warm-up would leave no curriculum epoch and ``may_prescore``).

        Example:
            >>> half = CurriculumSchedule(budget=0.5, warmup_epochs=1)
            >>> schedule, prescore = half.for_run(epochs=1, anneal=0.0, may_prescore=True)
            >>> schedule.warmup_epochs, schedule.epochs, prescore
            (0, 1, True)
        """
        if epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        annealed = int(anneal * epochs)
        changes_data = self.pacing != "none" or self.budget < 1
        no_room = self.warmup_epochs + annealed >= epochs and changes_data
        prescore = no_room and may_prescore and annealed < epochs
        warmup = 0 if prescore else self.warmup_epochs
        if no_room and not prescore:
            raise ValueError(
                f"warmup_epochs={warmup} and {annealed} annealing epochs leave no epoch for the "
                f"curriculum out of epochs={epochs}; train longer, lower warmup_epochs or "
                "anneal, or give the LightningModule a `score_batch(batch)` method (then a "
                "forward-only pass scores the samples before training)"
            )
        settled = dataclasses.replace(
            self, warmup_epochs=warmup, epochs=epochs, anneal_epochs=annealed
        )
        return settled, prescore

    def epoch_size(self, count: int, epoch: int) -> int:
        """Items ``epoch`` visits out of ``count`` (budget, then pacing)."""
        kept = self.kept_size(count, epoch)
        if self.on_all_data(epoch):
            return kept
        fraction = pacing_fraction(
            self.progress(epoch), self.pacing, self.start_fraction, self.full_at, self.stages
        )
        return pool_size(fraction, kept)

    def plan(
        self,
        difficulty: torch.Tensor,
        epoch: int,
        seed: int,
        groups: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The epoch's order (item indices) and, for ``"easiest_random"``, per-item weights.

        ``groups`` (class labels) make the budget's and the pacing's choices keep each group's
        share; the random drop of ``"easiest_random"`` is unbiased without them.
        """
        count = difficulty.numel()
        epoch_seed = seed * 1_000_003 + epoch
        generator = torch.Generator().manual_seed(epoch_seed)
        if self.on_all_data(epoch):
            return torch.randperm(count, generator=generator), None
        weights = None
        if self.budget_drops == "easiest_random":
            kept, weights = infobatch_keep(difficulty, self.budget, generator)
        else:
            kept = budget_keep(difficulty, self.budget, groups)
        size = self.epoch_size(count, epoch)
        kept_groups = None if groups is None else groups[kept]
        pool = shuffled_pool(difficulty[kept], size, epoch_seed, self.hardest_first, kept_groups)
        return kept[pool], weights
