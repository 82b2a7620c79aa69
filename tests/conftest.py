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
    """A real nnU-Net v2 model trained with the `ci` profile on a tiny synthetic site."""

    model_dir: Path  # what shared.training.segment_train.train returns (slim checkpoints; goes into bundles)
    results_dir: Path  # nnU-Net's own nnUNet_results/Dataset501_ICH (checkpoints as nnU-Net writes them)
    site_dir: Path  # write_cohort("charite-like", 10, seed=0, scale="ci")
    train_ids: tuple[str, ...]
    test_ids: tuple[str, ...]  # held out from nnU-Net training
    train_seconds: float


@pytest.fixture(scope="session")
def tiny_nnunet_model(tmp_path_factory) -> TinyNnunetModel:
    """Real nnU-Net planning, preprocessing and `ci` training (96 iterations) on 7 synthetic cases.

    Set ICHFED_TEST_NNUNET_DIR to reuse one trained model across local runs; CI trains afresh.
    """
    import time

    from shared.imaging.sitedata import read_site
    from shared.training.segment_dataset import export_dataset
    from shared.training.segment_train import train
    from simulations.cohort import write_cohort

    cached = os.environ.get("ICHFED_TEST_NNUNET_DIR")
    root = Path(cached) if cached else tmp_path_factory.mktemp("tiny_nnunet")
    site_dir = root / "site"
    if not (site_dir / "cases.csv").exists():
        write_cohort("charite-like", 10, 0, site_dir, scale="ci")
    site = read_site(site_dir)
    train_cases, test_cases = site.cases[:7], site.cases[7:]
    model_dir = root / "work" / "model"
    seconds = float("nan")
    if not (cached and model_dir.is_dir()):
        export_dataset(dataclasses.replace(site, cases=train_cases), root / "raw", dataset_id=501, name="ICH")
        t0 = time.perf_counter()
        model_dir = train(root / "raw", 501, "ci", root / "work", seed=0)
        seconds = time.perf_counter() - t0
    return TinyNnunetModel(
        model_dir=model_dir,
        results_dir=root / "work" / "nnUNet_results" / "Dataset501_ICH",
        site_dir=site_dir,
        train_ids=tuple(c.case_id for c in train_cases),
        test_ids=tuple(c.case_id for c in test_cases),
        train_seconds=seconds,
    )


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
