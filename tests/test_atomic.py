"""core.data.atomic: a write replaces the file whole or leaves the old one, and never leaves a temporary behind."""
import os
import stat

import numpy as np
import pytest

from core.data.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_success_replaces_the_file_and_the_temporary_sits_beside_it(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target and not tmp.exists()  # the writer creates it
        assert tmp.name.startswith(".")  # hidden from folder listings while it is written
        tmp.write_text("new")
        assert target.read_text() == "old"  # a reader sees the old file until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_a_failed_first_write_creates_nothing(tmp_path):
    target = tmp_path / "new" / "out.bin"
    with pytest.raises(ValueError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert not target.exists() and list(target.parent.iterdir()) == []  # the folder is made, nothing left in it


def test_suffix_ends_the_temporary_name_for_writers_that_choose_a_format_by_it(tmp_path):
    target = tmp_path / "cells.npz"
    with atomic_path(target, suffix=".npz") as tmp:
        assert tmp.name.endswith(".npz")
        np.savez(tmp, a=np.arange(3))  # numpy would add .npz to a name without it, and the replace would miss
    with np.load(target) as z:
        assert z["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["cells.npz"]
    with atomic_path(tmp_path / "model.weights.h5", suffix=".weights.h5") as tmp:
        assert tmp.name.endswith(".weights.h5") and tmp.parent == tmp_path
        tmp.write_bytes(b"h5")
    assert (tmp_path / "model.weights.h5").read_bytes() == b"h5"


def test_two_temporaries_for_one_file_differ(tmp_path):
    with atomic_path(tmp_path / "a") as one, atomic_path(tmp_path / "a") as two:
        assert one != two
        one.write_text("1")
        two.write_text("2")
    assert (tmp_path / "a").read_text() == "1"  # the outer block ends last and wins
    assert [p.name for p in tmp_path.iterdir()] == ["a"]


def test_a_writer_that_writes_nothing_fails_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_path(target):
            pass
    assert target.read_text() == "old"


def test_write_bytes_and_text(tmp_path):
    target = tmp_path / "sub" / "x.txt"
    assert atomic_write_bytes(target, b"\x00\x01") == target and target.read_bytes() == b"\x00\x01"
    assert atomic_write_text(target, "héllo") == target and target.read_text(encoding="utf-8") == "héllo"
    assert [p.name for p in target.parent.iterdir()] == ["x.txt"]


def test_the_file_gets_the_permissions_a_plain_write_gives(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    assert stat.S_IMODE(os.stat(tmp_path / "atomic").st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
