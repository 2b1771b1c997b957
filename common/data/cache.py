"""A disk cache of decoded, resized streams, for processes that start fresh for every message, and of the
verdicts of image-file checks (common/data/check.py).

A deployed SuperNode runs each message in a new ClientApp process, so the per-process ``load_stream`` cache
is empty every time and the offline stream would be decoded and resized again (seconds per message). Only
streams built from installed packages are cached: their inputs are fixed by the package versions and by this
project's data code, whose hashes are part of the key, so a cached stream is never stale. Streams read from a
user's ``data_dir`` are not cached.

The cache holds pickles this process wrote itself; it is trusted local state, like a model checkpoint.

A check verdict is an empty file named by the hash of the checked files' paths, sizes and modification times:
present means those very files all decoded, so a changed, replaced or added file is checked again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import torch

from common.data.offline import FASHION_SYSTEM_DIR
from common.data.stream import Stream

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
_PACKAGES = ("scikit-learn", "mlxtend", "animal-mnist", "torch")


def _inputs_fingerprint() -> dict:
    versions = {}
    for pkg in _PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    fashion = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in FASHION_SYSTEM_DIR.glob("*")) \
        if FASHION_SYSTEM_DIR.is_dir() else []
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(Path(__file__).parent.glob("*.py")))).hexdigest()
    return {"format": CACHE_FORMAT, "versions": versions, "fashion": fashion, "code": code}


def cache_path(cache_dir: Path, name: str, kwargs: dict) -> Path:
    key = json.dumps({"name": name, "args": kwargs, "inputs": _inputs_fingerprint()}, sort_keys=True, default=str)
    return cache_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"


def verdict_path(cache_dir: Path, files: list[Path]) -> Path:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return cache_dir / "checked" / f"{digest.hexdigest()[:32]}.ok"


def remember_checked(cache_dir: Path, files: list[Path]) -> None:
    path = verdict_path(cache_dir, files)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def load_or_build(cache_dir: Path, name: str, kwargs: dict, build) -> Stream:
    """``build()`` once per key; later calls (in any process) read the pickle. A broken file is rebuilt."""
    path = cache_path(cache_dir, name, kwargs)
    if path.exists():
        try:
            stream = torch.load(path, map_location="cpu", weights_only=False)
            if isinstance(stream, Stream):
                return stream
            log.warning("stream cache %s holds a %s, rebuilding it", path, type(stream).__name__)
        except Exception as err:  # truncated or garbled: rebuild, never use it
            log.warning("stream cache %s is unreadable (%s), rebuilding it", path, err)
    stream = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent SuperNodes each write their own, then rename
    torch.save(stream, tmp)
    os.replace(tmp, path)
    return stream
