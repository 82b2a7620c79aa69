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


# Tiers: `make test-fast` runs ``-m "not slow"`` for the edit loop; `make test` (CI) runs everything.
# A test is slow when it needs a trained model (any fixture built on ``tiny_bundle``: one real bootstrap
# with nnU-Net and ResNet-34 training) or real deployment processes; marking it by hand is not needed.
_SLOW_FIXTURES = {"tiny_bundle"}
_SLOW_FOLDERS = ("tests/deploy/",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.nodeid.startswith(_SLOW_FOLDERS):
            item.add_marker(pytest.mark.slow)


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
    from server.bootstrap import get_recipe
    from simulations.reference import bootstrap_development

    cached = os.environ.get("ICHFED_TEST_BUNDLE_DIR")
    root = Path(cached) if cached else tmp_path_factory.mktemp("tiny_bundle")
    out = root / "bundle"
    report_path = root / "bundle-report.json"
    if not (cached and report_path.exists()):
        bootstrap_development(get_recipe("ci"), out=out, work_dir=root / "work", seed=0)
    import json

    report = json.loads(report_path.read_text(encoding="utf-8"))
    from shared.security.keys import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME

    key_dir = root / "bundle-keys"
    return TinyBundle(
        path=out,
        public_key=key_dir / PUBLIC_KEY_NAME,
        private_key=key_dir / PRIVATE_KEY_NAME,
        report=report,
        cohort_dir=root / "work" / "cohort",
    )


@dataclasses.dataclass(frozen=True)
class TinyNnunetModel:
    """The real nnU-Net v2 model inside ``tiny_bundle``: planned, preprocessed and trained by nnU-Net with the
    `ci` trainer on the bootstrap's training split (one nnU-Net training serves the whole suite)."""

    model_dir: Path  # what shared.training.segment_train.train returned (slim checkpoints; went into the bundle)
    results_dir: Path  # nnU-Net's own nnUNet_results/Dataset501_ICH (checkpoints as nnU-Net writes them)
    site_dir: Path  # the bootstrap's development cohort (charite-like, ci scale)
    train_ids: tuple[str, ...]  # the cases nnU-Net trained on
    test_ids: tuple[str, ...]  # the bootstrap's validation and test cases: never seen by nnU-Net


@pytest.fixture(scope="session")
def tiny_nnunet_model(tiny_bundle) -> TinyNnunetModel:
    """The segmenter of ``tiny_bundle``, with the cases it did and did not train on."""
    from shared.imaging.sitedata import read_site

    work = tiny_bundle.cohort_dir.parent
    raw_labels = work / "nnunet_raw" / "Dataset501_ICH" / "labelsTr"
    train_ids = tuple(sorted(p.name.removesuffix(".nii.gz") for p in raw_labels.glob("*.nii.gz")))
    site = read_site(tiny_bundle.cohort_dir)
    return TinyNnunetModel(
        model_dir=work / "nnunet" / "model",
        results_dir=work / "nnunet" / "nnUNet_results" / "Dataset501_ICH",
        site_dir=tiny_bundle.cohort_dir,
        train_ids=train_ids,
        test_ids=tuple(c.case_id for c in site.cases if c.case_id not in train_ids),
    )


@pytest.fixture(scope="session")
def cohorts(tmp_path_factory):
    """Generated site folders, each written once per session (``tests/site_pool.py``)."""
    from tests.site_pool import CohortPool

    return CohortPool(tmp_path_factory.mktemp("cohorts"))


@pytest.fixture(scope="session")
def case_cache(tmp_path_factory):
    """Every site cache entry computed in the session: ``seed(state_dir)`` before a site runs,
    ``keep(state_dir)`` after (``tests/site_pool.py``)."""
    from tests.site_pool import CachePool

    return CachePool(tmp_path_factory.mktemp("case_cache"))


@pytest.fixture
def flwr_task():
    """Give this process a Flower task identity (run 1, node 0), as a running ServerApp has.

    ``flwr.app.Message`` reads it when an instruction message is created.
    """
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
