"""``QATHook``: the model axis at fewer bits -- train through torchao fake quantization, convert.

Life cycle (``global_step`` counts optimizer steps): ``setup`` (before DDP or FSDP2 wrap the
model) swaps the selected linear and embedding modules for torchao's fake-quantized ones, with
fake quantization off; they keep their ``Parameter`` objects and state-dict keys, so optimizers,
pruning masks and checkpoints are unaffected. At ``start_step`` (or ``start_epoch``) fake
quantization goes on; every ``error_every`` steps the per-layer quantization errors are logged;
``on_fit_end`` (``convert_at_end``) or :meth:`QATHook.convert` turns the modules into torchao
quantized weights, and :meth:`QATHook.export` writes them with a report. A load_state_dict
pre-hook converts the model before a converted checkpoint's weights load.

Example:
    >>> from lightning import Trainer
    >>> qat = QATHook("int8_dynamic_act_int4_weight", start_step=100)
    >>> trainer = Trainer(callbacks=[qat], max_steps=1000)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_3d.loggers import log_axis_metrics
from lightning_3d.models import refuse_four_bit
from lightning_3d.pruning import DEFAULT_EXCLUDE
from lightning_3d.quantization import (
    STAGES,
    QuantizationRecipe,
    check_device,
    check_qat_arguments,
    convert,
    convert_with_report,
    dequantize,
    export_quantized,
    fake_quantized_modules,
    from_plain_state,
    prepare,
    quantized_modules,
    resolve_recipe,
    select_modules,
    set_fake_quantization,
    to_plain_state,
    weight_quantization_errors,
)
from lightning_3d.sensitivity import compile_pattern

if TYPE_CHECKING:
    from torchao.core.config import AOBaseConfig

log = logging.getLogger(__name__)


class QATHook(Callback):
    r"""Quantization-aware training with torchao from a chosen step, converted at the end.

    A Lightning ``Callback`` (the name is kept: configurations and checkpoints, whose callback
    states Lightning keys by class name, refer to it).

    Args:
        quantization: a preset name (:data:`~lightning_3d.quantization.PRESETS`:
            ``"int8_dynamic_act_int4_weight"``, ``"int4_weight_only"``, ``"int8_weight_only"``,
            ``"float8_dynamic_act_float8_weight"``) or any torchao base config that
            ``QATConfig`` accepts (then linear layers only).
        group_size: input columns per weight scale for the int4 presets (a torchao config
            object carries its own).
        include, exclude: regexes over the names of the modules' weights
            (``"<module>.weight"``); by default every linear and embedding weight except the
            task head, the pooler and LoRA adapters (whose base layers are quantized).
        embeddings: quantize embedding tables too (weights only) when the recipe has a config
            for them; they are half of a small encoder's bytes.
        start_step, start_epoch: when fake quantization goes on (at most one of them; default
            the first step). Training in float first and then with fake quantization often
            recovers more accuracy than fake quantization from the start.
        convert_at_end: convert to quantized weights when ``fit`` ends; ``False`` leaves that to
            :meth:`convert` or :meth:`export`.
        error_every: steps between logs of the per-layer quantization errors (0: never).

    Logs ``qat/stage`` (0 float, 1 fake quantization, 2 converted), ``qat/weight_error`` (mean
    relative error ``||Q(W) - W|| / ||W||``) and ``qat/weight_error/<module>``.

    Example:
        >>> QATHook("int4_weight_only", group_size=64).recipe.name
        'int4_weight_only'
    """

    #: The plan's name of this axis; ``PlanCoordinator`` finds the callback by it.
    axis = "quantization"

    def __init__(
        self,
        quantization: str | AOBaseConfig = "int8_dynamic_act_int4_weight",
        group_size: int = 32,
        include: str | None = None,
        exclude: str | None = DEFAULT_EXCLUDE,
        embeddings: bool = True,
        start_step: int | None = None,
        start_epoch: int | None = None,
        convert_at_end: bool = True,
        error_every: int = 50,
    ) -> None:
        check_qat_arguments(start_step, start_epoch, error_every)
        self.recipe: QuantizationRecipe = resolve_recipe(quantization, group_size)
        compile_pattern("include", include)  # bad regexes fail here, before training
        compile_pattern("exclude", exclude)
        self.include = include
        self.exclude = exclude
        self.embeddings = embeddings
        self.start_step = start_step or 0
        self.start_epoch = start_epoch
        self.convert_at_end = convert_at_end
        self.error_every = error_every
        self.stage = "float"
        self.modules: list[str] = []  # the fake-quantized (later converted) modules
        self.conversion: dict[str, Any] = {}  # bytes and modules of the last conversion
        self._load_hooks: tuple[Any, Any] | None = None  # on the model: see _before_state_load
        self._hooked: nn.Module | None = None
        self._last_error_step = -1
        self._reconvert = False
        self._fitting = False

    # ----------------------------------------------------------------- set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_device(self.recipe, trainer.strategy.root_device)
        if stage == "fit" and self.stage == "converted":
            raise ValueError("this model was converted to quantized weights: it cannot train")
        if self._hooked is not pl_module:  # one hook pair, on the module being run
            self.teardown(trainer, pl_module, stage)
            self._hooked = pl_module
            self._load_hooks = (
                pl_module.register_load_state_dict_pre_hook(self._before_state_load),
                pl_module.register_load_state_dict_post_hook(self._after_state_load),
            )
        self._fitting = stage == "fit"
        if self._fitting:
            self._prepare(pl_module)
            set_fake_quantization(pl_module, False)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._fitting = False
        if self._load_hooks is not None:
            for handle in self._load_hooks:
                handle.remove()
        self._load_hooks = self._hooked = None

    def _prepare(self, pl_module: nn.Module) -> None:
        if fake_quantized_modules(pl_module):
            return
        names = select_modules(pl_module, self.include, self.exclude, self.embeddings)
        refuse_four_bit(pl_module, names, "QATHook", "fake quantization needs float weights")
        if not names:
            raise ValueError(
                f"QATHook selected no linear or embedding module: check include={self.include!r}"
                f" and exclude={self.exclude!r} (models built in configure_model are not "
                "supported: build them in __init__)"
            )
        self.modules = prepare(pl_module, self.recipe, names)
        log.info("QAT (%s) prepared %d modules", self.recipe.name, len(self.modules))

    def _before_state_load(self, module: nn.Module, state: dict[str, Any], *args: Any) -> None:
        """Make the model fit the state dict about to load (its children load after this).

        A converted model's Lightning checkpoint holds the quantized weights as plain tensors
        (:meth:`on_save_checkpoint`): convert the model and rebuild the quantized tensors. A
        float or fake-quantized checkpoint (e.g. ``ckpt_path="best"`` after ``fit`` converted
        the model): make the converted modules float again; they are converted anew once the
        weights are in (:meth:`_after_state_load`).
        """
        if any(key.endswith("::layout") for key in state):
            if self._fitting:
                raise ValueError(
                    "the checkpoint holds a converted (quantized) model: it can be validated, "
                    "tested or used for prediction, not trained further"
                )
            if self.stage != "converted" or fake_quantized_modules(module):
                saved = {k.removesuffix(".weight::layout") for k in state if k.endswith("::layout")}
                prepare(module, self.recipe, sorted(saved - set(quantized_modules(module))))
                self._convert(module)
            from_plain_state(state)
            return
        converted = quantized_modules(module)
        if converted and not self._fitting:
            dequantize(module, converted)
            prepare(module, self.recipe, converted)
            self._reconvert = True

    def _after_state_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        if self._reconvert:
            self._reconvert = False
            self._convert(module)

    # -------------------------------------------------------------- training
    def _started(self, trainer: Trainer) -> bool:
        if self.start_epoch is not None:
            return trainer.current_epoch >= self.start_epoch
        return trainer.global_step >= self.start_step

    def _apply_stage(self, pl_module: LightningModule) -> None:
        if self.stage == "fake_quant":  # e.g. evaluating a checkpoint of a QAT run
            self._prepare(pl_module)
        if self.stage != "converted":
            set_fake_quantization(pl_module, self.stage == "fake_quant")

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._apply_stage(pl_module)  # a resumed run evaluates as it trained

    on_test_start = on_predict_start = on_train_start = on_validation_start

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.stage == "float" and self._started(trainer):
            self.stage = "fake_quant"
            set_fake_quantization(pl_module, True)
            log.info("QAT: fake quantization on at step %d", trainer.global_step)
            self._log_errors(trainer, pl_module)
        pl_module.log("qat/stage", float(STAGES.index(self.stage)))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        due = self.error_every and step % self.error_every == 0 and step != self._last_error_step
        if self.stage == "fake_quant" and due:  # once per step, whatever the accumulation
            self._log_errors(trainer, pl_module)

    def _log_errors(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        self._last_error_step = trainer.global_step
        errors = weight_quantization_errors(pl_module)
        if errors:
            metrics = {f"qat/weight_error/{name}": value for name, value in errors.items()}
            metrics["qat/weight_error"] = sum(errors.values()) / len(errors)
            log_axis_metrics(trainer, metrics)
        return errors

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.convert_at_end or self.stage == "converted":
            return
        if any(hasattr(p, "device_mesh") for p in pl_module.parameters()):
            log.warning(
                "QAT: torchao cannot convert FSDP2-sharded weights; load the full state dict "
                "into an unsharded model with this hook's recipe and call convert() there"
            )
            return
        if self.stage == "float":
            log.warning("QAT: fit ended before fake quantization started; converting anyway")
        self.convert(pl_module)

    # -------------------------------------------------------------- convert / export
    def convert(self, model: nn.Module) -> nn.Module:
        """Convert ``model``'s fake-quantized modules to quantized weights, in place; return it.

        Call on demand (after ``fit`` with ``convert_at_end=False``). The per-layer errors and
        the bytes before and after are kept in :attr:`conversion`.
        """
        if self.stage == "converted":
            return model
        self.modules, self.conversion = convert_with_report(model, self.recipe)
        self.stage = "converted"
        return model

    def _convert(self, model: nn.Module) -> None:
        self.modules = convert(model, self.recipe)
        self.stage = "converted"

    def export(
        self,
        model: nn.Module,
        path: str | os.PathLike[str],
        evaluate: Callable[[nn.Module], float] | None = None,
    ) -> dict[str, Any]:
        """Convert if needed and write ``model`` (e.g. ``task.model``) with a report to ``path``.

        See :func:`~lightning_3d.quantization.export_quantized`; ``evaluate`` measures a metric
        before and after conversion.
        """
        converted_before = self.stage == "converted"
        report = export_quantized(
            model, path, self.recipe, evaluate, self.conversion.get("float_bytes")
        )
        if converted_before and self.conversion:  # converted by this hook: it knows the rest
            report["quantized_modules"] = self.conversion["modules"]
        self.stage = "converted"
        return report

    # ----------------------------------------------------------------- state
    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.stage == "converted" and "state_dict" in checkpoint:
            checkpoint["state_dict"] = to_plain_state(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "recipe": self.recipe.name,
            "configs": self._configs(),
            "modules": list(self.modules),
        }

    def _configs(self) -> list[str]:
        """The recipe's torchao configs as text (group sizes, dtypes): what a resume must match."""
        return [repr(self.recipe.linear), repr(self.recipe.embedding), repr(self.embeddings)]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["recipe"] != self.recipe.name:
            raise ValueError(
                f"the checkpoint was trained with quantization {state_dict['recipe']!r}, this "
                f"QATHook uses {self.recipe.name!r}"
            )
        if state_dict.get("configs", self._configs()) != self._configs():
            raise ValueError(
                f"the checkpoint was trained with {state_dict['recipe']!r} configured as "
                f"{state_dict['configs']}, this QATHook has {self._configs()} (group_size or "
                "embeddings differ)"
            )
        if self.stage == "converted":
            return  # the model was converted, before or while the checkpoint loaded: it stays
        self.stage = state_dict["stage"]
        self.modules = list(state_dict["modules"])
