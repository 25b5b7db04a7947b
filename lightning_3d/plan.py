"""The co-optimization plan: one object that sets every axis from a budget and makes them agree.

A :class:`ThreeDPlan` says how much of each resource a fine-tune may use:

* ``data_budget``: the share of the training samples each epoch visits (the data axis);
* ``trainable``: the share of the parameters that keep training (the parameter axis);
* ``sparsity``: the share of the encoder's linear weights pruned (the model axis, weights);
* ``weight_bits``: 4 or 8-bit weights after quantization-aware training (the model axis, bits);
* ``gradient_density``: the share of gradient entries sent between ranks (communication).

:meth:`ThreeDPlan.callbacks` turns it into Lightning callbacks in the order a step needs them::

    select data -> update the frozen set -> update masks -> fake-quantize -> compress trainables

and :meth:`ThreeDPlan.strategy` into a compressed multi-GPU strategy. What the plan adds over the
four callbacks side by side:

* **One signal pass.** Before the first step, one pass over the training data measures what every
  axis needs (:func:`signal_pass`): per-sample losses of every sample for the data scorer (so the
  data budget applies from the first epoch, with no warm-up epoch on all data), and the gradient
  statistics (Fisher ``E[g^2]`` per tensor) of ``probe_batches`` batches, which rank the tensors
  the freezer keeps and set the pruner's per-layer sparsity. Frozen tensors never get optimizer
  state, so the memory they would have used is never allocated.
* **One timeline.** The pruning window ends at ``prune_end`` of the run and fake quantization
  starts at ``qat_start`` (fractions of the optimizer steps the data budget leaves), so the masks
  are final before the quantization grid is trained and the model converts after pruning ends.
* **Checks before training** (:class:`~lightning_3d.callbacks.PlanCoordinator`): callbacks out
  of step order, movement pruning of tensors the freezer may freeze, pruning that ends after the
  run or after fake quantization starts, a strategy whose density disagrees with the plan.
* **Adaptive budgets** (``adaptive=True``): :class:`SparsityBackoff` lowers the sparsity target
  when the validation metric falls more than ``margin`` below its running best, and logs why.

Example:
    >>> plan = ThreeDPlan(data_budget=0.3, trainable=0.1, sparsity=0.5, weight_bits=4)
    >>> plan.axes
    ('data', 'parameters', 'pruning', 'quantization')
    >>> [type(c).__name__ for c in plan.callbacks()]
    ['PlanCoordinator', 'CurriculumSampler', 'SensitivityFreezer', 'ProgressivePruner', 'QATHook']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lightning_3d.sensitivity import GradientStatistics

if TYPE_CHECKING:
    from lightning.pytorch import Callback

#: The order of work inside a training step, which the plan's callbacks follow.
STEP_ORDER = (
    "select data",
    "update the frozen set",
    "update masks",
    "fake-quantize",
    "compress trainable entries",
)
#: ``weight_bits`` -> the torchao QAT preset used unless ``quantization`` names another.
PRESET_FOR_BITS = {4: "int4_weight_only", 8: "int8_weight_only"}
DATA_DROPS = ("hardest", "easiest_random")
MODES = ("max", "min")
MAX_SPARSITY = 0.98  # the most the plan prunes any tensor (see ProgressivePruner)


@dataclass(frozen=True)
class ThreeDPlan:
    """How much data, how many trainable parameters, weights, bits and gradient entries a
    fine-tune may use, and how the axes share signals and a timeline (see the module docs).

    Args:
        data_budget: share of the training samples each epoch trains on, in ``(0, 1]``; the
            samples are chosen by their loss, within each class (1: the data axis is off).
        trainable: share of the parameters that keep training, in ``(0, 1]`` (1: off).
        sparsity: share of the targeted linear weights pruned at ``prune_end``, in
            ``[0, 0.98]`` (0: off). Less sensitive tensors are pruned harder.
        weight_bits: ``4`` or ``8`` for quantization-aware training and integer weights at the
            end; ``None``: off.
        gradient_density: share of the gradient entries each rank sends in a multi-process run,
            in ``(0, 1]`` (1: dense communication); see :meth:`strategy`.
        quantization: a torchao QAT preset overriding ``weight_bits``' default
            (:data:`PRESET_FOR_BITS`), e.g. ``"int8_dynamic_act_int4_weight"``.
        group_size: input columns per weight scale of the int4 presets.
        data_drops: which samples the data budget drops: ``"hardest"`` (highest loss) or
            ``"easiest_random"`` (well-learned ones at random, InfoBatch).
        probe_batches: batches of the signal pass that also compute gradients (the rest of the
            pass is forward-only scoring).
        prune_end: fraction of the run's optimizer steps at which the sparsity target is reached.
        qat_start: fraction of the run at which fake quantization goes on (``>= prune_end``).
        prune_include: regex over parameter names of the weights to prune; default: every linear
            weight of the transformer blocks.
        adaptive: back off sparsity from validation feedback (:class:`SparsityBackoff`).
        monitor, mode: the validation metric that feedback reads, and whether higher (``"max"``)
            or lower (``"min"``) is better.
        margin: how far below its running best the metric may fall before sparsity backs off.
        backoff: each back-off multiplies the sparsity target by this factor, in ``(0, 1)``.
        seed: seeds the data order and random drops.

    Example:
        >>> ThreeDPlan(sparsity=0.5, weight_bits=4, qat_start=0.2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: qat_start=0.2 is before prune_end=0.5: fake quantization ... mask update
    """

    data_budget: float = 1.0
    trainable: float = 1.0
    sparsity: float = 0.0
    weight_bits: int | None = None
    gradient_density: float = 1.0
    quantization: str | None = None
    group_size: int = 32
    data_drops: str = "hardest"
    probe_batches: int = 8
    prune_end: float = 0.5
    qat_start: float = 0.75
    prune_include: str = r"(?:^|\.)(?:layer|layers|h|blocks)\.\d+\.(?:.*\.)?weight$"
    adaptive: bool = False
    monitor: str = "val/acc"
    mode: str = "max"
    margin: float = 0.01
    backoff: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("data_budget", "trainable", "gradient_density"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not 0.0 <= self.sparsity <= MAX_SPARSITY:
            raise ValueError(f"sparsity must be in [0, {MAX_SPARSITY}], got {self.sparsity}")
        if self.weight_bits not in (None, *PRESET_FOR_BITS):
            raise ValueError(
                f"weight_bits must be one of {sorted(PRESET_FOR_BITS)} or None, got "
                f"{self.weight_bits!r}"
            )
        if self.quantization is not None and self.weight_bits is None:
            raise ValueError(
                f"quantization={self.quantization!r} needs weight_bits (4 or 8) to turn the "
                "quantization axis on"
            )
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of 2, got {self.group_size}")
        if self.data_drops not in DATA_DROPS:
            raise ValueError(f"data_drops must be one of {DATA_DROPS}, got {self.data_drops!r}")
        if self.probe_batches < 1:
            raise ValueError(f"probe_batches must be >= 1, got {self.probe_batches}")
        if not 0.0 < self.prune_end <= 1.0 or not 0.0 <= self.qat_start < 1.0:
            raise ValueError(
                f"need prune_end in (0, 1] and qat_start in [0, 1), got prune_end="
                f"{self.prune_end}, qat_start={self.qat_start}"
            )
        if self.sparsity > 0 and self.weight_bits is not None and self.qat_start < self.prune_end:
            raise ValueError(
                f"qat_start={self.qat_start} is before prune_end={self.prune_end}: fake "
                "quantization (and conversion) must come after the last mask update"
            )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.adaptive and self.sparsity == 0:
            raise ValueError("adaptive=True backs off sparsity; set sparsity > 0")
        if self.margin < 0 or not 0.0 < self.backoff < 1.0:
            raise ValueError(
                f"need margin >= 0 and backoff in (0, 1), got margin={self.margin}, "
                f"backoff={self.backoff}"
            )

    @property
    def axes(self) -> tuple[str, ...]:
        """The axes this plan turns on, in :data:`STEP_ORDER` order."""
        on = {
            "data": self.data_budget < 1,
            "parameters": self.trainable < 1,
            "pruning": self.sparsity > 0,
            "quantization": self.weight_bits is not None,
            "communication": self.gradient_density < 1,
        }
        return tuple(axis for axis, active in on.items() if active)

    @property
    def preset(self) -> str | None:
        """The torchao QAT preset of the quantization axis (``None`` when it is off)."""
        if self.weight_bits is None:
            return None
        return self.quantization or PRESET_FOR_BITS[self.weight_bits]

    def callbacks(self) -> list[Callback]:
        """The coordinator, then one callback per active axis, in :data:`STEP_ORDER` order.

        Example:
            >>> [type(c).__name__ for c in ThreeDPlan(trainable=0.2).callbacks()]
            ['PlanCoordinator', 'SensitivityFreezer']
        """
        from lightning_3d.callbacks import (
            CurriculumSampler,
            PlanCoordinator,
            ProgressivePruner,
            QATHook,
            SensitivityFreezer,
        )

        callbacks: list[Callback] = []
        if "data" in self.axes:
            callbacks.append(
                CurriculumSampler(
                    score="loss",
                    budget=self.data_budget,
                    budget_drops=self.data_drops,
                    warmup_epochs=0,
                    prescore=True,
                    seed=self.seed,
                )
            )
        if "parameters" in self.axes:
            callbacks.append(
                SensitivityFreezer(target_trainable=self.trainable, metric="fisher", warmup_steps=0)
            )
        if "pruning" in self.axes:  # the coordinator sets the window at fit start
            callbacks.append(
                ProgressivePruner(
                    target_sparsity=self.sparsity,
                    score="magnitude",
                    layer_sparsity="sensitivity",
                    include=self.prune_include,
                )
            )
        if "quantization" in self.axes:  # and the start
            callbacks.append(QATHook(self.preset, group_size=self.group_size))
        scheduled = [c for c in callbacks if isinstance(c, ProgressivePruner | QATHook)]
        return [PlanCoordinator(self, scheduled), *callbacks]

    def strategy_arguments(self) -> dict[str, Any]:
        """Keyword arguments of :class:`~lightning_3d.strategies.CompressedDDPStrategy` and
        :class:`~lightning_3d.strategies.CompressedFSDPStrategy` for this plan.

        Example:
            >>> ThreeDPlan(gradient_density=0.15).strategy_arguments()
            {'density': 0.15}
        """
        return {"density": self.gradient_density}

    def strategy(self, kind: str = "fsdp", **kwargs: Any) -> Any:
        """A compressed strategy (``"fsdp"``: FSDP2, ``"ddp"``) sending ``gradient_density`` of
        the gradient entries; ``kwargs`` go to its constructor.

        Example:
            >>> type(ThreeDPlan(gradient_density=0.15).strategy("ddp")).__name__
            'CompressedDDPStrategy'
        """
        from lightning_3d.strategies import CompressedDDPStrategy, CompressedFSDPStrategy

        kinds = {"fsdp": CompressedFSDPStrategy, "ddp": CompressedDDPStrategy}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        return kinds[kind](**{**self.strategy_arguments(), **kwargs})

    def step_of(self, fraction: float, total_steps: int | float) -> int:
        """The optimizer step at ``fraction`` of a run of ``total_steps`` steps.

        Example:
            >>> ThreeDPlan().step_of(0.75, 30)
            22
        """
        if not math.isfinite(total_steps):
            raise ValueError(
                "the plan places its pruning window and QAT start at fractions of the run; set "
                "Trainer(max_epochs=...) or max_steps so the run has a known length"
            )
        return int(fraction * total_steps)


@dataclass
class SparsityBackoff:
    """Lower the sparsity target when a validation metric falls below its running best.

    After each validation, with ``best`` the best value so far (``mode="max"``: highest)::

        value < best - margin  ->  sparsity <- backoff * sparsity   (one decision, logged)

    (``mode="min"``: ``value > best + margin``). After a back-off the running best starts again
    from the next value, so one drop (or the dip of a pruning ramp) costs one back-off, not one
    per validation. Every decision is kept in ``decisions``.

    Example:
        >>> controller = SparsityBackoff(margin=0.01, backoff=0.5)
        >>> controller.observe(0.80, sparsity=0.6, step=10), controller.observe(0.78, 0.6, 20)
        (None, 0.3)
        >>> controller.decisions[0]["reason"]
        'val 0.7800 is 0.0200 below the best 0.8000 (margin 0.01)'
    """

    margin: float = 0.01
    backoff: float = 0.5
    mode: str = "max"
    best: float | None = None
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def observe(self, value: float, sparsity: float, step: int) -> float | None:
        """Take one validation value; return the new sparsity target, or ``None`` to keep it."""
        sign = 1.0 if self.mode == "max" else -1.0
        if self.best is None or sign * (value - self.best) > 0:
            self.best = value
            return None
        shortfall = sign * (self.best - value)
        if shortfall <= self.margin or sparsity == 0:
            return None
        new = self.backoff * sparsity
        side = "below" if self.mode == "max" else "above"
        self.decisions.append(
            {
                "step": step,
                "value": value,
                "best": self.best,
                "old_sparsity": sparsity,
                "new_sparsity": new,
                "reason": f"val {value:.4f} is {shortfall:.4f} {side} the best {self.best:.4f} "
                f"(margin {self.margin:g})",
            }
        )
        self.best = None
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "decisions": [dict(d) for d in self.decisions]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state["best"]
        self.decisions = [dict(d) for d in state["decisions"]]


def signal_pass(
    score_batch: Callable[[Any], Mapping[str, torch.Tensor]],
    batches: Iterable[Any],
    parameters: Mapping[str, torch.Tensor],
    statistics: GradientStatistics | None,
    gradient_batches: int,
    record: Callable[[Mapping[str, torch.Tensor], Any], None] | None = None,
) -> int:
    """One pass that feeds every axis: per-sample scores and per-tensor gradient statistics.

    For each batch, ``outputs = score_batch(batch)`` (with ``"per_sample_loss"``) goes to
    ``record(outputs, batch)`` (the data scorer). The first ``gradient_batches`` batches also
    back-propagate ``mean(per_sample_loss)`` and merge the gradients of ``parameters`` into
    ``statistics``; gradients are cleared after each, and no optimizer steps. The remaining
    batches run without autograd. Returns the number of batches that computed gradients.

    Example:
        >>> layer = torch.nn.Linear(2, 1)
        >>> stats = GradientStatistics()
        >>> def score(batch):
        ...     return {"per_sample_loss": (layer(batch) ** 2).squeeze(1)}
        >>> signal_pass(score, [torch.ones(3, 2)] * 2, dict(layer.named_parameters()), stats, 1)
        1
        >>> sorted(stats.names), layer.weight.grad is None
        (['bias', 'weight'], True)
    """
    with_gradients = 0
    for index, batch in enumerate(batches):
        needs_gradients = statistics is not None and index < gradient_batches
        if record is None and not needs_gradients:
            break
        with torch.set_grad_enabled(needs_gradients):
            outputs = score_batch(batch)
        losses = outputs.get("per_sample_loss")
        if losses is None:
            raise RuntimeError(
                "the signal pass needs score_batch(batch) to return 'per_sample_loss' (the "
                "built-in tasks do)"
            )
        if record is not None:
            record({k: v.detach() for k, v in outputs.items()}, batch)
        if needs_gradients:
            losses.mean().backward()
            assert statistics is not None
            statistics.update({n: p.grad for n, p in parameters.items() if p.grad is not None})
            for param in parameters.values():
                param.grad = None
            with_gradients += 1
    return with_gradients
