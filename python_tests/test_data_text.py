"""The standard-library text corpus: what it holds, a split fixed by file, windows that are
the stream's bytes and their successors."""

from __future__ import annotations

import sysconfig
import zlib
from pathlib import Path

import torch

from cram_ext.data.text import even_windows, random_windows, stdlib_corpus, stdlib_files


def test_corpus_holds_the_stdlib_without_tests():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    rel = [f.relative_to(root).as_posix() for f in files]
    assert "os.py" in rel and "json/decoder.py" in rel
    assert not any(part in ("test", "tests") or part.startswith("test_") for r in rel for part in r.split("/"))
    assert rel == sorted(rel)
    c = stdlib_corpus()
    assert c.meta["files"]["train"] + c.meta["files"]["valid"] == len(files)
    assert c.train.dtype == torch.uint8 and c.train.numel() == c.meta["bytes"]["train"] > 1_000_000
    assert c.meta["python"].count(".") == 2


def test_split_is_by_file_hash():
    root = Path(sysconfig.get_paths()["stdlib"])
    valid = [f for f in stdlib_files(root) if zlib.crc32(f.relative_to(root).as_posix().encode()) % 100 < 5]
    c = stdlib_corpus()
    assert c.meta["files"]["valid"] == len(valid)
    assert c.valid.numel() == sum(f.stat().st_size + 1 for f in valid)
    first = valid[0].read_bytes()
    assert bytes(c.valid[: len(first)].tolist()) == first


def test_windows_are_next_byte_pairs():
    c = stdlib_corpus()
    b = random_windows(c.train, 6, 33, seed=4)
    assert b.inputs.shape == b.labels.shape == (6, 33) and b.inputs.dtype == torch.int64
    assert torch.equal(b.inputs[:, 1:], b.labels[:, :-1])
    assert torch.equal(random_windows(c.train, 6, 33, seed=4).inputs, b.inputs)
    assert not torch.equal(random_windows(c.train, 6, 33, seed=5).inputs, b.inputs)
    e = even_windows(c.valid, 5, 16)
    assert torch.equal(e.inputs[0], c.valid[:16].long()) and torch.equal(e.labels[0], c.valid[1:17].long())
