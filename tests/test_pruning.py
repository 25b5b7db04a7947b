"""The pruning core on plain tensors and small models: schedules against hand computation, masks
against reference selections, N:M, structures, sensitivity allocation, structured export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from lightning_3d.pruning import (
    StructureGroup,
    allocate_sparsity,
    export_structured,
    find_structures,
    keep_top,
    load_pruned,
    mask_optimizer_state,
    n_m_mask,
    obeys_n_m,
    parse_pattern,
    remove_dead_units,
    remove_pruned_structures,
    sparsity_at,
    structured_masks,
    unstructured_masks,
)


@pytest.mark.parametrize(
    ("schedule", "half_way"),
    [
        ("cubic", 0.8 + (0.2 - 0.8) * 0.5**3),  # 0.725
        ("linear", 0.5),
        ("exponential", 1 - 0.8 * (0.2 / 0.8) ** 0.5),  # density 0.8 -> 0.2 geometrically
        ("cosine", 0.2 + 0.6 * (1 - math.cos(math.pi / 2)) / 2),
    ],
)
def test_schedules_by_hand(schedule: str, half_way: float) -> None:
    def at(step: int, frequency: int = 1) -> float:
        return sparsity_at(
            step, start=100, end=200, final=0.8, initial=0.2, schedule=schedule, frequency=frequency
        )

    assert at(99) == 0.0  # nothing before the window
    assert at(100) == pytest.approx(0.2)
    assert at(150) == pytest.approx(half_way)
    assert at(200) == at(1000) == 0.8
    values = [at(t) for t in range(100, 201)]
    assert values == sorted(values)  # never falls
    # between updates the value holds: with frequency 30, step 159 still reads step 150's value
    assert at(159, frequency=30) == at(130) and at(160, frequency=30) == at(160)


def test_schedule_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        sparsity_at(1, start=0, end=2, final=0.5, schedule="step")


def reference_keep(values: list[float], keep: int) -> list[bool]:
    """The ``keep`` highest values, ties to the lower index (NaN lowest)."""
    clean = [-math.inf if math.isnan(v) else v for v in values]
    order = sorted(range(len(values)), key=lambda i: (-clean[i], i))
    kept = set(order[:keep])
    return [i in kept for i in range(len(values))]


@pytest.mark.parametrize("seed", range(5))
def test_keep_top_matches_a_stable_sort_with_many_ties(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(0, 4, (200,), generator=generator).float()
    values[::17] = float("nan")
    for keep in (0, 1, 37, 100, 199, 200, 250):
        assert keep_top(values, keep).tolist() == reference_keep(values.tolist(), keep)


def test_unstructured_masks_per_tensor_and_global() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.randn(10, 10), "b": torch.randn(4, 25) * 5}
    per_tensor = unstructured_masks(scores, 0.3)
    assert [int((~m).sum()) for m in per_tensor.values()] == [30, 30]
    for name, mask in per_tensor.items():
        assert scores[name][mask].min() >= scores[name][~mask].max()
    both = unstructured_masks(scores, 0.7, scope="global")
    kept = torch.cat([scores[n][both[n]] for n in scores])
    pruned = torch.cat([scores[n][~both[n]] for n in scores])
    assert pruned.numel() == 140 and kept.min() >= pruned.max()
    per_name = unstructured_masks(scores, {"a": 0.1, "b": 0.9})
    assert int((~per_name["a"]).sum()) == 10 and int((~per_name["b"]).sum()) == 90


def test_masks_only_grow() -> None:
    scores = torch.arange(8.0)
    first = unstructured_masks({"w": scores}, 0.25)["w"]  # prunes 0 and 1
    assert first.tolist() == [False, False, *[True] * 6]
    grown = unstructured_masks({"w": scores.flip(0)}, 0.5, current={"w": first})["w"]
    # 0 and 1 now score highest but stay pruned; the next lowest scores (positions 6, 7) go
    assert grown.tolist() == [False, False, True, True, True, True, False, False]


def test_n_m_final_mask_keeps_the_largest_of_every_group() -> None:
    torch.manual_seed(1)
    weight = torch.randn(16, 32)
    mask = n_m_mask(weight.abs(), 2, 4, 0.5)
    assert obeys_n_m(weight * mask, 2, 4) and int(mask.sum()) == weight.numel() // 2
    top2 = weight.abs().reshape(-1, 4).topk(2, dim=1).indices
    reference = torch.zeros(weight.numel() // 4, 4, dtype=torch.bool).scatter_(1, top2, True)
    assert torch.equal(mask, reference.view_as(weight))


def test_n_m_on_the_way_prunes_exact_counts_and_ends_in_the_pattern() -> None:
    torch.manual_seed(2)
    weight = torch.randn(8, 16)
    mask = None
    for sparsity in (0.1, 0.25, 0.4, 0.5):
        weight = weight + 0.3 * torch.randn_like(weight)  # scores change between updates
        new = n_m_mask(weight.abs(), 2, 4, sparsity, mask)
        assert int((~new).sum()) == round(sparsity * weight.numel())
        assert mask is None or not (new & ~mask).any()  # nothing comes back
        assert ((~new).reshape(-1, 4).sum(1) <= 2).all()  # never more than m - n per group
        mask = new
    assert obeys_n_m(torch.where(mask, 1.0, 0.0), 2, 4)


def test_n_m_rejects_widths_not_divisible_by_m() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        n_m_mask(torch.ones(2, 6), 2, 4, 0.5)


@pytest.mark.parametrize("pattern", ["", "4:2", "0:4", "2:2", "block", "2-4"])
def test_parse_pattern_errors(pattern: str) -> None:
    with pytest.raises(ValueError, match="pattern must be"):
        parse_pattern(pattern)


def test_structure_group_by_hand() -> None:
    group = StructureGroup("n", "neurons", 2, (("up", 0), ("down", 1)))
    up = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # two rows per unit
    down = torch.tensor([[10.0, 0.0, 1.0, 1.0]])  # two columns per unit
    assert group.unit_scores({"up": up, "down": down}).tolist() == [6.0 + 10.0, 14.0 + 2.0]
    masks = structured_masks([group], {"up": up, "down": down}, 0.5)  # a tie: unit 0 stays
    assert masks["up"][:, 0].tolist() == [True, True, False, False]
    assert masks["down"][0].tolist() == [True, True, False, False]


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=12,
        max_position_embeddings=16,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config).eval()


def masked_copy(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])


@pytest.mark.parametrize("kinds", [("heads", "neurons"), ("neurons",)])
def test_structured_export_is_smaller_and_computes_the_masked_function(
    tmp_path: Path, kinds: tuple[str, ...]
) -> None:
    model = tiny_bert()
    groups = find_structures(model, kinds)
    assert len(groups) == 2 * len(kinds)
    params = dict(model.named_parameters())
    scores = {p: params[p].detach().abs() for g in groups for p, _ in g.members}
    masks = structured_masks(groups, scores, 0.5)
    masked_copy(model, masks)
    ids = torch.randint(0, 50, (3, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    before = sum(p.numel() for p in model.parameters())
    export_structured(model, groups, masks, tmp_path)
    removed = sum(p.numel() for p in model.parameters())
    # each layer loses 2 of 4 heads (3 x (16x8 + 8) + 16x8) and/or 6 of 12 neurons (16x6 + 6 + 6x16)
    per_layer = (3 * (16 * 8 + 8) + 16 * 8 if "heads" in kinds else 0) + 16 * 6 + 6 + 6 * 16
    assert before - removed == 2 * per_layer
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
        loaded = load_pruned(tmp_path)
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-5)
        if kinds == ("neurons",):  # the config says it all: plain from_pretrained loads it
            plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
            assert plain.config.intermediate_size == 6
            assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-5)


def tiny_llama() -> LlamaForCausalLM:
    """Grouped-query attention: 6 query heads of size 4 in 3 key/value groups, 10 neurons."""
    config = LlamaConfig(
        vocab_size=50, hidden_size=24, intermediate_size=10, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, head_dim=4, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_llama_heads_are_key_value_groups_with_their_query_heads() -> None:
    model = tiny_llama()
    heads = find_structures(model, ["heads"])
    assert [g.name for g in heads] == [f"model.layers.{i}.self_attn.heads" for i in range(2)]
    group = heads[0]
    assert group.units == 3  # key/value heads; each carries 2 query heads
    prefix = "model.layers.0.self_attn."
    assert group.members == (
        (prefix + "q_proj.weight", 0),
        (prefix + "k_proj.weight", 0),
        (prefix + "v_proj.weight", 0),
        (prefix + "o_proj.weight", 1),
    )
    # unit 1 is query rows 8..15 (query heads 2 and 3), key and value rows 4..7, output
    # columns 8..15: the heads that Llama's attention pairs with key/value head 1
    shapes = {p: model.get_parameter(p).shape for p, _ in group.members}
    masks = group.element_masks(torch.tensor([True, False, True]), shapes)
    assert torch.nonzero(~masks[prefix + "q_proj.weight"][:, 0]).flatten().tolist() == list(
        range(8, 16)
    )
    assert torch.nonzero(~masks[prefix + "k_proj.weight"][:, 0]).flatten().tolist() == [4, 5, 6, 7]
    assert torch.nonzero(~masks[prefix + "o_proj.weight"][0]).flatten().tolist() == list(
        range(8, 16)
    )


def test_llama_structured_export_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    model = tiny_llama()
    groups = find_structures(model, ["heads", "neurons"])
    params = dict(model.named_parameters())
    scores = {p: params[p].detach().abs() for g in groups for p, _ in g.members}
    masks = structured_masks(groups, scores, 0.4)  # 2 of 3 groups and 6 of 10 neurons kept
    masked_copy(model, masks)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    export_structured(model, groups, masks, tmp_path)
    attention = model.model.layers[1].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features) == (16, 8)
    assert model.model.layers[1].mlp.up_proj.out_features == 6
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    config = plain.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 4)
    assert config.intermediate_size == 6
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_llama_heads_that_do_not_divide_into_groups_are_refused() -> None:
    model = tiny_llama()
    attention = model.model.layers[1].self_attn
    attention.q_proj = torch.nn.Linear(24, 20, bias=False)  # 5 query heads over 3 groups
    attention.o_proj = torch.nn.Linear(20, 24, bias=False)
    with pytest.raises(ValueError, match=r"heads of model\.layers\.1\.self_attn: q_proj has 20"):
        find_structures(model, ["heads"])
    assert len(find_structures(model, ["neurons"])) == 2  # neurons alone still prune


def test_llama_dead_groups_are_removed_to_one_count_per_block() -> None:
    model = tiny_llama()
    with torch.no_grad():  # block 0: group 2 dead; block 1: groups 0 and 1 dead
        for layer, dead in ((0, [2]), (1, [0, 1])):
            attention = model.model.layers[layer].self_attn
            for group in dead:
                attention.q_proj.weight[group * 8 : (group + 1) * 8] = 0
                attention.k_proj.weight[group * 4 : (group + 1) * 4] = 0
                attention.v_proj.weight[group * 4 : (group + 1) * 4] = 0
                attention.o_proj.weight[:, group * 8 : (group + 1) * 8] = 0
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    counts = remove_dead_units(model, ["heads"], config_compatible=True)
    # one count for every block (the larger live count, 2), so the config describes it
    assert counts == {
        "model.layers.0.self_attn.heads": (2, 3),
        "model.layers.1.self_attn.heads": (2, 3),
    }
    assert (model.config.num_key_value_heads, model.config.num_attention_heads) == (2, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=0)


def test_remove_pruned_structures_counts_kept_units() -> None:
    model = tiny_bert()
    groups = find_structures(model, ["heads"])
    params = dict(model.named_parameters())
    masks = structured_masks(
        groups, {p: params[p].abs() for g in groups for p, _ in g.members}, 0.25
    )
    kept = remove_pruned_structures(model, groups, masks)
    assert sorted(kept.values()) == [3, 3]
    assert model.bert.encoder.layer[0].attention.self.query.out_features == 12


def test_allocate_sparsity_prunes_less_sensitive_tensors_harder() -> None:
    sizes = {"a": 100, "b": 300, "c": 600}
    sensitivity = {"a": 9.0, "b": 1.0, "c": 0.01}
    allocation = allocate_sparsity(sizes, sensitivity, 0.6, power=0.5, max_sparsity=0.95)
    mean = sum(sizes[n] * allocation[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.6)
    assert allocation["a"] < allocation["b"] < allocation["c"] <= 0.95
    uniform = allocate_sparsity(sizes, sensitivity, 0.6, power=0.0)
    assert all(v == pytest.approx(0.6) for v in uniform.values())
    # a very sensitive tensor is clipped at density 1 and the rest share its budget
    clipped = allocate_sparsity({"a": 10, "b": 10}, {"a": 1e6, "b": 1.0}, 0.4, power=1.0)
    assert clipped == {"a": pytest.approx(0.0), "b": pytest.approx(0.8)}
    with pytest.raises(ValueError, match="max_sparsity"):
        allocate_sparsity(sizes, sensitivity, 0.99)


def test_mask_optimizer_state_zeroes_the_moments_of_pruned_weights() -> None:
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.randn(4, 4)
    optimizer.step()
    mask = torch.rand(4, 4) > 0.5
    mask_optimizer_state(optimizer, [(weight, mask)])
    state = optimizer.state[weight]
    assert not state["exp_avg"][~mask].any() and not state["exp_avg_sq"][~mask].any()
    assert state["exp_avg"][mask].abs().min() > 0


def test_mask_optimizer_state_leaves_8bit_codes_alone() -> None:
    """bitsandbytes keeps uint8 codes shaped like the weight; code 0 is not zero, so they must
    not be multiplied by the mask."""
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = bnb.optim.AdamW8bit([weight], lr=0.1, min_8bit_size=64)
    weight.grad = torch.randn(64, 64)
    optimizer.step()
    codes = {
        k: v.clone() for k, v in optimizer.state[weight].items() if isinstance(v, torch.Tensor)
    }
    assert any(v.dtype == torch.uint8 and v.shape == weight.shape for v in codes.values())
    mask_optimizer_state(optimizer, [(weight, torch.rand(64, 64) > 0.5)])
    for key, value in codes.items():
        assert torch.equal(optimizer.state[weight][key], value), key


def test_structured_masks_keep_one_unit_per_group() -> None:
    group = StructureGroup("h", "heads", 4, (("w", 0),))
    masks = structured_masks([group], {"w": torch.arange(8.0).view(4, 2)}, 0.99)
    assert masks["w"][:, 0].tolist() == [False, False, False, True]


def test_keep_top_ranks_nan_with_pruned_scores_below_everything_finite() -> None:
    scores = torch.tensor([float("nan"), -math.inf, -1e30, 5.0])
    assert keep_top(scores, 2).tolist() == [False, False, True, True]
    kept = unstructured_masks({"w": scores}, 0.0, current={"w": torch.tensor([1, 0, 1, 1]).bool()})
    assert kept["w"].tolist() == [True, False, True, True]  # pruned stays pruned even at 0%


@pytest.mark.parametrize(
    "kwargs",
    [{"frequency": 0}, {"end": 0}, {"initial": 0.9}, {"final": 1.0}],
)
def test_sparsity_at_rejects_bad_windows(kwargs: dict) -> None:
    arguments = {"start": 0, "end": 10, "final": 0.5, "initial": 0.0, "frequency": 1} | kwargs
    with pytest.raises(ValueError, match="need frequency >= 1, end > start"):
        sparsity_at(5, **arguments)
