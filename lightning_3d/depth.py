"""Depth pruning: whole decoder blocks removed before fine-tuning, so every step computes fewer.

A residual block ``y = x + f(x)`` whose output points where its input does changes its tokens'
hidden states little. Its *block influence* (Men et al. 2024, "ShortGPT") is

    BI_i = 1 - E_t[ cos(x_{i,t}, y_{i,t}) ]

over the tokens ``t`` that are not padding, ``x_{i,t}`` the input of block ``i`` and
``y_{i,t}`` its output. :func:`block_influence` measures it on a few batches (forward only),
:func:`least_influential` picks the ``k`` blocks of lowest influence and :func:`remove_blocks`
deletes them from the model: the model's config says the new depth, so the result saves and
loads with plain ``from_pretrained`` and exports like any model of its architecture. Every
forward and backward pass then costs about ``(L - k) / L`` of the blocks' work.

Example:
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    >>> model = LlamaForCausalLM(config)
    >>> remove_blocks(model, [1, 2])
    [1, 2]
    >>> model.config.num_hidden_layers, len(decoder_blocks(model))
    (2, 2)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: The config entry that records the original indices of removed blocks (saved in config.json).
REMOVED_KEY = "removed_layers"


def _config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not isinstance(getattr(config, "num_hidden_layers", None), int):
        raise ValueError(
            f"depth pruning needs a Hugging Face model whose config has num_hidden_layers; got "
            f"{type(model).__name__}"
        )
    return config


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """``model``'s stack of blocks: its first ``nn.ModuleList`` holding
    ``config.num_hidden_layers`` modules (through wrappers such as peft's).

    Raises:
        ValueError: no config with ``num_hidden_layers``, or no such list.
    """
    depth = _config(model).num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == depth and depth > 0:
            return module
    raise ValueError(
        f"depth pruning found no list of {depth} blocks (config.num_hidden_layers) in "
        f"{type(model).__name__}"
    )


def _hidden(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@torch.no_grad()
def block_influence(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block, the sum of ``1 - cos(input, output)`` over the non-padding tokens of
    ``batches``, and the number of those tokens (sums, so that ranks can add theirs before
    dividing).

    Each batch holds ``input_ids`` and ``attention_mask`` (1: a token, 0: padding); the model
    runs in eval mode (its modules' modes are restored after) on the device of its parameters.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)
        >>> batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}
        >>> sums, tokens = block_influence(LlamaForCausalLM(config), [batch])
        >>> sums.shape, tokens.item()
        (torch.Size([3]), 3.0)
    """
    blocks = decoder_blocks(model)
    sums = torch.zeros(len(blocks), dtype=torch.float64)
    tokens = torch.zeros((), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}
    mask: list[torch.Tensor] = []

    def before(index: int) -> Any:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]

        return hook

    def after(index: int) -> Any:
        def hook(_: nn.Module, __: Any, output: Any) -> None:
            cosine = nn.functional.cosine_similarity(
                inputs.pop(index).float(), _hidden(output).float(), dim=-1
            )
            sums[index] += ((1.0 - cosine) * mask[0]).sum().double().cpu()

        return hook

    modes = {module: module.training for module in model.modules()}
    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(before(index), with_kwargs=True))
        handles.append(block.register_forward_hook(after(index)))
    device = next(model.parameters()).device
    try:
        model.eval()
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            mask[:] = [attention_mask.float()]
            tokens += attention_mask.sum().double().cpu()
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    if tokens == 0:
        raise ValueError("block_influence: the batches hold no tokens (attention_mask all 0)")
    return sums, tokens


def least_influential(influence: torch.Tensor, count: int) -> list[int]:
    """The indices of the ``count`` blocks of lowest ``influence``, in increasing index order
    (ties: the deeper block first, as deeper blocks are the more redundant ones in LLMs).

    Example:
        >>> least_influential(torch.tensor([0.5, 0.1, 0.3, 0.1]), 2)
        [1, 3]
    """
    if not 0 < count < len(influence):
        raise ValueError(
            f"count must be in [1, {len(influence) - 1}] (at least one block stays), got {count}"
        )
    order = sorted(range(len(influence)), key=lambda i: (float(influence[i]), -i))
    return sorted(order[:count])


def remove_blocks(model: nn.Module, drop: Sequence[int]) -> list[int]:
    """Delete the blocks at indices ``drop`` of ``model``'s stack, in place, and make the
    config say so: ``num_hidden_layers`` (and ``layer_types`` where the config has one)
    shrink, the attention modules' ``layer_idx`` (their key/value cache slot) are renumbered,
    and ``config.removed_layers`` lists the removed blocks' indices in the original model.
    Returns those original indices.

    Raises:
        ValueError: an index out of range or repeated, or no block left.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> remove_blocks(model, [0]), remove_blocks(model, [1])
        ([0], [0, 2])
        >>> [block.self_attn.layer_idx for block in model.model.layers]
        [0, 1]
    """
    config = _config(model)
    blocks = decoder_blocks(model)
    drop = [int(i) for i in drop]
    if len(set(drop)) != len(drop) or any(not 0 <= i < len(blocks) for i in drop):
        raise ValueError(
            f"blocks to remove must be distinct indices in [0, {len(blocks)}), got {drop}"
        )
    if len(drop) >= len(blocks):
        raise ValueError(f"removing {len(drop)} of {len(blocks)} blocks leaves none")
    removed_before = [int(i) for i in getattr(config, REMOVED_KEY, None) or []]
    original = [i for i in range(len(blocks) + len(removed_before)) if i not in removed_before]
    for index in sorted(drop, reverse=True):
        del blocks[index]
    for index, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == config.num_hidden_layers:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in drop]
    config.num_hidden_layers = len(blocks)
    removed = sorted(removed_before + [original[i] for i in drop])
    setattr(config, REMOVED_KEY, removed)
    return removed


def depth_in_state(state: Mapping[str, Any], path: str) -> int | None:
    """How many blocks the weights in ``state`` hold under the stack at ``path`` (``None``:
    none of its keys are there).

    Example:
        >>> depth_in_state({"model.layers.0.w": 0, "model.layers.3.w": 0}, "model.layers")
        4
    """
    pattern = re.compile(re.escape(path) + r"\.(\d+)\.")
    found = [int(m.group(1)) for key in state if (m := pattern.match(key))]
    return max(found) + 1 if found else None


def cut_like_state(module: nn.Module, state: Mapping[str, Any], prefix: str = "") -> int | None:
    """Cut the stack of blocks of ``module`` (a Hugging Face model, or a module holding one as
    ``model``, e.g. a task) to the depth of the weights in ``state`` (keys under ``prefix``),
    its last blocks removed: every remaining block's weights then come from ``state``. Returns
    the new depth, or ``None`` when nothing was cut (``state`` as deep as the model, or no
    stack of blocks in either).

    Raises:
        ValueError: ``state`` holds more blocks than ``module`` (they cannot be put back).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
        >>> model = LlamaForCausalLM(config)
        >>> cut_like_state(model, {"model.layers.1.mlp.up_proj.weight": None})
        2
    """
    model = module if hasattr(module, "config") else getattr(module, "model", None)
    if not isinstance(model, nn.Module):
        return None
    try:
        blocks = decoder_blocks(model)
    except ValueError:  # no stack of blocks: nothing to cut
        return None
    path = next(name for name, child in module.named_modules() if child is blocks)
    saved = depth_in_state(state, prefix + path)
    if saved is None or saved == len(blocks):
        return None
    if saved > len(blocks):
        raise ValueError(
            f"the weights hold {saved} blocks but the model has {len(blocks)}; blocks cannot be "
            "put back: load them into a model of at least that depth"
        )
    remove_blocks(model, range(saved, len(blocks)))
    return saved
