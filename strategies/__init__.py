"""Lightning strategies for the communication axis (installed as ``lightning_3d.strategies``).

* :class:`CompressedFSDPStrategy` (registered as ``"fsdp_compressed"``): FSDP2 whose gradient
  reduce-scatter is compressed (top-k + 8-bit blocks + error feedback).
* :class:`CompressedDDPStrategy` (registered as ``"ddp_compressed"``): DDP with the compressed
  all-reduce hook, on every device.
* :func:`compressed_allreduce_hook` with :class:`CompressedAllReduceState`: the same compression
  for Lightning's ``DDPStrategy(ddp_comm_hook=..., ddp_comm_state=...)`` (which registers hooks
  on CUDA only).

Importing this package registers the strategy names, so ``Trainer(strategy="fsdp_compressed")``
and ``strategy: fsdp_compressed`` in a LightningCLI config work after
``import lightning_3d.strategies`` (the ``lightning-3d`` command imports it).
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_3d.collectives import (
    CompressedAllReduceState,
    CompressedCommState,
    CompressedReduceScatter,
    compressed_allreduce_hook,
)
from lightning_3d.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_3d.strategies.compressed_fsdp import CompressedFSDPStrategy

for _strategy, _description in (
    (CompressedFSDPStrategy, "FSDP2 with a compressed (top-k + 8-bit + feedback) reduce-scatter"),
    (CompressedDDPStrategy, "DDP with a compressed (top-k + 8-bit + feedback) all-reduce"),
):
    if _strategy.strategy_name not in StrategyRegistry:
        StrategyRegistry.register(_strategy.strategy_name, _strategy, description=_description)

__all__ = [
    "CompressedAllReduceState",
    "CompressedCommState",
    "CompressedDDPStrategy",
    "CompressedFSDPStrategy",
    "CompressedReduceScatter",
    "compressed_allreduce_hook",
]
