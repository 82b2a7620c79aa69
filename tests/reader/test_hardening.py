"""Issue #11 part 5, the reader: malformed uploads, a bounded queue, no eviction of others' results,
and crash leftovers removed on start. Real uvicorn over real HTTP; the analysis is a real (tiny)
threshold segmentation so these run in seconds without the nnU-Net bundle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import SimpleITK as sitk

from client.reader.app import ReaderSettings, create_app
from client.reader.upload import receive
from client.reader.workdir import MARKER, PREFIX, new_case_folder, remove_leftovers
from shared.plumbing.errors import IchfedError
from shared.prediction import BundleRef, PredictionResult

from .conftest import serve_in_thread

INFO = {"bundle": {"name": "test", "version": "0", "hash": "0" * 64}, "threshold": 0.5, "threshold_source": "bundle"}


def _nifti_bytes(tmp_path) -> bytes:
    arr = np.zeros((3, 8, 8), np.float32)
    arr[1, 2:4, 2:4] = 70
    path = tmp_path / "head.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    return path.read_bytes()


class GatedAnalyse:
    """Calls everything above 60 HU ICH, but only once ``gate`` is open: cases stay queued until then."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __call__(self, path, progress):
        assert self.gate.wait(60), "test gate never opened"
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
        progress("segmentation")
        mask = sitk.Cast(image > 60, sitk.sitkUInt8)
        ich_ml = float(sitk.GetArrayViewFromImage(mask).sum())
        # A Predictor's result without a classifier: no lesion classified, the volume measured.
        result = PredictionResult(source=str(path), lesion_found=False, ich_ml=ich_ml, phe_ml=0.0, threshold=0.5,
                                  extracranial_ml_removed=0.0, bundle=BundleRef(**INFO["bundle"]))
        return result, image, mask


def _post(url, data: bytes, name="head.nii.gz"):
    return httpx.post(f"{url}/api/cases", files=[("file", (name, data))], timeout=30)


def _wait_done(url, token):
    for _ in range(600):
        body = httpx.get(f"{url}/api/cases/{token}", timeout=30).json()
        if body["state"] in ("done", "error"):
            return body
        time.sleep(0.02)
    raise AssertionError("case did not finish")


def _receive(body: bytes, folder):
    async def chunks():
        yield body

    return asyncio.run(receive(chunks(), "multipart/form-data; boundary=b", folder, 10**6))


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"nonsense-without-boundary", "malformed multipart"),
        (b"--b\r\nthis is not a header\r\n\r\nxx\r\n--b--\r\n", "malformed multipart"),
        (b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.nii"\r\n\r\npartial', "closing boundary"),
    ],
)
def test_malformed_or_truncated_multipart_is_a_user_error(tmp_path, body, reason):
    with pytest.raises(IchfedError, match=reason):
        _receive(body, tmp_path)


def test_malformed_multipart_over_http_is_400_and_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    analyse = GatedAnalyse()
    analyse.gate.set()
    with serve_in_thread(create_app(analyse, INFO, ReaderSettings(work_dir=work))) as url:
        for body in (b"--b\r\nthis is not a header\r\n\r\nxx\r\n--b--\r\n", b"garbage", b"--b\r\n"):
            r = httpx.post(f"{url}/api/cases", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
            assert r.status_code == 400, r.text
            assert r.json()["error"].startswith("upload: ") and "Traceback" not in r.text
        assert list(work.iterdir()) == []
        # The server is fine afterwards.
        assert _wait_done(url, _post(url, _nifti_bytes(tmp_path)).json()["token"])["state"] == "done"


def test_full_queue_is_429_with_retry_after_and_reads_no_body(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    analyse = GatedAnalyse()
    data = _nifti_bytes(tmp_path)
    settings = ReaderSettings(work_dir=work, max_queued=2, max_cases=8)
    with serve_in_thread(create_app(analyse, INFO, settings)) as url:
        tokens = [_post(url, data).json()["token"] for _ in range(2)]
        r = _post(url, data)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "busy" in r.json()["error"]
        # Only the two accepted cases have folders; the refused one was never written.
        assert len(list(work.iterdir())) == 2
        analyse.gate.set()
        assert [_wait_done(url, t)["state"] for t in tokens] == ["done", "done"]
        assert _post(url, data).status_code == 202


def test_finished_results_are_not_evicted_by_another_users_uploads(tmp_path):
    analyse = GatedAnalyse()
    analyse.gate.set()
    data = _nifti_bytes(tmp_path)
    settings = ReaderSettings(work_dir=tmp_path, max_queued=2, max_cases=2, case_ttl_min=0.05)  # 3 s idle
    with serve_in_thread(create_app(analyse, INFO, settings)) as url:
        mine = _post(url, data).json()["token"]
        assert _wait_done(url, mine)["state"] == "done"
        theirs = _post(url, data).json()["token"]
        _wait_done(url, theirs)
        # A third upload (another user) finds the store full: refused, nobody's result dropped.
        r = _post(url, data)
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 3
        assert httpx.get(f"{url}/api/cases/{mine}").json()["result"]["ich_ml"] == 4
        assert httpx.get(f"{url}/api/cases/{theirs}").status_code == 200
        # Closing a case frees its place at once; an idle one after its time-to-live.
        assert httpx.delete(f"{url}/api/cases/{theirs}").status_code == 200
        third = _post(url, data)
        assert third.status_code == 202
        _wait_done(url, third.json()["token"])
        time.sleep(3.3)
        assert httpx.get(f"{url}/api/cases/{mine}").status_code == 404


def _marked(root, name, pid, host=None):
    folder = root / f"{PREFIX}{name}"
    folder.mkdir()
    (folder / "input.nii.gz").write_bytes(b"patient data")
    (folder / MARKER).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "created": 0}),
                                 encoding="utf-8")
    return folder


def test_start_removes_only_our_own_leftovers_of_dead_readers(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        crashed = _marked(tmp_path, "crashed", dead.pid)
        running = _marked(tmp_path, "running", alive.pid)
        elsewhere = _marked(tmp_path, "other-host", dead.pid, host="another-machine")
        unmarked = tmp_path / f"{PREFIX}not-ours"
        unmarked.mkdir()
        broken = _marked(tmp_path, "broken", dead.pid)
        (broken / MARKER).write_text("{", encoding="utf-8")
        analyse = GatedAnalyse()
        analyse.gate.set()
        with serve_in_thread(create_app(analyse, INFO, ReaderSettings(work_dir=tmp_path))) as url:
            assert httpx.get(f"{url}/api/info").status_code == 200
            assert not crashed.exists()
            assert running.exists() and elsewhere.exists() and unmarked.exists() and broken.exists()
    finally:
        alive.kill()
        alive.wait()
    # Once that reader has died too, its folder goes on the next start.
    assert remove_leftovers(tmp_path) == [running]


def test_case_folders_are_private_and_marked_with_this_process(tmp_path):
    folder = new_case_folder(tmp_path)
    assert folder.name.startswith(PREFIX) and (folder.stat().st_mode & 0o777) == 0o700
    assert json.loads((folder / MARKER).read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert remove_leftovers(tmp_path) == []  # this process is alive


def test_bad_queue_limit_is_one_error_line():
    r = subprocess.run([sys.executable, "-m", "ichfed", "reader", "--bundle", "nope", "--max-queued", "0"],
                       capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: ichfed reader: 'max_queued' must be between 1 and 1000, got 0"]


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="Debian's chromium is not installed")
def test_page_says_busy_with_the_wait_when_the_queue_is_full(tmp_path):
    from playwright.sync_api import sync_playwright

    analyse = GatedAnalyse()
    data = _nifti_bytes(tmp_path)
    (tmp_path / "second.nii.gz").write_bytes(data)
    settings = ReaderSettings(work_dir=tmp_path, max_queued=1)
    with serve_in_thread(create_app(analyse, INFO, settings)) as url, sync_playwright() as p:
        first = _post(url, data).json()["token"]  # another user's case, held at the gate
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(f"{url}/")
            page.wait_for_selector("#model-info b")
            page.set_input_files("#file-input", str(tmp_path / "second.nii.gz"))
            page.wait_for_selector("body[data-case-state=busy]", timeout=30_000)
            message = page.inner_text("#message")
            assert "The reader is busy" in message and "Try again in about 30 s" in message
            assert "could not be read" not in message and page.is_hidden("#progress")
            analyse.gate.set()
            _wait_done(url, first)
            page.set_input_files("#file-input", str(tmp_path / "second.nii.gz"))
            page.wait_for_selector("body[data-case-state=done]", timeout=30_000)
            assert page.is_hidden("#message")
        finally:
            browser.close()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_upload_abandoned_mid_body_leaves_nothing_and_no_traceback(tmp_path, caplog):
    collect = _Collect()
    caplog.set_level(logging.INFO, logger="client.reader.app")
    work = tmp_path / "work"
    work.mkdir()
    analyse = GatedAnalyse()
    analyse.gate.set()
    with serve_in_thread(create_app(analyse, INFO, ReaderSettings(work_dir=work))) as url:
        # uvicorn configures its loggers (no propagation) when the server is made: listen on them now.
        logging.getLogger("uvicorn.error").addHandler(collect)
        _abandon_upload(url, work)
        logging.getLogger("uvicorn.error").removeHandler(collect)
    records = collect.records + caplog.records
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]


def _abandon_upload(url, work):
    """Start a 100 kB upload, send 5 kB of it, and close the connection."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /api/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; "
                  b"filename=\"a.nii\"\r\n\r\n" + b"\0" * 5000)
        deadline = time.monotonic() + 10
        while not list(work.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert list(work.iterdir())  # the body is being received into a case folder
    deadline = time.monotonic() + 10
    while list(work.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(work.iterdir()) == []
    assert httpx.get(f"{url}/api/info").status_code == 200


def _raw_post(url: str, content_length: str) -> tuple[int, str]:
    """A POST declaring ``content_length`` with a few bytes of body; (status, body) of the answer."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(10)
        s.sendall(b"POST /api/cases HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: " + content_length.encode() + b"\r\n\r\n--b\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 2:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


def test_an_oversized_content_length_is_413_however_large_it_is(tmp_path):
    """Issue 21 item 14: docs/reader.md says 413; the HTTP parser used to answer 400 from 2**64 on."""
    work = tmp_path / "work"
    work.mkdir()
    settings = ReaderSettings(max_upload_mb=1, work_dir=work)
    with serve_in_thread(create_app(GatedAnalyse(), INFO, settings, allowed_hosts=["127.0.0.1"])) as url:
        for declared in (str(settings.max_upload_bytes + 1), str(10**12), str(2**64), "9" * 20):
            code, body = _raw_post(url, declared)
            assert code == 413, (declared, code, body)
            assert "larger than the limit of 1 MB" in json.loads(body)["error"]
        # Past 20 digits the value is not a length any parser represents: a malformed request.
        assert _raw_post(url, "1" + "0" * 20)[0] == 400
        assert httpx.get(f"{url}/api/info").status_code == 200
    assert list(work.iterdir()) == []


def test_one_handler_answers_every_route_error_as_one_json_line(tmp_path):
    analyse = GatedAnalyse()
    analyse.gate.set()
    with serve_in_thread(create_app(analyse, INFO, ReaderSettings(work_dir=tmp_path))) as url:
        for method, path in (("GET", "/api/cases/nope"), ("DELETE", "/api/cases/nope"),
                             ("GET", "/api/cases/nope/slices/0.png"), ("GET", "/api/cases/nope/voxels/0/0/0")):
            r = httpx.request(method, url + path)
            assert r.status_code == 404 and r.json()["error"].startswith("case: unknown"), (path, r.text)
            assert r.headers["x-content-type-options"] == "nosniff"
        token = _wait_done(url, _post(url, _nifti_bytes(tmp_path)).json()["token"])["token"]
        assert httpx.get(f"{url}/api/cases/{token}/slices/0.png").status_code == 200
        for path, reason in (("slices/99.png", "slice: must be between 0 and 2"),
                             ("slices/0.png?window=neon", "window: must be one of"),
                             ("overlays/bone/0.png", "label: must be one of"), ("voxels/0/99/99", "voxel:")):
            r = httpx.get(f"{url}/api/cases/{token}/{path}")
            assert r.status_code == 400 and reason in r.json()["error"], (path, r.text)


def test_host_guard_is_starlettes_and_admits_an_ipv6_loopback_reader():
    from client.reader.app import loopback_hosts

    with serve_in_thread(create_app(GatedAnalyse(), INFO, allowed_hosts=loopback_hosts("::1"))) as url:
        for host in ("[::1]:8000", "[::1]", "localhost:8000", "127.0.0.1"):
            assert httpx.get(f"{url}/api/info", headers={"host": host}).status_code == 200, host
        r = httpx.get(f"{url}/api/info", headers={"host": "rebound.example:8000"})
        assert r.status_code == 400 and r.headers["x-content-type-options"] == "nosniff"
    assert "[" not in loopback_hosts("127.0.0.1") and loopback_hosts("0.0.0.0") is None
