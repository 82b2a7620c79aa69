"""BatchNorm running statistics of the classifier backbone: re-estimate, apply, store, read.

A scanner, protocol or population shift moves the distribution of a backbone's intermediate
activations; the BatchNorm layers then normalise with the reference site's means and variances
and every downstream feature is off. AdaBN (Li et al., 2016) and FedBN (Li et al., 2021) keep
the learned weights and replace only the BatchNorm running mean and variance by those of the
new site's own inputs. In ichfed the statistics are estimated on a site's crops (fine-tune and
unlabelled cases, never the held-out split), kept in the site overlay and never sent.

:class:`NormStats` holds one ``running_mean`` and ``running_var`` per BatchNorm layer, under the
layer's name in the backbone (the same names as in the classifier's state dict). They are stored
as safetensors (no pickle) and validated against the backbone before they are applied: exact
set of names, shapes, finite values and positive variances.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)

_SUFFIXES = ("running_mean", "running_var")
# Batch statistics of one case are degenerate (variance over a single crop's voxels only).
MIN_BATCH = 2


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-layer BatchNorm statistics: ``tensors["<layer>.running_mean" | "<layer>.running_var"]`` float32."""

    tensors: dict[str, np.ndarray]
    n_cases: int

    def sha256(self) -> str:
        """A content hash over the sorted names and float32 bytes (independent of file layout)."""
        h = hashlib.sha256()
        for k in sorted(self.tensors):
            h.update(k.encode() + b"\0" + np.ascontiguousarray(self.tensors[k], np.float32).tobytes())
        return h.hexdigest()


def batchnorm_layers(module) -> dict[str, Any]:
    """``{name: layer}`` of every BatchNorm layer of ``module`` (its ``named_modules`` names)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return {name: m for name, m in module.named_modules() if isinstance(m, _BatchNorm)}


def reestimate(module, crops: np.ndarray, device, batch_size: int = 32) -> None:
    """Replace every BatchNorm's running mean/variance in ``module`` by their average over ``crops``.

    ``module`` is a classifier or its backbone taking (N, 1, z, y, x). It runs in train mode
    without gradients with cumulative averaging (momentum None), then each layer's momentum is
    restored and the module is put back in eval mode. Weights are untouched. Batches of fewer
    than ``MIN_BATCH`` crops are skipped; with no usable batch the statistics are unchanged.
    """
    import torch

    arr = np.asarray(crops, dtype=np.float32)
    if arr.ndim != 4:
        raise IchfedError(f"crops: expected an array of shape (N, z, y, x), got shape {arr.shape}")
    batches = [arr[s: s + batch_size] for s in range(0, len(arr), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < MIN_BATCH:  # fold a lone last crop into the previous batch
        batches[-2:] = [np.concatenate(batches[-2:])]
    batches = [b for b in batches if len(b) >= MIN_BATCH]
    if not batches:
        log.warning("BatchNorm statistics not re-estimated: fewer than %d crops", MIN_BATCH)
        return
    bns = list(batchnorm_layers(module).values())
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    module.to(device).train()
    try:
        with torch.no_grad():
            for b in batches:
                module(torch.from_numpy(np.ascontiguousarray(b)).unsqueeze(1).to(device))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        module.eval()


def estimate(backbone, crops: np.ndarray, device="cpu", batch_size: int = 32) -> NormStats:
    """The site's statistics for ``backbone`` from ``crops`` (N, z, y, x); ``backbone`` is not changed."""
    import copy

    work = copy.deepcopy(backbone)
    reestimate(work, crops, device, batch_size)
    return NormStats(tensors=extract(work), n_cases=int(len(crops)))


def extract(module) -> dict[str, np.ndarray]:
    """The current running statistics of every BatchNorm layer of ``module`` as float32 arrays."""
    out = {}
    for name, bn in batchnorm_layers(module).items():
        for s in _SUFFIXES:
            out[f"{name}.{s}"] = getattr(bn, s).detach().cpu().numpy().astype(np.float32).copy()
    return out


def apply(module, stats: NormStats, where: str = "norm stats") -> None:
    """Load ``stats`` into ``module``'s BatchNorm layers, after checking they fit it exactly."""
    import torch

    check(stats.tensors, module, where)
    layers = batchnorm_layers(module)
    with torch.no_grad():
        for key, value in stats.tensors.items():
            name, suffix = key.rsplit(".", 1)
            buf = getattr(layers[name], suffix)
            buf.copy_(torch.from_numpy(np.asarray(value, np.float32)).to(buf.device, buf.dtype))


def check(tensors: dict[str, Any], module, where: str) -> None:
    """``IchfedError("<where>: ...")`` unless ``tensors`` holds exactly ``module``'s running stats,
    with the same shapes, finite values and positive variances."""
    layers = batchnorm_layers(module)
    expected = {f"{n}.{s}": tuple(getattr(bn, s).shape) for n, bn in layers.items() for s in _SUFFIXES}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise IchfedError(f"{where}: do not fit this backbone (missing {missing[:2]}, unexpected {extra[:2]})")
    for key, shape in expected.items():
        v = np.asarray(tensors[key])
        if tuple(v.shape) != shape:
            raise IchfedError(f"{where}: {key} has shape {list(v.shape)}, expected {list(shape)}")
        if not np.all(np.isfinite(v)):
            raise IchfedError(f"{where}: {key} holds non-finite values")
        if key.endswith("running_var") and np.any(v <= 0):
            raise IchfedError(f"{where}: {key} holds a variance <= 0")


def to_bytes(stats: NormStats) -> bytes:
    """safetensors bytes of ``stats`` (the case count in the metadata)."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in stats.tensors.items()}
    return save(tensors, metadata={"n_cases": str(int(stats.n_cases))})


def from_bytes(data: bytes, where: str) -> NormStats:
    """Decode safetensors bytes (never pickle) into ``NormStats``; ``IchfedError`` when malformed."""
    import json
    import struct

    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        meta = json.loads(data[8: 8 + n]).get("__metadata__") or {}
        n_cases = int(meta.get("n_cases", "0"))
    except (SafetensorError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise IchfedError(f"{where}: not a valid safetensors file ({(str(e).splitlines() or ['?'])[0][:120]})") from None
    for k, v in tensors.items():
        if v.dtype != np.float32:
            raise IchfedError(f"{where}: {k} must be float32, got {v.dtype}")
    return NormStats(tensors=dict(tensors), n_cases=n_cases)


def save(stats: NormStats, path: str | Path) -> str:
    """Write ``stats`` atomically (owner-only: they are derived from patients' images) to ``path``;
    returns the file's sha256."""
    from shared.plumbing.atomic import write_private_bytes

    data = to_bytes(stats)
    write_private_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load(path: str | Path, sha256: str) -> NormStats:
    """Read ``path``, check its sha256 against ``sha256`` and decode it; ``IchfedError`` otherwise."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise IchfedError(f"{p}: cannot read the site's normalisation statistics ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IchfedError(f"{p}: sha256 does not match the site overlay (changed or corrupted)")
    return from_bytes(data, str(p))
