"""The case store: one worker, temporary folders removed, finished cases forgotten on time."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from client.reader.cases import CaseStore, StoreFull, status
from shared.plumbing.errors import IchfedError
from shared.prediction import BundleRef, PredictionResult


def _threshold_analyse(path, progress):
    """Read a NIfTI and call everything above 60 HU ICH: a tiny real pipeline for the store to run."""
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    progress("segmentation")
    mask = sitk.Cast(image > 60, sitk.sitkUInt8)
    progress("classification")
    if "bad" in path.name:
        raise IchfedError(f"{path}: not a CT")
    result = PredictionResult(source=str(path), lesion_found=False, ich_ml=float(sitk.GetArrayViewFromImage(mask).sum()),
                              threshold=0.5, bundle=BundleRef("test", "0", "0" * 64))
    return result, image, mask


def _case_folder(tmp_path, name="case.nii.gz"):
    folder = tmp_path / f"case-{time.monotonic_ns()}"
    folder.mkdir()
    arr = np.zeros((3, 8, 8), np.float32)
    arr[1, 2:4, 2:4] = 70
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(folder / name))
    return folder, folder / name


def _wait(store, token):
    for _ in range(500):
        case = store.get(token)
        if case.state in ("done", "error"):
            return case
        time.sleep(0.01)
    raise AssertionError("case did not finish")


def test_done_and_failed_cases_leave_no_folder_and_report_the_dropped_name(tmp_path):
    store = CaseStore(_threshold_analyse)
    try:
        folder, path = _case_folder(tmp_path)
        case = _wait(store, store.submit(folder, path, "head.nii.gz").token)
        assert case.state == "done" and case.result.source == "head.nii.gz" and case.result.ich_ml == 4
        assert status(store, case)["view"]["best_slice"] == 1
        assert not folder.exists()

        folder, path = _case_folder(tmp_path, "bad.nii.gz")
        case = _wait(store, store.submit(folder, path, "scan.nii.gz").token)
        assert case.state == "error" and case.message == "scan.nii.gz: not a CT"
        assert "view" not in status(store, case) and not folder.exists()
    finally:
        store.close()


def test_finished_cases_expire_and_a_full_store_refuses_rather_than_evicts(tmp_path):
    store = CaseStore(_threshold_analyse, ttl_s=0.3, max_cases=2)
    try:
        tokens = []
        for _ in range(2):
            folder, path = _case_folder(tmp_path)
            tokens.append(store.submit(folder, path, "x.nii.gz").token)
            _wait(store, tokens[-1])
        folder, path = _case_folder(tmp_path)
        with pytest.raises(StoreFull) as full:
            store.submit(folder, path, "x.nii.gz")
        assert full.value.retry_after_s == 1
        assert [t for t in tokens if _known(store, t)] == tokens
        time.sleep(0.4)
        assert [t for t in tokens if _known(store, t)] == []
        store.submit(folder, path, "x.nii.gz")
    finally:
        store.close()


def test_drop_forgets_a_finished_case(tmp_path):
    store = CaseStore(_threshold_analyse)
    try:
        folder, path = _case_folder(tmp_path)
        token = store.submit(folder, path, "x.nii.gz").token
        _wait(store, token)
        assert store.drop(token) and not _known(store, token)
        assert not store.drop(token)
    finally:
        store.close()


def _known(store, token) -> bool:
    try:
        store.get(token)
        return True
    except KeyError:
        return False
