"""lightning-3d: cheaper fine-tuning along data, parameters and model, as Lightning callbacks.

The public API is importable from the top, and loaded on first use (``import lightning_3d``
alone imports neither Lightning nor ``transformers``)::

    from lightning_3d import ThreeDPlan

    plan = ThreeDPlan(data_budget=0.6, trainable=0.5, sparsity=0.5, weight_bits=8)
    trainer = Trainer(callbacks=plan.callbacks(), **plan.trainer_arguments())

The axes, as Lightning callbacks: :class:`CurriculumSampler` (data: scores, paces and budgets the
training samples), :class:`SensitivityFreezer` (parameters), :class:`ProgressivePruner` and
:class:`QATHook` (model: sparsity and quantization-aware training), :class:`Distiller` (model:
a teacher's outputs), :class:`VocabularyTrimmer` (model: embedding rows of unused tokens),
:class:`DepthPruner` (model: whole decoder blocks), and :class:`PlanCoordinator` to run a
:class:`ThreeDPlan` of them together.
The communication axis: :class:`CompressedFSDPStrategy` and :class:`CompressedDDPStrategy`
(importing either registers ``"fsdp_compressed"`` and ``"ddp_compressed"``), built on
:class:`GradientCompressor`. Tasks and data: :class:`SequenceClassificationTask`,
:class:`CausalLMTask`, :class:`RottenTomatoes`, :class:`PlainTextLM`; deployment:
:func:`lightning_3d.export.export`.

Sub-packages: :mod:`lightning_3d.callbacks`, :mod:`lightning_3d.strategies`,
:mod:`lightning_3d.tasks`, :mod:`lightning_3d.data`, :mod:`lightning_3d.cli` (the
``lightning-3d`` command); the algorithms, as pure functions, in the other modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported when the name is first used).
_EXPORTS: dict[str, str] = {
    "CurriculumSampler": "lightning_3d.callbacks",
    "DepthPruner": "lightning_3d.callbacks",
    "Distiller": "lightning_3d.callbacks",
    "PlanCoordinator": "lightning_3d.callbacks",
    "ProgressivePruner": "lightning_3d.callbacks",
    "QATHook": "lightning_3d.callbacks",
    "SensitivityFreezer": "lightning_3d.callbacks",
    "VocabularyTrimmer": "lightning_3d.callbacks",
    "ThreeDPlan": "lightning_3d.plan",
    "PlanBudget": "lightning_3d.plan",
    "CompressedDDPStrategy": "lightning_3d.strategies",
    "CompressedFSDPStrategy": "lightning_3d.strategies",
    "CompressedAllReduceState": "lightning_3d.strategies",
    "compressed_allreduce_hook": "lightning_3d.strategies",
    "GradientCompressor": "lightning_3d.compression",
    "SequenceClassificationTask": "lightning_3d.tasks",
    "CausalLMTask": "lightning_3d.tasks",
    "PromptClassificationTask": "lightning_3d.tasks",
    "LoRASettings": "lightning_3d.tasks",
    "RottenTomatoes": "lightning_3d.data",
    "RottenTomatoesPrompts": "lightning_3d.data",
    "PromptTemplate": "lightning_3d.data",
    "PlainTextLM": "lightning_3d.data",
}

__all__ = [
    "CausalLMTask",
    "CompressedAllReduceState",
    "CompressedDDPStrategy",
    "CompressedFSDPStrategy",
    "CurriculumSampler",
    "DepthPruner",
    "Distiller",
    "GradientCompressor",
    "LoRASettings",
    "PlainTextLM",
    "PlanBudget",
    "PlanCoordinator",
    "ProgressivePruner",
    "PromptClassificationTask",
    "PromptTemplate",
    "QATHook",
    "RottenTomatoes",
    "RottenTomatoesPrompts",
    "SensitivityFreezer",
    "SequenceClassificationTask",
    "ThreeDPlan",
    "VocabularyTrimmer",
    "compressed_allreduce_hook",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_3d' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads these
    from lightning_3d.callbacks import (
        CurriculumSampler,
        DepthPruner,
        Distiller,
        PlanCoordinator,
        ProgressivePruner,
        QATHook,
        SensitivityFreezer,
        VocabularyTrimmer,
    )
    from lightning_3d.compression import GradientCompressor
    from lightning_3d.data import PlainTextLM, RottenTomatoes
    from lightning_3d.plan import PlanBudget, ThreeDPlan
    from lightning_3d.strategies import (
        CompressedAllReduceState,
        CompressedDDPStrategy,
        CompressedFSDPStrategy,
        compressed_allreduce_hook,
    )
    from lightning_3d.tasks import CausalLMTask, LoRASettings, SequenceClassificationTask
