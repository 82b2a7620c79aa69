"""Streaming multipart uploads into a case folder: layout, names, limits."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from client.reader.upload import UploadTooLarge, receive
from shared.plumbing.errors import IchfedError


def _multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """Encode files exactly as a browser's FormData would (via httpx's encoder)."""
    req = httpx.Request("POST", "http://x/", files=[("file", (name, data)) for name, data in files])
    return req.read(), req.headers["content-type"]


def _receive(body: bytes, ctype: str, folder, max_bytes=10**9, chunk=1000):
    async def chunks():
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    return asyncio.run(receive(chunks(), ctype, folder, max_bytes))


def test_single_nifti_keeps_its_suffix_and_content(tmp_path):
    data = bytes(range(256)) * 50
    body, ctype = _multipart([("head ct.nii.gz", data)])
    up = _receive(body, ctype, tmp_path)
    assert up.input_path == tmp_path / "input.nii.gz"
    assert up.input_path.read_bytes() == data
    assert up.display_name == "head_ct.nii.gz" and up.n_files == 1


def test_single_zip_is_passed_as_the_zip(tmp_path):
    body, ctype = _multipart([("series.ZIP", b"PK\x03\x04rest")])
    up = _receive(body, ctype, tmp_path)
    assert up.input_path == tmp_path / "input.zip"


def test_folder_files_land_in_one_series_folder_without_escaping_it(tmp_path):
    files = [("study/IM0001", b"a" * 3000), ("study/IM0002", b"b" * 10), ("../../etc/passwd", b"c")]
    body, ctype = _multipart(files)
    up = _receive(body, ctype, tmp_path / "case")
    assert up.input_path == tmp_path / "case" / "series"
    saved = sorted(p.name for p in up.input_path.iterdir())
    assert saved == ["00000_IM0001", "00001_IM0002", "00002_passwd"]
    assert (up.input_path / "00000_IM0001").read_bytes() == b"a" * 3000
    assert up.display_name == "study"
    assert not (tmp_path / "etc").exists()
    assert {p.name for p in tmp_path.iterdir()} == {"case"}


def test_over_the_limit_stops_reading(tmp_path):
    body, ctype = _multipart([("big.nii", b"x" * 50_000)])
    with pytest.raises(UploadTooLarge, match="limit"):
        _receive(body, ctype, tmp_path, max_bytes=20_000)
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written <= 20_000


def test_not_multipart_or_no_file_is_a_user_error(tmp_path):
    with pytest.raises(IchfedError, match="multipart"):
        _receive(b"hello", "application/octet-stream", tmp_path)
    req = httpx.Request("POST", "http://x/", data={"note": "no file"}, files=[("other", ("a.nii", b"1"))])
    with pytest.raises(IchfedError, match="no file"):
        _receive(req.read(), req.headers["content-type"], tmp_path / "b")


def test_parts_are_written_only_into_the_case_folder_never_the_temp_folder(tmp_path, monkeypatch):
    """python-multipart's FormParser writes each part straight into the case folder (UPLOAD_DIR):
    nothing is spooled to the system temp folder, and other form parts are not kept."""
    import tempfile

    spool = tmp_path / "system-tmp"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    req = httpx.Request("POST", "http://x/", data={"note": "x"},
                        files=[("file", ("a.dcm", b"a" * 3_000_000)), ("other", ("b.txt", b"b")),
                               ("file", ("empty.dcm", b""))])
    up = _receive(req.read(), req.headers["content-type"], tmp_path / "case", chunk=65536)
    assert list(spool.iterdir()) == []
    assert sorted(p.name for p in up.input_path.iterdir()) == ["00000_a.dcm", "00001_empty.dcm"]
    assert (up.input_path / "00001_empty.dcm").read_bytes() == b"" and up.n_files == 2
    assert not list((tmp_path / "case" / "raw").iterdir())  # the other part was dropped
