"""Lightning callbacks, one per axis of cheaper fine-tuning (``lightning_3d.callbacks``).

Each callback is thin glue: it decides *when* (which hook, which step) and calls the algorithms in
:mod:`lightning_3d` for *what*. The axes land here as they are built.

* :class:`CurriculumSampler` (data): scores samples while training, paces them from easy to hard
  and trains on a data budget.
* :class:`SensitivityFreezer` (parameters): measures gradient sensitivity, freezes the least
  sensitive tensors and releases their optimizer state.
"""

from lightning_3d.callbacks.curriculum import CurriculumSampler
from lightning_3d.callbacks.freezing import SensitivityFreezer, find_gradient_statistics

__all__ = ["CurriculumSampler", "SensitivityFreezer", "find_gradient_statistics"]
