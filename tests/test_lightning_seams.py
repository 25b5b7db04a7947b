"""The Lightning seams the library relies on: public ones only in the callbacks and strategies,
and each private name that remains (one place each) fails here, by name, if it changes."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_3d.callbacks import SensitivityFreezer
from lightning_3d.checkpoints import applies_callback_state_first
from lightning_3d.strategies import CompressedFSDPStrategy

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = (
    "fit_loop._data_source",
    "_accelerator_connector",
    "_update_dataloader",
    "_parse_num_batches",
    "load_checkpoint =",
    "_materialize_distributed_module",
    '"meta.pt"',
    "filterwarnings",
    "_distributed_is_initialized",
    "_PATH",
)


def glue_modules() -> list[Path]:
    return sorted([*(ROOT / "callbacks").glob("*.py"), *(ROOT / "strategies").glob("*.py")])


def test_lightnings_sharded_checkpoint_metadata_file_name_is_where_we_read_it() -> None:
    """``lightning_3d.checkpoints.callback_state`` reads a callback's state from a sharded
    checkpoint folder through this private Lightning name."""
    try:
        from lightning.fabric.utilities.load import _METADATA_FILENAME
    except ImportError as error:  # pragma: no cover - fails only when Lightning changes
        pytest.fail(f"lightning.fabric.utilities.load._METADATA_FILENAME is gone: {error}")
    assert isinstance(_METADATA_FILENAME, str) and _METADATA_FILENAME


@pytest.mark.parametrize("path", glue_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_callbacks_and_strategies_use_no_private_lightning_seam(path: Path) -> None:
    text = path.read_text()
    assert [name for name in PRIVATE if name in text] == []


@pytest.mark.parametrize(
    "path", sorted((ROOT / "callbacks").glob("[!_]*.py")), ids=lambda p: p.name
)
def test_no_callback_module_imports_another(path: Path) -> None:
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not [m for m in imported if m.startswith("lightning_3d.callbacks")]


def test_the_freezer_warns_where_a_strategy_would_load_the_optimizer_before_its_state() -> None:
    freezer = SensitivityFreezer()
    module = pl.LightningModule()
    plain = pl.Trainer(strategy=ModelParallelStrategy(), accelerator="cpu", devices=1)
    with pytest.warns(UserWarning, match="ModelParallelStrategy loads the optimizer state"):
        freezer.setup(plain, module, "fit")
    assert applies_callback_state_first(CompressedFSDPStrategy())
    assert not applies_callback_state_first(ModelParallelStrategy())


def test_model_parallel_strategy_still_keeps_its_mesh_sizes_where_we_set_them() -> None:
    """``CompressedFSDPStrategy.setup_environment`` sets ModelParallelStrategy's private
    ``_data_parallel_size`` and ``_tensor_parallel_size`` (its constructor takes them before the
    world size is known) and then relies on its ``setup_environment`` reading them."""
    strategy = ModelParallelStrategy()
    for name in ("_data_parallel_size", "_tensor_parallel_size"):
        assert hasattr(strategy, name), f"ModelParallelStrategy no longer has {name}"


def test_a_module_without_configure_model_gets_a_clear_error_from_the_fsdp_strategy() -> None:
    trainer = pl.Trainer(strategy=CompressedFSDPStrategy(), accelerator="cpu", devices=1)
    trainer.strategy.connect(pl.LightningModule())
    with pytest.raises(ValueError, match=r"needs a configure_model\(\) hook on LightningModule"):
        trainer.strategy.setup(trainer)


@pytest.mark.parametrize("kind", ["SequentialLR", "ChainedScheduler"])
def test_torch_composite_schedulers_still_keep_their_children_where_we_read_them(kind: str) -> None:
    """``lightning_3d.sensitivity.split_param_groups`` reaches the schedulers inside a
    ``SequentialLR``/``ChainedScheduler`` through their private ``_schedulers``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    inner = [
        torch.optim.lr_scheduler.LinearLR(optimizer),
        torch.optim.lr_scheduler.StepLR(optimizer, 1),
    ]
    if kind == "SequentialLR":
        outer = torch.optim.lr_scheduler.SequentialLR(optimizer, inner, milestones=[1])
    else:
        outer = torch.optim.lr_scheduler.ChainedScheduler(inner)
    assert list(getattr(outer, "_schedulers", [])) == inner, f"{kind}._schedulers is gone"


def test_torch_lr_schedulers_still_keep_the_last_rates_where_we_set_them() -> None:
    """``split_param_groups`` sets a scheduler's private ``_last_lr`` to the new groups' rates,
    so that ``get_last_lr()`` lists every group before the next ``step()``."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    assert hasattr(scheduler, "_last_lr"), "torch LR schedulers no longer have _last_lr"
    scheduler._last_lr = [0.5, 0.25]
    assert scheduler.get_last_lr() == [0.5, 0.25]
