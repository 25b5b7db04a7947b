"""Causal-LM deployment with ONNX Runtime GenAI: the exported decoder's answer log-probabilities
against the LoRA model in PyTorch, accuracy counted from them, integer weights, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_3d.generation import (
    GENERATOR_REPORT_FILE,
    adapter_product_names,
    answer_accuracy,
    answer_log_probs_generated,
    export_generator,
    export_generators,
    folder_bytes,
    generator_table,
    runtime_grid,
    tokens_per_second,
)
from lightning_3d.tasks import LoRASettings

og = pytest.importorskip("onnxruntime_genai")

PROMPTS = [[1, 520, 33, 4012, 77], [1, 901, 902], [1, 12, 13, 14, 15, 16, 17, 18]]
ANSWERS = [[3524], [2731, 30]]  # one answer of one token, one of two


def tiny_lora_llama(
    tokenizer,
    base_quantization: str | None = None,
    base_embedding_bits: int | None = None,
    untie_output: bool = False,
):
    """A two-block Llama over SmolLM2's vocabulary with LoRA adapters that are not zero (so
    what is exported must hold ``W + (alpha / r) B A``), its base first treated as
    ``LoRASettings(base_quantization=..., base_embedding_bits=...)`` treats it."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    base = LlamaForCausalLM(config)
    LoRASettings(
        base_quantization=base_quantization,
        base_embedding_bits=base_embedding_bits,
        untie_output=untie_output,
    ).round_base(base)
    adapters = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, adapters)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def lora_llama(smollm2_tokenizer):
    """The tiny LoRA Llama with its base on the runtime's int4 grid: the merged exports'
    tests hold as for any base (merging moves the adapted weights off that grid)."""
    return tiny_lora_llama(smollm2_tokenizer, base_quantization="int4")


LABELS = [0, 1, 0]


@pytest.fixture(scope="module")
def exported(lora_llama, smollm2_tokenizer, tmp_path_factory):
    """fp32 and 4-bit decoders of the LoRA Llama, scored on the prompts and timed (4 tokens)."""
    folder = tmp_path_factory.mktemp("genai")
    formats = ["genai-fp32", "genai-int4"]
    reports = export_generators(
        lora_llama, smollm2_tokenizer, folder, formats, PROMPTS, ANSWERS, LABELS, 1, 4
    )
    return folder, {report.format: report for report in reports}


def reference_log_probs(model, prompt: list[int], answer: list[int]) -> float:
    """One forward of prompt + answer through the LoRA model in PyTorch."""
    with torch.no_grad():
        log_probs = model(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
    return sum(float(log_probs[len(prompt) + j - 1, token]) for j, token in enumerate(answer))


def generator(path):
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32)
    return og.Generator(model, params)


def test_the_fp32_generator_scores_answers_as_the_lora_model_does(lora_llama, exported) -> None:
    built = exported[1]["genai-fp32"]
    assert (Path(built.path) / "genai_config.json").exists()
    runtime = generator(built.path)
    for prompt in PROMPTS:
        scores = answer_log_probs_generated(runtime, prompt, ANSWERS)
        expected = [reference_log_probs(lora_llama, prompt, answer) for answer in ANSWERS]
        assert scores == pytest.approx(expected, abs=2e-4)
    base = lora_llama.get_base_model()
    with lora_llama.disable_adapter():  # the adapters change the answer: they were merged
        unadapted = reference_log_probs(base, PROMPTS[0], ANSWERS[1])
    assert abs(unadapted - reference_log_probs(lora_llama, PROMPTS[0], ANSWERS[1])) > 1e-2


def test_accuracy_counts_the_answer_of_highest_log_probability(lora_llama, exported) -> None:
    best = [
        int(np.argmax([reference_log_probs(lora_llama, p, a) for a in ANSWERS])) for p in PROMPTS
    ]
    labels = [best[0], best[1], 1 - best[2]]  # two right, one wrong
    path = exported[1]["genai-fp32"].path
    assert answer_accuracy(path, PROMPTS, ANSWERS, labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="3 prompts and 2 labels"):
        answer_accuracy(path, PROMPTS, ANSWERS, labels[:2])


def test_four_bit_weights_shrink_the_folder_and_stay_near_fp32(exported) -> None:
    dense, packed = exported[1]["genai-fp32"], exported[1]["genai-int4"]
    # both folders hold the same 3.5 MB tokenizer; the weights shrink about 6x
    assert packed.bytes < dense.bytes / 2.5
    for prompt in PROMPTS:
        fp32 = answer_log_probs_generated(generator(dense.path), prompt, ANSWERS)
        int4 = answer_log_probs_generated(generator(packed.path), prompt, ANSWERS)
        assert int4 == pytest.approx(fp32, abs=0.5)
        assert int4 != pytest.approx(fp32, abs=1e-6)  # quantized, not a copy
    speed = tokens_per_second(packed.path, PROMPTS[0], new_tokens=4, rounds=1)
    assert math.isfinite(speed) and speed > 0 and packed.tokens_per_s > 0


def test_export_generators_reports_and_saves_each_format(
    lora_llama, smollm2_tokenizer, exported
) -> None:
    folder, reports = exported
    for name, report in reports.items():
        assert report.path == str(folder / name)
        assert report.bytes == folder_bytes(report.path)
        assert report.accuracy == answer_accuracy(report.path, PROMPTS, ANSWERS, LABELS)
    saved = json.loads((folder / GENERATOR_REPORT_FILE).read_text())
    assert saved == [dataclasses.asdict(report) for report in reports.values()]
    assert "| genai-int4 |" in generator_table(list(reports.values()))
    with pytest.raises(ValueError, match=r"formats \['genai-int3'\]: choose from"):
        export_generators(lora_llama, smollm2_tokenizer, folder, ["genai-int3"])
    with pytest.raises(ValueError, match="needs their answers and labels"):
        export_generators(lora_llama, smollm2_tokenizer, folder, ["genai-fp32"], PROMPTS)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"weight_bits": 3}, r"weight_bits must be one of \(4, 8\) or None \(fp32\), got 3"),
        ({"block_size": 24}, r"block_size must be one of \(16, 32, 64, 128, 256\), got 24"),
        ({"weight_bits": 4, "embedding_bits": 8}, "embedding_bits=8 with weight_bits=4"),
        ({"weight_bits": None, "embedding_bits": 4}, "embedding_bits=4 with weight_bits=None"),
    ],
)
def test_bad_generator_arguments_are_refused_before_any_work(
    lora_llama, smollm2_tokenizer, tmp_path, arguments, message
) -> None:
    with pytest.raises(ValueError, match=message):
        export_generator(lora_llama, smollm2_tokenizer, tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_architecture_the_builder_does_not_know_is_named(smollm2_tokenizer, tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="no builder for GPT2LMHeadModel"):
        export_generator(GPT2LMHeadModel(config), smollm2_tokenizer, tmp_path / "gpt2")


def test_an_int4_table_needs_block_projections_the_builder_knows(
    smollm2_tokenizer, tmp_path
) -> None:
    """``embedding_bits=4`` raises the block products to int8 by their builder names: a model
    without them is refused before the builder runs or the folder is made."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(smollm2_tokenizer), n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="has none the builder knows"):
        export_generator(
            GPT2LMHeadModel(config), smollm2_tokenizer, tmp_path / "gpt2", 8, embedding_bits=4
        )
    assert not (tmp_path / "gpt2").exists()


def test_a_non_empty_output_folder_is_refused(lora_llama, smollm2_tokenizer, tmp_path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export_generator(lora_llama, smollm2_tokenizer, tmp_path)


def test_runtime_grid_is_a_fixed_point_of_the_runtimes_rounding() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 80)  # 80 columns: the third block of 32 is zero-padded
    for bits, step in ((4, 1 / 8), (8, 1 / 128)):
        rounded = runtime_grid(weight, bits)
        assert torch.equal(runtime_grid(rounded, bits), rounded)
        blocks = torch.nn.functional.pad(weight, (0, 16)).view(6, 3, 32).abs().amax(-1)
        error = (rounded - weight).abs().view(6, -1)
        # within one step |m| / 2^(bits-1) of the block: half a step where it rounds, up to a
        # whole one where the code clamps (values near -m when m is the block's extreme)
        assert (error <= blocks.repeat_interleave(32, 1)[:, :80] * step + 1e-6).all()
        assert not torch.equal(rounded, weight)
    # hand-worked: m = -8 gives s = 1; 7.6 rounds to code 16, clamped to 15, so 7
    row = torch.tensor([[-8.0, 1.2, -3.4, 7.6, 0.49] + [0.0] * 11])
    assert runtime_grid(row, 4, 16)[0, :5].tolist() == [-8.0, 1.0, -3.0, 7.0, 0.0]
    with pytest.raises(ValueError, match=r"2-D weight, bits in \(4, 8\).*bits=3"):
        runtime_grid(weight, bits=3)


def test_adapters_kept_separate_deploy_a_grid_base_as_trained(
    lora_llama, smollm2_tokenizer, exported, tmp_path
) -> None:
    """A base on the runtime's int4 grid with float LoRA beside it: the int4 decoder computes
    the PyTorch model's answer log-probs up to its int8 activations; merging the adapters
    first and rounding the sum (the fixture's genai-int4) moves them an order of magnitude
    further."""
    model = lora_llama
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert torch.equal(runtime_grid(q_proj.base_layer.weight), q_proj.base_layer.weight)
    separate = export_generator(model, smollm2_tokenizer, tmp_path / "separate", lora="separate")
    merged = exported[1]["genai-int4"]
    graph = onnx.load(str(separate.path / "model.onnx"), load_external_data=False).graph
    products = {n.name: n.op_type for n in graph.node if n.op_type.startswith("MatMul")}
    for name in adapter_product_names(model):  # the 8 adapter products stay float
        assert products[name] == "MatMul"
    assert sum(op == "MatMulNBits" for op in products.values()) == 2 * 7 + 1  # base and head
    errors = {"separate": [], "merged": []}
    for prompt in PROMPTS:
        expected = [reference_log_probs(model, prompt, answer) for answer in ANSWERS]
        for name, path in (("separate", separate.path), ("merged", merged.path)):
            scores = answer_log_probs_generated(generator(path), prompt, ANSWERS)
            errors[name] += [abs(a - b) for a, b in zip(scores, expected, strict=True)]
    assert max(errors["separate"]) < 5e-3
    assert max(errors["merged"]) > 4 * max(errors["separate"])


def test_separate_adapters_need_lora_in_the_decoder_blocks(smollm2_tokenizer, tmp_path) -> None:
    base = tiny_lora_llama(smollm2_tokenizer).get_base_model()
    with pytest.raises(ValueError, match="needs a peft model with LoRA adapters"):
        export_generator(base, smollm2_tokenizer, tmp_path / "a", lora="separate")
    head = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match=r"adapter on .*lm_head is outside the decoder blocks"):
        export_generator(head, smollm2_tokenizer, tmp_path / "b", lora="separate")
    with pytest.raises(ValueError, match=r"lora must be one of \('merge', 'separate'\)"):
        export_generator(head, smollm2_tokenizer, tmp_path / "c", lora="fold")
    assert not any(tmp_path.iterdir())


def test_an_int8_base_with_an_int4_token_table_deploys_as_trained(
    smollm2_tokenizer, tmp_path
) -> None:
    """``LoRASettings(base_quantization="int8", base_embedding_bits=4)``: the tied table on the
    int4 grid, every block projection on the int8 one; ``export_generator(weight_bits=8,
    embedding_bits=4)`` stores exactly that grid (the block products at 8 bits, the head at 4,
    the adapters float), so the decoder computes the PyTorch model's answers, in a folder half
    a byte per table entry smaller than the one with the table in int8."""
    model = tiny_lora_llama(smollm2_tokenizer, "int8", base_embedding_bits=4)
    base = model.get_base_model()
    table, q_proj = base.lm_head.weight, base.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.model.embed_tokens.weight is table  # tied: rounded once, as the head
    assert torch.equal(runtime_grid(table, 4), table)
    assert torch.equal(runtime_grid(q_proj, 8), q_proj)
    assert not torch.equal(runtime_grid(q_proj, 4), q_proj)  # the blocks are not on int4
    mixed = export_generator(
        model, smollm2_tokenizer, tmp_path / "mixed", 8, lora="separate", embedding_bits=4
    )
    graph = onnx.load(str(mixed.path / "model.onnx"), load_external_data=False).graph
    bits = {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    blocks = [n for n in bits if n.startswith("/model/layers.")]
    assert len(blocks) == 2 * 7 and all(bits[n] == 8 for n in blocks)  # q k v o gate up down
    assert [bits[n] for n in bits if n not in blocks] == [4] * (len(bits) - len(blocks))
    assert any(n.op_type == "GatherBlockQuantized" for n in graph.node)  # the int4 table
    products = {n.name: n.op_type for n in graph.node if n.op_type.startswith("MatMul")}
    assert all(products[name] == "MatMul" for name in adapter_product_names(model))
    for prompt in PROMPTS:
        expected = [reference_log_probs(model, prompt, answer) for answer in ANSWERS]
        scores = answer_log_probs_generated(generator(mixed.path), prompt, ANSWERS)
        assert scores == pytest.approx(expected, abs=5e-3)
    eight = export_generator(model, smollm2_tokenizer, tmp_path / "eight", 8, lora="separate")
    assert eight.bytes - mixed.bytes == pytest.approx(table.numel() / 2, rel=0.01)  # 4 bits less
    with pytest.raises(ValueError, match="base_embedding_bits=4 puts the token table"):
        LoRASettings(base_quantization="int4", base_embedding_bits=4)


def test_an_int8_base_deploys_its_tied_table_once_in_int8_as_trained(
    smollm2_tokenizer, tmp_path
) -> None:
    """``LoRASettings(base_quantization="int8")`` puts the tied table on the int8 grid with the
    blocks; ``export_generator(weight_bits=8)`` stores it once: the output layer's 8-bit
    ``MatMulNBits`` and the input's 8-bit ``GatherBlockQuantized`` read the same codes and
    scales, no float copy of the table is left, and the decoder scores the answers as PyTorch
    does."""
    model = tiny_lora_llama(smollm2_tokenizer, "int8")
    base = model.get_base_model()
    table = base.lm_head.weight
    assert base.model.embed_tokens.weight is table
    assert torch.equal(runtime_grid(table, 8), table)
    assert not torch.equal(runtime_grid(table, 4), table)
    eight = export_generator(model, smollm2_tokenizer, tmp_path / "eight", 8, lora="separate")
    graph = onnx.load(str(eight.path / "model.onnx"), load_external_data=False).graph
    nodes = {n.name: n for n in graph.node}
    head = nodes["/lm_head/MatMul_Q8"]
    (gather,) = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    attributes = {a.name: a.i for a in gather.attribute}
    assert attributes["bits"] == 8 and attributes["block_size"] == 32
    reshape = next(n for n in graph.node if gather.input[0] in n.output)
    assert reshape.input[0] == head.input[1] and gather.input[2] == head.input[2]
    vocabulary, hidden = table.shape
    floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert not [i for i in floats if math.prod(i.dims) >= vocabulary * hidden]
    blocks = [n for n in graph.node if n.name.startswith("/model/layers.")]
    assert {a.i for n in blocks if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "bits"} == {8}  # fmt: skip
    assert eight.bytes < vocabulary * hidden * 4  # under the fp32 table alone
    for prompt in PROMPTS:
        expected = [reference_log_probs(model, prompt, answer) for answer in ANSWERS]
        scores = answer_log_probs_generated(generator(eight.path), prompt, ANSWERS)
        assert scores == pytest.approx(expected, abs=5e-3)


def _shared_table_graph(
    codes: str, scales: str, gather_op: str = "GatherBlockQuantized"
) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """An output layer's 8-bit ``MatMulNBits`` over a 4 x 32 table and the table's gather
    reading ``codes`` (through a Reshape) and ``scales``."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weight = rng.integers(0, 256, (4, 1, 32), dtype=np.uint8)
    scale = rng.random((4, 1), dtype=np.float32)
    initializers = [
        helper.make_tensor("lm_head.MatMul.weight_Q8", TensorProto.UINT8, weight.shape,
                           weight.tobytes(), raw=True),
        helper.make_tensor("lm_head.MatMul.weight_scales", TensorProto.FLOAT, scale.shape,
                           scale.tobytes(), raw=True),
        helper.make_tensor("shape", TensorProto.INT64, [2], [4, 32]),
    ]  # fmt: skip
    common = {"domain": "com.microsoft", "bits": 8, "block_size": 32}
    nodes = [
        helper.make_node("Reshape", [codes, "shape"], ["table"], name="/embed/Reshape"),
        helper.make_node(gather_op, ["table", "ids", scales], ["hidden"], gather_axis=0,
                         quantize_axis=1, name="/model/embed_tokens/Gather", **common),
        helper.make_node("MatMulNBits", ["hidden", "lm_head.MatMul.weight_Q8",
                         "lm_head.MatMul.weight_scales"], ["logits"], K=32, N=4,
                         name="/lm_head/MatMul_Q8", **common),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 4])], initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets), weight, scale


def test_link_shared_table_repairs_the_builders_names_and_refuses_other_graphs(tmp_path) -> None:
    """The gather names the builder's other convention (``weight_Q8G32``, ``weight_scale``):
    relinked to the product's initializers, the graph loads and each id's row is the codes
    minus 128 times their scale; a graph already linked is unchanged; a graph without the
    shared gather is refused."""
    import onnxruntime as ort

    from lightning_3d.generation import link_shared_table

    broken, weight, scale = _shared_table_graph(
        "lm_head.MatMul.weight_Q8G32", "lm_head.MatMul.weight_scale"
    )
    path = tmp_path / "model.onnx"
    onnx.save(broken, str(path))
    with pytest.raises(Exception, match="weight_Q8G32"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    link_shared_table(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.array([2, 0])
    table = (weight.reshape(4, 32).astype(np.float32) - 128) * scale  # the rows by hand
    logits = session.run(None, {"ids": ids})[0]  # the gathered rows through the same table
    np.testing.assert_allclose(logits, table[ids] @ table.T, rtol=1e-4, atol=1e-3)
    linked = path.read_bytes()
    link_shared_table(path)
    assert path.read_bytes() == linked
    names = ("lm_head.MatMul.weight_Q8", "lm_head.MatMul.weight_scales")
    onnx.save(_shared_table_graph(*names, gather_op="Gather")[0], str(path))
    with pytest.raises(RuntimeError, match="no GatherBlockQuantized beside an lm_head MatMulNBits"):
        link_shared_table(path)


def test_an_untied_int8_output_layer_beside_an_int4_token_table_deploys_as_trained(
    smollm2_tokenizer, tmp_path
) -> None:
    """``LoRASettings(..., base_embedding_bits=4, untie_output=True)``: the output layer gets
    its own copy of the tied table on the int8 grid, the input embedding stays on int4; the
    export stores the head as an 8-bit product and the table as a 4-bit Gather, so the decoder
    scores the answers as PyTorch does, in a folder between the tied int4 table's and int8's."""
    model = tiny_lora_llama(smollm2_tokenizer, "int8", base_embedding_bits=4, untie_output=True)
    base = model.get_base_model()
    head, table = base.lm_head.weight, base.model.embed_tokens.weight
    assert head is not table and not base.config.tie_word_embeddings
    assert torch.equal(runtime_grid(head, 8), head) and not torch.equal(runtime_grid(head, 4), head)
    assert torch.equal(runtime_grid(table, 4), table)
    untied = export_generator(
        model, smollm2_tokenizer, tmp_path / "untied", 8, lora="separate", embedding_bits=4
    )
    graph = onnx.load(str(untied.path / "model.onnx"), load_external_data=False).graph
    bits = {  # GatherBlockQuantized leaves out its bits at their default, 4
        (n.op_type, n.name): next((a.i for a in n.attribute if a.name == "bits"), 4)
        for n in graph.node
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized")
    }
    assert bits[("MatMulNBits", "/lm_head/MatMul_Q8")] == 8
    gathers = [b for (op, _), b in bits.items() if op == "GatherBlockQuantized"]
    assert gathers == [4]
    for prompt in PROMPTS:
        expected = [reference_log_probs(model, prompt, answer) for answer in ANSWERS]
        scores = answer_log_probs_generated(generator(untied.path), prompt, ANSWERS)
        assert scores == pytest.approx(expected, abs=5e-3)
    tied = tiny_lora_llama(smollm2_tokenizer, "int8", base_embedding_bits=4)
    mixed = export_generator(
        tied, smollm2_tokenizer, tmp_path / "mixed", 8, lora="separate", embedding_bits=4
    )
    assert mixed.bytes < untied.bytes
    with pytest.raises(ValueError, match=r"untie_output=True .* needs base_quantization='int8'"):
        LoRASettings(base_quantization="int8", untie_output=True)


def test_an_untied_output_layer_run_resumes_as_the_uninterrupted_run(
    tiny_llama_folder, stop_after_first_epoch, tmp_path
) -> None:
    """A CausalLMTask with ``untie_output=True`` checkpointed after one epoch and resumed in a
    fresh task (which unties and rounds its base again) ends with the uninterrupted run's
    adapters, its int8 output layer apart from the int4 table, and both on their grids."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_3d.tasks import CausalLMTask

    settings = LoRASettings(
        r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
        base_quantization="int8", base_embedding_bits=4, untie_output=True,
    )  # fmt: skip
    generator_ = torch.Generator().manual_seed(1)
    batches = []
    for index in range(2):  # one epoch of two steps
        ids = torch.randint(3, 2000, (2, 12), generator=generator_)
        batches.append({
            "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "index": torch.tensor([2 * index, 2 * index + 1]),
        })  # fmt: skip
    loader = torch.utils.data.DataLoader(batches, batch_size=None)

    def trainer(epochs: int, *callbacks: pl.Callback) -> pl.Trainer:
        return pl.Trainer(
            max_epochs=epochs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=bool(callbacks),
            callbacks=list(callbacks), limit_val_batches=0, default_root_dir=tmp_path,
        )  # fmt: skip

    def task() -> CausalLMTask:
        pl.seed_everything(0)
        return CausalLMTask(
            model_name_or_path=str(tiny_llama_folder), lora=settings, learning_rate=1e-2
        )

    whole = task()
    start = {n: p.detach().clone() for n, p in whole.named_parameters() if p.requires_grad}
    trainer(2).fit(whole, loader)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_on_train_epoch_end=True)
    trainer(2, checkpoint, stop_after_first_epoch).fit(task(), loader)  # the same LR schedule
    saved = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]
    head_key = next(k for k in saved if k.endswith("lm_head.weight"))
    table_key = next(k for k in saved if k.endswith("embed_tokens.weight"))
    assert not torch.equal(saved[head_key], saved[table_key])  # two tensors in the checkpoint
    resumed = task()
    trainer(2).fit(resumed, loader, ckpt_path=checkpoint.best_model_path)

    trained = dict(whole.named_parameters())
    assert any(not torch.equal(trained[n], p) for n, p in start.items())  # it trained
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, trained[name], rtol=0, atol=1e-6, msg=name)
    base = resumed.model.get_base_model()
    head, table = base.lm_head.weight, base.model.embed_tokens.weight
    assert head is not table and torch.equal(head, runtime_grid(head, 8))
    assert torch.equal(table, runtime_grid(table, 4)) and not torch.equal(head, table)
