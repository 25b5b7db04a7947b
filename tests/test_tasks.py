"""Tasks: forward + backward on the real models, the per-sample outputs, LoRA, train mode."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback, Trainer

from lightning_3d.data import IGNORE_INDEX, PaddingCollator, PlainTextLM, RottenTomatoes
from lightning_3d.tasks import (
    BASE_QUANTIZATIONS,
    CausalLMTask,
    LoRASettings,
    SequenceClassificationTask,
    causal_lm_losses,
    predicting_positions,
)


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = {
        "max_steps": 2,
        "limit_val_batches": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return Trainer(**{**options, **kwargs})


def _rt_batch(data: RottenTomatoes, size: int = 6) -> dict[str, torch.Tensor]:
    items = [data.splits["train"][i] for i in range(10, 10 + size)]
    return PaddingCollator(data.tokenizer.pad_token_id)(items)


# -- classification -----------------------------------------------------------------------------
def test_classification_step_exposes_per_sample_losses(classifier_task, rotten_tomatoes) -> None:
    batch = _rt_batch(rotten_tomatoes)
    torch.manual_seed(0)
    out = classifier_task.training_step(batch, 0)
    assert set(out) == {"loss", "per_sample_loss", "index", "logits"}
    assert out["per_sample_loss"].shape == (6,) and not out["per_sample_loss"].requires_grad
    assert torch.equal(out["index"], torch.arange(10, 16))
    reference = F.cross_entropy(out["logits"], batch["labels"], reduction="none")
    torch.testing.assert_close(out["per_sample_loss"], reference)
    torch.testing.assert_close(out["loss"].detach(), out["per_sample_loss"].mean())
    classifier_task.zero_grad()
    out["loss"].backward()
    grads = {n: p.grad for n, p in classifier_task.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["model.classifier.weight"].abs().sum() > 0
    assert grads["model.bert.encoder.layer.0.attention.self.query.weight"].abs().sum() > 0
    classifier_task.zero_grad()


def test_model_trains_with_dropout_on(tmp_path, classifier_task, rotten_tomatoes) -> None:
    seen: dict[str, object] = {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["eval_modules"] = [n for n, m in module.named_modules() if not m.training]
            with torch.no_grad():
                first = module(batch["input_ids"], batch["attention_mask"])
                second = module(batch["input_ids"], batch["attention_mask"])
            seen["dropout_active"] = not torch.equal(first, second)

    task = SequenceClassificationTask(learning_rate=1e-5)
    _trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[Probe()]).fit(
        task, rotten_tomatoes
    )
    assert seen == {"eval_modules": [], "dropout_active": True}


def test_fit_logs_loss_accuracy_throughput_and_memory(tmp_path, rotten_tomatoes) -> None:
    task = SequenceClassificationTask()
    initial = task.model.classifier.weight.detach().clone()
    trainer = _trainer(tmp_path, max_steps=3, val_check_interval=3)
    trainer.fit(task, rotten_tomatoes)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc_epoch", "val/loss", "val/acc"):
        assert key in metrics, key
    assert 0.0 <= float(metrics["val/acc"]) <= 1.0
    assert float(metrics["train/samples_per_sec"]) > 0
    assert float(metrics["train/peak_memory_mb"]) > 100  # the model alone is ~90 MB
    assert not torch.equal(task.model.classifier.weight, initial)


def test_lora_trains_adapters_and_head_only(tmp_path, rotten_tomatoes) -> None:
    task = SequenceClassificationTask(lora=LoRASettings(r=4, alpha=8), learning_rate=1e-3)
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert any("lora_B" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(task, rotten_tomatoes)
    after = dict(task.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ("abc", r"3 labels \['a', 'b', 'c'\].*num_labels=2"),  # named labels
        ("012", r"integer labels up to 2 .*num_labels=2; set model num_labels to 3"),
    ],
)
def test_label_count_mismatch_fails_before_training(
    tmp_path, minilm_tokenizer, labels, message
) -> None:
    path = tmp_path / "three_classes.csv"
    path.write_text("text,label\n" + "".join(f"sample {i},{labels[i % 3]}\n" for i in range(30)))
    data = RottenTomatoes(tokenizer=minilm_tokenizer, data_files=str(path))
    task = SequenceClassificationTask()
    initial = task.model.classifier.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        _trainer(tmp_path).fit(task, data)
    assert torch.equal(task.model.classifier.weight, initial)  # no step was taken


def test_data_labels_outside_label_names_are_named(minilm_tokenizer) -> None:
    data = RottenTomatoes(tokenizer=minilm_tokenizer, label_names=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"labels \['fresh', 'rotten'\] are not in label_names"):
        data.setup("fit")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: SequenceClassificationTask(num_labels=1), "num_labels must be at least 2"),
        (lambda: SequenceClassificationTask(learning_rate=0), "learning_rate must be positive"),
        (lambda: SequenceClassificationTask(warmup_ratio=1.0), r"warmup_ratio must be in \[0, 1\)"),
        (lambda: LoRASettings(r=0), "LoRA r must be a positive integer, got 0"),
        (lambda: LoRASettings(dropout=1.0), r"LoRA dropout must be in \[0, 1\)"),
        (
            lambda: LoRASettings(base_quantization="int3"),
            r"base_quantization must be one of \('nf4', 'fp4', 'int4', 'int8'\) or None, "
            "got 'int3'",
        ),
        (
            lambda: SequenceClassificationTask(lora=LoRASettings(base_quantization="nf4")),
            "base_quantization='nf4' is for causal LMs",
        ),
        (
            lambda: LoRASettings(base_embedding_bits=4),
            "base_embedding_bits=4 .* needs base_quantization='int8' .* got base_quantization=None",
        ),
        (
            lambda: LoRASettings(base_quantization="int8", base_embedding_bits=2),
            "base_embedding_bits=2 puts the token table",
        ),
    ],
)
def test_bad_task_arguments(build, message) -> None:
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize("path", ["/no/such/model/dir", "./missing-model", "~/nope/model"])
def test_missing_model_path_is_a_clear_error(path) -> None:
    with pytest.raises(FileNotFoundError, match=f"model path '{path}' does not exist"):
        SequenceClassificationTask(model_name_or_path=path)


def test_unreachable_hub_id_is_a_clear_error() -> None:
    with pytest.raises(OSError, match=r"could not load tokenizer 'l3d-test/no-such-model'.*local"):
        SequenceClassificationTask(model_name_or_path="l3d-test/no-such-model")


def test_missing_gguf_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gguf_file 'model\.gguf' was not found"):
        CausalLMTask(model_name_or_path=str(tmp_path), gguf_file="model.gguf")


# -- causal LM -----------------------------------------------------------------------------------
def test_causal_lm_losses_hand_worked() -> None:
    logits = torch.log(
        torch.tensor(
            [
                [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]],
                [[0.2, 0.2, 0.6], [0.6, 0.2, 0.2], [0.5, 0.5, 0.0 + 1e-9]],
            ]
        )
    )
    labels = torch.tensor([[0, 1, 2], [2, 2, IGNORE_INDEX]])
    # row 0 predicts 1 then 2: -log 0.25, -log 0.1; row 1 predicts 2: -log 0.6 (last is padding)
    loss, per_sequence = causal_lm_losses(logits, labels)
    expected_rows = [(-math.log(0.25) - math.log(0.1)) / 2, -math.log(0.6)]
    torch.testing.assert_close(per_sequence, torch.tensor(expected_rows))
    torch.testing.assert_close(
        loss, torch.tensor((-math.log(0.25) - math.log(0.1) - math.log(0.6)) / 3)
    )
    positions = predicting_positions(labels)  # every row predicts from position 0, row 0 from 1
    assert positions.tolist() == [0, 1]
    kept = causal_lm_losses(logits[:, positions], labels, positions)
    torch.testing.assert_close(kept, (loss, per_sequence))


def test_answer_only_loss_computes_the_labelled_logits_alone(
    smollm2_tokenizer, tiny_llama_folder
) -> None:
    """With prompts labelled -100, the training step computes the logits of the few predicting
    positions only, and its loss and adapter gradients are those of the full logits."""
    adapters = LoRASettings(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    task = CausalLMTask(model_name_or_path=str(tiny_llama_folder), lora=adapters)
    for name, parameter in task.named_parameters():  # LoRA B starts at 0: give it gradients
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    generator = torch.Generator().manual_seed(0)
    items = []
    for prompt_length, answer_length in ((9, 1), (5, 2), (12, 1)):
        ids = torch.randint(3, 2000, (prompt_length + answer_length,), generator=generator)
        labels = torch.cat([torch.full((prompt_length,), IGNORE_INDEX), ids[prompt_length:]])
        items.append({"input_ids": ids, "labels": labels, "index": len(items)})
    batch = PaddingCollator(smollm2_tokenizer.pad_token_id)(items)
    positions = predicting_positions(batch["labels"])
    assert positions.tolist() == [4, 5, 8, 11]  # of 12 positions that predict a next token

    full = task(batch["input_ids"], batch["attention_mask"])
    kept = task(batch["input_ids"], batch["attention_mask"], positions)
    assert kept.shape == (3, 4, len(smollm2_tokenizer))
    torch.testing.assert_close(kept, full[:, positions])
    reference, reference_rows = causal_lm_losses(full, batch["labels"])
    reference.backward()
    reference_grads = {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}
    task.zero_grad()

    out = task.training_step(batch, 0)
    torch.testing.assert_close(out["loss"], reference)
    torch.testing.assert_close(out["per_sample_loss"], reference_rows.detach())
    out["loss"].backward()
    grads = {n: p.grad for n, p in task.named_parameters() if p.grad is not None}
    assert grads.keys() == reference_grads.keys() and len(grads) == 8  # 2 blocks x q, v x A, B
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], msg=name)


def test_causal_lm_forward_backward_matches_hugging_face_loss(smollm2_tokenizer) -> None:
    task = CausalLMTask(lora=LoRASettings(r=4, target_modules=["q_proj", "v_proj"]))
    data = PlainTextLM(tokenizer=task.tokenizer, block_size=32, batch_size=2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = task.training_step(batch, 0)
    assert set(out) == {"loss", "per_sample_loss", "index"}
    with torch.no_grad():
        reference = task.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(out["loss"].detach(), reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["loss"].detach(), out["per_sample_loss"].mean())  # full blocks
    out["loss"].backward()
    with_grad = {n for n, p in task.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(p.grad.abs().sum() > 0 for n, p in task.named_parameters() if "lora_B" in n)
    assert 1 < math.exp(out["loss"].item()) < 1e4


def test_causal_lm_fit_logs_perplexity(tmp_path) -> None:
    task = CausalLMTask(lora=LoRASettings(r=2, target_modules=["q_proj"]))
    data = PlainTextLM(tokenizer=task.tokenizer, block_size=32, batch_size=2)
    trainer = _trainer(tmp_path, max_steps=1, val_check_interval=1, limit_val_batches=2)
    trainer.fit(task, data)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["val/ppl"], torch.exp(metrics["val/loss"]))
    assert float(metrics["val/ppl"]) > 1


def test_adapters_are_deployed_beside_a_base_on_the_runtime_grid_and_merged_otherwise() -> None:
    deployments = {q: LoRASettings(base_quantization=q).deployment for q in BASE_QUANTIZATIONS}
    assert deployments == {"nf4": "merge", "fp4": "merge", "int4": "separate", "int8": "separate"}
    assert LoRASettings().deployment == "merge"
    assert LoRASettings(base_quantization="int8").load_arguments() == {}  # no bitsandbytes
