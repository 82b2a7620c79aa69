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
    from client.reader.app import UVICORN_OPTIONS

    # Served as `ichfed reader` serves it (HTTP parser and all), so limits behave the same.
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           **UVICORN_OPTIONS))
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
class Case:
    path: Path
    expected: dict  # Predictor.predict on it: the JSON of `ichfed predict --json`


def _healthy_head(path: Path) -> Path:
    """A simulated head with no lesion inserted."""
    from simulations.cohort import write_healthy_head

    return write_healthy_head(path, seed=7)


@pytest.fixture(scope="session")
def lesion_case(reader_predictor, tiny_bundle) -> Case:
    """A case of the bundle's synthetic cohort in which the predictor finds a hemorrhage."""
    from shared.imaging.sitedata import read_site

    site = read_site(tiny_bundle.cohort_dir)

    def ich_voxels(case):
        return int((sitk.GetArrayViewFromImage(sitk.ReadImage(str(case.mask_path))) == 1).sum())

    # Largest ground-truth ICH first: the tiny segmenter is most likely to find those.
    ranked = sorted((c for c in site.cases if c.mask_path), key=ich_voxels, reverse=True)
    for case in ranked[:3]:
        result = reader_predictor.predict(case.image_path)
        if result.lesion_found:
            return Case(case.image_path, result.to_dict())
    raise AssertionError("the tiny bundle's segmenter found no ICH in the three largest cohort lesions")


@pytest.fixture(scope="session")
def no_lesion_case(reader_predictor, tmp_path_factory) -> Case:
    """A simulated head without blood; the predictor finds no ICH in it."""
    path = _healthy_head(tmp_path_factory.mktemp("reader_cases") / "healthy_head.nii.gz")
    return Case(path, reader_predictor.predict(path).to_dict())


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
    from client.reader.app import (
        ReaderSettings,
        create_app,
        loopback_hosts,
        make_analyse,
        model_info,
    )

    work = tmp_path_factory.mktemp("reader_work")
    app = create_app(
        make_analyse(reader_predictor),
        model_info(reader_predictor),
        ReaderSettings(max_upload_mb=64, work_dir=work),
        allowed_hosts=loopback_hosts("127.0.0.1"),
    )
    with serve_in_thread(app) as url:
        yield url, work


@pytest.fixture(scope="session")
def showcase_case(reader_predictor, ge_series, tmp_path_factory) -> Case:
    """A synthetic hemorrhage inserted into the real GE head CT at demo scale: the README screenshot."""
    from simulations.cohort import make_case, write_nifti

    case = make_case("charite-like", 0, 0, scale="demo", background="real")
    image, _ = case.images()
    path = tmp_path_factory.mktemp("reader_showcase") / "synthetic-ich-real-head.nii.gz"
    write_nifti(image, path)
    return Case(path, reader_predictor.predict(path).to_dict())
