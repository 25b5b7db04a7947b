"""The co-optimization plan: one object that sets every axis from a budget and makes them agree.

A :class:`ThreeDPlan` says how much of each resource a fine-tune may use:

* ``data_budget``: the share of the training samples each epoch visits, and
  ``group_by_length``: batches of texts of similar length, so that a batch computes little
  padding (the data axis);
* ``trainable``: the share of the parameters that keep training (the parameter axis);
* ``sparsity``: the share of the transformer blocks' linear weights (or heads and FFN neurons)
  pruned, ``weight_bits``: 4 or 8-bit weights (after quantization-aware training, or 8-bit
  quantized at export with ``quantize_at="export"``), ``distill``: the weight of
  distillation from a teacher, and ``vocabulary="train"``: only the embedding rows of tokens in
  the training data kept (the model axis);
* ``gradient_density``: the share of gradient entries sent between ranks (communication).

:meth:`ThreeDPlan.callbacks` turns it into Lightning callbacks in the order a step needs them::

    select data -> teacher targets -> update the frozen set -> update masks -> fake-quantize
    -> compress trainables

and :meth:`ThreeDPlan.strategy` into a compressed multi-GPU strategy. The plan runs in phases
over the optimizer steps ``N`` of the run (what the systems that compress within a point of the
dense model do: NNCF/optimum-intel JPQD, SparseML oBERT, InfoBatch)::

    [0, warmup*N)             dense warm-up: all parameters train, every sample is seen; the
                              freezer measures gradient statistics (Fisher E[g^2])
    warmup*N                  the freezer freezes; the teacher snapshot is taken
    [warmup*N, prune_end*N)   compression ramp: pruning to the target (magnitude, cubic),
                              with distillation from the snapshot
    [prune_end*N, qat_start*N) recovery: masks fixed, distillation goes on
    [qat_start*N, N)          quantization last: fake quantization, converted at the end
                              (``quantize_at="export"``: none in training; the int8 export
                              quantizes the trained float model)

* **Data, InfoBatch-style.** The first epoch trains on every sample and scores it by its loss;
  later epochs drop a random part of the below-mean-loss samples and weigh the kept ones up so
  the epoch's expected gradient is unchanged (``data_drops="easiest_random"``); the last
  ``data_anneal`` of the epochs train on all data again.
* **Do not freeze what is compressed** (``freeze="uncompressed"``): the freezer never freezes a
  tensor the pruner prunes, so pruned matrices keep adapting; ``"any"`` lets it freeze them.
* **Shared signals.** The pruner's per-layer sparsity (unstructured) reads the freezer's
  warm-up statistics; per-sample distillation losses are what the data axis scores.
* **Checks before training** (:class:`~lightning_3d.callbacks.PlanCoordinator`): callbacks out
  of step order, movement pruning of tensors the freezer may freeze, pruning that ends after the
  run or after fake quantization starts, a strategy whose density disagrees with the plan.
* **A budget** (:meth:`ThreeDPlan.for_budget`): axis strengths chosen for a training-time and a
  model-size budget by :mod:`lightning_3d.budget`, with the predicted cost logged beside the
  measured one.
* **Adaptive budgets** (``adaptive=True``): :class:`SparsityBackoff` lowers the sparsity target
  when the validation metric falls more than ``margin`` below its running best, and logs why.

``warmup=0`` keeps the single signal pass of earlier versions: before the first step one pass
over the training data scores every sample (so the data budget applies from the first epoch) and
measures the gradient statistics of ``probe_batches`` batches, and the freezer freezes before
step 1 (:func:`signal_pass`).

Example:
    >>> plan = ThreeDPlan(data_budget=0.7, trainable=0.5, sparsity=0.3, weight_bits=8, distill=0.5)
    >>> plan.axes
    ('data', 'distillation', 'parameters', 'pruning', 'quantization')
    >>> [type(c).__name__ for c in plan.callbacks()]  # doctest: +NORMALIZE_WHITESPACE
    ['PlanCoordinator', 'CurriculumSampler', 'Distiller', 'SensitivityFreezer',
     'ProgressivePruner', 'QATHook']
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import torch

from lightning_3d.sampling import check_group_by_length
from lightning_3d.sensitivity import GradientStatistics
from lightning_3d.vocabulary import UNSEEN, input_embedding_share

if TYPE_CHECKING:
    from lightning.pytorch import Callback

    from lightning_3d.budget import AccuracyCurves, BudgetAllocation, CostModel

log = logging.getLogger(__name__)

#: The order of work inside a training step, which the plan's callbacks follow.
STEP_ORDER = (
    "select data",
    "teacher targets",
    "update the frozen set",
    "update masks",
    "fake-quantize",
    "compress trainable entries",
)
#: The axis callbacks' ``axis`` names, in step order; the coordinator finds them by these.
AXIS_ORDER = ("data", "distillation", "parameters", "pruning", "quantization")
#: The built-in callback of each axis, for messages.
AXIS_CALLBACK_NAMES = {
    "data": "CurriculumSampler",
    "distillation": "Distiller",
    "parameters": "SensitivityFreezer",
    "pruning": "ProgressivePruner",
    "quantization": "QATHook",
}


class DataAxis(Protocol):
    """What the coordinator uses of the data axis (``CurriculumSampler``)."""

    axis: str
    prescore: bool

    def scoring_batches(self, trainer: Any, seed: int | None = None) -> Iterator[Any]: ...

    def record_outputs(self, outputs: Any, batch: Any) -> None: ...

    def fold_scores(self) -> None: ...


class DistillationAxis(Protocol):
    """What the coordinator uses of the distillation axis (``Distiller``)."""

    axis: str
    start_step: int


class ParameterAxis(Protocol):
    """What the coordinator uses of the parameter axis (``SensitivityFreezer``)."""

    axis: str
    warmup_steps: int

    @property
    def candidates(self) -> tuple[str, ...]: ...

    @property
    def measures_gradients(self) -> bool: ...


class PruningAxis(Protocol):
    """What the coordinator uses of the pruning axis (``ProgressivePruner``)."""

    axis: str
    score: str
    target_sparsity: float
    masks: dict[str, Any]
    targets: list[str]

    @property
    def window_end(self) -> int: ...

    def set_window(self, start_step: int, end_step: int, frequency: int) -> None: ...

    def set_target(self, trainer: Any, pl_module: Any, target: float) -> None: ...


class QuantizationAxis(Protocol):
    """What the coordinator uses of the quantization axis (``QATHook``)."""

    axis: str
    start_step: int
    start_epoch: int | None
    stage: str


#: ``weight_bits`` -> the torchao QAT preset used unless ``quantization`` names another.
PRESET_FOR_BITS = {4: "int4_weight_only", 8: "int8_weight_only"}
DATA_DROPS = ("hardest", "easiest_random")
PRUNE_PATTERNS = ("unstructured", "heads+neurons")
#: Where the quantization axis quantizes: in training (QAT) or at export (ONNX Runtime int8).
QUANTIZE_AT = ("train", "export")
#: ``vocabulary``: every embedding row, or those of the tokens in the training data.
VOCABULARIES = ("full", "train")
FREEZE_POLICIES = ("uncompressed", "any")
#: How the plan's freezer orders what to freeze (``SensitivityFreezer`` metrics).
FREEZE_ORDERS = ("fisher", "depth")
MODES = ("max", "min")
MAX_SPARSITY = 0.98  # the most the plan prunes any tensor (see ProgressivePruner)
DEFAULT_PRUNE_INCLUDE = r"(?:^|\.)(?:layer|layers|h|blocks)\.\d+\.(?:.*\.)?weight$"


@dataclass(frozen=True)
class PlanBudget:
    """A budget the plan's axis strengths are solved for (:meth:`ThreeDPlan.for_budget`).

    Args:
        time: training time as a share of the reference run's (every axis off), ``> 0``.
        size: exported model bytes as a share of the fp32 dense model's, in ``(0, 1]``;
            ``None``: no size limit.
        calibration: a step-cost model JSON (:meth:`~lightning_3d.budget.CostModel.save`);
            ``None``: measured on the first training batch before training (``lightning-3d
            fit`` saves it as ``cost_model.json`` under the run's root folder).
        curves: accuracy curves JSON (:class:`~lightning_3d.budget.AccuracyCurves`); ``None``:
            the documented prior :data:`~lightning_3d.budget.DEFAULT_CURVES`.
        quantized_overhead: what a quantized export adds beyond its weights, as a share of the
            fp32 bytes (:func:`~lightning_3d.budget.size_fraction`).

    Example:
        >>> PlanBudget(time=0.5, size=0.25).size
        0.25
    """

    time: float
    size: float | None = None
    calibration: str | None = None
    curves: str | None = None
    quantized_overhead: float = 0.0

    def __post_init__(self) -> None:
        if not self.time > 0:
            raise ValueError(f"budget time must be > 0, got {self.time}")
        if self.size is not None and not 0.0 < self.size <= 1.0:
            raise ValueError(f"budget size must be in (0, 1] or None, got {self.size}")


#: The strengths a budget chooses (a plan with ``budget`` leaves them at their defaults).
SOLVED_FIELDS = ("data_budget", "trainable", "sparsity", "weight_bits", "distill", "max_steps")


@dataclass(frozen=True)
class ThreeDPlan:
    """How much data, how many trainable parameters, weights, bits, teacher and gradient entries
    a fine-tune may use, and the phases in which the axes act (see the module docs).

    Args:
        data_budget: share of the training samples each epoch after the first trains on (from
            the first epoch with ``warmup=0``), in ``(0, 1]`` (1: the data axis is off).
        trainable: share of the parameters that keep training after the warm-up, in ``(0, 1]``
            (1: off).
        sparsity: share of the targeted linear weights (or heads and FFN neurons) pruned at
            ``prune_end``, in ``[0, 0.98]`` (0: off).
        weight_bits: ``4`` or ``8`` for integer weights at the end; ``None``: off.
        distill: weight ``alpha`` of distillation from ``teacher`` from the end of the warm-up,
            in ``[0, 1]`` (0: off).
        gradient_density: share of the gradient entries each rank sends in a multi-process run,
            in ``(0, 1]`` (1: dense communication); see :meth:`strategy`.
        quantization: a torchao QAT preset overriding ``weight_bits``' default
            (:data:`PRESET_FOR_BITS`), e.g. ``"int8_dynamic_act_int4_weight"``.
        group_size: input columns per weight scale of the int4 presets.
        prune_pattern: ``"unstructured"`` (magnitude, less sensitive tensors pruned harder) or
            ``"heads+neurons"`` (attention heads and FFN neurons, the same share in every
            block: removed physically at export, so the deployed model is faster).
        freeze: ``"uncompressed"``: the freezer never freezes a pruned tensor; ``"any"``: it
            may (pruned weights then cannot adapt to their masks).
        freeze_by: what the freezer freezes first: ``"fisher"`` (the least sensitive tensors,
            ``E[g^2]``) or ``"depth"`` (the lowest blocks: backward then stops below the lowest
            trainable tensor). Under LoRA a frozen adapter saves almost no work (its weight
            gradient is tiny, the base's input gradients are still needed below it), so
            ``"depth"`` is what makes the parameter axis save time there.
        temperature: distillation temperature ``T``.
        teacher: ``"snapshot"`` (the run's own model at the end of the warm-up), or a
            checkpoint or Hugging Face path of a model fine-tuned on the same labels.
        data_drops: which samples the data budget drops: ``"easiest_random"`` (a random part of
            the below-mean-loss samples, the kept ones weighted up: InfoBatch) or
            ``"hardest"`` (the highest-loss ones: quality filtering).
        data_anneal: share of the epochs at the end that train on all data again.
        group_by_length: batches of similar length (0: off): each epoch's order is cut into
            windows of this many batches, each sorted by token count
            (:func:`~lightning_3d.curriculum.group_by_length`), so a batch padded to its
            longest text computes little padding: the same samples and steps, each cheaper.
            Turns the data axis on (``CurriculumSampler(group_by_length=...)``) even with
            ``data_budget=1``, which then scores nothing before training.
        warmup: fraction of the run trained dense before the freezer freezes, the teacher
            snapshot is taken and pruning starts, in ``[0, 1)``; ``0``: a signal pass before
            the first step instead (see the module docs).
        probe_batches: with ``warmup=0``, batches of the signal pass that compute gradients.
        prune_end: fraction of the run's optimizer steps at which the sparsity target is reached.
        qat_start: fraction of the run at which fake quantization goes on (``>= prune_end``).
        quantize_at: ``"train"``: quantization-aware training from ``qat_start`` (torchao),
            converted at the end of fit; ``"export"``: training stays float and the export
            quantizes after training, so the run pays no fake-quantization time: 8 bits with
            ``onnx-int8`` (ONNX Runtime), 4 or 8 bits for causal LMs with
            :func:`~lightning_3d.generation.export_generator` (ONNX Runtime GenAI).
        max_steps: optimizer steps of the run when the plan shortens it (a budget's choice);
            pass ``Trainer(**plan.trainer_arguments())``. ``None``: the trainer's own length.
        prune_include: regex over parameter names of the weights to prune (unstructured) and
            that the freezer leaves trainable; default: every linear weight of the transformer
            blocks. ``"heads+neurons"`` prunes every head and FFN neuron of the blocks.
        adaptive: back off sparsity from validation feedback (:class:`SparsityBackoff`).
        monitor, mode: the validation metric that feedback reads, and whether higher (``"max"``)
            or lower (``"min"``) is better.
        margin: how far below its running best the metric may fall before sparsity backs off.
        backoff: each back-off multiplies the sparsity target by this factor, in ``(0, 1)``.
        vocabulary: ``"full"`` (off) or ``"train"``: before the first step the input embedding
            keeps only the rows of the tokens in the training data and the tokenizer's special
            tokens (:class:`~lightning_3d.callbacks.VocabularyTrimmer`); later unseen tokens
            read as the unknown token. Those rows get no gradient in training, so it costs no
            training and shrinks the ONNX exports (all-MiniLM-L6-v2 on Rotten Tomatoes: 13,671
            of 30,522 ids kept, 28% of the parameters removed). Refused for tied language-model
            heads and with quantization-aware training (torchao leaves the table fp32).
        unseen_tokens: with ``vocabulary="train"``, what a token the training data never had
            reads (``VocabularyTrimmer(unseen=...)``): ``"unknown"``, the unknown token's row;
            ``"nearest"``, the nearest kept row; ``"pretrained"``, its own pretrained row, held
            apart and never trained: the model computes what the untrimmed one would, the
            exports keep every row (no size saving; the training still saves the dropped
            rows' gradients and optimizer state).
        embedding_bits: with ``quantize_at="export"``, the bits of the token-embedding table in
            the ``onnx-int8`` export: ``None`` or 8, int8 as the other weights; 4, blocks of 32
            entries with one scale each (``lightning-3d export`` takes it from the plan; 5 bits
            an entry with the scales). What the budget solver prices. For a causal LM, 4 with
            ``weight_bits=8`` stores the ``genai-int8`` export's token table in int4 blocks
            (pair it with ``LoRASettings(base_quantization="int8", base_embedding_bits=4)``);
            ``None`` stores a tied table once in int8 blocks, read by both the embedding and
            the output layer (pair it with ``LoRASettings(base_quantization="int8")``).
        unseen_token_bits: with ``unseen_tokens="pretrained"`` and ``quantize_at="export"``,
            the bits of the rows held apart in the ``onnx-int8`` export (``None``: as
            ``embedding_bits``): e.g. ``embedding_bits=8, unseen_token_bits=4`` keeps the rows
            the run trained at 8 bits and stores the untrained ones, which the training data
            never read, at 4 (the export then has two tables, as the model trains).
        drop_blocks: decoder blocks removed before the first step, those of lowest block
            influence on the first training batches (:class:`~lightning_3d.callbacks.DepthPruner`,
            :mod:`lightning_3d.depth`): every step and the deployed model compute ``(L - k) / L``
            of the blocks' work; 0: off. The budget solver does not price it.
        seed: seeds the data order and random drops.
        budget: solve ``data_budget``, ``trainable``, ``sparsity``, ``weight_bits``,
            ``distill`` and ``max_steps`` for a :class:`PlanBudget` (:meth:`solve`;
            ``lightning-3d fit`` does it before training) instead of setting them.

    Example:
        >>> ThreeDPlan(sparsity=0.5, weight_bits=4, qat_start=0.2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: qat_start=0.2 is before prune_end=0.6: fake quantization ... mask update
    """

    data_budget: float = 1.0
    trainable: float = 1.0
    sparsity: float = 0.0
    weight_bits: int | None = None
    distill: float = 0.0
    gradient_density: float = 1.0
    quantization: str | None = None
    group_size: int = 32
    prune_pattern: str = "unstructured"
    freeze: str = "uncompressed"
    freeze_by: str = "fisher"
    temperature: float = 2.0
    teacher: str = "snapshot"
    data_drops: str = "easiest_random"
    data_anneal: float = 0.125
    group_by_length: int = 0
    warmup: float = 0.25
    probe_batches: int = 8
    prune_end: float = 0.6
    qat_start: float = 0.8
    quantize_at: str = "train"
    max_steps: int | None = None
    vocabulary: str = "full"
    unseen_tokens: str = "unknown"
    embedding_bits: int | None = None
    unseen_token_bits: int | None = None
    prune_include: str = DEFAULT_PRUNE_INCLUDE
    adaptive: bool = False
    monitor: str = "val/acc"
    mode: str = "max"
    margin: float = 0.01
    backoff: float = 0.5
    drop_blocks: int = 0
    seed: int = 0
    budget: PlanBudget | None = None
    #: The budget solver's choice, when the plan comes from :meth:`for_budget`.
    allocation: BudgetAllocation | None = field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("data_budget", "trainable", "gradient_density"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if isinstance(self.drop_blocks, bool) or not (
            isinstance(self.drop_blocks, int) and self.drop_blocks >= 0
        ):
            raise ValueError(f"drop_blocks must be an integer >= 0, got {self.drop_blocks!r}")
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
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of 2, got {self.group_size}")
        for name, value, allowed in (
            ("data_drops", self.data_drops, DATA_DROPS),
            ("prune_pattern", self.prune_pattern, PRUNE_PATTERNS),
            ("freeze", self.freeze, FREEZE_POLICIES),
            ("freeze_by", self.freeze_by, FREEZE_ORDERS),
            ("mode", self.mode, MODES),
            ("quantize_at", self.quantize_at, QUANTIZE_AT),
            ("vocabulary", self.vocabulary, VOCABULARIES),
            ("unseen_tokens", self.unseen_tokens, UNSEEN),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        for name in ("embedding_bits", "unseen_token_bits"):
            bits = getattr(self, name)
            if bits not in (None, 8, 4):
                raise ValueError(f"{name} must be 4, 8 or None, got {bits!r}")
            if bits is not None and self.quantize_at != "export":
                raise ValueError(
                    f"{name}={bits} sets the ONNX int8 export's table: it needs "
                    "quantize_at='export'"
                )
        if self.unseen_token_bits is not None and self.unseen_tokens != "pretrained":
            raise ValueError(
                f"unseen_token_bits={self.unseen_token_bits} sets the bits of the rows held "
                f"apart: it needs unseen_tokens='pretrained', got {self.unseen_tokens!r}"
            )
        if self.vocabulary == "full" and self.unseen_tokens != "unknown":
            raise ValueError(
                f"unseen_tokens={self.unseen_tokens!r} says what tokens a trimmed vocabulary "
                "dropped read: set vocabulary='train' too"
            )
        if self.vocabulary != "full" and self.trains_quantized:
            raise ValueError(
                f"vocabulary={self.vocabulary!r} with quantization-aware training: torchao "
                "quantizes plain embedding tables only, so the trimmed embedding would stay "
                "fp32; use quantize_at='export' (ONNX Runtime's int8 quantizes it)"
            )
        if self.quantize_at == "export" and self.quantization is not None:
            raise ValueError(
                "quantize_at='export' quantizes the trained float model in the export (ONNX "
                "Runtime): a QAT preset has no effect there, got "
                f"quantization={self.quantization!r}; leave it out or use quantize_at='train'"
            )
        unstructured = self.sparsity > 0 and self.prune_pattern == "unstructured"
        if self.freeze_by == "depth" and self.trainable < 1 and unstructured:
            raise ValueError(
                "freeze_by='depth' measures no gradient statistics, and unstructured pruning "
                "sets each layer's sparsity from them: use prune_pattern='heads+neurons' or "
                "freeze_by='fisher'"
            )
        check_group_by_length(self.group_by_length)
        if not 0.0 <= self.data_anneal < 1.0:
            raise ValueError(f"data_anneal must be in [0, 1), got {self.data_anneal}")
        if self.probe_batches < 1:
            raise ValueError(f"probe_batches must be >= 1, got {self.probe_batches}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.distill > 0 and self.teacher == "snapshot" and self.warmup == 0:
            raise ValueError(
                "distill with teacher='snapshot' copies the model at the end of the warm-up: "
                "set warmup > 0 (e.g. 0.25) or give a fine-tuned teacher"
            )
        if not 0.0 < self.prune_end <= 1.0 or not 0.0 <= self.qat_start < 1.0:
            raise ValueError(
                f"need prune_end in (0, 1] and qat_start in [0, 1), got prune_end="
                f"{self.prune_end}, qat_start={self.qat_start}"
            )
        if self.sparsity > 0 and self.prune_end <= self.warmup:
            raise ValueError(
                f"prune_end={self.prune_end} is not after warmup={self.warmup}: pruning ramps up "
                "between the two"
            )
        if self.sparsity > 0 and self.trains_quantized and self.qat_start < self.prune_end:
            raise ValueError(
                f"qat_start={self.qat_start} is before prune_end={self.prune_end}: fake "
                "quantization (and conversion) must come after the last mask update"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.budget is not None:
            defaults = {f: getattr(ThreeDPlan, f) for f in SOLVED_FIELDS}
            chosen = {f: getattr(self, f) for f in SOLVED_FIELDS if getattr(self, f) != defaults[f]}
            if chosen:
                raise ValueError(
                    f"the plan's budget chooses {', '.join(SOLVED_FIELDS)}; do not set them as "
                    f"well (got {', '.join(f'{k}={v}' for k, v in chosen.items())})"
                )
        if self.budget is not None and (self.adaptive or self.quantization is not None):
            raise ValueError(
                "a plan with a budget chooses sparsity and weight_bits itself: adaptive=True and "
                "quantization= need them set by hand (drop the budget or those settings)"
            )
        if self.adaptive and self.sparsity == 0:
            raise ValueError("adaptive=True backs off sparsity; set sparsity > 0")
        if self.margin < 0 or not 0.0 < self.backoff < 1.0:
            raise ValueError(
                f"need margin >= 0 and backoff in (0, 1), got margin={self.margin}, "
                f"backoff={self.backoff}"
            )

    @property
    def axes(self) -> tuple[str, ...]:
        """The axes this plan turns on, in :data:`STEP_ORDER` order (``"vocabulary"`` and
        ``"depth"``, which act once before training, first)."""
        on = {
            "vocabulary": self.vocabulary != "full",
            "depth": self.drop_blocks > 0,
            "data": self.data_budget < 1 or self.group_by_length > 0,
            "distillation": self.distill > 0,
            "parameters": self.trainable < 1,
            "pruning": self.sparsity > 0,
            "quantization": self.weight_bits is not None,
            "communication": self.gradient_density < 1,
        }
        return tuple(axis for axis, active in on.items() if active)

    @property
    def trains_quantized(self) -> bool:
        """Whether the run does quantization-aware training (``weight_bits`` with
        ``quantize_at="train"``).

        Example:
            >>> ThreeDPlan(weight_bits=8).trains_quantized
            True
            >>> ThreeDPlan(weight_bits=8, quantize_at="export").trains_quantized
            False
        """
        return self.weight_bits is not None and self.quantize_at == "train"

    @property
    def preset(self) -> str | None:
        """The torchao QAT preset of the quantization axis (``None`` when the run does no
        quantization-aware training)."""
        if not self.trains_quantized:
            return None
        return self.quantization or PRESET_FOR_BITS[self.weight_bits]

    def callbacks(self) -> list[Callback]:
        """The coordinator, then one callback per active axis, in :data:`STEP_ORDER` order.

        Their steps (the freezer's warm-up, the snapshot, the pruning window, the QAT start)
        are placed by the coordinator once the run's length is known.

        Example:
            >>> [type(c).__name__ for c in ThreeDPlan(trainable=0.2).callbacks()]
            ['PlanCoordinator', 'SensitivityFreezer']
        """
        from lightning_3d.callbacks import (
            CurriculumSampler,
            DepthPruner,
            Distiller,
            PlanCoordinator,
            ProgressivePruner,
            QATHook,
            SensitivityFreezer,
            VocabularyTrimmer,
        )

        if self.budget is not None:
            raise ValueError(
                "this plan has a budget: solve it first (plan.solve(module, ...); lightning-3d "
                "fit does it before training)"
            )
        signal_pass_first = self.warmup == 0
        callbacks: list[Callback] = []
        if "data" in self.axes:
            drops = self.data_budget < 1  # else the axis only groups batches by length
            callbacks.append(
                CurriculumSampler(
                    score="loss",
                    budget=self.data_budget,
                    budget_drops=self.data_drops,
                    rescale_loss=drops and self.data_drops == "easiest_random",
                    anneal=self.data_anneal if drops else 0.0,
                    warmup_epochs=0 if signal_pass_first and drops else 1,
                    prescore=signal_pass_first and drops,
                    seed=self.seed,
                    group_by_length=self.group_by_length,
                )
            )
        if "distillation" in self.axes:  # the coordinator sets the start
            teacher = Distiller(self.teacher, self.distill, self.temperature, start_step=1)
            callbacks.append(teacher)
        if "parameters" in self.axes:  # and the warm-up
            compressed = self.freeze == "uncompressed" and "pruning" in self.axes
            callbacks.append(
                SensitivityFreezer(
                    target_trainable=self.trainable,
                    metric=self.freeze_by,
                    warmup_steps=0,
                    exclude=self.prune_include if compressed else None,
                )
            )
        if "pruning" in self.axes:  # and the window
            unstructured = self.prune_pattern == "unstructured"
            callbacks.append(
                ProgressivePruner(
                    target_sparsity=self.sparsity,
                    pattern=self.prune_pattern,
                    score="magnitude",
                    layer_sparsity="sensitivity" if unstructured else "uniform",
                    include=self.prune_include if unstructured else None,  # units: + biases
                )
            )
        if self.trains_quantized:  # and the start
            callbacks.append(QATHook(self.preset, group_size=self.group_size))
        scheduled = [c for c in callbacks if not isinstance(c, CurriculumSampler)]
        trims = "vocabulary" in self.axes
        trimmer = [VocabularyTrimmer(unseen=self.unseen_tokens)] if trims else []
        shallower = [DepthPruner(self.drop_blocks)] if "depth" in self.axes else []
        return [PlanCoordinator(self, scheduled), *trimmer, *shallower, *callbacks]

    def trainer_arguments(self) -> dict[str, Any]:
        """``Trainer`` keyword arguments the plan needs: ``max_steps`` when it shortens the run.

        Example:
            >>> ThreeDPlan(max_steps=120).trainer_arguments()
            {'max_steps': 120}
        """
        return {} if self.max_steps is None else {"max_steps": self.max_steps}

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
                "the plan places its phases at fractions of the run; set "
                "Trainer(max_epochs=...) or max_steps so the run has a known length"
            )
        return math.floor(fraction * total_steps + 1e-9)  # 0.29 * 100 is 28.999...

    @classmethod
    def for_budget(
        cls,
        time: float,
        size: float | None = None,
        *,
        cost: CostModel | str | os.PathLike[str],
        reference_steps: int,
        epochs: int,
        compressible_share: float,
        curves: AccuracyCurves | str | os.PathLike[str] | None = None,
        candidates: Mapping[str, Sequence[Any]] | None = None,
        quantized_overhead: float = 0.0,
        head_share: float = 0.0,
        freezable: tuple[Sequence[float], Sequence[float]] | None = None,
        vocabulary_share: float = 0.0,
        embedding_share: float = 0.0,
        token_share: float = 1.0,
        **settings: Any,
    ) -> ThreeDPlan:
        """The plan whose axis strengths :func:`~lightning_3d.budget.solve_budget` picks for a
        budget: training time at most ``time`` times the reference run's (every axis off,
        ``reference_steps`` optimizer steps over ``epochs`` epochs) and, when given, an
        exported model of at most ``size`` of the fp32 dense bytes.

        Args:
            time, size: the budgets, as fractions of the reference run.
            cost: the step-cost model (:class:`~lightning_3d.budget.CostModel`), or the path of
                a calibration JSON (:meth:`CostModel.save`; measure one with
                :func:`~lightning_3d.budget.measure_cost_model`).
            reference_steps, epochs: the reference recipe.
            compressible_share: share of the parameters the pruner targets
                (:func:`compressible_share`).
            curves: accuracy against strength per axis (a path, or
                :class:`~lightning_3d.budget.AccuracyCurves`); default: the documented prior
                :data:`~lightning_3d.budget.DEFAULT_CURVES`.
            candidates: the strengths to try per axis (default: the solver's grid).
            quantized_overhead: what a quantized export adds beyond its weights, as a share of
                the fp32 bytes (graph, scales, float vectors; see
                :func:`~lightning_3d.budget.size_fraction`).
            head_share: share of the parameters in the task head, which the freezer keeps
                trainable (:func:`parameter_shares`); with ``freeze="uncompressed"`` the pruned
                share stays trainable too, so smaller ``trainable`` values are not tried.
            freezable: the shares of the tensors the freezer may freeze, all of them and those
                the pruner leaves alone (:func:`freezable_units`). Given, every ``trainable``
                is predicted at the share the freezer reaches with whole tensors
                (:func:`~lightning_3d.budget.reachable_trainable`), not at its nominal value.
            vocabulary_share: with ``vocabulary="train"``, the share of the parameters the
                trimmed vocabulary removes (:func:`~lightning_3d.vocabulary.removed_share`);
                every allocation's export is that much smaller (not with
                ``unseen_tokens="pretrained"``, whose exports keep every row). ``0``: priced
                untrimmed (an upper bound on the size).
            embedding_share: the token-embedding table's share of the parameters of the model
                as it trains (:func:`~lightning_3d.vocabulary.input_embedding_share`), priced at
                ``embedding_bits`` when the plan sets them (the rows held apart at
                ``unseen_token_bits``).
            token_share: with ``group_by_length``, the padded tokens a step computes as a share
                of random batches' (:func:`~lightning_3d.curriculum.token_share` of the
                training data's lengths, or a measured ratio of step periods through
                :meth:`~lightning_3d.budget.CostModel.token_share_of`): every allocation's
                steps are priced that much cheaper, so the same time buys more of them.
            settings: other :class:`ThreeDPlan` arguments (``prune_pattern`` defaults to
                ``"heads+neurons"``, the pattern that makes the export smaller).

        The chosen allocation is kept in ``plan.allocation`` (predicted seconds, size, reasons)
        and logged; a plan that shortens the run sets ``max_steps``.

        Example:
            >>> from lightning_3d.budget import CostModel
            >>> cost = CostModel(forward_s=0.1, backward_s=0.2, optimizer_s=0.05)
            >>> plan = ThreeDPlan.for_budget(0.6, 0.3, cost=cost, reference_steps=200, epochs=2,
            ...                              compressible_share=0.5)
            >>> plan.allocation.time_fraction <= 0.6 and plan.weight_bits is not None
            True
        """
        from lightning_3d.budget import DEFAULT_CURVES, AccuracyCurves, CostModel, solve_budget

        if not isinstance(cost, CostModel):
            cost = CostModel.load(cost)
        if curves is None:
            curves = DEFAULT_CURVES
        elif not isinstance(curves, AccuracyCurves):
            curves = AccuracyCurves.load(curves)
        settings.setdefault("prune_pattern", "heads+neurons")
        if token_share < 1 and not settings.get("group_by_length"):
            raise ValueError(
                f"token_share={token_share:.3g} prices batches grouped by length: set "
                "group_by_length too, or the run computes the padding it was not priced for"
            )
        warmup = settings.get("warmup", cls.warmup)
        qat_start = settings.get("qat_start", cls.qat_start)
        freezable_share = 1.0 - head_share
        keeps_pruned = settings.get("freeze", cls.freeze) == "uncompressed"
        allocation = solve_budget(
            time, size, cost, curves,
            reference_steps=reference_steps, epochs=epochs,
            compressible_share=compressible_share, prune_pattern=settings["prune_pattern"],
            candidates=_allowed(settings, candidates), warmup=warmup, qat_start=qat_start,
            quantized_overhead=quantized_overhead, freezable_share=freezable_share,
            quantize_at=settings.get("quantize_at", cls.quantize_at),
            freezable_share_pruned=(
                freezable_share - compressible_share if keeps_pruned else freezable_share
            ),
            freezable_units=None if freezable is None else freezable[0],
            freezable_units_pruned=(
                None if freezable is None else freezable[1] if keeps_pruned else freezable[0]
            ),
            vocabulary_share=vocabulary_share, embedding_share=embedding_share,
            embedding_bits=_entry_bits(settings.get("embedding_bits")),
            rows_held_apart=settings.get("unseen_tokens") == "pretrained",
            unseen_bits=_entry_bits(settings.get("unseen_token_bits")),
            token_share=token_share,
        )  # fmt: skip
        arguments = allocation.plan_arguments()
        steps = arguments.pop("steps_fraction")
        if steps < 1:
            settings["max_steps"] = max(1, round(steps * reference_steps))
        plan = cls(**arguments, **settings)
        object.__setattr__(plan, "allocation", allocation)
        log.debug("ThreeDPlan.for_budget: %s", allocation.reason)
        return plan

    def solve(
        self,
        module: torch.nn.Module,
        *,
        reference_steps: int,
        epochs: int,
        cost: CostModel | None = None,
        batch: Any = None,
        loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor] | None = None,
        vocabulary_share: float = 0.0,
        token_share: float = 1.0,
    ) -> ThreeDPlan:
        """The plan with this plan's :class:`PlanBudget` solved (:meth:`for_budget`), every
        other setting kept.

        Args:
            module: the model to train (its parameter names give the compressible share).
            reference_steps, epochs: the reference run (the trainer's own length).
            cost: the step-cost model; default: the budget's ``calibration`` file, else
                measured on ``batch`` with ``loss_fn(module, batch) -> loss``.
            vocabulary_share: see :meth:`for_budget` (``lightning-3d fit`` measures it on the
                training data when the plan trims the vocabulary).
            token_share: see :meth:`for_budget` (``lightning-3d fit`` measures it on the
                training data when the plan groups batches by length).
        """
        from lightning_3d.budget import CostModel, measure_cost_model

        if self.budget is None:
            return self
        budget = self.budget
        if cost is None and budget.calibration is not None:
            cost = CostModel.load(budget.calibration)
        if cost is None:
            if batch is None or loss_fn is None:
                raise ValueError(
                    "the plan's budget has no calibration file: pass a training batch and "
                    "loss_fn to measure the step-cost model on"
                )
            cost = measure_cost_model(module, batch, loss_fn)
        settings = {  # the user's own settings: the solver fills in the defaults it prefers
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.init
            and f.name not in (*SOLVED_FIELDS, "budget")
            and getattr(self, f.name) != f.default
        }
        compressible, head = parameter_shares(module, self.prune_include)
        return ThreeDPlan.for_budget(
            budget.time, budget.size,
            cost=cost, reference_steps=reference_steps, epochs=epochs,
            compressible_share=compressible, head_share=head, curves=budget.curves,
            quantized_overhead=budget.quantized_overhead,
            freezable=freezable_units(module, self.prune_include),
            vocabulary_share=vocabulary_share, token_share=token_share,
            embedding_share=input_embedding_share(getattr(module, "model", module)), **settings,
        )  # fmt: skip


def parameter_shares(
    model: torch.nn.Module, prune_include: str = DEFAULT_PRUNE_INCLUDE
) -> tuple[float, float]:
    """Shares of ``model``'s parameters whose names match ``prune_include`` (what the pruner
    targets) and the freezer's default head pattern (kept trainable), for
    :meth:`ThreeDPlan.for_budget`.

    Example:
        >>> net = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4)]),
        ...                            "classifier": torch.nn.Linear(4, 1)})
        >>> [round(share, 3) for share in parameter_shares(net)]  # 16 and 5 of 25
        [0.64, 0.2]
    """
    from lightning_3d.sensitivity import DEFAULT_HEAD

    pruned, head = re.compile(prune_include), re.compile(DEFAULT_HEAD)
    sizes = {name: p.numel() for name, p in model.named_parameters()}
    total = sum(sizes.values())
    if total == 0:
        raise ValueError("the model has no parameters")
    return (
        sum(n for name, n in sizes.items() if pruned.search(name)) / total,
        sum(n for name, n in sizes.items() if head.search(name)) / total,
    )


def freezable_units(
    model: torch.nn.Module, prune_include: str = DEFAULT_PRUNE_INCLUDE
) -> tuple[list[float], list[float]]:
    """The share of ``model``'s trainable parameters in each tensor the plan's freezer may freeze
    (every trainable tensor outside the freezer's default head pattern), and the same without
    the tensors ``prune_include`` matches (what it may freeze while it leaves pruned tensors
    trainable), for :meth:`ThreeDPlan.for_budget`. Shares are of the parameters that require
    gradients (the adapters and head under LoRA), as the freezer's ``target_trainable`` is.

    Example:
        >>> net = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.Linear(4, 4)]),
        ...                            "classifier": torch.nn.Linear(4, 1)})
        >>> freezable_units(net)  # the layer's weight (16 of 25) and bias (4); no head
        ([0.64, 0.16], [0.16])
    """
    from lightning_3d.sensitivity import DEFAULT_HEAD

    pruned, head = re.compile(prune_include), re.compile(DEFAULT_HEAD)
    sizes = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    total = sum(sizes.values())
    if total == 0:
        raise ValueError("the model has no trainable parameters")
    units = {name: n / total for name, n in sizes.items() if not head.search(name)}
    return list(units.values()), [u for name, u in units.items() if not pruned.search(name)]


def _entry_bits(bits: int | None) -> float | None:
    """Bits an entry of an exported token table stored at ``bits``, scales included (``None``
    stays ``None``: as the other weights)."""
    from lightning_3d.export import EMBEDDING_BLOCK

    if bits is None or bits == 8:
        return bits  # one scale for the whole table
    return bits + 32 / EMBEDDING_BLOCK


def _allowed(
    settings: Mapping[str, Any], candidates: Mapping[str, Sequence[Any]] | None
) -> dict[str, Sequence[Any]] | None:
    """The solver's grid less what the user's other settings rule out: distillation from a
    snapshot without a warm-up, pruning that cannot ramp after the warm-up, quantization-aware
    training that would start before pruning ends or with a trimmed vocabulary, 4-bit weights
    when the export quantizes."""
    allowed = dict(candidates or {})
    warmup = settings.get("warmup", ThreeDPlan.warmup)
    snapshot = settings.get("teacher", ThreeDPlan.teacher) == "snapshot"
    if warmup == 0 and snapshot:
        allowed["distill"] = [0.0]
    prune_end = settings.get("prune_end", ThreeDPlan.prune_end)
    if prune_end <= warmup:
        allowed["sparsity"] = [0.0]
    if settings.get("quantize_at", ThreeDPlan.quantize_at) == "export":
        bits = allowed.get("weight_bits", (None, 8))
        allowed["weight_bits"] = [b for b in bits if b in (None, 8)]
    elif settings.get("qat_start", ThreeDPlan.qat_start) < prune_end:
        allowed["weight_bits"] = [None]
    elif settings.get("vocabulary", ThreeDPlan.vocabulary) != "full":
        allowed["weight_bits"] = [None]  # QAT leaves a trimmed embedding in fp32
    return allowed or None


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


def check_axis_conflicts(axes: Mapping[str, Any], total_steps: int) -> None:
    """Raise when settings of two axes (callbacks by their ``axis`` name) cannot both hold in a
    run of ``total_steps`` optimizer steps: movement pruning of tensors the freezer may freeze,
    a pruning window that ends after the run, fake quantization that starts before the last
    mask update.

    Example:
        >>> class Pruner:
        ...     score, targets, window_end, target_sparsity = "magnitude", [], 120, 0.5
        >>> check_axis_conflicts({"pruning": Pruner()}, total_steps=100)
        Traceback (most recent call last):
        ...
        ValueError: PlanCoordinator: pruning ends at step 120 but the run has 100 optimizer ...
    """
    freezer: ParameterAxis | None = axes.get("parameters")
    pruner: PruningAxis | None = axes.get("pruning")
    qat: QuantizationAxis | None = axes.get("quantization")
    if pruner is not None:
        if freezer is not None and pruner.score == "movement":
            both = sorted(set(freezer.candidates) & set(pruner.targets))
            if both:
                raise ValueError(
                    f"PlanCoordinator: {both[0]!r} (and {len(both) - 1} more) may be frozen "
                    "by SensitivityFreezer and is scored by movement pruning, which needs its "
                    "gradients; exclude the pruned tensors from the freezer or prune by "
                    "magnitude"
                )
        if pruner.window_end > total_steps:
            after = " and QAT converts at the end of fit" if qat is not None else ""
            budget = " (the data budget shortens epochs)" if "data" in axes else ""
            raise ValueError(
                f"PlanCoordinator: pruning ends at step {pruner.window_end} but the run has "
                f"{total_steps} optimizer steps{budget}{after}; end the pruning window "
                "earlier"
            )
        if (
            qat is not None
            and qat.start_epoch is None
            and (pruner.target_sparsity > 0 and qat.start_step < pruner.window_end)
        ):
            raise ValueError(
                f"PlanCoordinator: fake quantization starts at step {qat.start_step}, before "
                f"the last mask update at step {pruner.window_end}; masks must be final "
                "before the quantization grid is trained (start QAT later or end pruning "
                "earlier)"
            )


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
