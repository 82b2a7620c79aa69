"""Reader fixtures: one real predictor from the tiny bundle, served by real uvicorn on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import SimpleITK as sitk


@contextlib.contextmanager
def serve_in_thread(app) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("reader test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="session")
def reader_predictor(tiny_bundle):
    """The real predictor (nnU-Net + ResNet-34) of the tiny signed bundle, loaded once."""
    from shared.bundle import load_bundle
    from shared.pipeline import Predictor

    return Predictor(load_bundle(tiny_bundle.path, tiny_bundle.public_key), device="cpu")


@dataclasses.dataclass(frozen=True)
class Cases:
    lesion: Path  # a synthetic cohort case in which the predictor finds a hemorrhage
    lesion_json: dict  # Predictor.predict on it: the JSON of `ichfed predict --json`
    no_lesion: Path  # a synthetic head without blood: the predictor finds none
    no_lesion_json: dict


def _no_blood_head(like: sitk.Image, path: Path) -> Path:
    """A head of brain-density tissue inside a skull, on the grid of a cohort case, with no blood."""
    size = like.GetSize()
    z, y, x = np.indices(size[::-1], dtype=np.float32)
    c = [(n - 1) / 2 for n in size[::-1]]
    r = np.sqrt(((z - c[0]) / (0.45 * size[2])) ** 2 + ((y - c[1]) / (0.42 * size[1])) ** 2
                + ((x - c[2]) / (0.36 * size[0])) ** 2)
    hu = np.full(r.shape, -1000.0, dtype=np.float32)
    hu[r < 1.0] = 1200.0  # skull
    hu[r < 0.9] = 30.0  # brain
    hu += np.random.default_rng(0).normal(0, 4, hu.shape).astype(np.float32)
    img = sitk.GetImageFromArray(hu)
    img.CopyInformation(like)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture(scope="session")
def reader_cases(reader_predictor, tiny_bundle, tmp_path_factory) -> Cases:
    """A lesion case from the bundle's synthetic cohort and a blood-free head, with their predictions."""
    from shared.sitedata import read_site

    site = read_site(tiny_bundle.cohort_dir)
    # Largest ground-truth ICH first: the tiny segmenter is most likely to find those.
    def ich_voxels(case):
        return int((sitk.GetArrayViewFromImage(sitk.ReadImage(str(case.mask_path))) == 1).sum())

    ranked = sorted((c for c in site.cases if c.mask_path), key=ich_voxels, reverse=True)
    lesion = lesion_json = None
    for case in ranked[:3]:
        result = reader_predictor.predict(case.image_path)
        if result["lesion_found"]:
            lesion, lesion_json = case.image_path, result
            break
    assert lesion is not None, "the tiny bundle's segmenter found no ICH in the three largest cohort lesions"
    folder = tmp_path_factory.mktemp("reader_cases")
    no_lesion = _no_blood_head(sitk.ReadImage(str(lesion)), folder / "no_blood_head.nii.gz")
    return Cases(lesion, lesion_json, no_lesion, reader_predictor.predict(no_lesion))


@pytest.fixture(scope="session")
def ge_zip(ge_series, tmp_path_factory) -> Path:
    """The real GE head CT series zipped, as a user would drop it."""
    out = tmp_path_factory.mktemp("ge") / "ge-hispeed-head.zip"
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(ge_series.iterdir()):
            if f.suffix == ".dcm":
                zf.write(f, f"ge/{f.name}")
    return out


@pytest.fixture(scope="module")
def reader_url(reader_predictor, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A running reader (real app, real predictor) and the folder its case folders go to."""
    from client.reader.app import ReaderSettings, create_app, loopback_hosts, make_analyse, model_info

    work = tmp_path_factory.mktemp("reader_work")
    app = create_app(
        make_analyse(reader_predictor),
        model_info(reader_predictor),
        ReaderSettings(max_upload_mb=64, work_dir=work),
        allowed_hosts=loopback_hosts("127.0.0.1"),
    )
    with serve_in_thread(app) as url:
        yield url, work
