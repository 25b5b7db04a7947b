"""QATHook in real Lightning runs: when fake quantization goes on, what it logs, conversion,
resume from a checkpoint of every stage, pruning and QAT in one run, LoRA + QAT on MiniLM, and
the real MiniLM exported and reloaded.

A small network on fixed synthetic data keeps most runs to a second or two.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_3d.callbacks import ProgressivePruner, QATHook
from lightning_3d.quantization import fake_quantized_modules, load_quantized, quantized_modules

STEPS_PER_EPOCH, BATCH = 6, 8
HIDDEN = ["layers.0", "layers.1"]


def points(batch_size: int = BATCH) -> DataLoader:
    x = torch.randn(STEPS_PER_EPOCH * BATCH, 32, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=batch_size)


class Net(pl.LightningModule):
    """Two hidden linear layers ``layers.0`` (32 -> 64) and ``layers.1`` (64 -> 64) and a
    ``classifier`` head, trained with AdamW."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(32, 64), torch.nn.Linear(64, 64)])
        self.classifier = torch.nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.classifier(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Watcher(Callback):
    """Whether fake quantization was on in each step's forward pass (put it after the hook)."""

    def __init__(self) -> None:
        self.enabled: list[bool] = []

    def on_train_batch_start(self, trainer: Any, module: Any, *args: Any) -> None:
        quantizer = module.layers[0].weight_fake_quantizer
        self.enabled.append(bool(quantizer.enabled))


def trainer_for(callbacks: list[Callback], tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    options = {
        "accelerator": "cpu",
        "max_epochs": 2,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def predictions(trainer: pl.Trainer, model: pl.LightningModule, **kwargs: Any) -> torch.Tensor:
    return torch.cat(trainer.predict(model, dataloaders=points(), **kwargs))


def test_fake_quantization_goes_on_at_start_step_and_logs_stage_and_errors(tmp_path):
    hook = QATHook("int4_weight_only", start_step=4, convert_at_end=False, error_every=2)
    watcher = Watcher()
    logger = CSVLogger(tmp_path, name="qat")
    model = Net()
    trainer = trainer_for([hook, watcher], tmp_path, logger=logger, log_every_n_steps=1)
    trainer.fit(model, points())
    assert sorted(fake_quantized_modules(model)) == HIDDEN  # the head stays float
    assert watcher.enabled == [False] * 4 + [True] * (2 * STEPS_PER_EPOCH - 4)
    assert hook.stage == "fake_quant" and hook.modules == HIDDEN
    with open(Path(logger.log_dir) / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    stages = [float(r["qat/stage"]) for r in rows if r.get("qat/stage")]
    assert stages == [0.0] * 4 + [1.0] * (2 * STEPS_PER_EPOCH - 4)
    errors = [r for r in rows if r.get("qat/weight_error")]
    assert [int(r["step"]) for r in errors] == [4, 6, 8, 10, 12]  # at the start, then every 2
    layer = float(errors[-1]["qat/weight_error/layers.0"])
    weight = model.layers[0].weight.detach()
    quantized = model.layers[0].weight_fake_quantizer(weight)
    assert layer == pytest.approx(((quantized - weight).norm() / weight.norm()).item(), rel=1e-4)


def test_start_epoch_and_conversion_at_fit_end_match_the_prepared_predictions(tmp_path):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    hook = QATHook("int8_dynamic_act_int4_weight", start_epoch=1, convert_at_end=False)
    watcher = Watcher()
    model = Net()
    trainer = trainer_for([hook, watcher], tmp_path)
    trainer.fit(model, points())
    assert watcher.enabled == [False] * STEPS_PER_EPOCH + [True] * STEPS_PER_EPOCH
    prepared = predictions(trainer, model)
    hook.convert(model)
    assert hook.stage == "converted" and not fake_quantized_modules(model)
    assert all(isinstance(model.get_submodule(n).weight, IntxUnpackedToInt8Tensor) for n in HIDDEN)
    assert hook.conversion["quantized_bytes"] < hook.conversion["float_bytes"]
    assert set(hook.conversion["weight_errors"]) == set(HIDDEN)
    # measured: identical on CPU; the tolerance leaves room for other kernels
    torch.testing.assert_close(predictions(trainer, model), prepared, rtol=0, atol=1e-5)


def test_resume_from_checkpoints_before_and_after_fake_quantization_and_after_conversion(
    tmp_path,
):
    """Two steps per epoch, checkpoints at every epoch's end (Lightning resumes a plain loader
    exactly only there); fake quantization goes on at step 5, between the step-4 and step-6
    checkpoints. Each resumed run converts to the same integers as the whole run."""
    saver = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    epochs, loader = {"max_epochs": 6}, points(24)
    model, hook = Net(), QATHook("int8_weight_only", start_step=5)
    trainer = trainer_for([hook, saver], tmp_path, enable_checkpointing=True, **epochs)
    trainer.fit(model, loader)
    assert hook.stage == "converted"
    whole = predictions(trainer, model)
    expected = {n: (w.qdata, w.scale) for n, w in model.state_dict().items() if hasattr(w, "qdata")}
    assert sorted(expected) == [f"{n}.weight" for n in HIDDEN]
    before, after = (tmp_path / "ckpt" / f"epoch={e}-step={s}.ckpt" for e, s in ((1, 4), (2, 6)))
    for checkpoint in (before, after):
        resumed, hook2 = Net(), QATHook("int8_weight_only", start_step=5)
        trainer_for([hook2], tmp_path, **epochs).fit(resumed, loader, ckpt_path=checkpoint)
        state = resumed.state_dict()
        for name, (qdata, scale) in expected.items():
            assert torch.equal(state[name].qdata, qdata), (checkpoint.name, name)
            torch.testing.assert_close(state[name].scale, scale, rtol=0, atol=0)
    converted = tmp_path / "converted.ckpt"
    trainer.save_checkpoint(converted)
    fresh, hook3 = Net(), QATHook("int8_weight_only", start_step=5)
    evaluator = trainer_for([hook3], tmp_path)
    assert torch.equal(predictions(evaluator, fresh, ckpt_path=converted), whole)
    assert hook3.stage == "converted"
    # a checkpoint taken before conversion, evaluated with the converted model: converted anew
    last = tmp_path / "ckpt" / "epoch=5-step=12.ckpt"
    assert torch.equal(predictions(trainer, model, ckpt_path=last), whole)
    assert hook.stage == "converted" and quantized_modules(model) == HIDDEN
    with pytest.raises(ValueError, match="holds a converted"):
        trainer_for([QATHook("int8_weight_only")], tmp_path).fit(Net(), loader, ckpt_path=converted)
    with pytest.raises(ValueError, match="trained with quantization 'int8_weight_only'"):
        trainer_for([QATHook("int4_weight_only")], tmp_path).fit(Net(), loader, ckpt_path=after)
    with pytest.raises(ValueError, match="group_size or embeddings differ"):
        other = QATHook("int8_weight_only", embeddings=False)
        trainer_for([other], tmp_path).fit(Net(), loader, ckpt_path=after)
    report = hook.export(model, tmp_path / "export")  # converted at fit end: the hook knows
    assert report["float_bytes"] == hook.conversion["float_bytes"] > 2 * report["file_bytes"]
    assert report["quantized_modules"] == HIDDEN and report["recipe"] == "int8_weight_only"
    reloaded = load_quantized(tmp_path / "export", Net())
    with torch.no_grad():
        assert torch.equal(torch.cat([reloaded(x) for x, _ in points()]), whole)


def test_pruning_and_qat_in_one_run_keep_the_sparsity_after_conversion(tmp_path):
    pruner = ProgressivePruner(0.5, include=r"^layers\.", start_step=0, end_step=6, frequency=2)
    hook = QATHook("int8_dynamic_act_int4_weight", start_step=2)
    model = Net()
    trainer_for([pruner, hook], tmp_path).fit(model, points())
    assert hook.stage == "converted"
    for name in HIDDEN:
        quantized = model.get_submodule(name).weight
        pruned = ~pruner.masks[f"{name}.weight"].bool()
        assert pruned.float().mean() == pytest.approx(0.5, abs=0.01)
        assert torch.all(quantized.qdata[pruned] == 0)
        assert torch.all(quantized.dequantize()[pruned] == 0)


def test_bad_arguments_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="start_step or start_epoch, not both"):
        QATHook(start_step=1, start_epoch=1)
    with pytest.raises(ValueError, match="unknown quantization preset 'int2'"):
        QATHook("int2")
    with pytest.raises(ValueError, match="exclude='\\[' is not a valid regex"):
        QATHook(exclude="[")
    with pytest.raises(ValueError, match="selected no linear or embedding module"):
        trainer_for([QATHook(include="nothing")], tmp_path).fit(Net(), points())
    with pytest.raises(ValueError, match=r"needs a CUDA GPU of compute capability 8\.9"):
        trainer_for([QATHook("float8_dynamic_act_float8_weight")], tmp_path).fit(Net(), points())
    with pytest.raises(ValueError, match=r"groups of 32: layers\.0 \(16 columns\)"):
        model = Net()
        model.layers[0] = torch.nn.Linear(16, 64)
        trainer_for([QATHook("int4_weight_only")], tmp_path).fit(model, points())


def minilm_batches(rotten_tomatoes, count: int) -> list[dict[str, torch.Tensor]]:
    loader = rotten_tomatoes.train_dataloader()
    return [batch for _, batch in zip(range(count), loader, strict=False)]


def fixed(batches: list[dict[str, torch.Tensor]]) -> DataLoader:
    """A loader that yields these batches as they are."""
    return DataLoader(batches, batch_size=None)


def test_lora_and_qat_train_the_adapters_only_over_fake_quantized_base_layers(
    tmp_path, rotten_tomatoes
):
    from lightning_3d.tasks import LoRASettings, SequenceClassificationTask

    task = SequenceClassificationTask(lora=LoRASettings(r=4), learning_rate=1e-3)
    before = {n: p.detach().clone() for n, p in task.named_parameters()}
    hook = QATHook("int8_dynamic_act_int4_weight", convert_at_end=False)
    batches = minilm_batches(rotten_tomatoes, 3)
    trainer_for([hook], tmp_path, max_steps=3).fit(task, fixed(batches))
    fake = fake_quantized_modules(task)
    wrapped = {n.removesuffix(".lora_A") for n, _ in task.named_modules() if n.endswith("lora_A")}
    assert wrapped and all(f"{n}.base_layer" in fake for n in wrapped)
    assert not any("lora_" in n for n in fake)
    changed = {n for n, p in task.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "classifier" in n for n in changed)
    assert any("lora_B" in n for n in changed)
    ids = batches[0]["input_ids"], batches[0]["attention_mask"]
    task.eval()
    with torch.no_grad():
        prepared = task(*ids)
        hook.convert(task)
        converted = task(*ids)
    torch.testing.assert_close(converted, prepared, rtol=0, atol=1e-4)
    assert type(task.model.base_model.model.classifier.modules_to_save.default.weight) is (
        torch.nn.Parameter
    )


def test_minilm_qat_exports_a_smaller_model_that_reloads_with_the_same_predictions(
    tmp_path, rotten_tomatoes
):
    from lightning_3d.tasks import SequenceClassificationTask

    task = SequenceClassificationTask()
    hook = QATHook("int8_dynamic_act_int4_weight", convert_at_end=False)
    batches = minilm_batches(rotten_tomatoes, 3)
    trainer_for([hook], tmp_path, max_steps=2).fit(task, fixed(batches[:2]))
    probe = batches[2]

    def agreement(model: torch.nn.Module) -> float:
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        return (logits.argmax(-1) == probe["labels"]).float().mean().item()

    task.eval()
    report = hook.export(task.model, tmp_path / "export", evaluate=agreement)
    assert hook.stage == "converted"
    assert report["metric_after_conversion"] == report["metric_before_conversion"]
    assert report["float_bytes"] / report["file_bytes"] > 5  # int4 linears and embeddings
    reloaded = load_quantized(tmp_path / "export")
    with torch.no_grad():
        expected = task.model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
        got = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
    assert torch.equal(got.logits, expected.logits)
