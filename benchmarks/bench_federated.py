"""Federated-side benchmarks, written as JSON to ``benchmarks/results/``.

(a) ``finetune``: one fine-tuning round at a 12-case site. ichfed trains the head on the
    cached backbone embeddings (read back from the site's real on-disk ``CaseCache``); the
    naive alternative re-runs the frozen ResNet-34 on every crop in every epoch. Both use the
    same optimiser, seed and batch order, so their heads (and AUC on held-out cases) must agree.
(b) ``bytes``: what a site sends per round, measured on the real serialized Flower messages
    (every object Flower pushes: message, record dict, records, arrays, chunks), built by the
    ClientApp's own ``client.privacy.build_reply`` from real metrics.

Crops come from the synthetic cohort generator (``simulations.cohort.make_case``) through the
real ``shared.imaging.crop.make_crop`` with the reference mask, so no nnU-Net model is needed. The
backbone is a seeded ResNet-34, or a bundle's classifier with ``--bundle``.

    python benchmarks/bench_federated.py                       # both parts, demo crop, CPU
    python benchmarks/bench_federated.py --part bytes
    python benchmarks/bench_federated.py --crop paper --device cuda
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_federated")

RESULTS = Path(__file__).resolve().parent / "results"


def _crops() -> dict:
    """Crop size (x, y, z), spacing and cohort scale of each bootstrap profile (``paper``: 200x200x20)."""
    from server.bootstrap import RECIPES

    return {name: (r.crop.size_xyz, r.crop.spacing_mm, r.scale) for name, r in RECIPES.items()}


CROPS = _crops()


def synthetic_crops(n: int, seed: int, crop: str, profile: str = "charite-like", first_index: int = 0):
    """``n`` lesion crops with labels from the cohort generator; cases without a lesion are skipped."""
    from tqdm import tqdm

    from shared.imaging.crop import make_crop
    from shared.plumbing.config import CropSpec
    from simulations.cohort import make_case

    size, spacing, scale = CROPS[crop]
    spec = CropSpec(size_xyz=size, spacing_mm=spacing)
    crops, labels = [], []
    k = first_index
    with tqdm(total=n, desc=f"cases ({crop} crop)", unit="case", disable=None, file=sys.stderr) as bar:
        while len(crops) < n:
            case = make_case(profile, k, seed, scale=scale)
            image, mask = case.images()
            c = make_crop(image, mask, spec)
            k += 1
            if c.array is None:
                continue
            crops.append(c.array.astype(np.float32))
            labels.append(int(case.record.label))
            bar.update(1)
    return np.stack(crops), np.asarray(labels, np.int64), spec


def _backbone(args):
    import torch

    from shared.models.classifier import backbone_and_head, build_model

    if args.bundle:
        from shared.bundle import load_bundle

        model = load_bundle(args.bundle, args.public_key, allow_unsigned=args.public_key is None).build_classifier("cpu")
    else:
        torch.manual_seed(args.seed)
        model = build_model()
    model.eval()
    backbone, head = backbone_and_head(model)
    return backbone, head


def _auc(y, p) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(set(y.tolist())) == 2 else None


def naive_train(backbone, head0, crops, labels, *, epochs, learning_rate, batch_size, seed, device):
    """The loop ichfed avoids: the frozen ResNet runs on every batch of every epoch.

    Same optimiser, loss, seed and batch order as ``client.finetune.train_head``, so the only
    difference is where the features come from.
    """
    import torch

    from shared.models.head import Head

    n = len(labels)
    gen = torch.Generator().manual_seed(int(seed))
    layer = head0.to_linear(device)
    x = torch.as_tensor(crops[:, None], device=device)
    y = torch.as_tensor(labels, device=device)
    opt = torch.optim.Adam(layer.parameters(), lr=learning_rate)
    loss_fn = torch.nn.NLLLoss()
    layer.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            with torch.no_grad():
                feats = backbone(x[idx])
            opt.zero_grad()
            loss = loss_fn(torch.log_softmax(layer(feats), dim=1), y[idx])
            loss.backward()
            opt.step()
    return Head.from_linear(layer)


def bench_finetune(args) -> dict:
    """Part (a): cached-embedding round vs naive round on the same site."""
    import torch

    from client.cache import CachedCase, CaseCache
    from client.finetune import train_head
    from client.site_config import SiteConfig
    from shared.models.classifier import embed
    from shared.models.head import Head
    from shared.plumbing.device import pick_device

    device = pick_device(args.device)
    defaults = SiteConfig(name="bench", data_dir=Path("."), state_dir=Path("."))
    epochs = args.epochs or defaults.local_epochs
    lr, batch = defaults.learning_rate, defaults.batch_size

    t0 = time.perf_counter()
    train_x, train_y, spec = synthetic_crops(args.cases, args.seed, args.crop)
    test_x, test_y, _ = synthetic_crops(args.held_out, args.seed, args.crop, first_index=10_000)
    data_s = time.perf_counter() - t0

    backbone, head_layer = _backbone(args)
    backbone.to(device)
    head0 = Head.from_linear(head_layer)

    # One-time cost at the site: embed every case once and store it in the real cache.
    t0 = time.perf_counter()
    train_f = embed(backbone, train_x, device, batch_size=batch)
    embed_s = time.perf_counter() - t0
    test_f = embed(backbone, test_x, device, batch_size=batch)

    with tempfile.TemporaryDirectory() as tmp:
        cache = CaseCache(tmp)
        keys = [f"{i:064x}" for i in range(len(train_y))]
        for k, f in zip(keys, train_f):
            cache.put(k, CachedCase(lesion_found=True, features=f))
        _sync(device)
        t0 = time.perf_counter()
        cached_f = np.stack([cache.get(k).features for k in keys])
        cached = train_head(head0, cached_f, train_y, epochs=epochs, learning_rate=lr, batch_size=batch,
                            seed=args.seed, device=str(device))
        _sync(device)
        cached_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    naive = naive_train(backbone, head0, train_x, train_y, epochs=epochs, learning_rate=lr, batch_size=batch,
                        seed=args.seed, device=device)
    _sync(device)
    naive_s = time.perf_counter() - t0

    auc_cached = _auc(test_y, cached.head.p_neoplastic(test_f))
    auc_naive = _auc(test_y, naive.p_neoplastic(test_f))
    ratio = naive_s / cached_s
    return {
        "site_cases": int(len(train_y)),
        "held_out_cases": int(len(test_y)),
        "crop_zyx": list(train_x.shape[1:]),
        "crop_spec": spec.key(),
        "epochs": epochs,
        "batch_size": batch,
        "learning_rate": lr,
        "backbone": args.bundle or f"ResNet-34 (MONAI), seeded random init, seed {args.seed}",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "synthetic_data_s": round(data_s, 2),
        "embed_once_s": round(embed_s, 3),
        "round_cached_s": round(cached_s, 4),
        "round_naive_s": round(naive_s, 3),
        "speedup": round(ratio, 1),
        "target_speedup": 50,
        "auc_cached": auc_cached,
        "auc_naive": auc_naive,
        "auc_abs_diff": None if auc_cached is None or auc_naive is None else abs(auc_cached - auc_naive),
        "head_max_abs_diff": float(max(np.abs(cached.head.weight - naive.weight).max(),
                                       np.abs(cached.head.bias - naive.bias).max())),
        "pass": bool(ratio >= 50 and auc_cached is not None and auc_naive is not None
                     and abs(auc_cached - auc_naive) <= 0.01),
    }


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def _reply(content, message_type: str):
    """A reply message with the metadata Flower gives a real one (64-bit IDs, times, TTL)."""
    from flwr.app import Metadata
    from flwr.app.message.message import make_message

    rng = np.random.default_rng(0)
    meta = Metadata(
        run_id=int(rng.integers(2**62, 2**63 - 1)),
        message_id="",
        src_node_id=int(rng.integers(2**62, 2**63 - 1)),
        dst_node_id=1,
        reply_to_message_id=rng.bytes(32).hex(),
        group_id=str(3),
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return make_message(meta, content)


def bench_bytes(args) -> dict:
    """Part (b): bytes of the train, evaluate and final replies of one site."""
    from client.calibrate import site_threshold
    from client.evaluate import arm_metrics
    from client.features import Part
    from client.finetune import train_head
    from client.privacy import build_reply
    from shared.bundle.transport import message_size
    from shared.federation import protocol as P
    from shared.models.head import Head, HeadSet

    rng = np.random.default_rng(args.seed)
    n_ft, n_ho = 12, 48
    feats = rng.normal(size=(n_ft + n_ho, P.HEAD_FEATURES)).astype(np.float32)
    labels = (rng.random(n_ft + n_ho) < 0.4).astype(np.int64)
    feats[labels == 1, :8] += 1.0
    head0 = Head(weight=(rng.normal(size=(2, 512)) * 0.01).astype(np.float32), bias=np.zeros(2, np.float32))
    head = train_head(head0, feats[:n_ft], labels[:n_ft], epochs=5, learning_rate=1e-3, batch_size=16, seed=0).head
    ft = Part(feats[:n_ft], labels[:n_ft], 0, [0.8] * n_ft, [0.6] * n_ft, True)
    ho = Part(feats[n_ft:], labels[n_ft:], 1, [0.8] * n_ho, [0.6] * n_ho, True)
    # the replies a site with min_cases_for_metrics = 5 builds
    counts = {P.N_FINE_TUNE: ft.n, P.N_HELD_OUT: ho.n, P.N_UNUSABLE: 2}
    train = build_reply("hospital-site-01", head=HeadSet(head),
                        metrics={P.NUM_EXAMPLES: ft.n, P.TRAIN_LOSS: 0.41, **counts})
    t = site_threshold(ft.labels, head.p_neoplastic(ft.features), 0.5)
    p_ho = head.p_neoplastic(ho.features)
    m, r = arm_metrics(P.MODEL_GLOBAL, ho, p_ho, t.p, min_cases=5, threshold_reason=t.reason)
    evaluate = build_reply("hospital-site-01", metrics={**m, P.NUM_EXAMPLES: ho.n, **counts}, reasons=r)
    metrics, reasons = {P.NUM_EXAMPLES: ho.n, **counts}, {}
    for model in (P.MODEL_REFERENCE, P.MODEL_LOCAL, P.MODEL_FEDERATED):
        m, r = arm_metrics(model, ho, p_ho, t.p, min_cases=5, threshold_reason=t.reason)
        metrics.update(m), reasons.update(r)
    final = build_reply("hospital-site-01", metrics=metrics, reasons=reasons, bundle_hash="ab" * 32)
    sizes = {
        "train_reply": message_size(_reply(train, P.TRAIN)),
        "evaluate_reply": message_size(_reply(evaluate, P.EVALUATE)),
        "final_reply": message_size(_reply(final, P.QUERY_FINAL)),
        "bundle_ack_reply": message_size(_reply(build_reply("hospital-site-01", P.STATUS_HAVE, bundle_hash="ab" * 32),
                                                P.QUERY_BUNDLE)),
    }
    per_round = sizes["train_reply"] + sizes["evaluate_reply"]
    return {
        "bytes": sizes,
        "per_round_bytes": per_round,
        "head_payload_bytes": int(head.weight.nbytes + head.bias.nbytes),
        "limit_bytes": 16 * 1024,
        "pass": bool(per_round <= 16 * 1024),
        "measured_on": "sum of len(deflate()) of every Flower object of the reply message (flwr "
                       "get_all_nested_objects), i.e. what the SuperNode pushes to the SuperLink",
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts and write ``benchmarks/results/federated.json``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", default="finetune,bytes", help="comma-separated: finetune, bytes")
    p.add_argument("--crop", choices=sorted(CROPS), default="demo")
    p.add_argument("--cases", type=int, default=12, help="fine-tune cases at the site (default 12)")
    p.add_argument("--held-out", type=int, default=24, help="held-out cases for the AUC check")
    p.add_argument("--epochs", type=int, default=None, help="local epochs (default: SiteConfig's)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--bundle", type=Path, default=None, help="use this bundle's classifier as the backbone")
    p.add_argument("--public-key", type=Path, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "federated.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    from shared.plumbing.atomic import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [s.strip() for s in args.part.split(",") if s.strip()]
    result: dict = {
        "benchmark": "federated",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "seed": args.seed,
    }
    if "finetune" in parts:
        result["finetune"] = bench_finetune(args)
        log.info("fine-tuning round: cached %.4f s vs naive %.2f s (%.0fx); AUC %s vs %s",
                 result["finetune"]["round_cached_s"], result["finetune"]["round_naive_s"],
                 result["finetune"]["speedup"], result["finetune"]["auc_cached"], result["finetune"]["auc_naive"])
    if "bytes" in parts:
        result["bytes"] = bench_bytes(args)
        log.info("bytes per round: %d (train %d + evaluate %d)", result["bytes"]["per_round_bytes"],
                 result["bytes"]["bytes"]["train_reply"], result["bytes"]["bytes"]["evaluate_reply"])
    write_json(args.out, result)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
