"""``ProgressivePruner``: the model axis -- prune gradually to a target sparsity while training.

Life cycle (``global_step`` counts optimizer steps): ``on_fit_start`` finds the targets
(after ``configure_model``, LoRA and sharding) and refuses arguments that cannot fit the model;
``on_before_optimizer_step`` accumulates movement scores and zeroes pruned weights' gradients;
``on_train_batch_end`` multiplies the weights by their masks and, when the schedule's sparsity
rises, recomputes the masks (:mod:`lightning_3d.pruning`) on rank 0's data for every rank and
zeroes the optimizer state of newly pruned weights. :meth:`ProgressivePruner.export` makes
structured pruning physically smaller.

Example:
    >>> from lightning import Trainer
    >>> pruner = ProgressivePruner(target_sparsity=0.5, end_step=200)
    >>> trainer = Trainer(callbacks=[pruner], max_steps=300)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_3d.checkpoints import keeps_callback_tensors_sharded
from lightning_3d.loggers import log_axis_metrics, log_histogram
from lightning_3d.models import refuse_four_bit
from lightning_3d.pruning import (
    DEFAULT_EXCLUDE,
    MAX_TENSOR_SPARSITY,
    StructureGroup,
    check_pruner_arguments,
    export_pruned,
    find_targets,
    layer_sparsities,
    mask_optimizer_state,
    mask_sparsity,
    next_masks,
    sensitivity_allocation,
    sparsity_at,
)
from lightning_3d.sensitivity import (
    DEFAULT_LAYER_PATTERN,
    GradientStatistics,
    compile_pattern,
    find_gradient_statistics,
    local_part,
    stepped_parameters,
)
from lightning_3d.sharding import (
    all_finite,
    broadcast_masks,
    full_copy,
    laid_out_as,
    laid_out_like,
    shard_all_reduce,
    state_tensor,
)
from lightning_3d.tasks import total_training_steps

log = logging.getLogger(__name__)
HISTOGRAM_VALUES = 1 << 20  # a strided sample of at most this many scores per histogram


class ProgressivePruner(Callback):
    """Prune gradually to ``target_sparsity`` along a schedule and keep pruned weights at zero.

    Args:
        target_sparsity: share of the targeted weights (or heads/neurons/rows) pruned at
            ``end_step``, in ``[0, 1)``; ``None`` with ``N:M`` means ``1 - N/M``.
        pattern: ``"unstructured"``, ``"N:M"`` (e.g. ``"2:4"``: at most N non-zeros in every M
            consecutive weights of a row), ``"rows"`` (output rows of each weight),
            ``"heads"``, ``"neurons"`` or ``"heads+neurons"`` (BERT-family attention heads,
            BERT/Llama-family FFN neurons; the same share in every block).
        score: ``"magnitude"`` (``|theta|``) or ``"movement"`` (``-sum_t theta_t * g_t``, Sanh et
            al. 2020; needs trainable targets).
        schedule: ``"cubic"`` (Zhu and Gupta 2017), ``"linear"``, ``"exponential"``, ``"cosine"``
            (formulas in :mod:`lightning_3d.pruning`).
        start_step, end_step: the pruning window in optimizer steps; ``end_step=None`` ends it
            at 75% of the run (a ``CurriculumSampler``'s planned steps when there is one, else
            ``trainer.estimated_stepping_batches``), leaving the rest to recover.
        frequency: steps between mask updates.
        initial_sparsity: the schedule's value at ``start_step``.
        scope: unstructured only: ``"layer"`` (each tensor to the same sparsity) or
            ``"global"`` (one score threshold over all targets).
        layer_sparsity: unstructured per-layer only: ``"uniform"``, or ``"sensitivity"``
            (less sensitive tensors pruned harder, from Fisher ``E[g^2]`` times ``mean(theta^2)``
            of the freezer's gradient statistics when a ``SensitivityFreezer`` runs, else
            measured here before the first update; see
            :func:`~lightning_3d.pruning.allocate_sparsity`).
        sensitivity_power: exponent of that allocation (0: uniform).
        include, exclude: regexes over parameter names; by default every linear weight except
            the task head and LoRA adapters. For structures, a unit is pruned when all its
            tensors pass.
        layer_pattern: regex with one group capturing the layer number, for per-layer logs.
        log_histograms: log a histogram of the scores at every mask update (W&B, TensorBoard).

    Example:
        >>> ProgressivePruner(pattern="2:4").target_sparsity
        0.5
    """

    #: The plan's name of this axis; ``PlanCoordinator`` finds the callback by it.
    axis = "pruning"

    def __init__(
        self,
        target_sparsity: float | None = 0.5,
        pattern: str = "unstructured",
        score: str = "magnitude",
        schedule: str = "cubic",
        start_step: int = 0,
        end_step: int | None = None,
        frequency: int = 10,
        initial_sparsity: float = 0.0,
        scope: str = "layer",
        layer_sparsity: str = "uniform",
        sensitivity_power: float = 0.5,
        include: str | None = None,
        exclude: str | None = DEFAULT_EXCLUDE,
        layer_pattern: str = DEFAULT_LAYER_PATTERN,
        log_histograms: bool = True,
    ) -> None:
        self.kind, self.n_m, target_sparsity = check_pruner_arguments(
            target_sparsity, pattern, score, schedule, start_step, end_step, frequency,
            initial_sparsity, scope, layer_sparsity, sensitivity_power,
        )  # fmt: skip
        self.include = compile_pattern("include", include)
        self.exclude = compile_pattern("exclude", exclude)
        compile_pattern("layer_pattern", layer_pattern, groups=1)
        self.layer_pattern = layer_pattern
        self.pattern = pattern
        self.target_sparsity = target_sparsity
        self.score = score
        self.schedule = schedule
        self.start_step = start_step
        self.end_step = end_step
        self.frequency = frequency
        self.initial_sparsity = initial_sparsity
        self.scope = scope
        self.layer_sparsity = layer_sparsity
        self.sensitivity_power = sensitivity_power
        self.log_histograms = log_histograms
        self.masks: dict[str, torch.Tensor] = {}  # laid out like the parameters
        self.movement: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0  # the schedule's value at the last mask update
        self.achieved_sparsity = 0.0  # the share of the targeted weights pruned
        self.layer_targets: dict[str, float] = {}  # final sparsity per tensor (sensitivity)
        self.statistics: GradientStatistics | None = None  # own measurement, without a freezer
        self.groups: list[StructureGroup] = []
        self.targets: list[str] = []  # every tensor a mask covers, in model order
        self._end = end_step or 0
        self._pending: dict[str, Any] = {}  # checkpoint tensors to lay out at on_train_start
        self._keep_sharded = False  # checkpoint masks as DTensor shards (the strategy says)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: state_tensor(m, self._keep_sharded) for n, m in self.masks.items()},
            "movement": {n: state_tensor(s, self._keep_sharded) for n, s in self.movement.items()},
            "sparsity": self.sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "layer_targets": dict(self.layer_targets),
            "end_step": self._end,
            "target_sparsity": self.target_sparsity,
            "statistics": None if self.statistics is None else self.statistics.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = {"masks": state_dict["masks"], "movement": state_dict["movement"]}
        self.sparsity = state_dict["sparsity"]
        self.achieved_sparsity = state_dict["achieved_sparsity"]
        self.layer_targets = dict(state_dict["layer_targets"])
        self._end = state_dict["end_step"]
        self.target_sparsity = state_dict.get("target_sparsity", self.target_sparsity)
        if state_dict["statistics"] is not None:
            self.statistics = GradientStatistics()
            self.statistics.load_state_dict(state_dict["statistics"])

    # -- the window ---------------------------------------------------------------------------
    @property
    def window_end(self) -> int:
        """The optimizer step at which the schedule reaches ``target_sparsity`` (``end_step``,
        or the default 75% of the run once ``on_fit_start`` has resolved it)."""
        return self._end

    def set_window(self, start_step: int, end_step: int, frequency: int) -> None:
        """Place the pruning window: mask updates every ``frequency`` optimizer steps from
        ``start_step`` until ``end_step`` (what a coordinator does before the first step).

        Example:
            >>> pruner = ProgressivePruner(0.5)
            >>> pruner.set_window(10, 60, 5); pruner.window_end
            60
        """
        if start_step < 0 or frequency < 1 or end_step <= start_step:
            raise ValueError(
                "need start_step >= 0, frequency >= 1 and end_step > start_step; got "
                f"start_step={start_step}, end_step={end_step}, frequency={frequency}"
            )
        self.start_step, self.end_step, self.frequency = start_step, end_step, frequency
        self._end = end_step

    # -- set-up -------------------------------------------------------------------------------
    def _selected(self, name: str) -> bool:
        return (self.include is None or bool(self.include.search(name))) and (
            self.exclude is None or not self.exclude.search(name)
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Find the targets and check that the arguments fit the model."""
        self._keep_sharded = keeps_callback_tensors_sharded(trainer.strategy)
        params = dict(pl_module.named_parameters())
        self.targets, self.groups = find_targets(
            pl_module, self.pattern, self._selected, self.include, self.exclude
        )
        refuse_four_bit(pl_module, self.targets, "ProgressivePruner", "masks need float weights")
        if self.score == "movement":
            frozen = [n for n in self.targets if not params[n].requires_grad]
            if frozen:
                raise ValueError(
                    f"ProgressivePruner: score='movement' needs gradients, but {frozen[0]} (and "
                    f"{len(frozen) - 1} more) do not train; use score='magnitude' or exclude them"
                )
            if not self.movement:
                self.movement = {
                    n: torch.zeros_like(params[n], dtype=torch.float32) for n in self.targets
                }
        if not self._end:
            self._end = max(self.start_step + 1, int(0.75 * total_training_steps(trainer)))
        shared = find_gradient_statistics(trainer, exclude=self)
        if self.layer_sparsity == "sensitivity" and self.statistics is None and shared is None:
            self.statistics = GradientStatistics()
        if self.statistics is not None:
            self.statistics.all_reduce = shard_all_reduce(params.values())

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Lay out a checkpoint's masks and scores like the parameters, then prune to the
        schedule's value (``start_step=0`` with ``initial_sparsity > 0`` prunes before step 1)."""
        params = dict(pl_module.named_parameters())
        pending, self._pending = self._pending, {}
        self.masks.update(laid_out_as(pending.get("masks", {}), params, torch.bool))
        self.movement.update(laid_out_as(pending.get("movement", {}), params, torch.float32))
        self._apply_masks(pl_module)
        self._update_if_due(trainer, pl_module)

    # -- every step ---------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = stepped_parameters(pl_module.named_parameters(), optimizer, set(self.targets))
        pruning = trainer.global_step < self._end
        with torch.no_grad():
            if self.statistics is not None and pruning and not self.layer_targets:
                self.statistics.update({n: p.grad for n, p in params.items()})
            moving = self.movement and pruning and all_finite([p.grad for p in params.values()])
            for name, param in params.items():
                if moving:  # skipped when an fp16 overflow made the gradients inf/NaN
                    self.movement[name].sub_(param.detach().float() * param.grad.float())
                if name in self.masks:
                    param.grad.mul_(self.masks[name])

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._apply_masks(pl_module)
        self._update_if_due(trainer, pl_module)
        pl_module.log("pruner/sparsity", self.achieved_sparsity, rank_zero_only=True)

    def _apply_masks(self, pl_module: LightningModule) -> None:
        with torch.no_grad():
            for name, param in pl_module.named_parameters():
                mask = self.masks.get(name)
                if mask is not None:
                    local_part(param).mul_(local_part(mask))

    # -- mask updates -------------------------------------------------------------------------
    def sparsity_at(self, step: int) -> float:
        """The schedule's target sparsity after ``step`` optimizer steps."""
        return sparsity_at(
            step,
            start=self.start_step,
            end=self._end,
            final=self.target_sparsity,
            initial=self.initial_sparsity,
            schedule=self.schedule,
            frequency=self.frequency,
        )

    def _update_if_due(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = self.sparsity_at(trainer.global_step)
        if target <= self.sparsity + 1e-12:
            return
        self._update_masks(trainer, pl_module, target)

    def _scores(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Whole score tensors of the targets (a collective under FSDP2)."""
        if self.score == "movement":
            return {n: full_copy(self.movement[n]) for n in self.targets}
        return {n: full_copy(params[n]).abs() for n in self.targets}

    def set_target(self, trainer: Trainer, pl_module: LightningModule, target: float) -> None:
        """Change the final sparsity mid-run (a plan's adaptive mode backs off with it). When
        the schedule's new value is below the masks' sparsity, masks are recomputed from the
        scores without the "only grow" rule: pruned weights come back, at zero, and train again
        (with magnitude scores every pruned weight scores 0, so which ones come back follows
        the index order of the ties).

        Example:
            >>> pruner.set_target(trainer, task, 0.25)  # doctest: +SKIP
        """
        if self.n_m is not None:
            raise ValueError(f"pattern={self.pattern!r} fixes the sparsity; it cannot change")
        limit = MAX_TENSOR_SPARSITY if self.layer_targets else 1.0
        if not 0.0 <= target < limit:
            raise ValueError(f"target must be in [0, {limit}), got {target}")
        if self.layer_targets and self.target_sparsity > 0:
            share = target / self.target_sparsity
            self.layer_targets = {n: s * share for n, s in self.layer_targets.items()}
        self.target_sparsity = target
        self.initial_sparsity = min(self.initial_sparsity, target)
        value = self.sparsity_at(trainer.global_step)
        if value < self.sparsity - 1e-12:
            self._update_masks(trainer, pl_module, value, regrow=True)

    def _update_masks(
        self, trainer: Trainer, pl_module: LightningModule, target: float, regrow: bool = False
    ) -> None:
        params = dict(pl_module.named_parameters())
        scores = self._scores(params)
        current = {} if regrow else {n: full_copy(m) for n, m in self.masks.items()}
        sparsity: float | dict[str, float] = target
        if self.layer_sparsity == "sensitivity":
            if not self.layer_targets:
                self.layer_targets = self._allocate(trainer, params)
            share = target / self.target_sparsity if self.target_sparsity else 0.0
            sparsity = {n: s * share for n, s in self.layer_targets.items()}
        masks = next_masks(self.pattern, scores, sparsity, self.scope, current, self.groups)
        if not any(hasattr(params[n], "device_mesh") for n in masks):
            # every rank takes rank 0's masks
            masks = broadcast_masks(masks, trainer.strategy.root_device)
        for name, mask in masks.items():  # sharded: rank 0's whole mask is scattered
            self.masks[name] = laid_out_like(mask, params[name], torch.bool)
        for optimizer in trainer.optimizers:
            mask_optimizer_state(optimizer, [(params[n], m) for n, m in self.masks.items()])
        self._apply_masks(pl_module)
        self.sparsity = target
        self.achieved_sparsity = achieved = mask_sparsity(masks)
        log.info(
            "ProgressivePruner: step %d: %.2f%% of the targeted weights pruned (schedule %.2f%%)",
            trainer.global_step, 100 * achieved, 100 * target,
        )  # fmt: skip
        self._log_update(trainer, masks, scores, achieved)

    def _allocate(self, trainer: Trainer, params: dict[str, torch.Tensor]) -> dict[str, float]:
        """Final sparsity per target from Fisher x mean(theta^2) (see ``layer_sparsity``)."""
        statistics = self.statistics or find_gradient_statistics(trainer, exclude=self)
        fisher = statistics.tensor_metric("fisher") if statistics is not None else {}
        missing = [n for n in self.targets if n not in fisher]
        if missing:
            raise RuntimeError(
                f"ProgressivePruner: layer_sparsity='sensitivity' has no gradient statistics "
                f"for {missing[:3]} at step {trainer.global_step}; start pruning later "
                "(start_step) or exclude tensors that get no gradient"
            )
        all_reduce = statistics.all_reduce if statistics is not None else None
        allocation = sensitivity_allocation(
            {n: params[n] for n in self.targets},
            fisher,
            self.target_sparsity,
            self.sensitivity_power,
            MAX_TENSOR_SPARSITY,
            all_reduce,
        )
        return trainer.strategy.broadcast(allocation)

    # -- logging ------------------------------------------------------------------------------
    def _log_update(
        self,
        trainer: Trainer,
        masks: dict[str, torch.Tensor],
        scores: dict[str, torch.Tensor],
        achieved: float,
    ) -> None:
        metrics = {"pruner/sparsity": achieved}
        for layer, value in layer_sparsities(masks, self.layer_pattern).items():
            metrics[f"pruner/sparsity_{layer}"] = value
        log_axis_metrics(trainer, metrics)
        if self.log_histograms and trainer.loggers and trainer.is_global_zero:
            kept = torch.cat([s[masks[n]].flatten() for n, s in scores.items()])
            stride = max(1, kept.numel() // HISTOGRAM_VALUES)
            log_histogram(trainer, "pruner/kept_scores", kept[::stride].float().numpy())

    # -- after training -----------------------------------------------------------------------
    def export(self, pl_module: nn.Module, path: str | Path | None = None) -> nn.Module:
        """The pruned model, physically smaller for heads/neurons, saved with
        ``save_pretrained`` when ``path`` is given. The Hugging Face model is
        ``pl_module.model`` when there is one.

        Example:
            >>> model = pruner.export(task, "pruned")  # doctest: +SKIP
        """
        return export_pruned(pl_module, self.masks, self.groups, path)
