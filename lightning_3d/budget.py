r"""A budget solver for the co-optimization plan: pick axis strengths for a time and a size budget.

Three models, each simple enough to check by hand, feed an exhaustive search:

* :class:`CostModel`: the seconds of one optimizer step as a function of the axis strengths, and
  of a whole run by its phases (:meth:`CostModel.run_seconds`). Calibrate it on the real model
  with :func:`measure_cost_model` and keep it as JSON (:meth:`CostModel.save`).
* :class:`AccuracyCurves`: per axis, the accuracy change (points) measured in single-axis runs;
  a combination is predicted as the *sum* of its axes' changes. :data:`DEFAULT_CURVES` is a
  conservative prior, to be replaced by measured curves
  (:meth:`AccuracyCurves.from_ablation_summary`).
* :func:`size_fraction`: the exported model's bytes relative to the fp32 dense model.

:func:`solve_budget` tries every allocation of a candidate grid and returns the most accurate
one whose predicted training time is at most ``time`` times the reference run's (every axis off)
and whose export is at most ``size`` of the fp32 dense bytes, with the reasons
(:class:`BudgetAllocation`). Everything here is plain Python and torch: no Lightning.

The axes and their "off" strengths (:data:`OFF`):

=============== ======================================================= =========
axis            strength                                                 off
=============== ======================================================= =========
``data_budget`` share of the samples each epoch from epoch 1 on visits  ``1``
``trainable``   share of the parameters training after the warm-up      ``1``
``sparsity``    share of the block linear weights pruned                ``0``
``weight_bits`` bits of the exported weights (QAT or at export)         ``None``
``distill``     weight of distillation from the warm-up teacher         ``0``
``steps``       run length as a share of the reference run's steps      ``1``
=============== ======================================================= =========

Example:
    >>> cost = CostModel(forward_s=0.1, backward_s=0.2, optimizer_s=0.05)
    >>> allocation = solve_budget(
    ...     0.6, 0.3, cost, DEFAULT_CURVES, reference_steps=200, epochs=2, compressible_share=0.6
    ... )
    >>> allocation.time_fraction <= 0.6 and allocation.size_fraction <= 0.3
    True
    >>> sorted(allocation.plan_arguments())
    ['data_budget', 'distill', 'sparsity', 'steps_fraction', 'trainable', 'weight_bits']
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from torch import nn

# Pruning patterns: a dense export of "unstructured" sparsity keeps every weight;
# "heads+neurons" removes the pruned heads and FFN neurons.
from lightning_3d.plan import MAX_SPARSITY, PRESET_FOR_BITS, PRUNE_PATTERNS, QUANTIZE_AT

#: The axes the solver allocates, in the order of :func:`solve_budget`'s grid.
AXES = ("data_budget", "trainable", "sparsity", "weight_bits", "distill", "steps")
#: The strength at which each axis is off (the reference run has every axis off).
OFF: dict[str, float | None] = {
    "data_budget": 1.0,
    "trainable": 1.0,
    "sparsity": 0.0,
    "weight_bits": None,
    "distill": 0.0,
    "steps": 1.0,
}
#: Bit widths of the quantization axis (``None``: off).
WEIGHT_BITS = tuple(sorted(PRESET_FOR_BITS, reverse=True))
#: Multiplier on forward + backward while fake quantization is on, when none is measured: the
#: QAT benchmark (all-MiniLM-L6-v2 on a 2-core CPU, int4 weights with int8 activations) trained
#: 2.4x slower than fp32 over a whole fit, and the ablation's ModelOpt row (QAT over the last
#: quarter, with pruning) took 1.20x, about 1.8x while QAT was on; 2.0 sits between the two.
DEFAULT_QAT_FACTOR = 2.0
#: Share of the backward pass that computes weight gradients, when none is measured: for a
#: linear layer ``y = x W`` the backward computes ``dx = dy W^T`` and ``dW = x^T dy``, two
#: matrix products of the same size.
DEFAULT_WEIGHT_GRAD_SHARE = 0.5
#: The grid :func:`solve_budget` searches unless told otherwise.
DEFAULT_CANDIDATES: dict[str, tuple[Any, ...]] = {
    "data_budget": (1.0, 0.8, 0.6, 0.5),
    "trainable": (1.0, 0.75, 0.5, 0.25),
    "sparsity": (0.0, 0.2, 0.3, 0.4, 0.5),
    "weight_bits": (None, 8, 4),
    "distill": (0.0, 0.5, 0.9),
    "steps": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
}
_EPS = 1e-9  # tolerance of budget comparisons and of curve coverage


def _check_strength(axis: str, value: Any) -> None:
    """Raise ``ValueError`` when ``value`` is not a valid strength of ``axis``."""
    if axis == "weight_bits":
        if value is not None and (isinstance(value, bool) or value not in WEIGHT_BITS):
            raise ValueError(
                f"weight_bits must be one of {list(WEIGHT_BITS)} or None, got {value!r}"
            )
        return
    if axis not in OFF:
        raise ValueError(f"unknown axis {axis!r}; axes: {list(AXES)}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{axis} must be a finite number, got {value!r}")
    if axis in ("data_budget", "trainable", "steps") and not 0.0 < value <= 1.0:
        raise ValueError(f"{axis} must be in (0, 1], got {value}")
    if axis == "sparsity" and not 0.0 <= value <= MAX_SPARSITY:
        raise ValueError(f"sparsity must be in [0, {MAX_SPARSITY}], got {value}")
    if axis == "distill" and not 0.0 <= value <= 1.0:
        raise ValueError(f"distill must be in [0, 1], got {value}")


def _check_fraction(name: str, value: float, closed_top: bool = False) -> None:
    top_ok = value <= 1.0 if closed_top else value < 1.0
    if not (math.isfinite(value) and value >= 0.0 and top_ok):
        interval = "[0, 1]" if closed_top else "[0, 1)"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _describe(strengths: Mapping[str, Any]) -> str:
    """``data_budget=0.8, weight_bits=8`` for the axes that are on; ``every axis off`` else."""
    on = [
        f"{axis}={value}" if axis == "weight_bits" else f"{axis}={value:g}"
        for axis, value in ((axis, strengths[axis]) for axis in AXES)
        if _on(axis, value)
    ]
    return ", ".join(on) if on else "every axis off"


def _on(axis: str, value: Any) -> bool:
    if axis == "weight_bits":
        return value is not None
    off = OFF[axis]
    assert off is not None
    return abs(float(value) - off) > _EPS


# -- time ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCost:
    """The predicted seconds of a run, in total and by component, and its step counts.

    Attributes:
        total_s: predicted training seconds (the sum of ``breakdown``).
        breakdown: seconds per component: ``forward``, ``backward``, ``optimizer`` (all steps),
            ``qat`` (the extra of fake quantization), ``masks`` (mask application) and
            ``teacher`` (teacher forwards for distillation).
        step_counts: ``steps`` (the run's optimizer steps ``N``), ``warmup`` (dense steps),
            ``frozen`` (steps with ``trainable`` of the parameters), ``qat`` (fake-quantized
            steps) and ``teacher_batches`` (batches the teacher runs on). Not rounded: the model
            predicts an expected time.
    """

    total_s: float
    breakdown: Mapping[str, float]
    step_counts: Mapping[str, float]


@dataclass(frozen=True)
class CostModel:
    r"""Seconds of one optimizer step, and of a run, as a function of the axis strengths.

    Coefficients, in seconds per optimizer step at the reference batch:

    * ``forward_s`` (``f``): the training forward pass, loss included;
    * ``backward_s`` (``b``): the backward pass with every parameter trainable;
    * ``optimizer_s`` (``o``): the optimizer update with every parameter trainable;
    * ``weight_grad_share`` (``w``): share of ``b`` computing weight gradients, which frozen
      parameters skip (the activation gradients still flow through every layer);
    * ``qat_factor`` (``q``): multiplier on forward + backward while fake quantization is on;
    * ``sparsity_overhead_s`` (``m``): applying the pruning masks, per step;
    * ``teacher_forward_s`` (``g``): one teacher forward of one batch, without autograd
      (``None``: the same as ``forward_s``).

    Parts timed in isolation are not a real loop's steps (loading the batch, the framework's
    hooks, caches the optimizer's sweep evicted, the batch's length): :meth:`scaled_to` scales
    every coefficient so that a dense step takes a real run's median step period, measured on
    its first steps; the parts keep their shares.

    One step with a share ``t`` of the parameters trainable (:meth:`step_seconds`)::

        step(t, qat, pruning) = Q * (f + b * (1 - w * (1 - t))) + o * t + M
        Q = q if qat else 1,   M = m if pruning else 0

    A run (:meth:`run_seconds`) of the reference recipe (``R`` steps over ``E`` epochs, so
    ``S = R / E`` steps per epoch on all data), with data budget ``d``, steps fraction ``s``,
    warm-up fraction ``u`` and QAT start ``v``::

        N  = min(S * (1 + (E - 1) * d),  s * R)      # epoch 0 on all data, epochs >= 1 on d
        W  = u * N                                   # dense warm-up steps (t = 1)
        F  = N - W                                   # steps with t trainable
        QW = max(0, u - v) * N,  QF = (1 - max(u, v)) * N   # QAT steps in warm-up / after
        T  = min(S, F)                               # batches the teacher runs on (cached)

        forward   = f * N
        backward  = b * (1 - w * (1 - k)) * W + b * (1 - w * (1 - k t)) * F
        optimizer = o * k * W + o * k t * F
        qat       = (q - 1) * ((f + b (1 - w (1 - k))) * QW + (f + b (1 - w (1 - k t))) * QF)
        masks     = m * F                          (pruning starts after warm-up) if sparsity > 0
        teacher   = g * T                                                        if distill > 0

    (the ``qat`` term only with ``weight_bits`` set), where ``k`` (``kept_share``) is the
    share of the reference model's parameters the run trains at all: ``1 - v`` with a trimmed
    vocabulary (the dropped rows skip their weight gradients and optimizer update), else 1.
    With batches grouped by length (``ThreeDPlan(group_by_length=...)``) a step computes a
    share ``p`` (``token_share``) of the padded tokens of the reference run's random batches
    (:func:`~lightning_3d.curriculum.token_share`), and the forward, backward, qat and teacher
    terms are multiplied by ``p`` (they grow with the tokens a batch computes; the optimizer
    and masks do not).
    This is the sum of :meth:`step_seconds` over the run's steps plus the teacher forwards.
    ``T`` counts each distinct batch seen after the teacher snapshot once (the teacher's outputs
    are cached per sample), at most one epoch's worth: an upper bound, since batches of the
    stretch after warm-up may repeat when it crosses an epoch boundary.

    Example:
        >>> cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)
        >>> cost.step_seconds(), cost.step_seconds(trainable=0.5)  # 1 + 2 * 0.75 + 0.5
        (4.0, 3.0)
        >>> cost.step_seconds(trainable=0.5, qat=True)  # 2 * (1 + 1.5) + 0.5
        5.5
        >>> run = cost.run_seconds(reference_steps=100, epochs=2, data_budget=0.5, trainable=0.5)
        >>> run.step_counts["steps"], run.total_s  # 75 steps: 18.75 dense, 56.25 frozen
        (75.0, 243.75)
    """

    forward_s: float
    backward_s: float
    optimizer_s: float
    weight_grad_share: float = DEFAULT_WEIGHT_GRAD_SHARE
    qat_factor: float = DEFAULT_QAT_FACTOR
    sparsity_overhead_s: float = 0.0
    teacher_forward_s: float | None = None

    def __post_init__(self) -> None:
        seconds = {
            "forward_s": self.forward_s,
            "backward_s": self.backward_s,
            "optimizer_s": self.optimizer_s,
            "sparsity_overhead_s": self.sparsity_overhead_s,
            "teacher_forward_s": self.teacher_s,
        }
        for name, value in seconds.items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.forward_s + self.backward_s + self.optimizer_s <= 0:
            raise ValueError("forward_s + backward_s + optimizer_s must be > 0: a step takes time")
        _check_fraction("weight_grad_share", self.weight_grad_share, closed_top=True)
        if not (math.isfinite(self.qat_factor) and self.qat_factor > 0):
            raise ValueError(f"qat_factor must be a finite number > 0, got {self.qat_factor}")

    @property
    def teacher_s(self) -> float:
        """Seconds of one teacher forward (``teacher_forward_s``, or ``forward_s`` if unset)."""
        return self.forward_s if self.teacher_forward_s is None else self.teacher_forward_s

    def _backward(self, trainable: float) -> float:
        return self.backward_s * (1.0 - self.weight_grad_share * (1.0 - trainable))

    def step_seconds(
        self, trainable: float = 1.0, qat: bool = False, pruning: bool = False
    ) -> float:
        """Seconds of one optimizer step (formula in the class docstring).

        Args:
            trainable: share of the parameters that train in this step, in ``(0, 1]``.
            qat: fake quantization is on.
            pruning: pruning masks are applied after the step.
        """
        _check_strength("trainable", trainable)
        factor = self.qat_factor if qat else 1.0
        masks = self.sparsity_overhead_s if pruning else 0.0
        return (
            factor * (self.forward_s + self._backward(trainable))
            + self.optimizer_s * trainable
            + masks
        )

    def run_seconds(
        self,
        *,
        reference_steps: int,
        epochs: int,
        data_budget: float = 1.0,
        trainable: float = 1.0,
        sparsity: float = 0.0,
        weight_bits: int | None = None,
        distill: float = 0.0,
        steps: float = 1.0,
        warmup: float = 0.25,
        qat_start: float = 0.8,
        quantize_at: str = "train",
        kept_share: float = 1.0,
        token_share: float = 1.0,
    ) -> RunCost:
        """Predicted seconds of a run, with the breakdown (formulas in the class docstring).

        Args:
            reference_steps: optimizer steps of the reference recipe (every axis off).
            epochs: epochs of the reference recipe.
            data_budget, trainable, sparsity, weight_bits, distill, steps: the axis strengths.
            warmup: fraction of the run's steps trained dense before freezing (and the teacher
                snapshot), in ``[0, 1)``.
            qat_start: fraction of the run's steps at which fake quantization goes on, in
                ``[0, 1)``.
            quantize_at: ``"train"`` (quantization-aware training from ``qat_start``) or
                ``"export"`` (the export quantizes: no fake-quantized steps, ``qat`` is 0).
            kept_share: share of the reference model's parameters the run trains at all, in
                ``(0, 1]`` (``1 - vocabulary_share`` with a trimmed vocabulary).
            token_share: padded tokens a step computes, as a share of the reference run's, in
                ``(0, 1]`` (:func:`~lightning_3d.curriculum.token_share`, with batches grouped
                by length).

        Example:
            >>> cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0,
            ...                  weight_grad_share=0.5)
            >>> cost.run_seconds(reference_steps=10, epochs=1, kept_share=0.5).total_s
            30.0
        """
        values = (data_budget, trainable, sparsity, weight_bits, distill, steps)
        strengths = dict(zip(AXES, values, strict=True))
        for axis, value in strengths.items():
            _check_strength(axis, value)
        _check_recipe(reference_steps, epochs)
        _check_fraction("warmup", warmup)
        _check_fraction("qat_start", qat_start)
        _check_quantize_at(quantize_at)
        for name, share in (("kept_share", kept_share), ("token_share", token_share)):
            if not (math.isfinite(share) and 0.0 < share <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {share}")

        per_epoch = reference_steps / epochs
        total = min(per_epoch * (1 + (epochs - 1) * data_budget), steps * reference_steps)
        dense = warmup * total
        frozen = total - dense
        qat = weight_bits is not None and quantize_at == "train"
        qat_dense = max(0.0, warmup - qat_start) * total if qat else 0.0
        qat_frozen = (1.0 - max(warmup, qat_start)) * total if qat else 0.0
        teacher_batches = min(per_epoch, frozen) if distill > 0 else 0.0

        f, o = self.forward_s * token_share, self.optimizer_s
        dense_backward = self._backward(kept_share) * token_share
        frozen_backward = self._backward(kept_share * trainable) * token_share
        breakdown = {
            "forward": f * total,
            "backward": dense_backward * dense + frozen_backward * frozen,
            "optimizer": o * kept_share * (dense + trainable * frozen),
            "qat": (self.qat_factor - 1.0)
            * ((f + dense_backward) * qat_dense + (f + frozen_backward) * qat_frozen),
            "masks": self.sparsity_overhead_s * frozen if sparsity > 0 else 0.0,
            "teacher": self.teacher_s * token_share * teacher_batches,
        }
        counts = {
            "steps": total,
            "warmup": dense,
            "frozen": frozen,
            "qat": qat_dense + qat_frozen,
            "teacher_batches": teacher_batches,
        }
        return RunCost(sum(breakdown.values()), breakdown, counts)

    def reference_seconds(self, reference_steps: int) -> float:
        """Seconds of the reference run: ``reference_steps * (f + b + o)``.

        Example:
            >>> CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0).reference_seconds(10)
            40.0
        """
        _check_recipe(reference_steps, 1)
        return reference_steps * self.step_seconds()

    @classmethod
    def from_measurements(
        cls,
        *,
        forward_s: float,
        backward_s: float,
        optimizer_s: float,
        frozen_backward_s: float | None = None,
        frozen_trainable: float | None = None,
        forward_backward_s: float | None = None,
        qat_forward_backward_s: float | None = None,
        qat_factor: float = DEFAULT_QAT_FACTOR,
        sparsity_overhead_s: float = 0.0,
        teacher_forward_s: float | None = None,
    ) -> CostModel:
        r"""Fit the coefficients from timings of one step's parts.

        ``weight_grad_share`` comes from a backward pass timed with only a share ``t_h`` of the
        parameters trainable (``frozen_backward_s``, ``frozen_trainable``), solving
        ``b_h = b * (1 - w * (1 - t_h))`` for ``w`` (clipped to ``[0, 1]``)::

            w = (b - b_h) / (b * (1 - t_h))

        and :data:`DEFAULT_WEIGHT_GRAD_SHARE` without them. ``qat_factor`` is the ratio of
        forward + backward with and without fake quantization,
        ``qat_forward_backward_s / forward_backward_s`` (``forward_backward_s`` defaults to
        ``forward_s + backward_s``); without ``qat_forward_backward_s`` the ``qat_factor``
        argument is kept.

        Example:
            >>> cost = CostModel.from_measurements(
            ...     forward_s=1.0, backward_s=2.0, optimizer_s=0.5,
            ...     frozen_backward_s=1.2, frozen_trainable=0.2, qat_forward_backward_s=4.5,
            ... )
            >>> round(cost.weight_grad_share, 6), cost.qat_factor  # 0.8 / (2 * 0.8), 4.5 / 3
            (0.5, 1.5)
        """
        weight_grad_share = DEFAULT_WEIGHT_GRAD_SHARE
        if (frozen_backward_s is None) != (frozen_trainable is None):
            raise ValueError("frozen_backward_s and frozen_trainable go together")
        if frozen_backward_s is not None and frozen_trainable is not None:
            _check_fraction("frozen_trainable", frozen_trainable)
            if backward_s > 0:
                share = (backward_s - frozen_backward_s) / (backward_s * (1.0 - frozen_trainable))
                weight_grad_share = min(1.0, max(0.0, share))
        if qat_forward_backward_s is not None:
            plain = forward_s + backward_s if forward_backward_s is None else forward_backward_s
            if plain <= 0:
                raise ValueError(f"forward + backward must take time > 0, got {plain}")
            qat_factor = qat_forward_backward_s / plain
        return cls(
            forward_s=forward_s,
            backward_s=backward_s,
            optimizer_s=optimizer_s,
            weight_grad_share=weight_grad_share,
            qat_factor=qat_factor,
            sparsity_overhead_s=sparsity_overhead_s,
            teacher_forward_s=teacher_forward_s,
        )

    def scaled_to(self, real_step_s: float) -> CostModel:
        """This model with every time coefficient scaled by ``real_step_s / (f + b + o)``, so
        that a dense step takes ``real_step_s``: the median period of a real run's first steps.

        Example:
            >>> cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)
            >>> cost.scaled_to(6.0).step_seconds(), cost.scaled_to(6.0).backward_s
            (6.0, 3.0)
        """
        if not real_step_s > 0:
            raise ValueError(f"real_step_s must be > 0, got {real_step_s}")
        factor = real_step_s / (self.forward_s + self.backward_s + self.optimizer_s)
        return dataclasses.replace(
            self,
            forward_s=self.forward_s * factor,
            backward_s=self.backward_s * factor,
            optimizer_s=self.optimizer_s * factor,
            sparsity_overhead_s=self.sparsity_overhead_s * factor,
            teacher_forward_s=self.teacher_s * factor,
        )

    def token_share_of(self, step_ratio: float) -> float:
        r"""The ``token_share`` that prices a dense step at ``step_ratio`` of this model's: the
        measured period of a run with batches grouped by length over that of the same run with
        random batches. Only forward and backward scale with the tokens (:meth:`run_seconds`)::

            p * (f + b) + o = r * (f + b + o)   =>   p = (r * (f + b + o) - o) / (f + b)

        The padded-token share of the data (:func:`~lightning_3d.curriculum.token_share`) is
        this share to first order; a ratio measured in a real loop (:class:`PaddedStepFit`)
        also holds what does not scale with the tokens there.

        Raises:
            ValueError: ``step_ratio`` outside ``(0, 1]``, or so small that the optimizer
                update alone would take longer (``p <= 0``: the two timings do not fit this
                model).

        Example:
            >>> cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)
            >>> cost.token_share_of(0.5)  # (0.5 * 4 - 1) / 3
            0.3333333333333333
        """
        if not (math.isfinite(step_ratio) and 0.0 < step_ratio <= 1.0):
            raise ValueError(f"step_ratio must be in (0, 1], got {step_ratio}")
        scaled = self.forward_s + self.backward_s
        share = (step_ratio * (scaled + self.optimizer_s) - self.optimizer_s) / scaled
        if not share > 0:
            raise ValueError(
                f"step_ratio {step_ratio:g} is below the optimizer update's share of a step "
                f"({self.optimizer_s / (scaled + self.optimizer_s):.3g}): a grouped step "
                "cannot cost that little under this model; measure both runs again"
            )
        return min(1.0, share)

    def to_dict(self) -> dict[str, float | None]:
        """The coefficients by name (JSON-ready)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """The model of :meth:`to_dict`'s output; unknown keys raise ``ValueError``."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown CostModel keys {unknown}")
        return cls(**data)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CostModel:
        """Read a calibration written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def _check_quantize_at(quantize_at: str) -> None:
    if quantize_at not in QUANTIZE_AT:
        raise ValueError(f"quantize_at must be one of {QUANTIZE_AT}, got {quantize_at!r}")


def _check_recipe(reference_steps: int, epochs: int) -> None:
    if isinstance(reference_steps, bool) or not isinstance(reference_steps, int):
        raise ValueError(f"reference_steps must be an int, got {reference_steps!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int):
        raise ValueError(f"epochs must be an int, got {epochs!r}")
    if reference_steps < 1 or epochs < 1 or epochs > reference_steps:
        raise ValueError(
            f"need 1 <= epochs <= reference_steps, got reference_steps={reference_steps}, "
            f"epochs={epochs}"
        )


# -- measuring ------------------------------------------------------------------------------------


def _default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-5)


def _median_seconds(
    run: Callable[[Any], Any],
    repeats: int,
    device: torch.device,
    setup: Callable[[], Any] | None = None,
) -> float:
    """Median seconds of ``run(setup())`` over ``repeats`` calls, after one untimed call."""
    timings = []
    for index in range(repeats + 1):
        state = setup() if setup is not None else None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = perf_counter()
        run(state)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index:
            timings.append(perf_counter() - start)
    return statistics.median(timings)


def _head_and_vectors(model: nn.Module) -> set[nn.Parameter]:
    """The parameters the weight-gradient probe keeps trainable: the last module holding
    parameters (the head) and every parameter of fewer than 2 dimensions (biases, norms)."""
    head: list[nn.Parameter] = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if own:
            head = own
    return set(head) | {p for p in model.parameters() if p.ndim < 2}


def measure_cost_model(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor],
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = (
        _default_optimizer
    ),
    repeats: int = 3,
    qat_preset: str | None = None,
    group_size: int = 32,
    frozen: Callable[[str], bool] | None = None,
) -> CostModel:
    r"""Time the parts of one training step of ``model`` on ``batch`` and fit a :class:`CostModel`.

    Each figure is the median of ``repeats`` timed calls after one untimed call (on CUDA,
    synchronized before and after), in training mode:

    * ``forward_s``: ``loss_fn(model, batch)`` with autograd recording;
    * ``backward_s``: ``loss.backward()`` with every parameter trainable;
    * ``frozen_backward_s``: the same with only the head (the last module holding parameters) and
      the parameters of fewer than 2 dimensions (biases, norms) trainable, a share ``t_h`` of the
      parameters. The small tensors keep the activation gradients flowing through every layer,
      as under the freezer, so the difference is the weight gradients the frozen tensors skip;
      ``weight_grad_share`` follows from :meth:`CostModel.from_measurements`;
    * ``optimizer_s``: ``optimizer.step()`` of ``optimizer_factory(model.parameters())``;
    * ``sparsity_overhead_s``: multiplying every ``nn.Linear`` weight by a boolean mask in place
      (all ones), as the pruner does after each step;
    * ``teacher_forward_s``: ``loss_fn`` under ``torch.no_grad()`` in eval mode;
    * with ``qat_preset`` (a torchao preset of :mod:`lightning_3d.quantization`), forward +
      backward of a deep copy with every linear layer and embedding fake-quantized, against the
      same of ``model``: ``qat_factor``. Without it, :data:`DEFAULT_QAT_FACTOR`.

    ``batch`` should be a batch of the reference recipe's size. Afterwards the model is as it
    was: parameter and buffer values (copied before, written back), ``requires_grad`` flags,
    ``.grad`` tensors, training modes and the random number generators' states. The copy of the
    values costs one model's memory (two with ``qat_preset``).

    Args:
        model: the model to time, on the device it trains on.
        batch: one reference batch, on that device.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss tensor.
        optimizer_factory: builds the training optimizer from parameters (default: AdamW).
        repeats: timed calls per figure (the median is kept), ``>= 1``.
        qat_preset: a torchao QAT preset name to measure ``qat_factor`` with, or ``None``.
        group_size: input columns per weight scale of the int4 presets.
        frozen: ``frozen(name)`` says which parameters the weight-gradient probe freezes, so
            ``weight_grad_share`` measures what freezing *those* saves (e.g. the tensors a plan
            with ``freeze="uncompressed"`` may freeze); default: every parameter of 2 or more
            dimensions except the head's.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> batch = {"x": torch.randn(4, 8), "y": torch.tensor([0, 1, 0, 1])}
        >>> def loss_fn(model, batch):
        ...     return nn.functional.cross_entropy(model(batch["x"]), batch["y"])
        >>> cost = measure_cost_model(model, batch, loss_fn, repeats=1)
        >>> cost.forward_s > 0 and 0 <= cost.weight_grad_share <= 1
        True
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    params = list(model.parameters())
    if not params:
        raise ValueError("the model has no parameters to time")
    device = params[0].device
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    modes = [(module, module.training) for module in model.modules()]
    tensors = [*params, *model.buffers()]
    with torch.no_grad():
        saved = [t.detach().clone() for t in tensors]
    cuda_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            for p in params:
                p.grad = None
                p.requires_grad_(True)
            model.train()

            def clear() -> None:
                for p in params:
                    p.grad = None

            def forward(_: Any = None) -> torch.Tensor:
                return loss_fn(model, batch)

            def forward_only() -> torch.Tensor:
                clear()
                return forward()

            def step_backward(loss: torch.Tensor) -> None:
                loss.backward()

            def forward_backward(_: Any = None) -> None:
                forward().backward()

            forward_s = _median_seconds(forward, repeats, device, setup=clear)
            backward_s = _median_seconds(step_backward, repeats, device, setup=forward_only)
            plain_fb = _median_seconds(forward_backward, repeats, device, setup=clear)

            if frozen is None:
                kept = _head_and_vectors(model)
            else:
                kept = {p for n, p in model.named_parameters() if not frozen(n)}
            for p in params:
                p.requires_grad_(p in kept)
            frozen_trainable = sum(p.numel() for p in kept) / sum(p.numel() for p in params)
            frozen_backward_s = _median_seconds(step_backward, repeats, device, forward_only)
            for p in params:
                p.requires_grad_(True)

            step = optimizer_factory(params).step

            def gradients() -> None:
                clear()
                forward().backward()

            optimizer_s = _median_seconds(lambda _: step(), repeats, device, gradients)
            clear()

            masks = [
                (m.weight, torch.ones_like(m.weight, dtype=torch.bool))
                for m in model.modules()
                if isinstance(m, nn.Linear)
            ]

            def apply_masks(_: Any) -> None:
                with torch.no_grad():
                    for weight, mask in masks:
                        weight.mul_(mask)

            mask_s = _median_seconds(apply_masks, repeats, device) if masks else 0.0

            model.eval()
            with torch.no_grad():
                teacher_s = _median_seconds(forward, repeats, device)
            model.train()

            qat_fb = None
            if qat_preset is not None:
                from lightning_3d.quantization import QuantizationRecipe, prepare, select_modules

                twin = copy.deepcopy(model)
                prepare(
                    twin,
                    QuantizationRecipe.from_preset(qat_preset, group_size),
                    select_modules(twin),
                )
                twin.train()

                def twin_clear() -> None:
                    for p in twin.parameters():
                        p.grad = None

                qat_fb = _median_seconds(
                    lambda _: loss_fn(twin, batch).backward(), repeats, device, twin_clear
                )
                del twin
    finally:
        with torch.no_grad():
            for tensor, value in zip(tensors, saved, strict=True):
                tensor.copy_(value)
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        for module, training in modes:
            module.training = training
    return CostModel.from_measurements(
        forward_s=forward_s,
        backward_s=backward_s,
        optimizer_s=optimizer_s,
        frozen_backward_s=frozen_backward_s if frozen_trainable < 1 else None,
        frozen_trainable=frozen_trainable if frozen_trainable < 1 else None,
        forward_backward_s=plain_fb,
        qat_forward_backward_s=qat_fb,
        sparsity_overhead_s=mask_s,
        teacher_forward_s=teacher_s,
    )


@dataclass(frozen=True)
class PaddedStepFit:
    r"""A real step's period against the length its batch is padded to, fitted on the timed
    steps of real runs (random and grouped batches)::

        t(L) = a + c * L            (a: ``intercept_s``, c: ``per_length_s``)

    plus a one-off ``e`` (``first_shape_s``) on the first step of each length a run meets
    (kernel selection and allocator growth for a new shape; later steps of that length do not
    pay it). A run of batches padded to ``L_1 .. L_N`` then takes::

        sum_i (a + c * L_i) + e * #distinct(L)

    Grouped batches spread over many more lengths than random ones (which mostly pad to near
    the longest item), so a few dozen steps of one grouped run span both runs' lengths and
    price both (:meth:`step_ratio`) from one state of the machine, whose speed may drift
    between two timed runs. Attention makes ``t`` slightly convex in ``L``; over the lengths of
    one task the line is what the fit measures.

    Example:
        >>> steps = [(10, 1.5), (20, 2.5), (10, 1.0), (20, 2.0), (30, 3.5), (30, 3.0)]
        >>> fit = PaddedStepFit.fit([steps], skip=0)  # repeats: 0.1 L; first steps +0.5
        >>> round(fit.intercept_s, 6), round(fit.per_length_s, 6), round(fit.first_shape_s, 6)
        (0.0, 0.1, 0.5)
        >>> round(fit.run_seconds([10, 10, 30]), 6)  # 1 + 1 + 3 + 2 shapes * 0.5
        6.0
    """

    intercept_s: float
    per_length_s: float
    first_shape_s: float

    @classmethod
    def fit(cls, runs: Sequence[Sequence[tuple[int, float]]], skip: int = 5) -> PaddedStepFit:
        """Least squares of ``t = a + c L`` over the steps that repeat a length their run met
        before, and ``e`` as the mean excess over that line of the steps meeting a length for
        the first time (at least 0).

        Args:
            runs: each run's steps in order, as ``(padded length, seconds)``.
            skip: each run's first steps left out of the fit (the framework's own warm-up);
                their lengths still count as met.

        Raises:
            ValueError: ``skip < 0``, a step that is not a positive length and a finite
                non-negative time, or fewer than two distinct lengths among the repeated steps.
        """
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        repeated: list[tuple[int, float]] = []
        first: list[tuple[int, float]] = []
        for run in runs:
            met: set[int] = set()
            for index, (length, seconds) in enumerate(run):
                if not (length > 0 and math.isfinite(seconds) and seconds >= 0):
                    raise ValueError(
                        f"a step is (padded length > 0, seconds >= 0), got {(length, seconds)}"
                    )
                if index >= skip:
                    (repeated if length in met else first).append((length, seconds))
                met.add(length)
        if len({length for length, _ in repeated}) < 2:
            raise ValueError(
                "the fit needs steps of at least two lengths met twice in a run; time more steps"
            )
        lengths = torch.tensor([length for length, _ in repeated], dtype=torch.float64)
        seconds = torch.tensor([t for _, t in repeated], dtype=torch.float64)
        design = torch.stack([torch.ones_like(lengths), lengths], dim=1)
        intercept, slope = torch.linalg.lstsq(design, seconds.unsqueeze(1)).solution.squeeze(1)
        line = cls(float(intercept), float(slope), 0.0)
        excess = [t - line.run_seconds([length]) for length, t in first]
        return dataclasses.replace(
            line, first_shape_s=max(0.0, statistics.fmean(excess)) if excess else 0.0
        )

    def run_seconds(self, batch_lengths: Sequence[int]) -> float:
        """Seconds of a run whose batches are padded to ``batch_lengths``, in its order."""
        total = sum(self.intercept_s + self.per_length_s * length for length in batch_lengths)
        return total + self.first_shape_s * len(set(batch_lengths))

    def step_ratio(self, batch_lengths: Sequence[int], reference_lengths: Sequence[int]) -> float:
        """Mean step period of a run of ``batch_lengths`` over that of ``reference_lengths``
        (for :meth:`CostModel.token_share_of`: grouped batches against random ones).

        Raises:
            ValueError: either run has no batches.
        """
        if not batch_lengths or not reference_lengths:
            raise ValueError("step_ratio needs the padded lengths of both runs' batches")
        mean = self.run_seconds(batch_lengths) / len(batch_lengths)
        return mean / (self.run_seconds(reference_lengths) / len(reference_lengths))


# -- accuracy -------------------------------------------------------------------------------------


def _strength_key(axis: str, raw: Any) -> Any:
    """A strength read from JSON (keys may be strings) as the axis' type."""
    if axis == "weight_bits":
        if raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null")):
            return None
        return int(raw)
    return float(raw)


def _normalized_points(axis: str, raw: Any) -> tuple[tuple[Any, float], ...]:
    """``{strength: change}`` or ``[[strength, change], ...]`` of ``axis`` as sorted pairs, the
    off strength included (change 0), every value checked."""
    pairs = list(raw.items()) if isinstance(raw, Mapping) else [tuple(p) for p in raw]
    seen: dict[Any, float] = {}
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{axis}: a point is [strength, change], got {list(pair)}")
        strength, change = _strength_key(axis, pair[0]), float(pair[1])
        _check_strength(axis, strength)
        if not math.isfinite(change):
            raise ValueError(f"{axis}: change at {strength} must be finite, got {change}")
        if not _on(axis, strength):
            if change != 0:
                raise ValueError(
                    f"{axis}={strength} is the axis off: its change is 0 by definition, "
                    f"got {change}"
                )
            continue
        if strength in seen:
            raise ValueError(f"{axis}: two points at strength {strength}")
        seen[strength] = change
    if axis != "weight_bits":
        seen[OFF[axis]] = 0.0
    return tuple(sorted(seen.items(), key=lambda item: item[0]))


def _covered(axis: str, pairs: Sequence[tuple[Any, float]], strength: Any) -> bool:
    """Whether ``strength`` lies within the measured ``pairs`` of ``axis``."""
    if axis == "weight_bits":
        return strength is None or any(bits == strength for bits, _ in pairs)
    return pairs[0][0] - _EPS <= strength <= pairs[-1][0] + _EPS


def _interpolated(axis: str, pairs: Sequence[tuple[Any, float]], strength: Any) -> float:
    """The change at ``strength``, linear between the measured ``pairs`` (no extrapolation)."""
    _check_strength(axis, strength)
    if not _covered(axis, pairs, strength):
        measured = [s for s, _ in pairs]
        raise ValueError(
            f"{axis}={strength} is outside the measured points {measured}: the curves do "
            "not extrapolate; measure it or choose a strength within"
        )
    if axis == "weight_bits":
        return 0.0 if strength is None else dict(pairs)[strength]
    for (x0, y0), (x1, y1) in itertools.pairwise(pairs):
        if strength <= x1 + _EPS:
            if x1 - x0 <= _EPS:
                return y1
            share = min(1.0, max(0.0, (strength - x0) / (x1 - x0)))
            return y0 + share * (y1 - y0)
    return pairs[-1][1]  # a single point: the off one


@dataclass(frozen=True)
class AccuracyCurves:
    r"""Accuracy change (points) per axis strength, and a combination's predicted accuracy.

    ``points[axis]`` maps strengths to the accuracy change, in percentage points against the
    reference run (negative: a loss), measured in runs where only that axis was on; the off
    strength (:data:`OFF`) is always a point with change 0. Between points the change is
    interpolated linearly; ``weight_bits`` is discrete (8 or 4: its exact point). A strength
    outside the measured range is *not* extrapolated: :meth:`covers` is false there and
    :meth:`change` raises ``ValueError`` (an axis with no points can only be off).

    A combination is predicted as the base accuracy plus the sum of the axes' changes::

        accuracy = base + sum_a c_a(strength_a)

    This additivity assumes the axes do not interact. It is *optimistic* when the losses
    compound (e.g. freezing the very matrices that pruning thins, as in the ablation table of
    BENCHMARKS.md, where the combined run lost far more than the sum) and *pessimistic* when one
    axis masks another's loss (fewer steps matter less to a model that trains fewer parameters).
    Measure a combined run to check the sum before trusting it far from the measured points.

    Two interactions are modelled. Distillation, with ``distill_recovers_compression`` (the
    default), only recovers what pruning and quantization lose: its change is 0 when both are
    off, and a gain is capped at their combined loss ``-(c_sparsity + c_weight_bits)``. Pruning
    needs steps to recover: ``sparsity_by_steps`` holds sparsity curves measured in shorter runs
    (``{steps: points}``, each change against the unpruned run of the same length); in a run of
    ``steps`` between two measured lengths ``a < steps < b`` (the full run, ``b = 1``, reads
    ``points["sparsity"]``) the change is interpolated linearly in the length,

        c_sparsity(p, steps) = c_a(p) + (steps - a) / (b - a) * (c_b(p) - c_a(p)),

    and below the shortest measured length pruning is not covered (no extrapolation). Without
    such curves the sparsity change does not depend on the run's length.

    Args:
        points: per axis, ``{strength: change}`` or ``[[strength, change], ...]``.
        base: the reference run's accuracy in percent, if known (for :meth:`predict`).
        distill_recovers_compression: the distillation rule above.
        sparsity_by_steps: ``{steps: sparsity points}`` of runs shorter than the reference
            (``steps`` in ``(0, 1)``), in the format of ``points["sparsity"]``.

    Example:
        >>> curves = AccuracyCurves({"sparsity": {0.5: -2.0}, "distill": {1.0: 1.0}}, base=80.0)
        >>> curves.change(sparsity=0.25)  # halfway between 0 -> 0 and 0.5 -> -2
        -1.0
        >>> curves.change(sparsity=0.25, distill=0.5), curves.change(distill=0.5)
        (-0.5, 0.0)
        >>> curves.predict(sparsity=0.5, distill=1.0), curves.covers("sparsity", 0.6)
        (79.0, False)
        >>> short = AccuracyCurves({"sparsity": {0.2: -0.3}, "steps": {0.5: -1.0}},
        ...                        sparsity_by_steps={0.5: {0.2: -2.3}})
        >>> short.change(sparsity=0.2, steps=0.5), round(short.change(sparsity=0.2, steps=0.75), 6)
        (-3.3, -1.8)
        >>> short.covers_run(sparsity=0.2, steps=0.5), short.covers_run(sparsity=0.2, steps=0.4)
        (True, False)
    """

    points: Mapping[str, Any]
    base: float | None = None
    distill_recovers_compression: bool = True
    sparsity_by_steps: Mapping[Any, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.points) - set(AXES))
        if unknown:
            raise ValueError(f"unknown axes {unknown}; axes: {list(AXES)}")
        normalized = {axis: _normalized_points(axis, self.points.get(axis, {})) for axis in AXES}
        object.__setattr__(self, "points", normalized)
        by_steps: dict[float, tuple[tuple[Any, float], ...]] = {}
        for raw_steps, raw_points in self.sparsity_by_steps.items():
            steps = float(raw_steps)
            if not 0.0 < steps < 1.0:
                raise ValueError(
                    f"sparsity_by_steps: a run length must be in (0, 1) of the reference run, "
                    f"got {raw_steps} (the full run's curve is points['sparsity'])"
                )
            by_steps[steps] = _normalized_points("sparsity", raw_points)
        object.__setattr__(self, "sparsity_by_steps", dict(sorted(by_steps.items())))
        if self.base is not None and not math.isfinite(self.base):
            raise ValueError(f"base must be finite, got {self.base}")

    def covers(self, axis: str, strength: Any) -> bool:
        """Whether ``strength`` lies within the measured range of ``axis`` (off always does)."""
        _check_strength(axis, strength)
        return _covered(axis, self.points[axis], strength)

    def axis_change(self, axis: str, strength: Any) -> float:
        """The change of ``axis`` alone at ``strength`` (linear between measured points)."""
        return _interpolated(axis, self.points[axis], strength)

    def _sparsity_lengths(self, steps: float) -> tuple[float, float] | None:
        """The measured run lengths around ``steps`` (``None``: shorter than every one)."""
        lengths = [*self.sparsity_by_steps, 1.0]
        if steps >= 1.0 - _EPS:
            return 1.0, 1.0
        for a, b in itertools.pairwise(lengths):
            if a - _EPS <= steps <= b + _EPS:
                return a, b
        return None

    def _curve(self, length: float) -> tuple[tuple[Any, float], ...]:
        return self.points["sparsity"] if length >= 1.0 else self.sparsity_by_steps[length]

    def covers_run(self, **strengths: Any) -> bool:
        """Whether every axis of a combination is covered, pruning at its run length too."""
        if not all(self.covers(axis, strengths.get(axis, OFF[axis])) for axis in AXES):
            return False
        sparsity, steps = strengths.get("sparsity", 0.0), strengths.get("steps", 1.0)
        if not self.sparsity_by_steps or sparsity == 0:
            return True
        lengths = self._sparsity_lengths(steps)
        if lengths is None:
            return False
        return all(_covered("sparsity", self._curve(length), sparsity) for length in lengths)

    def sparsity_change(self, sparsity: float, steps: float = 1.0) -> float:
        """The change of pruning to ``sparsity`` in a run of ``steps`` (see the class notes)."""
        if not self.sparsity_by_steps or sparsity == 0:
            return self.axis_change("sparsity", sparsity)
        lengths = self._sparsity_lengths(steps)
        if lengths is None:
            raise ValueError(
                f"sparsity={sparsity} in a run of steps={steps}: pruning was measured in runs of "
                f"{[*self.sparsity_by_steps, 1.0]} of the reference; the curves do not "
                "extrapolate to shorter ones"
            )
        a, b = lengths
        change_a = _interpolated("sparsity", self._curve(a), sparsity)
        change_b = _interpolated("sparsity", self._curve(b), sparsity)
        share = 0.0 if b - a <= _EPS else (steps - a) / (b - a)
        return change_a + share * (change_b - change_a)

    def contributions(
        self,
        data_budget: float = 1.0,
        trainable: float = 1.0,
        sparsity: float = 0.0,
        weight_bits: int | None = None,
        distill: float = 0.0,
        steps: float = 1.0,
    ) -> dict[str, float]:
        """Each axis' change in a combination (pruning at the run's length and distillation
        after their rules, see the class notes)."""
        values = (data_budget, trainable, sparsity, weight_bits, distill, steps)
        strengths = dict(zip(AXES, values, strict=True))
        parts = {
            axis: self.sparsity_change(sparsity, steps)
            if axis == "sparsity"
            else self.axis_change(axis, value)
            for axis, value in strengths.items()
        }
        if self.distill_recovers_compression and distill > 0:
            if sparsity == 0 and weight_bits is None:
                parts["distill"] = 0.0
            elif parts["distill"] > 0:
                loss = -(parts["sparsity"] + parts["weight_bits"])
                parts["distill"] = min(parts["distill"], max(0.0, loss))
        return parts

    def change(self, **strengths: Any) -> float:
        """Predicted accuracy change of a combination (points): the sum of
        :meth:`contributions`. Keywords: the axes of :data:`AXES` (absent: off)."""
        return sum(self.contributions(**strengths).values())

    def predict(self, **strengths: Any) -> float:
        """Predicted accuracy (percent): ``base + change``; needs ``base``."""
        if self.base is None:
            raise ValueError("these curves have no base accuracy; use change() for the delta")
        return self.base + self.change(**strengths)

    def to_dict(self) -> dict[str, Any]:
        """``{"base", "distill_recovers_compression", "points": {axis: [[s, c], ...]}}``; the
        off points are implicit and left out."""
        points = {
            axis: [[s, c] for s, c in pairs if _on(axis, s)] for axis, pairs in self.points.items()
        }
        document = {
            "base": self.base,
            "distill_recovers_compression": self.distill_recovers_compression,
            "points": {axis: pairs for axis, pairs in points.items() if pairs},
        }
        if self.sparsity_by_steps:
            document["sparsity_by_steps"] = {
                str(steps): [[s, c] for s, c in pairs if _on("sparsity", s)]
                for steps, pairs in self.sparsity_by_steps.items()
            }
        return document

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccuracyCurves:
        """Curves from :meth:`to_dict`'s format; unknown keys raise ``ValueError``."""
        known = {"base", "distill_recovers_compression", "points", "sparsity_by_steps"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AccuracyCurves keys {unknown}")
        return cls(
            dict(data.get("points", {})),
            base=data.get("base"),
            distill_recovers_compression=bool(data.get("distill_recovers_compression", True)),
            sparsity_by_steps=dict(data.get("sparsity_by_steps", {})),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the curves as JSON (:meth:`to_dict`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AccuracyCurves:
        """Read curves written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_ablation_summary(
        cls, summary: Mapping[str, Any], baseline: str | None = None
    ) -> AccuracyCurves:
        """Curves from a summary of set-ups, their accuracies and their axis strengths.

        The format::

            {
              "unit": "fraction",          # optional; "percent" if test_acc is in percent
              "setups": {NAME: {"test_acc": [acc of each run, ...], ...}},   # other keys ignored
              "strengths": {NAME: {axis: value, ...}}                        # absent axes: off
            }

        Every set-up needs its strengths. The baseline is the set-up with every axis off (or
        ``baseline``); its mean accuracy is ``base``. A set-up with exactly one axis on gives a
        point on that axis: its mean accuracy minus the baseline's. A set-up with distillation
        and pruning or quantization on gives a ``distill`` point against the same set-up
        without distillation (which must be in the summary), since distillation only recovers
        what compression loses; distillation without compression is not read. A set-up with
        exactly ``sparsity`` and ``steps`` on gives a point of ``sparsity_by_steps`` against
        the same run length unpruned (which must be in the summary). Set-ups with several
        other axes on are combinations the curves predict, and are not read either.

        Example:
            >>> curves = AccuracyCurves.from_ablation_summary({
            ...     "setups": {"Standard": {"test_acc": [0.80, 0.82]},
            ...                "DataOpt": {"test_acc": [0.75]},
            ...                "Int8": {"test_acc": [0.80]}, "Int8+KD": {"test_acc": [0.805]}},
            ...     "strengths": {"Standard": {}, "DataOpt": {"data_budget": 0.4},
            ...                   "Int8": {"weight_bits": 8},
            ...                   "Int8+KD": {"weight_bits": 8, "distill": 0.5}},
            ... })
            >>> round(curves.base, 6), round(curves.axis_change("data_budget", 0.4), 6)
            (81.0, -6.0)
            >>> round(curves.axis_change("weight_bits", 8), 6)
            -1.0
            >>> round(curves.axis_change("distill", 0.5), 6)
            0.5
        """
        unit = summary.get("unit", "fraction")
        if unit not in ("fraction", "percent"):
            raise ValueError(f"unit must be 'fraction' or 'percent', got {unit!r}")
        scale = 100.0 if unit == "fraction" else 1.0
        setups, given = summary.get("setups", {}), summary.get("strengths", {})
        missing = sorted(set(setups) - set(given))
        extra = sorted(set(given) - set(setups))
        if missing or extra:
            raise ValueError(
                f"every set-up needs its strengths and every strength a set-up: no strengths "
                f"for {missing}, no set-up for {extra}"
            )
        strengths: dict[str, dict[str, Any]] = {}
        means: dict[str, float] = {}
        for name, row in setups.items():
            unknown = sorted(set(given[name]) - set(AXES))
            if unknown:
                raise ValueError(f"set-up {name!r}: unknown axes {unknown}")
            full = {axis: given[name].get(axis, OFF[axis]) for axis in AXES}
            for axis, value in full.items():
                _check_strength(axis, value)
            accuracies = row.get("test_acc") if isinstance(row, Mapping) else None
            if not accuracies:
                raise ValueError(f"set-up {name!r} has no test_acc values")
            strengths[name] = full
            means[name] = scale * statistics.fmean(float(a) for a in accuracies)

        def on(name: str) -> list[str]:
            return [axis for axis in AXES if _on(axis, strengths[name][axis])]

        if baseline is None:
            off = [name for name in strengths if not on(name)]
            if len(off) != 1:
                raise ValueError(
                    f"need exactly one set-up with every axis off as the baseline, found {off}; "
                    "name it with baseline="
                )
            baseline = off[0]
        if baseline not in strengths or on(baseline):
            raise ValueError(f"baseline {baseline!r} must be a set-up with every axis off")
        points: dict[str, list[tuple[Any, float]]] = {axis: [] for axis in AXES}
        by_steps: dict[float, list[tuple[Any, float]]] = {}
        for name, axes in ((n, on(n)) for n in strengths):
            if sorted(axes) == ["sparsity", "steps"]:
                reference = {**strengths[name], "sparsity": 0.0}
                matches = [n for n, s in strengths.items() if s == reference]
                if matches:
                    change = means[name] - means[matches[0]]
                    by_steps.setdefault(strengths[name]["steps"], []).append(
                        (strengths[name]["sparsity"], change)
                    )
            elif "distill" in axes:
                if "sparsity" not in axes and "weight_bits" not in axes:
                    continue  # nothing to recover: the curves' rule makes it 0
                reference = {**strengths[name], "distill": 0.0}
                matches = [n for n, s in strengths.items() if s == reference]
                if matches:
                    change = means[name] - means[matches[0]]
                    points["distill"].append((strengths[name]["distill"], change))
            elif len(axes) == 1:
                axis = axes[0]
                points[axis].append((strengths[name][axis], means[name] - means[baseline]))
        return cls(
            {a: p for a, p in points.items() if p}, base=means[baseline], sparsity_by_steps=by_steps
        )


#: A conservative prior (points of accuracy, against the reference run), to replace with curves
#: measured on your model and data (:meth:`AccuracyCurves.from_ablation_summary`). Every
#: compression costs something and costs more the harder it is: a data budget of 0.5 costs 1.25
#: points, training a quarter of the parameters 1, sparsity 0.5 1.6, int8 weights 0.5 and int4
#: 2; a shorter run costs too (half the steps: 2 points). Distillation gains at most 0.5 points,
#: and only with pruning or quantization on (:class:`AccuracyCurves`' rule). The ablation table
#: in BENCHMARKS.md measured larger single-axis losses for harder settings on a 2-epoch,
#: 100-step fine-tune (40% of the data: -6.0 points with the hardest samples dropped; 10% of the
#: parameters: -1.3; sparsity 0.5 with int4 QAT: -4.6); the prior is milder, for the gentler
#: grid of :data:`DEFAULT_CANDIDATES`, and no substitute for measuring.
DEFAULT_CURVES = AccuracyCurves(
    {
        "data_budget": {0.8: -0.25, 0.6: -0.75, 0.5: -1.25, 0.4: -2.0, 0.3: -3.5, 0.2: -6.0},
        "trainable": {0.75: -0.2, 0.5: -0.5, 0.25: -1.0, 0.1: -1.5},
        "sparsity": {0.2: -0.3, 0.3: -0.6, 0.4: -1.0, 0.5: -1.6, 0.7: -4.0, 0.9: -10.0},
        "weight_bits": {8: -0.5, 4: -2.0},
        "distill": {0.5: 0.3, 0.9: 0.5, 1.0: 0.5},
        "steps": {0.9: -0.2, 0.8: -0.5, 0.7: -0.9, 0.6: -1.4, 0.5: -2.0, 0.4: -2.8, 0.3: -4.0},
    }
)


# -- size -----------------------------------------------------------------------------------------


def size_fraction(
    sparsity: float,
    weight_bits: int | None,
    prune_pattern: str,
    compressible_share: float,
    quantized_overhead: float = 0.0,
    vocabulary_share: float = 0.0,
    embedding_share: float = 0.0,
    embedding_bits: float | None = None,
    rows_held_apart: bool = False,
    unseen_bits: float | None = None,
) -> float:
    r"""Exported model bytes relative to the fp32 dense model.

    With ``v`` the share of the parameters a trimmed vocabulary removes (embedding rows of
    tokens the training data never uses; 0: untrimmed), ``c`` the share of the parameters of
    the model as it trains (trimmed) the pruner targets (the transformer blocks' linear
    weights; embeddings and the head are not pruned), sparsity ``s`` and ``k`` bits per
    weight::

        size = kept * k / 32
        kept = (1 - v) * (1 - c * s)   for "heads+neurons" (pruned heads and neurons removed)
        kept = 1 - v                   for "unstructured" (a dense export stores the zeros)

    and ``k = 32`` when ``weight_bits`` is ``None``. Quantization divides *every* weight by
    ``32 / k`` (the int8 and int4 presets quantize the embeddings too). Quantization scales,
    norms, biases and the graph make real files larger: a quantized export adds
    ``quantized_overhead`` (a share of the fp32 bytes; the int8 ONNX export of
    all-MiniLM-L6-v2 measured 1 / 3.84, an overhead of 0.0104).

    A quantized export may store the token-embedding table, ``e`` of the trained model's
    parameters (``embedding_share``), at ``k_e = embedding_bits`` bits an entry (scales
    included, e.g. 5 for 4-bit blocks of 32 with fp32 scales) instead of ``k``; and with
    ``rows_held_apart`` (``unseen_tokens="pretrained"``) the export holds the ``v`` dropped
    rows again, at ``k_u = unseen_bits`` bits an entry (default ``k_e``). In shares of the
    untrimmed model::

        E = e * (1 - v)                                      # the trained rows
        U = v if rows_held_apart else 0                      # the rows held apart
        kept = (1 if rows_held_apart else 1 - v) - c * s * (1 - v)
        size = ((kept - E - U) * k + E * k_e + U * k_u) / 32 + quantized_overhead

    (An export that stores the two tables apart also holds the int64 table that maps each
    token id to its row, 8 bytes an id: 0.3% of all-MiniLM-L6-v2's fp32 bytes, not priced.)

    Example:
        >>> size_fraction(0.5, None, "heads+neurons", 0.6)  # 1 - 0.6 * 0.5
        0.7
        >>> size_fraction(0.5, 8, "unstructured", 0.6), size_fraction(0.5, 4, "heads+neurons", 0.6)
        (0.25, 0.0875)
        >>> size_fraction(0.0, 8, "heads+neurons", 0.6, vocabulary_share=0.2)  # 0.8 * 8 / 32
        0.2
        >>> round(size_fraction(0.5, None, "heads+neurons", 0.6, vocabulary_share=0.2), 6)
        0.56
        >>> size_fraction(0.0, 8, "heads+neurons", 0.6, embedding_share=0.5, embedding_bits=4)
        0.1875
        >>> size_fraction(0.0, 8, "heads+neurons", 0.6, vocabulary_share=0.5, embedding_share=0.5,
        ...               rows_held_apart=True, unseen_bits=4)  # (0.5 * 8 + 0.5 * 4) / 32
        0.1875
    """
    _check_strength("sparsity", sparsity)
    _check_strength("weight_bits", weight_bits)
    if prune_pattern not in PRUNE_PATTERNS:
        raise ValueError(f"prune_pattern must be one of {PRUNE_PATTERNS}, got {prune_pattern!r}")
    _check_fraction("compressible_share", compressible_share, closed_top=True)
    if not 0.0 <= quantized_overhead < 1.0:
        raise ValueError(f"quantized_overhead must be in [0, 1), got {quantized_overhead}")
    if not 0.0 <= vocabulary_share < 1.0:
        raise ValueError(f"vocabulary_share must be in [0, 1), got {vocabulary_share}")
    _check_fraction("embedding_share", embedding_share, closed_top=True)
    for name, bits in (("embedding_bits", embedding_bits), ("unseen_bits", unseen_bits)):
        if bits is not None and not 0 < bits <= 32:
            raise ValueError(f"{name} must be in (0, 32] or None, got {bits}")
    pruned = compressible_share * sparsity if prune_pattern == "heads+neurons" else 0.0
    trained = 1.0 - vocabulary_share
    kept = (1.0 if rows_held_apart else trained) - pruned * trained
    if weight_bits is None:
        return kept
    table = embedding_share * trained
    apart = vocabulary_share if rows_held_apart else 0.0
    table_bits = weight_bits if embedding_bits is None else embedding_bits
    apart_bits = table_bits if unseen_bits is None else unseen_bits
    rest = kept - table - apart
    return (rest * weight_bits + table * table_bits + apart * apart_bits) / 32 + quantized_overhead


# -- the solver -----------------------------------------------------------------------------------


def reachable_trainable(target: float, units: Sequence[float]) -> float:
    """The share of the parameters a freezer with ``target_trainable=target`` leaves trainable,
    given the freezable tensors' shares ``units`` (everything else, ``1 - sum(units)``, always
    trains). The freezer keeps whole tensors and never more than ``target``, so the share moves
    in steps; this takes the tensors that fit, largest first::

        reached = (1 - sum(units)) + sum of the units kept while the total stays <= target

    (the freezer ranks by sensitivity rather than size, so it can keep other tensors of the
    same total; a tensor larger than what is left is frozen either way).

    Example:
        >>> # a 52% embedding, two small tensors, 46% that always trains (pruned ones, head)
        >>> round(reachable_trainable(0.75, [0.52, 0.01, 0.01]), 4)  # the embedding is frozen
        0.48
        >>> reachable_trainable(1.0, [0.52, 0.01, 0.01])
        1.0
    """
    _check_strength("trainable", target)
    if target >= 1.0 - _EPS:
        return 1.0
    kept = 1.0 - sum(units)
    if kept > target + _EPS:
        raise ValueError(
            f"trainable={target} is below the share that always trains ({kept:.3g}): the "
            "freezer cannot reach it"
        )
    for unit in sorted(units, reverse=True):
        if kept + unit <= target + _EPS:
            kept += unit
    return kept


@dataclass(frozen=True)
class BudgetAllocation:
    """The strengths :func:`solve_budget` chose, what they are predicted to cost, and why.

    Attributes:
        data_budget, trainable, sparsity, weight_bits, distill, steps: the strengths.
        time_s: predicted training seconds; ``time_fraction``: of ``reference_time_s``, the
            reference run's (every axis off).
        size_fraction: predicted export bytes relative to the fp32 dense model.
        accuracy_change: predicted accuracy change (points); ``accuracy``: the predicted
            accuracy (percent) when the curves have a base, else ``None``.
        breakdown: predicted seconds per component (:class:`RunCost`).
        binding: the budgets that bind (``"time"``, ``"size"``): relaxing one alone would allow
            a more accurate allocation of the grid.
        reason: a human-readable account of the choice.
        warmup, qat_start, quantize_at, prune_pattern: the schedule the prediction assumed.
        trainable_reached: the share the freezer reaches for ``trainable`` when the solver was
            given the freezable tensors (:func:`reachable_trainable`), else ``None``; the
            predictions use it.
        vocabulary_share: the share of the parameters a trimmed vocabulary removes from the
            export (in ``size_fraction``).
        token_share: padded tokens a step computes as a share of the reference run's
            (batches grouped by length; in ``time_s``).

    Example:
        >>> cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)
        >>> curves = AccuracyCurves({"trainable": {0.5: -1.0}, "steps": {0.5: -3.0}})
        >>> allocation = solve_budget(
        ...     0.85, None, cost, curves, reference_steps=100, epochs=2, compressible_share=0.5,
        ...     candidates={"data_budget": [1.0], "trainable": [1.0, 0.5], "sparsity": [0.0],
        ...                 "weight_bits": [None], "distill": [0.0], "steps": [1.0, 0.5]},
        ... )
        >>> allocation.plan_arguments()  # doctest: +NORMALIZE_WHITESPACE
        {'data_budget': 1.0, 'trainable': 0.5, 'sparsity': 0.0, 'weight_bits': None,
         'distill': 0.0, 'steps_fraction': 1.0}
        >>> allocation.binding, round(allocation.time_fraction, 4)
        (('time',), 0.8125)
    """

    data_budget: float
    trainable: float
    sparsity: float
    weight_bits: int | None
    distill: float
    steps: float
    time_s: float
    time_fraction: float
    reference_time_s: float
    size_fraction: float
    accuracy_change: float
    accuracy: float | None
    breakdown: Mapping[str, float]
    binding: tuple[str, ...]
    reason: str
    warmup: float = 0.25
    qat_start: float = 0.8
    quantize_at: str = "train"
    prune_pattern: str = "heads+neurons"
    trainable_reached: float | None = None
    vocabulary_share: float = 0.0
    token_share: float = 1.0

    @property
    def strengths(self) -> dict[str, Any]:
        """The chosen strength of every axis of :data:`AXES`."""
        return {axis: getattr(self, axis) for axis in AXES}

    def plan_arguments(self) -> dict[str, Any]:
        """:class:`~lightning_3d.plan.ThreeDPlan` keyword arguments of the axes, and
        ``steps_fraction`` (the run length as a share of the reference run's optimizer steps,
        for ``max_steps``)."""
        return {
            "data_budget": self.data_budget,
            "trainable": self.trainable,
            "sparsity": self.sparsity,
            "weight_bits": self.weight_bits,
            "distill": self.distill,
            "steps_fraction": self.steps,
        }


def _grid(
    candidates: Mapping[str, Sequence[Any]] | None, curves: AccuracyCurves
) -> tuple[dict[str, list[Any]], list[str]]:
    """The search grid (given candidates, else the defaults the curves cover), and the default
    strengths left out because the curves do not cover them."""
    given = dict(candidates or {})
    unknown = sorted(set(given) - set(AXES))
    if unknown:
        raise ValueError(f"unknown candidate axes {unknown}; axes: {list(AXES)}")
    grid: dict[str, list[Any]] = {}
    dropped: list[str] = []
    for axis in AXES:
        if axis in given:
            values = list(given[axis])
            if not values:
                raise ValueError(f"candidates[{axis!r}] is empty")
            for value in values:
                _check_strength(axis, value)
                if not curves.covers(axis, value):
                    raise ValueError(
                        f"candidate {axis}={value} is outside the accuracy curves' measured "
                        "points; measure it or leave it out"
                    )
        else:
            values = []
            for value in DEFAULT_CANDIDATES[axis]:
                if curves.covers(axis, value):
                    values.append(value)
                else:
                    dropped.append(f"{axis}={value}")
        unique: list[Any] = []
        for value in values:
            if value not in unique:
                unique.append(value)
        grid[axis] = unique
    return grid, dropped


def solve_budget(
    time: float,
    size: float | None,
    cost: CostModel,
    curves: AccuracyCurves,
    *,
    reference_steps: int,
    epochs: int,
    compressible_share: float,
    prune_pattern: str = "heads+neurons",
    candidates: Mapping[str, Sequence[Any]] | None = None,
    warmup: float = 0.25,
    qat_start: float = 0.8,
    quantized_overhead: float = 0.0,
    freezable_share: float = 1.0,
    freezable_share_pruned: float | None = None,
    quantize_at: str = "train",
    freezable_units: Sequence[float] | None = None,
    freezable_units_pruned: Sequence[float] | None = None,
    vocabulary_share: float = 0.0,
    embedding_share: float = 0.0,
    embedding_bits: float | None = None,
    rows_held_apart: bool = False,
    unseen_bits: float | None = None,
    token_share: float = 1.0,
) -> BudgetAllocation:
    r"""The most accurate allocation of the candidate grid within a time and a size budget.

    Every combination of the candidate strengths is predicted (:meth:`CostModel.run_seconds`,
    :func:`size_fraction`, :meth:`AccuracyCurves.change`) and kept when::

        run_seconds(a) <= time * run_seconds(every axis off, steps = 1)
        size_fraction(a) <= size                      (no size constraint when size is None)

    The kept allocation with the highest predicted accuracy wins; ties go to the lower
    predicted time, then the smaller size, then fewer axes on. The grid is
    :data:`DEFAULT_CANDIDATES` for axes ``candidates`` does not name; default strengths the
    curves do not cover are left out (and said so in ``reason``), while a given candidate the
    curves do not cover raises ``ValueError``.

    Args:
        time: the training time budget as a share of the reference run's, ``> 0``
            (``math.inf``: no limit).
        size: the export size budget as a share of the fp32 dense bytes, in ``(0, 1]``, or
            ``None``.
        cost, curves: the time and accuracy models.
        reference_steps, epochs: the reference recipe's optimizer steps and epochs.
        compressible_share: the share of the parameters the pruner targets (of the model as it
            trains: trimmed, with ``vocabulary_share``).
        prune_pattern: ``"heads+neurons"`` or ``"unstructured"`` (:func:`size_fraction`).
        candidates: per axis, the strengths to try.
        warmup, qat_start: fractions of the run's steps (:meth:`CostModel.run_seconds`).
        quantize_at: ``"train"`` (QAT, which costs time) or ``"export"`` (int8 only, no
            training time): :meth:`CostModel.run_seconds`.
        quantized_overhead: what a quantized export adds to its weights (:func:`size_fraction`).
        freezable_share: the most of the parameters the freezer may freeze (the head stays
            trainable): a ``trainable`` below ``1 - freezable_share`` cannot be reached and is
            not tried. ``freezable_share_pruned``: the same while pruning is on (default: the
            same), smaller when the freezer leaves the pruned tensors trainable.
        freezable_units: the share of the parameters of each tensor the freezer may freeze
            (``freezable_units_pruned``: while pruning is on; default: the same). Given, they
            replace ``freezable_share*`` and every ``trainable`` candidate is predicted at the
            share the freezer reaches with whole tensors (:func:`reachable_trainable`), which
            must lie within the accuracy curves' points.
        vocabulary_share: the share of the parameters a trimmed vocabulary removes from the
            ONNX exports (``ThreeDPlan(vocabulary="train")``; :func:`size_fraction`); 0:
            untrimmed.
        embedding_share, embedding_bits, rows_held_apart, unseen_bits: the token-embedding
            table's share of the trained parameters, its bits an entry in a quantized export
            (``None``: as the other weights), whether the export holds the trimmed rows again,
            and their bits an entry (``None``: as the table's) (:func:`size_fraction`).
        token_share: padded tokens a step of the planned run computes as a share of the
            reference run's (:func:`~lightning_3d.curriculum.token_share`, or
            :meth:`CostModel.token_share_of` a measured ratio of step periods; batches grouped
            by length), which makes every allocation's steps cheaper
            (:meth:`CostModel.run_seconds`); the reference run keeps 1. Grouping is assumed to
            leave accuracy unchanged.

    Raises:
        ValueError: a bad argument, or no allocation of the grid meets the budgets (the
            message names the budget and what the cheapest or smallest allocation needs).

    Example:
        >>> cost = CostModel(forward_s=1.0, backward_s=2.0, optimizer_s=1.0)
        >>> solve_budget(0.05, None, cost, DEFAULT_CURVES, reference_steps=100, epochs=2,
        ...              compressible_share=0.5)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: time=0.05 cannot be met: ... takes 0.287 of the reference run (115 s of 400 s)
    """
    if isinstance(time, bool) or not isinstance(time, int | float) or math.isnan(time) or time <= 0:
        raise ValueError(f"time must be a share of the reference run's time > 0, got {time!r}")
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int | float) or not 0.0 < size <= 1.0
    ):
        raise ValueError(f"size must be a share of the fp32 dense bytes in (0, 1], got {size!r}")
    if prune_pattern not in PRUNE_PATTERNS:
        raise ValueError(f"prune_pattern must be one of {PRUNE_PATTERNS}, got {prune_pattern!r}")
    _check_fraction("compressible_share", compressible_share, closed_top=True)
    _check_recipe(reference_steps, epochs)
    _check_fraction("warmup", warmup)
    _check_fraction("qat_start", qat_start)
    _check_quantize_at(quantize_at)
    grid, dropped = _grid(candidates, curves)
    if quantize_at == "export":
        if candidates is not None and 4 in candidates.get("weight_bits", ()):
            raise ValueError(
                "quantize_at='export' quantizes to int8 only: leave 4 out of weight_bits"
            )
        grid["weight_bits"] = [bits for bits in grid["weight_bits"] if bits != 4]
    schedule = {
        "reference_steps": reference_steps,
        "epochs": epochs,
        "warmup": warmup,
        "qat_start": qat_start,
        "quantize_at": quantize_at,
    }
    reference = cost.run_seconds(**schedule).total_s

    def evaluate(strengths: Mapping[str, Any]) -> tuple[RunCost, float, float]:
        run = cost.run_seconds(
            **schedule, **strengths, kept_share=1.0 - vocabulary_share, token_share=token_share
        )
        size_ = size_fraction(
            strengths["sparsity"], strengths["weight_bits"], prune_pattern, compressible_share,
            quantized_overhead, vocabulary_share, embedding_share, embedding_bits,
            rows_held_apart, unseen_bits,
        )  # fmt: skip
        return run, size_, curves.change(**strengths)

    rows: list[tuple[Any, ...]] = []
    pruned_share = freezable_share if freezable_share_pruned is None else freezable_share_pruned
    if freezable_units_pruned is None:
        freezable_units_pruned = freezable_units

    def as_run(strengths: dict[str, Any]) -> dict[str, Any] | None:
        """The strengths the run will have (the freezer's reachable share), or ``None`` when
        the freezer cannot get there."""
        pruning = strengths["sparsity"] > 0
        units = freezable_units_pruned if pruning else freezable_units
        if units is None:
            freezable = pruned_share if pruning else freezable_share
            return None if strengths["trainable"] < 1.0 - freezable - _EPS else strengths
        if strengths["trainable"] < 1.0 - sum(units) - _EPS:
            return None
        reached = reachable_trainable(strengths["trainable"], units)
        if not curves.covers("trainable", reached):
            return None  # the freezer would land on an unmeasured share
        return {**strengths, "trainable": reached}

    def covered(strengths: dict[str, Any]) -> dict[str, Any] | None:
        """The run's strengths when the curves cover them all (pruning at its run length)."""
        predicted = as_run(strengths)
        return predicted if predicted is not None and curves.covers_run(**predicted) else None

    for index, combo in enumerate(itertools.product(*(grid[axis] for axis in AXES))):
        strengths = dict(zip(AXES, combo, strict=True))
        predicted = covered(strengths)
        if predicted is None:
            continue
        run, size_, change = evaluate(predicted)
        fraction = run.total_s / reference
        axes_on = sum(_on(axis, value) for axis, value in predicted.items())
        key = (-round(change, 9), round(fraction, 12), round(size_, 12), axes_on, index)
        rows.append((key, strengths, run, fraction, size_, change, predicted))

    def fits_time(row: tuple[Any, ...]) -> bool:
        return row[3] <= time * (1 + _EPS)

    def fits_size(row: tuple[Any, ...]) -> bool:
        return size is None or row[4] <= size * (1 + _EPS)

    feasible = [row for row in rows if fits_time(row) and fits_size(row)]
    if not feasible:
        raise ValueError(_infeasible(time, size, rows, fits_time, fits_size, reference))
    key, strengths, run, fraction, size_, change, predicted = min(feasible, key=lambda row: row[0])
    reached = None if predicted is strengths else predicted["trainable"]

    binding = []
    time_only = min((row for row in rows if fits_size(row)), key=lambda row: row[0])
    if time_only[5] > change + _EPS:
        binding.append("time")
    size_only = min((row for row in rows if fits_time(row)), key=lambda row: row[0])
    if size is not None and size_only[5] > change + _EPS:
        binding.append("size")

    lines = [
        _budget_line(
            "time", time, fraction, run.total_s, reference, "time" in binding, time_only[5] - change
        ),
        _budget_line("size", size, size_, None, None, "size" in binding, size_only[5] - change),
    ]
    if not binding:
        lines.append("no budget binds: this is the most accurate allocation of the grid")
    if token_share < 1:
        lines.append(
            f"batches grouped by length: a step's forward and backward priced at "
            f"{token_share:.3g} of random batches' (accuracy assumed unchanged)"
        )
    if vocabulary_share and rows_held_apart:
        lines.append(
            f"vocabulary trimmed to the training data's tokens in training: "
            f"{vocabulary_share:.3g} of the parameters held apart, untrained, and exported"
        )
    elif vocabulary_share:
        lines.append(
            f"vocabulary trimmed to the training data's tokens: {vocabulary_share:.3g} of the "
            "parameters out of the ONNX exports, at no training time"
        )
    apart_bits = unseen_bits is not None and bool(vocabulary_share and rows_held_apart)
    if embedding_bits is not None and strengths["weight_bits"]:
        table = "trained token rows" if apart_bits else "token-embedding table"
        lines.append(f"the {table} exported at {embedding_bits:g} bits an entry")
    if apart_bits and strengths["weight_bits"]:
        lines.append(f"the rows held apart exported at {unseen_bits:g} bits an entry")
    if any(_on(axis, strengths[axis]) for axis in AXES):
        lines.append(f"axes on ({_describe(strengths)}), each against switching it off:")
    else:
        lines.append("every axis off: nothing in the grid is predicted to pay for itself")
    for axis in AXES:
        if not _on(axis, strengths[axis]):
            continue
        without = {**strengths, axis: OFF[axis]}
        run_off, size_off, change_off = evaluate(as_run(without) or without)
        lines.append(
            "  "
            + _axis_line(
                axis,
                strengths[axis]
                if axis != "trainable" or reached is None
                else (
                    f"{strengths[axis]:g} (the freezer reaches {reached:.3g} with whole tensors)"
                ),
                run_off.total_s - run.total_s,
                size_off,
                size_,
                change - change_off,
            )
        )
    if dropped:
        lines.append(
            "left out of the default grid (beyond the accuracy curves' measured points): "
            + ", ".join(dropped)
        )
    if curves.sparsity_by_steps:
        lengths = ", ".join(f"{steps:g}" for steps in curves.sparsity_by_steps)
        lines.append(
            f"pruning priced at the run's length (sparsity curves measured at steps {lengths} "
            "and 1); pruning in shorter runs left out"
        )
    return BudgetAllocation(
        **strengths,
        time_s=run.total_s,
        time_fraction=fraction,
        reference_time_s=reference,
        size_fraction=size_,
        accuracy_change=change,
        accuracy=None if curves.base is None else curves.base + change,
        breakdown=dict(run.breakdown),
        binding=tuple(binding),
        reason="\n".join(lines),
        warmup=warmup,
        qat_start=qat_start,
        quantize_at=quantize_at,
        prune_pattern=prune_pattern,
        trainable_reached=reached,
        vocabulary_share=vocabulary_share,
        token_share=token_share,
    )


def _infeasible(
    time: float,
    size: float | None,
    rows: Sequence[tuple[Any, ...]],
    fits_time: Callable[[tuple[Any, ...]], bool],
    fits_size: Callable[[tuple[Any, ...]], bool],
    reference: float,
) -> str:
    """The message of a budget nothing in the grid meets."""
    cheapest = min(rows, key=lambda row: (row[3], row[0]))
    smallest = min(rows, key=lambda row: (row[4], row[0]))
    if not any(fits_size(row) for row in rows):
        return (
            f"size={size} cannot be met: the smallest allocation in the grid "
            f"({_describe(smallest[1])}) exports {smallest[4]:.3g} of the fp32 dense bytes"
        )
    if not any(fits_time(row) for row in rows):
        return (
            f"time={time} cannot be met: the cheapest allocation in the grid "
            f"({_describe(cheapest[1])}) takes {cheapest[3]:.3g} of the reference run "
            f"({cheapest[2].total_s:.4g} s of {reference:.4g} s)"
        )
    within = min((row for row in rows if fits_size(row)), key=lambda row: (row[3], row[0]))
    return (
        f"time={time} and size={size} cannot be met together: the cheapest allocation within "
        f"size={size} ({_describe(within[1])}) takes {within[3]:.3g} of the reference run"
    )


def _budget_line(
    name: str,
    budget: float | None,
    used: float,
    seconds: float | None,
    reference: float | None,
    binds: bool,
    gain: float,
) -> str:
    if budget is None:
        return f"{name}: no budget (predicted {used:.3g} of the fp32 dense bytes)"
    what = "the reference run" if name == "time" else "the fp32 dense bytes"
    text = f"{name} budget {budget:g} of {what}: predicted {used:.3g}"
    if seconds is not None and reference is not None:
        text += f" ({seconds:.4g} s of {reference:.4g} s)"
    if binds:
        return text + f"; binds: without it the grid's best is {gain:.3g} points more accurate"
    return text + "; does not bind"


def _axis_line(
    axis: str, value: Any, saved_s: float, size_off: float, size_on: float, gained: float
) -> str:
    """One axis' effect: seconds saved (or added), bytes saved, accuracy given up (or won)."""
    parts = []
    if saved_s > _EPS:
        parts.append(f"saves {saved_s:.4g} s")
    elif saved_s < -_EPS:
        parts.append(f"adds {-saved_s:.4g} s")
    if size_off - size_on > _EPS:
        parts.append(f"shrinks the export from {size_off:.3g} to {size_on:.3g} of fp32 dense")
    if gained < -_EPS:
        accuracy = f"costs {-gained:.3g} points"
        if saved_s > _EPS:
            accuracy += f" ({-gained / saved_s:.3g} points per second saved)"
    elif gained > _EPS:
        accuracy = f"gains {gained:.3g} points"
    else:
        accuracy = "costs no accuracy by the curves"
    parts.append(accuracy)
    shown = value if axis == "weight_bits" or isinstance(value, str) else f"{value:g}"
    return f"{axis}={shown}: " + ", ".join(parts)
