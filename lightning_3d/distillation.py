"""Knowledge distillation: the loss, the teacher targets a batch carries, and a per-sample cache.

A student with logits ``s`` learns from a teacher with logits ``t`` at temperature ``T``
(Hinton et al. 2015), per sample ``i``::

    kd_i   = T^2 * KL(softmax(t_i / T) || softmax(s_i / T))
    loss_i = (1 - alpha) * task_i + alpha * kd_i

(the ``T^2`` keeps the gradient scale of the soft term independent of ``T``). For a causal LM the
KL is taken per token over the teacher's ``k`` largest logits (renormalized among themselves;
the student's log-probabilities over the full vocabulary, read at those ``k`` tokens) and
averaged over the tokens that carry a label, so a cached target costs ``k`` values per token,
not the vocabulary.

The :class:`~lightning_3d.callbacks.Distiller` callback puts a :class:`TeacherTargets` in every
training batch under :data:`TEACHER_KEY`; a training step turns its per-sample task losses into
distillation losses with one line, :func:`distil`, which leaves them unchanged when the batch
has no targets (before the distillation starts, or without a ``Distiller``)::

    per_sample = distil(per_sample, logits, batch)

:class:`TeacherCache` keeps the teacher's outputs per dataset index, so each training sample
costs one teacher forward in the whole run, not one per epoch.

Example:
    >>> student = torch.tensor([[2.0, 0.0]])
    >>> teacher = torch.tensor([[0.0, 2.0]])
    >>> round(float(kd_loss(student, teacher, temperature=1.0)[0]), 4)
    1.5232
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_3d.data import IGNORE_INDEX
from lightning_3d.quantization import set_fake_quantization

#: The batch key under which the ``Distiller`` puts the teacher's targets.
TEACHER_KEY = "teacher_targets"
#: The batch keys a teacher's forward receives (those present in the batch).
TEACHER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def check_distillation(alpha: float, temperature: float) -> None:
    """Raise ``ValueError`` unless ``alpha`` is in ``[0, 1]`` and ``temperature > 0``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Per-sample ``T^2 * KL(softmax(t / T) || softmax(s / T))`` over the last dimension.

    Args:
        student_logits, teacher_logits: ``[..., C]`` logits of the same shape.
        temperature: ``T > 0``; larger values soften both distributions.

    Returns:
        ``[...]``: one value per row (float32), ``0`` where the two distributions agree.

    Example:
        >>> round(float(kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), 2.0)[0]), 6)
        0.0
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1)


def top_k_targets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits of every row and their positions (``[..., k]`` each)."""
    k = min(k, logits.shape[-1])
    values, indices = logits.float().topk(k, dim=-1)
    return values, indices


def top_k_kd_loss(
    student_logits: torch.Tensor,
    teacher_values: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-row ``T^2 * KL(p || q)`` with the teacher restricted to its top-k tokens.

    ``p = softmax(v / T)`` over the teacher's ``k`` values ``v`` (renormalized among them),
    ``q_j = softmax(s / T)_j`` the student's probability of token ``j`` over the full
    vocabulary, read at the teacher's ``k`` tokens: ``sum_j p_j (log p_j - log q_j)``. With
    ``k`` equal to the vocabulary it is :func:`kd_loss`.

    Args:
        student_logits: ``[..., V]``.
        teacher_values, teacher_indices: ``[..., k]`` from :func:`top_k_targets`.

    Example:
        >>> s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 1.0, 0.5]])
        >>> v, i = top_k_targets(t, 3)
        >>> bool(torch.allclose(top_k_kd_loss(s, v, i, 2.0), kd_loss(s, t, 2.0)))
        True
    """
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    student = student.gather(-1, teacher_indices)
    teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    return temperature**2 * (teacher.exp() * (teacher - student)).sum(-1)


def blend(task: torch.Tensor, soft: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * task + alpha * soft``, per sample.

    Example:
        >>> blend(torch.tensor([1.0]), torch.tensor([3.0]), 0.25)
        tensor([1.5000])
    """
    return (1.0 - alpha) * task + alpha * soft.to(task.dtype)


@dataclass
class TeacherTargets:
    """The teacher's outputs for one batch, as the ``Distiller`` puts them in it.

    Attributes:
        values: ``[B, C]`` teacher logits (classification), or ``[B, L, k]`` the top-k logits
            per token (causal LM).
        indices: ``None`` (full logits), or ``[B, L, k]`` the vocabulary positions of ``values``.
        alpha: weight of the distillation term.
        temperature: softening temperature ``T``.
        present: ``[B]`` bools, ``False`` for samples without targets (not cached when the
            teacher was released): their loss stays the task loss. ``None``: all present.
    """

    values: torch.Tensor
    indices: torch.Tensor | None
    alpha: float
    temperature: float
    present: torch.Tensor | None = None

    def per_sample(
        self,
        student_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``kd_i`` per sample: for ``[B, C]`` logits one value per row; for ``[B, L, V]``
        logits (a causal LM) the mean over the tokens that predict a label (``labels[:, 1:]``
        other than ``-100``; without labels, every real token of ``attention_mask``)."""
        if student_logits.dim() == 2:
            if self.indices is not None:
                return top_k_kd_loss(student_logits, self.values, self.indices, self.temperature)
            return kd_loss(student_logits, self.values, self.temperature)
        if self.indices is None:
            raise ValueError("sequence logits need top-k teacher targets (values and indices)")
        predicting = student_logits[:, :-1]
        values, indices = self.values[:, :-1], self.indices[:, :-1]
        tokens = top_k_kd_loss(predicting, values, indices, self.temperature)
        if labels is not None:
            mask = (labels[:, 1:] != IGNORE_INDEX).to(tokens.dtype)
        elif attention_mask is not None:
            mask = attention_mask[:, 1:].to(tokens.dtype)
        else:
            mask = torch.ones_like(tokens)
        return (tokens * mask).sum(1) / mask.sum(1).clamp_min(1)


def distil(
    per_sample_loss: torch.Tensor, logits: torch.Tensor, batch: Mapping[str, Any]
) -> torch.Tensor:
    """The one line a training step needs: blend the task loss with the teacher's targets.

    Returns ``(1 - alpha) * per_sample_loss + alpha * kd`` (:class:`TeacherTargets`) when the
    ``Distiller`` put targets in ``batch`` (for the samples that have them), else
    ``per_sample_loss`` itself. Reduce the result as before (e.g.
    :func:`~lightning_3d.tasks.weighted_mean`).

    Args:
        per_sample_loss: ``[B]`` task losses.
        logits: the student's logits, ``[B, C]`` or ``[B, L, V]`` (causal LM: the batch's
            ``labels`` select the tokens).
        batch: the training batch.

    Example:
        >>> batch = {TEACHER_KEY: TeacherTargets(torch.zeros(1, 2), None, 0.5, 1.0)}
        >>> distil(torch.tensor([0.4]), torch.zeros(1, 2), batch)
        tensor([0.2000])
        >>> distil(torch.tensor([0.4]), torch.zeros(1, 2), {})
        tensor([0.4000])
    """
    targets = batch.get(TEACHER_KEY) if isinstance(batch, Mapping) else None
    if targets is None:
        return per_sample_loss
    sequences = logits.dim() == 3
    labels = batch.get("labels") if sequences else None
    soft = targets.per_sample(logits, labels, batch.get("attention_mask") if sequences else None)
    blended = blend(per_sample_loss, soft, targets.alpha)
    if targets.present is None:
        return blended
    return torch.where(targets.present.to(blended.device), blended, per_sample_loss)


def teacher_logits(
    teacher: torch.nn.Module, batch: Mapping[str, Any], inputs: Sequence[str] = TEACHER_INPUTS
) -> torch.Tensor:
    """The teacher's logits for ``batch``: its forward on the ``inputs`` keys the batch has, as
    keyword arguments, reading ``.logits`` from a Hugging Face output, under ``torch.no_grad``."""
    given = {key: batch[key] for key in inputs if key in batch}
    if not given:
        raise ValueError(
            f"the batch has none of the teacher's inputs {tuple(inputs)} (it has "
            f"{sorted(batch)}); set Distiller(inputs=...) to the batch keys the model takes"
        )
    with torch.no_grad():
        output = teacher(**given)
    return getattr(output, "logits", output)


class TeacherCache:
    """The teacher's outputs of every sample it has seen, by dataset index (on the CPU).

    A classifier's entry is its ``[C]`` logits; a causal LM's entry holds, for each real token
    (``attention_mask`` 1) of the sample, its top-``k`` logits and their vocabulary positions.
    :meth:`targets` reassembles a batch's targets, padded like the batch.

    Example:
        >>> cache = TeacherCache()
        >>> cache.store(torch.tensor([4, 7]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> cache.missing(torch.tensor([7, 9])).tolist(), len(cache)
        ([False, True], 2)
        >>> cache.targets(torch.tensor([7]))[0]
        tensor([[0., 1.]])
    """

    def __init__(self, top_k: int | None = None) -> None:
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.top_k = top_k
        self._values: dict[int, torch.Tensor] = {}
        self._indices: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._values)

    @property
    def samples(self) -> list[int]:
        """The dataset indices of the cached samples, ascending."""
        return sorted(self._values)

    @property
    def holds_sequences(self) -> bool:
        """Whether the entries are per-token top-k targets (a causal LM), not classifier logits."""
        return bool(self._indices)

    def missing(self, index: torch.Tensor) -> torch.Tensor:
        """A bool per sample of ``index``: ``True`` where the cache has no entry."""
        return torch.tensor([int(i) not in self._values for i in index.tolist()], dtype=torch.bool)

    def store(
        self, index: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> None:
        """Keep the teacher's ``logits`` (``[B, C]``, or ``[B, L, V]`` with ``attention_mask``)
        of the samples ``index``."""
        if logits.dim() == 2:
            for i, row in zip(index.tolist(), logits.float().cpu(), strict=True):
                self._values[int(i)] = row.clone()
            return
        if self.top_k is None:
            raise ValueError("sequence logits are cached as top-k targets: set top_k")
        values, indices = top_k_targets(logits, self.top_k)
        mask = (
            torch.ones(logits.shape[:2], dtype=torch.bool)
            if attention_mask is None
            else attention_mask.bool()
        )
        for row, i in enumerate(index.tolist()):
            real = mask[row].to(values.device)
            self._values[int(i)] = values[row][real].cpu()
            self._indices[int(i)] = indices[row][real].to(torch.int32).cpu()

    def targets(
        self, index: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The cached ``(values, indices)`` of the samples ``index`` (``indices`` is ``None``
        for classifier logits), token entries scattered back to the batch's real positions;
        rows of samples the cache lacks are zeros (see :meth:`missing`)."""
        keys = [int(i) for i in index.tolist()]
        some = next((self._values[i] for i in keys if i in self._values), None)
        if some is None:
            raise ValueError("none of the batch's samples is cached")
        if not self._indices:
            return torch.stack([self._values.get(i, torch.zeros_like(some)) for i in keys]), None
        if attention_mask is None:
            raise ValueError("top-k targets are placed by the batch's attention_mask")
        mask = attention_mask.bool().cpu()
        shape = (*mask.shape, some.shape[-1])
        values = torch.zeros(shape, dtype=torch.float32)
        indices = torch.zeros(shape, dtype=torch.long)
        for row, i in enumerate(keys):
            if i in self._values:
                values[row][mask[row]] = self._values[i]
                indices[row][mask[row]] = self._indices[i].long()
        return values, indices

    def classifier_entries(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The sample indices and ``[n, C]`` logits of the classifier entries stored after the
        first ``start`` (in the order they were stored), to share with other ranks."""
        if self._indices:
            raise ValueError("only classifier entries are shared between ranks")
        keys = list(self._values)[start:]
        if not keys:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return torch.tensor(keys, dtype=torch.long), torch.stack([self._values[i] for i in keys])

    def merge(self, index: torch.Tensor, values: torch.Tensor) -> int:
        """Add classifier entries (another rank's) that this cache lacks; returns how many."""
        added = 0
        for i, row in zip(index.tolist(), values, strict=True):
            if int(i) not in self._values:
                self._values[int(i)] = row.float().cpu().clone()
                added += 1
        return added

    def state_dict(self) -> dict[str, Any]:
        """Every entry as flat tensors: sample indices, rows per entry, values (and indices)."""
        keys = sorted(self._values)
        state: dict[str, Any] = {
            "top_k": self.top_k,
            "index": torch.tensor(keys, dtype=torch.long),
            "rows": torch.tensor(
                [self._values[i].shape[0] if i in self._indices else 1 for i in keys],
                dtype=torch.long,
            ),
            "values": (
                torch.cat([self._values[i].reshape(-1, self._values[i].shape[-1]) for i in keys])
                if keys
                else torch.zeros(0)
            ),
            "indices": (
                torch.cat([self._indices[i] for i in keys]) if keys and self._indices else None
            ),
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.top_k = state["top_k"]
        self._values, self._indices = {}, {}
        keys, rows = state["index"].tolist(), state["rows"].tolist()
        values = state["values"]
        sequences = state["indices"] is not None
        start = 0
        for key, count in zip(keys, rows, strict=True):
            block = values[start : start + count]
            if sequences:
                self._values[key] = block.clone()
                self._indices[key] = state["indices"][start : start + count].clone()
            else:
                self._values[key] = block[0].clone()
            start += count


def output_shape(model: torch.nn.Module, vocab_size: int | None = None) -> tuple[int, ...]:
    """The shape of ``model``'s logits for one two-token input (a cheap compatibility probe)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.full((1, 2), 1 if (vocab_size or 2) > 1 else 0, device=device)
    mask = torch.ones_like(ids)
    training = model.training
    model.eval()
    try:
        return tuple(teacher_logits(model, {"input_ids": ids, "attention_mask": mask}).shape)
    finally:
        model.train(training)


def check_teacher(teacher: torch.nn.Module, student: torch.nn.Module) -> None:
    """Raise ``ValueError`` when ``teacher`` cannot teach ``student``: another vocabulary (the
    batch's token ids would mean other tokens) or logits of another shape (another label count,
    or another kind of head), found on a two-token probe before training."""
    vocab = {
        role: getattr(getattr(model, "config", None), "vocab_size", None)
        for role, model in (("teacher", teacher), ("student", student))
    }
    if None not in vocab.values() and vocab["teacher"] != vocab["student"]:
        raise ValueError(
            f"Distiller: the teacher's vocabulary has {vocab['teacher']} tokens but the "
            f"student's {vocab['student']}: the teacher needs the student's tokenizer"
        )
    shapes = {role: output_shape(model, vocab["student"]) for role, model in (
        ("teacher", teacher), ("student", student))}  # fmt: skip
    if shapes["teacher"] != shapes["student"]:
        raise ValueError(
            f"Distiller: the teacher's logits have shape {shapes['teacher']} on a two-token "
            f"input but the student's {shapes['student']}: the teacher must be a model of the "
            "same task with the same labels (or vocabulary)"
        )


def check_tokenizers(teacher: Any, student: Any, source: str) -> None:
    """Raise ``ValueError`` when the teacher at ``source`` has another tokenizer than the
    student (other tokens, or the same tokens at other ids): the batch's token ids would mean
    other text to it, even when the vocabularies have the same size.

    Example:
        >>> class Vocabulary:
        ...     def __init__(self, tokens): self.tokens = tokens
        ...     def get_vocab(self): return {t: i for i, t in enumerate(self.tokens)}
        >>> check_tokenizers(Vocabulary(["a", "b"]), Vocabulary(["b", "a"]), "teacher/")
        ... # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Distiller: the teacher teacher/ has another tokenizer ... e.g. 'a': 0 vs 1)...
    """
    mine, theirs = student.get_vocab(), teacher.get_vocab()
    differing = sorted(t for t in set(mine) | set(theirs) if mine.get(t) != theirs.get(t))
    if differing:
        token = differing[0]
        raise ValueError(
            f"Distiller: the teacher {source} has another tokenizer than the student "
            f"({len(differing)} of {len(mine)} token ids differ, e.g. {token!r}: "
            f"{theirs.get(token)} vs {mine.get(token)}); distil from a model of the student's "
            "tokenizer"
        )


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """``teacher`` in eval mode, without gradients and without fake quantization."""
    teacher.eval().requires_grad_(False)
    set_fake_quantization(teacher, False)
    return teacher


def teacher_tokenizer(source: str) -> Any:
    """The tokenizer saved with a Hugging Face teacher (folder or Hub id), or ``None`` when it
    was saved without one (the vocabulary-size check still applies)."""
    from lightning_3d.models import load_tokenizer, resolve_model_source

    try:
        return load_tokenizer(resolve_model_source(source))
    except (OSError, ValueError):
        return None


def load_teacher(source: str, student: nn.Module, attribute: str) -> nn.Module:
    """A teacher from a Lightning checkpoint (its ``"<attribute>."`` weights loaded into a copy
    of ``student``) or a Hugging Face folder / Hub id (the student's model class)."""
    from lightning_3d.checkpoints import checkpoint_state  # reads Lightning's checkpoint files

    path = Path(source)
    if path.is_file():
        teacher = copy.deepcopy(student)
        state = checkpoint_state(path)
        prefix = f"{attribute}."
        own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(
                f"Distiller: the checkpoint {source} holds no '{prefix}*' weights of the student"
            )
        try:
            teacher.load_state_dict(own)
        except RuntimeError as error:
            raise ValueError(
                f"Distiller: the checkpoint {source} does not fit the student's architecture: "
                f"{str(error).splitlines()[0]}"
            ) from error
        return teacher
    base = student.get_base_model() if hasattr(student, "get_base_model") else student
    loader = getattr(type(base), "from_pretrained", None)
    if loader is None:
        raise ValueError(
            f"Distiller: teacher={source!r} is neither a checkpoint nor loadable with "
            f"{type(base).__name__}.from_pretrained"
        )
    return loader(source)


__all__ = [
    "TEACHER_INPUTS",
    "TEACHER_KEY",
    "TeacherCache",
    "TeacherTargets",
    "blend",
    "check_distillation",
    "check_teacher",
    "check_tokenizers",
    "distil",
    "freeze_teacher",
    "kd_loss",
    "load_teacher",
    "output_shape",
    "teacher_logits",
    "teacher_tokenizer",
    "top_k_kd_loss",
    "top_k_targets",
]
