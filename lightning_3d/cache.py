"""Where lightning-3d keeps what it computes once and reuses: tokenized splits, converted models.

The root is ``$LIGHTNING_3D_CACHE`` when set, else ``$XDG_CACHE_HOME/lightning_3d``, else
``~/.cache/lightning_3d``. Entries are named by a fingerprint of everything they depend on, so a
changed input never reads a stale entry, and they are written to a temporary name first and renamed
into place, so an interrupted write never leaves a half entry behind.

Example:
    >>> key = fingerprint("bert", 128, ["a good film"])
    >>> len(key)
    16
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """Return (and create) the cache root directory."""
    explicit = os.environ.get("LIGHTNING_3D_CACHE")
    if explicit:
        root = Path(explicit).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "lightning_3d"
    root.mkdir(parents=True, exist_ok=True)
    return root


def fingerprint(*parts: object) -> str:
    """A 16-hex-digit SHA-256 fingerprint of ``parts`` (strings, numbers, nested lists of them)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, (list, tuple)):
            for item in part:
                digest.update(str(item).encode("utf-8"))
                digest.update(b"\x1f")
        else:
            digest.update(str(part).encode("utf-8"))
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Fingerprint a file by its content (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]
