"""The data axis, as pure functions: per-sample scores, pacing, curriculum order, data budget.

Scores (lower means easier; computed from what a normal training step already has):

* **loss EMA**: ``s <- decay * s + (1 - decay) * l`` per sample, started at the first observed
  loss (not at zero), so one noisy step does not decide a sample's place.
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

import math

import torch

PACINGS = ("none", "linear", "root", "step", "exponential")


def loss_ema(
    scores: torch.Tensor,
    seen: torch.Tensor,
    index: torch.Tensor,
    losses: torch.Tensor,
    decay: float,
) -> None:
    """Fold per-sample ``losses`` of dataset items ``index`` into ``scores`` in place.

    ``seen`` (bool, like ``scores``) marks items observed before; a first observation sets the
    score to the loss itself. Repeated indices in one call are applied in order.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    for position, loss in zip(index.tolist(), losses.detach().float().cpu().tolist(), strict=True):
        if seen[position]:
            scores[position] = decay * scores[position] + (1.0 - decay) * loss
        else:
            scores[position] = loss
            seen[position] = True


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
    scores: torch.Tensor, fraction: float, seed: int, hardest_first: bool = False
) -> torch.Tensor:
    """The easiest ``ceil(fraction * n)`` items (hardest with ``hardest_first``), shuffled.

    Ranking is by score with ties broken by the lower index, and the shuffle uses its own seeded
    generator, so every rank computes the same order from the same scores and seed.
    """
    count = scores.numel()
    ranked = ranking(-scores if hardest_first else scores)
    pool = ranked[: pool_size(fraction, count)]
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randperm(pool.numel(), generator=generator)]


def ranking(scores: torch.Tensor) -> torch.Tensor:
    """Indices by ascending score, ties broken by the lower index."""
    return torch.sort(scores.detach().float().cpu(), stable=True).indices


def budget_keep(difficulty: torch.Tensor, budget: float) -> torch.Tensor:
    """Indices of the ``ceil(budget * n)`` items with the lowest difficulty (sorted by index).

    With loss-based difficulty this drops the samples the model fits worst, which is where
    mislabelled samples end up.
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    kept = ranking(difficulty)[: pool_size(budget, difficulty.numel())]
    return kept.sort().values


def rank_shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part of ``order``: every rank gets the same length (the order is extended by
    its own beginning to a multiple of ``world_size``, as ``DistributedSampler`` does), so no
    rank runs out of batches before the others and a collective never waits forever."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    total = math.ceil(order.numel() / world_size) * world_size
    repeats = math.ceil(total / max(order.numel(), 1))
    extended = order.repeat(repeats)[:total]
    return extended[rank::world_size]
