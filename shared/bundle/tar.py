"""The ``.tar`` form of a bundle, for carrying it on a disk or a download: ``pack`` and ``unpack``.

Packing is reproducible (sorted names, zero mtimes and owners) and refuses a bundle whose files no
longer match its manifest; unpacking refuses absolute paths, ``..``, links and special files.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

from shared.bundle.manifest import MANIFEST, SIGNATURE, check_files, parse_manifest
from shared.bundle.signature import bundle_dir
from shared.plumbing.atomic import atomic_path
from shared.plumbing.errors import BundleVerificationError, IchfedError
from shared.plumbing.files import staged_dir


def pack(path: str | Path, tar_path: str | Path) -> Path:
    """Write the bundle as an uncompressed, reproducible ``.tar`` (sorted, zero mtimes/owners).

    The files are checked against the manifest first, so a broken bundle is not shipped.
    """
    root = bundle_dir(path)
    manifest = parse_manifest((root / MANIFEST).read_bytes(), root / MANIFEST)
    check_files(root, manifest.files)
    names = [MANIFEST] + ([SIGNATURE] if (root / SIGNATURE).is_file() else []) + sorted(manifest.files)
    out = Path(tar_path)
    with atomic_path(out, suffix=".tar") as tmp:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for rel in names:
                data = (root / rel).read_bytes()
                info = tarfile.TarInfo(rel)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return out


def unpack(tar_path: str | Path, out_dir: str | Path) -> Path:
    """Extract a packed bundle into ``out_dir`` (must not exist); returns ``out_dir``.

    Only regular files with relative paths are accepted: absolute paths, ``..`` components,
    links and device files are refused before anything is written. The result is not verified
    here; open it with ``load_bundle``.
    """
    src = Path(tar_path)
    out = Path(out_dir)
    if not src.is_file():
        raise IchfedError(f"{src}: file not found")
    if out.exists():
        raise IchfedError(f"{out}: already exists; choose a new folder to unpack into")
    try:
        tar = tarfile.open(src, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise BundleVerificationError(f"{src}: not a tar archive ({e})") from None
    with tar:
        members = tar.getmembers()
        for m in members:
            p = PurePosixPath(m.name)
            if m.name.startswith(("/", "\\")) or p.is_absolute() or ".." in p.parts or "\\" in m.name or ":" in m.name:
                raise BundleVerificationError(f"{src}: unsafe path in archive: {m.name!r}")
            if not (m.isfile() or m.isdir()):
                raise BundleVerificationError(f"{src}: archive member {m.name!r} is a link or special file")
        if not any(PurePosixPath(m.name) == PurePosixPath(MANIFEST) and m.isfile() for m in members):
            raise BundleVerificationError(f"{src}: not a packed bundle ({MANIFEST} missing)")
        with staged_dir(out) as tmp:
            # The 'data' filter is a second line of defence behind the checks above.
            tar.extractall(tmp, members=members, filter="data")
    return out
