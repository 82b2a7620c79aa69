"""Sites in-process for the server's tests: a Flower ``Grid`` whose nodes answer every message of the
protocol as an honest site would (replies built by the site's own ``client.privacy.build_reply``),
or as told otherwise. No Ray, no SuperLink: the server's run is the real one."""

from __future__ import annotations

import numpy as np
from flwr.app import Message

from client.privacy import build_reply
from shared.federation import protocol as P
from shared.models.head import Head, HeadSet


def good_eval(model=P.MODEL_GLOBAL, threshold=0.4, n_fine_tune=12):
    """A consistent set of held-out metrics of ``model`` at one site (20 held-out cases; every count 0
    or at least the protocol's floor, as a site sends them)."""
    k = lambda m: P.metric_key(model, m)  # noqa: E731
    return {P.NUM_EXAMPLES: 20, P.N_FINE_TUNE: n_fine_tune, P.N_HELD_OUT: 20, P.N_UNUSABLE: 0,
            k("n"): 20, k("n-pos"): 10, k("n-neg"): 10, k("n-no-lesion"): 0, k("withheld"): 0,
            k("auc"): 0.8, k("accuracy"): 0.5, k("sensitivity"): 0.5, k("specificity"): 0.5,
            k("threshold"): threshold, k("tp"): 5, k("fn"): 5, k("tn"): 5, k("fp"): 5, k("auc-var"): 0.01,
            k(P.ROC_TPR): [0.5] * len(P.ROC_FPR_GRID), k(P.HIST_POS): [0] * 49 + [10], k(P.HIST_NEG): [10] + [0] * 49}


class Sites:
    """A Grid of honest sites ``{node: name}``; ``answer[node]`` overrides one node's replies
    (a callable ``(message, honest_reply_content) -> content``)."""

    def __init__(self, names: dict[int, str], n_fine_tune: int = 12, thresholds: dict[int, float] | None = None):
        self.names = dict(names)
        self.n_fine_tune = n_fine_tune
        self.thresholds = thresholds or {}
        self.answer: dict = {}
        self.sent: list[tuple[str, int]] = []  # (message type, node) of every message received

    def get_node_ids(self):
        return list(self.names)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.sent.append((m.metadata.message_type, node))
            content = self._honest(m, node)
            if node in self.answer:
                content = self.answer[node](m, content)
            out.append(Message(content, reply_to=m))
        return out

    def _honest(self, m, node):
        name, kind = self.names[node], m.metadata.message_type
        cfg = m.content[P.CONFIG]
        if kind == P.QUERY_BUNDLE:
            planned = {P.N_FINE_TUNE: self.n_fine_tune} if cfg.get(P.CFG_TRAINS, False) else None
            return build_reply(name, P.STATUS_HAVE, bundle_hash=cfg[P.CFG_BUNDLE_HASH], metrics=planned)
        if kind == P.TRAIN:
            heads = HeadSet.from_record(m.content[P.HEAD])
            rng = np.random.default_rng(node * 1000 + int(cfg[P.CFG_ROUND]))

            def move(h: Head) -> Head:
                return Head(h.weight + rng.normal(0, 0.01, h.weight.shape).astype(np.float32), h.bias)

            moved = HeadSet(move(heads.main), tuple(move(f) for f in heads.folds))
            return build_reply(name, head=moved, metrics={P.NUM_EXAMPLES: self.n_fine_tune, P.TRAIN_LOSS: 0.5,
                                                          P.N_FINE_TUNE: self.n_fine_tune, P.N_HELD_OUT: 10,
                                                          P.N_UNUSABLE: 0})
        t = self.thresholds.get(node, 0.4)
        if kind == P.EVALUATE:
            return build_reply(name, metrics=good_eval(threshold=t, n_fine_tune=self.n_fine_tune))
        metrics = {}
        for arm in P.FINAL_ARMS:
            metrics.update(good_eval(arm, threshold=t, n_fine_tune=self.n_fine_tune))
        return build_reply(name, metrics=metrics)
