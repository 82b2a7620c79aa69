"""The Flower ClientApp of a site: each message handler hands the message to the site's
session (``client.session.SiteSession``) and the reply back.

A SuperNode names its site config with ``--node-config "site-config='site_configs/x.toml'"``.
In simulation, ``build_client_app(site_configs=[...])`` maps each virtual node's
``partition-id`` to one config instead.

Flower's lifespan hook opens the node's session before each message; the app keeps one session
per node, replaced when the run or the site config changes (so a new run starts clean and an
edited config is read again). Every handler turns a failure into a refusal reply: the detail
goes to the site's log, and the reply says only ``refused`` with a reason code, because an
exception text can hold a path or a case ID.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from shared.federation import protocol as P
from shared.federation.stats_protocol import ACTION_STATS
from shared.plumbing.errors import IchfedError
from shared.plumbing.progress import site_mod

from .audit import AuditMod
from .privacy import build_reply, privacy_mod
from .session import SiteSession
from .site_bundles import Refusal
from .site_config import load_site_config

log = logging.getLogger(__name__)

NODE_CONFIG_KEY = "site-config"


class SessionPool:
    """The open session of each node of this process (one per node: a new run or an edited config
    replaces it). ``open`` is called by the lifespan hook; a config that cannot be read is kept as
    the error the handler reports."""

    def __init__(self, resolve: Callable[[Context], str]) -> None:
        self.resolve = resolve
        self._open: dict[int, tuple[tuple, SiteSession | Exception]] = {}

    def open(self, context: Context) -> None:
        """Open (or keep) the session of ``context``'s node for its run and config file."""
        try:
            path = Path(self.resolve(context)).resolve()
            identity = (context.run_id, *_file_identity(path))
            held = self._open.get(context.node_id)
            if held is None or held[0] != identity:
                self._open[context.node_id] = (identity, SiteSession(load_site_config(path)))
        except Exception as e:  # reported by the handler, which can still answer the message
            self._open[context.node_id] = ((), e)

    def session(self, context: Context) -> SiteSession:
        """The node's session; raises the error that kept it from opening."""
        held = self._open[context.node_id][1]
        if isinstance(held, Exception):
            raise held
        return held

    def close(self, context: Context) -> None:
        """After a message: a session whose config could not be read is not kept."""
        held = self._open.get(context.node_id)
        if held is not None and isinstance(held[1], Exception):
            del self._open[context.node_id]


def _file_identity(path: Path) -> tuple:
    try:
        st = path.stat()
        return str(path), st.st_mtime_ns, st.st_size
    except OSError:
        return (str(path),)


def _node_config_resolver(context: Context) -> str:
    value = context.node_config.get(NODE_CONFIG_KEY)
    if not value:
        raise IchfedError(f"node config: '{NODE_CONFIG_KEY}' is missing (pass --node-config \"{NODE_CONFIG_KEY}='site.toml'\")")
    return str(value)


def build_client_app(site_configs: Sequence[str | os.PathLike] | None = None,
                     extra_mods: Sequence[Callable] = ()) -> ClientApp:
    """A ClientApp. ``site_configs[i]`` serves simulation node ``partition-id`` i; without it the
    node's ``--node-config site-config=...`` is used. Every message is a stage in the site's
    progress events (``shared.plumbing.progress.site_mod``). ``extra_mods`` run outside the privacy mod,
    so they see exactly what leaves the site."""
    if site_configs is not None:
        paths = [str(Path(p).resolve()) for p in site_configs]

        def resolve(context: Context) -> str:
            return paths[int(context.node_config["partition-id"])]
    else:
        resolve = _node_config_resolver
    sessions = SessionPool(resolve)

    def audit_folder(context: Context) -> Path | None:
        try:
            cfg = sessions.session(context).config
        except Exception:  # an unusable config is reported by the handler itself
            return None
        return Path(cfg.state_dir) / "outgoing" if cfg.audit_outgoing else None

    def where(context: Context) -> tuple[Path, str]:
        session = sessions.session(context)
        return Path(session.config.state_dir), session.name

    # progress and log file of the site (<state_dir>/events.jsonl, site.log), then what leaves it
    app = ClientApp(mods=[site_mod(where), *extra_mods, AuditMod(audit_folder), privacy_mod])

    @app.lifespan()
    def lifespan(context: Context):
        sessions.open(context)
        yield
        sessions.close(context)

    def handle(message: Message, context: Context, method: Callable) -> Message:
        try:
            session = sessions.session(context)
        except Exception as e:  # the detail (a path) stays here; the coordinator learns only that
            log.error("site config unusable: %s", e)
            return Message(Error(code=0, reason="site config unusable; see the site's log"), reply_to=message)
        try:
            content = method(session, message.content)
        except Refusal as r:
            content = build_reply(session.name, P.STATUS_REFUSED, reason=r.reason)
        except Exception as e:  # the detail stays in the site's log; the reply carries only a code
            log.exception("site %s: %s failed: %s", session.name, message.metadata.message_type, e)
            content = build_reply(session.name, P.STATUS_REFUSED, reason=P.REASON_SITE_ERROR)
        return Message(content, reply_to=message)

    @app.query(P.ACTION_BUNDLE)
    def bundle(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.prepare)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.train_round)

    @app.evaluate()
    def evaluate(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.evaluate)

    @app.query(P.ACTION_FINAL)
    def final(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.final_comparison)

    @app.train(P.ACTION_SEGMENTER)  # segmenter rounds (issue 24, client/segmenter_site.py)
    def train_segmenter(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.train_segmenter)

    @app.query(P.ACTION_SEGMENTER)
    def segmenter(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.segmenter_arms)

    @app.query(ACTION_STATS)  # ichfed stats: the site's Table 1 (client/stats.py)
    def stats(message: Message, context: Context) -> Message:
        return handle(message, context, SiteSession.stats)

    return app


app = build_client_app()
