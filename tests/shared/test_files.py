"""File-system helpers: staged folders appear whole or not at all, chunked hashes, JSON errors naming the file."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest

from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.plumbing.files import link_or_copy, read_json, sha256_file, staged_dir


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_staged_dir_appears_whole_with_its_mode(tmp_path):
    target = tmp_path / "out" / "bundle"
    with staged_dir(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "a").write_bytes(b"1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_bytes(b"2")
    assert (target / "sub" / "b").read_bytes() == b"2"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert _leftovers(target.parent) == []


def test_a_failed_build_leaves_the_old_folder_and_no_temporary_one(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old").write_text("kept", encoding="utf-8")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(target, replace=True) as tmp:
            (tmp / "new").write_text("half", encoding="utf-8")
            raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["old"]
    assert _leftovers(tmp_path) == []


def test_replace_swaps_a_folder_and_without_it_a_full_target_is_kept(tmp_path):
    target = tmp_path / "dataset"
    target.mkdir()
    (target / "old").write_text("x", encoding="utf-8")
    with pytest.raises(OSError):
        with staged_dir(target) as tmp:
            (tmp / "new").write_text("y", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["old"]
    with staged_dir(target, replace=True, mode=None) as tmp:
        (tmp / "new").write_text("y", encoding="utf-8")
    assert [p.name for p in target.iterdir()] == ["new"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o700  # mkdtemp's mode, kept with mode=None
    assert _leftovers(tmp_path) == []


def test_sha256_file_reads_in_chunks_and_matches_hashlib(tmp_path):
    data = os.urandom((1 << 20) * 2 + 12345)  # more than two chunks
    p = tmp_path / "blob"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_read_json_names_the_file(tmp_path):
    p = tmp_path / "plans.json"
    with pytest.raises(IchfedError, match=f"{p}: file not found"):
        read_json(p)
    p.write_text("{not json", encoding="utf-8")
    with pytest.raises(IchfedError, match=f"{p}: not valid JSON"):
        read_json(p)
    p.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(IchfedError, match=f"{p}: expected a JSON object"):
        read_json(p)
    p.write_text('{"a": 1}', encoding="utf-8")
    assert read_json(p) == {"a": 1}
    # verified bytes are parsed instead of the file, and the error kind is the caller's
    assert read_json(p, raw=b'{"b": 2}') == {"b": 2}
    with pytest.raises(BundleVerificationError, match=f"{p}: not valid JSON"):
        read_json(p, raw=b"\xff", error=BundleVerificationError)


def test_link_or_copy_hard_links_on_one_file_system(tmp_path):
    src = tmp_path / "a"
    src.write_bytes(b"weights")
    link_or_copy(src, tmp_path / "b")
    assert (tmp_path / "b").stat().st_ino == src.stat().st_ino
