"""Atomic outputs: a failed write leaves the previous file (or directory) and no debris."""

import os

import pytest

from dcr_fast import atomic


def test_write_replaces_whole_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic.write_json(path, {"a": 1})
    atomic.write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert os.listdir(path.parent) == ["out.json"]


def test_failed_write_keeps_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    atomic.write_text(path, "old")

    def crash(tmp):
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic.write(path, crash)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_directory_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "model"
    with atomic.directory(target) as tmp:
        (tmp_path / "model.tmp" / "w.bin").write_text("v1")
        assert tmp == str(tmp_path / "model.tmp") and not target.exists()
    with pytest.raises(RuntimeError):
        with atomic.directory(target) as tmp:
            (tmp_path / "model.tmp" / "w.bin").write_text("v2")
            raise RuntimeError("crash")
    assert (target / "w.bin").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == ["model"]
