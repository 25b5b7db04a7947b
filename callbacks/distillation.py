"""``Distiller``: the model axis's teacher -- distil the student from a teacher while it trains.

Life cycle (``global_step`` counts optimizer steps): ``setup`` loads the teacher (a module, a
Lightning checkpoint or a Hugging Face folder / Hub id; :mod:`lightning_3d.distillation`), freezes
it and checks it against the student; from ``start_step`` on, ``on_train_batch_start`` takes a
``"snapshot"`` teacher from the student, runs the teacher once on the samples missing from the
:class:`~lightning_3d.distillation.TeacherCache` and puts the targets under
``batch["teacher_targets"]``; ``on_train_epoch_end`` shares the cached outputs between ranks and,
after the first whole epoch, releases the teacher. Checkpoints hold the cache (saved, not rebuilt)
and, while needed, the snapshot's weights.

The student's training step needs one line (the built-in tasks have it)::

    per_sample = distil(per_sample, logits, batch)   # then reduce as before

Example:
    >>> from lightning import Trainer
    >>> distiller = Distiller("snapshot", alpha=0.5, start_step=100)
    >>> trainer = Trainer(callbacks=[distiller], max_epochs=3)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_3d.distillation import (
    TEACHER_INPUTS,
    TEACHER_KEY,
    TeacherCache,
    TeacherTargets,
    check_distillation,
    check_teacher,
    check_tokenizers,
    freeze_teacher,
    load_teacher,
    teacher_logits,
    teacher_tokenizer,
    top_k_targets,
)

log = logging.getLogger(__name__)
SNAPSHOT = "snapshot"


class Distiller(Callback):
    """Distil the student from a teacher: ``(1 - alpha) * task + alpha * T^2 * KL(teacher ||
    student)`` per sample, with the teacher's outputs cached per training sample.

    Args:
        teacher: ``"snapshot"`` (the run's own model at ``start_step``), a ``torch.nn.Module``,
            a Lightning checkpoint file of this task or a Hugging Face
            folder / Hub id of a model fine-tuned on the same labels.
        alpha: weight of the distillation term, in ``[0, 1]``.
        temperature: softening temperature ``T > 0``.
        start_step: the optimizer step from which batches carry teacher targets (and at which
            ``"snapshot"`` copies the student; it must then be >= 1).
        top_k: teacher logits kept per token for sequence (causal LM) outputs.
        cache: keep the teacher's outputs per dataset index (``batch["index"]``) and run the
            teacher only on samples not seen before; ``False`` runs it on every batch.
        student: the LightningModule attribute holding the network the teacher mirrors (a
            snapshot copies it; a checkpoint's ``"<student>."`` weights load into a copy of it).
        inputs: the batch keys the teacher's forward takes as keyword arguments (those present).

    Counters: ``teacher_samples`` (samples the teacher has run on), ``teacher_batches``; logged
    as ``distill/teacher_samples`` and ``distill/cached_samples``.

    Example:
        >>> Distiller(alpha=0.9, temperature=2.0, start_step=50).alpha
        0.9
    """

    #: The plan's name of this axis; ``PlanCoordinator`` finds the callback by it.
    axis = "distillation"

    def __init__(
        self,
        teacher: str | nn.Module = SNAPSHOT,
        alpha: float = 0.5,
        temperature: float = 2.0,
        start_step: int = 0,
        top_k: int = 32,
        cache: bool = True,
        student: str = "model",
        inputs: Sequence[str] = TEACHER_INPUTS,
    ) -> None:
        check_distillation(alpha, temperature)
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if teacher == SNAPSHOT and start_step == 0:
            raise ValueError(
                "teacher='snapshot' copies the student at start_step, which must be >= 1 (a "
                "dense warm-up first): at step 0 the student has learnt nothing to teach"
            )
        if not isinstance(teacher, nn.Module | str):
            raise ValueError(
                f"teacher must be 'snapshot', a module, a checkpoint or a model path; got "
                f"{type(teacher).__name__}"
            )
        self.source = teacher
        self.alpha = alpha
        self.temperature = temperature
        self.start_step = start_step
        self.student = student
        self.inputs = tuple(inputs)
        self.cache = TeacherCache(top_k) if cache else None
        self.top_k = top_k
        self.teacher: nn.Module | None = None
        self.teacher_samples = 0
        self.teacher_batches = 0
        self.snapshot_taken = False
        self.released = False
        self._snapshot_state: dict[str, torch.Tensor] | None = None
        self._dataset_size: int | None = None
        self._first_full_epoch: int | None = None  # the first epoch distilled from its start
        self._shared = 0  # cache entries already shared with the other ranks

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        snapshot = None  # the snapshot's weights, while the teacher is still needed
        if self.source == SNAPSHOT and self.teacher is not None:
            snapshot = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return {
            "cache": None if self.cache is None else self.cache.state_dict(),
            "teacher_samples": self.teacher_samples,
            "teacher_batches": self.teacher_batches,
            "snapshot_taken": self.snapshot_taken,
            "released": self.released,
            "first_full_epoch": self._first_full_epoch,
            "shared": self._shared,
            "snapshot": snapshot,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.cache is not None and state_dict["cache"] is not None:
            self.cache.load_state_dict(state_dict["cache"])
        self.teacher_samples = state_dict["teacher_samples"]
        self.teacher_batches = state_dict["teacher_batches"]
        self.snapshot_taken = state_dict["snapshot_taken"]
        self.released = state_dict["released"]
        self._first_full_epoch = state_dict["first_full_epoch"]
        self._shared = state_dict["shared"]
        self._snapshot_state = state_dict["snapshot"]

    @property
    def complete(self) -> bool:
        """Whether the cache holds the teacher's outputs of every training sample."""
        return (
            self.cache is not None
            and self._dataset_size is not None
            and len(self.cache) >= self._dataset_size
        )

    # -- set-up -------------------------------------------------------------------------------
    def _student(self, pl_module: LightningModule) -> nn.Module:
        network = getattr(pl_module, self.student, None)
        if not isinstance(network, nn.Module):
            raise ValueError(
                f"Distiller: the LightningModule has no network attribute {self.student!r}; set "
                "student= to the attribute holding the model the teacher mirrors"
            )
        return network

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        student = self._student(pl_module)
        if self.source == SNAPSHOT:
            return
        if isinstance(self.source, nn.Module):
            teacher = self.source
        else:
            teacher = load_teacher(self.source, student, self.student)
            own_tokenizer = getattr(pl_module, "tokenizer", None)
            theirs = None if Path(self.source).is_file() else teacher_tokenizer(self.source)
            if own_tokenizer is not None and theirs is not None:
                check_tokenizers(theirs, own_tokenizer, self.source)
        check_teacher(teacher, student)
        self.teacher = freeze_teacher(teacher).to(pl_module.device)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        student = self._student(pl_module)
        if self.source == SNAPSHOT and any(hasattr(p, "device_mesh") for p in student.parameters()):
            raise ValueError(
                "Distiller: teacher='snapshot' copies the student, which is sharded here; pass "
                "a checkpoint or model path as the teacher under a sharding strategy"
            )
        self._restore_snapshot(pl_module)

    def _restore_snapshot(self, pl_module: LightningModule) -> None:
        """Rebuild a checkpoint's snapshot teacher (strategies that restore after ``setup``
        load the callback state after ``on_fit_start``: the first batch does it then)."""
        if self._snapshot_state is not None:
            teacher = copy.deepcopy(self._student(pl_module))
            teacher.load_state_dict(self._snapshot_state)
            self.teacher, self._snapshot_state = freeze_teacher(teacher), None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        self._dataset_size = len(dataset) if hasattr(dataset, "__len__") else None

    # -- training -----------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step < self.start_step:
            return
        if not isinstance(batch, dict):
            raise ValueError("Distiller needs dict batches (input_ids, attention_mask, index)")
        self._restore_snapshot(pl_module)
        if self.source == SNAPSHOT and not self.snapshot_taken:
            self.teacher = freeze_teacher(copy.deepcopy(self._student(pl_module)))
            self.snapshot_taken = True
            log.info("Distiller: teacher snapshot taken at step %d", trainer.global_step)
        if self._first_full_epoch is None:
            self._first_full_epoch = trainer.current_epoch + (batch_idx > 0)
        with trainer.precision_plugin.forward_context():
            targets = self._targets(batch, pl_module.device)
        if targets is not None:  # None: released, and none of these samples was cached
            values, indices, present = targets
            batch[TEACHER_KEY] = TeacherTargets(
                values, indices, self.alpha, self.temperature, present
            )
        if self.complete:
            self._release("every training sample is cached")

    def _release(self, why: str) -> None:
        if self.teacher is not None and self.cache is not None:
            self.teacher, self.released = None, True
            log.info("Distiller: %s; teacher released", why)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.cache is None or self._first_full_epoch is None:
            return
        if trainer.world_size > 1 and not self.cache.holds_sequences:
            self._share(trainer, pl_module, *self.cache.classifier_entries(self._shared))
            self._shared = len(self.cache)
        if trainer.current_epoch >= self._first_full_epoch:
            self._release(f"a whole epoch was distilled ({len(self.cache)} samples cached)")

    def _share(
        self, trainer: Trainer, pl_module: LightningModule, index: torch.Tensor, values: Any
    ) -> None:
        """All-gather every rank's new classifier entries into this rank's cache (padded to the
        most any rank has; one collective per tensor, once per epoch)."""

        def gather(tensor: torch.Tensor) -> torch.Tensor:
            return trainer.strategy.all_gather(tensor.to(pl_module.device)).cpu()

        classes = values.shape[-1] if len(index) else 0
        most, classes = (int(x) for x in gather(torch.tensor([len(index), classes])).amax(0))
        if most == 0:
            return
        padded_index = torch.full((most,), -1, dtype=torch.long)
        padded_values = torch.zeros(most, classes)
        padded_index[: len(index)] = index
        padded_values[: len(index)] = values
        every_index, every_value = gather(padded_index).flatten(), gather(padded_values)
        real = every_index >= 0
        self.cache.merge(every_index[real], every_value.reshape(-1, classes)[real])

    def _targets(
        self, batch: dict[str, Any], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
        mask = batch.get("attention_mask")
        if self.cache is None:
            logits = self._run_teacher(batch)
            if logits.dim() == 2:
                return logits.float(), None, None
            return (*top_k_targets(logits, self.top_k), None)
        if "index" not in batch:
            raise ValueError(
                "Distiller(cache=True) keys the teacher's outputs by batch['index'] (the "
                "built-in data modules add it; wrap a dataset with lightning_3d.data.WithIndex) "
                "or set cache=False"
            )
        index = batch["index"]
        missing = self.cache.missing(index)
        if bool(missing.any()) and self.teacher is not None:
            rows = missing.nonzero().flatten().to(index.device)
            subset = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
            logits = self._run_teacher(subset)
            self.cache.store(index[rows], logits, subset.get("attention_mask"))
            missing = torch.zeros_like(missing)
        if bool(missing.all()):
            return None
        values, indices = self.cache.targets(index, mask)
        present = None if not bool(missing.any()) else (~missing).to(device)
        return values.to(device), None if indices is None else indices.to(device), present

    def _run_teacher(self, batch: dict[str, Any]) -> torch.Tensor:
        logits = teacher_logits(self.teacher, batch, self.inputs)
        self.teacher_samples += int(logits.shape[0])
        self.teacher_batches += 1
        return logits

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step <= self.start_step:
            return
        pl_module.log("distill/teacher_samples", float(self.teacher_samples), rank_zero_only=True)
        if self.cache is not None:
            pl_module.log("distill/cached_samples", float(len(self.cache)), rank_zero_only=True)
