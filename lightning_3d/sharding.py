"""Which submodules to shard with FSDP2 (a policy by class name, size, or the model's own
blocks), and helpers for state kept beside sharded parameters.

FSDP2's ``fully_shard`` turns a module into one communication unit: its parameters are
all-gathered before its forward and its gradients reduce-scattered together after its backward.
Units must be applied inner first. :func:`shard_targets` walks a model bottom-up and returns, in
that order:

1. every module whose class name is in ``class_names``; when none are given, the model's
   transformer blocks: Hugging Face ``_no_split_modules`` classes, and the children of every
   ``nn.ModuleList`` that holds two or more modules of one class (``encoder.layer``, ``layers``);
2. with ``min_num_params``, every module holding at least that many parameters not already in a
   unit below it;
3. finally the root's direct children that still own parameters outside every unit, so that each
   parameter belongs to exactly one unit.

Example:
    >>> import torch
    >>> root = torch.nn.Module()
    >>> root.embed = torch.nn.Embedding(10, 4)
    >>> root.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
    >>> [type(m).__name__ for m in shard_targets(root)]  # two blocks, and the rest as a unit
    ['Embedding', 'Linear', 'Linear']
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_3d.sensitivity import local_part


def transformer_block_classes(model: nn.Module) -> set[str]:
    """Class names of the repeated blocks of ``model`` (``_no_split_modules`` and layer lists)."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            classes = {type(child).__name__ for child in module}
            if len(classes) == 1 and any(p.numel() for p in module.parameters()):
                names.update(classes)
    return names


def shard_targets(
    root: nn.Module,
    class_names: Iterable[str] | None = None,
    min_num_params: int | None = None,
) -> list[nn.Module]:
    """Modules of ``root`` to pass to ``fully_shard``, inner first (see the module docstring).

    Raises:
        ValueError: ``min_num_params`` is not positive, or ``root`` owns parameters directly
            (they would belong to no unit: move them into a submodule or shard in
            ``configure_model``).
    """
    if min_num_params is not None and min_num_params <= 0:
        raise ValueError(f"min_num_params must be positive, got {min_num_params}")
    direct = [name for name, _ in root.named_parameters(recurse=False)]
    if direct:
        raise ValueError(
            f"{type(root).__name__} owns parameters directly ({', '.join(direct)}); the sharding "
            "policy shards submodules only. Move them into a submodule or apply fully_shard "
            "yourself in configure_model()"
        )
    names = set(class_names) if class_names is not None else transformer_block_classes(root)
    targets: list[nn.Module] = []
    covered: set[int] = set()

    def uncovered(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters() if id(p) not in covered)

    def claim(module: nn.Module) -> None:
        targets.append(module)
        covered.update(id(p) for p in module.parameters())

    def visit(module: nn.Module) -> None:
        for child in module.children():
            visit(child)
        wanted = type(module).__name__ in names
        big = min_num_params is not None and uncovered(module) >= min_num_params
        if (wanted or big) and uncovered(module):
            claim(module)

    for child in root.children():
        visit(child)
        if child not in targets and uncovered(child):
            claim(child)
    return targets


def full_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A whole, detached CPU copy of a tensor, gathering the shards of a ``DTensor`` (a
    collective: every rank must call it). Checkpoints hold such replicated copies."""
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach().cpu()


def laid_out_like(
    full: torch.Tensor, param: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``full`` on ``param``'s device (as ``dtype``, default ``param.dtype``), sharded the same
    way when ``param`` is a ``DTensor``: rank 0's values are scattered, so every rank holds
    its part of one and the same tensor. A ``full`` that is already a ``DTensor`` laid out like
    ``param`` (a sharded checkpoint's) is only cast."""
    dtype = dtype or param.dtype
    mesh = getattr(param, "device_mesh", None)
    sharded = hasattr(full, "device_mesh")
    if mesh is None:
        return (full_copy(full) if sharded else full).to(param.device, dtype)
    if sharded and full.device_mesh == mesh and full.placements == param.placements:
        return full.to(dtype)
    from torch.distributed.tensor import distribute_tensor

    whole = full_copy(full) if sharded else full
    return distribute_tensor(whole.to(param.to_local().device, dtype), mesh, param.placements)


def laid_out_as(
    tensors: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Every ``tensors[name]`` :func:`laid_out_like` ``params[name]`` (a checkpoint's masks or
    scores placed like the parameters they belong to)."""
    return {name: laid_out_like(tensor, params[name], dtype) for name, tensor in tensors.items()}


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of these tensors (their local shards, for DTensors) is finite, with
    one host sync.

    Example:
        >>> all_finite([torch.ones(2), torch.tensor([float("nan")])]), all_finite([])
        (False, True)
    """
    checks = [torch.isfinite(local_part(t)).all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


def state_tensor(tensor: torch.Tensor, keep_sharded: bool) -> torch.Tensor:
    """What a callback's state dict holds of a per-parameter tensor (a mask, a score, a
    reference copy): the ``DTensor`` itself when the strategy saves callback tensors sharded
    (``keep_sharded``; each rank then writes only its own shard), else a whole CPU copy
    (:func:`full_copy`, a collective for a ``DTensor``)."""
    if keep_sharded and hasattr(tensor, "device_mesh"):
        return tensor.detach()
    return full_copy(tensor)


#: The key of a reference to a sharded tensor in a checkpoint's non-tensor part.
SHARDED_REF = "__sharded_tensor__"


def _placements_to_data(placements: Iterable[Any]) -> list[list[Any]]:
    from torch.distributed.tensor import Replicate, Shard

    data: list[list[Any]] = []
    for placement in placements:
        if isinstance(placement, Shard):
            data.append(["shard", placement.dim])
        elif isinstance(placement, Replicate):
            data.append(["replicate"])
        else:
            raise ValueError(f"cannot keep a tensor placed as {placement} in a checkpoint")
    return data


def _placements_from_data(data: Iterable[list[Any]]) -> list[Any]:
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(int(p[1])) if p[0] == "shard" else Replicate() for p in data]


def _is_dtensor(value: Any) -> bool:
    return hasattr(value, "device_mesh") and hasattr(value, "placements")


def _is_reference(value: Any) -> bool:
    return isinstance(value, Mapping) and SHARDED_REF in value


def map_state(state: Any, leaf: Callable[[Any, str], Any], path: str = "") -> Any:
    """``state`` (nested dicts, lists, tuples, named tuples) rebuilt with every leaf replaced by
    ``leaf(value, path)``; a ``DTensor`` and a sharded-tensor reference count as leaves, and
    ``path`` names the place (``"masks/w"``, ``"pairs/0"``).

    Example:
        >>> map_state({"a": [1, 2], "b": 3}, lambda value, path: path)
        {'a': ['a/0', 'a/1'], 'b': 'b'}
    """
    if _is_dtensor(state) or _is_reference(state):
        return leaf(state, path)
    if isinstance(state, Mapping):
        return {
            key: map_state(value, leaf, f"{path}/{key}" if path else str(key))
            for key, value in state.items()
        }
    if isinstance(state, (list, tuple)):
        items = [map_state(value, leaf, f"{path}/{index}") for index, value in enumerate(state)]
        return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)
    return leaf(state, path)


def split_sharded(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` (nested dicts, lists, tuples) with every ``DTensor`` replaced by a reference
    (``{SHARDED_REF: key, "shape": ..., "dtype": ..., "placements": ...}``: plain data a
    checkpoint's metadata file can hold), and those tensors by key, for
    ``torch.distributed.checkpoint`` to save each rank's shard.

    Example:
        >>> plain, tensors = split_sharded({"masks": {"w": torch.ones(2)}, "step": 3})
        >>> plain, tensors
        ({'masks': {'w': tensor([1., 1.])}, 'step': 3}, {})
    """
    tensors: dict[str, torch.Tensor] = {}

    def reference(value: Any, path: str) -> Any:
        if not _is_dtensor(value):
            return value
        tensors[path] = value
        return {
            SHARDED_REF: path,
            "shape": list(value.shape),
            "dtype": str(value.dtype).removeprefix("torch."),
            "placements": _placements_to_data(value.placements),
        }

    return map_state(state, reference), tensors


def sharded_templates(state: Any, mesh: Any) -> dict[str, torch.Tensor]:
    """An empty ``DTensor`` on ``mesh`` for every reference :func:`split_sharded` left in
    ``state``, by key: what ``torch.distributed.checkpoint.load`` fills with each rank's shard."""
    from torch.distributed.tensor import empty

    templates: dict[str, torch.Tensor] = {}

    def template(value: Any, path: str) -> Any:
        if _is_reference(value):
            dtype = getattr(torch, value["dtype"])
            placements = _placements_from_data(value["placements"])
            templates[value[SHARDED_REF]] = empty(
                *value["shape"], dtype=dtype, device_mesh=mesh, placements=placements
            )
        return value

    map_state(state, template)
    return templates


def join_sharded(state: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_sharded`: every reference in ``state`` replaced by its
    tensor from ``tensors``."""
    return map_state(
        state, lambda value, path: tensors[value[SHARDED_REF]] if _is_reference(value) else value
    )


def gather_sharded(state: Any) -> Any:
    """``state`` with every ``DTensor`` replaced by a whole CPU copy (a collective)."""
    return map_state(state, lambda value, path: full_copy(value) if _is_dtensor(value) else value)


def broadcast_masks(
    masks: Mapping[str, torch.Tensor], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Rank 0's boolean masks on every rank of the default process group, as one flat ``uint8``
    buffer in one ``broadcast`` (no pickling; a byte per entry). Every rank must call it with
    masks of the same names and shapes, in the same order; ``device`` is where the buffer
    travels (the rank's CUDA device under NCCL). Without a process group of several ranks the
    masks come back as they are.

    Example:
        >>> broadcast_masks({"w": torch.tensor([True, False])})  # one process: unchanged
        {'w': tensor([ True, False])}
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return dict(masks)
    names = list(masks)
    flat = torch.cat([masks[n].reshape(-1).to(device, torch.uint8) for n in names])
    dist.broadcast(flat, src=0)
    pieces = flat.bool().split([masks[n].numel() for n in names])
    return {
        n: piece.view(masks[n].shape).to(masks[n].device)
        for n, piece in zip(names, pieces, strict=True)
    }


def shard_all_reduce(
    params: Iterable[torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An in-place sum over the ranks that hold shards of these (FSDP2) parameters, or ``None``
    when they are not sharded.

    Raises:
        ValueError: the parameters are sharded over more than one mesh dimension.
    """
    for param in params:
        placements = getattr(param, "placements", None)
        if placements is None:
            continue
        shard_dims = [i for i, p in enumerate(placements) if p.is_shard()]
        if not shard_dims:
            return None
        if len(shard_dims) > 1:
            raise ValueError(
                "parameters sharded over more than one mesh dimension are not supported"
            )
        return partial(_all_reduce_sum, group=param.device_mesh.get_group(shard_dims[0]))
    return None


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor
