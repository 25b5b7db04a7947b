"""The parameter axis's decisions, without Lightning: what may freeze, what stays trainable at an
event, and how the optimizers follow.

``SensitivityFreezer`` decides *when*; these functions decide *what*:

* :func:`check_freezer_arguments`: every argument checked before training.
* :func:`freeze_candidates`: the trainable tensors that may freeze (not the head, within
  ``include``/``exclude``) and a check that the tensors that must stay trainable fit the budget.
* :func:`trainable_units`: at event ``k`` of ``K``, the units to keep trainable: the most
  sensitive ones within ``fraction_k * total - always_trainable`` parameters, where
  ``fraction_k`` falls linearly to the target (:func:`~lightning_3d.sensitivity.
  trainable_fraction_at`).
* :func:`move_parameters`: ``requires_grad`` off/on, gradients dropped, optimizer state
  released, and unfrozen tensors put back into their parameter group in model order.

Example:
    >>> sizes = {"encoder.a": 60, "encoder.b": 30, "classifier.w": 10}
    >>> freeze_candidates(sizes, head=re.compile(r"classifier"), target_trainable=0.5)
    ['encoder.a', 'encoder.b']
    >>> trainable_units({"encoder.a": ["encoder.a"], "encoder.b": ["encoder.b"]},
    ...                 {"encoder.a": 1.0, "encoder.b": 5.0}, sizes, frozen=set(), budget=40)
    ['encoder.b']
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_3d.sensitivity import (
    METRICS,
    SCHEDULES,
    add_to_optimizer,
    compile_pattern,
    drop_from_optimizer,
    select_trainable,
)


def check_freezer_arguments(
    target_trainable: float,
    metric: str,
    schedule: str,
    warmup_steps: int,
    stages: int,
    interval: int,
    measure_every: int,
    allow_unfreeze: bool,
    alpha: float,
    beta: float,
    lr_decay: float | None,
    group_by: str,
    layer_pattern: str,
) -> None:
    """Check ``SensitivityFreezer``'s arguments (the regexes ``include``, ``exclude`` and
    ``head`` are compiled, and so checked, by the callback).

    Raises:
        ValueError: naming the argument, the value and what is allowed.

    Example:
        >>> check_freezer_arguments(1.5, "fisher", "once", 0, 1, 1, 1, False, 1, 1, None,
        ...                         "tensor", r"layer\\.(\\d+)\\.")
        Traceback (most recent call last):
        ...
        ValueError: target_trainable must be in (0, 1], got 1.5
    """
    if not 0.0 < target_trainable <= 1.0:
        raise ValueError(f"target_trainable must be in (0, 1], got {target_trainable}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if stages < 1 or interval < 1 or measure_every < 1:
        raise ValueError(
            "stages, interval and measure_every must be positive integers, got "
            f"stages={stages}, interval={interval}, measure_every={measure_every}"
        )
    if allow_unfreeze and schedule != "progressive":
        raise ValueError("allow_unfreeze needs schedule='progressive' (it acts at its events)")
    if alpha < 0 or beta < 0:
        raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
    if lr_decay is not None and not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    if group_by not in ("tensor", "module"):
        compile_pattern("group_by", group_by)
    compile_pattern("layer_pattern", layer_pattern, groups=1)


def trainable_sizes(
    params: Mapping[str, torch.nn.Parameter], saved: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Sizes of the tensors that train from the start, in model order: ``saved`` (a checkpoint's,
    since frozen tensors no longer require gradients) or those of ``params`` that require them.

    Raises:
        ValueError: nothing trains, or ``saved`` names parameters ``params`` lacks.
    """
    sizes = dict(saved or {n: p.numel() for n, p in params.items() if p.requires_grad})
    if not sizes:
        raise ValueError("SensitivityFreezer: the model has no trainable parameters")
    missing = [name for name in sizes if name not in params]
    if missing:
        raise ValueError(
            f"SensitivityFreezer: the checkpoint names parameters this model lacks: "
            f"{missing[:3]}; resume with the same model (and LoRA settings)"
        )
    return sizes


def freeze_candidates(
    sizes: Mapping[str, int],
    head: re.Pattern[str] | None = None,
    include: re.Pattern[str] | None = None,
    exclude: re.Pattern[str] | None = None,
    target_trainable: float = 1.0,
) -> list[str]:
    """The names of ``sizes`` (trainable tensors and their sizes) that may freeze: not matching
    ``head``, matching ``include`` (all when ``None``) and not ``exclude``.

    Raises:
        ValueError: no tensor may freeze, or the ones that must stay trainable hold more than
            ``target_trainable`` of the parameters.
    """
    candidates = [
        name
        for name in sizes
        if not (head is not None and head.search(name))
        and (include is None or include.search(name))
        and (exclude is None or not exclude.search(name))
    ]
    if not candidates:
        raise ValueError(
            "SensitivityFreezer: no parameter may be frozen (include/exclude/head leave none "
            f"of the {len(sizes)} trainable tensors, e.g. {next(iter(sizes), None)!r})"
        )
    fixed, total = always_trainable(sizes, candidates), sum(sizes.values())
    if fixed > target_trainable * total:
        raise ValueError(
            f"SensitivityFreezer: the parameters that must stay trainable (head and excluded "
            f"ones) are {fixed / total:.1%} of the trainable parameters, above "
            f"target_trainable={target_trainable}; raise the target, narrow `head`/`exclude`, "
            "or set freeze_head=True"
        )
    return candidates


def always_trainable(sizes: Mapping[str, int], candidates: Sequence[str]) -> int:
    """Parameters of the tensors in ``sizes`` that are not ``candidates`` (they never freeze)."""
    allowed = set(candidates)
    return sum(size for name, size in sizes.items() if name not in allowed)


def trainable_units(
    units: Mapping[str, Sequence[str]],
    scores: Mapping[str, float],
    sizes: Mapping[str, int],
    frozen: set[str],
    budget: int,
    allow_unfreeze: bool = False,
    by_depth: bool = False,
) -> list[str]:
    """The units (name -> member tensors) that stay trainable at an event: the highest-scoring
    within ``budget`` parameters (:func:`~lightning_3d.sensitivity.select_trainable`), chosen
    among units with no frozen member unless ``allow_unfreeze``."""
    unit_sizes = {unit: sum(sizes[n] for n in members) for unit, members in units.items()}
    eligible = {
        unit: scores[unit]
        for unit, members in units.items()
        if allow_unfreeze or not frozen.intersection(members)
    }
    return select_trainable(eligible, unit_sizes, budget, by_depth)


def move_parameters(
    optimizers: Sequence[torch.optim.Optimizer],
    params: Mapping[str, torch.nn.Parameter],
    freeze: Sequence[str],
    unfreeze: Sequence[str],
    homes: dict[str, tuple[int, int]],
) -> int:
    """Freeze ``freeze`` and unfreeze ``unfreeze`` (names of ``params``, in model order).

    A frozen tensor loses ``requires_grad``, its gradient and its optimizer state, and
    ``homes[name]`` records its ``(optimizer, group)``; an unfrozen one goes back into that group
    at its place in model order. Returns the bytes of optimizer state released.

    Example:
        >>> layer = torch.nn.Linear(2, 2)
        >>> params = dict(layer.named_parameters())
        >>> optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
        >>> homes = {}
        >>> move_parameters([optimizer], params, ["weight"], [], homes)
        0
        >>> len(optimizer.param_groups[0]["params"]), homes, layer.weight.requires_grad
        (1, {'weight': (0, 0)}, False)
        >>> _ = move_parameters([optimizer], params, [], ["weight"], homes)
        >>> optimizer.param_groups[0]["params"][0] is layer.weight, homes
        (True, {})
    """
    place = {
        id(p): (o, g)
        for o, optimizer in enumerate(optimizers)
        for g, group in enumerate(optimizer.param_groups)
        for p in group["params"]
    }
    for name in freeze:
        if id(params[name]) in place:
            homes.setdefault(name, place[id(params[name])])
    released = sum(drop_from_optimizer(o, [params[n] for n in freeze]) for o in optimizers)
    for name in freeze:
        params[name].requires_grad_(False)
        params[name].grad = None
    order = {id(p): i for i, p in enumerate(params.values())}
    for name in unfreeze:
        params[name].requires_grad_(True)
        home = homes.pop(name, None)
        if home is not None:  # it was in an optimizer: back into its group, in model order
            add_to_optimizer(optimizers[home[0]], [(params[name], home[1])], _place_in(order))
    return released


def _place_in(order: dict[int, int]) -> Any:
    """A sort key: a parameter's place in the model."""
    return lambda param: order[id(param)]


__all__ = [
    "always_trainable",
    "check_freezer_arguments",
    "freeze_candidates",
    "move_parameters",
    "trainable_sizes",
    "trainable_units",
]
