"""Versioned, atomic checkpoints of the global head and the run's history, and resume.

After round r the server writes, in ``<state_dir>/checkpoints/``::

    round-000r.safetensors   the global head record after round r (``HeadSet``: main and fold heads)
    round-000r.json          run identity, the round history so far, sha256 of the .safetensors
    latest.json              {"round": r, ...} -- written last: a checkpoint exists once this says so

Every file is written atomically, so a server killed at any moment leaves the previous
checkpoint intact; ``--resume`` continues after the last complete one. Weights are safetensors
(no pickle). The run info and history are stored as the JSON of ``server.records`` (the run
reads them back with ``RunInfo.from_dict`` / ``RoundRecord.from_dict``). Checkpoints live in the
state folder, not in a run's folder, so the next run (``resume=true``) finds them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from shared.models.head import HeadSet
from shared.plumbing.atomic import atomic_path, write_json
from shared.plumbing.errors import IchfedError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Checkpoint:
    """One complete checkpoint: the round, the global heads, and the run info and history as JSON."""

    round: int
    heads: HeadSet
    run: dict[str, Any]
    history: list[dict[str, Any]]
    path: Path


class CheckpointStore:
    """The checkpoints of one run's state folder."""

    def __init__(self, state_dir: str | os.PathLike) -> None:
        self.dir = Path(state_dir) / "checkpoints"

    def _stem(self, round_: int) -> Path:
        return self.dir / f"round-{round_:04d}"

    def exists(self) -> bool:
        return (self.dir / "latest.json").is_file()

    def save(self, round_: int, heads: HeadSet, run: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> Path:
        """Write the checkpoint of ``round_`` (weights, then its JSON, then ``latest.json``);
        ``run`` and ``history`` are JSON (``RunInfo.to_dict``, ``RoundRecord.to_dict``)."""
        from safetensors.numpy import save_file

        stem = self._stem(round_)
        weights = stem.with_suffix(".safetensors")
        with atomic_path(weights) as tmp:
            save_file(heads.to_arrays(), str(tmp),
                      metadata={"round": str(round_), "bundle_hash": str(run.get("bundle_hash", ""))})
        digest = hashlib.sha256(weights.read_bytes()).hexdigest()
        write_json(stem.with_suffix(".json"), {"round": round_, "weights": weights.name, "weights_sha256": digest,
                                               "run": dict(run), "history": list(history)})
        write_json(self.dir / "latest.json", {"round": round_, "checkpoint": stem.with_suffix(".json").name})
        log.info("checkpoint: round %d written to %s", round_, weights)
        return weights

    def latest(self) -> Checkpoint | None:
        """The last complete checkpoint, verified against its recorded sha256; None if there is none."""
        from safetensors.numpy import load_file

        pointer = self.dir / "latest.json"
        if not pointer.is_file():
            return None
        try:
            meta_path = self.dir / json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            weights = self.dir / meta["weights"]
            if hashlib.sha256(weights.read_bytes()).hexdigest() != meta["weights_sha256"]:
                raise IchfedError(f"{weights}: does not match the sha256 recorded in {meta_path.name}")
            heads = HeadSet.from_arrays(load_file(str(weights)))
        except (OSError, ValueError, KeyError) as e:
            raise IchfedError(f"{pointer}: checkpoint unreadable ({e})") from None
        return Checkpoint(round=int(meta["round"]), heads=heads, run=meta["run"], history=meta["history"],
                          path=weights)
