"""Flower without Ray or a SuperLink: a ``Grid`` that hands each message to the real ClientApp in
this process, for the protocol tests (weighted mean, cross-fit thresholds, privacy, resume).

What is real: the ServerApp and its strategy, the ClientApp with its mods (site progress, audit,
privacy allow-list) and site sessions, and the wire format: every message and every reply goes
through Flower's own protobuf serialisation (``flwr.common.serde``) on its way, so neither side
holds the other's objects, and what a site sent is what the server reads. What is not: the
transport (no gRPC, no Ray actors, no heartbeats, no parallel sites; the sites answer one after
the other). One Ray run (``tests/simulations/test_ray_cluster.py``) and one TLS deployment
(``tests/deploy/``) keep the transports honest.

``run_inprocess(server_app, client_app, n_nodes)`` runs a ServerApp against ``n_nodes`` virtual
SuperNodes of a ClientApp; inside ``simulation_in_process()``, ``simulations.flower_sim.run`` (and
so ``ichfed simulate`` and ``ichfed stats``) runs its own wiring (site configs, settings, report,
case-level bootstrap) on this grid instead of Flower's Ray engine.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Iterable, Iterator

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SUPERLINK_NODE = 1  # Flower's node ID of the SuperLink: the source of every instruction
FIRST_NODE = 1_000_001  # virtual SuperNodes get IDs from here (Flower draws random 64-bit IDs)


def _over_the_wire(message: Message) -> Message:
    """The message as the other side receives it: serialised and read back (Flower's protobuf)."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid(Grid):
    """``n_nodes`` virtual SuperNodes answering with ``client_app``; node i has ``partition-id`` i,
    as in Flower's simulation engine. ``delivered`` lists (message type, node) in sending order."""

    def __init__(self, client_app, n_nodes: int, run_id: int = 1) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            FIRST_NODE + i: Context(run_id=run_id, node_id=FIRST_NODE + i, state=RecordDict(), run_config={},
                                    node_config={"partition-id": i, "num-partitions": n_nodes})
            for i in range(n_nodes)}
        self._replies: dict[str, Message] = {}
        self.delivered: list[tuple[str, int]] = []

    # -- Flower's Grid -------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # what the SuperLink assigns
            self._replies[message.metadata.message_id] = self._deliver(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))

    # -- delivery ------------------------------------------------------------------------------
    def _deliver(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        self.delivered.append((message.metadata.message_type, node))
        received = _over_the_wire(message)
        try:
            reply = self.client_app(received, self.contexts[node])
        except Exception as e:  # as Flower's engine answers for a ClientApp that raised
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(e).__name__}: {e}"),
                            reply_to=received)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return _over_the_wire(reply)


@contextlib.contextmanager
def server_task(run_id: int = 1) -> Iterator[None]:
    """This process as a running ServerApp's task (``flwr.app.Message`` reads its identity)."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """A site sets its process up as a worker (``shared.plumbing.logs.setup_worker``: root handlers,
    level, captured warnings); here that process is pytest's, which gets its logging back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)
        for h in [h for h in handlers if h not in root.handlers]:
            root.addHandler(h)
        root.setLevel(level)
        logging.captureWarnings(False)


def run_inprocess(server_app, client_app, n_nodes: int, run_id: int = 1) -> InProcessGrid:
    """Run ``server_app`` to its end against ``n_nodes`` sites of ``client_app`` in this process.

    An exception of the ServerApp propagates as itself (Flower's engine wraps it; the simulation
    runner unwraps an ``IchfedError`` the same way). Returns the grid, with what it delivered.
    """
    grid = InProcessGrid(client_app, n_nodes, run_id)
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with server_task(run_id), _root_logging_kept():
        server_app(grid, context)
    return grid


@contextlib.contextmanager
def simulation_in_process() -> Iterator[list[InProcessGrid]]:
    """While active, ``simulations.flower_sim.run_apps`` (Flower's simulation engine on Ray, what
    ``flower_sim.run`` and ``stats_sim.run_stats`` call) runs the apps on an ``InProcessGrid``;
    yields the list of grids used, one per run."""
    from simulations import flower_sim

    grids: list[InProcessGrid] = []

    def run_apps(server_app, client_app, n_nodes, *_ray_args, **_ray_kwargs) -> None:
        grids.append(run_inprocess(server_app, client_app, n_nodes))

    saved = flower_sim.run_apps
    flower_sim.run_apps = run_apps
    try:
        yield grids
    finally:
        flower_sim.run_apps = saved
