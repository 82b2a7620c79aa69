"""The reader page's backend: FastAPI app serving the page, uploads, results and slice images.

Endpoints (all JSON unless noted):
- ``GET /`` the page; ``GET /static/...`` its script and style (no CDN: everything is local).
- ``GET /api/info`` model bundle, threshold, upload limit, window presets.
- ``POST /api/cases`` multipart ``file`` part(s): a NIfTI, a zip of one DICOM series, or the
  files of a DICOM folder. Answers 202 with a case token; the case is queued. 400 for a
  malformed body, 413 over the size limit, 429 with ``Retry-After`` when the queue or the
  store of held cases is full (finished cases are never evicted to make room).
- ``GET /api/cases/{token}`` state (queued, reading, segmentation, classification, rendering,
  done, error), then the result (the JSON of ``ichfed predict --json``, including its
  ``quality_flags`` and ``extracranial_ml_removed``) and viewer geometry.
- ``GET /api/cases/{token}/slices/{z}.png?window=brain`` a windowed axial slice (PNG).
- ``GET /api/cases/{token}/overlays/{ich|phe}/{z}.png`` a transparent label overlay (PNG).
- ``GET /api/cases/{token}/voxels/{z}/{y}/{x}`` HU and label of one voxel (the density read-out).
- ``DELETE /api/cases/{token}`` forget a case now rather than at expiry.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.requests import ClientDisconnect

from shared.imaging.quality import FLAGS as QUALITY_FLAGS
from shared.plumbing.errors import IchfedError

from .cases import CaseStore, StoreFull, status
from .render import WINDOWS
from .upload import UploadTooLarge, receive
from .workdir import new_case_folder, remove_leftovers

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"

_SECURITY_HEADERS = {
    # 'self' only: the page must work offline, and a stray CDN reference then fails loudly in tests.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclasses.dataclass(frozen=True)
class ReaderSettings:
    """Limits of the reader backend."""

    max_upload_mb: float = dataclasses.field(default=512.0, metadata={"range": (0.001, 1_000_000.0)})
    case_ttl_min: float = dataclasses.field(default=30.0, metadata={"range": (0.1, 24 * 60.0)})
    # Cases held at once (waiting, running or finished and still viewable).
    max_cases: int = dataclasses.field(default=8, metadata={"range": (1, 1000)})
    # Cases waiting or running at once; more uploads get 429 rather than an ever-longer wait.
    max_queued: int = dataclasses.field(default=4, metadata={"range": (1, 1000)})
    # Where per-case temporary folders go (default: the system temp folder).
    work_dir: Path | None = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def make_analyse(predictor: Any) -> Callable:
    """The worker's job for one case: ``Predictor.read_case``, the reading path of ``Predictor.predict``."""

    def analyse(path: Path, progress: Callable[[str], None]):
        return predictor.read_case(path, progress=progress)

    return analyse


def model_info(predictor: Any) -> dict[str, Any]:
    """What the page shows about the model before any case is loaded."""
    manifest = predictor.bundle.manifest
    return {
        "bundle": {"name": manifest.name, "version": manifest.version, "hash": predictor.bundle.hash},
        "threshold": round(float(predictor.threshold), 6),
        "threshold_source": predictor.threshold_source,
        # whose calibration and BatchNorm statistics the site's overlay supplied ("site") or the bundle's
        "calibration_source": getattr(predictor, "calibration_source", "bundle"),
        "norm_stats_source": getattr(predictor, "norm_stats_source", "bundle"),
    }


def create_app(
    analyse: Callable,
    info: dict[str, Any],
    settings: ReaderSettings = ReaderSettings(),
    allowed_hosts: list[str] | None = None,
):
    """Build the FastAPI app around ``analyse(path, progress) -> (result, image, mask)``.

    ``allowed_hosts`` guards against DNS rebinding (a web page elsewhere reaching this
    loopback server under its own host name); ``None`` allows any host.
    """
    store = CaseStore(
        analyse, ttl_s=settings.case_ttl_min * 60.0, max_cases=settings.max_cases, max_queued=settings.max_queued
    )

    @asynccontextmanager
    async def lifespan(app):
        # Patient images a crashed earlier reader left behind go before this one serves anything.
        remove_leftovers(settings.work_dir)
        yield
        store.close()

    app = FastAPI(title="ichfed reader", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.store = store

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None:
            host = _host_name(request.headers.get("host", ""))
            if host not in allowed_hosts:
                return JSONResponse({"error": f"host: {host!r} is not served here"}, status_code=400)
        response = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if request.url.path.startswith("/api/") and "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    def error(message: str, code: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=code)

    def busy(e: StoreFull) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=429, headers={"Retry-After": str(e.retry_after_s)})

    def get_case(token: str):
        try:
            return store.get(token)
        except KeyError:
            return None

    @app.get("/")
    async def index():
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info")
    async def api_info():
        return {
            **info,
            "max_upload_bytes": settings.max_upload_bytes,
            "windows": {k: list(v) for k, v in WINDOWS.items()},
            "quality_flags": dict(QUALITY_FLAGS),
        }

    @app.post("/api/cases", status_code=202)
    async def upload(request: Request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_upload_bytes:
            return error(
                f"upload: {int(length) / 2**20:.1f} MB is larger than the limit of {settings.max_upload_mb:g} MB",
                413,
            )
        try:
            store.admit()  # before reading the body: a refused upload costs no disk or bandwidth
        except StoreFull as e:
            return busy(e)
        folder = new_case_folder(settings.work_dir)
        try:
            received = await receive(
                request.stream(), request.headers.get("content-type", ""), folder, settings.max_upload_bytes
            )
        except UploadTooLarge as e:
            shutil.rmtree(folder, ignore_errors=True)
            return error(str(e), 413)
        except IchfedError as e:
            shutil.rmtree(folder, ignore_errors=True)
            return error(str(e))
        except ClientDisconnect:
            # A closed tab or a dropped connection: nothing to answer, nothing to keep, no traceback.
            shutil.rmtree(folder, ignore_errors=True)
            log.info("reader: upload abandoned by the client")
            return error("upload: the client disconnected", 400)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("reader: received %d file(s), %.1f MB", received.n_files, received.n_bytes / 2**20)
        try:
            case = store.submit(folder, received.input_path, received.display_name)
        except StoreFull as e:  # filled up while this body was being received
            shutil.rmtree(folder, ignore_errors=True)
            return busy(e)
        return JSONResponse(status(store, case), status_code=202)

    @app.get("/api/cases/{token}")
    async def case_status(token: str):
        case = get_case(token)
        if case is None:
            return error("case: unknown or expired; drop the image again", 404)
        return status(store, case)

    @app.delete("/api/cases/{token}")
    async def case_delete(token: str):
        if not store.drop(token):
            return error("case: unknown, expired or still running", 404)
        return {"deleted": token}

    def png(token: str, render: Callable[[Any], bytes]):
        case = get_case(token)
        if case is None or case.view is None:
            return error("case: unknown, expired or not finished", 404)
        try:
            data = render(case.view)
        except IchfedError as e:
            return error(str(e), 404)
        # The token is random per upload, so a slice URL never changes meaning; cache in the tab only.
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    # Plain `def`: FastAPI runs these in its thread pool, so encoding a PNG never stalls polling.
    @app.get("/api/cases/{token}/slices/{z}.png")
    def slice_png(token: str, z: int, window: str = "brain"):
        return png(token, lambda v: v.slice_png(z, window))

    @app.get("/api/cases/{token}/overlays/{label}/{z}.png")
    def overlay_png(token: str, label: str, z: int):
        return png(token, lambda v: v.overlay_png(z, label))

    @app.get("/api/cases/{token}/voxels/{z}/{y}/{x}")
    def voxel(token: str, z: int, y: int, x: int):
        case = get_case(token)
        if case is None or case.view is None:
            return error("case: unknown, expired or not finished", 404)
        try:
            return case.view.probe(z, y, x)
        except IchfedError as e:
            return error(str(e), 404)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def loopback_hosts(host: str) -> list[str] | None:
    """Host names a browser may use to reach a server bound to ``host`` (None: any)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return sorted({host, "127.0.0.1", "localhost", "[::1]", f"[{host}]"})


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    # No websockets: the page polls; this also skips importing the websockets package.
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, ws="none")
