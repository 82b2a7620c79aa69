"""The site's copy of what it told the coordinator: every reply that left, in ``<state_dir>/outgoing/``.

``AuditMod`` sits outside ``client.privacy.privacy_mod`` in the ClientApp's mods, so it records exactly
what was sent: ``<time_ns>-<message type>.json`` with every record, key and value (``describe_content``).
An array of more than ``INLINE_VALUES`` values (a segmenter round's tensors, issue 24: a million values
would be tens of MB of JSON) is described by dtype, shape and the sha256 of its float bytes, and its
values go to ``<time_ns>-<message type>.npz`` beside it, named in the JSON (``values_file``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

INLINE_VALUES = 4096


def describe_content(content, large: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every record, key and value of a reply as plain JSON (arrays as nested lists). Arrays larger than
    ``INLINE_VALUES`` are described (dtype, shape, sha256) and, when ``large`` is given, put there under
    ``<record>/<key>`` instead of inline."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    out: dict[str, Any] = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            items = {}
            for k, arr in record.items():
                a = arr.numpy()
                item: dict[str, Any] = {"dtype": str(a.dtype), "shape": list(a.shape)}
                if a.size <= INLINE_VALUES:
                    item["values"] = a.tolist()
                else:
                    item["sha256"] = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                    if large is not None:
                        large[f"{name}/{k}"] = a
                items[k] = item
            out[name] = {"type": "ArrayRecord", "items": items}
        elif isinstance(record, MetricRecord):
            out[name] = {"type": "MetricRecord", "items": dict(record)}
        elif isinstance(record, ConfigRecord):
            out[name] = {"type": "ConfigRecord", "items": {
                k: (v.hex() if isinstance(v, bytes) else v) for k, v in record.items()}}
        else:
            out[name] = {"type": type(record).__name__, "items": repr(record)}
    return out


class AuditMod:
    """ClientApp mod keeping a copy of every reply that leaves the site in ``<folder>/<time_ns>-<type>.json``
    (large arrays in ``.npz`` beside it).

    It sits outside ``privacy_mod`` and so records exactly what was sent; a hospital can read
    what its site told the coordinator.
    """

    def __init__(self, folder_for: Any) -> None:
        # ``folder_for(context) -> Path | None``: the site's audit folder (it depends on the node).
        self.folder_for = folder_for

    def __call__(self, message, context, call_next):
        import json
        import time

        from shared.plumbing.atomic import atomic_path, write_text

        reply = call_next(message, context)
        folder = self.folder_for(context)
        if folder is None:
            return reply
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns()}-{message.metadata.message_type}"
        large: dict[str, np.ndarray] = {}
        entry = {"message_type": message.metadata.message_type, "time": time.time(),
                 "error": reply.error.reason if reply.has_error() else None,
                 "content": describe_content(reply.content, large) if reply.has_content() else None}
        if large:
            with atomic_path(folder / f"{stem}.npz", suffix=".npz") as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **large)
            entry["values_file"] = f"{stem}.npz"
        write_text(folder / f"{stem}.json", json.dumps(entry, indent=1))
        return reply
