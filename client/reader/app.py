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

Errors are ``{"error": "<one line>"}``: 404 for an unknown, expired or unfinished case, 400 for a
slice, voxel, window or label outside the case and for a malformed request, 413 and 429 as above.
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
from starlette.middleware.trustedhost import TrustedHostMiddleware
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


class NotFound(IchfedError):
    """An unknown, expired or unfinished case (404)."""


# The one exception handler's answer to each user error a route raises (most specific first).
_STATUS: tuple[tuple[type[IchfedError], int], ...] = (
    (UploadTooLarge, 413), (StoreFull, 429), (NotFound, 404), (IchfedError, 400),
)


def create_app(
    analyse: Callable,
    info: dict[str, Any],
    settings: ReaderSettings = ReaderSettings(),
    allowed_hosts: list[str] | None = None,
):
    """Build the FastAPI app around ``analyse(path, progress) -> (PredictionResult, image, mask)``.

    ``allowed_hosts`` (Starlette's ``TrustedHostMiddleware``) guards against DNS rebinding (a web
    page elsewhere reaching this loopback server under its own host name); ``None`` allows any host.
    Routes raise ``IchfedError`` subclasses; one handler turns them into ``{"error": ...}`` with the
    status in ``_STATUS`` (``Retry-After`` for a full store).
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
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)

    @app.middleware("http")  # added last, so outermost: a refused host's answer carries the headers too
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for k, v in _SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if request.url.path.startswith("/api/") and "cache-control" not in response.headers:
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(IchfedError)
    async def user_error(request: Request, e: IchfedError) -> JSONResponse:
        code = next(status_code for cls, status_code in _STATUS if isinstance(e, cls))
        headers = {"Retry-After": str(e.retry_after_s)} if isinstance(e, StoreFull) else None
        return JSONResponse({"error": str(e)}, status_code=code, headers=headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect) -> JSONResponse:
        # A closed tab or a dropped connection: nothing to answer, nothing kept, no traceback.
        log.info("reader: upload abandoned by the client")
        return JSONResponse({"error": "upload: the client disconnected"}, status_code=400)

    _add_routes(app, store, info, settings)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _add_routes(app: FastAPI, store: CaseStore, info: dict[str, Any], settings: ReaderSettings) -> None:
    """The page, the model's info and the case routes (errors go to ``create_app``'s handler)."""

    def finished(token: str):
        case = _case(store, token, "case: unknown, expired or not finished")
        if case.view is None:
            raise NotFound("case: unknown, expired or not finished")
        return case

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
        _check_declared_length(request.headers.get("content-length"), settings)
        store.admit()  # before reading the body: a refused upload costs no disk or bandwidth
        folder = new_case_folder(settings.work_dir)
        try:
            received = await receive(
                request.stream(), request.headers.get("content-type", ""), folder, settings.max_upload_bytes
            )
            case = store.submit(folder, received.input_path, received.display_name)  # may fill up meanwhile
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # nothing of a refused or broken upload stays on disk
            raise
        log.info("reader: received %d file(s), %.1f MB", received.n_files, received.n_bytes / 2**20)
        return JSONResponse(status(store, case), status_code=202)

    @app.get("/api/cases/{token}")
    async def case_status(token: str):
        return status(store, _case(store, token, "case: unknown or expired; drop the image again"))

    @app.delete("/api/cases/{token}")
    async def case_delete(token: str):
        if not store.drop(token):
            raise NotFound("case: unknown, expired or still running")
        return {"deleted": token}

    # Plain `def`: FastAPI runs these in its thread pool, so encoding a PNG never stalls polling.
    @app.get("/api/cases/{token}/slices/{z}.png")
    def slice_png(token: str, z: int, window: str = "brain"):
        return _png(finished(token).view.slice_png(z, window))

    @app.get("/api/cases/{token}/overlays/{label}/{z}.png")
    def overlay_png(token: str, label: str, z: int):
        return _png(finished(token).view.overlay_png(z, label))

    @app.get("/api/cases/{token}/voxels/{z}/{y}/{x}")
    def voxel(token: str, z: int, y: int, x: int):
        return finished(token).view.probe(z, y, x)


def _png(data: bytes) -> Response:
    # The token is random per upload, so a slice URL never changes meaning; cache in the tab only.
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _case(store: CaseStore, token: str, message: str):
    try:
        return store.get(token)
    except KeyError:
        raise NotFound(message) from None


def _check_declared_length(header: str | None, settings: ReaderSettings) -> None:
    """``UploadTooLarge`` (413) when the declared ``Content-Length`` is over the limit, before any body is read.

    The HTTP parser (h11, see ``UVICORN_OPTIONS``) has already refused a value that is not 1-20 digits.
    """
    if header is not None and header.strip().isdigit() and int(header) > settings.max_upload_bytes:
        raise UploadTooLarge(
            f"upload: {int(header) / 2**20:.1f} MB is larger than the limit of {settings.max_upload_mb:g} MB")


def loopback_hosts(host: str) -> list[str] | None:
    """Host names a browser may use to reach a server bound to ``host`` (None: any).

    For an IPv6 bind the list also holds "[": Starlette 1.3's ``TrustedHostMiddleware`` cuts a
    ``Host`` of ``[::1]:8000`` at its first colon (Kludex/starlette#3357). That admits IPv6
    literals only, which DNS rebinding cannot produce (it needs a host name); "[::1]" stays
    listed for a Starlette that reads brackets.
    """
    if host in ("0.0.0.0", "::", ""):
        return None
    hosts = {host, "127.0.0.1", "localhost", "[::1]", f"[{host}]"}
    if ":" in host:
        hosts.add("[")
    return sorted(hosts)


# How the reader is served (``serve`` and the tests). h11 parses Content-Length without a 64-bit
# limit (up to 20 digits), so any over-limit declaration reaches the app and gets its 413; httptools
# answered 400 from 2**64 on. No websockets: the page polls.
UVICORN_OPTIONS: dict[str, Any] = {"http": "h11", "ws": "none"}


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, **UVICORN_OPTIONS)
