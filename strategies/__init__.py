"""Lightning strategies for the communication axis (installed as ``lightning_3d.strategies``).

Strategies wrap PyTorch distributed training and compress what crosses the network; the kernels
they use live in ``csrc/`` and are compiled on first use. The strategies land here as they are
built.
"""

__all__: list[str] = []
