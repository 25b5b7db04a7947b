"""Vocabulary trimming (lightning_3d.vocabulary, VocabularyTrimmer): the trimmed embedding
computes what the full one does on kept ids, training it updates exactly what training the full
model updates, resume and checkpoint loads trim like the checkpoint, exports stay exact and
shrink, and bad input is refused before training."""

from __future__ import annotations

import copy
import importlib.util
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_3d.budget import size_fraction
from lightning_3d.callbacks import VocabularyTrimmer
from lightning_3d.checkpoints import load_run_weights
from lightning_3d.plan import ThreeDPlan
from lightning_3d.vocabulary import (
    TrimmedEmbedding,
    observed_token_ids,
    removed_share,
    restore_vocabulary,
    row_table,
    special_token_ids,
    trim_embedding,
    trim_vocabulary,
)

BATCHES = 3  # batches of 8 real training reviews: one epoch of the small runs


def test_row_table_by_hand() -> None:
    # ids 0..6, kept 1, 4, 6; the unknown token is 4: every other id reads row 1
    assert row_table(torch.tensor([1, 4, 6]), 7, unknown_id=4).tolist() == [1, 0, 1, 1, 1, 1, 2]


def test_trimmed_embedding_reads_kept_rows_and_the_unknown_row_for_the_rest() -> None:
    full = nn.Embedding(10, 3, padding_idx=0)
    kept = torch.tensor([0, 2, 3, 7])
    trimmed = trim_embedding(full, kept, unknown_id=3)
    ids = torch.tensor([[0, 2, 7, 5], [9, 3, 1, 2]])
    expected = full.weight[torch.where(torch.isin(ids, kept), ids, torch.tensor(3))]
    assert torch.equal(trimmed(ids), expected)
    assert trimmed.kept == 4 and trimmed.num_embeddings == 10
    restored = trimmed.full()
    assert isinstance(restored, nn.Embedding) and restored.padding_idx == 0
    assert torch.equal(restored(ids), expected)


def test_unseen_ids_can_read_their_nearest_kept_row() -> None:
    full = nn.Embedding(5, 2)
    with torch.no_grad():  # ids 3 and 4 lie near kept ids 1 and 0
        full.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, -1], [0.1, 2], [3, 0.2]]))
    trimmed = trim_embedding(full, torch.tensor([0, 1, 2]), unknown_id=2, unseen="nearest")
    assert trimmed.token_rows.tolist() == [0, 1, 2, 1, 0]
    assert torch.equal(trimmed(torch.tensor([3, 4])), full.weight[[1, 0]])
    with pytest.raises(ValueError, match="unseen must be one of"):
        trim_embedding(full, torch.tensor([0, 1, 2]), unknown_id=2, unseen="zero")
    with pytest.raises(ValueError, match="unseen must be one of"):
        VocabularyTrimmer(unseen="zero")


def test_unseen_ids_can_keep_their_pretrained_rows_untrained() -> None:
    full = nn.Embedding(6, 3, padding_idx=0)
    kept = torch.tensor([0, 2, 5])
    trimmed = trim_embedding(full, kept, unknown_id=2, unseen="pretrained")
    # kept ids 0, 2, 5 -> rows 0, 1, 2; ids 1, 3, 4 -> rows 3, 4, 5: the rows held apart
    assert trimmed.token_rows.tolist() == [0, 3, 1, 4, 5, 2]
    assert torch.equal(trimmed.unseen_weight, full.weight.detach()[[1, 3, 4]])
    assert [n for n, _ in trimmed.named_parameters()] == ["weight"] and trimmed.kept == 3
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert torch.equal(trimmed(ids), full(ids))
    trimmed(ids).sum().backward()  # every id once: the kept rows but padding get gradients
    assert trimmed.weight.grad.tolist() == [[0.0] * 3, [1.0] * 3, [1.0] * 3]
    assert torch.equal(trimmed.full().weight, full.weight)
    assert "3 held apart" in repr(trimmed)
    state = trimmed.state_dict()
    assert set(state) == {"weight", "token_rows", "unseen_weight"}
    with pytest.raises(ValueError, match=r"unseen_weight must hold rows of width 3"):
        TrimmedEmbedding(trimmed.weight, trimmed.token_rows, None, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="rows must index the 3 stored rows"):
        TrimmedEmbedding(trimmed.weight, trimmed.token_rows)  # rows 3-5 need the rows apart


def test_padding_row_gets_no_gradient() -> None:
    trimmed = trim_embedding(nn.Embedding(5, 2, padding_idx=0), torch.tensor([0, 1, 4]), 1)
    trimmed(torch.tensor([0, 4, 0])).sum().backward()
    assert trimmed.weight.grad[0].abs().sum() == 0 and trimmed.weight.grad[2].abs().sum() > 0


def test_observed_ids_union_with_specials() -> None:
    batches = [{"input_ids": torch.tensor([[101, 7, 102, 0]])}, {"input_ids": torch.tensor([[9]])}]
    assert observed_token_ids(batches, always=[100, 101]).tolist() == [0, 7, 9, 100, 101, 102]


def test_reading_a_shuffling_loader_leaves_the_random_state() -> None:
    loader = DataLoader(torch.arange(10), batch_size=5, shuffle=True)
    before = torch.random.get_rng_state()
    assert observed_token_ids(loader).tolist() == list(range(10))
    assert torch.equal(torch.random.get_rng_state(), before)


def _tiny_bert(vocabulary: int = 30522) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=vocabulary, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


@pytest.mark.parametrize("unseen", ["unknown", "pretrained"])
def test_training_the_trimmed_model_updates_exactly_the_kept_rows_of_the_full_one(unseen) -> None:
    """Rows of ids that never occur get no gradient: AdamW (no weight decay) leaves them, so
    the trimmed run equals the full run on every kept row and every other parameter; with the
    unseen rows held apart it computes what the full model computes on every id."""
    full = _tiny_bert(200)
    trimmed_model = copy.deepcopy(full)
    batches = [torch.randint(1, 60, (4, 12)) for _ in range(3)]
    kept = observed_token_ids(batches, always=[0, 100])
    trim_vocabulary(trimmed_model, kept, unknown_id=100, unseen=unseen)
    labels = torch.tensor([0, 1, 1, 0])
    for model in (full, trimmed_model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        for ids in batches:
            model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    embedding = trimmed_model.get_input_embeddings()
    torch.testing.assert_close(embedding.weight, full.get_input_embeddings().weight[kept])
    others = {n: p for n, p in full.named_parameters() if "word_embeddings" not in n}
    for name, parameter in trimmed_model.named_parameters():
        if "word_embeddings" not in name:
            torch.testing.assert_close(parameter, others[name], msg=name)
    assert embedding.kept == len(kept) < 200
    unseen_ids = torch.tensor([[101, 150, 199, 7]])  # 150 and 199 never occurred
    with torch.no_grad():
        trimmed_logits = trimmed_model.eval()(input_ids=unseen_ids).logits
        full_logits = full.eval()(input_ids=unseen_ids).logits
    if unseen == "pretrained":
        torch.testing.assert_close(trimmed_logits, full_logits)
        restore_vocabulary(trimmed_model)
        torch.testing.assert_close(
            trimmed_model.get_input_embeddings().weight, full.get_input_embeddings().weight
        )
    else:  # 150 and 199 read the unknown token's row
        assert not torch.allclose(trimmed_logits, full_logits)


class ScaledEmbedding(nn.Embedding):
    """Rows times a constant, as some architectures' embeddings compute."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 2.0


def test_a_tied_language_model_head_is_refused_and_an_untied_one_warned_about() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(tied: bool) -> nn.Module:
        config = LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
        )  # fmt: skip
        return LlamaForCausalLM(config)

    with pytest.raises(ValueError, match=r"shared \(model.embed_tokens.weight, lm_head.weight"):
        trim_vocabulary(llama(tied=True), torch.tensor([0, 1, 2]), unknown_id=0)
    with pytest.warns(UserWarning, match="tokens it generates that were not in the training"):
        trim_vocabulary(llama(tied=False), torch.tensor([0, 1, 2]), unknown_id=0)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown_id=9 must be among the kept ids"):
        row_table(torch.tensor([1, 2]), 10, unknown_id=9)
    with pytest.raises(ValueError, match="sorted 1-D tensor of distinct"):
        row_table(torch.tensor([3, 1]), 10, unknown_id=1)
    with pytest.raises(ValueError, match=r"kept ids must lie in \[0, 10\)"):
        row_table(torch.tensor([1, 12]), 10, unknown_id=1)
    with pytest.raises(ValueError, match="needs a Hugging Face model"):
        trim_vocabulary(nn.Linear(2, 2), torch.tensor([0]), 0)
    model = _tiny_bert(50)
    trim_vocabulary(model, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="already trimmed"):
        trim_vocabulary(model, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="vocabulary must be one of"):
        ThreeDPlan(vocabulary="test")
    with pytest.raises(ValueError, match="trimmed embedding would stay fp32"):
        ThreeDPlan(vocabulary="train", weight_bits=8)
    ThreeDPlan(vocabulary="train", weight_bits=8, quantize_at="export")  # ONNX Runtime's int8
    scaled = _tiny_bert(50)
    scaled.bert.embeddings.word_embeddings = ScaledEmbedding(50, 16)
    with pytest.raises(ValueError, match=r"needs a plain nn\.Embedding, got ScaledEmbedding"):
        trim_vocabulary(scaled, torch.tensor([0, 1]), 1)
    with pytest.raises(ValueError, match="the padding id 0 must be among the kept ids"):
        trim_vocabulary(_tiny_bert(50), torch.tensor([1, 2]), 1)
    with pytest.raises(ValueError, match="token_ids must be non-negative"):
        VocabularyTrimmer(token_ids=[-1])

    class NoUnknown:
        unk_token_id = None

    with pytest.raises(ValueError, match="NoUnknown has none"):
        special_token_ids(NoUnknown())


def test_removed_share_and_the_export_size_model() -> None:
    model = _tiny_bert(100)
    total = sum(p.numel() for p in model.parameters())
    assert removed_share(model, 40) == pytest.approx(60 * 16 / total)
    # int8 of a model with a fifth of its parameters trimmed away: 0.8 * 8 / 32
    assert size_fraction(0.0, 8, "heads+neurons", 0.5, vocabulary_share=0.2) == pytest.approx(0.2)
    # a fifth trimmed, then 20% of the half that the pruner targets removed: 0.8 * 0.9
    assert size_fraction(0.2, None, "heads+neurons", 0.5, vocabulary_share=0.2) == pytest.approx(
        0.72
    )
    with pytest.raises(ValueError, match=r"vocabulary_share must be in \[0, 1\)"):
        size_fraction(0.0, 8, "heads+neurons", 0.5, vocabulary_share=1.0)


def test_the_plan_adds_the_trimmer() -> None:
    plan = ThreeDPlan(vocabulary="train", trainable=0.5)
    assert plan.axes == ("vocabulary", "parameters")
    names = [type(c).__name__ for c in plan.callbacks()]
    assert names == ["PlanCoordinator", "VocabularyTrimmer", "SensitivityFreezer"]
    assert plan.callbacks()[1].unseen == "unknown"
    assert "VocabularyTrimmer" not in [type(c).__name__ for c in ThreeDPlan().callbacks()]
    apart = ThreeDPlan(vocabulary="train", unseen_tokens="pretrained")
    assert apart.callbacks()[1].unseen == "pretrained"
    with pytest.raises(ValueError, match="unseen_tokens must be one of"):
        ThreeDPlan(vocabulary="train", unseen_tokens="zero")
    with pytest.raises(ValueError, match="set vocabulary='train' too"):
        ThreeDPlan(unseen_tokens="nearest")


def test_the_solver_prices_rows_held_apart_at_full_size_and_a_4_bit_table() -> None:
    """The export of a trimmed run keeps every row with unseen_tokens="pretrained": the same
    size budget that trimming meets needs another cut, pruning or a 4-bit token table."""
    from lightning_3d.budget import CostModel

    cost = CostModel(forward_s=0.1, backward_s=0.2, optimizer_s=0.05)
    common = dict(
        cost=cost, reference_steps=100, epochs=1, compressible_share=0.5, quantize_at="export",
        vocabulary="train", vocabulary_share=0.3, embedding_share=0.5,
        candidates={"sparsity": [0.0, 0.8]},
    )  # fmt: skip
    trimmed = ThreeDPlan.for_budget(1.0, 0.2, **common)  # 0.7 * 8 / 32 = 0.175
    assert trimmed.sparsity == 0.0 and trimmed.allocation.size_fraction == pytest.approx(0.175)
    # its steps are priced without the dropped rows' optimizer update (0.3 of the parameters)
    schedule = dict(reference_steps=100, epochs=1, quantize_at="export")
    chosen = trimmed.allocation.strengths
    priced = cost.run_seconds(**schedule, **chosen, kept_share=0.7)
    assert trimmed.allocation.time_s == pytest.approx(priced.total_s)
    untrimmed = cost.run_seconds(**schedule, **chosen).breakdown["optimizer"]
    assert priced.breakdown["optimizer"] == pytest.approx(0.7 * untrimmed)
    held = ThreeDPlan.for_budget(1.0, 0.2, unseen_tokens="pretrained", **common)
    assert held.sparsity == 0.8  # (1 - 0.5 * 0.8 * 0.7) * 8 / 32 = 0.18
    assert held.allocation.size_fraction == pytest.approx(0.18)
    assert "held apart, untrained, and exported" in held.allocation.reason
    table = ThreeDPlan.for_budget(1.0, 0.2, unseen_tokens="pretrained", embedding_bits=4, **common)
    # the table: 0.5 * 0.7 + 0.3 of the model at 5 bits, the rest at 8: 6.05 / 32
    assert table.sparsity == 0.0 and table.allocation.size_fraction == pytest.approx(6.05 / 32)
    assert "token-embedding table exported at 5 bits" in table.allocation.reason
    # the trained rows at 8 bits and only the rows held apart at 4: (0.7 * 8 + 0.3 * 5) / 32
    mixed = ThreeDPlan.for_budget(
        1.0, 0.23, unseen_tokens="pretrained", embedding_bits=8, unseen_token_bits=4, **common
    )
    assert mixed.sparsity == 0.0 and mixed.allocation.size_fraction == pytest.approx(7.1 / 32)
    assert "rows held apart exported at 5 bits" in mixed.allocation.reason
    assert "trained token rows exported at 8 bits" in mixed.allocation.reason
    with pytest.raises(ValueError, match="needs quantize_at='export'"):
        ThreeDPlan(embedding_bits=4)
    held_apart = dict(vocabulary="train", unseen_tokens="pretrained")
    with pytest.raises(ValueError, match=r"unseen_token_bits=4 sets .* needs quantize_at='export'"):
        ThreeDPlan(**held_apart, unseen_token_bits=4)
    with pytest.raises(ValueError, match="unseen_token_bits must be 4, 8 or None, got 2"):
        ThreeDPlan(**held_apart, quantize_at="export", unseen_token_bits=2)
    with pytest.raises(ValueError, match="needs unseen_tokens='pretrained', got 'unknown'"):
        ThreeDPlan(vocabulary="train", quantize_at="export", unseen_token_bits=4)


# ---------------------------------------------------------------------------- in Lightning runs
class TinyClassifier(pl.LightningModule):
    """A one-block BERT (no dropout) with the MiniLM tokenizer, as the built-in tasks hold
    theirs (``model``, ``tokenizer``)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = _tiny_bert()
        self.tokenizer = tokenizer

    def training_step(self, batch: dict[str, torch.Tensor], _: int) -> torch.Tensor:
        return self.model(**batch).loss

    def test_step(self, batch: dict[str, torch.Tensor], _: int) -> None:
        self.log("test/loss", self.model(**batch).loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Reviews(pl.LightningDataModule):
    """Three batches of real training reviews, served in the same order every epoch (no
    shuffle: resume at an epoch's end is exact)."""

    def __init__(self, rotten_tomatoes: Any) -> None:
        super().__init__()
        self.batches = list(rotten_tomatoes.train_dataloader())[:BATCHES]
        for batch in self.batches:
            batch.pop("index", None)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None)  # each item is a whole batch

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.batches[:2], batch_size=None)


def _trainer(tmp_path: Any, epochs: int, *callbacks: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )  # fmt: skip


@pytest.fixture(scope="module")
def reviews(rotten_tomatoes) -> Reviews:
    return Reviews(rotten_tomatoes)


@pytest.mark.parametrize("unseen", ["unknown", "pretrained"])
def test_the_trimmer_keeps_the_training_tokens_and_resume_equals_the_uninterrupted_run(
    tmp_path, minilm_tokenizer, reviews, unseen
) -> None:
    whole = TinyClassifier(minilm_tokenizer)
    trainer = _trainer(tmp_path / "whole", 2, VocabularyTrimmer(unseen=unseen))
    trainer.fit(whole, datamodule=reviews)
    embedding = whole.model.get_input_embeddings()
    seen = {int(i) for b in reviews.batches for i in b["input_ids"].reshape(-1)}
    special, unknown = special_token_ids(minilm_tokenizer)
    assert isinstance(embedding, TrimmedEmbedding)
    rows = embedding.token_rows
    ids = torch.arange(len(rows))  # kept: a row of its own among the trained ones
    own = (rows < embedding.kept) & ((rows != rows[unknown]) | (ids == unknown))
    kept = set(ids[own].tolist())
    assert kept == seen | set(special) and embedding.kept == len(kept)
    assert trainer.callback_metrics["vocabulary/kept_ids"] == embedding.kept
    assert embedding.weight.requires_grad and embedding.num_embeddings == 30522
    apart = embedding.unseen_weight
    if unseen == "pretrained":  # every other id holds its own row, untouched by training
        pretrained = TinyClassifier(minilm_tokenizer).model.get_input_embeddings().weight
        dropped = torch.tensor(sorted(set(range(30522)) - kept))
        assert torch.equal(apart, pretrained.detach()[dropped])
    else:
        assert apart is None

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path / "first", 1, VocabularyTrimmer(unseen=unseen), checkpoint).fit(
        TinyClassifier(minilm_tokenizer), datamodule=reviews
    )
    resumed = TinyClassifier(minilm_tokenizer)
    _trainer(tmp_path / "resumed", 2, VocabularyTrimmer(unseen=unseen)).fit(
        resumed, datamodule=reviews, ckpt_path=checkpoint.last_model_path
    )
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # a fresh module tests from the checkpoint: the load trims it like the checkpoint
    fresh = TinyClassifier(minilm_tokenizer)
    _trainer(tmp_path / "test", 1, VocabularyTrimmer(unseen=unseen)).test(
        fresh, datamodule=reviews, ckpt_path=checkpoint.last_model_path
    )
    assert fresh.model.get_input_embeddings().kept == embedding.kept
    # and the export path's loader does the same without the callback
    loaded = load_run_weights(TinyClassifier(minilm_tokenizer), checkpoint.last_model_path)
    for got, want in zip(
        loaded.model.get_input_embeddings().buffers(),
        fresh.model.get_input_embeddings().buffers(),
        strict=True,
    ):
        assert torch.equal(got, want)


def test_the_checkpoints_rows_win_over_the_datas_on_resume(
    tmp_path, minilm_tokenizer, reviews
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = TinyClassifier(minilm_tokenizer)
    _trainer(tmp_path, 1, VocabularyTrimmer(), checkpoint).fit(first, datamodule=reviews)
    resumed = TinyClassifier(minilm_tokenizer)  # told other ids: the checkpoint's still win
    _trainer(tmp_path, 2, VocabularyTrimmer(token_ids=[2204, 2919])).fit(
        resumed, datamodule=reviews, ckpt_path=checkpoint.last_model_path
    )
    saved = first.model.get_input_embeddings().token_rows
    assert torch.equal(resumed.model.get_input_embeddings().token_rows, saved)


def test_resuming_an_untrimmed_run_keeps_the_vocabulary_and_says_so(
    tmp_path, minilm_tokenizer, reviews
) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(tmp_path, 1, checkpoint).fit(TinyClassifier(minilm_tokenizer), datamodule=reviews)
    module = TinyClassifier(minilm_tokenizer)
    with pytest.warns(UserWarning, match="resumed from a checkpoint of an untrimmed model"):
        _trainer(tmp_path, 2, VocabularyTrimmer()).fit(
            module, datamodule=reviews, ckpt_path=checkpoint.last_model_path
        )
    assert isinstance(module.model.get_input_embeddings(), nn.Embedding)


def test_the_trimmer_needs_data_or_ids(tmp_path, minilm_tokenizer, reviews) -> None:
    trainer = _trainer(tmp_path, 1, VocabularyTrimmer())
    with pytest.raises(ValueError, match="without one, pass token_ids"):
        trainer.fit(TinyClassifier(minilm_tokenizer), reviews.train_dataloader())
    module = TinyClassifier(minilm_tokenizer)
    given = VocabularyTrimmer(token_ids=[2204, 2919])
    _trainer(tmp_path, 1, given).fit(module, reviews.train_dataloader())
    special, _ = special_token_ids(minilm_tokenizer)
    assert module.model.get_input_embeddings().kept == len({2204, 2919, *special})


needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxruntime", "onnxscript")),
    reason='the ONNX formats need pip install "lightning-3d[deploy]"',
)


@needs_onnx
def test_exports_of_a_trimmed_model_compute_the_same_and_are_smaller(
    tmp_path, minilm_tokenizer, reviews
) -> None:
    from lightning_3d.export import export

    model = _tiny_bert()
    trimmed = copy.deepcopy(model)
    special, unknown = special_token_ids(minilm_tokenizer)
    kept = set(observed_token_ids(reviews.batches, always=special).tolist())
    trim_vocabulary(trimmed, torch.tensor(sorted(kept)), unknown)
    test = [{k: v for k, v in b.items()} for b in reviews.batches[:2]]
    formats = ("hf", "onnx", "onnx-int8")
    full = export(model, None, tmp_path / "full", formats, test, latency_rounds=0)
    cut = export(trimmed, None, tmp_path / "cut", formats, test, latency_rounds=0)
    for name in formats:  # the same function as the PyTorch model it came from
        assert cut.row(name).agreement == 1.0, name
    assert cut.row("onnx").max_logit_difference < 1e-4
    assert cut.row("hf").max_logit_difference < 1e-5
    # the graphs lose the dropped rows (4 bytes a weight in fp32, 1 in int8) and gain the
    # int64 table of rows, one entry per tokenizer id
    removed, table = (30522 - len(kept)) * 16, 30522 * 8
    assert full.row("onnx").bytes - cut.row("onnx").bytes > 0.95 * (4 * removed - table)
    assert full.row("onnx-int8").bytes - cut.row("onnx-int8").bytes > 0.9 * (removed - table)
    assert cut.row("hf").bytes == full.row("hf").bytes  # restored for from_pretrained
    assert any("restored to all 30522 token ids" in note for note in cut.notes)
    # a review with a token the training data never had reads it as the unknown token
    unseen = next(i for i in range(1000, 30522) if i not in kept)
    ids = torch.tensor([[101, unseen, 102]])
    as_unknown = torch.tensor([[101, unknown, 102]])
    with torch.no_grad():
        a = trimmed.eval()(input_ids=ids).logits
        b = model.eval()(input_ids=as_unknown).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    assert restore_vocabulary(trimmed) and not restore_vocabulary(trimmed)

    # the unseen rows held apart: every format computes the untrimmed model's function, and
    # the graph is written as one table of every id (no smaller, no larger)
    apart = copy.deepcopy(model)
    trim_vocabulary(apart, torch.tensor(sorted(kept)), unknown, unseen="pretrained")
    held = export(
        apart, None, tmp_path / "apart", formats, test, latency_rounds=0, unseen_token_bits=4
    )
    assert held.row("onnx").agreement == held.row("hf").agreement == 1.0
    assert abs(held.row("onnx").bytes - full.row("onnx").bytes) < 0.001 * full.row("onnx").bytes
    assert any("one table of every token id" in note for note in held.notes)
    # ... except onnx-int8 with the rows held apart at other bits: the two tables the model
    # trains with (test_export measures their bytes on a model of realistic width)
    assert held.row("onnx-int8").agreement > 0.95
    assert any("pretrained rows held apart in 4-bit blocks" in note for note in held.notes)
    with pytest.raises(ValueError, match=r"unseen_token_bits=4 sets .* holds none apart"):
        export(trimmed, None, tmp_path / "no", ("onnx-int8",), unseen_token_bits=4)
    with pytest.raises(ValueError, match=r"unseen_token_bits=2; choose from \(8, 4\) or None"):
        export(apart, None, tmp_path / "no", ("onnx-int8",), unseen_token_bits=2)
    with torch.no_grad():
        np.testing.assert_allclose(
            apart.eval()(input_ids=ids).logits.numpy(),
            model(input_ids=ids).logits.numpy(),
            atol=1e-6,
        )


@pytest.mark.parametrize("ranks", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_every_ddp_rank_keeps_the_union_of_the_ranks_ids(launch_two_ranks, tmp_path, ranks):
    import json

    results = launch_two_ranks("vocabulary", tmp_path, 600, ranks)
    for result in results:
        assert result.returncode == 0, result.stdout[-3000:]
    runs = [json.loads((tmp_path / f"vocabulary.rank{r}.json").read_text()) for r in range(ranks)]
    union = set(runs[0]["special"]).union(*(run["seen"] for run in runs))
    assert all(set(run["seen"]) < union for run in runs)  # each rank alone saw fewer ids
    for run in runs:
        assert set(run["kept"]) == union and run["rank_spread"] == 0.0
