"""lightning_3d.export and ``lightning-3d export``: the real MiniLM after a few training steps,
written to every format, reloaded the way users load it, and compared with the in-memory model."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch

from lightning_3d.export import (
    BASELINE,
    check_formats,
    export,
    prepare_output_dir,
    round_robin_latency,
)
from lightning_3d.pruning import find_structures

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime", "onnxscript")),
    reason='the ONNX formats need pip install "lightning-3d[deploy]"',
)


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits.numpy()


@pytest.fixture(scope="module")
def trained():
    """MiniLM after 30 AdamW steps on Rotten Tomatoes, and the first 256 test rows in batches."""
    import lightning.pytorch as pl

    from lightning_3d.data import RottenTomatoes
    from lightning_3d.tasks import SequenceClassificationTask

    pl.seed_everything(0, verbose=False)
    task = SequenceClassificationTask(learning_rate=1e-4)
    data = RottenTomatoes(tokenizer=task.tokenizer, batch_size=32, max_length=64)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=data)
    data.setup("test")
    test, size = [], 0
    for batch in data.test_dataloader():
        test.append(batch)
        size += len(batch["labels"])
        if size >= 256:
            break
    assert size == 256 and len(test) > 1
    return task, test


def _prune_a_third(model: torch.nn.Module) -> None:
    """Zero the last third of the heads and neurons of every block, as a structured pruner does."""
    with torch.no_grad():
        for group in find_structures(model, ["heads", "neurons"]):
            kept = torch.arange(group.units) < group.units - group.units // 3
            shapes = {p: model.get_parameter(p).shape for p, _ in group.members}
            for name, mask in group.element_masks(kept, shapes).items():
                model.get_parameter(name).mul_(mask)


@needs_onnx
def test_every_format_matches_the_trained_model(trained, tmp_path) -> None:
    import onnxruntime
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task, test = trained
    model = task.model
    report = export(
        model, task.tokenizer, tmp_path, ["hf", "onnx", "onnx-int8"], test, latency_rounds=1
    )
    reference = np.concatenate([_logits(model, b) for b in test])
    labels = np.concatenate([b["labels"].numpy() for b in test])

    # hf: plain from_pretrained, the same logits
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").vocab == task.tokenizer.vocab
    hf = np.concatenate([_logits(loaded, b) for b in test])
    assert np.abs(hf - reference).max() < 1e-5

    # onnx: a plain onnxruntime session, dynamic batch and sequence length, within 1e-4
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    feeds = [{k: b[k].numpy() for k in ("input_ids", "attention_mask")} for b in test]
    assert len({f["input_ids"].shape[1] for f in feeds}) > 1  # several sequence lengths
    onnx = np.concatenate([session.run(["logits"], f)[0] for f in feeds])
    assert np.abs(onnx - reference).max() < 1e-4

    # onnx-int8: four times smaller, the same predictions on at least 98% of 256 rows
    int8 = onnxruntime.InferenceSession(str(tmp_path / "onnx-int8" / "model.onnx"))
    quantized = np.concatenate([int8.run(["logits"], f)[0] for f in feeds])
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= 0.98
    assert (tmp_path / "onnx-int8" / "model.onnx").stat().st_size < 0.3 * (
        tmp_path / "onnx" / "model.onnx"
    ).stat().st_size

    # the report says what was measured
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["format"] for r in saved["rows"]] == [BASELINE, "hf", "onnx", "onnx-int8"]
    assert saved["evaluated_samples"] == 256
    rows = {r["format"]: r for r in saved["rows"]}
    expected_accuracy = float((reference.argmax(1) == labels).mean())
    assert rows[BASELINE]["accuracy"] == pytest.approx(expected_accuracy)
    assert rows["onnx"]["accuracy"] == pytest.approx(float((onnx.argmax(1) == labels).mean()))
    assert rows["onnx-int8"]["agreement"] == pytest.approx(
        float((quantized.argmax(1) == reference.argmax(1)).mean())
    )
    assert rows["onnx"]["max_logit_difference"] < 1e-4
    assert rows["onnx"]["bytes"] == (tmp_path / "onnx" / "model.onnx").stat().st_size
    assert rows["hf"]["bytes"] == (tmp_path / "hf" / "model.safetensors").stat().st_size
    for row in rows.values():
        assert row["latency_b1_ms"] > 0 and row["latency_b32_ms"] > row["latency_b1_ms"]
        assert row["speedup_b1"] == pytest.approx(
            rows[BASELINE]["latency_b1_ms"] / row["latency_b1_ms"]
        )
    assert "| onnx-int8 |" in report.table()
    assert (tmp_path / "onnx-int8" / "tokenizer.json").exists()


@needs_onnx
def test_pruned_heads_and_neurons_are_removed_and_hf_still_loads(trained, tmp_path) -> None:
    import onnx
    from transformers import AutoModelForSequenceClassification

    task, test = trained
    model = copy.deepcopy(task.model)
    _prune_a_third(model)
    report = export(model, None, tmp_path, ["hf", "onnx"], test[:2], latency_rounds=0)
    reference = np.concatenate([_logits(model, b) for b in test[:2]])

    # ONNX: 8 of 12 heads (32 dims each) and 1024 of 1536 neurons are left in every block
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    shapes = sorted({tuple(i.dims) for i in graph.initializer if len(i.dims) == 2})
    assert (384, 256) in shapes or (256, 384) in shapes
    assert (384, 1024) in shapes or (1024, 384) in shapes
    assert not any(1536 in s for s in shapes)
    assert report.structures["bert.encoder.layer.0.attention.self.heads"] == [8, 12]
    assert report.structures["bert.encoder.layer.5.neurons"] == [1024, 1536]
    assert report.row("onnx").max_logit_difference < 1e-4
    assert report.row("onnx").bytes < 0.9 * report.row(BASELINE).bytes

    # hf: plain from_pretrained (heads padded back, neurons removed), the in-memory logits
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert loaded.config.intermediate_size == 1024
    assert loaded.bert.encoder.layer[0].attention.self.query.out_features == 384
    hf = np.concatenate([_logits(loaded, b) for b in test[:2]])
    assert np.abs(hf - reference).max() < 1e-4
    assert any("zero heads" in note for note in report.notes)


def test_lora_adapters_are_merged(trained, tmp_path) -> None:
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from lightning_3d.tasks import LoRASettings

    task, test = trained
    lora = get_peft_model(copy.deepcopy(task.model), LoRASettings(r=4).to_peft("SEQ_CLS"))
    with torch.no_grad():  # B starts at zero: give the adapters an update worth merging
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    reference = np.concatenate([_logits(lora, b) for b in test[:2]])
    assert (
        np.abs(reference - np.concatenate([_logits(task.model, b) for b in test[:2]])).max() > 1e-2
    )
    report = export(lora, None, tmp_path, ["hf"], test[:2], latency_rounds=0)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    assert np.abs(np.concatenate([_logits(loaded, b) for b in test[:2]]) - reference).max() < 1e-4
    assert report.row("hf").agreement == 1.0
    assert "LoRA adapters merged into the base weights" in report.notes
    assert any(p.requires_grad for p in lora.parameters())  # the trained model is left as it was


@needs_onnx
def test_a_qat_converted_model_exports_to_torchao_and_onnx(trained, tmp_path) -> None:
    from lightning_3d.quantization import (
        QuantizationRecipe,
        convert,
        load_quantized,
        prepare,
        quantized_modules,
        select_modules,
    )

    task, test = trained
    recipe = QuantizationRecipe.from_preset("int8_weight_only")
    model = copy.deepcopy(task.model)
    _prune_a_third(model)
    prepare(model, recipe, select_modules(model, exclude=r"classifier|pooler"))
    convert(model, recipe)
    converted = quantized_modules(model)
    assert converted
    report = export(
        model,
        None,
        tmp_path,
        ["onnx-int8", "torchao"],
        test[:2],
        quantization="int8_weight_only",
        latency_rounds=0,  # timing is tested above
    )
    reference = np.concatenate([_logits(model, b) for b in test[:2]])

    loaded = load_quantized(tmp_path / "torchao")  # heads and neurons removed, int8 weights
    assert quantized_modules(loaded)
    assert loaded.bert.encoder.layer[0].intermediate.dense.out_features == 1024
    torchao = np.concatenate([_logits(loaded, b) for b in test[:2]])
    # the dequantized weights quantized again: some move by one step, the logits barely
    assert np.abs(torchao - reference).max() < 5e-3
    assert report.row("torchao").agreement >= 0.99
    assert any("re-quantizing" in note for note in report.notes)
    assert report.row("onnx-int8").agreement >= 0.98
    assert any("dequantized" in note for note in report.notes)
    assert report.row("torchao").bytes < 0.35 * report.row(BASELINE).bytes


def _blocks_of_4_bits(table: np.ndarray, block: int) -> np.ndarray:
    """Symmetric 4-bit blocks along the rows, by hand: the entry of largest magnitude ``m`` is
    stored as -8, the scale is ``m / -8``."""
    rows, width = table.shape
    blocks = table.reshape(rows, width // block, block)
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    scale = largest / -8.0
    codes = np.clip(np.round(blocks / scale), -8, 7)
    return (codes * scale).reshape(rows, width).astype(np.float32)


def _small_bert(positions: int) -> torch.nn.Module:
    """A seeded one-block BERT classifier of 600 token ids and width 64, in eval mode."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=600, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=positions, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval()


@needs_onnx
def test_the_token_table_can_be_stored_in_4_bit_blocks(tmp_path) -> None:
    import onnx
    from onnx import numpy_helper

    from lightning_3d.export import (
        EMBEDDING_BLOCK,
        export_onnx,
        onnx_runner,
        quantize_embedding_4bit,
        quantize_onnx_int8,
    )

    model = _small_bert(positions=32)
    ids = torch.randint(0, 600, (3, 12))
    example = (ids.numpy(), np.ones((3, 12), dtype=np.int64))
    fp32 = tmp_path / "fp32.onnx"
    export_onnx(model, fp32, example)

    four = tmp_path / "four.onnx"
    four.write_bytes(fp32.read_bytes())
    quantized = quantize_embedding_4bit(four)
    nodes = onnx.load(str(four)).graph.node
    assert [n.name for n in nodes if n.op_type == "GatherBlockQuantized"] == [quantized]
    assert sum(n.op_type == "Gather" for n in nodes) >= 2  # positions, token types: as they were
    # the graph computes what the fp32 graph computes with the table rounded by hand
    graph = onnx.load(str(fp32))
    table = next(t for t in graph.graph.initializer if list(t.dims) == [600, 64])
    rounded = _blocks_of_4_bits(numpy_helper.to_array(table), EMBEDDING_BLOCK)
    assert not np.array_equal(rounded, numpy_helper.to_array(table))
    table.CopyFrom(numpy_helper.from_array(rounded, table.name))
    by_hand = tmp_path / "by_hand.onnx"
    onnx.save(graph, str(by_hand))
    np.testing.assert_allclose(
        onnx_runner(four)(*example), onnx_runner(by_hand)(*example), rtol=1e-5, atol=1e-5
    )

    # in the int8 export: 5 bits an entry of the table (4 + a 32-bit scale per 32) instead of 8
    weights = {}
    for bits in (8, 4):
        target = tmp_path / f"int8-{bits}.onnx"
        quantize_onnx_int8(fp32, target, embedding_bits=bits)
        weights[bits] = sum(len(t.raw_data) for t in onnx.load(str(target)).graph.initializer)
    assert weights[8] - weights[4] == pytest.approx(600 * 64 * 3 / 8, rel=0.02)
    with pytest.raises(ValueError, match=r"embedding_bits must be one of \(8, 4\), got 2"):
        quantize_onnx_int8(fp32, tmp_path / "bad.onnx", embedding_bits=2)


@needs_onnx
def test_the_rows_held_apart_can_take_other_bits_than_the_trained_rows(tmp_path) -> None:
    """A trimmed model that holds the unseen tokens' rows apart exports two tables: each id
    reads one of them, so a graph with the trained rows at 8 bits and the held-apart rows at 4
    computes exactly the all-8-bit graph on trained ids and the all-4-bit one on held-apart
    ids (and the other way round), and is 3 bits an entry of the held-apart table smaller than
    the all-8-bit one."""
    import onnx

    from lightning_3d.export import (
        export_onnx,
        held_apart_gather,
        onnx_runner,
        quantize_onnx_int8,
        token_table_gather,
    )
    from lightning_3d.vocabulary import trim_vocabulary

    model = _small_bert(positions=256)
    # 200 rows trained, 400 held apart; more positions (256) than trained rows: the tables are
    # told apart by name, not by size
    trained_ids = torch.arange(0, 600, 3)
    trim_vocabulary(model, trained_ids, unknown_id=3, unseen="pretrained")
    fp32 = tmp_path / "fp32.onnx"
    apart_ids = torch.tensor([i for i in range(600) if i % 3])
    batches = {
        "trained": trained_ids[torch.randint(0, 200, (3, 12))],
        "apart": apart_ids[torch.randint(0, 400, (3, 12))],
    }
    example = (batches["trained"].numpy(), np.ones((3, 12), dtype=np.int64))
    export_onnx(model, fp32, example)
    graph = onnx.load(str(fp32))
    reads = {node.name: node.input[0] for node in graph.graph.node}
    assert reads[held_apart_gather(graph)].endswith("word_embeddings.unseen_weight")
    assert reads[token_table_gather(graph)].endswith("word_embeddings.weight")

    runs, sizes = {}, {}
    for bits in ((8, None), (8, 4), (4, None), (4, 8)):
        target = tmp_path / f"int8-{bits[0]}-{bits[1]}.onnx"
        quantize_onnx_int8(fp32, target, embedding_bits=bits[0], unseen_token_bits=bits[1])
        runner = onnx_runner(target)
        runs[bits] = {
            name: runner(ids.numpy(), np.ones_like(ids.numpy())) for name, ids in batches.items()
        }
        sizes[bits] = sum(len(t.raw_data) for t in onnx.load(str(target)).graph.initializer)
    mixed, eight, four = runs[(8, 4)], runs[(8, None)], runs[(4, None)]
    np.testing.assert_array_equal(mixed["trained"], eight["trained"])
    np.testing.assert_array_equal(mixed["apart"], four["apart"])
    assert not np.array_equal(mixed["apart"], eight["apart"])  # the 4 bits do act
    assert not np.array_equal(mixed["trained"], four["trained"])
    np.testing.assert_array_equal(runs[(4, 8)]["trained"], four["trained"])
    np.testing.assert_array_equal(runs[(4, 8)]["apart"], eight["apart"])
    assert sizes[(8, None)] - sizes[(8, 4)] == pytest.approx(400 * 64 * 3 / 8, rel=0.02)
    assert sizes[(8, 4)] - sizes[(4, None)] == pytest.approx(200 * 64 * 3 / 8, rel=0.02)
    assert sizes[(4, 8)] - sizes[(4, None)] == pytest.approx(400 * 64 * 3 / 8, rel=0.02)

    with pytest.raises(ValueError, match=r"unseen_token_bits must be one of .* got 2"):
        quantize_onnx_int8(fp32, tmp_path / "bad.onnx", unseen_token_bits=2)
    plain = tmp_path / "plain.onnx"
    export_onnx(_small_bert(positions=256), plain, example)
    with pytest.raises(ValueError, match=r"unseen_token_bits=4 sets the bits .* holds none apart"):
        quantize_onnx_int8(plain, tmp_path / "bad.onnx", unseen_token_bits=4)


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_sharded_fsdp2_checkpoint_is_consolidated(launch_two_ranks, tmp_path, ranks) -> None:
    from job_model import job_minilm

    from lightning_3d.checkpoints import checkpoint_state, load_run_weights

    results = launch_two_ranks("sharded_checkpoint", tmp_path, 600, ranks)
    assert len(results) == ranks
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    folder = next((tmp_path / "sharded").glob("*.ckpt"))
    assert folder.is_dir() and (folder / ".metadata").exists()
    full = torch.load(tmp_path / "full_state.pt", weights_only=True)
    task = job_minilm()
    state = checkpoint_state(folder, task)
    assert state.keys() == full.keys()
    for key, value in full.items():
        assert torch.equal(state[key], value), key
    load_run_weights(task, folder)
    pretrained = job_minilm().state_dict()
    key = "model.bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(task.state_dict()[key], full[key])
    assert not torch.equal(pretrained[key], full[key])  # the run trained it


# ----------------------------------------------------------------------------- bad input
def test_unknown_format_names_what_is_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown \['tflite'\]; choose from"):
        check_formats(["hf", "tflite"])


def test_onnx_without_onnxruntime_names_the_extra(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "onnxruntime" else real(n, *a)
    )
    with pytest.raises(ImportError, match=r'pip install "lightning-3d\[deploy\]"'):
        check_formats(["onnx-int8"])
    assert check_formats(["hf", "hf"]) == ("hf",)


def test_output_folder_is_not_overwritten_by_accident(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite"):
        prepare_output_dir(tmp_path)
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_text("old")
    prepare_output_dir(tmp_path, overwrite=True)
    assert not (tmp_path / "onnx").exists() and (tmp_path / "notes.txt").read_text() == "mine"


def test_torchao_needs_a_quantized_run(trained, tmp_path) -> None:
    task, _ = trained
    with pytest.raises(ValueError, match=r"format .torchao.*onnx-int8"):
        export(task.model, None, tmp_path / "out", ["torchao"])
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_fake_quantized_model_must_be_converted_first(trained, tmp_path) -> None:
    from lightning_3d.quantization import QuantizationRecipe, prepare, select_modules

    task, _ = trained
    model = copy.deepcopy(task.model)
    prepare(model, QuantizationRecipe.from_preset("int8_weight_only"), select_modules(model))
    with pytest.raises(ValueError, match=r"fake-quantized.*convert it first"):
        export(model, None, tmp_path, ["hf"])


def test_checkpoint_that_does_not_fit_the_model(trained, tmp_path) -> None:
    from lightning_3d.checkpoints import load_run_weights
    from lightning_3d.tasks import LoRASettings, SequenceClassificationTask

    task, _ = trained
    torch.save({"state_dict": task.state_dict()}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="do not fit the configured model"):
        load_run_weights(
            SequenceClassificationTask(lora=LoRASettings(r=2)), tmp_path / "plain.ckpt"
        )
    torch.save({"weights": 1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        load_run_weights(task, tmp_path / "other.ckpt")


def test_round_robin_latency_times_every_runner_at_every_batch() -> None:
    calls: list[tuple[str, int]] = []

    def runner(name: str):
        return lambda ids, mask: calls.append((name, len(ids)))

    inputs = {1: (np.zeros((1, 4), np.int64),) * 2, 32: (np.zeros((32, 4), np.int64),) * 2}
    timed = round_robin_latency({"a": runner("a"), "b": runner("b")}, inputs, 3, 0.0)
    assert set(timed) == {"a", "b"} and all(set(t) == {1, 32} for t in timed.values())
    # one warm-up each, then the runners alternate: a, b, a, b, ...
    assert calls[:8] == [
        ("a", 1),
        ("b", 1),
        ("a", 1),
        ("b", 1),
        ("a", 1),
        ("b", 1),
        ("a", 1),
        ("b", 1),
    ]
    assert calls.count(("a", 32)) == 4
