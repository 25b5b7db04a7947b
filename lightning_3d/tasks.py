"""LightningModules that fine-tune Hugging Face models: the demo tasks the axes act on.

* :class:`SequenceClassificationTask`: any ``AutoModelForSequenceClassification`` (default
  all-MiniLM-L6-v2); logs loss, accuracy, samples/s and peak memory. ``training_step`` returns the
  per-sample losses and the samples' dataset indices beside the mean loss it optimizes, so a
  callback can read them in ``on_train_batch_end(outputs=...)``.
* :class:`CausalLMTask`: any ``AutoModelForCausalLM`` (default SmolLM2-135M-Instruct from a GGUF
  file, converted once to safetensors); logs loss and perplexity.
* :class:`PromptClassificationTask`: a causal LM fine-tuned to answer a prompt with one of a few
  answers (:class:`~lightning_3d.data.RottenTomatoesPrompts`); accuracy by comparing the
  log-probabilities of the answers (:func:`answer_log_probs`), no generation loop.

Both accept an optional :class:`LoRASettings` to train ``peft`` LoRA adapters, not all weights.

Example:
    >>> from lightning import Trainer
    >>> from lightning_3d.data import RottenTomatoes
    >>> task = SequenceClassificationTask(learning_rate=3e-5)  # doctest: +SKIP
    >>> Trainer(max_epochs=1).fit(task, RottenTomatoes(tokenizer=task.tokenizer))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_3d.data import IGNORE_INDEX, PromptTemplate
from lightning_3d.distillation import TEACHER_KEY, distil
from lightning_3d.models import (
    load_pretrained,
    load_tokenizer,
    resolve_causal_lm,
    resolve_classifier,
)

log = logging.getLogger(__name__)

#: 4-bit formats of a frozen LoRA base held in 4 bits (bitsandbytes ``bnb_4bit_quant_type``).
BITSANDBYTES_BASES = ("nf4", "fp4")
#: A frozen LoRA base rounded to the deployment runtime's integer grid, and its bits.
RUNTIME_GRID_BASES = {"int4": 4, "int8": 8}
BASE_QUANTIZATIONS = (*BITSANDBYTES_BASES, *RUNTIME_GRID_BASES)
#: Parameter-name fragments that are excluded from weight decay (biases and normalization).
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


@dataclass
class LoRASettings:
    """LoRA adapter settings, turned into a ``peft.LoraConfig`` for the task's model.

    The adapter adds ``W x + (alpha / r) * B A x`` with ``A: r x d_in`` and ``B: d_out x r``
    trainable and ``W`` frozen. The classification head stays fully trainable.

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input, a fresh mask for every adapter; on a CPU the
            masks cost about a fifth of a SmolLM2-135M step with four adapters a block (0 skips
            them; BENCHMARKS.md).
        target_modules: module-name suffixes (or one regex) to adapt; ``None`` uses peft's default
            for the architecture (``query``/``value`` for BERT, ``q_proj``/``v_proj`` for Llama).
        base_quantization: the frozen base of a causal LM, the adapters staying fp32.
            ``"nf4"`` or ``"fp4"``: held in 4 bits (bitsandbytes ``Linear4bit``, blocks of 64
            with one absmax scale, de-quantized to fp32 in every product: QLoRA); pruning and
            QAT refuse it before training; the export de-quantizes it and merges the adapters.
            ``"int4"`` or ``"int8"``: every base weight rounded once, before training, to the
            grid ONNX Runtime GenAI deploys it on (:func:`lightning_3d.generation.runtime_grid`:
            symmetric, blocks of 32), held in fp32: the adapters learn against the weights
            that will be deployed, and the GenAI export keeps them beside that base
            (``lora="separate"``), so the deployed decoder computes what was trained (QAT of a
            frozen base, at no cost per step). ``None``: a float base.
        base_embedding_bits: with ``base_quantization="int8"``, ``4`` puts the token table
            (the output layer, and the input embedding tied to it) on the int4 grid and every
            other base weight on the int8 grid: the grid of ``export_generator(...,
            weight_bits=8, embedding_bits=4)``, about 3.6x smaller than fp32 on SmolLM2 where
            the table stored once in int8 (``None``: the table on the base's grid) is 3.3x.
        untie_output: with ``base_embedding_bits=4``, give the output layer its own copy of
            the tied table, on the int8 grid with the blocks (the input embedding stays on
            int4): the answers are scored at the finer grid, for about 28 MB more on SmolLM2
            (:func:`lightning_3d.generation.untie_output_layer`; the GenAI export stores it so).

    Example:
        >>> LoRASettings(r=4).to_peft("SEQ_CLS").r
        4
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    base_quantization: str | None = None
    base_embedding_bits: int | None = None
    untie_output: bool = False

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.base_quantization not in (None, *BASE_QUANTIZATIONS):
            raise ValueError(
                f"LoRA base_quantization must be one of {BASE_QUANTIZATIONS} or None, got "
                f"{self.base_quantization!r}"
            )
        if self.base_embedding_bits is not None and (
            self.base_quantization != "int8" or self.base_embedding_bits not in (4, 8)
        ):
            raise ValueError(
                f"LoRA base_embedding_bits={self.base_embedding_bits!r} puts the token table "
                "on the int4 grid below an int8 base: it needs base_quantization='int8' and "
                f"4 (or 8), got base_quantization={self.base_quantization!r}"
            )
        if self.untie_output and self.base_embedding_bits != 4:
            raise ValueError(
                "LoRA untie_output=True puts the output layer on the int8 grid apart from an "
                "int4 token table: it needs base_quantization='int8' and base_embedding_bits=4, "
                f"got {self.base_quantization!r} and {self.base_embedding_bits!r}"
            )

    def load_arguments(self) -> dict[str, Any]:
        """``from_pretrained`` keyword arguments for the base: a bitsandbytes 4-bit config when
        ``base_quantization`` is set, else none.

        Raises:
            ImportError: bitsandbytes is not installed.
        """
        if self.base_quantization not in BITSANDBYTES_BASES:
            return {}
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                f"LoRA base_quantization={self.base_quantization!r} needs bitsandbytes: "
                "pip install bitsandbytes"
            )
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.base_quantization,
            bnb_4bit_compute_dtype=torch.float32,
        )
        return {"quantization_config": config}

    @property
    def deployment(self) -> str:
        """How a GenAI export deploys these adapters (``export_generator``'s ``lora``):
        ``"separate"`` beside a base on the runtime's grid, else ``"merge"``."""
        return "separate" if self.base_quantization in RUNTIME_GRID_BASES else "merge"

    def round_base(self, model: torch.nn.Module) -> None:
        """Round ``model``'s linear weights to the runtime grid of ``base_quantization``
        (``"int4"``/``"int8"``; nothing otherwise).

        Raises:
            ImportError: ONNX Runtime (its quantizer defines the grid) is not installed.
        """
        bits = RUNTIME_GRID_BASES.get(self.base_quantization or "")
        if bits is None:
            return
        if importlib.util.find_spec("onnxruntime") is None:
            raise ImportError(
                f"LoRA base_quantization={self.base_quantization!r} rounds to ONNX Runtime's "
                "grid: pip install 'lightning-3d[deploy]'"
            )
        from lightning_3d.generation import round_to_runtime_grid, untie_output_layer

        if self.untie_output and untie_output_layer(model):
            log.info("LoRA base: the output layer untied from the token table (int8 grid)")
        table = self.base_embedding_bits
        rounded = round_to_runtime_grid(model, bits, embedding_bits=table)
        log.info(
            "LoRA base: %d layers on the int%d runtime grid%s", len(rounded), bits,
            f", the token table on the int{table} one" if table and table != bits else "",
        )  # fmt: skip

    def to_peft(self, task_type: str):  # -> peft.LoraConfig
        from peft import LoraConfig

        return LoraConfig(
            task_type=task_type,
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
        )


# a task's hyperparameters hold its LoRASettings: checkpoints load with torch's default
# ``weights_only=True`` (what ``Trainer.fit(ckpt_path=...)`` uses) only when the class is allowed
torch.serialization.add_safe_globals([LoRASettings])


def total_training_steps(trainer: Any) -> int | float:
    """Optimizer steps of the whole fit, for learning-rate schedules.

    Lightning's ``trainer.estimated_stepping_batches`` assumes every epoch is as long as the first;
    a callback that changes epoch lengths (``CurriculumSampler``) knows the exact total through a
    ``planned_optimizer_steps(trainer)`` method, which wins when present.
    """
    for callback in trainer.callbacks:
        planned = getattr(callback, "planned_optimizer_steps", None)
        if callable(planned):
            return planned(trainer)
    return trainer.estimated_stepping_batches


def weighted_mean(per_sample: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``mean_i(w_i * l_i)`` with ``w = batch["sample_weight"]`` when the batch has it (data
    selection that drops samples at random puts it there to keep the gradient unbiased), else
    the plain mean."""
    weights = batch.get("sample_weight")
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample.dtype)).mean()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB else


class PretrainedTask(LightningModule):
    """What both tasks share: LoRA wrapping, train mode, AdamW with warm-up, throughput logging.

    Optimizer: AdamW over trainable parameters, with weight decay on all but biases and norms,
    learning rate warmed up linearly over ``warmup_ratio`` of the run, then decayed linearly to 0.
    """

    def __init__(self, learning_rate: float, weight_decay: float, warmup_ratio: float) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        self._batch_start = 0.0

    def configure_model(self) -> None:
        """Nothing to build: the model exists from ``__init__``. Present so that model-parallel
        strategies accept the task; ``CompressedFSDPStrategy`` then shards it itself."""

    def _attach(self, model: torch.nn.Module, lora: LoRASettings | None, task_type: str) -> None:
        """Wrap ``model`` with LoRA if asked and put it in train mode.

        ``from_pretrained`` returns modules in eval mode and Lightning keeps each submodule's
        mode, so without ``train()`` dropout would silently stay off during fine-tuning.
        """
        if lora is not None:
            from peft import get_peft_model

            try:
                model = get_peft_model(model, lora.to_peft(task_type))
            except ValueError as error:
                if "not found in the base model" not in str(error):
                    raise
                linears = sorted(
                    {
                        name.rsplit(".", 1)[-1]
                        for name, module in model.named_modules()
                        if isinstance(module, torch.nn.Linear)
                    }
                )
                raise ValueError(
                    f"LoRA target_modules={lora.target_modules!r} match no module of "
                    f"{type(model).__name__}; its linear layers are named {linears}"
                ) from error
        self.model = model.train()

    def configure_optimizers(self) -> dict[str, Any]:
        from transformers import get_linear_schedule_with_warmup

        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [
            {
                "params": [p for n, p in trainable if not any(k in n for k in NO_DECAY)],
                "weight_decay": self.hparams.weight_decay,
            },
            {
                "params": [p for n, p in trainable if any(k in n for k in NO_DECAY)],
                "weight_decay": 0.0,
            },
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total = max(1, int(total_training_steps(self.trainer)))
        scheduler = get_linear_schedule_with_warmup(
            optimizer, round(self.hparams.warmup_ratio * total), total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    def on_train_batch_end(
        self, outputs: Any, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> None:
        """Log samples/s of the step (forward, backward, optimizer) and the peak memory so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels run asynchronously: wait before timing
        elapsed = time.perf_counter() - self._batch_start
        self.log("train/samples_per_sec", batch["input_ids"].shape[0] / max(elapsed, 1e-9))
        self.log("train/peak_memory_mb", peak_memory_mb(self.device))


class SequenceClassificationTask(PretrainedTask):
    """Fine-tune a Hugging Face sequence classifier with cross-entropy.

    Loss: ``L = (1/B) * sum_i l_i`` with ``l_i = -log softmax(z_i)[y_i]``. ``training_step`` returns
    ``{"loss": L, "per_sample_loss": l (detached, shape [B]), "index": dataset indices [B],
    "logits": z (detached)}``; Lightning hands that dict to every callback's
    ``on_train_batch_end``. The optimized loss is exactly the mean of ``per_sample_loss``, or
    ``(1/B) * sum_i w_i l_i`` when the batch carries ``sample_weight`` ``w`` (put there by
    ``CurriculumSampler(rescale_loss=True)``). With a ``Distiller``, ``l_i`` is the distillation
    loss ``(1 - alpha) * l_i + alpha * T^2 * KL(teacher_i || student_i)``
    (:func:`~lightning_3d.distillation.distil`), which the data axis then scores.

    Args:
        model_name_or_path: local folder or Hub id; ``None`` is the packaged all-MiniLM-L6-v2.
        num_labels: number of classes (a new head is initialized when the checkpoint has none).
        lora: train LoRA adapters (and the head) instead of all weights.
        learning_rate, weight_decay, warmup_ratio: AdamW and linear warm-up/decay schedule.

    Example:
        >>> task = SequenceClassificationTask(lora=LoRASettings(r=8))  # doctest: +SKIP
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        num_labels: int = 2,
        lora: LoRASettings | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_ratio)
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        if lora is not None and lora.base_quantization is not None:
            raise ValueError(
                f"LoRA base_quantization={lora.base_quantization!r} is for causal LMs "
                "(CausalLMTask, PromptClassificationTask): a classifier's head trains in full"
            )
        from transformers import AutoModelForSequenceClassification

        source = resolve_classifier(model_name_or_path)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(source)
        model = load_pretrained(
            AutoModelForSequenceClassification, source, "model", num_labels=num_labels
        )
        self._attach(model, lora, "SEQ_CLS")
        self.train_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_labels, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_labels, average="micro")

    def setup(self, stage: str) -> None:
        """Check that the data's labels fit the classifier before any step runs."""
        datamodule = getattr(self.trainer, "datamodule", None)
        data_labels = getattr(datamodule, "label_names", None)
        wanted = self.hparams.num_labels
        if data_labels and len(data_labels) != wanted:
            raise ValueError(
                f"the data has {len(data_labels)} labels {data_labels} but the task was built "
                f"with num_labels={wanted}; set model num_labels to match"
            )
        splits = getattr(datamodule, "splits", None) or {}
        integer_labels = {
            label for split in splits.values() for label in (getattr(split, "labels", None) or [])
        }
        if integer_labels and not data_labels and max(integer_labels) >= wanted:
            raise ValueError(
                f"the data has integer labels up to {max(integer_labels)} "
                f"({len(integer_labels)} distinct) but the task was built with "
                f"num_labels={wanted}; set model num_labels to {max(integer_labels) + 1}"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return the logits ``[batch, num_labels]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def _losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return logits, F.cross_entropy(logits.float(), batch["labels"], reduction="none")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        logits, per_sample = self._losses(batch)
        per_sample = distil(per_sample, logits, batch)
        loss = weighted_mean(per_sample, batch)
        size = len(per_sample)
        self.train_accuracy(logits.detach(), batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", self.train_accuracy, on_step=True, on_epoch=True, batch_size=size)
        return {
            "loss": loss,
            "per_sample_loss": per_sample.detach(),
            "index": batch["index"],
            "logits": logits.detach(),
        }

    def score_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What ``training_step`` returns for the data axis, without logging or metrics."""
        logits, per_sample = self._losses(batch)
        return {"per_sample_loss": per_sample, "index": batch["index"], "logits": logits}

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, accuracy) -> None:
        logits, per_sample = self._losses(batch)
        accuracy(logits, batch["labels"])
        size = len(per_sample)
        self.log(f"{stage}/loss", per_sample.mean(), sync_dist=True, batch_size=size)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=size)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return {"index": batch["index"], "prediction": logits.argmax(-1), "logits": logits}


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions ``t`` whose next token ``t+1`` is labelled in some row: the only logits a
    next-token loss reads.

    An answer-only loss (prompt tokens labelled ``-100``) needs the logits of a few positions of
    each sequence; the language-model head (``hidden x vocabulary``, a fifth of SmolLM2's
    multiply-adds) and the ``[batch, length, vocabulary]`` logits need not be computed anywhere
    else.

    Example:
        >>> predicting_positions(torch.tensor([[-100, -100, 5, 7], [-100, 3, -100, -100]]))
        tensor([0, 1, 2])
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def causal_lm_losses(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: token-mean loss and per-sequence mean losses.

    With ``m_it = 1`` where ``labels[i, t+1] != -100``, ``l_it`` the loss of predicting token
    ``t+1`` from position ``t``: ``L = sum(m * l) / sum(m)`` (what Hugging Face models optimize)
    and ``l_i = sum_t(m_it * l_it) / sum_t(m_it)``.

    Args:
        logits: ``[batch, length, vocabulary]``, or ``[batch, len(positions), vocabulary]``: the
            logits of ``positions`` only (every position where ``m`` is 1 among them,
            :func:`predicting_positions`); the losses are the same.
        labels: ``[batch, length]`` token ids, ``-100`` where nothing is predicted.
        positions: the sequence positions ``logits`` hold, when not all of them.
    """
    if positions is None:
        shifted_logits, targets = logits[:, :-1].float(), labels[:, 1:]
    else:
        shifted_logits, targets = logits.float(), labels[:, positions + 1]
    token_losses = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view_as(targets)
    mask = (targets != IGNORE_INDEX).to(token_losses.dtype)
    per_sequence = (token_losses * mask).sum(1) / mask.sum(1).clamp_min(1)
    return (token_losses * mask).sum() / mask.sum().clamp_min(1), per_sequence


class CausalLMTask(PretrainedTask):
    """Fine-tune a causal language model on next-token prediction; logs loss and perplexity.

    ``perplexity = exp(mean token loss)`` over the validation (or test) set, with the mean taken
    over tokens, not batches. ``training_step`` returns per-sequence losses and indices like
    :class:`SequenceClassificationTask`; a batch with ``sample_weight`` ``w`` or teacher targets
    (a ``Distiller``: per-sequence losses blended with the top-k token KL, see
    :func:`~lightning_3d.distillation.distil`) optimizes ``(1/B) * sum_i w_i l_i`` over
    per-sequence losses instead of the token mean. Training and scoring compute the logits of the
    labelled positions only (:func:`predicting_positions`, the model's ``logits_to_keep``): with
    an answer-only loss that skips the language-model head over every prompt token.

    Args:
        model_name_or_path: local folder, ``.gguf`` file, or Hub id; ``None`` is the packaged
            SmolLM2-135M-Instruct (GGUF, de-quantized once to a cached safetensors folder).
        gguf_file: a GGUF file name inside the ``model_name_or_path`` folder.
        lora: train LoRA adapters instead of all weights.

    Example:
        >>> adapters = LoRASettings(r=16, target_modules=["q_proj", "v_proj"])
        >>> task = CausalLMTask(lora=adapters)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        gguf_file: str | None = None,
        lora: LoRASettings | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__(learning_rate, weight_decay, warmup_ratio)
        from transformers import AutoModelForCausalLM

        source = resolve_causal_lm(model_name_or_path, gguf_file)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(source)
        arguments = lora.load_arguments() if lora is not None else {}
        model = load_pretrained(AutoModelForCausalLM, source, "model", **arguments)
        if lora is not None:
            lora.round_base(model)
        #: how a GenAI export deploys this task's adapters (``LoRASettings.deployment``)
        self.lora_deployment = "merge" if lora is None else lora.deployment
        self._attach(model, lora, "CAUSAL_LM")
        #: whether the model computes the logits of chosen positions only (``logits_to_keep``)
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the logits ``[batch, sequence, vocabulary]``, or ``[batch, len(positions),
        vocabulary]``: those of ``positions`` only (the model's ``logits_to_keep``)."""
        kept = {} if positions is None else {"logits_to_keep": positions}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kept).logits

    def _losses(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, token-mean loss and per-sequence losses of a training batch.

        The logits are computed at the labelled positions only (:func:`predicting_positions`)
        when the model takes ``logits_to_keep`` (Hugging Face causal LMs do) and no teacher's
        targets (which hold every token) are in the batch: the same losses and gradients,
        without the language-model head over the prompt.
        """
        positions = None
        if self._keeps_logits and TEACHER_KEY not in batch:
            positions = predicting_positions(batch["labels"])
        logits = self(batch["input_ids"], batch["attention_mask"], positions)
        return logits, *causal_lm_losses(logits, batch["labels"], positions)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        logits, loss, per_sequence = self._losses(batch)
        if "sample_weight" in batch or TEACHER_KEY in batch:
            per_sequence = distil(per_sequence, logits, batch)
            loss = weighted_mean(per_sequence, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(per_sequence))
        return {"loss": loss, "per_sample_loss": per_sequence.detach(), "index": batch["index"]}

    def score_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-sequence losses and indices, as ``training_step`` returns them, without logging."""
        _, _, per_sequence = self._losses(batch)
        return {"per_sample_loss": per_sequence, "index": batch["index"]}

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: MeanMetric) -> torch.Tensor:
        """Add the batch's token-mean loss to ``metric`` (weighted by its tokens); return the
        logits."""
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss, _ = causal_lm_losses(logits, batch["labels"])
        tokens = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
        metric.update(loss, weight=tokens)
        return logits

    def _log_epoch(self, stage: str, metric: MeanMetric) -> None:
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/ppl", torch.exp(loss.clamp(max=math.log(1e12))), prog_bar=True)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_loss)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss)


def answer_log_probs(
    logits_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    answers: Sequence[torch.Tensor],
    logits: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The log-probability of every candidate answer after every prompt, ``[batch, answers]``.

    With ``p_i`` the prompt of row ``i`` (its first ``prompt_lengths[i]`` tokens) and answer
    ``c`` the tokens ``a_c1 .. a_cm``::

        score[i, c] = sum_j log softmax(logits(p_i + a_c)[|p_i| + j - 2])[a_cj]

    the sum of the log-probabilities of the answer's tokens, each given everything before it.
    When every answer is one token, one forward over the rows suffices: in a causal model the
    logits at the prompt's last position do not depend on what follows it, so ``logits`` of the
    batch itself (prompt and true answer) can be passed in and no forward runs. Otherwise each
    prompt is run once per answer (``batch * answers`` rows).

    Args:
        logits_fn: ``(input_ids, attention_mask) -> logits [rows, length, vocabulary]``.
        input_ids: ``[batch, length]``, each row starting with its prompt (right-padded).
        prompt_lengths: ``[batch]`` prompt tokens per row.
        answers: the token ids of each answer.
        logits: ``logits_fn`` of ``input_ids`` already computed (used when every answer is one
            token).

    Example:
        >>> table = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25]]))
        >>> def bigram(ids, mask):  # next-token log-probabilities by the current token
        ...     return table[ids]
        >>> ids = torch.tensor([[0, 1], [1, 0]])
        >>> answer_log_probs(bigram, ids, torch.tensor([1, 1]), [torch.tensor([1]),
        ...                  torch.tensor([2])]).exp()
        tensor([[0.2000, 0.7000],
                [0.2500, 0.2500]])
    """
    rows = torch.arange(len(input_ids), device=input_ids.device)
    if all(len(answer) == 1 for answer in answers):
        if logits is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            mask = (positions < prompt_lengths[:, None]).long()
            logits = logits_fn(input_ids, mask)
        last = logits[rows, prompt_lengths - 1].float().log_softmax(-1)
        return last[:, torch.stack([answer[0] for answer in answers]).to(last.device)]
    sequences, spans = [], []
    for row, length in zip(input_ids, prompt_lengths.tolist(), strict=True):
        for answer in answers:
            sequences.append(torch.cat([row[:length], answer.to(row.device)]))
            spans.append((length, len(answer)))
    longest = max(len(sequence) for sequence in sequences)
    ids = input_ids.new_zeros((len(sequences), longest))
    mask = torch.zeros_like(ids)
    for index, sequence in enumerate(sequences):
        ids[index, : len(sequence)] = sequence
        mask[index, : len(sequence)] = 1
    log_probs = logits_fn(ids, mask).float().log_softmax(-1)
    scores = torch.stack(
        [
            log_probs[index, start - 1 : start - 1 + count]
            .gather(-1, ids[index, start : start + count, None])
            .sum()
            for index, (start, count) in enumerate(spans)
        ]
    )
    return scores.view(len(input_ids), len(answers))


class PromptClassificationTask(CausalLMTask):
    """Classify with a causal LM that answers a prompt: train on the answer tokens, predict the
    answer of highest log-probability (:class:`~lightning_3d.data.PromptTemplate`).

    The loss is :class:`CausalLMTask`'s over the answer tokens only (the data's labels mask the
    prompt), so per-sample scores for the data axis are each sequence's mean answer-token loss.
    Validation and test log ``acc`` (the answer of highest :func:`answer_log_probs` against the
    true one), ``loss`` and ``ppl`` over the answer tokens. A test on plain text (for example
    :class:`~lightning_3d.data.PlainTextLM` on Hamlet) logs ``loss`` and ``ppl`` over its tokens.

    Args:
        template: the answers to score, one per label; it must be the data's
            (:class:`~lightning_3d.data.RottenTomatoesPrompts` ``template``), checked at setup.
        The rest: as :class:`CausalLMTask`.

    Example:
        >>> task = PromptClassificationTask(lora=LoRASettings(r=16))  # doctest: +SKIP
        >>> data = RottenTomatoesPrompts(tokenizer=task.tokenizer)  # doctest: +SKIP
        >>> trainer.fit(task, datamodule=data)  # doctest: +SKIP
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        gguf_file: str | None = None,
        lora: LoRASettings | None = None,
        template: PromptTemplate | None = None,
        learning_rate: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
    ) -> None:
        super().__init__(
            model_name_or_path, gguf_file, lora, learning_rate, weight_decay, warmup_ratio
        )
        self.template = template or PromptTemplate()
        self.answer_ids = self.template.answer_ids(self.tokenizer)
        accuracy = MulticlassAccuracy(len(self.answer_ids), average="micro")
        self.val_accuracy, self.test_accuracy = accuracy, accuracy.clone()

    def setup(self, stage: str) -> None:
        """Check that the data's prompts end in this task's answers, before any step runs."""
        datamodule = getattr(self.trainer, "datamodule", None)
        given = getattr(datamodule, "template", None)
        if isinstance(given, PromptTemplate) and given.answers != self.template.answers:
            raise ValueError(
                f"the data's template answers {list(given.answers)} differ from the task's "
                f"{list(self.template.answers)}; pass the same template to both"
            )

    def _evaluate(self, batch: dict[str, torch.Tensor], metric: MeanMetric) -> torch.Tensor:
        logits = super()._evaluate(batch, metric)
        if "class_label" not in batch:
            return logits  # plain text: loss and perplexity only
        scores = answer_log_probs(
            self, batch["input_ids"], batch["prompt_length"], self.answer_ids, logits=logits
        )
        accuracy = self.val_accuracy if metric is self.val_loss else self.test_accuracy
        accuracy.update(scores.argmax(-1), batch["class_label"])
        return logits

    def _log_epoch(self, stage: str, metric: MeanMetric) -> None:
        super()._log_epoch(stage, metric)
        accuracy = self.val_accuracy if stage == "val" else self.test_accuracy
        if accuracy.update_called:
            self.log(f"{stage}/acc", accuracy.compute(), prog_bar=True)
            accuracy.reset()

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        scores = answer_log_probs(self, batch["input_ids"], batch["prompt_length"], self.answer_ids)
        return {"index": batch["index"], "prediction": scores.argmax(-1), "scores": scores}


__all__ = [
    "CausalLMTask",
    "LoRASettings",
    "PretrainedTask",
    "PromptClassificationTask",
    "SequenceClassificationTask",
    "answer_log_probs",
    "causal_lm_losses",
    "peak_memory_mb",
    "total_training_steps",
    "weighted_mean",
]
