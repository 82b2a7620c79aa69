"""nnU-Net v2 segmentation: raw-dataset export, real training, real inference, model-folder import.

The slow tests share the session fixture ``tiny_nnunet_model`` (tests/conftest.py): the nnU-Net inside
``tiny_bundle``, planned, preprocessed and trained by nnU-Net (96 iterations of the ``ci`` trainer) on the
bootstrap's 11 training cases at ``ci`` scale (3.6 mm in-plane). The fast tests need no training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared.imaging.ingest import read_image
from shared.imaging.sitedata import read_mask, read_site
from shared.models.segment import Segmenter
from shared.models.segment_model import copy_model_folder, validate_model_folder
from shared.plumbing.errors import IchfedError
from shared.training.segment_dataset import export_dataset
from shared.training.segment_train import train
from simulations.cohort import write_cohort


def _dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float:
    p, t = pred == label, truth == label
    return 2.0 * float((p & t).sum()) / max(1, int(p.sum() + t.sum()))


# ---------------------------------------------------------------------------- export (fast)


@pytest.fixture()
def small_site(tmp_path) -> Path:
    site = tmp_path / "site"
    write_cohort("charite-like", 3, 0, site, scale="ci")
    return site


def test_export_dataset_writes_nnunet_raw_layout(small_site, tmp_path):
    site = read_site(small_site)
    folder = export_dataset(site, tmp_path / "raw", dataset_id=7, name="ICH")

    assert folder == tmp_path / "raw" / "Dataset007_ICH"
    meta = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    assert meta["channel_names"] == {"0": "CT"}
    assert meta["labels"] == {"background": 0, "ICH": 1, "PHE": 2}
    assert meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 3
    for case in site.cases:
        image = sitk.ReadImage(str(folder / "imagesTr" / f"{case.case_id}_0000.nii.gz"))
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case.case_id}.nii.gz"))
        source = read_image(case.image_path).image
        assert image.GetPixelID() == sitk.sitkFloat32
        assert label.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(source))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label),
                                      sitk.GetArrayFromImage(read_mask(case.mask_path, source)))
        assert image.GetSpacing() == pytest.approx(source.GetSpacing())
        assert label.GetOrigin() == pytest.approx(image.GetOrigin())
    # nothing half-written is left beside the dataset
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["Dataset007_ICH"]


def test_export_dataset_skips_cases_without_mask_and_replaces_old_export(small_site, tmp_path):
    site = read_site(small_site)
    first = export_dataset(site, tmp_path / "raw")
    without_mask = dataclasses.replace(site.cases[0], mask_path=None)
    site2 = dataclasses.replace(site, cases=[without_mask, *site.cases[1:]])

    again = export_dataset(site2, tmp_path / "raw")

    assert again == first
    assert json.loads((again / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 2
    assert not (again / "labelsTr" / f"{without_mask.case_id}.nii.gz").exists()
    assert not (again / "imagesTr" / f"{without_mask.case_id}_0000.nii.gz").exists()


def test_export_dataset_bad_input_gives_one_line_errors(small_site, tmp_path):
    site = read_site(small_site)
    no_masks = dataclasses.replace(site, cases=[dataclasses.replace(c, mask_path=None) for c in site.cases])
    with pytest.raises(IchfedError, match="no case has an ICH/PHE mask") as e:
        export_dataset(no_masks, tmp_path / "raw")
    assert "\n" not in str(e.value)

    (tmp_path / "raw2" / "Dataset501_Other").mkdir(parents=True)
    with pytest.raises(IchfedError, match="id 501 is already used by Dataset501_Other"):
        export_dataset(site, tmp_path / "raw2")
    with pytest.raises(IchfedError, match="dataset_id"):
        export_dataset(site, tmp_path / "raw3", dataset_id=1000)
    with pytest.raises(IchfedError, match="name"):
        export_dataset(site, tmp_path / "raw3", name="ICH PHE")


def test_train_rejects_bad_arguments_before_running_nnunet(small_site, tmp_path):
    with pytest.raises(IchfedError, match="recipe: must be one of"):
        train(tmp_path, 501, "fast", tmp_path / "work")
    with pytest.raises(IchfedError, match="no nnU-Net raw dataset with id 501"):
        train(tmp_path, 501, "ci", tmp_path / "work")
    export_dataset(read_site(small_site), tmp_path / "raw")
    # nnU-Net's folds 0-4 need at least 5 cases; this dataset has 3
    with pytest.raises(IchfedError, match="fold '0' needs 'all' or 0-4 with at least 5 cases"):
        train(tmp_path / "raw", 501, "paper", tmp_path / "work", folds=(0,))
    assert not (tmp_path / "work").exists()  # nothing started


def test_validate_model_folder_names_what_is_missing(tmp_path):
    with pytest.raises(IchfedError, match="model folder not found"):
        validate_model_folder(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "dataset.json").write_text("{}", encoding="utf-8")
    with pytest.raises(IchfedError) as e:
        validate_model_folder(tmp_path / "m")
    assert str(e.value) == f"{tmp_path / 'm'}: not an nnU-Net model folder (missing plans.json, fold_*/)"


# ---------------------------------------------------------------------------- real nnU-Net (slow)


@pytest.mark.slow
def test_trained_folder_is_complete_and_loads_without_pickle(tiny_nnunet_model):
    import torch

    model = tiny_nnunet_model.model_dir
    assert validate_model_folder(model) == model
    dataset = json.loads((model / "dataset.json").read_text(encoding="utf-8"))
    assert dataset["labels"] == {"background": 0, "ICH": 1, "PHE": 2}
    plans = json.loads((model / "plans.json").read_text(encoding="utf-8"))
    assert "3d_fullres" in plans["configurations"]
    ckpt = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=True)
    assert ckpt["trainer_name"] == "nnUNetTrainer_ichfedCI"
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
    from shared.training.nnunet_trainers import nnUNetTrainer_ichfedCI

    assert ckpt["current_epoch"] == nnUNetTrainer_ichfedCI.EPOCHS  # nnU-Net stores epochs done
    assert all(isinstance(v, torch.Tensor) for v in ckpt["network_weights"].values())
    # the trainer ran nnU-Net's own training loop: its log and progress plot are there
    fold = tiny_nnunet_model.results_dir / "nnUNetTrainer_ichfedCI__nnUNetPlans_ichfedSmall__3d_fullres" / "fold_all"
    assert list(fold.glob("training_log_*.txt")) and (fold / "progress.png").is_file()


@pytest.fixture(scope="module")
def segmenter(tiny_nnunet_model) -> Segmenter:
    return Segmenter(tiny_nnunet_model.model_dir, device="cpu")


def _held_out(tiny_nnunet_model):
    site = read_site(tiny_nnunet_model.site_dir)
    return [c for c in site.cases if c.case_id in tiny_nnunet_model.test_ids]


@pytest.mark.slow
def test_prediction_keeps_geometry_and_label_set(tiny_nnunet_model, segmenter):
    case = _held_out(tiny_nnunet_model)[0]
    image = read_image(case.image_path).image
    # an oblique, shifted grid: the output must carry exactly the input's geometry
    angle = np.deg2rad(12.0)
    image.SetDirection((np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((-101.5, 37.25, -12.0))

    labels = segmenter.predict(image)

    assert segmenter.use_mirroring is False  # CPU default
    assert labels.GetPixelID() == sitk.sitkUInt8
    assert labels.GetSize() == image.GetSize()
    assert labels.GetSpacing() == image.GetSpacing()
    assert labels.GetOrigin() == image.GetOrigin()
    assert labels.GetDirection() == image.GetDirection()
    assert set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) <= {0, 1, 2}


@pytest.mark.slow
def test_trained_model_finds_the_hemorrhage_on_held_out_cases(tiny_nnunet_model, segmenter):
    """A bound that tests the pipeline, not the luck of a 96-iteration training (issue 25).

    The fixture's nnU-Net (the ``ci`` trainer: 96 iterations on the bootstrap's 11 training cases) is not
    trained to a plateau, and its weights differ between machines (docs/segmentation.md, "Reproducibility"):
    held-out ICH Dice per case has ranged from 0.20 to 0.65 across machines and thread counts. A pipeline
    that loses the axis order, the geometry or the label values scores about 0, and so does the same
    prediction scored against the lesion moved to the other hemisphere, which this test checks too.
    """
    dices, controls = [], []
    for case in _held_out(tiny_nnunet_model):
        image = read_image(case.image_path).image
        truth = sitk.GetArrayFromImage(read_mask(case.mask_path, image))
        pred = sitk.GetArrayFromImage(segmenter.predict(image))
        dices.append(_dice(pred, truth, 1))
        controls.append(_dice(pred, truth[:, :, ::-1], 1))  # what a lost left-right axis would score
    assert len(dices) >= 5
    assert np.median(dices) > 0.25, dices
    assert np.median(dices) > np.median(controls) + 0.2, (dices, controls)


@pytest.mark.slow
def test_imports_nnunet_results_folder_as_is(tiny_nnunet_model, segmenter):
    # nnU-Net's own folder: checkpoints with optimizer state, numpy logs and a torch.device inside
    imported = validate_model_folder(tiny_nnunet_model.results_dir)
    assert imported.name == "nnUNetTrainer_ichfedCI__nnUNetPlans_ichfedSmall__3d_fullres"
    case = _held_out(tiny_nnunet_model)[0]
    image = read_image(case.image_path).image

    direct = Segmenter(imported, device="cpu").predict(image)

    np.testing.assert_array_equal(sitk.GetArrayFromImage(direct), sitk.GetArrayFromImage(segmenter.predict(image)))


@pytest.mark.slow
def test_broken_model_folders_give_one_line_errors(tiny_nnunet_model, tmp_path):
    import torch

    good = copy_model_folder(tiny_nnunet_model.model_dir, tmp_path / "good")
    ckpt = good / "fold_all" / "checkpoint_final.pth"

    def broken(name: str) -> Path:
        return Path(shutil.copytree(good, tmp_path / name))

    def expect(path: Path, pattern: str, load=validate_model_folder) -> None:
        with pytest.raises(IchfedError, match=pattern) as e:
            load(path)
        assert "\n" not in str(e.value)

    m = broken("no_plans")
    (m / "plans.json").unlink()
    expect(m, "missing plans.json")

    m = broken("no_checkpoint")
    (m / "fold_all" / "checkpoint_final.pth").unlink()
    expect(m, r"no fold_\*/checkpoint_final.pth")

    m = broken("truncated")
    data = ckpt.read_bytes()
    (m / "fold_all" / "checkpoint_final.pth").write_bytes(data[: len(data) // 2])
    expect(m, "not loadable without pickle")

    m = broken("pickled_code")
    payload = torch.load(ckpt, weights_only=True)
    payload["hook"] = os.system  # pickled by reference; a full unpickler would import and keep it
    torch.save(payload, m / "fold_all" / "checkpoint_final.pth")
    expect(m, "not loadable without pickle")

    m = broken("labels")
    meta = json.loads((m / "dataset.json").read_text(encoding="utf-8"))
    meta["labels"] = {"background": 0, "ICH": 1, "PHE": 2, "IVH": 3}
    (m / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    expect(m, "labels must be 0 background, 1 ICH, 2 PHE")

    m = broken("network_class")
    plans = json.loads((m / "plans.json").read_text(encoding="utf-8"))
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "os.system"
    (m / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    expect(m, "is not one nnU-Net.s planners emit")

    m = broken("wrong_width")
    plans = json.loads((m / "plans.json").read_text(encoding="utf-8"))
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [2 * f for f in kwargs["features_per_stage"]]
    (m / "plans.json").write_text(json.dumps(plans), encoding="utf-8")
    expect(m, "weights do not fit the network in plans.json", load=lambda p: Segmenter(p, device="cpu"))


@pytest.mark.slow
def test_predict_rejects_a_2d_image(segmenter):
    with pytest.raises(IchfedError, match="expected a 3D single-channel CT"):
        segmenter.predict(sitk.Image(32, 32, sitk.sitkFloat32))


def test_labels_on_air_or_bone_are_removed():
    """A predicted label is only kept on soft tissue: air (-1000 HU) and bone (+1000 HU) lose it."""
    from shared.models.segment import gate_soft_tissue

    hu = np.array([-1000.0, -150.0, -90.0, 20.0, 70.0, 190.0, 250.0, 1000.0], dtype=np.float32)
    labels = np.array([2, 2, 2, 2, 1, 1, 1, 1], dtype=np.uint8)
    gated = gate_soft_tissue(labels, hu)
    assert gated.tolist() == [0, 0, 2, 2, 1, 1, 0, 0]
    assert labels.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]  # the input is not modified
