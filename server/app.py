"""The Flower ServerApp (thin wiring): distribute the bundle, run head FedAvg with checkpoints,
write the federated bundle, run the final cross-site evaluation and write the report.

Settings come from the run config (``pyproject.toml`` ``[tool.flwr.app.config]``, overridable
with ``flwr run . <federation> --run-config "num-server-rounds=5 resume=true"``), or are passed
directly by the simulation runner through ``build_server_app(settings)``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

from .admission import SiteLedger, admit_metrics_reply
from .checkpoint import CheckpointStore
from .distribution import distribute_bundle, log_refusal, reply_status, send
from .report import write_report
from .robust import make_strategy
from .settings import ServerSettings, settings_from_run_config
from .strategy import metrics_from_reply, pooled_metrics, site_name

log = logging.getLogger(__name__)


def build_server_app(settings: ServerSettings | None = None):
    """A ServerApp; without ``settings`` they are read from the run config."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        s = settings or settings_from_run_config(dict(context.run_config))
        if s.mode == "stats":
            from .stats_run import run_stats

            run_stats(grid, s)
        else:
            run_federation(grid, s)

    return app


# -- the run -------------------------------------------------------------------------------


def run_federation(grid, settings: ServerSettings) -> dict[str, Any]:
    """The whole run on ``grid``; returns the report dict (also written to ``settings.reports``)."""
    from flwr.app import ConfigRecord

    from shared.bundle import load_bundle

    t0 = time.perf_counter()
    bundle = load_bundle(settings.bundle_path, settings.public_key)
    store = CheckpointStore(settings.state_dir)
    run_info = {
        "bundle_hash": bundle.hash,
        "bundle_name": bundle.manifest.name,
        "bundle_version": bundle.manifest.version,
        "num_rounds": settings.num_rounds,
        "min_sites": settings.min_sites,
        "max_update_norm": settings.max_update_norm,
        "seed": settings.seed,
        "aggregation": settings.aggregation,
        "max_site_share": settings.max_site_share,
        "resumed_from_round": 0,
    }
    start_round, history = 0, []
    head = initial_heads(bundle, settings.cross_fit_folds)
    run_info["cross_fit_folds"] = settings.cross_fit_folds
    if store.exists():
        if not settings.resume:
            raise IchfedError(
                f"{store.dir}: holds checkpoints of an earlier run; resume it (resume=true / --resume) "
                "or choose a new state folder"
            )
        ckpt = store.latest()
        if ckpt.run.get("bundle_hash") != bundle.hash:
            raise IchfedError(f"{ckpt.path}: checkpoint is for bundle {ckpt.run.get('bundle_hash', '?')[:12]}, "
                              f"not {bundle.hash[:12]}")
        if set(ckpt.head) != set(head):
            raise IchfedError(f"{ckpt.path}: checkpoint holds {P.cross_fit_folds(ckpt.head)} cross-fit fold heads, "
                              f"the run config asks for {settings.cross_fit_folds} ('cross-fit-folds')")
        start_round, history, head = ckpt.round, ckpt.history, ckpt.head
        run_info["resumed_from_round"] = start_round
        log.info("resuming after round %d from %s", start_round, ckpt.path)
    elif settings.resume:
        log.warning("resume requested but %s holds no checkpoint; starting at round 1", store.dir)

    ledger = SiteLedger()  # one name and one fine-tune count per authenticated node, for the whole run
    ready, distribution = distribute_bundle(grid, bundle, settings, ledger)
    run_info["sites"] = sorted(ready.values())
    run_info["site_nodes"] = {name: node for node, name in sorted(ready.items())}

    from .run_progress import RunProgress, reply_counts

    progress = RunProgress(settings.state_dir, settings.num_rounds, first_round=start_round + 1)
    progress.event("bundle_distributed", sites=len(ready), **{k: len(v) for k, v in distribution.items()})

    def checkpoint(round_: int, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
        store.save(round_, arrays, run_info, strategy.history)
        progress.round_finished(round_, record)

    strategy = make_strategy(settings.aggregation, trim_fraction=settings.trim_fraction,
                             min_sites=settings.min_sites, max_update_norm=settings.max_update_norm,
                             max_site_share=settings.max_site_share, ledger=ledger,
                             ready_nodes=ready.keys(), round_offset=start_round, history=history,
                             on_round_end=checkpoint)
    strategy.progress = progress
    remaining = settings.num_rounds - start_round
    if remaining > 0:
        cfg = ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_NUM_ROUNDS: settings.num_rounds,
                            P.CFG_SEED: settings.seed})
        strategy.start(grid=grid, initial_arrays=_record(head), num_rounds=remaining,
                       timeout=settings.round_timeout_s, train_config=cfg, evaluate_config=ConfigRecord(dict(cfg)))
        head = strategy.last_arrays
    final_bundle = write_federated_bundle(bundle, head, strategy.history, settings)
    final = final_evaluation(grid, ready, head, bundle, final_bundle, settings, ledger)
    progress.event("final_evaluation", pooled_auc={m: (final["pooled"].get(m) or {}).get("pooled_auc")
                                                   for m in P.FINAL_ARMS}, **reply_counts(final["sites"]))
    report = {
        "run": {**run_info, "wall_s": round(time.perf_counter() - t0, 2)},
        "distribution": distribution,
        "rounds": strategy.history,
        "final": final,
        "final_bundle": final_bundle["info"] if final_bundle else None,
    }
    paths = write_report(report, settings.reports)
    progress.close(report=str(paths["markdown"]), wall_s=report["run"]["wall_s"])
    log.info("run finished: report at %s", paths["markdown"])
    return report


def initial_heads(bundle, cross_fit_folds: int) -> dict[str, np.ndarray]:
    """The first round's head record: the bundle's head, and as many copies as cross-fit folds
    (``fold<k>.weight`` / ``fold<k>.bias``; each site trains fold head k without its fold-k cases)."""
    from shared.models.head import Head

    head = Head.from_bundle(bundle)
    return {k: v for prefix in ("", *map(P.fold_prefix, range(cross_fit_folds)))
            for k, v in head.to_arrays(prefix).items()}


def _record(head: dict[str, np.ndarray]):
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in head.items()})


def write_federated_bundle(bundle, head: dict[str, np.ndarray], history: list[dict[str, Any]],
                           settings: ServerSettings) -> dict[str, Any] | None:
    """Derive and sign the bundle carrying the federated head (None without a signing key).

    Its threshold is the case-weighted mean of the thresholds the sites calibrated for this very
    head in the last round; each site still keeps and uses its own.
    """
    if settings.signing_key is None:
        log.info("no signing-key configured: the federated head stays in the checkpoints, no bundle is written")
        return None
    from shared.bundle import derive_bundle, load_bundle
    from shared.models.head import Head

    last = history[-1] if history else {}
    site_rows = [r for r in last.get("evaluate", {}).get("sites", []) if r.get("status") == "ok"]
    pairs = [(r[P.MODEL_GLOBAL]["threshold"], r[P.MODEL_GLOBAL]["n"]) for r in site_rows
             if (r.get(P.MODEL_GLOBAL) or {}).get("threshold") is not None]
    threshold = (sum(t * n for t, n in pairs) / sum(n for _, n in pairs)) if pairs else float(bundle.threshold.p)
    # the main head only: cross-fit fold heads serve the sites' thresholds and stay out of the bundle
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(head[k], np.float32).tobytes()
                                     for k in sorted(P.HEAD_SHAPES))).hexdigest()
    out = Path(settings.state_dir) / "bundles" / f"{bundle.manifest.name}-federated-{digest[:12]}"
    lineage = {
        "federated": {
            "rounds": settings.num_rounds,
            "n_sites": len(site_rows),
            "sites": sorted(r["site"] for r in site_rows),
            "aggregate_metrics": last.get("evaluate", {}).get("pooled"),
            "threshold": "case-weighted mean of the site thresholds for this head" if pairs else "parent's threshold",
            "head_sha256": digest,
        }
    }
    if not out.exists():
        # Layout v2: only the head file is new; the parent's other files are linked and checked against its manifest.
        new_head = head if isinstance(head, Head) else Head.from_arrays(head)
        derive_bundle(bundle, out, new_head, threshold, version=f"{bundle.manifest.version}+fed{settings.num_rounds}",
                      lineage=lineage, private_key=settings.signing_key)
    new = load_bundle(out, settings.public_key)
    log.info("federated bundle %s written to %s", new.hash[:12], out)
    return {"bundle": new, "info": {"path": str(out), "hash": new.hash, "parent_hash": bundle.hash,
                                    "threshold": float(new.threshold.p), "lineage": new.manifest.lineage}}


def final_evaluation(grid, ready: dict[int, str], head: dict[str, np.ndarray], bundle,
                     final_bundle: dict[str, Any] | None, settings: ServerSettings,
                     ledger: SiteLedger | None = None) -> dict[str, Any]:
    """The final head on every site (each with its own threshold) next to the reference and
    local-only heads; distributes the federated bundle in the same message.

    Replies are range-checked on arrival (``server.admission``); one that fails is dropped and
    logged with its node. A site that never answers (its process died) is listed as missing.
    """
    ledger = ledger if ledger is not None else SiteLedger()
    from flwr.app import ConfigRecord, RecordDict

    from shared.bundle.transport import bundle_to_records

    content = RecordDict({
        P.HEAD: _record(head),
        P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_NUM_ROUNDS: settings.num_rounds,
                                P.CFG_DELIVER: final_bundle is not None}),
    })
    if final_bundle is not None:
        # Every site here trained on ``bundle``: send only what differs from it (the new head).
        arrays, config = bundle_to_records(final_bundle["bundle"].path, parent=bundle)
        content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG] = arrays, config
    sites = []
    # An offline site's answer comes from the SuperLink (node 0): that site is listed as missing.
    replies = [m for m in send(grid, sorted(ready), P.QUERY_FINAL, content, settings.round_timeout_s)
               if m.metadata.src_node_id in ready]
    for msg in replies:
        node = msg.metadata.src_node_id
        name = ready.get(node) or site_name(msg)
        if reply_status(msg) != P.STATUS_OK:
            log_refusal(msg, "final evaluation")
            sites.append({"site": name, "node_id": node, "status": "failed"})
            continue
        why = admit_metrics_reply(ledger, msg)
        if why:
            log.warning("final evaluation: reply of site %s (node %s) dropped: %s", name, node, why)
            sites.append({"site": name, "node_id": node, "status": "rejected", "reason": why})
            continue
        parsed = metrics_from_reply(msg)
        info = msg.content[P.INFO]
        sites.append({"site": name, "node_id": node, "status": "ok", **{m: parsed.get(m, {}) for m in
                                                       P.FINAL_ARMS},
                      "counts": parsed["counts"], "reasons": parsed["reasons"],
                      "kept_bundle": info.get(P.INFO_BUNDLE_HASH), "bundle_problem": info.get(P.INFO_REASON),
                      "adoption": info.get(P.INFO_ADOPTION)})
    answered = {m.metadata.src_node_id for m in replies}
    for node in sorted(set(ready) - answered):
        log.warning("final evaluation: no reply from site %s (node %s)", ready[node], node)
        sites.append({"site": ready[node], "node_id": node, "status": "missing", "reason": "no reply"})
    sites.sort(key=lambda s: s["site"])
    pooled = {m: pooled_metrics(sites, m) for m in P.FINAL_ARMS}
    return {"sites": sites, "pooled": pooled}


app = build_server_app()
