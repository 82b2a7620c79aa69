"""Paper-scale training steps: the ResNet-34 at 200 x 200 x 20 and nnU-Net with the paper plans.

For sizing a paper-profile run (``ichfed bootstrap --profile paper``) on a GPU:

* classifier: Adam + NLL on (B, 1, 20, 200, 200) at batch 64 (the paper's), in fp32 and bf16
  autocast, and at batch 32 / 16; median step time, peak memory, and single-case inference;
* nnU-Net: one training iteration (SGD + fp16 autocast, deep supervision, batch and patch from the
  plans that nnU-Net's planner made for paper-scale images; see ``bench_paper_scale.py``).

Inputs are random tensors: step time does not depend on the values.

    python benchmarks/bench_training_step.py --device cuda --plans-dir build/bench_paper_scale/plans

Writes ``benchmarks/results/training_step_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from _common import device_info

PAPER_TRAIN_CASES = 262  # 90 % of the paper's 291 cases
PAPER_EPOCHS = 182


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    parser.add_argument("--plans-dir", type=Path, default=ROOT / "build" / "bench_paper_scale" / "plans",
                        help="folder with nnUNetPlans.json (from bench_paper_scale.py); skipped if absent")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from shared.plumbing.atomic import write_json

    dev = device_info(args.device)
    result = {"benchmark": "training_step", "device": dev, "classifier": _classifier(args.device, args.steps)}
    plans = args.plans_dir / "nnUNetPlans.json"
    result["nnunet"] = _nnunet(args.device, plans, args.steps * 3) if plans.is_file() else None
    out = args.out or ROOT / "benchmarks" / "results" / f"training_step_{dev['used']}.json"
    write_json(out, result)
    print(json.dumps(result, indent=1))
    return 0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _classifier(device: str, steps: int) -> dict:
    import math

    import torch

    from shared.models.classifier import build_model

    out = {}
    for bs, bf16 in ((64, False), (64, True), (32, False), (16, False)):
        key = f"batch{bs}_{'bf16' if bf16 else 'fp32'}"
        m = opt = x = None
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            m = build_model().to(device)
            opt = torch.optim.Adam(m.parameters(), lr=2.96e-4)
            x = torch.rand(bs, 1, 20, 200, 200, device=device)
            y = torch.randint(0, 2, (bs,), device=device)
            times = []
            for _ in range(steps):
                _sync(device)
                t = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    logits = m(x)
                loss = torch.nn.functional.nll_loss(torch.log_softmax(logits.float(), 1), y)
                loss.backward()
                opt.step()
                _sync(device)
                times.append(time.perf_counter() - t)
            step = statistics.median(times[1:] or times)
            out[key] = {"step_s": round(step, 4), "first_step_s": round(times[0], 3),
                        "paper_schedule_min": round(PAPER_EPOCHS * math.ceil(PAPER_TRAIN_CASES / bs) * step / 60, 1)}
            if device == "cuda":
                out[key]["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
        except torch.OutOfMemoryError:
            out[key] = {"oom": True}
        finally:
            del m, opt, x
    return out


def _nnunet(device: str, plans_path: Path, steps: int) -> dict:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(json.loads(plans_path.read_text(encoding="utf-8")))
    cm = pm.get_configuration("3d_fullres")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, enable_deep_supervision=True).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler(device, enabled=device == "cuda")
    x = torch.randn(cm.batch_size, 1, *cm.patch_size, device=device)
    y = torch.randint(0, 3, (cm.batch_size, *cm.patch_size), device=device)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, enabled=device == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x)[0], y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        times.append(time.perf_counter() - t)
    it = statistics.median(times[2:] or times)
    return {"batch": cm.batch_size, "patch": list(cm.patch_size), "iteration_s": round(it, 4),
            "epoch_250_iterations_s": round(250 * it, 1), "default_1000_epochs_h": round(1000 * 250 * it / 3600, 1)}


if __name__ == "__main__":
    sys.exit(main())
