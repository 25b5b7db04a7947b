"""Lightning callbacks, one per axis of cheaper fine-tuning (``lightning_3d.callbacks``).

Each callback is thin glue: it decides *when* (which hook, which step) and calls the algorithms in
:mod:`lightning_3d` for *what*. The axes land here as they are built.

* :class:`CurriculumSampler` (data): scores samples while training, paces them from easy to hard
  and trains on a data budget.
* :class:`SensitivityFreezer` (parameters): measures gradient sensitivity, freezes the least
  sensitive tensors and releases their optimizer state.
* :class:`ProgressivePruner` (model): prunes gradually to a target sparsity (unstructured, N:M,
  rows, attention heads, FFN neurons) and keeps pruned weights at zero.
* :class:`QATHook` (model, bits): trains through torchao fake quantization from a chosen step
  and converts to quantized weights at the end.
* :class:`Distiller` (model, teacher): distils the student from a teacher (the run's own
  snapshot, a checkpoint or a fine-tuned model) with the teacher's outputs cached per sample.
* :class:`VocabularyTrimmer` (model, vocabulary): keeps only the input-embedding rows of the
  tokens the training data uses.
* :class:`DepthPruner` (model, depth): removes the decoder blocks that change their input least
  before the first step.
* :class:`PlanCoordinator` (all axes): runs the axes of a :class:`lightning_3d.plan.ThreeDPlan`
  as one: a shared signal pass, one timeline, cross-axis checks, adaptive budgets.
"""

from lightning_3d.callbacks.curriculum import CurriculumSampler
from lightning_3d.callbacks.depth import DepthPruner
from lightning_3d.callbacks.distillation import Distiller
from lightning_3d.callbacks.freezing import SensitivityFreezer
from lightning_3d.callbacks.plan import PlanCoordinator
from lightning_3d.callbacks.pruning import ProgressivePruner
from lightning_3d.callbacks.quantization import QATHook
from lightning_3d.callbacks.vocabulary import VocabularyTrimmer
from lightning_3d.sensitivity import find_gradient_statistics  # re-exported: it moved

__all__ = [
    "CurriculumSampler",
    "DepthPruner",
    "Distiller",
    "PlanCoordinator",
    "ProgressivePruner",
    "QATHook",
    "SensitivityFreezer",
    "VocabularyTrimmer",
    "find_gradient_statistics",
]
