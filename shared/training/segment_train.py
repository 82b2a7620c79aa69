"""Training the segmenter: nnU-Net's fingerprint extractor, planner, preprocessor and trainer.

They run in a subprocess whose environment carries ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` / ``nnUNet_extTrainer``, so the caller's environment is never changed. Recipes
(``RECIPES``): ``paper`` (nnU-Net defaults, 3d_fullres), ``demo`` and ``ci`` (short trainers from
``shared.training.nnunet_trainers`` on narrower plans derived from the planner's own). The raw dataset comes
from ``shared.training.segment_dataset``; the trained folder is copied by ``shared.models.segment_model``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, Sequence

from shared.models.segment_model import copy_model_folder
from shared.plumbing.device import pick_device
from shared.plumbing.errors import IchfedError
from shared.plumbing.files import read_json
from shared.training.segment_dataset import FILE_ENDING

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SegmenterRecipe:
    """How ``train`` runs nnU-Net: trainer, plans and their knobs, chosen by name (``ci``, ``demo``, ``paper``).

    ``width_divisor`` > 1 derives plans ``plans_identifier`` from the planner's default plans with
    every stage that many times narrower (see ``shared.training.nnunet_trainers.derive_small_plans``).
    ``n_proc_da`` sets ``nnUNet_n_proc_DA`` for training (0 = augmentation in the training process,
    which is deterministic given the seed); ``None`` keeps nnU-Net's default. ``compile`` sets
    ``nnUNet_compile``; compiling costs more than it saves on a run of a few hundred iterations.
    ``gpu_memory_target_gb`` is passed to nnU-Net's planner (default 8 GB): a smaller budget makes
    the planner itself choose a smaller patch and a matching network topology.
    """

    trainer: str
    plans_identifier: str
    width_divisor: int = dataclasses.field(default=1, metadata={"range": (1, 64)})
    configuration: str = "3d_fullres"
    n_proc_da: int | None = None
    compile: bool | None = None
    gpu_memory_target_gb: float | None = None
    epochs: int = 1000


RECIPES: dict[str, SegmenterRecipe] = {
    "paper": SegmenterRecipe(trainer="nnUNetTrainer", plans_identifier="nnUNetPlans"),
    # demo scale (128 x 128 x 28 voxels): a 0.5 GB budget gives a 16 x 96 x 80 patch instead of the
    # whole image, ~3x less work per iteration on a CPU
    "demo": SegmenterRecipe(trainer="nnUNetTrainer_ichfedDemo", plans_identifier="nnUNetPlans_ichfedSmall",
                            width_divisor=4, n_proc_da=0, compile=False, gpu_memory_target_gb=0.5, epochs=40),
    "ci": SegmenterRecipe(trainer="nnUNetTrainer_ichfedCI", plans_identifier="nnUNetPlans_ichfedSmall",
                          width_divisor=4, n_proc_da=0, compile=False, epochs=8),
}


def _dataset(raw_root: Path, dataset_id: int, recipe: str) -> tuple[Path, int]:
    """Check the recipe name and find the raw dataset; no side effects."""
    if recipe not in RECIPES:
        raise IchfedError(f"recipe: must be one of {', '.join(map(repr, RECIPES))}, got {recipe!r}")
    dataset = _find_raw_dataset(Path(raw_root).resolve(), dataset_id)
    return dataset, _count_raw_cases(dataset)


def _workspace(raw_root: Path, dataset_id: int, recipe: str, work_dir: Path, num_threads: int | None,
               num_processes: int | None) -> tuple[dict[str, Path], dict[str, str], dict[str, Any]]:
    """Create the nnU-Net folders under ``work_dir``; return them, the subprocess environment and common spec."""
    spec = RECIPES[recipe]
    cpus = os.cpu_count() or 1
    num_threads = num_threads or int(os.environ.get("OMP_NUM_THREADS") or cpus)
    num_processes = num_processes or max(1, min(4, cpus))
    work_dir = Path(work_dir).resolve()
    dirs = {name: work_dir / name for name in ("nnUNet_preprocessed", "nnUNet_results", "ext_trainers", "logs")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    _write_trainer_shim(dirs["ext_trainers"])
    env = _nnunet_env(Path(raw_root).resolve(), dirs, num_threads)
    common = {"dataset_id": dataset_id, "configuration": spec.configuration, "num_threads": num_threads,
              "plans_identifier": spec.plans_identifier, "num_processes": num_processes}
    return dirs, env, common


def plan(raw_root: Path, dataset_id: int, recipe: Literal["ci", "demo", "paper"], work_dir: Path,
         seed: int = 0, *, num_threads: int | None = None, num_processes: int | None = None) -> Path:
    """Run nnU-Net's fingerprint extractor, experiment planner and preprocessor for ``recipe``.

    Returns the preprocessed dataset folder (``work_dir/nnUNet_preprocessed/DatasetXXX_*``), which
    holds ``dataset.json`` and the recipe's plans file (``RECIPES[recipe].plans_identifier``).
    """
    dataset, n_cases = _dataset(raw_root, dataset_id, recipe)
    dirs, env, common = _workspace(raw_root, dataset_id, recipe, work_dir, num_threads, num_processes)
    return _run_plan(recipe, dataset, n_cases, dirs, env, common, seed)


def _run_plan(recipe: str, dataset: Path, n_cases: int, dirs: dict[str, Path], env: dict[str, str],
              common: dict[str, Any], seed: int) -> Path:
    spec = RECIPES[recipe]
    log.info("nnU-Net %s: planning and preprocessing %s (%d cases)", recipe, dataset.name, n_cases)
    plan_env = dict(env, nnUNet_def_n_proc=str(common["num_processes"]))
    _run_nnunet("plan", {**common, "seed": seed, "stage": "plan", "width_divisor": spec.width_divisor,
                         "gpu_memory_target_gb": spec.gpu_memory_target_gb}, plan_env, dirs["logs"])
    return dirs["nnUNet_preprocessed"] / dataset.name


def train(raw_root: Path, dataset_id: int, recipe: Literal["ci", "demo", "paper"], work_dir: Path,
          seed: int = 0, *, folds: Sequence[int | str] | None = None, device: str = "auto",
          num_threads: int | None = None, num_processes: int | None = None) -> Path:
    """Plan, preprocess and train nnU-Net on ``raw_root/DatasetXXX_*``; return the trained model folder.

    ``work_dir`` receives ``nnUNet_preprocessed/``, ``nnUNet_results/``, ``logs/`` and ``model/``
    (the returned folder: ``dataset.json``, ``plans.json``, ``fold_*/checkpoint_final.pth`` with
    slim checkpoints, ready for a bundle). ``folds`` defaults to ``('all',)`` for ``ci``/``demo`` and
    for fewer than 5 cases (nnU-Net's folds 0-4 need 5), else nnU-Net's 5-fold ``(0, 1, 2, 3, 4)``.
    ``num_threads`` (torch threads in training) defaults to ``$OMP_NUM_THREADS`` or the CPU count;
    ``num_processes`` (planning/preprocessing workers) to min(4, CPU count).
    """
    dataset, n_cases = _dataset(raw_root, dataset_id, recipe)
    spec = RECIPES[recipe]
    torch_device = pick_device(device)
    if folds is None:
        folds = ("all",) if recipe != "paper" or n_cases < 5 else (0, 1, 2, 3, 4)
    folds = tuple(str(f) for f in folds)
    for f in folds:
        if f != "all" and not (f in ("0", "1", "2", "3", "4") and n_cases >= 5):
            raise IchfedError(f"folds: fold {f!r} needs 'all' or 0-4 with at least 5 cases (have {n_cases})")

    dirs, env, common = _workspace(raw_root, dataset_id, recipe, work_dir, num_threads, num_processes)
    _run_plan(recipe, dataset, n_cases, dirs, env, common, seed)

    train_env = dict(env)
    if spec.n_proc_da is not None:
        train_env["nnUNet_n_proc_DA"] = str(spec.n_proc_da)
    if spec.compile is not None:
        train_env["nnUNet_compile"] = "true" if spec.compile else "false"
    log.info("nnU-Net %s: training %s fold(s) %s on %s with %s", recipe, spec.configuration,
             ",".join(folds), torch_device.type, spec.trainer)
    _run_nnunet("train", {**common, "seed": seed, "stage": "train", "trainer": spec.trainer, "folds": list(folds),
                          "device": torch_device.type}, train_env, dirs["logs"],
                progress_total=spec.epochs * len(folds))

    results = (dirs["nnUNet_results"] / dataset.name
               / f"{spec.trainer}__{spec.plans_identifier}__{spec.configuration}")
    return copy_model_folder(results, work_dir / "model", folds=folds)


def _find_raw_dataset(raw_root: Path, dataset_id: int) -> Path:
    found = sorted(raw_root.glob(f"Dataset{int(dataset_id):03d}_*")) if raw_root.is_dir() else []
    found = [p for p in found if p.is_dir()]
    if not found:
        raise IchfedError(f"{raw_root}: no nnU-Net raw dataset with id {dataset_id} (expected Dataset{int(dataset_id):03d}_<name>/)")
    if len(found) > 1:
        raise IchfedError(f"{raw_root}: several datasets with id {dataset_id}: {', '.join(p.name for p in found)}")
    return found[0]


def _count_raw_cases(dataset: Path) -> int:
    meta = read_json(dataset / "dataset.json")
    n = len(list((dataset / "labelsTr").glob(f"*{meta.get('file_ending', FILE_ENDING)}")))
    if n == 0:
        raise IchfedError(f"{dataset / 'labelsTr'}: no training labels")
    return n


def _write_trainer_shim(folder: Path) -> None:
    # nnU-Net imports every module in an nnUNet_extTrainer folder by its bare name; this one module
    # re-exports our trainers so that their real home stays the ``shared`` package.
    from shared.plumbing.atomic import write_text

    write_text(folder / "ichfed_trainers.py",
               "# Generated by ichfed: exposes its trainers to nnU-Net via nnUNet_extTrainer.\n"
               "from shared.training.nnunet_trainers import nnUNetTrainer_ichfedCI, nnUNetTrainer_ichfedDemo  # noqa: F401\n")


def _nnunet_env(raw_root: Path, dirs: dict[str, Path], num_threads: int) -> dict[str, str]:
    env = dict(os.environ)
    project_root = str(Path(__file__).resolve().parents[2])
    ext = str(dirs["ext_trainers"])
    env.update({
        "nnUNet_raw": str(raw_root),
        "nnUNet_preprocessed": str(dirs["nnUNet_preprocessed"]),
        "nnUNet_results": str(dirs["nnUNet_results"]),
        "nnUNet_extTrainer": os.pathsep.join(filter(None, [ext, os.environ.get("nnUNet_extTrainer")])),
        "PYTHONPATH": os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(num_threads),
        "MPLBACKEND": "Agg",
    })
    return env


def _run_nnunet(stage: str, spec: dict, env: dict[str, str], log_dir: Path, progress_total: int | None = None) -> None:
    """Run one stage in a subprocess; its output goes to ``log_dir/<stage>.log`` and the DEBUG log."""
    from tqdm import tqdm

    out_log = logging.getLogger(f"{__name__}.nnunet")
    log_path = log_dir / f"{stage}.log"
    cmd = [sys.executable, "-c", "from shared.training.nnunet_trainers import main; main()", json.dumps(spec)]
    last = ""
    bar = tqdm(total=progress_total, desc=f"nnU-Net {stage}", unit="epoch", disable=None if progress_total else True,
               file=sys.stderr)
    with open(log_path, "w", encoding="utf-8", buffering=1) as f, bar:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, encoding="utf-8")
        assert proc.stdout is not None
        try:
            for raw in proc.stdout:
                # tqdm bars of nnU-Net arrive as carriage-return updates; keep the last one only
                line = raw.rstrip("\n").split("\r")[-1].rstrip()
                f.write(line + "\n")
                if not line:
                    continue
                last = line
                body = line.split(": ", 1)[-1] if line[:2] == "20" else line  # drop nnU-Net's timestamp
                if body.startswith("Epoch ") and body[6:].strip().isdigit():
                    bar.update(1)
                if body.startswith(("Epoch time", "Pseudo dice", "train_loss")):
                    out_log.info("%s", body)
                else:
                    out_log.debug("%s", line)
            rc = proc.wait()
        except BaseException:
            # interrupted (Ctrl-C, a failing log handler): do not leave nnU-Net training in the background
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        raise IchfedError(f"nnU-Net {stage} failed (exit code {rc}): {last or 'no output'} (full log: {log_path})")
