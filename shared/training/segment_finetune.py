"""A short nnU-Net fine-tune of a received segmenter on a site's masked cases (issue 24).

nnU-Net does the work, through its own API, in a subprocess (as ``shared.training.segment_train``):

1. **No re-planning.** The cases are exported as a raw dataset (``segment_dataset.export_dataset``)
   and preprocessed with nnU-Net's preprocessor under the *bundle's* ``plans.json`` (copied under
   the name ``FINETUNE_PLANS``; only its ``dataset_name`` changes), so spacing, patch, normalisation
   and topology are exactly those the segmenter was trained with. Preprocessing is done once per
   model and case set (``prepared.json`` holds its digest); later rounds only train.
2. **Training.** ``nnunetv2.run.run_training`` with ``nnUNetTrainer_ichfedFineTune``
   (``shared.training.nnunet_trainers``): nnU-Net's data loading, augmentation and loss, starting
   from the given weights (all of them, segmentation layers included), only the trainable part
   (``decoder`` or ``all``) optimised, fold ``all``.
3. **Result.** The final checkpoint is read without pickle and its trainable part returned as
   ``shared.models.segment_weights.SegmenterWeights``, with the last epoch's training loss and
   nnU-Net's pseudo Dice on the training patches (aggregates over the cases).

Layout of ``work_dir``: ``raw/``, ``nnUNet_preprocessed/``, ``nnUNet_results/``, ``ext_trainers/``,
``logs/finetune.log`` (all nnU-Net printed), ``start.safetensors``, ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from shared.models.segment_weights import (
    TRAINABLE_PARTS,
    SegmenterNetwork,
    SegmenterWeights,
)
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

DATASET_ID = 990
DATASET_NAME = "SiteFineTune"
FINETUNE_PLANS = "ichfedBundlePlans"
TRAINER = "nnUNetTrainer_ichfedFineTune"


@dataclasses.dataclass(frozen=True)
class FineTuneSpec:
    """One fine-tune: the trainable part, ``epochs`` x ``iterations`` nnU-Net iterations, AdamW's
    learning rate (poly schedule) and the seed. The defaults are the demo-scale round
    (docs/federation.md, "Segmenter rounds": ~2-4 min for 12 cases on 2 CPU cores)."""

    trainable: str = "all"
    epochs: int = dataclasses.field(default=10, metadata={"range": (1, 1000)})
    iterations: int = dataclasses.field(default=15, metadata={"range": (1, 10_000)})
    learning_rate: float = dataclasses.field(default=1e-3, metadata={"range": (1e-7, 1.0)})
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_PARTS:
            raise IchfedError(f"segmenter-trainable: must be one of {', '.join(TRAINABLE_PARTS)}, got {self.trainable!r}")
        for f in dataclasses.fields(self):
            lo, hi = f.metadata.get("range", (None, None))
            if lo is not None and not lo <= getattr(self, f.name) <= hi:
                raise IchfedError(f"segmenter-{f.name.replace('_', '-')}: must be in [{lo:g}, {hi:g}], got {getattr(self, f.name)!r}")


@dataclasses.dataclass(frozen=True)
class FineTuneResult:
    """The trained part and what the site may say about the training (aggregates only)."""

    weights: SegmenterWeights
    train_loss: float
    train_dice: float | None  # mean pseudo Dice over the foreground labels, last epoch, training patches
    n_cases: int
    iterations: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class _Cases:
    """What ``export_dataset`` reads: a root (for messages) and cases with masks."""

    root: Path
    cases: list


def fine_tune(model_dir: Path, cases: Sequence, work_dir: Path, spec: FineTuneSpec, *,
              start: SegmenterWeights | None = None, file_hashes: dict[str, str] | None = None,
              device: str = "cpu", num_threads: int | None = None, num_processes: int = 1) -> FineTuneResult:
    """Fine-tune the segmenter of ``model_dir`` on ``cases`` (``CaseRef`` with masks); see the module doc.

    ``start``: weights to start from (the round's global segmenter; any part of the network),
    over the model folder's own. ``file_hashes``: the bundle's verified hashes of the model files.
    """
    from shared.plumbing.atomic import write_json
    from shared.plumbing.device import pick_device

    cases = [c for c in cases if c.mask_path is not None]
    if not cases:
        raise IchfedError("segmenter fine-tune: no case with a mask")
    t0 = time.perf_counter()
    work = Path(work_dir).resolve()
    network = SegmenterNetwork(model_dir, file_hashes)
    if start is not None:
        network.load(start)
    conf = network.meta["configuration"]
    prepared, digest = _prepare(network, cases, work)
    _write_start(network, work / "start.safetensors")
    (work / "summary.json").unlink(missing_ok=True)
    results = work / "nnUNet_results"
    shutil.rmtree(results, ignore_errors=True)  # a fresh trainer output every round
    threads = num_threads or int(os.environ.get("OMP_NUM_THREADS") or 1)
    env = _env(work, threads, spec, num_processes)
    stage = {"dataset_id": DATASET_ID, "configuration": conf, "device": pick_device(device).type,
             "seed": spec.seed, "num_threads": threads, "num_processes": num_processes, "preprocess": not prepared}
    _run(stage, env, work / "logs" / "finetune.log")
    if not prepared:  # preprocessed now: later rounds on the same cases only train
        write_json(work / "prepared.json", {"digest": digest})
    trained = SegmenterNetwork(_trained_folder(work, conf), fold="all")
    summary = json.loads((work / "summary.json").read_text(encoding="utf-8"))
    dice = summary.get("pseudo_dice") or []
    result = FineTuneResult(weights=trained.weights(spec.trainable), train_loss=float(summary["train_loss"]),
                            train_dice=float(sum(dice) / len(dice)) if dice else None, n_cases=len(cases),
                            iterations=int(summary["iterations"]), seconds=time.perf_counter() - t0)
    log.info("segmenter fine-tune: %d cases, %d iterations (%s), loss %.4f, pseudo Dice %s, %.0f s", len(cases),
             result.iterations, spec.trainable, result.train_loss,
             "n/a" if result.train_dice is None else f"{result.train_dice:.3f}", result.seconds)
    return result


def _prepare(network: SegmenterNetwork, cases: list, work: Path) -> tuple[bool, str]:
    """Export the cases and write the bundle's plans for nnU-Net; (True when already preprocessed, digest)."""
    from shared.plumbing.atomic import write_json
    from shared.training.segment_dataset import dataset_folder_name, export_dataset

    name = dataset_folder_name(DATASET_ID, DATASET_NAME)
    digest = _digest(network, cases)
    marker = work / "prepared.json"
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("digest") == digest \
            and (work / "nnUNet_preprocessed" / name / f"{FINETUNE_PLANS}.json").is_file():
        return True, digest
    marker.unlink(missing_ok=True)
    for sub in ("raw", "nnUNet_preprocessed"):
        shutil.rmtree(work / sub, ignore_errors=True)
    export_dataset(_Cases(Path(cases[0].image_path).parent, list(cases)), work / "raw", DATASET_ID, DATASET_NAME)
    raw_json = json.loads((work / "raw" / name / "dataset.json").read_text(encoding="utf-8"))
    if raw_json.get("labels") != network.dataset_json.get("labels"):
        raise IchfedError(f"segmenter fine-tune: the site's labels {raw_json.get('labels')} are not the model's "
                          f"{network.dataset_json.get('labels')}")
    pre = work / "nnUNet_preprocessed" / name
    pre.mkdir(parents=True)
    plans = dict(network.plans, dataset_name=name, plans_name=FINETUNE_PLANS)
    write_json(pre / f"{FINETUNE_PLANS}.json", plans)
    write_json(pre / "dataset.json", raw_json)
    fingerprint = network.model_dir / "dataset_fingerprint.json"  # nnU-Net copies it beside its results
    write_json(pre / "dataset_fingerprint.json", json.loads(fingerprint.read_text(encoding="utf-8"))
               if fingerprint.is_file() else {})
    return False, digest


def _digest(network: SegmenterNetwork, cases: list) -> str:
    """The plans and the cases (paths, sizes, times) the preprocessed data was made from."""
    h = hashlib.sha256(json.dumps(network.plans, sort_keys=True).encode())
    for c in sorted(cases, key=lambda c: c.case_id):
        for p in (c.image_path, c.mask_path):
            st = os.stat(p)
            h.update(f"{c.case_id}|{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _write_start(network: SegmenterNetwork, path: Path) -> None:
    from safetensors.torch import save_file

    from shared.plumbing.atomic import atomic_path

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in network.tensors().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _trained_folder(work: Path, configuration: str) -> Path:
    from shared.training.segment_dataset import dataset_folder_name

    return work / "nnUNet_results" / dataset_folder_name(DATASET_ID, DATASET_NAME) / \
        f"{TRAINER}__{FINETUNE_PLANS}__{configuration}"


def _env(work: Path, threads: int, spec: FineTuneSpec, num_processes: int) -> dict[str, str]:
    from shared.plumbing.atomic import write_text
    from shared.training.segment_train import _nnunet_env

    dirs = {name: work / name for name in ("nnUNet_preprocessed", "nnUNet_results", "ext_trainers", "logs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    # nnU-Net finds the trainer by class name in the nnUNet_extTrainer folders (see segment_train)
    write_text(dirs["ext_trainers"] / "ichfed_finetune_trainers.py",
               "# Generated by ichfed: exposes its fine-tune trainer to nnU-Net via nnUNet_extTrainer.\n"
               f"from shared.training.nnunet_trainers import {TRAINER}  # noqa: F401\n")
    env = _nnunet_env(work / "raw", dirs, threads)
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_compile": "false", "nnUNet_def_n_proc": str(num_processes),
                "ICHFED_FINETUNE": json.dumps({
                    "start": str(work / "start.safetensors"), "trainable": spec.trainable, "epochs": spec.epochs,
                    "iterations": spec.iterations, "learning_rate": spec.learning_rate,
                    "summary": str(work / "summary.json")})})
    return env


def _run(stage: dict[str, Any], env: dict[str, str], log_path: Path) -> None:
    """The subprocess (``main``); its output goes to ``log_path`` and the DEBUG log."""
    out_log = logging.getLogger(f"{__name__}.nnunet")
    cmd = [sys.executable, "-c", "from shared.training.segment_finetune import main; main()", json.dumps(stage)]
    last = ""
    with open(log_path, "w", encoding="utf-8", buffering=1) as f:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, encoding="utf-8")
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n").split("\r")[-1].rstrip()  # keep the last state of a tqdm bar
                f.write(line + "\n")
                if line:
                    last = line
                    out_log.debug("%s", line)
            rc = proc.wait()
        except BaseException:
            proc.kill()  # never leave nnU-Net training behind
            proc.wait()
            raise
    if rc != 0:
        raise IchfedError(f"nnU-Net fine-tune failed (exit code {rc}): {last or 'no output'} (full log: {log_path})")


def main() -> None:
    """``python -c 'from shared.training.segment_finetune import main; main()' STAGE_JSON`` (the subprocess)."""
    import random

    import numpy as np
    import torch

    spec = json.loads(sys.argv[1])
    seed = int(spec["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(int(spec["num_threads"]))
    if spec["preprocess"]:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

        preprocess([int(spec["dataset_id"])], plans_identifier=FINETUNE_PLANS,
                   configurations=(spec["configuration"],), num_processes=[int(spec["num_processes"])])
    from nnunetv2.run.run_training import run_training

    from shared.plumbing.determinism import deterministic_training

    with deterministic_training(int(spec["num_threads"])):
        run_training(str(spec["dataset_id"]), spec["configuration"], "all", trainer_class_name=TRAINER,
                     plans_identifier=FINETUNE_PLANS, device=torch.device(spec["device"]))
