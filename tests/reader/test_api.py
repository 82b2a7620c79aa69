"""Reader backend over real HTTP with the real tiny-bundle predictor."""

from __future__ import annotations

import io
import threading
import time
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.dicom_factory import simple_series

from .conftest import serve_in_thread


def _upload(url: str, files: list[tuple[str, bytes]], **kw) -> httpx.Response:
    return httpx.post(f"{url}/api/cases", files=[("file", f) for f in files], timeout=60, **kw)


def _wait(url: str, token: str, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        body = httpx.get(f"{url}/api/cases/{token}", timeout=30).json()
        if not seen or seen[-1] != body["state"]:
            seen.append(body["state"])
        if body["state"] in ("done", "error"):
            body["seen_states"] = seen
            return body
        time.sleep(0.05)
    raise AssertionError(f"case {token} did not finish; states {seen}")


def _without_timings(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("timings", "source")}


def test_good_case_gives_the_json_of_ichfed_predict_and_renders(reader_url, lesion_case):
    url, work = reader_url
    path = lesion_case.path
    r = _upload(url, [(path.name, path.read_bytes())])
    assert r.status_code == 202, r.text
    body = _wait(url, r.json()["token"])
    assert body["state"] == "done", body
    result = body["result"]
    # Same numbers, keys and key order as Predictor.predict (what `ichfed predict --json` prints).
    expected = lesion_case.expected
    assert list(result) == list(expected)
    assert _without_timings(result) == _without_timings(expected)
    assert list(result["timings"]) == list(expected["timings"])
    assert result["source"] == path.name
    assert result["lesion_found"] and result["ich_ml"] > 0
    assert set(body["seen_states"]) <= {"queued", "reading", "segmentation", "classification", "rendering", "done"}

    view = body["view"]
    z = view["best_slice"]
    assert z in view["slices_with"]["ich"]
    png = httpx.get(f"{url}/api/cases/{body['token']}/slices/{z}.png", params={"window": "brain"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (view["width"], view["height"])
    ich = Image.open(io.BytesIO(httpx.get(f"{url}/api/cases/{body['token']}/overlays/ich/{z}.png").content))
    assert np.asarray(ich)[..., 3].any()
    # The case folder (the uploaded image) is gone once the case is done.
    assert list(work.iterdir()) == []

    assert httpx.delete(f"{url}/api/cases/{body['token']}").status_code == 200
    assert httpx.get(f"{url}/api/cases/{body['token']}").status_code == 404
    assert httpx.get(f"{url}/api/cases/{body['token']}/slices/{z}.png").status_code == 404


def test_no_lesion_is_a_result_not_an_error(reader_url, no_lesion_case):
    url, _ = reader_url
    assert no_lesion_case.expected["lesion_found"] is False
    path = no_lesion_case.path
    body = _wait(url, _upload(url, [(path.name, path.read_bytes())]).json()["token"])
    assert body["state"] == "done" and body["message"] is None
    result = body["result"]
    assert _without_timings(result) == _without_timings(no_lesion_case.expected)
    assert result["lesion_found"] is False and result["label"] is None and result["p_neoplastic"] is None
    assert body["view"]["slices_with"]["ich"] == []


def test_non_ct_inputs_get_a_readable_message_and_the_server_keeps_working(reader_url, tmp_path, no_lesion_case):
    url, work = reader_url
    photo = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, format="PNG")
    simple_series(tmp_path / "mr", n=4, size=8, modality="MR")
    mr_zip = io.BytesIO()
    with zipfile.ZipFile(mr_zip, "w") as zf:
        for f in sorted((tmp_path / "mr").iterdir()):
            zf.write(f, f.name)
    expected = {
        "photo.png": "no DICOM files found",
        "brain-mr.zip": "no CT series found",
        "broken.nii.gz": "not a readable NIfTI",
    }
    payloads = {"photo.png": photo.getvalue(), "brain-mr.zip": mr_zip.getvalue(), "broken.nii.gz": b"\x1f\x8b\x08garbage"}
    for name, data in payloads.items():
        r = _upload(url, [(name, data)])
        assert r.status_code == 202, r.text
        body = _wait(url, r.json()["token"])
        assert body["state"] == "error"
        assert expected[name] in body["message"], body["message"]
        assert "\n" not in body["message"] and "Traceback" not in body["message"]
        assert str(work) not in body["message"]  # the temporary folder means nothing to a reader
    assert list(work.iterdir()) == []
    # Still usable afterwards.
    path = no_lesion_case.path
    assert _wait(url, _upload(url, [(path.name, path.read_bytes())]).json()["token"])["state"] == "done"


def test_oversized_upload_is_refused_with_413_and_nothing_kept(reader_predictor, tmp_path):
    from client.reader.app import ReaderSettings, create_app, make_analyse, model_info

    work = tmp_path / "work"
    work.mkdir()
    settings = ReaderSettings(max_upload_mb=0.05, work_dir=work)  # 52 kB
    app = create_app(make_analyse(reader_predictor), model_info(reader_predictor), settings)
    with serve_in_thread(app) as url:
        assert httpx.get(f"{url}/api/info").json()["max_upload_bytes"] == 52428
        r = _upload(url, [("big.nii.gz", b"\0" * 80_000)])
        assert r.status_code == 413 and "limit" in r.json()["error"]

        # Without a Content-Length (chunked), the limit is enforced while streaming.
        boundary = "ichfedtestboundary"

        def body():
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.nii"\r\n\r\n'.encode()
            for _ in range(40):
                yield b"\0" * 4096
            yield f"\r\n--{boundary}--\r\n".encode()

        r = httpx.post(f"{url}/api/cases", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413, r.text
        assert list(work.iterdir()) == []


def test_concurrent_uploads_are_queued_not_run_in_parallel(reader_url, no_lesion_case):
    url, _ = reader_url
    path = no_lesion_case.path
    data = path.read_bytes()
    tokens: list[str] = []

    def send():
        tokens.append(_upload(url, [(path.name, data)]).json()["token"])

    threads = [threading.Thread(target=send) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bodies = sorted((_wait(url, t) for t in tokens), key=lambda b: b["started_at"])
    assert [b["state"] for b in bodies] == ["done"] * 3
    for earlier, later in zip(bodies, bodies[1:]):
        assert later["started_at"] >= earlier["finished_at"]


def test_info_and_host_guard(reader_url, reader_predictor):
    url, _ = reader_url
    info = httpx.get(f"{url}/api/info").json()
    assert info["bundle"]["name"] == reader_predictor.bundle.manifest.name
    assert info["threshold"] == pytest.approx(reader_predictor.threshold, abs=1e-6)
    assert "brain" in info["windows"]
    # A page on another site reaching this loopback server through DNS rebinding is refused.
    r = httpx.get(f"{url}/api/info", headers={"host": "evil.example"})
    assert r.status_code == 400
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text
