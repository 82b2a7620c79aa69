"""The Flower ClientApp of a site (thin: message in, runtime call, ``privacy.build_reply`` out).

A SuperNode names its site config with ``--node-config "site-config='site_configs/x.toml'"``.
In simulation, ``build_client_app(site_configs=[...])`` maps each virtual node's
``partition-id`` to one config instead.

Every handler catches its own failures: the detail goes to the site's log, and the reply says
only ``refused`` with a reason code, because an exception text can hold a path or a case ID.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from shared import protocol as P
from shared.stats_protocol import ACTION_STATS
from shared.errors import BundleVerificationError, IchfedError

from .finetune import Head, train_head
from .privacy import AuditMod, build_reply, privacy_mod
from .runtime import SiteConfig, SiteRuntime, load_site_config

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "site-config"


class _Refusal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SiteState:
    """Per-process state of one site: config, runtime and the verified bundles it has loaded."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.runtime = SiteRuntime(config)
        self._bundles: dict[str, object] = {}
        self._reference: dict[str, Head] = {}

    @property
    def bundle_dir(self) -> Path:
        from shared.transport import bundle_cache_dir

        return bundle_cache_dir(self.config.state_dir)

    def bundle(self, bundle_hash: str):
        """The verified bundle with ``bundle_hash`` from the site's cache, or a refusal."""
        if bundle_hash in self._bundles:
            return self._bundles[bundle_hash]
        from shared.bundle import load_bundle
        from shared.transport import cached_bundle

        path = cached_bundle(self.bundle_dir, bundle_hash)
        if path is None:
            log.error("site %s: bundle %s is not in %s", self.config.name, bundle_hash[:12], self.bundle_dir)
            raise _Refusal(P.REASON_BUNDLE_MISSING)
        if self.config.public_key is None:
            log.error("site %s: no public_key in the site config, so no bundle can be verified; refusing",
                      self.config.name)
            raise _Refusal(P.REASON_BUNDLE_VERIFICATION)
        try:
            bundle = load_bundle(path, self.config.public_key)
        except BundleVerificationError as e:
            log.error("site %s: bundle %s failed verification, refusing to use it: %s",
                      self.config.name, bundle_hash[:12], e)
            raise _Refusal(P.REASON_BUNDLE_VERIFICATION) from None
        self._bundles[bundle_hash] = bundle
        return bundle

    def receive_bundle(self, arrays, config) -> str:
        """Verify and cache a bundle sent as records; returns its hash, or raises a refusal."""
        from shared.transport import bundle_from_records

        if self.config.public_key is None:
            log.error("site %s: no public_key in the site config; refusing the offered bundle", self.config.name)
            raise _Refusal(P.REASON_BUNDLE_VERIFICATION)
        try:
            path = bundle_from_records(arrays, config, self.bundle_dir, self.config.public_key)
        except BundleVerificationError as e:
            log.error("site %s: received bundle failed verification, refusing it: %s", self.config.name, e)
            raise _Refusal(P.REASON_BUNDLE_VERIFICATION) from None
        log.info("site %s: bundle cached at %s", self.config.name, path)
        return path.name

    def reference_head(self, bundle) -> Head:
        """The bundle's own head (before any fine-tuning)."""
        if bundle.hash not in self._reference:
            from shared.classifier import backbone_and_head

            _, head = backbone_and_head(bundle.build_classifier("cpu"))
            self._reference[bundle.hash] = Head(
                weight=head.weight.detach().cpu().numpy().astype("float32"),
                bias=head.bias.detach().cpu().numpy().astype("float32"),
            )
        return self._reference[bundle.hash]

    def device(self) -> str:
        from shared.device import pick_device

        return str(pick_device(self.config.device))


_STATES: dict[tuple, SiteState] = {}


def _state_for(path: str | os.PathLike) -> SiteState:
    """The site's state for this process; a changed config file gives a fresh one."""
    p = Path(path).resolve()
    try:
        st = p.stat()
        key = (str(p), st.st_mtime_ns, st.st_size)
    except OSError:
        key = (str(p),)
    if key not in _STATES:
        _STATES[key] = SiteState(load_site_config(p))
    return _STATES[key]


def _node_config_resolver(context) -> str:
    value = context.node_config.get(NODE_CONFIG_KEY)
    if not value:
        raise IchfedError(f"node config: '{NODE_CONFIG_KEY}' is missing (pass --node-config \"{NODE_CONFIG_KEY}='site.toml'\")")
    return str(value)


def build_client_app(
    site_configs: Sequence[str | os.PathLike] | None = None,
    extra_mods: Sequence[Callable] = (),
):
    """A ClientApp. ``site_configs[i]`` serves simulation node ``partition-id`` i; without it the
    node's ``--node-config site-config=...`` is used. ``extra_mods`` run outside the privacy mod,
    so they see exactly what leaves the site."""
    from flwr.app import Error, Message
    from flwr.clientapp import ClientApp

    if site_configs is not None:
        paths = [str(Path(p).resolve()) for p in site_configs]

        def resolve(context) -> str:
            return paths[int(context.node_config["partition-id"])]
    else:
        resolve = _node_config_resolver

    def audit_folder(context):
        try:
            cfg = _state_for(resolve(context)).config
        except Exception:  # an unusable config is reported by the handler itself
            return None
        return Path(cfg.state_dir) / "outgoing" if cfg.audit_outgoing else None

    app = ClientApp(mods=[*extra_mods, AuditMod(audit_folder), privacy_mod])

    def handle(message: Message, context, fn) -> Message:
        try:
            state = _state_for(resolve(context))
        except Exception as e:  # the detail (a path) stays here; the coordinator learns only that
            log.error("site config unusable: %s", e)
            return Message(Error(code=0, reason="site config unusable; see the site's log"), reply_to=message)
        name = state.config.name
        try:
            content = fn(state, message)
        except _Refusal as r:
            content = build_reply(name, P.STATUS_REFUSED, reason=r.reason)
        except Exception as e:  # the detail stays in the site's log; the reply carries only a code
            log.exception("site %s: %s failed: %s", name, message.metadata.message_type, e)
            content = build_reply(name, P.STATUS_REFUSED, reason=P.REASON_SITE_ERROR)
        return Message(content, reply_to=message)

    @app.query(P.ACTION_BUNDLE)
    def bundle(message: Message, context) -> Message:
        return handle(message, context, _on_bundle)

    @app.train()
    def train(message: Message, context) -> Message:
        return handle(message, context, _on_train)

    @app.evaluate()
    def evaluate(message: Message, context) -> Message:
        return handle(message, context, _on_evaluate)

    @app.query(P.ACTION_FINAL)
    def final(message: Message, context) -> Message:
        return handle(message, context, _on_final)

    @app.query(ACTION_STATS)  # ichfed stats: the site's Table 1 (client/stats.py)
    def stats(message: Message, context) -> Message:
        return handle(message, context, _on_stats)

    return app


def _config(message):
    return message.content[P.CONFIG]


def _on_bundle(state: SiteState, message):
    cfg = _config(message)
    wanted = str(cfg[P.CFG_BUNDLE_HASH])
    if cfg.get(P.CFG_DELIVER, False):
        got = state.receive_bundle(message.content[P.BUNDLE_ARRAYS], message.content[P.BUNDLE_CONFIG])
        if got != wanted:
            log.error("site %s: delivered bundle %s is not the announced %s", state.config.name, got[:12], wanted[:12])
            raise _Refusal(P.REASON_BUNDLE_VERIFICATION)
    from shared.transport import cached_bundle

    if cached_bundle(state.bundle_dir, wanted) is None:
        return build_reply(state.config.name, P.STATUS_NEED)
    state.bundle(wanted)  # full verification before the site says it has it
    return build_reply(state.config.name, P.STATUS_HAVE, bundle_hash=wanted)


def _on_train(state: SiteState, message):
    cfg = _config(message)
    bundle = state.bundle(str(cfg[P.CFG_BUNDLE_HASH]))
    feats = state.runtime.features(bundle)
    if feats.fine_tune.n == 0:
        log.error("site %s: no usable fine-tune cases; not training", state.config.name)
        raise _Refusal(P.REASON_NO_CASES)
    if feats.fine_tune.n < state.runtime.min_cases:
        # A head trained on one or two cases is close to a copy of their features.
        log.error("site %s: %d fine-tune cases, fewer than the minimum %d; not sending a head update",
                  state.config.name, feats.fine_tune.n, state.runtime.min_cases)
        raise _Refusal(P.REASON_TOO_FEW)
    c = state.config
    result = train_head(
        Head.from_arrays(message.content[P.HEAD]),
        feats.fine_tune.features,
        feats.fine_tune.labels,
        epochs=c.local_epochs,
        learning_rate=c.learning_rate,
        batch_size=c.batch_size,
        seed=c.seed * 100_003 + int(cfg.get(P.CFG_ROUND, 0)),
        device=state.device(),
    )
    log.info("site %s: round %s trained on %d cases, loss %.4f", c.name, cfg.get(P.CFG_ROUND), feats.fine_tune.n, result.loss)
    return build_reply(
        c.name,
        head=result.head.arrays(),
        metrics={
            P.NUM_EXAMPLES: feats.fine_tune.n,
            P.TRAIN_LOSS: result.loss,
            P.N_FINE_TUNE: feats.fine_tune.n,
            P.N_HELD_OUT: feats.held_out.n,
            P.N_UNUSABLE: feats.n_unusable,
        },
    )


def _on_evaluate(state: SiteState, message):
    cfg = _config(message)
    bundle = state.bundle(str(cfg[P.CFG_BUNDLE_HASH]))
    feats = state.runtime.features(bundle)
    head = Head.from_arrays(message.content[P.HEAD])
    threshold, why = state.runtime.calibrate(head, feats.fine_tune, bundle.threshold.p)
    metrics, reasons = state.runtime.evaluate(P.MODEL_GLOBAL, head, threshold, feats.held_out, why)
    metrics.update({P.NUM_EXAMPLES: feats.held_out.n, P.N_FINE_TUNE: feats.fine_tune.n,
                    P.N_HELD_OUT: feats.held_out.n, P.N_UNUSABLE: feats.n_unusable})
    return build_reply(state.config.name, metrics=metrics, reasons=reasons)


def _on_final(state: SiteState, message):
    """The four arms on the held-out split (``client.final``); keep the final bundle and its overlay."""
    from .final import final_arms

    cfg = _config(message)
    c = state.config
    bundle = state.bundle(str(cfg[P.CFG_BUNDLE_HASH]))
    feats = state.runtime.features(bundle)
    rounds = int(cfg.get(P.CFG_NUM_ROUNDS, 1))
    arms = final_arms(state.runtime, feats, state.reference_head(bundle), Head.from_arrays(message.content[P.HEAD]),
                      float(bundle.threshold.p), rounds, device=state.device())
    metrics: dict = {P.NUM_EXAMPLES: feats.held_out.n, P.N_FINE_TUNE: feats.fine_tune.n,
                     P.N_HELD_OUT: feats.held_out.n, P.N_UNUSABLE: feats.n_unusable, **arms.metrics}

    final_hash = None
    reason = None
    if cfg.get(P.CFG_DELIVER, False):
        try:
            final_hash = state.receive_bundle(message.content[P.BUNDLE_ARRAYS], message.content[P.BUNDLE_CONFIG])
            state.bundle(final_hash)
        except _Refusal as refusal:
            reason = refusal.reason
            final_hash = None
    # The federated threshold and calibration belong with the bundle that carries the federated head.
    t_fed = arms.federated_threshold
    source = "site-calibrated" if t_fed.reason is None else "bundle"
    state.runtime.save_local_threshold(final_hash or bundle.hash, t_fed.p, source, t_fed.calibration)
    if final_hash:
        from shared.atomic import write_json

        write_json(Path(c.state_dir) / "final.json", {
            "bundle_hash": final_hash,
            "bundle_path": str(state.bundle_dir / final_hash),
            "parent_bundle_hash": bundle.hash,
            "threshold": t_fed.p,
            "threshold_source": source,
            "rounds": rounds,
        })
        log.info("site %s: final bundle %s kept with local threshold %.4f", c.name, final_hash[:12], t_fed.p)
    return build_reply(c.name, metrics=metrics, reasons=arms.reasons, reason=reason, bundle_hash=final_hash)


def _on_stats(state: SiteState, message):
    """The site's Table 1: counts and fixed-bin histograms only, suppressed at the site (``client.stats``)."""
    from .stats import NeedsBundle, site_table1

    wanted = str(_config(message).get(P.CFG_BUNDLE_HASH, ""))
    bundle = state.bundle(wanted) if wanted else None  # segments cases without reference masks
    try:
        t1 = site_table1(state.config, bundle, state.device())
    except NeedsBundle as e:
        log.error("site %s: %s", state.config.name, e)
        raise _Refusal(P.REASON_BUNDLE_MISSING) from None
    if "table1.n" not in t1.metrics or t1.metrics["table1.n"] == 0:
        log.error("site %s: fewer usable cases than min_cases_for_metrics; no Table 1 sent", state.config.name)
        raise _Refusal(P.REASON_TOO_FEW)
    return build_reply(state.config.name, metrics=t1.metrics, reasons=t1.reasons, scanner=t1.scanner)


app = build_client_app()
