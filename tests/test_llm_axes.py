"""The axes on the real SmolLM2 (Llama architecture) classifying by prompt and answer: the
curriculum's per-sample scores, the freezer over LoRA adapters, QAT of the base with LoRA kept
float, and heads+neurons pruning removed on export and reloaded with plain ``from_pretrained``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning import Callback, Trainer
from transformers import AutoModelForCausalLM

from lightning_3d.callbacks import CurriculumSampler, ProgressivePruner, QATHook, SensitivityFreezer
from lightning_3d.tasks import LoRASettings, PromptClassificationTask

ADAPTERS = LoRASettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


def trainer_for(tmp_path, callbacks: list[Callback], **options: Any) -> Trainer:
    settings = {
        "max_epochs": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
        "default_root_dir": tmp_path,
    }  # fmt: skip
    return Trainer(callbacks=callbacks, **{**settings, **options})


class PerSampleLosses(Callback):
    """Every training step's per-sample losses, by dataset index."""

    def __init__(self) -> None:
        self.by_index: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        losses = outputs["per_sample_loss"].tolist()
        for index, loss in zip(outputs["index"].tolist(), losses, strict=True):
            self.by_index[index] = loss


def test_curriculum_scores_are_each_sequences_mean_answer_token_loss(
    small_prompts, tmp_path
) -> None:
    task = PromptClassificationTask(lora=ADAPTERS)
    data = small_prompts(task.tokenizer)
    curriculum, seen = CurriculumSampler(score="loss", warmup_epochs=1), PerSampleLosses()
    trainer_for(tmp_path, [curriculum, seen]).fit(task, datamodule=data)
    assert sorted(seen.by_index) == list(range(16))
    expected = torch.tensor([seen.by_index[i] for i in range(16)])
    torch.testing.assert_close(curriculum.scores, expected)
    assert bool(curriculum.seen.all())
    # one answer token per sample: its loss is -log p(answer), in (0, inf)
    assert bool((expected > 0).all())
    # the class of every sample was recorded from class_label, for class-balanced budgets
    assert curriculum.labels.tolist() == data.splits["train"].classes


def test_the_freezer_freezes_lora_adapters_and_leaves_the_base_frozen(
    small_prompts, tmp_path
) -> None:
    task = PromptClassificationTask(lora=ADAPTERS)
    adapters = {n for n, p in task.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    freezer = SensitivityFreezer(target_trainable=0.5, warmup_steps=2)
    data = small_prompts(task.tokenizer)
    trainer_for(tmp_path, [freezer], max_steps=3).fit(task, datamodule=data)
    still = {n for n, p in task.named_parameters() if p.requires_grad}
    assert still < adapters  # some adapters frozen, no base weight unfrozen
    sizes = {n: p.numel() for n, p in task.named_parameters()}
    share = sum(sizes[n] for n in still) / sum(sizes[n] for n in adapters)
    assert share == pytest.approx(0.5, abs=0.1)


def test_qat_fake_quantizes_the_base_and_keeps_lora_float(small_prompts, tmp_path) -> None:
    task = PromptClassificationTask(lora=ADAPTERS)
    hook = QATHook("int8_weight_only", convert_at_end=False)
    trainer_for(tmp_path, [hook], max_steps=2).fit(task, datamodule=small_prompts(task.tokenizer))
    attention = task.model.get_base_model().model.layers[0].self_attn
    base, adapter = attention.q_proj.base_layer, attention.q_proj.lora_A["default"]
    assert type(base).__name__ == "FakeQuantizedLinear"
    assert type(adapter) is torch.nn.Linear  # the adapters stay float
    assert type(attention.k_proj).__name__ == "FakeQuantizedLinear"  # no adapter there


@pytest.mark.slow
def test_a_4bit_base_trains_its_adapters_and_pruning_and_qat_refuse_it(
    small_prompts, tmp_path
) -> None:
    """QLoRA: SmolLM2 loaded with an NF4 base. The curriculum, the freezer and distillation from
    the snapshot train the adapters while the 4-bit codes stay; the pruner and QAT refuse before
    the first step; the export de-quantizes the base and computes the same logits."""
    pytest.importorskip("bitsandbytes")
    from lightning_3d.callbacks import Distiller
    from lightning_3d.export import dense_float_model
    from lightning_3d.models import four_bit_modules

    settings = LoRASettings(
        r=4, alpha=8, target_modules=["q_proj", "v_proj"], base_quantization="nf4"
    )
    task = PromptClassificationTask(lora=settings)
    four_bit = four_bit_modules(task)
    assert len(four_bit) == 30 * 7  # every linear layer of the 30 blocks; lm_head stays float
    assert "model.base_model.model.model.layers.0.self_attn.q_proj.base_layer" in four_bit
    codes = task.get_submodule(four_bit[0]).weight.detach().clone()
    adapters = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    data = small_prompts(task.tokenizer)
    axes = [
        CurriculumSampler(score="loss", warmup_epochs=1),
        Distiller("snapshot", alpha=0.5, start_step=1, top_k=4),
        SensitivityFreezer(target_trainable=0.5, warmup_steps=2),
    ]
    trainer_for(tmp_path, axes, max_steps=3).fit(task, datamodule=data)
    assert torch.equal(task.get_submodule(four_bit[0]).weight, codes)
    moved = [n for n, p in task.named_parameters() if n in adapters and "lora_B" in n]
    assert any(not torch.equal(dict(task.named_parameters())[n], adapters[n]) for n in moved)
    assert axes[1].teacher_samples > 0

    for axis, message in (
        (ProgressivePruner(target_sparsity=0.5), "ProgressivePruner: .* holds 4-bit weights"),
        (QATHook("int8_weight_only"), "QATHook: .* holds 4-bit weights"),
    ):
        trainer = trainer_for(tmp_path, [axis], max_steps=2)
        with pytest.raises(ValueError, match=message):
            trainer.fit(task, datamodule=data)
        assert trainer.global_step == 0

    dense, notes, _ = dense_float_model(task.model)
    assert not four_bit_modules(dense) and any("4-bit base" in note for note in notes)
    # by hand: the de-quantized codes, plus (alpha / r) B A where an adapter sits
    from bitsandbytes.functional import dequantize_4bit

    attention = task.model.get_base_model().model.layers[0].self_attn
    for name, adapted in (("q_proj", True), ("k_proj", False)):
        wrapper = getattr(attention, name)
        base = wrapper.base_layer if adapted else wrapper
        expected = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        if adapted:
            a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
            expected = expected + (8 / 4) * b.detach() @ a.detach()
        exported = getattr(dense.model.layers[0].self_attn, name)
        assert type(exported) is torch.nn.Linear
        torch.testing.assert_close(exported.weight, expected.reshape(exported.weight.shape))
    # end to end: bitsandbytes' CPU kernel rounds its products (about 1% per layer), the
    # export computes in fp32, so the logits differ a little and the answers agree
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        quantized = task.eval()(batch["input_ids"], batch["attention_mask"])
        merged = dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (merged - quantized).abs().max() < 1.0
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.arange(len(last))
    assert torch.equal(merged[rows, last].argmax(-1), quantized[rows, last].argmax(-1))


@pytest.mark.slow
def test_heads_and_neurons_pruned_on_smollm2_reload_with_plain_from_pretrained(
    small_prompts,
    tmp_path,
) -> None:
    task = PromptClassificationTask(learning_rate=1e-5)  # all weights: structures are linears
    pruner = ProgressivePruner(
        target_sparsity=1 / 3, pattern="heads+neurons", start_step=0, end_step=2, frequency=1
    )
    data = small_prompts(task.tokenizer, train=8, batch_size=4)
    trainer_for(tmp_path, [pruner], max_steps=2).fit(task, datamodule=data)
    ids = torch.tensor([data.splits["test"][i]["input_ids"][:24].tolist() for i in range(2)])
    model = task.model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    pruner.export(task, tmp_path / "pruned")
    with torch.no_grad():
        removed = model(input_ids=ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    config = loaded.config
    # SmolLM2-135M: 3 key/value groups of 3 query heads and 1536 neurons per block
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (2, 6, 64)
    assert config.intermediate_size == 1024
    with torch.no_grad():  # what was saved is what was exported, bit for bit
        torch.testing.assert_close(loaded(input_ids=ids).logits, removed, atol=0, rtol=0)
    # the smaller matrices sum in another order over 30 blocks: logits of magnitude ~20 agree
    # to about 1e-4 relative, and every next-token choice is the masked model's
    torch.testing.assert_close(removed, expected, atol=5e-3, rtol=1e-3)
    assert torch.equal(removed.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_the_plan_runs_on_smollm2_with_lora(small_prompts, tmp_path) -> None:
    """The LM example config's plan: InfoBatch data, the freezer over adapters, distillation
    from the snapshot with cached top-k answer logits, int8 QAT of the base."""
    from lightning_3d.plan import ThreeDPlan

    task = PromptClassificationTask(lora=ADAPTERS)
    adapters = {n for n, p in task.named_parameters() if p.requires_grad}
    plan = ThreeDPlan(data_budget=0.5, trainable=0.5, weight_bits=8, distill=0.5, warmup=0.25)
    data = small_prompts(task.tokenizer, train=16, batch_size=4)
    trainer = trainer_for(tmp_path, plan.callbacks(), max_epochs=2)
    trainer.fit(task, datamodule=data)
    # epoch 0 on all 16 samples (4 steps), epoch 1 on half of them (2 steps)
    assert trainer.global_step == 6
    still = {n for n, p in task.named_parameters() if p.requires_grad}
    assert still < adapters
    hook = next(c for c in trainer.callbacks if isinstance(c, QATHook))
    assert hook.stage == "converted"  # int8 weights at the end of fit, the adapters float
    assert hook.modules and not any("lora_" in name for name in hook.modules)
    metrics = trainer.test(task, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["test/acc"] <= 1.0
