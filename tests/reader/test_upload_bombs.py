"""Issue 21 item 5 through the reader page: a zip bomb uploaded to the reader is refused before
anything is extracted, with the same one-line error as ``ichfed ingest`` (real uvicorn, real HTTP;
the reader's own ``make_analyse`` reads the upload, so no model is needed to reach the refusal)."""

from __future__ import annotations

import time
import zipfile

import httpx

from client.reader.app import ReaderSettings, create_app, make_analyse
from shared.pipeline import Predictor

from .conftest import serve_in_thread

INFO = {"bundle": {"name": "test", "version": "0", "hash": "0" * 64}, "threshold": 0.5, "threshold_source": "bundle"}


class _NoModel:
    """The reader's real reading path (``Predictor.read_case``) with no model behind it: ingestion
    refuses the bomb before anything would reach a model."""

    read_case = Predictor.read_case


def test_a_zip_bomb_upload_is_refused_before_extraction(tmp_path, monkeypatch):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("slice001.dcm", b"\0" * (64 << 20))  # 64 MiB in about 64 KB
    opened = []
    real_open = zipfile.ZipFile.open
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda self, *a, **k: opened.append(a) or real_open(self, *a, **k))
    work = tmp_path / "work"
    work.mkdir()
    with serve_in_thread(create_app(make_analyse(_NoModel()), INFO, ReaderSettings(work_dir=work))) as url:
        r = httpx.post(f"{url}/api/cases", files=[("file", ("bomb.zip", bomb.read_bytes()))], timeout=30)
        assert r.status_code == 202, r.text
        token = r.json()["token"]
        for _ in range(500):
            body = httpx.get(f"{url}/api/cases/{token}", timeout=30).json()
            if body["state"] in ("done", "error"):
                break
            time.sleep(0.02)
    assert body["state"] == "error", body
    # The page shows the path the user knows (the upload's name), not the server's folder.
    assert body["message"].startswith("bomb.zip: ") and "compression ratio of 1027:1" in body["message"]
    assert "\n" not in body["message"]
    assert opened == []  # no member was read, so nothing was written
