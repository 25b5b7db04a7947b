"""Gradual pruning: sparsity schedules, weight scores, mask patterns and structured export.

Everything here works on plain tensors and modules (no Lightning); the
:class:`~lightning_3d.callbacks.ProgressivePruner` callback decides when to call it.

* **Schedules** (:func:`sparsity_at`): the share of weights pruned after ``t`` optimizer steps,
  rising from ``s_i`` at ``start`` to ``s_f`` at ``end`` with progress ``p = (t - start) / (end -
  start)``, held between mask updates every ``frequency`` steps:

  - ``cubic`` (Zhu and Gupta 2017): ``s_f + (s_i - s_f) * (1 - p)^3``, fast early, gentle late;
  - ``linear``: ``s_i + (s_f - s_i) * p``;
  - ``exponential``: the density ``1 - s`` falls geometrically,
    ``1 - s = (1 - s_i) * ((1 - s_f) / (1 - s_i))^p`` (the same share of survivors per update);
  - ``cosine``: ``s_i + (s_f - s_i) * (1 - cos(pi * p)) / 2``.

* **Scores** (higher means keep): ``magnitude`` ``|theta|``; ``movement`` (Sanh et al. 2020)
  accumulates ``S = -sum_t theta_t * g_t`` over optimizer steps, large when a weight moves away
  from zero. A structure's score is the sum of its weights' scores.
* **Patterns**: unstructured (per tensor, or one global threshold), ``N:M`` (at most ``N``
  non-zeros in every ``M`` consecutive weights of a row, 2:4 for GPU sparse kernels), and
  structured units (:class:`StructureGroup`): rows of a weight, attention heads, FFN neurons.
* Masks are **monotone**: a pruned weight stays pruned (its score counts as ``-inf``), so the
  achieved sparsity is exactly the schedule's, and **deterministic**: ties go to the lower flat
  index (:func:`keep_top`), so every rank computes the same mask from the same scores.

Example:
    >>> round(sparsity_at(50, start=0, end=100, final=0.8), 4)  # cubic, half-way: 0.8 * 7/8
    0.7
    >>> keep_top(torch.tensor([0.3, -1.0, 0.3, 2.0]), 2)
    tensor([ True, False, False,  True])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_3d.sensitivity import DEFAULT_LAYER_PATTERN, layer_index, local_part
from lightning_3d.sharding import full_copy

SCHEDULES = ("cubic", "linear", "exponential", "cosine")
SCORES = ("magnitude", "movement")
STRUCTURED_PATTERNS = ("rows", "heads", "neurons", "heads+neurons")
SCOPES = ("layer", "global")
_N_M = re.compile(r"^(\d+):(\d+)$")
# never pruned by default: the task head, and LoRA adapters (their dense update B @ A would be
# added to a pruned base weight anyway)
DEFAULT_EXCLUDE = r"(^|\.)(classifier|score|lm_head|pooler)\.|lora_"


def sparsity_at(
    step: int,
    *,
    start: int,
    end: int,
    final: float,
    initial: float = 0.0,
    schedule: str = "cubic",
    frequency: int = 1,
) -> float:
    """Target sparsity after ``step`` optimizer steps (see the module docstring).

    Before ``start`` nothing is pruned (0.0); from ``end`` on it is ``final``. Between, the value
    is the schedule's at the last update step ``start + k * frequency``.

    Example:
        >>> [round(sparsity_at(t, start=10, end=20, final=0.5, schedule="linear", frequency=5), 2)
        ...  for t in (9, 10, 14, 15, 20, 99)]
        [0.0, 0.0, 0.0, 0.25, 0.5, 0.5]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if frequency < 1 or end <= start or not 0.0 <= initial <= final < 1.0:
        raise ValueError(
            "need frequency >= 1, end > start and 0 <= initial <= final < 1; got "
            f"frequency={frequency}, start={start}, end={end}, initial={initial}, final={final}"
        )
    if step < start:
        return 0.0
    if step >= end:
        return final
    updated = start + (step - start) // frequency * frequency
    progress = (updated - start) / (end - start)
    if schedule == "cubic":
        return final + (initial - final) * (1.0 - progress) ** 3
    if schedule == "linear":
        return initial + (final - initial) * progress
    if schedule == "exponential":
        return 1.0 - (1.0 - initial) * ((1.0 - final) / (1.0 - initial)) ** progress
    return initial + (final - initial) * (1.0 - math.cos(math.pi * progress)) / 2.0


def parse_pattern(pattern: str) -> tuple[str, tuple[int, int] | None]:
    """``("unstructured", None)``, ``("n:m", (n, m))`` or ``(structured pattern, None)``.

    Raises:
        ValueError: an unknown pattern, or ``N:M`` without ``0 < N < M``.
    """
    if pattern == "unstructured" or pattern in STRUCTURED_PATTERNS:
        return pattern, None
    match = _N_M.match(pattern)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if 0 < n < m:
            return "n:m", (n, m)
    raise ValueError(
        f"pattern must be 'unstructured', 'N:M' with 0 < N < M (e.g. '2:4'), or one of "
        f"{STRUCTURED_PATTERNS}; got {pattern!r}"
    )


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask (shape of ``scores``) of the ``keep`` highest scores; ties go to the lower
    flat index and NaN counts as ``-inf``, so the result is a pure function of the values."""
    flat = scores.detach().flatten().float()
    flat = torch.nan_to_num(flat, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    numel = flat.numel()
    if keep >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    mask = torch.zeros(numel, dtype=torch.bool, device=flat.device)
    if keep > 0:
        threshold = torch.kthvalue(flat.cpu(), numel - keep + 1).values.to(flat.device)
        mask = flat > threshold
        missing = keep - int(mask.sum())
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask.view_as(scores)


def _alive_scores(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores with already pruned weights at ``-inf`` (masks only grow)."""
    scores = scores.detach().float()
    return scores if mask is None else scores.masked_fill(~mask, -math.inf)


def _kept_count(numel: int, sparsity: float) -> int:
    return numel - round(sparsity * numel)


def unstructured_masks(
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    scope: str = "layer",
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the highest scores: per tensor (``scope="layer"``, ``sparsity`` a number or one per
    tensor) or against one threshold over all tensors (``"global"``, one number).

    Example:
        >>> masks = unstructured_masks({"w": torch.tensor([[1.0, -3.0], [0.5, 2.0]])}, 0.5)
        >>> masks["w"].tolist()
        [[True, False], [False, True]]
    """
    current = current or {}
    alive = {n: _alive_scores(s, current.get(n)) for n, s in scores.items()}
    if scope == "layer":
        masks = {
            n: keep_top(s, _kept_count(s.numel(), _value(sparsity, n))) for n, s in alive.items()
        }
    elif scope == "global" and not isinstance(sparsity, Mapping):
        names = list(alive)
        flat = torch.cat([alive[n].flatten().cpu() for n in names])
        kept = keep_top(flat, _kept_count(flat.numel(), sparsity))
        parts = kept.split([alive[n].numel() for n in names])
        masks = {
            n: p.view_as(alive[n]).to(alive[n].device) for n, p in zip(names, parts, strict=True)
        }
    else:
        raise ValueError(f"scope must be 'layer' or 'global' (with one sparsity), got {scope!r}")
    return {n: _within(m, current.get(n)) for n, m in masks.items()}


def _within(mask: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
    """``mask`` without what ``current`` already pruned (masks only grow)."""
    return mask if current is None else mask & current.to(mask.device)


def _value(sparsity: float | Mapping[str, float], name: str) -> float:
    return sparsity[name] if isinstance(sparsity, Mapping) else sparsity


def n_m_mask(
    scores: torch.Tensor,
    n: int,
    m: int,
    sparsity: float,
    current: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask on the way to ``N:M``: in every group of ``m`` consecutive weights along the last
    dimension, the ``m - n`` lowest scores are candidates; the lowest candidates are pruned
    until ``sparsity`` (at most ``1 - n/m``, where every group keeps exactly ``n``).

    Example:
        >>> n_m_mask(torch.tensor([[4.0, 1.0, 3.0, 2.0]]), 2, 4, 0.5).tolist()
        [[True, False, True, False]]
    """
    if scores.shape[-1] % m:
        raise ValueError(
            f"N:M needs the last dimension divisible by {m}, got {tuple(scores.shape)}"
        )
    groups = _alive_scores(scores, current).reshape(-1, m)
    order = torch.argsort(groups, dim=1, stable=True)  # lowest first; ties: lower index first
    candidate = torch.zeros_like(groups, dtype=torch.bool)
    candidate.scatter_(1, order[:, : m - n], True)
    pruned_count = min(round(sparsity * groups.numel()), int(candidate.sum()))
    # prune the lowest candidates: the highest of their negated scores (pruned ones are +inf)
    negated = torch.where(candidate, -groups, torch.tensor(-math.inf, device=groups.device))
    return _within(~keep_top(negated, pruned_count).view_as(scores), current)


@dataclass(frozen=True)
class StructureGroup:
    """Parameters whose slices form ``units`` prunable structures that go together.

    Unit ``i`` covers, in every member ``(parameter name, dim)``, the block
    ``[i * b, (i + 1) * b)`` along ``dim`` with ``b = shape[dim] // units``: for an attention
    head, its rows of the query/key/value weights and biases and its columns of the output
    projection; for an FFN neuron, its row (and bias) of the up projection and its column of
    the down projection; for ``rows``, the rows of one weight.

    Example:
        >>> members = (("up.weight", 0), ("down.weight", 1))
        >>> group = StructureGroup("layer.0.neurons", "neurons", 4, members)
        >>> group.unit_scores({"up.weight": torch.ones(4, 2), "down.weight": torch.ones(2, 4)})
        tensor([4., 4., 4., 4.])
    """

    name: str
    kind: str
    units: int
    members: tuple[tuple[str, int], ...]

    def _per_unit(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        return tensor.movedim(dim, 0).reshape(self.units, -1)

    def unit_scores(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum of the members' scores per unit."""
        return sum(self._per_unit(scores[p].float(), d).sum(1) for p, d in self.members)

    def alive(self, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Units with any weight left in the first member."""
        parameter, dim = self.members[0]
        return self._per_unit(masks[parameter], dim).any(1)

    def element_masks(
        self, kept: torch.Tensor, shapes: Mapping[str, torch.Size]
    ) -> dict[str, torch.Tensor]:
        """Per-weight masks of the members from a per-unit mask."""
        out = {}
        for parameter, dim in self.members:
            shape = shapes[parameter]
            block = kept.repeat_interleave(shape[dim] // self.units)
            view = [1] * len(shape)
            view[dim] = shape[dim]
            out[parameter] = block.view(view).expand(shape).clone()
        return out


def structured_masks(
    groups: Sequence[StructureGroup],
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    current: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Prune ``round(sparsity * units)`` units of every group, the lowest-scoring first; every
    group keeps at least one unit (a block without heads or neurons cannot run)."""
    current = current or {}
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        unit_scores = group.unit_scores(scores)
        if all(p in current for p, _ in group.members):
            unit_scores = unit_scores.masked_fill(~group.alive(current), -math.inf)
        kept = keep_top(unit_scores, max(1, _kept_count(group.units, sparsity)))
        for name, mask in group.element_masks(
            kept, {p: scores[p].shape for p, _ in group.members}
        ).items():
            masks[name] = masks[name] & mask if name in masks else mask
    return {n: _within(m, current.get(n)) for n, m in masks.items()}


def row_groups(shapes: Mapping[str, torch.Size]) -> list[StructureGroup]:
    """One group per 2-D weight whose units are its rows (output features)."""
    return [
        StructureGroup(name, "rows", shape[0], ((name, 0),))
        for name, shape in shapes.items()
        if len(shape) == 2
    ]


def find_structures(model: nn.Module, kinds: Sequence[str]) -> list[StructureGroup]:
    """Attention heads and FFN neurons of the transformer blocks of ``model``.

    Recognized layouts (parameter names relative to ``model``):

    * heads, BERT family: a module with ``query``/``key``/``value`` linears and
      ``num_attention_heads``; the output projection is ``<parent>.output.dense``;
    * heads, Llama family (grouped-query attention): a module with ``q_proj``/``k_proj``/
      ``v_proj``/``o_proj`` and ``head_dim``; a unit is one key/value head with the query heads
      that share it (``num_attention_heads / num_key_value_heads`` of them), so pruning keeps
      the groups consistent;
    * neurons, BERT family: a block with ``intermediate.dense`` (up) and ``output.dense`` (down);
    * neurons, Llama family: a block with ``gate_proj``/``up_proj`` (up) and ``down_proj``.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> tiny = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                             intermediate_size=6))
        >>> [(g.kind, g.units) for g in find_structures(tiny, ["heads", "neurons"])]
        [('neurons', 6), ('heads', 2)]
    """
    groups = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if "heads" in kinds and _is_linear(module, "query", "key", "value"):
            heads = int(getattr(module, "num_attention_heads", 0))
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            try:
                output = model.get_submodule(f"{parent}.output.dense".lstrip("."))
            except AttributeError:  # not the BERT layout: no output projection beside it
                output = None
            if heads and isinstance(output, nn.Linear):
                members = [
                    (f"{prefix}{proj}.{kind}", 0)
                    for proj in ("query", "key", "value")
                    for kind in ("weight", "bias")
                    if getattr(getattr(module, proj), kind) is not None
                ]
                members.append(
                    (f"{parent}.output.dense.weight" if parent else "output.dense.weight", 1)
                )
                groups.append(StructureGroup(f"{prefix}heads", "heads", heads, tuple(members)))
        if "heads" in kinds and _is_linear(module, "q_proj", "k_proj", "v_proj", "o_proj"):
            groups.extend(_query_groups(module, prefix))
        if "neurons" in kinds:
            up, down = _ffn(module)
            if up:
                width = module.get_submodule(up[0]).out_features
                members = [
                    (f"{prefix}{path}.{kind}", 0)
                    for path in up
                    for kind in ("weight", "bias")
                    if getattr(module.get_submodule(path), kind) is not None
                ]
                members.append((f"{prefix}{down}.weight", 1))
                groups.append(StructureGroup(f"{prefix}neurons", "neurons", width, tuple(members)))
    return groups


def _query_groups(attention: nn.Module, prefix: str) -> list[StructureGroup]:
    """The key/value groups of a Llama-style attention module as one structure group.

    Raises:
        ValueError: the module has no ``head_dim``, or its query heads do not divide into its
            key/value groups (so no pruning could keep the groups consistent).
    """
    head_dim = int(getattr(attention, "head_dim", 0) or 0)
    key, query = attention.k_proj, attention.q_proj
    if not head_dim or key.out_features % head_dim or query.out_features % key.out_features:
        raise ValueError(
            f"cannot prune the heads of {prefix.rstrip('.') or 'the model'}: "
            f"q_proj has {query.out_features} and k_proj {key.out_features} outputs with "
            f"head_dim={head_dim or None}; grouped-query heads need whole key/value heads and "
            "the same number of query heads per key/value head. Prune 'neurons' only"
        )
    units = key.out_features // head_dim
    members = [
        (f"{prefix}{proj}.{kind}", 0)
        for proj in ("q_proj", "k_proj", "v_proj")
        for kind in ("weight", "bias")
        if getattr(getattr(attention, proj), kind) is not None
    ]
    members.append((f"{prefix}o_proj.weight", 1))
    return [StructureGroup(f"{prefix}heads", "heads", units, tuple(members))]


def _is_linear(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _ffn(module: nn.Module) -> tuple[list[str], str]:
    """The up projections and the down projection of an FFN block, or ``([], "")``."""
    intermediate, output = getattr(module, "intermediate", None), getattr(module, "output", None)
    if _is_linear(intermediate, "dense") and _is_linear(output, "dense"):
        return ["intermediate.dense"], "output.dense"
    if _is_linear(module, "gate_proj", "up_proj", "down_proj"):
        return ["gate_proj", "up_proj"], "down_proj"
    return [], ""


def allocate_sparsity(
    sizes: Mapping[str, int],
    sensitivity: Mapping[str, float],
    target: float,
    power: float = 0.5,
    max_sparsity: float = 0.98,
) -> dict[str, float]:
    """Per-tensor sparsities averaging ``target`` (weighted by size), pruning the less sensitive
    tensors harder: density ``d_i = c * s_i^power`` with ``c`` chosen so that
    ``sum_i n_i d_i = (1 - target) * sum_i n_i``, each ``d_i`` clipped to
    ``[1 - max_sparsity, 1]`` (``c`` found by bisection: the kept total rises with it).

    Example:
        >>> s = allocate_sparsity({"a": 100, "b": 100}, {"a": 4.0, "b": 1.0}, 0.5, power=1.0)
        >>> round(s["a"], 3), round(s["b"], 3)
        (0.2, 0.8)
    """
    if not 0.0 <= target <= max_sparsity < 1.0:
        raise ValueError(f"need 0 <= target <= max_sparsity < 1, got {target}, {max_sparsity}")
    weights = {n: max(float(sensitivity[n]), 1e-30) ** power for n in sizes}
    floor, budget = 1.0 - max_sparsity, (1.0 - target) * sum(sizes.values())

    def densities(scale: float) -> dict[str, float]:
        return {n: min(max(scale * w, floor), 1.0) for n, w in weights.items()}

    # the kept total rises with the scale: bisect (in log space) for the one that meets budget
    low, high = math.log(floor / max(weights.values())), math.log(1.0 / min(weights.values()))
    for _ in range(200):
        middle = (low + high) / 2
        kept = sum(sizes[n] * d for n, d in densities(math.exp(middle)).items())
        low, high = (middle, high) if kept < budget else (low, middle)
    return {n: 1.0 - d for n, d in densities(math.exp((low + high) / 2)).items()}


def sensitivity_allocation(
    params: Mapping[str, torch.Tensor],
    fisher: Mapping[str, float],
    target: float,
    power: float = 0.5,
    max_sparsity: float = 0.98,
    all_reduce: Any = None,
) -> dict[str, float]:
    """Final sparsity per tensor of ``params`` from the sensitivity
    ``s_i = F_i * mean(theta_i^2)`` (``F_i`` the Fisher information of tensor ``i``), through
    :func:`allocate_sparsity`. ``all_reduce`` sums the per-shard squares of sharded tensors.

    Example:
        >>> params = {"a": torch.ones(100), "b": torch.ones(100)}
        >>> s = sensitivity_allocation(params, {"a": 4.0, "b": 1.0}, 0.5, power=1.0)
        >>> round(s["a"], 3), round(s["b"], 3)
        (0.2, 0.8)
    """
    sizes = {n: p.numel() for n, p in params.items()}
    squares = torch.stack([local_part(p.detach()).double().square().sum() for p in params.values()])
    if all_reduce is not None:
        squares = all_reduce(squares)
    sensitivity = {
        n: fisher[n] * float(sq) / sizes[n] for n, sq in zip(sizes, squares, strict=True)
    }
    return allocate_sparsity(sizes, sensitivity, target, power, max_sparsity)


def mask_optimizer_state(
    optimizer: torch.optim.Optimizer, masked: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Zero the per-weight optimizer state (AdamW moments, momentum) of pruned weights, so it
    cannot push them back. Only floating-point state shaped like the weight is touched: 8-bit
    states (bitsandbytes, torchao) hold quantization codes, where 0 is not zero."""
    with torch.no_grad():
        for param, mask in masked:
            for value in optimizer.state.get(param, {}).values():
                floating = isinstance(value, torch.Tensor) and value.is_floating_point()
                if floating and value.shape == param.shape:
                    value.mul_(mask)


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Share of pruned weights over all masks."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def remove_pruned_structures(
    model: nn.Module, groups: Sequence[StructureGroup], masks: Mapping[str, torch.Tensor]
) -> dict[str, int]:
    """Physically remove pruned heads and neurons from ``model`` (in place): the linears
    become smaller, so the model computes the same function as the masked one with fewer
    weights. Returns the units kept per group. Updates ``config.intermediate_size`` when every
    neuron group keeps the same count, and records the kept counts as
    ``config.pruned_structures`` (read by :func:`load_pruned`).
    """
    kept_counts = {}
    for group in groups:
        kept = group.alive(masks)
        _shrink(model, group, torch.nonzero(kept).squeeze(1))
        kept_counts[group.name] = int(kept.sum())
    config = getattr(model, "config", None)
    if config is not None:
        _describe_in_config(model, config, groups, kept_counts)
        config.pruned_structures = kept_counts
    return kept_counts


def _attention_of(model: nn.Module, group: StructureGroup) -> nn.Module:
    """The attention module whose heads ``group`` holds (its name less ``.heads``)."""
    return model.get_submodule(group.name.removesuffix("heads").rstrip("."))


def _is_query_group(group: StructureGroup) -> bool:
    """Whether ``group`` holds the key/value groups of a Llama-style attention module."""
    return group.kind == "heads" and group.members[0][0].endswith("q_proj.weight")


def _describe_in_config(
    model: nn.Module, config: Any, groups: Sequence[StructureGroup], counts: Mapping[str, int]
) -> None:
    """Write the kept sizes into a Hugging Face config where every block keeps the same count:
    ``intermediate_size`` (neurons) and, for grouped-query attention,
    ``num_key_value_heads``, ``num_attention_heads`` and an explicit ``head_dim`` (so it is not
    derived from the head count), so the model reloads with plain ``from_pretrained``."""
    neurons = {counts[g.name] for g in groups if g.kind == "neurons"}
    if len(neurons) == 1:
        config.intermediate_size = neurons.pop()
    query_groups = [g for g in groups if _is_query_group(g)]
    kept = {counts[g.name] for g in query_groups}
    if len(kept) == 1 and len(query_groups) == len([g for g in groups if g.kind == "heads"]):
        attention = _attention_of(model, query_groups[0])
        per_group = attention.q_proj.out_features // attention.k_proj.out_features
        config.head_dim = int(attention.head_dim)
        config.num_key_value_heads = kept.pop()
        config.num_attention_heads = config.num_key_value_heads * per_group


def live_units(model: nn.Module, group: StructureGroup) -> torch.Tensor:
    """Units of ``group`` with any non-zero weight or bias in any member (a bool per unit).

    A unit whose every member slice is zero adds nothing to the block's output: its query, key
    and value rows and biases are zero, so the head attends uniformly over zero values, and
    its output-projection columns are zero; or its FFN activation is ``act(0) = 0`` (GELU,
    SiLU, ReLU) and its down-projection column is zero. Removing it changes no logit.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> tiny = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1,
        ...                             num_attention_heads=2, intermediate_size=6))
        >>> group = find_structures(tiny, ["neurons"])[0]
        >>> with torch.no_grad():
        ...     _ = tiny.encoder.layer[0].output.dense.weight[:, 0].zero_()
        ...     _ = tiny.encoder.layer[0].intermediate.dense.weight[0].zero_()
        ...     _ = tiny.encoder.layer[0].intermediate.dense.bias[0].zero_()
        >>> live_units(tiny, group)
        tensor([False,  True,  True,  True,  True,  True])
    """
    live = torch.zeros(group.units, dtype=torch.bool)
    for parameter, dim in group.members:
        tensor = model.get_parameter(parameter).detach()
        live |= group._per_unit(tensor != 0, dim).any(1).cpu()
    return live


def remove_dead_units(
    model: nn.Module,
    kinds: Sequence[str] = ("heads", "neurons"),
    config_compatible: bool = False,
) -> dict[str, tuple[int, int]]:
    """Physically remove the heads and FFN neurons whose weights are all zero (in place).

    Units are found from the weights (:func:`live_units`), so any run that zeroed whole
    structures qualifies (``ProgressivePruner`` with ``heads``/``neurons``, a 3D plan, or
    unstructured pruning that happened to empty a unit) and the logits do not change.

    With ``config_compatible=True`` only what a Hugging Face config can describe is removed, so
    the model reloads with plain ``from_pretrained``: neurons and Llama-style key/value groups,
    down to the largest live count of any block (blocks with fewer live units keep some zero
    ones), and no BERT heads (BERT configs derive the head size from
    ``hidden_size / num_attention_heads``); the config's sizes are updated. Otherwise each block
    keeps exactly its live units and ``config.pruned_structures`` records the counts (read by
    :func:`load_pruned`).

    Returns:
        ``{group name: (units kept, units before)}``.

    Example:
        >>> kept = remove_dead_units(model)  # doctest: +SKIP
        >>> kept["bert.encoder.layer.0.attention.self.heads"]  # doctest: +SKIP
        (8, 12)
    """
    groups = find_structures(model, kinds)
    live = {group.name: live_units(model, group) for group in groups}
    if config_compatible:
        groups = [g for g in groups if g.kind == "neurons" or _is_query_group(g)]
        for kind in ("heads", "neurons"):  # top up with dead units to one width per kind
            same = [g for g in groups if g.kind == kind]
            width = max((int(live[g.name].sum()) for g in same), default=0)
            for group in same:
                dead = torch.nonzero(~live[group.name]).squeeze(1)
                live[group.name][dead[: width - int(live[group.name].sum())]] = True
    counts = {}
    for group in groups:
        units = torch.nonzero(live[group.name]).squeeze(1)
        if len(units) == 0:  # a block cannot run without units: keep one (all-zero) unit
            units = torch.zeros(1, dtype=torch.long)
        if len(units) < group.units:
            _shrink(model, group, units)
        counts[group.name] = (len(units), group.units)
    config = getattr(model, "config", None)
    if config is not None:
        _describe_in_config(model, config, groups, {n: kept for n, (kept, _) in counts.items()})
    if config is not None and not config_compatible:
        config.pruned_structures = {name: kept for name, (kept, _) in counts.items()}
    return counts


def _shrink(model: nn.Module, group: StructureGroup, units: torch.Tensor) -> None:
    """Keep only ``units`` of ``group``: replace every member's linear by a smaller copy."""
    for parameter, dim in group.members:
        module_name, kind = parameter.rsplit(".", 1)
        linear = model.get_submodule(module_name)
        block = getattr(linear, kind).shape[dim] // group.units
        device = getattr(linear, kind).device
        units = units.to(device)
        index = (units[:, None] * block + torch.arange(block, device=device)).flatten()
        with torch.no_grad():
            if kind == "bias":
                linear.bias = nn.Parameter(linear.bias.index_select(0, index))
                continue
            weight = linear.weight.index_select(dim, index)
            linear.weight = nn.Parameter(weight)
        linear.out_features, linear.in_features = weight.shape
    if group.kind != "heads":
        return
    attention = _attention_of(model, group)
    if hasattr(attention, "attention_head_size"):  # BERT family; Llama reads its shapes
        attention.num_attention_heads = len(units)
        attention.all_head_size = len(units) * attention.attention_head_size


def export_structured(
    model: nn.Module,
    groups: Sequence[StructureGroup],
    masks: Mapping[str, torch.Tensor],
    path: str | Path | None = None,
) -> nn.Module:
    """Remove the pruned structures (:func:`remove_pruned_structures`) and, with ``path``, save
    the Hugging Face model there with ``save_pretrained``. Exports of neurons and of Llama-style
    key/value groups, the same count in every block, load with ``from_pretrained``; exports with
    removed BERT heads (or uneven counts) load with :func:`load_pruned`, because the configs of
    the BERT family derive the head size from the head count."""
    remove_pruned_structures(model, groups, masks)
    if path is not None:
        model.save_pretrained(path)
    return model


def export_pruned(
    module: nn.Module,
    masks: Mapping[str, torch.Tensor],
    groups: Sequence[StructureGroup],
    path: str | Path | None = None,
) -> nn.Module:
    """The pruned Hugging Face model of ``module`` (``module.model`` when there is one, else
    ``module``), heads and neurons physically removed (:func:`export_structured`); ``masks`` and
    ``groups`` are named from ``module``, sharded masks are gathered. Saved with
    ``save_pretrained`` when ``path`` is given."""
    model = getattr(module, "model", module)
    prefix = next(f"{n}." for n, m in module.named_modules() if m is model).lstrip(".")
    whole = {n.removeprefix(prefix): full_copy(m) for n, m in masks.items()}
    structures = [g for g in groups if g.kind in ("heads", "neurons")]
    if structures:
        kinds = sorted({g.kind for g in structures})
        names = {g.name.removeprefix(prefix) for g in structures}
        found = [g for g in find_structures(model, kinds) if g.name in names]
        return export_structured(model, found, whole, path)
    if path is not None:
        model.save_pretrained(path)
    return model


def layer_sparsities(
    masks: Mapping[str, torch.Tensor], layer_pattern: str = DEFAULT_LAYER_PATTERN
) -> dict[str, float]:
    """Pruned share per layer (``"layer_<i>"`` by ``layer_pattern``, ``"other"`` without one).

    Example:
        >>> layer_sparsities({"layer.0.w": torch.tensor([True, False]),
        ...                   "head.w": torch.tensor([True, True])})
        {'layer_0': 0.5, 'other': 0.0}
    """
    layers: dict[str, list[torch.Tensor]] = {}
    for name, mask in masks.items():
        index = layer_index(name, layer_pattern)
        layers.setdefault("other" if index is None else f"layer_{index}", []).append(mask)
    return {layer: mask_sparsity(dict(enumerate(kept))) for layer, kept in layers.items()}


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`export_structured`: build it from its config, shrink the
    recorded structures, then load the saved weights (in ``dtype``, default float32), in eval
    mode. ``kwargs`` go to ``AutoConfig.from_pretrained``."""
    from safetensors.torch import load_file

    model = build_from_config(path, **kwargs)
    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if k not in _tied_names(model)]
    if real_missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit: missing {real_missing}, unexpected {unexpected}"
        )
    return (model if dtype is None else model.to(dtype)).eval()


def build_from_config(path: str | Path, **kwargs: Any) -> nn.Module:
    """A freshly initialized model of the architecture in ``path/config.json``, with the
    structures recorded in ``config.pruned_structures`` (:func:`remove_dead_units`,
    :func:`remove_pruned_structures`) shrunk to their kept counts, ready for their weights.
    ``kwargs`` go to ``AutoConfig.from_pretrained``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, **kwargs)
    architecture = (config.architectures or [None])[0]
    if architecture is None or not hasattr(transformers, architecture):
        raise ValueError(f"{path}/config.json names no transformers architecture")
    model = getattr(transformers, architecture)(config)
    counts = getattr(config, "pruned_structures", {}) or {}
    for group in find_structures(model, ("heads", "neurons")):
        if group.name in counts:
            _shrink(model, group, torch.arange(counts[group.name]))
    return model


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (tied embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.setdefault(id(param), name)
    return tied


def to_semi_structured(model: nn.Module) -> nn.Module:
    """Convert every linear weight that obeys 2:4 to ``torch.sparse.to_sparse_semi_structured``
    (cuSPARSELt/CUTLASS kernels; needs a CUDA GPU and fp16/bf16 weights), in place.

    Raises:
        RuntimeError: the weights are not on a CUDA device.
    """
    from torch.sparse import to_sparse_semi_structured

    converted = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or not obeys_n_m(module.weight, 2, 4):
            continue
        if module.weight.device.type != "cuda":
            raise RuntimeError("2:4 semi-structured weights need a CUDA GPU; move the model first")
        module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), False)
        converted += 1
    if not converted:
        raise ValueError("no linear weight obeys 2:4; prune with pattern='2:4' first")
    return model


def obeys_n_m(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every ``m`` consecutive weights of a row hold at most ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight.detach().reshape(-1, m) != 0).sum(1) <= n).all())


def find_targets(
    model: nn.Module,
    pattern: str,
    selected: Callable[[str], bool],
    include: re.Pattern[str] | None = None,
    exclude: re.Pattern[str] | None = None,
) -> tuple[list[str], list[StructureGroup]]:
    """The tensors a ``pattern`` prunes in ``model`` (in model order) and, for structured
    patterns, their structure groups: heads/neurons found by :func:`find_structures`, rows of
    every linear weight, or ``[]``; ``selected(name)`` applies include/exclude (``include`` and
    ``exclude`` only name them in errors).

    Raises:
        ValueError: nothing to prune, or an ``N:M`` pattern on an input width it does not divide.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
        >>> find_targets(net, "2:4", lambda name: True)
        (['0.weight', '1.weight'], [])
    """
    kind, n_m = parse_pattern(pattern)
    params = dict(model.named_parameters())
    groups: list[StructureGroup] = []
    if kind in ("heads", "neurons", "heads+neurons"):
        kinds = kind.split("+")
        groups = [
            g for g in find_structures(model, kinds) if all(selected(p) for p, _ in g.members)
        ]
        if not groups:
            raise ValueError(
                f"ProgressivePruner: pattern={pattern!r} found no {' or '.join(kinds)} "
                "(BERT-family attention with query/key/value, Llama-family attention with "
                "q/k/v/o_proj; BERT or Llama-family FFN blocks) whose tensors pass "
                "include/exclude"
            )
        return list(dict.fromkeys(p for g in groups for p, _ in g.members)), groups
    linear_weights = [
        f"{name}.weight".lstrip(".")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    targets = [n for n in linear_weights if n in params and selected(n)]
    if not targets:
        raise ValueError(
            "ProgressivePruner: no linear weight passes include/exclude (include="
            f"{None if include is None else include.pattern}, "
            f"exclude={None if exclude is None else exclude.pattern})"
        )
    if kind == "rows":
        groups = row_groups({n: params[n].shape for n in targets})
    if n_m is not None:
        odd = [n for n in targets if params[n].shape[-1] % n_m[1]]
        if odd:
            raise ValueError(
                f"ProgressivePruner: pattern={pattern!r} needs input widths divisible by "
                f"{n_m[1]}; {odd[0]} has shape {tuple(params[odd[0]].shape)} (exclude it)"
            )
    return targets, groups


def next_masks(
    pattern: str,
    scores: Mapping[str, torch.Tensor],
    sparsity: float | Mapping[str, float],
    scope: str = "layer",
    current: Mapping[str, torch.Tensor] | None = None,
    groups: Sequence[StructureGroup] = (),
) -> dict[str, torch.Tensor]:
    """The masks of ``pattern`` at ``sparsity`` (per tensor for unstructured pruning) from whole
    ``scores``, growing ``current`` (pruned stays pruned): :func:`unstructured_masks`,
    :func:`n_m_mask` per tensor, or :func:`structured_masks` over ``groups``.

    Example:
        >>> masks = next_masks("unstructured", {"w": torch.tensor([3.0, 1.0, 2.0, 4.0])}, 0.5)
        >>> masks["w"].tolist()
        [True, False, False, True]
    """
    current = dict(current or {})
    kind, n_m = parse_pattern(pattern)
    if kind == "unstructured":
        return unstructured_masks(dict(scores), sparsity, scope, current)
    if not isinstance(sparsity, float | int):
        raise ValueError(f"pattern={pattern!r} takes one sparsity, got one per tensor")
    if n_m is not None:
        return {n: n_m_mask(s, *n_m, sparsity, current.get(n)) for n, s in scores.items()}
    return structured_masks(list(groups), dict(scores), sparsity, current)


#: How ``ProgressivePruner`` spreads the sparsity over tensors.
LAYER_SPARSITY = ("uniform", "sensitivity")
#: The most a tensor is pruned under ``layer_sparsity="sensitivity"``.
MAX_TENSOR_SPARSITY = 0.98


def check_pruner_arguments(
    target_sparsity: float | None,
    pattern: str,
    score: str,
    schedule: str,
    start_step: int,
    end_step: int | None,
    frequency: int,
    initial_sparsity: float,
    scope: str,
    layer_sparsity: str,
    sensitivity_power: float,
) -> tuple[str, tuple[int, int] | None, float]:
    """Check ``ProgressivePruner``'s arguments together; return the pattern's kind, its ``(N,
    M)`` (or ``None``) and the target sparsity (``1 - N/M`` when ``None`` with ``N:M``).

    Raises:
        ValueError: naming the argument, the value and what is allowed.

    Example:
        >>> check_pruner_arguments(None, "2:4", "magnitude", "cubic", 0, None, 10, 0.0,
        ...                        "layer", "uniform", 0.5)
        ('n:m', (2, 4), 0.5)
    """
    kind, n_m = parse_pattern(pattern)
    if n_m is not None:
        implied = 1.0 - n_m[0] / n_m[1]
        if target_sparsity is None:
            target_sparsity = implied
        elif abs(target_sparsity - implied) > 1e-9:
            raise ValueError(
                f"pattern={pattern!r} prunes exactly {implied:g} of the weights; set "
                f"target_sparsity=None or {implied:g}, got {target_sparsity}"
            )
    if target_sparsity is None or not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target_sparsity must be in [0, 1), got {target_sparsity}")
    if not 0.0 <= initial_sparsity <= target_sparsity:
        raise ValueError(
            f"initial_sparsity must be in [0, target_sparsity={target_sparsity}], got "
            f"{initial_sparsity}"
        )
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global" and kind != "unstructured":
        raise ValueError(f"scope='global' needs pattern='unstructured', got {pattern!r}")
    if layer_sparsity not in LAYER_SPARSITY:
        raise ValueError(f"layer_sparsity must be one of {LAYER_SPARSITY}, got {layer_sparsity!r}")
    if layer_sparsity == "sensitivity" and (
        kind != "unstructured"
        or scope != "layer"
        or target_sparsity > MAX_TENSOR_SPARSITY
        or (start_step == 0 and initial_sparsity > 0)
    ):
        raise ValueError(
            "layer_sparsity='sensitivity' needs pattern='unstructured', scope='layer', "
            f"target_sparsity <= {MAX_TENSOR_SPARSITY} and gradients measured before the "
            f"first pruning (not start_step=0 with initial_sparsity > 0); got "
            f"pattern={pattern!r}, scope={scope!r}, target_sparsity={target_sparsity}, "
            f"start_step={start_step}, initial_sparsity={initial_sparsity}"
        )
    if start_step < 0 or frequency < 1 or (end_step is not None and end_step <= start_step):
        raise ValueError(
            "need start_step >= 0, frequency >= 1 and end_step > start_step; got "
            f"start_step={start_step}, end_step={end_step}, frequency={frequency}"
        )
    if sensitivity_power < 0:
        raise ValueError(f"sensitivity_power must be >= 0, got {sensitivity_power}")
    return kind, n_m, target_sparsity
