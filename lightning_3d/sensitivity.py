"""Gradient statistics and parameter sensitivity: what the parameter axis freezes, and why.

Every optimizer step hands :class:`GradientStatistics` the gradient ``g`` of each tensor it
watches. Each tensor is cut into groups (the whole tensor, one output row, or one element; see
``granularity``) and each group keeps a running count ``n``, mean ``mu`` and sum of squared
deviations ``M2`` over all the gradient values it has seen, merged step by step with the
parallel form of Welford's update (Chan, Golub & LeVeque 1979)::

    delta = mu_b - mu,   n' = n + n_b,   mu' = mu + delta * n_b / n',
    M2' = M2 + M2_b + delta^2 * n * n_b / n'

where ``(n_b, mu_b, M2_b)`` summarize this step's values of the group. The sensitivity metrics
follow from that state (population variance, ``ddof=0``):

* ``variance``: ``var = M2 / n``;
* ``snr`` (signal-to-noise): ``mu^2 / var``;
* ``fisher``: ``E[g^2] = var + mu^2``, the Fisher information estimated from the mini-batch
  gradients the optimizer sees (so it depends on the batch size and, under data parallelism, on
  the global batch);
* ``composite``: ``I = ||g||^2 + alpha * numel * Fisher + beta * ||theta - theta_0||^2``, with
  ``||g||^2`` the latest step's squared gradient norm and ``theta_0`` the weights when watching
  began, divided by the tensor's size so tensors of different sizes compare.

With ``granularity="element"`` every element is its own stream across steps (the textbook
per-coordinate mean and variance, memory the size of the model); ``"row"`` pools each output row
(dim 0) and ``"tensor"`` (the default) pools the whole tensor, so memory is O(number of tensors).
Fisher is the same at every granularity (a mean of ``g^2``); at ``"tensor"`` and ``"row"``
granularity variance and SNR measure the spread of the pooled values (across elements and steps),
not the noise of each coordinate over time, which only ``"element"`` measures. A step's own
``M2_b`` is ``sum(x^2) - (sum x)^2 / n_b``, exact enough in the float64 state of tensor and row
groups (one pass, and one all-reduce under sharding).

Freezing picks a set of *units* (tensors, modules or regex-named groups, see
:func:`group_parameters`) to keep trainable under a parameter budget, the most sensitive per
parameter first (:func:`select_trainable`), so the frozen ones are those whose gradients say least
about the loss. ``random`` and ``depth`` (lowest layers first, like Composer's LayerFreezing) are
baselines with the same budget.

Example:
    >>> stats = GradientStatistics()
    >>> stats.update({"w": torch.tensor([1.0, 3.0])}), stats.update({"w": torch.tensor([5.0, 7.0])})
    (True, True)
    >>> stats.mean("w").item(), stats.variance("w").item(), stats.fisher("w").item()
    (4.0, 5.0, 21.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from typing import Any

import torch

GRANULARITIES = ("tensor", "row", "element")
#: Freezing orders that need no gradient statistics: at random, or by depth (the top trains).
BASELINE_METRICS = ("random", "depth")
#: Metrics computed from gradient statistics, plus the baselines that ignore them.
METRICS = ("fisher", "variance", "snr", "composite", *BASELINE_METRICS)
SCHEDULES = ("once", "progressive")
#: Parameter names of task heads (sequence classifiers, poolers, language-model heads).
DEFAULT_HEAD = r"(^|\.)(classifier|score|lm_head|pooler)\."
#: The layer number inside transformer parameter names (``encoder.layer.3.``, ``layers.11.``).
DEFAULT_LAYER_PATTERN = r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\."
#: Added to variances before dividing, so a constant gradient has a finite SNR.
EPSILON = 1e-30

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def welford_merge(
    count: torch.Tensor,
    mean: torch.Tensor,
    m2: torch.Tensor,
    batch_count: float | torch.Tensor,
    batch_mean: torch.Tensor,
    batch_m2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge a batch summary ``(n_b, mu_b, M2_b)`` into a running ``(n, mu, M2)`` (Chan et al.).

    Example:
        >>> n, mu, m2 = welford_merge(
        ...     torch.tensor(2.0), torch.tensor(2.0), torch.tensor(2.0),
        ...     2.0, torch.tensor(6.0), torch.tensor(2.0))
        >>> n.item(), mu.item(), (m2 / n).item()  # the values 1, 3, 5, 7
        (4.0, 4.0, 5.0)
    """
    total = count + batch_count
    delta = batch_mean - mean
    new_mean = mean + delta * (batch_count / total)
    new_m2 = m2 + batch_m2 + delta.square() * (count * batch_count / total)
    return total, new_mean, new_m2


def grouped(tensor: torch.Tensor, granularity: str) -> torch.Tensor:
    """``tensor`` as ``[groups, values_per_group]``: one group, one per row, or one per element."""
    if granularity == "tensor":
        return tensor.reshape(1, -1)
    if granularity == "row":
        return tensor.reshape(tensor.shape[0], -1) if tensor.dim() > 0 else tensor.reshape(1, 1)
    return tensor.reshape(-1, 1)


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """The local part of a ``DTensor`` (the shard this rank holds), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


class GradientStatistics:
    """Running gradient statistics per tensor (or row, or element), merged with Welford's update.

    Args:
        granularity: ``"tensor"`` (one group per tensor, the default), ``"row"`` (one per output
            row) or ``"element"``.
        all_reduce: sums a float64 tensor over the ranks that each hold a *shard* of the
            gradients (FSDP2); ``None`` when every rank holds whole gradients (one process, DDP).
            Only ``"tensor"`` granularity pools values across shards.

    The state is float64 for tensor and row groups and float32 for elements (memory the size of
    the watched parameters, twice).
    """

    def __init__(self, granularity: str = "tensor", all_reduce: AllReduce | None = None) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        self.granularity = granularity
        self.all_reduce = all_reduce
        self.steps = 0
        self._count: dict[str, torch.Tensor] = {}
        self._mean: dict[str, torch.Tensor] = {}
        self._m2: dict[str, torch.Tensor] = {}
        self._last_sq_norm: dict[str, float] = {}

    @property
    def names(self) -> list[str]:
        """Tensors with statistics, in the order first seen."""
        return list(self._mean)

    def update(self, gradients: Mapping[str, torch.Tensor]) -> bool:
        """Merge one step's gradients (``name -> gradient``; local shards for ``DTensor``s).

        A step whose gradients hold ``inf``/``NaN`` (an fp16 loss-scale overflow, which the
        optimizer skips too) is not merged; returns whether the step was merged.
        """
        if not gradients:
            return False
        dtype = torch.float32 if self.granularity == "element" else torch.float64
        names = list(gradients)
        values = [grouped(local_part(gradients[n]).detach(), self.granularity) for n in names]
        # Per group: how many values, their sum and their sum of squares (one reduction each).
        counts = torch.tensor([float(v.shape[1]) for v in values], dtype=torch.float64)
        sums = [v.to(dtype).sum(1) for v in values]
        squares = [v.to(dtype).square().sum(1) for v in values]
        device = sums[0].device
        if self.granularity == "tensor" and self.all_reduce is not None:
            packed = torch.stack([counts.to(device), torch.cat(sums), torch.cat(squares)])
            counts, summed, squared = self.all_reduce(packed).cpu()
            sums, squares = list(summed.split(1)), list(squared.split(1))
        sq_norms = torch.stack([s.sum().double() for s in squares])
        if self.all_reduce is not None and self.granularity != "tensor":
            sq_norms = self.all_reduce(sq_norms)
        if not torch.isfinite(sq_norms).all():  # the same verdict on every rank
            return False
        sq_norms = sq_norms.cpu()
        for i, name in enumerate(names):
            count = counts[i].item()
            batch_mean = sums[i] / count
            batch_m2 = (squares[i] - sums[i] * batch_mean).clamp_min(0)
            if name not in self._mean:
                self._count[name] = torch.tensor(0.0, dtype=torch.float64)
                self._mean[name] = torch.zeros_like(batch_mean)
                self._m2[name] = torch.zeros_like(batch_m2)
            elif self._mean[name].device != batch_mean.device:  # restored from a checkpoint
                self._mean[name] = self._mean[name].to(batch_mean.device)
                self._m2[name] = self._m2[name].to(batch_mean.device)
            self._count[name], self._mean[name], self._m2[name] = welford_merge(
                self._count[name], self._mean[name], self._m2[name], count, batch_mean, batch_m2
            )
            self._last_sq_norm[name] = sq_norms[i].item()
        self.steps += 1
        return True

    # -- the statistics and metrics, per group --------------------------------------------------
    def count(self, name: str) -> float:
        """How many gradient values each group of ``name`` has seen."""
        return self._count[name].item()

    def mean(self, name: str) -> torch.Tensor:
        """``mu`` per group."""
        return self._mean[name]

    def variance(self, name: str) -> torch.Tensor:
        """``M2 / n`` per group (population variance, like ``numpy.var``)."""
        return self._m2[name] / self._count[name].clamp_min(1)

    def fisher(self, name: str) -> torch.Tensor:
        """``E[g^2] = var + mu^2`` per group."""
        return self.variance(name) + self._mean[name].square()

    def snr(self, name: str) -> torch.Tensor:
        """``mu^2 / var`` per group."""
        return self._mean[name].square() / (self.variance(name) + EPSILON)

    def last_sq_norm(self, name: str) -> float:
        """``||g||^2`` of the latest step (the whole tensor, over all shards)."""
        return self._last_sq_norm[name]

    def tensor_metric(self, metric: str) -> dict[str, float]:
        """``metric`` (``fisher``, ``variance`` or ``snr``) per tensor: the mean over its groups,
        weighted by group size (groups of one tensor have equal sizes, so a plain mean)."""
        per_group = {"fisher": self.fisher, "variance": self.variance, "snr": self.snr}
        if metric not in per_group:
            raise ValueError(f"metric must be one of {tuple(per_group)}, got {metric!r}")
        names = self.names
        if not names:
            return {}
        sums = torch.stack([per_group[metric](n).double().sum().cpu() for n in names])
        groups = torch.tensor([float(self._mean[n].numel()) for n in names], dtype=torch.float64)
        if self.all_reduce is not None and self.granularity != "tensor":
            device = self._mean[names[0]].device
            sums, groups = self.all_reduce(torch.stack([sums, groups]).to(device)).cpu()
        return {n: (sums[i] / groups[i]).item() for i, n in enumerate(names)}

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "steps": self.steps,
            "count": dict(self._count),
            "mean": {n: t.cpu() for n, t in self._mean.items()},
            "m2": {n: t.cpu() for n, t in self._m2.items()},
            "last_sq_norm": dict(self._last_sq_norm),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state["granularity"] != self.granularity:
            raise ValueError(
                f"the checkpoint holds granularity={state['granularity']!r} statistics but this "
                f"run watches granularity={self.granularity!r}"
            )
        self.steps = state["steps"]
        self._count = dict(state["count"])
        self._mean = dict(state["mean"])
        self._m2 = dict(state["m2"])
        self._last_sq_norm = dict(state["last_sq_norm"])


def parameter_drift(
    params: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """``||theta - theta_0||^2`` of every parameter named in ``reference`` (laid out like its
    parameter), in float64, summed over shards by ``all_reduce`` when the tensors are sharded.

    Example:
        >>> parameter_drift({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, 0.0])})
        {'w': 5.0}
    """
    if not reference:
        return {}
    names = list(reference)
    local = torch.stack(
        [
            (local_part(params[n].detach()).double() - local_part(reference[n]).double())
            .square()
            .sum()
            for n in names
        ]
    )
    if all_reduce is not None:
        local = all_reduce(local)
    return dict(zip(names, local.tolist(), strict=True))


def composite_sensitivity(
    grad_sq_norm: float, fisher: float, drift_sq_norm: float, numel: int, alpha: float, beta: float
) -> float:
    """``I / numel`` with ``I = ||g||^2 + alpha * numel * Fisher + beta * ||theta - theta_0||^2``.

    ``fisher`` is the per-element mean ``E[g^2]``, so all three terms become per-element.

    Example:
        >>> composite_sensitivity(8.0, 0.5, 4.0, numel=4, alpha=2.0, beta=1.0)
        4.0
    """
    return grad_sq_norm / numel + alpha * fisher + beta * drift_sq_norm / numel


def group_parameters(names: Sequence[str], group_by: str = "tensor") -> dict[str, list[str]]:
    """Units that freeze together: ``"tensor"`` (each parameter), ``"module"`` (the parameters
    of one module, e.g. a weight and its bias), or a regex whose match names the unit (e.g.
    ``r"layer\\.\\d+\\."`` for whole transformer layers; non-matching tensors stand alone).

    Example:
        >>> group_parameters(["l.0.w", "l.0.b", "l.1.w", "head.w"], r"l\\.\\d+")
        {'l.0': ['l.0.w', 'l.0.b'], 'l.1': ['l.1.w'], 'head.w': ['head.w']}
    """
    units: dict[str, list[str]] = {}
    pattern = None if group_by in ("tensor", "module") else re.compile(group_by)
    for name in names:
        if group_by == "tensor":
            key = name
        elif group_by == "module":
            key = name.rsplit(".", 1)[0] if "." in name else name
        else:
            match = pattern.search(name)
            key = match.group(0) if match else name
        units.setdefault(key, []).append(name)
    return units


def unit_scores(
    units: Mapping[str, Sequence[str]], scores: Mapping[str, float], sizes: Mapping[str, int]
) -> dict[str, float]:
    """Per-parameter score of each unit: ``sum_i score_i * numel_i / sum_i numel_i``."""
    return {
        unit: sum(scores[n] * sizes[n] for n in members) / max(1, sum(sizes[n] for n in members))
        for unit, members in units.items()
    }


def baseline_scores(metric: str, units: Sequence[str], seed: int = 0) -> dict[str, float]:
    """Scores of the baselines: ``random`` (seeded uniform) or ``depth`` (later units score
    higher, so the lowest layers freeze first)."""
    if metric == "random":
        draws = torch.rand(len(units), generator=torch.Generator().manual_seed(seed))
        return {unit: draws[i].item() for i, unit in enumerate(units)}
    if metric == "depth":
        return {unit: float(i) for i, unit in enumerate(units)}
    raise ValueError(f"baseline metric must be 'random' or 'depth', got {metric!r}")


def select_trainable(
    scores: Mapping[str, float], sizes: Mapping[str, int], budget: int, contiguous: bool = False
) -> list[str]:
    """The units to keep trainable: most sensitive per parameter first, each one taken while the
    kept parameters stay within ``budget`` (a greedy knapsack by score density; a unit too big
    for what is left is skipped and smaller ones still fill the budget). With ``contiguous`` the
    choice stops at the first unit that does not fit, so it is a prefix of the ranking (the
    ``depth`` baseline keeps whole top layers, nothing below them). Ties go to the earlier unit.

    Example:
        >>> scores, sizes = {"a": 3.0, "b": 2.0, "c": 1.0}, {"a": 6, "b": 6, "c": 2}
        >>> select_trainable(scores, sizes, budget=8), select_trainable(scores, sizes, 8, True)
        (['a', 'c'], ['a'])
    """
    order = sorted(scores, key=lambda unit: -scores[unit])
    kept, used = [], 0
    for unit in order:
        if used + sizes[unit] <= budget:
            kept.append(unit)
            used += sizes[unit]
        elif contiguous:
            break
    return kept


def trainable_fraction_at(stage: int, stages: int, target: float) -> float:
    """Progressive schedule: after freezing event ``stage`` (1-based) of ``stages``, the share
    still trainable is ``1 - (1 - target) * stage / stages`` (``once`` is ``stages=1``).

    Example:
        >>> [trainable_fraction_at(s, 4, 0.25) for s in (1, 2, 3, 4)]
        [0.8125, 0.625, 0.4375, 0.25]
    """
    return 1.0 - (1.0 - target) * min(stage, stages) / stages


def compile_pattern(argument: str, pattern: str | None, groups: int = 0) -> re.Pattern[str] | None:
    r"""``pattern`` compiled (``None`` stays ``None``), for a callback argument named ``argument``.

    Raises:
        ValueError: naming the argument, when the regex is invalid or has fewer than ``groups``
            capture groups (the layer number).

    Example:
        >>> compile_pattern("layer_pattern", r"layer\.(\d+)", groups=1).groups
        1
    """
    if pattern is None:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{argument}={pattern!r} is not a valid regex: {error}") from None
    if compiled.groups < groups:
        raise ValueError(f"{argument}={pattern!r} needs a capture group for the layer number")
    return compiled


def layer_index(name: str, pattern: str = DEFAULT_LAYER_PATTERN) -> int | None:
    """The layer number in a parameter name, or ``None`` (embeddings, heads, ...)."""
    match = re.search(pattern, name)
    return int(match.group(1)) if match else None


def layerwise_lr_scales(
    names: Sequence[str], decay: float, pattern: str = DEFAULT_LAYER_PATTERN
) -> dict[str, float]:
    """Layer-wise learning-rate decay: layer ``i`` of ``L`` gets ``decay^(L - i)``; tensors
    before the first layer (embeddings) ``decay^(L + 1)``; tensors after it (heads) 1.

    ``names`` must be in model order (as ``named_parameters`` gives them).

    Example:
        >>> names = ["emb", "layers.0.w", "layers.1.w", "head"]
        >>> layerwise_lr_scales(names, 0.5, r"layers\\.(\\d+)")
        {'emb': 0.125, 'layers.0.w': 0.25, 'layers.1.w': 0.5, 'head': 1.0}
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"lr_decay must be in (0, 1], got {decay}")
    indices = {name: layer_index(name, pattern) for name in names}
    found = [i for i in indices.values() if i is not None]
    if not found:
        return dict.fromkeys(names, 1.0)
    depth, seen_layer = max(found) + 1, False
    scales = {}
    for name in names:
        index = indices[name]
        seen_layer = seen_layer or index is not None
        exponent = depth - index if index is not None else (0 if seen_layer else depth + 1)
        scales[name] = decay**exponent
    return scales


# -- optimizer surgery ---------------------------------------------------------------------------
def stepped_parameters(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    names: Container[str],
) -> dict[str, torch.Tensor]:
    """The parameters called one of ``names`` that ``optimizer`` steps and that have a gradient
    now (what a hook before the optimizer step reads).

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> layer(torch.ones(1, 2)).sum().backward()
        >>> optimizer = torch.optim.SGD([layer.weight], lr=0.1)
        >>> list(stepped_parameters(layer.named_parameters(), optimizer, {"weight", "bias"}))
        ['weight']
    """
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {
        name: param
        for name, param in named_parameters
        if name in names and id(param) in stepped and param.grad is not None
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's per-parameter state tensors (moments, quantization maps),
    each storage counted once (bitsandbytes shares one quantization map among parameters)."""
    storages: dict[int, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = local_part(value)
                storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def drop_from_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Remove ``params`` from the optimizer's groups and release their state.

    Groups stay (possibly empty), so learning-rate schedulers still match. Returns the number of
    state bytes released.
    """
    dropped = {id(p) for p in params}
    before = optimizer_state_bytes(optimizer)
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in dropped]
    for param in [p for p in optimizer.state if id(p) in dropped]:
        del optimizer.state[param]
    return before - optimizer_state_bytes(optimizer)


def add_to_optimizer(
    optimizer: torch.optim.Optimizer,
    params: Iterable[tuple[torch.Tensor, int]],
    position: Callable[[torch.Tensor], int],
) -> None:
    """Put ``(param, group index)`` pairs back into their groups (unfreezing), with fresh state,
    each group kept sorted by ``position`` (the parameters' original order), so that a resumed
    run that rebuilds the groups lines its saved state up with the same parameters."""
    touched = set()
    for param, index in params:
        group = optimizer.param_groups[index]["params"]
        if all(p is not param for p in group):
            group.append(param)
            touched.add(index)
    for index in touched:
        optimizer.param_groups[index]["params"].sort(key=position)


#: Schedulers whose per-group settings live outside ``base_lrs``: layer-wise groups cannot be
#: added to them after the fact.
UNSPLITTABLE_SCHEDULERS = (
    torch.optim.lr_scheduler.OneCycleLR,
    torch.optim.lr_scheduler.CyclicLR,
    torch.optim.lr_scheduler.ReduceLROnPlateau,
)


def split_param_groups(
    optimizer: torch.optim.Optimizer,
    scale_of: Callable[[torch.Tensor], float],
    schedulers: Sequence[Any] = (),
) -> None:
    """Split every group into one group per learning-rate scale, multiplying ``lr`` (and
    ``initial_lr``) by the scale; schedulers of the optimizer get matching ``base_lrs``.

    Schedulers that keep one function per group (``LambdaLR``, ``MultiplicativeLR``) repeat the
    group's function; ``SequentialLR`` and ``ChainedScheduler`` are split through. Schedulers with
    other per-group settings (``OneCycleLR``, ``CyclicLR``, ``ReduceLROnPlateau``) are refused
    before anything changes.
    """
    mine = [s for s in schedulers if getattr(s, "optimizer", None) is optimizer]
    for scheduler in _flatten_schedulers(mine):
        if isinstance(scheduler, UNSPLITTABLE_SCHEDULERS):
            raise ValueError(
                f"lr_decay cannot split the groups of a {type(scheduler).__name__} scheduler; "
                "use LambdaLR, StepLR, CosineAnnealingLR, LinearLR or SequentialLR of those, or "
                "build layer-wise groups in configure_optimizers"
            )
    new_groups, origin = [], []
    for index, group in enumerate(optimizer.param_groups):
        by_scale: dict[float, list[torch.Tensor]] = {}
        for param in group["params"]:
            by_scale.setdefault(scale_of(param), []).append(param)
        for scale, params in sorted(by_scale.items()) or [(1.0, [])]:
            split = {**group, "params": params, "lr": group["lr"] * scale}
            if "initial_lr" in group:
                split["initial_lr"] = group["initial_lr"] * scale
            new_groups.append(split)
            origin.append(index)
    optimizer.param_groups = new_groups
    for scheduler in _flatten_schedulers(mine):
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas = [scheduler.lr_lambdas[i] for i in origin]
        scheduler.base_lrs = [g.get("initial_lr", g["lr"]) for g in new_groups]
        # ``get_last_lr()`` must list the new groups before the next ``step()``; PyTorch keeps
        # it in the private ``_last_lr`` with no setter (tests/test_lightning_seams.py names it)
        scheduler._last_lr = [g["lr"] for g in new_groups]


def apply_layerwise_lr(
    params: Mapping[str, torch.Tensor],
    optimizers: Sequence[torch.optim.Optimizer],
    schedulers: Sequence[Any],
    decay: float,
    layer_pattern: str = DEFAULT_LAYER_PATTERN,
) -> None:
    """Layer-wise learning-rate decay: split the optimizers' groups so that each parameter's
    learning rate is scaled by :func:`layerwise_lr_scales` (see :func:`split_param_groups`)."""
    scales = layerwise_lr_scales(list(params), decay, layer_pattern)
    scale_of = {id(p): scales[n] for n, p in params.items()}
    for optimizer in optimizers:
        split_param_groups(optimizer, lambda p: scale_of[id(p)], schedulers)


def composite_scores(
    statistics: GradientStatistics,
    drift: Mapping[str, float],
    sizes: Mapping[str, int],
    alpha: float,
    beta: float,
) -> dict[str, float]:
    """:func:`composite_sensitivity` of every tensor with a Fisher value in ``statistics``
    (``drift``: ``||theta - theta_0||^2`` per tensor, 0 where absent)."""
    fisher = statistics.tensor_metric("fisher")
    return {
        name: composite_sensitivity(
            statistics.last_sq_norm(name), value, drift.get(name, 0.0), sizes[name], alpha, beta
        )
        for name, value in fisher.items()
    }


def _flatten_schedulers(schedulers: Iterable[Any]) -> list[Any]:
    """The schedulers and, for ``SequentialLR``/``ChainedScheduler``, the ones inside them.

    PyTorch keeps those in the private ``_schedulers`` and has no public accessor; this is the
    one place that reads it (tests/test_lightning_seams.py fails, naming it, if it goes)."""
    flat = []
    for scheduler in schedulers:
        flat.append(scheduler)
        flat.extend(_flatten_schedulers(getattr(scheduler, "_schedulers", ())))
    return flat


def sensitivity_heatmap(
    scores: Mapping[str, float], layer_pattern: str = DEFAULT_LAYER_PATTERN
) -> Any:  # -> matplotlib.figure.Figure
    """A heatmap of ``log10(score)``: one row per layer, one column per tensor role within a
    layer (``attention.self.query.weight``, ...); names outside layers get a row of their own.

    Example:
        >>> scores = {"l.0.q.weight": 1e-3, "l.1.q.weight": 1e-5}
        >>> figure = sensitivity_heatmap(scores, r"l\\.(\\d+)\\.")
        >>> figure.axes[0].get_ylabel()
        'layer'
    """
    from matplotlib.figure import Figure

    cells: dict[tuple[str, str], float] = {}
    for name, score in scores.items():
        match = re.search(layer_pattern, name)  # the layer number and where the role starts
        row, role = (match.group(1), name[match.end() :]) if match else ("other", name)
        cells[(row, role)] = math.log10(score) if score > 0 else float("nan")
    layers = sorted({int(r) for r, _ in cells if r != "other"})
    rows = [str(i) for i in layers] + (["other"] if any(r == "other" for r, _ in cells) else [])
    roles = list(dict.fromkeys(role for _, role in cells))
    grid = torch.full((len(rows), len(roles)), float("nan"))
    for (row, role), value in cells.items():
        grid[rows.index(row), roles.index(role)] = value
    figure = Figure(figsize=(max(4.0, 0.45 * len(roles) + 2), max(2.5, 0.35 * len(rows) + 1.5)))
    axes = figure.add_subplot()
    image = axes.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(roles)), roles, rotation=70, ha="right", fontsize=7)
    axes.set_yticks(range(len(rows)), rows, fontsize=7)
    axes.set_ylabel("layer")
    figure.colorbar(image, ax=axes, label="log10 sensitivity")
    figure.tight_layout()
    return figure


def find_gradient_statistics(source: Any, exclude: Any = None) -> GradientStatistics | None:
    """The gradient statistics a callback (other than ``exclude``) already measures, as its
    public ``statistics`` attribute (the freezer's), so a second axis reads them instead of
    measuring again; ``None`` when none has them.

    Args:
        source: a trainer (its ``callbacks`` are searched) or an iterable of callbacks.
        exclude: a callback to skip (the one asking).

    Example:
        >>> class Measuring:
        ...     statistics = GradientStatistics()
        >>> freezer = Measuring()
        >>> find_gradient_statistics([object(), freezer]) is freezer.statistics
        True
        >>> find_gradient_statistics([freezer], exclude=freezer) is None
        True
    """
    callbacks = getattr(source, "callbacks", source)
    for callback in callbacks:
        if callback is exclude:
            continue
        statistics = getattr(callback, "statistics", None)
        if isinstance(statistics, GradientStatistics):
            return statistics
    return None


__all__ = [
    "DEFAULT_HEAD",
    "DEFAULT_LAYER_PATTERN",
    "GRANULARITIES",
    "METRICS",
    "SCHEDULES",
    "UNSPLITTABLE_SCHEDULERS",
    "GradientStatistics",
    "add_to_optimizer",
    "baseline_scores",
    "compile_pattern",
    "composite_sensitivity",
    "drop_from_optimizer",
    "find_gradient_statistics",
    "group_parameters",
    "grouped",
    "layer_index",
    "layerwise_lr_scales",
    "local_part",
    "optimizer_state_bytes",
    "select_trainable",
    "sensitivity_heatmap",
    "split_param_groups",
    "trainable_fraction_at",
    "unit_scores",
    "welford_merge",
]
