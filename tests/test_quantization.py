"""The QAT core on tensors and small modules: presets, selection, fake quantization against a
hand-written quantizer, conversion, int4 packing, errors, bytes, export and reload."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lightning_3d.pruning import DEFAULT_EXCLUDE
from lightning_3d.quantization import (
    PRESETS,
    QuantizationRecipe,
    check_group_sizes,
    convert,
    export_quantized,
    fake_quantized_modules,
    load_quantized,
    model_bytes,
    pack_int4,
    prepare,
    resolve_recipe,
    select_modules,
    set_fake_quantization,
    unpack_int4,
    weight_quantization_errors,
)


class Tiny(nn.Module):
    """An embedding, two hidden linear layers and a ``classifier`` head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 64)
        self.hidden = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        self.classifier = nn.Linear(64, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.hidden(self.embed(ids)).mean(1))


def symmetric_reference(weight: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """``s * clamp(round(W * (1 / s)), -2^(b-1), 2^(b-1) - 1)`` with ``s = max|W| / ((2^b - 1) /
    2)`` per group of ``group`` columns (per row when ``None``)."""
    rows = weight.reshape(-1, group) if group else weight
    scale = rows.abs().amax(dim=1, keepdim=True) / ((2**bits - 1) / 2)
    q = torch.clamp(torch.round(rows * (1.0 / scale)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * scale).reshape(weight.shape)


def prepared(preset: str, **selection) -> tuple[Tiny, QuantizationRecipe, list[str]]:
    model = Tiny()
    recipe = QuantizationRecipe.from_preset(preset)
    names = prepare(model, recipe, select_modules(model, exclude=DEFAULT_EXCLUDE, **selection))
    return model, recipe, names


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown quantization preset 'int3'") as error:
        QuantizationRecipe.from_preset("int3")
    for preset in PRESETS:
        assert preset in str(error.value)


def test_group_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="group_size must be a power of two >= 2, got 24"):
        QuantizationRecipe.from_preset("int4_weight_only", group_size=24)


def test_any_torchao_config_qat_supports_is_accepted_and_others_are_refused():
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    config = IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(16))
    recipe = resolve_recipe(config)
    assert (recipe.name, recipe.linear, recipe.embedding) == ("IntxWeightOnlyConfig", config, None)
    with pytest.raises(ValueError, match="no quantization-aware training for Int8WeightOnlyConfig"):
        resolve_recipe(Int8WeightOnlyConfig())


def test_prepare_swaps_only_the_selected_modules_and_keeps_parameters_and_keys():
    model = Tiny()
    params = dict(model.named_parameters())
    keys = set(model.state_dict())
    names = prepare(
        model,
        QuantizationRecipe.from_preset("int8_dynamic_act_int4_weight"),
        select_modules(model, include=r"^(embed|hidden\.0)\.", exclude=DEFAULT_EXCLUDE),
    )
    assert names == ["embed", "hidden.0"]
    assert sorted(fake_quantized_modules(model)) == ["embed", "hidden.0"]
    assert type(model.hidden[2]) is nn.Linear and type(model.classifier) is nn.Linear
    assert model.hidden[0].activation_fake_quantizer is not None  # int8 activations
    assert not hasattr(model.embed, "activation_fake_quantizer")  # a lookup: weights only
    assert set(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert prepare(model, QuantizationRecipe.from_preset("int4_weight_only"), names) == []


def test_default_selection_skips_head_pooler_and_lora_and_embeddings_on_request():
    model = Tiny()
    model.pooler = nn.Linear(64, 64)
    model.lora_A = nn.Linear(64, 4)
    assert select_modules(model, exclude=DEFAULT_EXCLUDE) == ["embed", "hidden.0", "hidden.2"]
    assert select_modules(model, exclude=DEFAULT_EXCLUDE, embeddings=False) == [
        "hidden.0",
        "hidden.2",
    ]
    with pytest.raises(ValueError, match=r"include='\(' is not a valid regex"):
        select_modules(model, include="(")


@pytest.mark.parametrize(
    ("preset", "bits", "group"), [("int4_weight_only", 4, 32), ("int8_weight_only", 8, None)]
)
def test_fake_quantization_matches_a_hand_written_quantizer(preset, bits, group):
    ids = torch.randint(0, 50, (4, 5))
    float_out = Tiny()(ids)
    model, _, _ = prepared(preset)
    weight = model.hidden[0].weight.detach()
    set_fake_quantization(model, False)  # off: the float forward
    assert torch.equal(model(ids), float_out)
    set_fake_quantization(model, True)  # on: the forward uses Q(W)
    fake = model.hidden[0].weight_fake_quantizer(weight)
    torch.testing.assert_close(fake, symmetric_reference(weight, bits, group), rtol=0, atol=1e-6)
    assert not torch.equal(model(ids), float_out)
    errors = weight_quantization_errors(model)
    expected = (fake - weight).norm() / weight.norm()
    assert errors["hidden.0"] == pytest.approx(expected.item(), rel=1e-5)
    assert set(errors) == {"embed", "hidden.0", "hidden.2"}


@pytest.mark.parametrize("preset", ["int8_dynamic_act_int4_weight", "int8_weight_only"])
def test_convert_yields_quantized_weights_with_the_prepared_predictions(preset):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    model, recipe, names = prepared(preset)
    set_fake_quantization(model, True)
    ids = torch.randint(0, 50, (16, 7))
    with torch.no_grad():
        fake = model(ids)
    float_bytes = model_bytes(model)
    assert convert(model, recipe) == names
    assert not fake_quantized_modules(model)
    for name in names:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, IntxUnpackedToInt8Tensor) and weight.qdata.dtype == torch.int8
    assert type(model.classifier.weight) is nn.Parameter  # the head stays float
    with torch.no_grad():
        converted = model(ids)
    # measured: bit-identical on CPU (the same rounding); allow float reassociation elsewhere
    torch.testing.assert_close(converted, fake, rtol=0, atol=1e-5)
    assert model_bytes(model) < float_bytes / 3


def test_pruned_zeros_stay_zero_through_fake_quantization_and_conversion():
    model, recipe, _ = prepared("int8_dynamic_act_int4_weight")
    weight = model.hidden[2].weight
    with torch.no_grad():
        weight[torch.rand_like(weight) < 0.6] = 0.0
    zeros = weight.detach() == 0
    set_fake_quantization(model, True)
    assert torch.all(model.hidden[2].weight_fake_quantizer(weight.detach())[zeros] == 0)
    convert(model, recipe)
    quantized = model.hidden[2].weight
    assert torch.all(quantized.qdata[zeros] == 0)
    assert torch.all(quantized.dequantize()[zeros] == 0)


def test_int4_packing_round_trips_every_value():
    values = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 16)
    assert torch.equal(unpack_int4(packed), values)
    with pytest.raises(ValueError, match="even last dimension"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_group_sizes_that_do_not_divide_the_rows_are_named():
    model = nn.Sequential(nn.Linear(48, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"groups of 32: 0 \(48 columns\), 1 \(8 columns\)"):
        check_group_sizes(model, ["0", "1"], QuantizationRecipe.from_preset("int4_weight_only"))


def test_export_writes_packed_int4_and_a_report_and_loads_back(tmp_path):
    model, recipe, names = prepared("int8_dynamic_act_int4_weight")
    ids = torch.randint(0, 50, (8, 5))
    float_bytes = model_bytes(model)
    report = export_quantized(model, tmp_path / "qat", recipe, evaluate=lambda m: m(ids).sum())
    with torch.no_grad():
        converted = model(ids)
    assert report["metric_before_conversion"] == pytest.approx(converted.sum().item(), abs=1e-4)
    assert report["metric_after_conversion"] == pytest.approx(converted.sum().item(), abs=1e-6)
    assert report["quantized_modules"] == names and report["float_bytes"] == float_bytes
    # int4 packed two per byte: the file is smaller than the int8-held tensors in memory
    assert report["file_bytes"] < report["quantized_bytes"] < float_bytes
    assert json.loads((tmp_path / "qat" / "quantization_report.json").read_text()) == report
    reloaded = load_quantized(tmp_path / "qat", Tiny())
    with torch.no_grad():
        assert torch.equal(reloaded(ids), converted)
    assert not reloaded.training
    with pytest.raises(ValueError, match="pass the recipe"):
        export_quantized(prepared("int4_weight_only")[0], tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="not an export_quantized folder"):
        load_quantized(tmp_path)
