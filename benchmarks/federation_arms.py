"""The arms of ``bench_federation.py``, run by the production site code on cached features.

Every site is a real ``client.session.SiteSession`` whose feature store is the benchmark's cache
(``FixedStore``: the replicate's fine-tune / held-out parts as ``client.features.SiteFeatures``).
A federated run is what the ServerApp does, in process: each round every site's ``train_round``
gets the HEAD record (main head + cross-fit fold heads), each update passes the server's
``server.strategy.check_update``, and Flower's own ``aggregate_arrayrecords`` (what ``FedAvg``
calls) averages them weighted by ``num-examples``; at the end each site's ``final_comparison``
scores the four arms (reference, reference at the site threshold, local-only, federated) on its
held-out cases, with its out-of-fold thresholds, and keeps the scores in ``final_scores.npz``.

One federated run per site configuration (``RECIPES``): the paper's recipe, the converged fit,
FedProx and local statistics + converged refit (AdaBN). The oracles are fitted here with the
same converged fit (``client.head_fit.converged_update``) or scikit-learn.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from shared.federation import protocol as P

log = logging.getLogger("bench_federation")

# Site-config switches of each federated run (client.site_config.SiteConfig fields).
RECIPES = {
    "paper": dict(head_fit="paper", proximal_mu=0.0, early_stopping=False, local_norm_stats=False),
    "converged": dict(head_fit="converged", proximal_mu=0.0, early_stopping=False, local_norm_stats=False),
    "fedprox": dict(head_fit="paper", proximal_mu=1.0, early_stopping=False, local_norm_stats=False),
    "adabn": dict(head_fit="converged", proximal_mu=0.0, early_stopping=False, local_norm_stats=True),
}
# (arm name, recipe, model in that run's final reply)
SESSION_ARMS = (
    ("reference", "paper", P.MODEL_REFERENCE),
    ("reference-site-threshold", "paper", P.MODEL_REFERENCE_SITE),
    ("local-paper", "paper", P.MODEL_LOCAL),
    ("federated-paper", "paper", P.MODEL_FEDERATED),
    ("local-converged", "converged", P.MODEL_LOCAL),
    ("federated-converged", "converged", P.MODEL_FEDERATED),
    ("federated-fedprox", "fedprox", P.MODEL_FEDERATED),
    ("local-stats-refit", "adabn", P.MODEL_LOCAL),
    ("federated-stats-refit", "adabn", P.MODEL_FEDERATED),
)
ORACLES = ("oracle-site-300", "oracle-central-12", "oracle-central-300", "volume-baseline", "development-scanner")
ORACLE_FOLDS = 4  # the site and centralised oracles score every case out of fold (3/4 of 400 = 300 cases)


class FixedStore:
    """A ``SiteSession`` feature store holding the replicate's parts (``features(bundle)``)."""

    def __init__(self) -> None:
        self.current = None

    def features(self, bundle):
        return self.current


def site_features(data, fine: np.ndarray, held: np.ndarray, local_stats: bool):
    """The replicate's ``SiteFeatures``: ``fine`` / ``held`` are case indices; with ``local_stats``
    the parts are embedded with the site's statistics and the bundle's parts kept for the reference."""
    from client.features import Part, SiteFeatures

    def part(idx: np.ndarray, feats: np.ndarray) -> Part:
        ok = idx[data.lesion[idx]]
        no = idx[~data.lesion[idx]]
        return Part(features=feats[ok], labels=data.labels[ok].astype(np.int64), n_no_lesion=int(len(no)),
                    dice_ich=[], dice_phe=[], has_masks=False, n_no_lesion_pos=int(data.labels[no].sum()),
                    case_ids=tuple(f"{data.spec.name}-{i:05d}" for i in ok))

    plain = (part(fine, data.feats), part(held, data.feats))
    if not local_stats or data.norm_stats is None:
        return SiteFeatures(fine_tune=plain[0], held_out=plain[1], n_unusable=0)
    return SiteFeatures(fine_tune=part(fine, data.feats_site), held_out=part(held, data.feats_site), n_unusable=0,
                        norm_stats=data.norm_stats, bundle_stats=plain)


def draw_fine_tune(labels: np.ndarray, lesion: np.ndarray, n_fine: int, rng: np.random.Generator) -> np.ndarray:
    """A stratified draw of ``n_fine`` case indices (proportional, at least two of each class)."""
    pos, neg = np.flatnonzero((labels == 1) & lesion), np.flatnonzero((labels == 0) & lesion)
    k = int(np.clip(round(n_fine * len(pos) / max(len(pos) + len(neg), 1)), 2, n_fine - 2))
    return np.sort(np.r_[rng.choice(pos, min(k, len(pos)), replace=False),
                         rng.choice(neg, min(n_fine - k, len(neg)), replace=False)])


class Federation:
    """The sites of one cohort seed as real site sessions, one set per recipe."""

    def __init__(self, sites: list, bundle, public_key: Path, state_root: Path, *, rounds: int, folds: int,
                 device: str) -> None:
        from client.session import SiteSession
        from client.site_config import SiteConfig
        from shared.bundle.transport import bundle_cache_dir, seed_bundle

        self.sites, self.bundle, self.rounds, self.folds = sites, bundle, rounds, folds
        self.sessions: dict[str, list] = {}
        for recipe, switches in RECIPES.items():
            row = []
            for i, data in enumerate(sites):
                state = state_root / recipe / data.spec.name
                seed_bundle(bundle, bundle_cache_dir(state))
                cfg = SiteConfig(name=data.spec.name, data_dir=state, state_dir=state, public_key=public_key,
                                 device=device, seed=data.spec.seed % (2**31 - 1), audit_outgoing=False,
                                 unlabelled_for_norm_stats=False, **switches)
                row.append(SiteSession(cfg, store=FixedStore()))
            self.sessions[recipe] = row

    def replicate(self, splits: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, Any]]:
        """Every recipe's federation on this replicate's splits: ``{site: {arm: {auc, sensitivity,
        specificity, threshold, scores (held-out rows)}}}``."""
        out: dict[str, dict[str, Any]] = {d.spec.name: {} for d in self.sites}
        for recipe, sessions in self.sessions.items():
            local = RECIPES[recipe]["local_norm_stats"]
            for session, data, (fine, held) in zip(sessions, self.sites, splits):
                session.store.current = site_features(data, fine, held, local)
            finals = self._federate(sessions)
            for session, data, reply in zip(sessions, self.sites, finals):
                scores = np.load(Path(session.config.state_dir) / "final_scores.npz")
                metrics = _parse(reply)
                for arm, arm_recipe, model in SESSION_ARMS:
                    if arm_recipe == recipe:
                        s = scores[model.replace("-", "_")]
                        out[data.spec.name][arm] = {**_arm_numbers(scores["labels"], s, metrics.get(model, {})),
                                                    "scores": s}
        return out

    def _federate(self, sessions: list) -> list:
        """Rounds of train_round + server check + Flower aggregation, then every site's final comparison."""
        from flwr.app import ConfigRecord, RecordDict
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

        from server.strategy import DEFAULT_MAX_UPDATE_NORM
        from server.updates import check_update
        from shared.models.head import Head, HeadSet

        heads = HeadSet.replicate(Head.from_bundle(self.bundle), self.folds)

        def content(**config):
            return RecordDict({P.HEAD: heads.to_record(),
                               P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: self.bundle.hash, **config})})

        for r in range(1, self.rounds + 1):
            replies = [s.train_round(content(**{P.CFG_ROUND: r})) for s in sessions]
            for s, reply in zip(sessions, replies):
                why = check_update(reply[P.HEAD], heads, DEFAULT_MAX_UPDATE_NORM).reason
                if why:
                    raise RuntimeError(f"round {r}: the server would reject {s.name}'s update: {why}")
            heads = HeadSet.from_record(aggregate_arrayrecords(replies, P.NUM_EXAMPLES))
        final = content(**{P.CFG_NUM_ROUNDS: self.rounds, P.CFG_DELIVER: False})
        return [s.final_comparison(final) for s in sessions]


def _arm_numbers(labels: np.ndarray, scores: np.ndarray, m: dict[str, Any]) -> dict[str, Any]:
    """AUC, sensitivity and specificity of one arm at the threshold the site sent, from the held-out
    scores it kept: the reply's own numbers, also where the site's privacy floor withholds them from the
    reply (a class under ``min_cases_for_metrics``; the benchmark's sites share this machine)."""
    from shared.evaluation.metrics import classification_metrics

    t = m.get("threshold")
    cm = classification_metrics(labels, scores, float(t), n_boot=0) if t is not None else {}
    return {"auc": cm.get("auc"), "sensitivity": cm.get("sensitivity"), "specificity": cm.get("specificity"),
            "threshold": t}


def _parse(reply) -> dict[str, dict[str, Any]]:
    """``{model: {metric: value}}`` of a final reply's metric record."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in reply[P.METRICS].items():
        parts = P.split_metric_key(key)
        if parts is not None:
            out.setdefault(parts[0], {})[parts[1]] = value
    return out


# -- oracles ---------------------------------------------------------------------------------------


def out_of_fold_linear(anchor, x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """p(neoplastic) of every row from the converged fit on the rows of the other ``ORACLE_FOLDS``
    folds (stratified within each group, so a pooled fit leaves out the same share of every site)."""
    from client.head_fit import converged_update
    from client.split import assign_folds

    folds = np.zeros(len(y), np.int64)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        folds[rows] = assign_folds([f"{g}-{i}" for i in rows], y[rows], ORACLE_FOLDS, seed)
    out = np.zeros(len(y))
    for k in range(ORACLE_FOLDS):
        train = folds != k
        head = converged_update(anchor, x[train], y[train], seed=seed + k).head
        out[~train] = head.p_neoplastic(x[~train])
    return out


def volume_model(dev_ich: np.ndarray, dev_phe: np.ndarray, dev_y: np.ndarray):
    """The volume-only baseline: logistic regression on ICH ml, PHE ml and the PHE/ICH ratio (logs,
    standardised), fitted on the development cohort; returns ``score(ich, phe) -> p``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def design(ich, phe):
        ich, phe = np.asarray(ich, float), np.asarray(phe, float)
        return np.c_[np.log1p(ich), np.log1p(phe), np.log((phe + 0.1) / (ich + 0.1))]

    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(design(dev_ich, dev_phe), dev_y)
    return lambda ich, phe: model.predict_proba(design(ich, phe))[:, 1]


@dataclasses.dataclass
class FixedOracles:
    """Per site, scores of every case (n,) that do not change across replicates."""

    scores: dict[str, dict[str, np.ndarray]]


def fixed_oracles(sites: list, simulated: list, anchor, volume, seed: int) -> FixedOracles:
    """The site oracle (300 cases), the centralised oracle (pooled 8 x 300), the volume baseline
    and the development-scanner twins, per site, out of fold where trained on the site's cases."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for i, d in enumerate(sites):
        s = np.zeros(d.n)
        ok = d.lesion
        s[ok] = out_of_fold_linear(anchor, d.feats[ok], d.labels[ok], np.zeros(int(ok.sum())), seed + 31 * i)
        out[d.spec.name] = {"oracle-site-300": s, "volume-baseline": volume(d.ich_ml, d.phe_ml)}
        if d.twin_feats is not None:  # the real-background site has no development-scanner twin
            twin = np.zeros(d.n)
            twin[d.twin_lesion] = anchor.p_neoplastic(d.twin_feats[d.twin_lesion])  # no lesion found: 0
            out[d.spec.name]["development-scanner"] = twin
    rows = [(j, np.flatnonzero(d.lesion)) for j, d in enumerate(simulated)]
    x = np.concatenate([simulated[j].feats[r] for j, r in rows])
    y = np.concatenate([simulated[j].labels[r] for j, r in rows])
    groups = np.concatenate([np.full(len(r), j) for j, r in rows])
    central = out_of_fold_linear(anchor, x, y, groups, seed + 7)
    start = 0
    for j, r in rows:
        c = np.zeros(simulated[j].n)
        c[r] = central[start:start + len(r)]
        out[simulated[j].spec.name]["oracle-central-300"] = c
        start += len(r)
    # A site outside the pooled eight (the real-background one) is scored by a fit on all of them.
    from client.head_fit import converged_update

    full = converged_update(anchor, x, y, seed=seed + 11).head
    for d in sites:
        if "oracle-central-300" not in out[d.spec.name]:
            out[d.spec.name]["oracle-central-300"] = np.where(d.lesion, full.p_neoplastic(d.feats), 0.0)
    return FixedOracles(out)


def central_small(sites: list, simulated_names: set[str], splits, anchor, seed: int) -> dict[str, np.ndarray]:
    """The centralised oracle on the replicate's pooled fine-tune cases of the simulated sites, per site."""
    from client.head_fit import converged_update

    xs, ys = [], []
    for d, (fine, _) in zip(sites, splits):
        if d.spec.name in simulated_names:
            ok = fine[d.lesion[fine]]
            xs.append(d.feats[ok])
            ys.append(d.labels[ok])
    head = converged_update(anchor, np.concatenate(xs), np.concatenate(ys), seed=seed).head
    return {d.spec.name: np.where(d.lesion, head.p_neoplastic(d.feats), 0.0) for d in sites}
