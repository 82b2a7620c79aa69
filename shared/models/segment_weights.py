"""The weights of an nnU-Net segmenter as the one currency of segmenter federation (issue 24).

``SegmenterWeights`` is what a segmenter round sends and returns: the network's tensors of the
trainable part (``TRAINABLE_PARTS``: ``decoder`` or ``all``), by canonical name, float32. It is the
segmenter's counterpart of ``shared.models.head.HeadSet``: the server's sent and aggregated weights,
a site's update, the privacy allow-list's check and the federated bundle's checkpoint all use it.

Canonical names: nnU-Net's ``PlainConvUNet`` registers some modules twice (the decoder holds the
encoder, each conv block lists its conv and norm again in ``all_modules``), so its ``state_dict``
holds 240 keys for about 80 distinct tensors. Only the distinct ones travel, under the name
``named_parameters()`` gives them first (``encoder.stages.0.0.convs.0.conv.weight``); a checkpoint is
written back from the network itself, aliases and all (``SegmenterNetwork``).

``SegmenterNetwork`` is one model folder's network, built from its (verified) ``plans.json`` with the
allow-listed classes (``shared.models.model_policy``), its checkpoint read without pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from shared.plumbing.errors import IchfedError

TRAINABLE_PARTS = ("decoder", "all")
# A trained nnU-Net's weights stay within a few units; 1e4 is far outside any honest update and
# still leaves float32 sums of many sites finite.
MAX_WEIGHT_ABS = 1e4
# What one reply may carry: the paper recipe's full-width 3d_fullres network has ~31M values.
MAX_VALUES = 100_000_000
MAX_TENSORS = 5_000
_NAME_RE = re.compile(r"^(encoder|decoder)(\.[A-Za-z0-9_]+){1,12}$")


def part_names(names, part: str) -> tuple[str, ...]:
    """The canonical tensor names of ``part`` (``decoder``: everything under ``decoder.``; ``all``)."""
    if part not in TRAINABLE_PARTS:
        raise IchfedError(f"segmenter-trainable: must be one of {', '.join(TRAINABLE_PARTS)}, got {part!r}")
    return tuple(n for n in names if part == "all" or n.startswith("decoder."))


@dataclasses.dataclass(frozen=True)
class SegmenterWeights:
    """Named float32 arrays of a segmenter's trainable part (see the module doc)."""

    arrays: Mapping[str, np.ndarray]

    @property
    def n_values(self) -> int:
        return int(sum(a.size for a in self.arrays.values()))

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.arrays))

    @classmethod
    def from_record(cls, record) -> SegmenterWeights:
        """From a Flower ``ArrayRecord``; an entry that is not a numeric array is an ``IchfedError``."""
        arrays: dict[str, np.ndarray] = {}
        if len(record) > MAX_TENSORS:
            raise IchfedError(f"segmenter record holds {len(record)} tensors, more than {MAX_TENSORS}")
        for key in record.keys():
            try:
                a = record[key].numpy()
            except Exception as e:  # a malformed array is the sender's fault
                raise IchfedError(f"segmenter tensor {key!r}: not an array ({type(e).__name__})") from None
            if a.dtype != np.float32:
                raise IchfedError(f"segmenter tensor {key!r}: must be float32, got {a.dtype}")
            arrays[str(key)] = a
        return cls(arrays)

    def to_record(self):
        """As a Flower ``ArrayRecord`` (sorted keys, float32)."""
        from flwr.app import Array, ArrayRecord

        return ArrayRecord({k: Array(np.ascontiguousarray(self.arrays[k], dtype=np.float32)) for k in self.keys()})

    def digest(self) -> str:
        """sha256 over names, shapes and float32 bytes: bitwise identity (zero-change, replays)."""
        h = hashlib.sha256()
        for k in self.keys():
            a = np.ascontiguousarray(self.arrays[k], dtype=np.float32)
            h.update(f"{k}|{a.shape}|".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def distance(self, other: SegmenterWeights) -> float:
        """L2 distance over every tensor (the update norm); both must hold the same names and shapes."""
        total = 0.0
        for k in self.keys():
            d = self.arrays[k].astype(np.float64) - np.asarray(other.arrays[k], np.float64)
            total += float(np.dot(d.ravel(), d.ravel()))
        return float(np.sqrt(total))

    def problem(self, like: SegmenterWeights | None = None) -> str | None:
        """Why these are not a segmenter's weights (None: they are): well-formed names, float32, finite,
        within ``MAX_WEIGHT_ABS``, bounded in size, and with ``like`` exactly its names and shapes."""
        if not self.arrays:
            return "segmenter record holds no tensors"
        if len(self.arrays) > MAX_TENSORS or self.n_values > MAX_VALUES:
            return f"segmenter record holds {len(self.arrays)} tensors / {self.n_values} values, more than allowed"
        if like is not None:
            if set(self.arrays) != set(like.arrays):
                missing, extra = sorted(set(like.arrays) - set(self.arrays)), sorted(set(self.arrays) - set(like.arrays))
                return f"segmenter tensors differ from those sent (missing {missing[:2]}, extra {extra[:2]})"
            for k in self.keys():
                if tuple(self.arrays[k].shape) != tuple(like.arrays[k].shape):
                    return f"segmenter tensor {k!r} has shape {tuple(self.arrays[k].shape)}, " \
                           f"{tuple(like.arrays[k].shape)} was sent"
        for k in self.keys():
            a = self.arrays[k]
            if not _NAME_RE.match(k):
                return f"segmenter tensor name {k[:80]!r} is not a network parameter name"
            if a.dtype != np.float32:
                return f"segmenter tensor {k!r} must be float32, got {a.dtype}"
            if not np.isfinite(a).all():
                return f"segmenter tensor {k!r} holds {int((~np.isfinite(a)).sum())} NaN or infinite value(s)"
            if a.size and float(np.abs(a).max()) > MAX_WEIGHT_ABS:
                return f"segmenter tensor {k!r} holds a value beyond {MAX_WEIGHT_ABS:g}"
        return None


class SegmenterNetwork:
    """The network of an nnU-Net model folder (one fold), for reading and writing its weights.

    ``file_hashes`` (a bundle's verified manifest, paths relative to ``model_dir``) makes every file
    be read once from bytes checked against it. ``fold``: the fold to use; default the first the
    ``Segmenter`` would use (fold 0 of a five-fold model, else ``all``).
    """

    def __init__(self, model_dir: Path, file_hashes: dict[str, str] | None = None, fold: str | None = None):
        from nnunetv2.utilities.label_handling.label_handling import (
            determine_num_input_channels,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        from shared.models.model_policy import check_plans
        from shared.models.segment_model import (
            CHECKPOINT,
            load_checkpoint,
            network_from_plans,
            validate_model_folder,
            verified_reader,
        )
        from shared.plumbing.files import read_json

        self.model_dir = validate_model_folder(model_dir, check_weights=False)
        folds = sorted(p.parent.name[5:] for p in self.model_dir.glob(f"fold_*/{CHECKPOINT}"))
        numbered = sorted((f for f in folds if f != "all"), key=int)
        self.fold = str(fold) if fold is not None else (numbered[0] if numbered else "all")
        if self.fold not in folds:
            raise IchfedError(f"{self.model_dir}: no fold_{self.fold}/{CHECKPOINT}")
        read = verified_reader(self.model_dir, file_hashes)
        self.plans = read_json(self.model_dir / "plans.json", read("plans.json"))
        self.dataset_json = read_json(self.model_dir / "dataset.json", read("dataset.json"))
        check_plans(self.plans, self.model_dir / "plans.json")
        meta = load_checkpoint(self.model_dir / f"fold_{self.fold}" / CHECKPOINT, read(f"fold_{self.fold}/{CHECKPOINT}"))
        self.meta = {k: v for k, v in meta.items() if k != "network_weights"}
        plans_manager = PlansManager(self.plans)
        conf = plans_manager.get_configuration(meta["configuration"])
        n_in = determine_num_input_channels(plans_manager, conf, self.dataset_json)
        n_out = plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads
        self.network = network_from_plans(meta["trainer_name"], plans_manager, conf, n_in, n_out)
        try:
            self.network.load_state_dict(meta["network_weights"])
        except RuntimeError as e:
            raise IchfedError(f"{self.model_dir}/fold_{self.fold}: weights do not fit the network in plans.json "
                              f"({str(e).splitlines()[0][:160]})") from None
        self._tensors = self._canonical()

    def _canonical(self) -> dict[str, Any]:
        tensors = dict(self.network.named_parameters())
        tensors.update({k: b for k, b in self.network.named_buffers() if b.is_floating_point()})
        return tensors

    def tensors(self) -> dict[str, Any]:
        """Every canonical tensor of the network (parameters and floating buffers), by name."""
        return dict(self._tensors)

    def names(self, part: str = "all") -> tuple[str, ...]:
        """Canonical tensor names of ``part`` (``TRAINABLE_PARTS``), in the network's order."""
        return part_names(list(self._tensors), part)

    def weights(self, part: str = "all") -> SegmenterWeights:
        """The network's current tensors of ``part``."""
        return SegmenterWeights({k: self._tensors[k].detach().cpu().numpy().astype(np.float32, copy=True)
                                 for k in self.names(part)})

    def load(self, weights: SegmenterWeights) -> None:
        """Set the network's tensors named in ``weights`` (checked: names, shapes, finite, bounded)."""
        import torch

        like = SegmenterWeights({k: self._tensors[k].detach().cpu().numpy() for k in weights.arrays
                                 if k in self._tensors})
        unknown = sorted(set(weights.arrays) - set(self._tensors))
        if unknown:
            raise IchfedError(f"segmenter weights: {unknown[0]!r} is not a tensor of {self.model_dir}'s network")
        why = weights.problem(like)
        if why:
            raise IchfedError(f"segmenter weights: {why}")
        with torch.no_grad():
            for k, a in weights.arrays.items():
                self._tensors[k].copy_(torch.from_numpy(np.asarray(a, np.float32)))

    def checkpoint(self) -> dict[str, Any]:
        """The slim checkpoint of the network as it is (``shared.models.segment_model``'s format)."""
        return {
            "network_weights": {k: v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
            "trainer_name": self.meta["trainer_name"],
            "init_args": {"configuration": self.meta["configuration"], "fold": self.fold},
            "inference_allowed_mirroring_axes": self.meta["inference_allowed_mirroring_axes"],
            "current_epoch": self.meta["current_epoch"],
        }

    def checkpoint_bytes(self) -> bytes:
        """``checkpoint()`` serialised with ``torch.save`` (loads with ``weights_only=True``)."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save(self.checkpoint(), buf)
        return buf.getvalue()
