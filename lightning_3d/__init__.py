"""lightning-3d: cheaper fine-tuning along data, parameters and model, as Lightning callbacks.

Sub-packages:

* :mod:`lightning_3d.tasks`: LightningModules for Hugging Face models (classification, causal LM).
* :mod:`lightning_3d.data`: data modules (Rotten Tomatoes, plain-text LM) whose items carry indices.
* :mod:`lightning_3d.callbacks`: the data, parameter and model axes, as Lightning callbacks.
* :mod:`lightning_3d.strategies`: the communication axis, as Lightning strategies.
* :mod:`lightning_3d.cli`: the ``lightning-3d`` command (LightningCLI).
"""

__version__ = "0.1.0"
