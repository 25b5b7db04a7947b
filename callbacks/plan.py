"""``PlanCoordinator``: where the axes of a :class:`~lightning_3d.plan.ThreeDPlan` meet.

Life cycle (``global_step`` counts optimizer steps): ``setup`` finds the axis callbacks and
checks their order, the strategy's gradient density and ``max_steps``; ``on_fit_start`` (before
the axes' own) turns the plan's phases into steps for the callbacks the plan built
(``scheduled``); ``on_train_start`` checks cross-axis conflicts
(:func:`~lightning_3d.plan.check_axis_conflicts`), runs the signal pass once per run
(:func:`~lightning_3d.plan.signal_pass`: scores for the data axis, gradient statistics for the
freezer and the pruner) and masks pruned weights' gradients in the backward pass;
``on_validation_end`` (``adaptive=True``) may lower the pruner's target
(:class:`~lightning_3d.plan.SparsityBackoff`); a plan from a budget logs its predicted and
measured training time.

Example:
    >>> from lightning_3d.plan import ThreeDPlan
    >>> coordinator, *axes = ThreeDPlan(trainable=0.1, sparsity=0.5).callbacks()
    >>> type(coordinator).__name__, [type(a).__name__ for a in axes]
    ('PlanCoordinator', ['SensitivityFreezer', 'ProgressivePruner'])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.hooks import RemovableHandle

from lightning_3d.loggers import log_axis_metrics
from lightning_3d.models import evaluation_mode
from lightning_3d.plan import (
    AXIS_CALLBACK_NAMES,
    AXIS_ORDER,
    STEP_ORDER,
    DataAxis,
    DistillationAxis,
    ParameterAxis,
    PruningAxis,
    QuantizationAxis,
    SparsityBackoff,
    ThreeDPlan,
    check_axis_conflicts,
    signal_pass,
)
from lightning_3d.sensitivity import find_gradient_statistics
from lightning_3d.tasks import total_training_steps

log = logging.getLogger(__name__)
MASK_UPDATES = 10  # mask updates over the plan's pruning window


class PlanCoordinator(Callback):
    """Run the axes of ``plan`` as one: shared signals, one timeline, checks, adaptive budgets.

    Args:
        plan: the budgets, timeline and adaptive settings.
        scheduled: the callbacks whose steps follow the plan's timeline (the distiller,
            freezer, pruner and QATHook :meth:`ThreeDPlan.callbacks` builds); other axis
            callbacks are only checked.

    Put it before the axis callbacks (:meth:`ThreeDPlan.callbacks` does). Metrics:
    ``plan/sparsity_target`` and ``plan/backoffs`` (adaptive mode), ``plan/signal_batches``,
    ``plan/predicted_train_s`` and ``plan/measured_train_s`` (a plan from a budget).

    Example:
        >>> PlanCoordinator(ThreeDPlan(sparsity=0.5, adaptive=True)).backoff.margin
        0.01
    """

    def __init__(self, plan: ThreeDPlan, scheduled: Sequence[Callback] = ()) -> None:
        self.plan = plan
        self.scheduled = list(scheduled)  # the pruner and QATHook whose steps the plan sets
        self.backoff = SparsityBackoff(plan.margin, plan.backoff, plan.mode)
        self.signals_measured = False
        self.total_steps = 0
        self.axes: dict[str, Any] = {}  # the axis callbacks by their ``axis`` name
        self._gradient_masks: list[RemovableHandle] = []
        self._warned_monitor = False
        self._started_at: float | None = None

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"signals_measured": self.signals_measured, "backoff": self.backoff.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.signals_measured = state_dict["signals_measured"]
        self.backoff.load_state_dict(state_dict["backoff"])

    # -- set-up -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        callbacks = list(trainer.callbacks)  # Lightning refuses two of one stateful kind
        positions: dict[str, int] = {}
        self.axes = {}
        for axis in AXIS_ORDER:
            found = [i for i, c in enumerate(callbacks) if getattr(c, "axis", None) == axis]
            if found:
                positions[axis] = found[0]
                self.axes[axis] = callbacks[found[0]]
        order = [positions[a] for a in AXIS_ORDER if a in positions]
        if order != sorted(order) or any(p < callbacks.index(self) for p in order):
            expected = ", ".join(["PlanCoordinator", *AXIS_CALLBACK_NAMES.values()])
            raise ValueError(
                "PlanCoordinator: the callbacks must follow the step order "
                f"({' -> '.join(STEP_ORDER)}): {expected}; got "
                f"{', '.join(type(c).__name__ for c in callbacks)}"
            )
        density = getattr(getattr(trainer.strategy, "comm_state", None), "compressor", None)
        density = getattr(density, "density", None)
        if density is not None and abs(density - self.plan.gradient_density) > 1e-12:
            raise ValueError(
                f"PlanCoordinator: the strategy compresses to density={density} but the plan "
                f"says gradient_density={self.plan.gradient_density}; build the strategy with "
                "plan.strategy() or set one value"
            )
        if density is None and self.plan.gradient_density < 1 and trainer.world_size > 1:
            rank_zero_warn(
                f"gradient_density={self.plan.gradient_density} applies to a compressed "
                "strategy (plan.strategy()); this run's strategy sends dense gradients"
            )
        if self.plan.max_steps is not None and trainer.max_steps != self.plan.max_steps:
            raise ValueError(
                f"PlanCoordinator: the plan trains max_steps={self.plan.max_steps} optimizer "
                f"steps but the trainer has max_steps={trainer.max_steps}; build it with "
                "Trainer(**plan.trainer_arguments(), ...)"
            )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Turn the plan's phases into steps, before the axes' ``on_fit_start`` (the same steps
        on resume: they depend only on the run's length)."""
        self.total_steps = total_training_steps(trainer)
        plan, end = self.plan, 0
        warm = plan.step_of(plan.warmup, self.total_steps)
        distiller, freezer = self._distiller(), self._freezer()
        pruner, qat = self._pruner(), self._quantizer()
        if distiller is not None and distiller in self.scheduled:
            snapshot = plan.teacher == "snapshot"
            distiller.start_step = max(1, warm) if snapshot else warm
        if freezer is not None and freezer in self.scheduled:
            freezer.warmup_steps = warm
        if pruner is not None and pruner in self.scheduled:
            end = max(warm + 1, plan.step_of(plan.prune_end, self.total_steps))
            pruner.set_window(warm, end, max(1, (end - warm) // MASK_UPDATES))
        if qat is not None and qat in self.scheduled:
            qat.start_step = max(end, plan.step_of(plan.qat_start, self.total_steps))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        check_axis_conflicts(self.axes, self.total_steps)
        self._started_at = time.perf_counter()
        if not self.signals_measured:
            self._measure_signals(trainer, pl_module)
            self.signals_measured = True
        self._mask_pruned_gradients(pl_module)
        allocation = self.plan.allocation
        if allocation is not None:
            log.info(
                "PlanCoordinator: budget allocation %s; predicted training time %.0f s (%.2f of "
                "the reference run): %s",
                allocation.strengths, allocation.time_s, allocation.time_fraction,
                allocation.reason,
            )  # fmt: skip
            log_axis_metrics(trainer, {"plan/predicted_train_s": allocation.time_s}, step=0)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plan.weight_bits is not None and not self.plan.trains_quantized:
            log.info(
                "PlanCoordinator: the plan quantizes at export: the trained model is float; "
                "export it to onnx-int8 (lightning-3d export --formats onnx-int8)"
            )
        allocation = self.plan.allocation
        if allocation is None or self._started_at is None:
            return
        measured = time.perf_counter() - self._started_at
        log.info(
            "PlanCoordinator: training took %.0f s, predicted %.0f s (measured / predicted = "
            "%.2f)", measured, allocation.time_s, measured / max(allocation.time_s, 1e-9),
        )  # fmt: skip
        log_axis_metrics(trainer, {"plan/measured_train_s": measured})

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for handle in self._gradient_masks:
            handle.remove()
        self._gradient_masks = []

    # -- the axes, by their public contracts (lightning_3d.plan) ---------------------------------
    def _curriculum(self) -> DataAxis | None:
        return self.axes.get("data")

    def _distiller(self) -> DistillationAxis | None:
        return self.axes.get("distillation")

    def _freezer(self) -> ParameterAxis | None:
        return self.axes.get("parameters")

    def _pruner(self) -> PruningAxis | None:
        return self.axes.get("pruning")

    def _quantizer(self) -> QuantizationAxis | None:
        return self.axes.get("quantization")

    # -- signals ------------------------------------------------------------------------------
    def _measure_signals(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The signal pass: every sample scored for the curriculum, gradient statistics for the
        freezer and the pruner, in eval mode (no dropout) and without optimizer steps."""
        curriculum = self._curriculum()
        scoring = curriculum is not None and curriculum.prescore
        freezer = self._freezer()
        if freezer is not None:  # it measures during its warm-up otherwise (by depth: never)
            before_step_one = freezer.warmup_steps == 0 and freezer.measures_gradients
        else:  # the pruner's per-layer sparsity: from the warm-up, or before step 1
            before_step_one = self.plan.warmup == 0
        statistics = find_gradient_statistics(trainer) if before_step_one else None
        if not scoring and statistics is None:
            return
        if not callable(getattr(pl_module, "score_batch", None)):
            raise ValueError(
                "PlanCoordinator's signal pass needs a `score_batch(batch)` method on the "
                "LightningModule returning per_sample_loss (and index) as training_step does; "
                "the built-in tasks have one"
            )
        if scoring:
            assert curriculum is not None
            batches = curriculum.scoring_batches(trainer, seed=self.plan.seed)
            record = curriculum.record_outputs
        else:
            loader = trainer.train_dataloader
            batches = (trainer.strategy.batch_to_device(b) for b in loader)
            record = None
        parameters = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        # A compressed strategy sends these probe gradients exactly and keeps their unsent part
        # out of its error-feedback residuals (they are measured, never applied).
        comm_state = getattr(trainer.strategy, "comm_state", None)
        probing = comm_state.probe() if hasattr(comm_state, "probe") else nullcontext()
        with evaluation_mode(pl_module), trainer.precision_plugin.forward_context(), probing:
            done = signal_pass(
                pl_module.score_batch, batches, parameters, statistics, self.plan.probe_batches,
                record,
            )  # fmt: skip
        if scoring:
            assert curriculum is not None
            curriculum.fold_scores()
        log.info(
            "PlanCoordinator: signal pass: %s%d batches with gradients",
            "every sample scored, " if scoring else "", done,
        )  # fmt: skip
        log_axis_metrics(trainer, {"plan/signal_batches": float(done)})

    def _mask_pruned_gradients(self, pl_module: LightningModule) -> None:
        """Zero the gradients of pruned weights as autograd produces them, before any gradient
        communication reads them (magnitude pruning only: movement scores need them)."""
        pruner = self._pruner()
        if pruner is None or pruner.score != "magnitude":
            return
        params = dict(pl_module.named_parameters())
        for name in pruner.targets:
            param = params[name]
            if param.requires_grad and not hasattr(param, "device_mesh"):  # FSDP2: see README
                self._gradient_masks.append(param.register_hook(_masker(pruner, name)))

    # -- adaptive budgets ---------------------------------------------------------------------
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pruner, qat = self._pruner(), self._quantizer()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not self.plan.adaptive or trainer.sanity_checking or not fitting:
            return
        step = trainer.global_step
        quantizing = qat is not None and qat.stage != "float"
        if pruner is None or quantizing or step >= self.total_steps:
            return  # masks are final once the quantization grid trains, or no step is left
        value = trainer.callback_metrics.get(self.plan.monitor)
        value = trainer.strategy.broadcast(None if value is None else float(value))  # rank 0's
        if value is None:
            if not self._warned_monitor:
                rank_zero_warn(
                    f"adaptive plan: monitor={self.plan.monitor!r} was not logged in validation "
                    f"(logged: {sorted(trainer.callback_metrics)}); sparsity stays as planned"
                )
                self._warned_monitor = True
            return
        new = self.backoff.observe(value, pruner.target_sparsity, step)
        if new is not None:
            decision = self.backoff.decisions[-1] if self.backoff.decisions else {}
            log.info(
                "PlanCoordinator: step %d: sparsity target %.3f -> %.3f: %s",
                step, pruner.target_sparsity, new, decision.get("reason", ""),
            )  # fmt: skip
            pruner.set_target(trainer, pl_module, new)
        metrics = {
            "plan/sparsity_target": pruner.target_sparsity,
            "plan/backoffs": float(len(self.backoff.decisions)),
        }
        log_axis_metrics(trainer, metrics, step=step)


def _masker(pruner: PruningAxis, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook: the gradient times the pruner's current mask of ``name``."""

    def mask(gradient: torch.Tensor) -> torch.Tensor:
        current = pruner.masks.get(name)
        return gradient if current is None else gradient * current

    return mask
