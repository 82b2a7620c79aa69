"""Benchmark the federated bundle's transfer: bytes sent per site and time to derive / rebuild, v1 vs v2.

The server derives a federated bundle (parent + a new 2 x 512 head + threshold) and sends it to every
site, which holds the parent already. Two bundle layouts:

* **v1** (``format_version`` 1): the whole ResNet-34 in ``classifier.safetensors``. The server's
  derive copied the nnU-Net folder and rewrote the 254 MB classifier; transport then sent the few
  changed tensors and the site rebuilt the classifier file from its parent's, byte-identical (the
  tensor-delta reconstruction). Measured with the code of commit ``--v1-rev`` (``shared/bundle.py``
  and ``shared/transport.py`` loaded from git), so the figures stay reproducible after that code
  was deleted.
* **v2**: the head in its own ``head.safetensors``. Derive hard-links every parent file but the head,
  manifest and signature; transport sends those and the site hard-links the rest from its parent.
  The parent is the ci bundle upgraded with ``upgrade_bundle``.
* **v2-from-v1**: today's code with a parent that was not upgraded: the child's backbone file is new,
  so it travels whole.

Per arm, ``--repeats`` times (fresh folders each time): derive the child (timed), pack it against the
parent (``bundle_to_records(child, parent=parent)``; bytes = ``records_size``, Flower's serialized
objects), serialize over Flower's wire format, and rebuild + verify it in a site cache that holds
the parent (``bundle_from_records``; timed, includes ``load_bundle``'s full hash check). Also the
bytes of sending the child whole (a site without the parent). Mean ± SD over repeats, after one
untimed warm-up repeat.

    python benchmarks/bench_transfer.py [--bundle DIR --public-key PEM --private-key PEM] [--arms v1,v2]

Writes ``benchmarks/results/transfer.json`` (arms already there and not re-run are kept).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

log = logging.getLogger("bench_transfer")
CI = Path("/tmp/ichfed-cache/bundle-root")
V1_REV = "7312d02"  # the last commit with the v1 derive and the tensor-delta transport
ARMS = {
    "v1": "v1 parent, v1 derive (copy nnU-Net, rewrite classifier), tensor-delta transport (old code)",
    "v2": "v2 parent, v2 derive (hard-link all but head), transport links files from the parent",
    "v2-from-v1": "v1 parent (not upgraded), v2 derive and transport: the new backbone file is sent whole",
}


_FLAT_LAYOUT = {  # the old flat ``shared.<name>`` -> where the module lives now
    "signing": "shared.security.keys", "verified": "shared.plumbing.verified", "config": "shared.plumbing.config",
    "errors": "shared.plumbing.errors", "files": "shared.plumbing.files", "atomic": "shared.plumbing.atomic",
    "protocol": "shared.federation.protocol", "head": "shared.models.head", "classifier": "shared.models.classifier",
    "model_policy": "shared.models.model_policy", "segment_model": "shared.models.segment_model",
    "bundle_manifest": "shared.bundle.manifest", "bundle_signing": "shared.bundle.signature",
    "bundle_create": "shared.bundle.create", "bundle_tar": "shared.bundle.tar",
}


def _module_at(rev: str, rel: str, name: str) -> types.ModuleType:
    """Import ``rel`` as it was at git ``rev``, as a sibling module of the package (relative imports work)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{rel}"], check=True, capture_output=True, text=True,
                         encoding="utf-8").stdout
    # That revision predates the sub-packages of shared/: its relative imports name the old flat modules.
    for old, new in _FLAT_LAYOUT.items():
        sys.modules.setdefault(f"shared.{old}", importlib.import_module(new))
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = name.rpartition(".")[0]
    mod.__file__ = str(ROOT / rel)
    sys.modules[name] = mod
    exec(compile(src, f"{rev}:{rel}", "exec"), mod.__dict__)
    return mod


def _wire(arrays, config):
    """The records as a site receives them: Flower's serialized objects, rebuilt from the bytes."""
    from flwr.app import RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    content = RecordDict({"a": arrays, "c": config})
    wire = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    back = inflate_object_from_contents(content.object_id, dict(wire))
    return back["a"], back["c"]


def _new_head(i: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(100 + i)
    return {"fc.weight": rng.normal(0, 0.05, (2, 512)).astype(np.float32), "fc.bias": rng.normal(0, 0.1, 2).astype(np.float32)}


def _stats(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs), "values": xs}


def run_arm(arm: str, parent_dir: Path, public: Path, private: Path, work: Path, repeats: int, v1_rev: str,
            warmup: int = 1) -> dict:
    """Derive, pack and rebuild ``repeats`` federated children of ``parent_dir`` with the ``arm`` code
    (after ``warmup`` untimed ones: the first derive reads the parent from a cold page cache)."""
    import torch

    from shared.bundle import load_bundle
    from shared.bundle.transport import records_size

    if arm == "v1":
        bundle_mod = _module_at(v1_rev, "shared/bundle.py", "shared._bench_v1_bundle")
        transport = _module_at(v1_rev, "shared/transport.py", "shared._bench_v1_transport")
    else:
        import shared.bundle as bundle_mod
        import shared.bundle.transport as transport
    parent = load_bundle(parent_dir, public)
    cache = work / f"{arm}-site" / "bundles"
    transport.seed_bundle(parent, cache)
    derive_s, rebuild_s, sent, whole = [], [], [], []
    for i in range(warmup + repeats):
        head = _new_head(i)
        out = work / f"{arm}-child-{i}"
        t0 = time.perf_counter()
        if arm == "v1":
            state = {k: v.clone() for k, v in parent.classifier_weights().items()}
            state.update({k: torch.from_numpy(v) for k, v in head.items()})
            bundle_mod.derive_bundle(parent, out, state, 0.4, version=f"fed{i}", private_key=private)
        else:
            from shared.models.head import Head

            bundle_mod.derive_bundle(parent, out, Head.from_state_dict(head), 0.4, version=f"fed{i}",
                                     private_key=private)
        derive_s.append(time.perf_counter() - t0)
        arrays, config = transport.bundle_to_records(out, parent=parent)
        sent.append(records_size(arrays, config))
        arrays, config = _wire(arrays, config)
        t0 = time.perf_counter()
        got = transport.bundle_from_records(arrays, config, cache, public)
        rebuild_s.append(time.perf_counter() - t0)
        assert got.name == load_bundle(out, public).hash
        whole.append(records_size(*transport.bundle_to_records(out)))
        shutil.rmtree(got)
        shutil.rmtree(out)
        log.info("%s repeat %d%s: derive %.2f s, rebuild %.2f s, %d bytes sent", arm, i, " (warm-up)" if i < warmup else "",
                 derive_s[-1], rebuild_s[-1], sent[-1])
        if i < warmup:
            for xs in (derive_s, rebuild_s, sent, whole):
                xs.pop()
    return {
        "parent_format_version": parent.manifest.format_version,
        "derive_seconds": _stats(derive_s),
        "rebuild_at_site_seconds": _stats(rebuild_s),
        "bytes_sent_per_site": _stats([float(s) for s in sent]),
        "bytes_whole_child": _stats([float(s) for s in whole]),
        "code": f"git {v1_rev}" if arm == "v1" else "working tree",
        "what": ARMS[arm],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=CI / "bundle", help="a v1 bundle (default: the ci bundle)")
    p.add_argument("--public-key", type=Path, default=CI / "bundle-keys" / "bundle_signing_key.pub.pem")
    p.add_argument("--private-key", type=Path, default=CI / "bundle-keys" / "bundle_signing_key.pem")
    p.add_argument("--arms", default="v1,v2,v2-from-v1")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats first (default: %(default)s)")
    p.add_argument("--v1-rev", default=V1_REV)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "transfer.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("shared").setLevel(logging.WARNING)
    command = "python benchmarks/bench_transfer.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = json.loads(args.out.read_text(encoding="utf-8")) if args.out.is_file() else {"arms": {}}
    with tempfile.TemporaryDirectory(prefix="bench_transfer.", dir=args.bundle.parent) as d:
        work = Path(d)
        for arm in args.arms.split(","):
            parent = args.bundle
            if arm == "v2":
                from shared.bundle import upgrade_bundle

                parent = upgrade_bundle(args.bundle, work / "parent-v2", args.public_key, private_key=args.private_key)
            result["arms"][arm] = run_arm(arm, parent, args.public_key, args.private_key, work, args.repeats, args.v1_rev,
                                       args.warmup)
            result["arms"][arm]["command"] = command
    result.update({
        "benchmark": "federated bundle transfer: bytes sent per site holding the parent, derive and rebuild time",
        "parent_bundle": str(args.bundle),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_1min_at_end": os.getloadavg()[0], "python": platform.python_version()},
    })
    from shared.plumbing.atomic import write_json

    write_json(args.out, result)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
