"""Byte-level language modelling on real text that every machine already has: the source
files of the Python standard library that runs this code.

The corpus is every `*.py` file under `sysconfig.get_paths()["stdlib"]`, without test
suites (any folder named test, tests or idle_test, any file or folder test_*) and without
site-packages. Files go to the validation split when crc32 of their path relative to the
library root, mod 100, is below `valid_percent`: a fixed split by file, the same on every
machine with the same Python. Each split is the files' bytes in path order, each file
followed by a newline. `TextCorpus.meta` records the Python version and the sizes, since
the text differs between Python versions.
"""

from __future__ import annotations

import functools
import os
import platform
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


@dataclass(frozen=True)
class TextCorpus:
    """train, valid: uint8 byte streams; meta: Python version, file counts and bytes."""

    train: Tensor
    valid: Tensor
    meta: dict


@dataclass
class TextBatch:
    """inputs (N, L) int64 bytes; labels (N, L) int64, the byte that follows each input."""

    inputs: Tensor
    labels: Tensor


def stdlib_files(root: Path) -> list[Path]:
    """The corpus' files under root, sorted by relative path."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in EXCLUDED_DIRS and not d.startswith("test_"))
        files += [Path(folder) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=4)
def stdlib_corpus(valid_percent: int = 5) -> TextCorpus:
    """The standard-library corpus (read once per process)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: dict[str, list[bytes]] = {"train": [], "valid": []}
    for f in stdlib_files(root):
        rel = f.relative_to(root).as_posix()
        split = "valid" if zlib.crc32(rel.encode()) % 100 < valid_percent else "train"
        parts[split].append(f.read_bytes() + b"\n")
    streams = {k: torch.frombuffer(bytearray(b"".join(v)), dtype=torch.uint8) for k, v in parts.items()}
    meta = {"source": "python stdlib", "python": platform.python_version(), "root": str(root),
            "valid_percent": valid_percent, "files": {k: len(v) for k, v in parts.items()},
            "bytes": {k: int(t.numel()) for k, t in streams.items()}}
    if min(meta["bytes"].values()) == 0:
        raise RuntimeError(f"stdlib_corpus: no source files found under {root}")
    return TextCorpus(streams["train"], streams["valid"], meta)


def random_windows(stream: Tensor, num: int, seq_len: int, seed: int) -> TextBatch:
    """num windows of seq_len + 1 bytes at seeded random offsets of stream."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len - 1, (num,), generator=g)
    return _windows(stream, starts, seq_len)


def even_windows(stream: Tensor, num: int, seq_len: int) -> TextBatch:
    """num windows spread evenly over stream: a fixed evaluation set."""
    starts = torch.linspace(0, stream.numel() - seq_len - 1, num).long()
    return _windows(stream, starts, seq_len)


def _windows(stream: Tensor, starts: Tensor, seq_len: int) -> TextBatch:
    idx = starts[:, None] + torch.arange(seq_len + 1)
    w = stream[idx].long()
    return TextBatch(w[:, :-1].contiguous(), w[:, 1:].contiguous())
