r"""Quantization-aware training (QAT) on torchao: recipes, prepare/convert, errors and export.

QAT trains through *fake* quantization: the forward pass uses ``Q(W) = s * (clamp(round(W / s),
q_min, q_max))`` (per group of ``group_size`` input columns, or per output row, symmetric), and
the backward pass treats rounding as the identity (straight-through estimator), so the float
weights learn to sit where rounding hurts least. Conversion then stores ``round(W / s)`` as
integers with the scales: the converted model computes what the fake-quantized one computed.

Everything here builds on torchao's ``quantize_(model, QATConfig(base_config, step=...))``:
a :class:`QuantizationRecipe` pairs a base post-training config for linear layers with a
weight-only one for embeddings (they hold half of a small encoder's weights, and no activation
quantization applies to a lookup), and these functions apply it to selected modules.

Presets (``group_size`` defaults to 32; every weight mapping is symmetric, so a pruned zero stays
exactly zero through fake quantization and conversion):

* ``int8_dynamic_act_int4_weight``: int4 weights per group, int8 activations per token
  (asymmetric, dynamic); embeddings int4 per group.
* ``int4_weight_only``: int4 weights per group, float activations; embeddings the same.
* ``int8_weight_only``: int8 weights per output row; embeddings the same.
* ``float8_dynamic_act_float8_weight``: float8 (e4m3) weights and activations per row, linear
  layers only; needs a CUDA GPU of compute capability 8.9 or newer.

On CPU torchao stores int4 values one per byte (``IntxUnpackedToInt8Tensor``);
:func:`export_quantized` packs them two per byte on disk and :func:`load_quantized` unpacks them.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    >>> recipe = QuantizationRecipe.from_preset("int8_weight_only")
    >>> prepare(model, recipe, select_modules(model, exclude=r"^2\."))
    ['0']
    >>> convert(model, recipe)
    ['0']
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_3d.sensitivity import compile_pattern, local_part
from lightning_3d.sharding import shard_all_reduce

if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig

log = logging.getLogger(__name__)

PRESETS = (
    "int8_dynamic_act_int4_weight",
    "int4_weight_only",
    "int8_weight_only",
    "float8_dynamic_act_float8_weight",
)
FLOAT8_PRESETS = ("float8_dynamic_act_float8_weight",)
STAGES = ("float", "fake_quant", "converted")
ARTEFACT_FILE = "quantized_model.pt"
REPORT_FILE = "quantization_report.json"
ARTEFACT_FORMAT = 1


@dataclass
class QuantizationRecipe:
    """What to quantize how: torchao base configs for linear layers and for embeddings.

    Args:
        name: the preset name, or the config's class name.
        linear: base post-training config for ``nn.Linear`` (QAT infers the fake quantizers).
        embedding: weight-only base config for ``nn.Embedding``; ``None`` keeps embeddings float.

    Example:
        >>> QuantizationRecipe.from_preset("int4_weight_only", group_size=64).name
        'int4_weight_only'
    """

    name: str
    linear: AOBaseConfig
    embedding: AOBaseConfig | None = None

    @classmethod
    def from_preset(cls, preset: str, group_size: int = 32) -> QuantizationRecipe:
        """The recipe of a preset name (see the module docstring).

        Raises:
            ValueError: an unknown name (the message lists the presets) or a bad group size.
        """
        if preset not in PRESETS:
            raise ValueError(f"unknown quantization preset {preset!r}; presets: {list(PRESETS)}")
        if group_size < 2 or group_size & (group_size - 1):
            raise ValueError(f"group_size must be a power of two >= 2, got {group_size}")
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int8DynamicActivationIntxWeightConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerAxis, PerGroup, PerRow

        int4 = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))
        if preset == "int8_dynamic_act_int4_weight":
            linear = Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)
            )
            return cls(preset, linear, int4)
        if preset == "int4_weight_only":
            return cls(preset, int4, int4)
        if preset == "int8_weight_only":
            int8 = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
            return cls(preset, int8, int8)
        return cls(preset, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))

    @classmethod
    def from_config(cls, config: AOBaseConfig) -> QuantizationRecipe:
        """A recipe for any torchao base config that QAT supports (linear layers only).

        Raises:
            ValueError: torchao cannot fake-quantize for this config.
        """
        from torchao.quantization import quantize_
        from torchao.quantization.qat import QATConfig

        try:  # torchao infers the fake quantizers from the config, or refuses it
            quantize_(nn.Sequential(nn.Linear(4096, 8)), QATConfig(config, step="prepare"))
        except (ValueError, AssertionError, NotImplementedError) as error:
            raise ValueError(
                f"torchao has no quantization-aware training for {type(config).__name__}: "
                f"{error}; use a preset {list(PRESETS)} or a config QATConfig accepts"
            ) from None
        return cls(type(config).__name__, config)

    @property
    def needs_float8_gpu(self) -> bool:
        """Float8 kernels need CUDA compute capability 8.9+ (Ada, Hopper and newer)."""
        return "Float8" in type(self.linear).__name__

    def group_size(self, kind: type[nn.Module]) -> int | None:
        """The group size of the weight granularity for ``nn.Linear`` or ``nn.Embedding``."""
        config = self.linear if kind is nn.Linear else self.embedding
        granularity = getattr(config, "weight_granularity", getattr(config, "granularity", None))
        return getattr(granularity, "group_size", None)


def resolve_recipe(quantization: str | AOBaseConfig, group_size: int = 32) -> QuantizationRecipe:
    """A preset name or a torchao config object, as a :class:`QuantizationRecipe`."""
    if isinstance(quantization, QuantizationRecipe):
        return quantization
    if isinstance(quantization, str):
        return QuantizationRecipe.from_preset(quantization, group_size)
    return QuantizationRecipe.from_config(quantization)


def float8_supported(device: torch.device) -> bool:
    """Whether torchao's float8 matmuls run on ``device`` (CUDA, capability 8.9 or newer)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_device(recipe: QuantizationRecipe, device: torch.device) -> None:
    """Raise before training when ``recipe`` cannot run on ``device`` (float8 off a new GPU)."""
    if recipe.needs_float8_gpu and not float8_supported(device):
        int_presets = [p for p in PRESETS if p not in FLOAT8_PRESETS]
        raise ValueError(
            f"{recipe.name} needs a CUDA GPU of compute capability 8.9 or newer "
            f"(training on {device}); use an int preset {int_presets}"
        )


def check_qat_arguments(start_step: int | None, start_epoch: int | None, error_every: int) -> None:
    """Check ``QATHook``'s schedule arguments (the recipe checks its own).

    Example:
        >>> check_qat_arguments(10, 1, 50)
        Traceback (most recent call last):
        ...
        ValueError: give start_step or start_epoch, not both; got start_step=10, start_epoch=1
    """
    if start_step is not None and start_epoch is not None:
        raise ValueError(
            f"give start_step or start_epoch, not both; got start_step={start_step}, "
            f"start_epoch={start_epoch}"
        )
    if (start_step or 0) < 0 or (start_epoch or 0) < 0:
        raise ValueError(
            f"start_step and start_epoch must be >= 0, got {start_step}, {start_epoch}"
        )
    if error_every < 0:
        raise ValueError(f"error_every must be >= 0, got {error_every}")


def _is_fake_quantized(module: nn.Module) -> bool:
    return hasattr(module, "weight_fake_quantizer")


def select_modules(
    model: nn.Module,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: bool = True,
) -> list[str]:
    r"""Names of the linear (and, with ``embeddings``, embedding) modules to quantize.

    A module is selected when the name of its weight (``"<module>.weight"``) matches ``include``
    (default: all) and not ``exclude``; the same convention as the freezer and the pruner.

    Example:
        >>> select_modules(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), exclude=r"^1\.")
        ['0']
    """
    include_re = compile_pattern("include", include)
    exclude_re = compile_pattern("exclude", exclude)
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, kinds):
            continue
        weight = f"{name}.weight"
        if include_re is not None and not include_re.search(weight):
            continue
        if exclude_re is not None and exclude_re.search(weight):
            continue
        names.append(name)
    return names


def check_group_sizes(model: nn.Module, names: Iterable[str], recipe: QuantizationRecipe) -> None:
    """Raise ``ValueError`` naming every selected module whose rows do not split into groups."""
    modules = dict(model.named_modules())
    wrong = []
    for name in names:
        module = modules[name]
        kind = nn.Embedding if isinstance(module, nn.Embedding) else nn.Linear
        group = recipe.group_size(kind)
        width = module.weight.shape[1]
        if group is not None and width % group:
            wrong.append(f"{name} ({width} columns)")
    if wrong:
        raise ValueError(
            f"these modules' rows do not split into groups of {recipe.group_size(nn.Linear)}: "
            f"{', '.join(wrong)}; pass a group_size that divides them or exclude them"
        )


def prepare(model: nn.Module, recipe: QuantizationRecipe, names: Iterable[str]) -> list[str]:
    """Swap the named modules for torchao's fake-quantized ones, in place; return their names.

    The new modules hold the *same* ``Parameter`` objects (names, optimizer state and pruning
    masks keep pointing at them) and the same state-dict keys. Embeddings are swapped only when
    the recipe has an embedding config; names already fake-quantized are skipped.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    selected = set(names)
    check_group_sizes(model, selected, recipe)
    done: list[str] = []

    def pick(kind: type[nn.Module]) -> Callable[[nn.Module, str], bool]:
        def chosen(module: nn.Module, fqn: str) -> bool:
            hit = fqn in selected and isinstance(module, kind) and not _is_fake_quantized(module)
            if hit:
                done.append(fqn)
            return hit

        return chosen

    quantize_(model, QATConfig(recipe.linear, step="prepare"), filter_fn=pick(nn.Linear))
    if recipe.embedding is not None:
        config = QATConfig(recipe.embedding, step="prepare")
        quantize_(model, config, filter_fn=pick(nn.Embedding))
    return sorted(done, key=list(dict(model.named_modules())).index)


def fake_quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The fake-quantized modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if _is_fake_quantized(m)}


def set_fake_quantization(model: nn.Module, enabled: bool) -> int:
    """Switch every fake quantizer (weights and activations) on or off; return how many."""
    count = 0
    for module in model.modules():
        for attribute in ("weight_fake_quantizer", "activation_fake_quantizer"):
            quantizer = getattr(module, attribute, None)
            if quantizer is not None:
                quantizer.enabled = enabled
                count += 1
    return count


def convert(model: nn.Module, recipe: QuantizationRecipe) -> list[str]:
    """Replace every fake-quantized module by a plain one with quantized weights, in place.

    Returns the converted module names. The weights become torchao quantized tensors (no
    gradients); the forward pass computes what the fake-quantized forward computed.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names = list(fake_quantized_modules(model))
    set_fake_quantization(model, True)  # conversion rounds, whatever the training stage was
    linear = [n for n in names if not isinstance(model.get_submodule(n), nn.Embedding)]
    for config, chosen in ((recipe.linear, linear), (recipe.embedding, names)):
        if config is None:
            continue
        quantize_(
            model,
            QATConfig(config, step="convert"),
            filter_fn=lambda module, fqn, chosen=set(chosen): fqn in chosen,
        )
    return names


def convert_with_report(
    model: nn.Module, recipe: QuantizationRecipe
) -> tuple[list[str], dict[str, Any]]:
    """:func:`convert` ``model`` and return the converted modules with a report: bytes before
    (``float_bytes``) and after (``quantized_bytes``), the modules and the per-layer relative
    weight errors measured before conversion (``weight_errors``)."""
    errors = weight_quantization_errors(model)
    float_bytes = model_bytes(model)
    modules = convert(model, recipe)
    report = {
        "float_bytes": float_bytes,
        "quantized_bytes": model_bytes(model),
        "modules": modules,
        "weight_errors": errors,
    }
    log.info(
        "QAT (%s): converted %d modules, %.1f MiB -> %.1f MiB",
        recipe.name, len(modules), float_bytes / 2**20, report["quantized_bytes"] / 2**20,
    )  # fmt: skip
    return modules, report


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is a torchao quantized tensor (converted modules)."""
    return [
        name
        for name, module in model.named_modules()
        if hasattr(getattr(module, "weight", None), "tensor_data_names")
    ]


@torch.no_grad()
def dequantize(model: nn.Module, names: Iterable[str]) -> None:
    """Give the named converted modules float weights again (the dequantized values), in place.

    The inverse of :func:`convert` up to rounding: :func:`prepare` and :func:`convert` then
    quantize them anew, e.g. after loading float weights into them.
    """
    for name in names:
        module = model.get_submodule(name)
        module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)


@torch.no_grad()
def weight_quantization_errors(model: nn.Module) -> dict[str, float]:
    """Relative error ``||Q(W) - W|| / ||W||`` of every fake-quantized weight, by module name.

    Under FSDP2 each rank quantizes the rows it holds (groups and rows never straddle shards)
    and the squared norms are summed over the ranks: a collective, call it on every rank.
    """
    modules = fake_quantized_modules(model)
    if not modules:
        return {}
    rows = []  # [squared error, squared norm] per module, on the weights' device: one sync
    for module in modules.values():
        weight = local_part(module.weight).detach()
        quantizer = module.weight_fake_quantizer
        enabled, quantizer.enabled = quantizer.enabled, True
        try:
            quantized = quantizer(weight)
        finally:
            quantizer.enabled = enabled
        error = (quantized.double() - weight.double()).square().sum()
        rows.append(torch.stack((error, weight.double().square().sum())))
    sums = torch.stack(rows)
    reduce = shard_all_reduce(m.weight for m in modules.values())
    if reduce is not None:
        sums = reduce(sums)
    sums = sums.cpu()
    errors = (sums[:, 0] / sums[:, 1].clamp_min(1e-30)).sqrt()
    return dict(zip(modules, errors.tolist(), strict=True))


def _components(tensor: torch.Tensor) -> list[torch.Tensor]:
    names = getattr(tensor, "tensor_data_names", None)
    if names is None:
        return [tensor]
    return [getattr(tensor, n) for n in names if getattr(tensor, n, None) is not None]


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (quantized tensors counted by their integer data and scales)."""
    parts = (part for tensor in model.state_dict().values() for part in _components(tensor))
    return sum(part.numel() * part.element_size() for part in parts)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Two signed 4-bit values per byte along the last dimension (even length).

    ``byte = (v[2i] & 0xF) | (v[2i+1] & 0xF) << 4``.

    Example:
        >>> pack_int4(torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8))
        tensor([[120, 241]], dtype=torch.uint8)
    """
    if values.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {tuple(values.shape)}")
    nibbles = values.to(torch.int16) & 0xF
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`, as ``int8`` in ``[-8, 7]``.

    Example:
        >>> unpack_int4(torch.tensor([[120, 241]], dtype=torch.uint8))
        tensor([[-8,  7,  1, -1]], dtype=torch.int8)
    """
    wide = packed.to(torch.int16)
    nibbles = torch.stack((wide & 0xF, wide >> 4), dim=-1).flatten(-2)
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def _enum_value(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def to_plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a state dict with every torchao ``IntxUnpackedToInt8Tensor`` split into plain
    tensors: ``<key>::qdata`` (two values per byte when at most 4 bits), ``<key>::scale``,
    ``<key>::zero_point`` and ``<key>::layout`` (bits, block size, dtype, activation scheme).

    Plain tensors load anywhere (``torch.load`` with any ``map_location``, ``weights_only``);
    :func:`from_plain_state` rebuilds the quantized tensors.
    """
    from torchao.quantization import IntxUnpackedToInt8Tensor

    plain: dict[str, Any] = {}
    for key, tensor in state.items():
        if not isinstance(tensor, IntxUnpackedToInt8Tensor):
            plain[key] = tensor
            continue
        bits = int(str(tensor.target_dtype).removeprefix("torch.int"))
        packed = bits <= 4 and tensor.shape[-1] % 2 == 0
        plain[f"{key}::qdata"] = pack_int4(tensor.qdata) if packed else tensor.qdata
        plain[f"{key}::scale"] = tensor.scale
        plain[f"{key}::zero_point"] = tensor.zero_point
        plain[f"{key}::layout"] = {
            "bits": bits,
            "packed": packed,
            "block_size": list(tensor.block_size),
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "activation_quantization": _enum_value(tensor.activation_quantization),
        }
    return plain


def from_plain_state(state: dict[str, Any]) -> dict[str, Any]:
    """Rebuild, in place, the quantized tensors that :func:`to_plain_state` split; return it."""
    from torchao.quantization import IntxUnpackedToInt8Tensor
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8TensorActivationQuantization as ActivationQuantization,
    )

    for layout_key in [k for k in state if k.endswith("::layout")]:
        key = layout_key.removesuffix("::layout")
        layout = state.pop(layout_key)
        qdata = state.pop(f"{key}::qdata")
        activation = layout["activation_quantization"]
        state[key] = IntxUnpackedToInt8Tensor(
            unpack_int4(qdata) if layout["packed"] else qdata,
            state.pop(f"{key}::scale"),
            state.pop(f"{key}::zero_point"),
            getattr(torch, f"int{layout['bits']}"),
            tuple(layout["block_size"]),
            getattr(torch, layout["dtype"]),
            None if activation is None else ActivationQuantization(activation),
        )
    return state


def export_quantized(
    model: nn.Module,
    path: str | os.PathLike[str],
    recipe: QuantizationRecipe | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    float_bytes: int | None = None,
) -> dict[str, Any]:
    """Write a converted model to the folder ``path`` with a report; return the report.

    ``model`` is either already converted, or fake-quantized (then ``recipe`` is needed and the
    model is converted *in place*). The folder gets ``quantized_model.pt`` (int4 packed two per
    byte), the Hugging Face ``config.json`` when the model has one, and
    ``quantization_report.json``: bytes of the float model and of the converted one (in memory
    and on disk), the quantized modules, and, when ``evaluate(model) -> float`` is given (for
    example an accuracy), its value before and after conversion. For a model converted earlier,
    pass ``float_bytes`` (measured before conversion; otherwise the converted size is reported
    for both). Load with :func:`load_quantized`.

    Example:
        >>> report = export_quantized(model, "out/qat", recipe)  # doctest: +SKIP
    """
    folder = Path(path)
    report: dict[str, Any] = {"float_bytes": float_bytes or model_bytes(model)}
    if fake_quantized_modules(model):
        if recipe is None:
            raise ValueError("the model is fake-quantized: pass the recipe to convert it")
        if evaluate is not None:
            set_fake_quantization(model, True)
            with torch.no_grad():
                report["metric_before_conversion"] = float(evaluate(model))
        report["quantized_modules"] = convert(model, recipe)
    else:
        report["quantized_modules"] = quantized_modules(model)
        if evaluate is not None:
            report["metric_before_conversion"] = None  # converted earlier: nothing to compare
    if evaluate is not None:
        with torch.no_grad():
            report["metric_after_conversion"] = float(evaluate(model))
    if recipe is not None:
        report["recipe"] = recipe.name
    folder.mkdir(parents=True, exist_ok=True)
    document = {"format": ARTEFACT_FORMAT, "state_dict": to_plain_state(model.state_dict())}
    torch.save(document, folder / ARTEFACT_FILE)
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]  # what load_quantized builds
        config.save_pretrained(folder)
    report["quantized_bytes"] = model_bytes(model)
    report["file_bytes"] = (folder / ARTEFACT_FILE).stat().st_size
    report["compression"] = report["float_bytes"] / report["file_bytes"]
    (folder / REPORT_FILE).write_text(json.dumps(report, indent=1))
    log.info(
        "quantized model written to %s: %.1f MiB -> %.1f MiB on disk (%.2fx)",
        folder,
        report["float_bytes"] / 2**20,
        report["file_bytes"] / 2**20,
        report["compression"],
    )
    return report


def load_quantized(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load what :func:`export_quantized` wrote, in eval mode.

    ``model`` is a float model of the same architecture to fill (its weights are replaced); by
    default it is built from the folder's ``config.json`` with Hugging Face ``transformers``,
    with physically removed heads and neurons shrunk as recorded there (for a PEFT/LoRA model
    pass the wrapped model: its class is not a ``transformers`` one).

    Example:
        >>> model = load_quantized("out/qat")  # doctest: +SKIP
    """
    folder = Path(path)
    if not (folder / ARTEFACT_FILE).exists():
        raise FileNotFoundError(f"no {ARTEFACT_FILE} in {folder}: not an export_quantized folder")
    document = torch.load(folder / ARTEFACT_FILE, weights_only=True, mmap=True)
    if document.get("format") != ARTEFACT_FORMAT:
        raise ValueError(f"unknown quantized artefact format {document.get('format')!r}")
    state = from_plain_state(document["state_dict"])
    if model is None:
        from lightning_3d.pruning import build_from_config

        model = build_from_config(folder)
    model.load_state_dict(state, assign=True)
    return model.eval()
