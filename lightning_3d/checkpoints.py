"""Load a run's checkpoint into its model in one process, for export or inspection.

A Lightning checkpoint is either one file (``torch.save`` of a dict whose ``"state_dict"`` holds
the LightningModule's weights) or, from FSDP2 with ``save_distributed_checkpoint=True``, a
folder written by ``torch.distributed.checkpoint`` (DCP) with one shard file per rank. The folder
is consolidated here with DCP's own loader, without a process group: every tensor of the model's
state dict is read from the shards into a full copy, whatever the number of ranks that wrote it.

A run with ``QATHook`` leaves either float weights (checkpoints saved before conversion) or
converted ones (plain tensors with a ``::layout`` entry, see
:func:`~lightning_3d.quantization.to_plain_state`); :func:`load_run_weights` gives the model the
form the run's ``test`` evaluates: converted with the run's recipe either way.

Strategies that restore a checkpoint after ``on_fit_start`` (FSDP2) load the model and optimizer
state in one call, before any callback state: a callback whose state shapes the optimizer (the
freezer's frozen set decides its parameter groups) implements ``on_before_strategy_load``, and a
strategy that supports it calls :func:`before_strategy_load` first and sets
``applies_callback_state_first = True``; :func:`callback_state` reads the callback's entry.

Example:
    >>> state = checkpoint_state("runs/job/checkpoints/last.ckpt")  # doctest: +SKIP
    >>> load_run_weights(task, "runs/job/checkpoints/last.ckpt", qat=hook)  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

# Lightning's private name of the file that holds the non-tensor part (callback states, loops)
# of a sharded checkpoint folder. No public API reads one callback's state from a folder before
# the strategy loads it; this is the one place that depends on the name, and
# tests/test_lightning_seams.py fails, naming it, if Lightning moves or renames it.
from lightning.fabric.utilities.load import _METADATA_FILENAME
from torch import nn

from lightning_3d.depth import cut_like_state
from lightning_3d.quantization import (
    QuantizationRecipe,
    convert,
    from_plain_state,
    prepare,
    select_modules,
)
from lightning_3d.vocabulary import trim_like_state


def checkpoint_state(
    path: str | os.PathLike[str], model: nn.Module | None = None
) -> dict[str, Any]:
    """The module state dict held by the checkpoint ``path`` (a file or a sharded DCP folder).

    A sharded folder is read into tensors shaped like ``model.state_dict()`` (needed for it).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file has no ``"state_dict"``; the folder is not a DCP checkpoint or
            lacks tensors of ``model``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        if model is None:
            raise ValueError(f"{path} is a sharded checkpoint folder: pass the model to fill")
        return _sharded_state(path, model)
    # a checkpoint of the user's own run: it also holds hyper-parameters and callback states,
    # which are not all plain tensors, as when Lightning itself resumes from it
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict'")
    return checkpoint["state_dict"]


def _sharded_state(folder: Path, model: nn.Module) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    if not (folder / ".metadata").exists():
        raise ValueError(
            f"{folder} is a folder but not a sharded (torch.distributed.checkpoint) checkpoint: "
            "it has no .metadata file"
        )
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
    saved = {k.removeprefix("state_dict.") for k in saved if k.startswith("state_dict.")}
    if saved != set(state):  # DCP itself would silently skip tensors the model does not have
        raise ValueError(
            f"the sharded checkpoint {folder} does not fit the configured model: missing "
            f"{sorted(set(state) - saved)[:5]}, unexpected {sorted(saved - set(state))[:5]}"
        )
    try:
        dcp.load({"state_dict": state}, checkpoint_id=folder, no_dist=True)
    except Exception as error:  # DCP raises several types for missing or mis-shaped tensors
        raise ValueError(
            f"the sharded checkpoint {folder} does not fit the configured model: {error}"
        ) from error
    return state


def refuse_late_checkpoint_loading(strategy: Any, who: str, what: str) -> None:
    """Raise when ``strategy`` loads checkpoints after building the optimizer (FSDP, DeepSpeed,
    model-parallel): a callback that changes the model's structure before the optimizer is
    built (``who``, changing ``what``) could not make it follow the checkpoint there.

    Example:
        >>> class Sharded:
        ...     restore_checkpoint_after_setup = True
        >>> refuse_late_checkpoint_loading(Sharded(), "X", "its rows")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: X: Sharded builds the optimizer before it loads a checkpoint, so its rows ...
    """
    if getattr(strategy, "restore_checkpoint_after_setup", False):
        raise ValueError(
            f"{who}: {type(strategy).__name__} builds the optimizer before it loads a "
            f"checkpoint, so {what} could not follow the checkpoint; use a single-device or "
            "DDP strategy"
        )


def load_run_weights(
    module: nn.Module,
    path: str | os.PathLike[str],
    qat: Any | None = None,
) -> nn.Module:
    """Load the checkpoint ``path`` into ``module`` (the run's LightningModule), strictly.

    ``qat`` is the run's ``QATHook`` (or anything with ``recipe``, ``include``, ``exclude`` and
    ``embeddings``): the model is converted with its recipe, before loading when the checkpoint
    holds converted weights, after loading otherwise (the modules the hook selects). A
    checkpoint of a trimmed vocabulary (``VocabularyTrimmer``) trims the model's embedding like
    it first, one with fewer decoder blocks (``DepthPruner``) cuts the model's stack to its
    depth (single-file checkpoints).

    Raises:
        ValueError: the weights do not fit ``module`` (missing, unexpected or mis-shaped
            tensors), or the checkpoint holds quantized weights and ``qat`` is ``None``.
    """
    state = checkpoint_state(path, module)
    recipe: QuantizationRecipe | None = getattr(qat, "recipe", None)
    layouts = sorted(k.removesuffix(".weight::layout") for k in state if k.endswith("::layout"))
    if layouts:
        if recipe is None:
            raise ValueError(
                f"{path} holds torchao-quantized weights but the configuration has no QATHook: "
                "use the configuration of the run that wrote it"
            )
        prepare(module, recipe, layouts)
        convert(module, recipe)
        from_plain_state(state)
    trim_like_state(module, state)  # a VocabularyTrimmer run's embedding
    cut_like_state(module, state)  # a DepthPruner run's blocks
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"the weights in {path} do not fit the configured model (is this the configuration "
            f"of the run that wrote it?): {error}"
        ) from error
    if recipe is not None and not layouts:
        names = select_modules(module, qat.include, qat.exclude, qat.embeddings)
        prepare(module, recipe, names)
        convert(module, recipe)
    return module


@runtime_checkable
class PreparesForStrategyLoad(Protocol):
    """A callback that applies its checkpointed state before the strategy loads the rest."""

    def on_before_strategy_load(self, trainer: Any, checkpoint_path: Any) -> None: ...


def applies_callback_state_first(strategy: Any) -> bool:
    """Whether ``strategy`` calls :func:`before_strategy_load` before it loads a checkpoint
    (its ``applies_callback_state_first`` attribute is true)."""
    return bool(getattr(strategy, "applies_callback_state_first", False))


def keeps_callback_tensors_sharded(strategy: Any) -> bool:
    """Whether ``strategy`` saves ``DTensor`` values of callback states shard by shard (and
    restores them as ``DTensor``), so callbacks need not gather whole copies on every rank (its
    ``keeps_callback_tensors_sharded`` attribute is true)."""
    return bool(getattr(strategy, "keeps_callback_tensors_sharded", False))


def before_strategy_load(trainer: Any, checkpoint_path: Any) -> None:
    """Let every callback of ``trainer`` that needs it apply its state from ``checkpoint_path``
    before the strategy loads the model and optimizer state."""
    for callback in trainer.callbacks:
        if isinstance(callback, PreparesForStrategyLoad):
            callback.on_before_strategy_load(trainer, checkpoint_path)


def callback_state(path: str | os.PathLike[str], key: str) -> dict[str, Any] | None:
    """The state a callback saved under ``key`` (its ``state_key``) in a Lightning checkpoint:
    one file, or a sharded folder whose metadata file holds the callbacks; ``None`` when the
    checkpoint has no such entry.

    Example:
        >>> callback_state("last.ckpt", "SensitivityFreezer")  # doctest: +SKIP
        {'frozen': [...], ...}
    """
    path = Path(path)
    # memory-mapped: a single-file checkpoint's weights are not read just to find this entry
    checkpoint = torch.load(
        path / _METADATA_FILENAME if path.is_dir() else path,
        map_location="cpu",
        weights_only=False,
        mmap=True,
    )
    return checkpoint.get("callbacks", {}).get(key)


__all__ = [
    "PreparesForStrategyLoad",
    "applies_callback_state_first",
    "before_strategy_load",
    "callback_state",
    "checkpoint_state",
    "keeps_callback_tensors_sharded",
    "load_run_weights",
]
