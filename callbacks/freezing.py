"""``SensitivityFreezer``: the parameter axis -- stop training what the loss cares least about.

Life cycle (``global_step`` counts optimizer steps): ``on_fit_start`` finds the candidates
(after ``configure_model``, LoRA and sharding) and, on resume, applies the checkpoint's frozen set
before the optimizer state loads; ``on_before_optimizer_step`` feeds the gradients to
:class:`~lightning_3d.sensitivity.GradientStatistics`; at ``warmup_steps`` (``on_train_start``
when 0) and every ``interval`` steps after it for ``stages`` events, the least sensitive units
freeze (:mod:`lightning_3d.freezing`): gradients dropped, optimizer state released, DDP rebuilt.

Example:
    >>> from lightning import Trainer
    >>> freezer = SensitivityFreezer(target_trainable=0.1, warmup_steps=20)
    >>> trainer = Trainer(callbacks=[freezer], max_steps=200)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_3d.checkpoints import (
    applies_callback_state_first,
    callback_state,
    keeps_callback_tensors_sharded,
)
from lightning_3d.freezing import (
    always_trainable,
    check_freezer_arguments,
    freeze_candidates,
    move_parameters,
    trainable_sizes,
    trainable_units,
)
from lightning_3d.loggers import log_axis_metrics, log_table_and_figure
from lightning_3d.sensitivity import (
    BASELINE_METRICS,
    DEFAULT_HEAD,
    DEFAULT_LAYER_PATTERN,
    GradientStatistics,
    apply_layerwise_lr,
    baseline_scores,
    compile_pattern,
    composite_scores,
    group_parameters,
    optimizer_state_bytes,
    parameter_drift,
    sensitivity_heatmap,
    stepped_parameters,
    trainable_fraction_at,
    unit_scores,
)
from lightning_3d.sharding import laid_out_like, shard_all_reduce, state_tensor

log = logging.getLogger(__name__)


class SensitivityFreezer(Callback):
    """Measure gradient sensitivity for a warm-up, then freeze the least sensitive tensors.

    Args:
        target_trainable: share of the initially trainable parameters (LoRA adapters and head,
            under LoRA) left trainable at the end, in ``(0, 1]``. The head counts toward it.
        metric: ``"fisher"`` (``E[g^2]``, default), ``"variance"``, ``"snr"`` (``mu^2/var``),
            ``"composite"`` (``||g||^2 + alpha*Fisher + beta*||theta-theta_0||^2``), or the
            baselines ``"random"`` and ``"depth"`` (the top of the network trains, everything
            below the first unit that does not fit freezes). All per parameter.
        warmup_steps: optimizer steps of measurement before the first freezing. ``0`` freezes
            before the first step: from statistics measured before training (a
            :class:`~lightning_3d.callbacks.PlanCoordinator`'s signal pass) for the gradient
            metrics, or at random / by depth for the baselines.
        schedule: ``"once"`` (freeze to the target at ``warmup_steps``) or ``"progressive"``
            (``stages`` events ``interval`` steps apart, the trainable share falling linearly).
        stages, interval: the progressive schedule.
        allow_unfreeze: at progressive events, frozen units may come back when their (last
            measured) sensitivity beats a trainable one; otherwise freezing only grows.
        granularity: statistics per ``"tensor"`` (default, O(tensors) memory), ``"row"`` or
            ``"element"`` (see :mod:`lightning_3d.sensitivity`).
        group_by: the units that freeze together: ``"tensor"``, ``"module"``, or a regex whose
            match names a unit (``r"layer\\.\\d+\\."``).
        include, exclude: regexes over parameter names: only names matching ``include`` (all by
            default) and not matching ``exclude`` may be frozen.
        head: regex of the task head, kept trainable unless ``freeze_head``; ``None``: no head.
        alpha, beta: weights of the composite metric.
        lr_decay: layer-wise learning-rate decay on what trains: layer ``i`` of ``L`` gets
            ``lr * lr_decay^(L - i)``, embeddings ``lr_decay^(L + 1)``, the head ``lr``.
        layer_pattern: regex with one group capturing the layer number in parameter names.
        measure_every: measure every n-th optimizer step (statistics cost a pass over the
            gradients).
        seed: seed of the ``random`` baseline.

    The statistics are public (``freezer.statistics``) so other callbacks read them instead of
    measuring again; :func:`~lightning_3d.sensitivity.find_gradient_statistics` finds them
    among a trainer's callbacks. Per-tensor statistics cover every trainable tensor (the
    pruner's per-layer sparsity reads them for tensors this freezer may not freeze), finer ones
    only the candidates.

    Example:
        >>> SensitivityFreezer(target_trainable=0.03, schedule="progressive").schedule
        'progressive'
    """

    #: The plan's name of this axis; ``PlanCoordinator`` finds the callback by it.
    axis = "parameters"

    def __init__(
        self,
        target_trainable: float = 0.1,
        metric: str = "fisher",
        warmup_steps: int = 50,
        schedule: str = "once",
        stages: int = 4,
        interval: int = 50,
        allow_unfreeze: bool = False,
        granularity: str = "tensor",
        group_by: str = "tensor",
        include: str | None = None,
        exclude: str | None = None,
        head: str | None = DEFAULT_HEAD,
        freeze_head: bool = False,
        alpha: float = 1.0,
        beta: float = 1.0,
        lr_decay: float | None = None,
        layer_pattern: str = DEFAULT_LAYER_PATTERN,
        measure_every: int = 1,
        seed: int = 0,
    ) -> None:
        check_freezer_arguments(
            target_trainable, metric, schedule, warmup_steps, stages, interval, measure_every,
            allow_unfreeze, alpha, beta, lr_decay, group_by, layer_pattern,
        )  # fmt: skip
        self.include = compile_pattern("include", include)
        self.exclude = compile_pattern("exclude", exclude)
        self.head = compile_pattern("head", head)
        self.target_trainable = target_trainable
        self.metric = metric
        self.warmup_steps = warmup_steps
        self.schedule = schedule
        self.stages = stages if schedule == "progressive" else 1
        self.interval = interval
        self.allow_unfreeze = allow_unfreeze
        self.group_by = group_by
        self.freeze_head = freeze_head
        self.alpha, self.beta = alpha, beta
        self.lr_decay = lr_decay
        self.layer_pattern = layer_pattern
        self.measure_every = measure_every
        self.seed = seed
        self.statistics = GradientStatistics(granularity)
        self.frozen: set[str] = set()
        self.events_done = 0
        self._sizes: dict[str, int] = {}  # initially trainable parameters, in model order
        self._candidates: list[str] = []
        self._home: dict[str, tuple[int, int]] = {}  # (optimizer, group) of a frozen parameter
        self._reference: dict[str, torch.Tensor] = {}
        self._last_measured = -1
        self._keep_sharded = False  # checkpoint theta_0 as DTensor shards (the strategy says)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "statistics": self.statistics.state_dict(),
            "frozen": sorted(self.frozen),
            "events_done": self.events_done,
            "home": dict(self._home),
            "reference": {
                n: state_tensor(t, self._keep_sharded) for n, t in self._reference.items()
            },
            "sizes": dict(self._sizes),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.statistics.load_state_dict(state_dict["statistics"])
        self.frozen = set(state_dict["frozen"])
        self.events_done = state_dict["events_done"]
        self._home = {n: tuple(place) for n, place in state_dict["home"].items()}
        self._reference = dict(state_dict["reference"])
        self._sizes = dict(state_dict["sizes"])

    # -- set-up -------------------------------------------------------------------------------
    @property
    def trainable_fraction(self) -> float:
        """Share of the initially trainable parameters that still train."""
        total = sum(self._sizes.values())
        frozen = sum(self._sizes[n] for n in self.frozen)
        return (total - frozen) / total if total else 1.0

    @property
    def candidates(self) -> tuple[str, ...]:
        """The parameters this freezer may freeze (known from ``on_fit_start``)."""
        return tuple(self._candidates)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        first = applies_callback_state_first(strategy)
        if stage == "fit" and strategy.restore_checkpoint_after_setup and not first:
            rank_zero_warn(
                f"SensitivityFreezer: {type(strategy).__name__} loads the optimizer state "
                "before the callbacks' states, so a resumed run cannot shape the optimizer's "
                "groups by the frozen set first; to resume under FSDP2 use "
                "lightning_3d.strategies.CompressedFSDPStrategy (compress=False for plain "
                "FSDP2), which restores the frozen set before it loads"
            )

    def on_before_strategy_load(self, trainer: Trainer, checkpoint_path: Any) -> None:
        """Apply the checkpoint's frozen set before the strategy loads the optimizer state,
        whose groups it shapes (strategies that restore after ``on_fit_start`` call this).
        Only when fitting: testing or predicting from a checkpoint has no optimizer to shape."""
        if trainer.state.fn != TrainerFn.FITTING:
            return
        state = callback_state(checkpoint_path, self.state_key)
        if state is not None:  # None: the checkpoint was made without this callback
            self.load_state_dict(state)
        if self.frozen:
            self._apply(trainer, trainer.lightning_module, freeze=self.frozen, unfreeze=set())

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the candidates (after ``configure_model``, LoRA and sharding), check the budget,
        apply layer-wise learning rates and, on resume, the checkpoint's frozen set."""
        self._keep_sharded = keeps_callback_tensors_sharded(trainer.strategy)
        params = dict(pl_module.named_parameters())
        self._sizes = trainable_sizes(params, self._sizes)
        head = None if self.freeze_head else self.head
        self._candidates = freeze_candidates(
            self._sizes, head, self.include, self.exclude, self.target_trainable
        )
        self.statistics.all_reduce = shard_all_reduce(params.values())
        if self.statistics.all_reduce is not None and self.statistics.granularity != "tensor":
            raise ValueError(
                f"granularity={self.statistics.granularity!r} keeps per-shard statistics that a "
                "sharded checkpoint cannot hold; use granularity='tensor' with FSDP2"
            )
        if self.metric == "composite" and self.beta > 0 and self.events_done < self.stages:
            for name in self._candidates:
                self._reference.setdefault(name, params[name].detach().clone())
        if self.lr_decay is not None:
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            apply_layerwise_lr(
                params, trainer.optimizers, schedulers, self.lr_decay, self.layer_pattern
            )
        if self.frozen:
            self._apply(trainer, pl_module, freeze=self.frozen, unfreeze=set())

    @property
    def measures_gradients(self) -> bool:
        """Whether the freezing order reads gradient statistics (not for the baselines)."""
        return self.metric not in BASELINE_METRICS

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.warmup_steps == 0 and self.events_done == 0:  # freeze before step 1
            if self.measures_gradients and not self.statistics.names:
                raise ValueError(
                    f"SensitivityFreezer: warmup_steps=0 with metric={self.metric!r} needs "
                    "gradient statistics measured before training (put a PlanCoordinator before "
                    "this callback, or use ThreeDPlan); otherwise set warmup_steps >= 1"
                )
            self._freezing_event(trainer, pl_module)

    # -- measuring ----------------------------------------------------------------------------
    def _last_event_step(self) -> int:
        return self.warmup_steps + (self.stages - 1) * self.interval

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if (
            not self.measures_gradients
            or step == self._last_measured
            or step >= self._last_event_step()
            or step % self.measure_every
        ):
            return
        self._last_measured = step
        # per-tensor statistics are cheap: keep them for every trainable tensor, the signal the
        # pruner's per-layer sparsity shares; finer ones only for what this freezer may freeze
        shared = self.statistics.granularity == "tensor"
        watched = set(self._sizes if shared else self._candidates) - self.frozen
        params = stepped_parameters(pl_module.named_parameters(), optimizer, watched)
        self.statistics.update({n: p.grad for n, p in params.items()})

    # -- freezing -----------------------------------------------------------------------------
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        next_event = self.warmup_steps + self.events_done * self.interval
        if self.events_done < self.stages and trainer.global_step >= next_event:
            self._freezing_event(trainer, pl_module)
        pl_module.log("freezer/trainable_fraction", self.trainable_fraction, rank_zero_only=True)

    def tensor_scores(self, pl_module: LightningModule) -> dict[str, float]:
        """Sensitivity per parameter of every candidate (baselines: per unit, see below)."""
        if self.metric == "composite":
            drift = self._drift(pl_module)
            return composite_scores(self.statistics, drift, self._sizes, self.alpha, self.beta)
        return self.statistics.tensor_metric(self.metric)

    def _drift(self, pl_module: LightningModule) -> dict[str, float]:
        """``||theta - theta_0||^2`` per candidate (summed over shards)."""
        params = dict(pl_module.named_parameters())
        for name, reference in self._reference.items():  # a checkpoint's copies: lay them out
            param = params[name]
            sharded = hasattr(param, "device_mesh")
            if sharded != hasattr(reference, "device_mesh") or reference.device != param.device:
                self._reference[name] = laid_out_like(reference, param)
        return parameter_drift(params, self._reference, self.statistics.all_reduce)

    def _freezing_event(self, trainer: Trainer, pl_module: LightningModule) -> None:
        units = group_parameters(self._candidates, self.group_by)
        if not self.measures_gradients:
            scores = baseline_scores(self.metric, list(units), self.seed)
        else:
            per_tensor = self.tensor_scores(pl_module)
            missing = [n for n in self._candidates if n not in per_tensor]
            if missing:
                raise RuntimeError(
                    f"SensitivityFreezer: no gradient was measured for {missing[:3]} before "
                    f"step {trainer.global_step}; exclude parameters that get no gradient"
                )
            scores = unit_scores(units, per_tensor, self._sizes)
        fraction = trainable_fraction_at(self.events_done + 1, self.stages, self.target_trainable)
        budget = int(fraction * sum(self._sizes.values())) - always_trainable(
            self._sizes, self._candidates
        )
        kept = trainable_units(
            units, scores, self._sizes, self.frozen, budget, self.allow_unfreeze,
            by_depth=self.metric == "depth",
        )  # fmt: skip
        kept = trainer.strategy.broadcast(kept)  # one decision for every rank
        kept_names = {n for u in kept for n in units[u]}
        freeze = set(self._candidates) - kept_names - self.frozen
        unfreeze = self.frozen & kept_names
        self._apply(trainer, pl_module, freeze, unfreeze)
        self.events_done += 1
        if self.events_done == self.stages:
            self._reference = {}  # theta_0 served the last event
        log.info(
            "SensitivityFreezer: step %d, event %d/%d: froze %d and unfroze %d tensors; "
            "%.2f%% of the parameters train",
            trainer.global_step, self.events_done, self.stages, len(freeze), len(unfreeze),
            100 * self.trainable_fraction,
        )  # fmt: skip
        self._log_event(trainer, scores, units)

    def _apply(
        self, trainer: Trainer, pl_module: LightningModule, freeze: set[str], unfreeze: set[str]
    ) -> None:
        """Freeze and unfreeze parameters, keep the optimizers' groups and state in step."""
        freeze, unfreeze = sorted(freeze), sorted(unfreeze)  # the same order on every rank
        params = dict(pl_module.named_parameters())
        released = move_parameters(trainer.optimizers, params, freeze, unfreeze, self._home)
        self.frozen = (self.frozen | set(freeze)) - set(unfreeze)
        if released:
            log.info("SensitivityFreezer: released %.1f MiB of optimizer state", released / 2**20)
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel) and (freeze or unfreeze):
            # DDP fixes its buckets at construction: rebuild it so frozen tensors leave them.
            # A compressed hook's residuals belong to the old buckets: they restart at zero.
            residuals = getattr(getattr(strategy, "comm_state", None), "residuals", None)
            if residuals is not None:
                residuals.clear()
            strategy.model = strategy.model.module
            strategy.configure_ddp()

    # -- logging ------------------------------------------------------------------------------
    def _log_event(
        self, trainer: Trainer, scores: dict[str, float], units: dict[str, list[str]]
    ) -> None:
        state_mb = sum(optimizer_state_bytes(o) for o in trainer.optimizers) / 2**20
        metrics = {
            "freezer/trainable_fraction": self.trainable_fraction,
            "freezer/optimizer_state_mb": state_mb,
        }
        log_axis_metrics(trainer, metrics)
        rows = [
            (unit, sum(self._sizes[n] for n in members), scores[unit],
             not self.frozen.intersection(members))
            for unit, members in units.items()
        ]  # fmt: skip
        log_table_and_figure(
            trainer,
            "freezer/sensitivity",
            ("unit", "numel", "score", "trainable"),
            rows,
            "freezer/heatmap",
            lambda: sensitivity_heatmap(scores, self.layer_pattern),
        )
