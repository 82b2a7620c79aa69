"""Session fixtures shared by the whole suite.

The expensive one is ``tiny_bundle``: a real ``ichfed bootstrap --profile ci`` run (real nnU-Net
training with a few iterations, real ResNet-34 training, real signing) done once per session and
reused by the predictor, reader, federation and deployment tests.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo into another folder with the provided files beside it as ../shared.
PROVIDED = REPO.parent / "shared"
GE_SERIES = PROVIDED / "data" / "ct" / "ge-hispeed-head-tilt"

# Keep the 2-core CI machine responsive: torch and BLAS would otherwise oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def ge_series() -> Path:
    """The real GE HiSpeed head CT series (28 tilted DICOM slices)."""
    if not GE_SERIES.is_dir():
        pytest.skip(f"provided GE head CT not found at {GE_SERIES}")
    return GE_SERIES


@dataclasses.dataclass(frozen=True)
class TinyBundle:
    path: Path
    public_key: Path
    private_key: Path
    report: dict
    cohort_dir: Path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> TinyBundle:
    """A signed bundle from a real `ci`-profile bootstrap (tiny nnU-Net + ResNet-34 training).

    Set ICHFED_TEST_BUNDLE_DIR to reuse one folder across local runs; CI always builds afresh.
    """
    from server.bootstrap import bootstrap, get_profile

    cached = os.environ.get("ICHFED_TEST_BUNDLE_DIR")
    root = Path(cached) if cached else tmp_path_factory.mktemp("tiny_bundle")
    out = root / "bundle"
    report_path = root / "bundle-report.json"
    if not (cached and report_path.exists()):
        bootstrap(get_profile("ci"), out=out, work_dir=root / "work", seed=0)
    import json

    report = json.loads(report_path.read_text())
    from shared.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

    key_dir = root / "bundle-keys"
    return TinyBundle(
        path=out,
        public_key=key_dir / PUBLIC_KEY_NAME,
        private_key=key_dir / PRIVATE_KEY_NAME,
        report=report,
        cohort_dir=root / "work" / "cohort",
    )
