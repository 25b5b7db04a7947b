"""The public API at the top of the package: every name resolves, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import lightning_3d


def test_every_public_name_is_the_object_its_module_defines():
    assert sorted(lightning_3d.__all__) == sorted(lightning_3d._EXPORTS)
    for name in lightning_3d.__all__:
        module = importlib.import_module(lightning_3d._EXPORTS[name])
        assert getattr(lightning_3d, name) is getattr(module, name), name
    assert set(lightning_3d.__all__) <= set(dir(lightning_3d))


def test_importing_the_package_loads_nothing_heavy():
    code = (
        "import sys, lightning_3d; "
        "print(sorted(m for m in ('lightning', 'transformers', 'torch') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
    code = "from lightning_3d import ProgressivePruner; import sys;"
    code += " print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # loaded when a name is used


def test_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="no attribute 'ThreeDPlans'"):
        lightning_3d.ThreeDPlans  # noqa: B018
    with pytest.raises(ImportError):
        exec("from lightning_3d import ProgressivePrunner", {})
