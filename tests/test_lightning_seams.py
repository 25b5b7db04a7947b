"""The Lightning seams the library relies on: public ones only in the callbacks and strategies,
and the one private name that remains fails here, by name, if Lightning changes it."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_3d.callbacks import SensitivityFreezer
from lightning_3d.checkpoints import AppliesCallbackStateFirst
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
    assert isinstance(CompressedFSDPStrategy(), AppliesCallbackStateFirst)
    assert not isinstance(ModelParallelStrategy(), AppliesCallbackStateFirst)
