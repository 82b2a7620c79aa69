"""A site's part in segmenter rounds (issue 24).

- ``train.segmenter``: a site that opted in (``segmenter_fine_tune = true``) fine-tunes the received
  segmenter on its **masked fine-tune cases** (the fine-tune part of its split with a mask, plus masked
  cases without a class label, which are never held out) with nnU-Net's own trainer
  (``shared.training.segment_finetune``), and replies with the trained tensors, the masked case count,
  the training loss and nnU-Net's pseudo Dice: weights and aggregates, nothing per case.
- ``query.segmenter``: every site receives the bundle carrying the federated segmenter, scores the
  reference, federated and (if it opted in) local-only segmenters on its **held-out masked cases**
  with the bundle's own head (Dice, components, flags, and the end-to-end AUC each gives), and decides
  by the no-harm rule (``client.adoption.compare_segmenters``) which one it goes on with.
- ``pipeline(bundle, segmenter_hash)``: the bundle whose segmenter the site runs in the run: the
  federated segmenter's bundle where the site adopted it, else the run's bundle (also when it holds no
  decision: a site that never evaluated the federated segmenter keeps the reference). The head rounds,
  the final comparison and adoption all go through it.

What stays at the site, under ``<state_dir>/segmenter/``: ``work/`` (nnU-Net's folders; the cases are
preprocessed once), ``last-update.json`` + ``last-update.safetensors`` (the latest round's update, which
is the local-only segmenter of a one-round run), ``local/<digest>/`` (the local-only segmenter as an
unsigned bundle, never sent and never active) and ``decisions/<bundle hash>.json`` (the decision with its
evidence).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from shared.federation import protocol as P
from shared.plumbing.errors import IchfedError

from .privacy import build_reply
from .site_bundles import Refusal
from .site_config import SiteConfig

log = logging.getLogger(__name__)

SEG_DIR = "segmenter"


class SegmenterSite:
    """The segmenter side of one site's session (``client.session.SiteSession`` delegates here)."""

    def __init__(self, config: SiteConfig, bundles, store) -> None:
        self.config = config
        self.bundles = bundles
        self.store = store
        self.folder = Path(config.state_dir) / SEG_DIR

    # -- which segmenter the site runs ------------------------------------------------------------
    def pipeline(self, bundle, segmenter_hash: str | None):
        """The bundle whose segmenter the site runs for run bundle ``bundle``: the federated segmenter's
        bundle ``segmenter_hash`` (named by the run's messages) where the site adopted it, else ``bundle``."""
        if not segmenter_hash:
            return bundle
        decision = read_decision(self.config.state_dir, str(segmenter_hash))
        if decision is None or decision.get("decision") != P.ADOPTION_ACTIVATED or decision["parent_hash"] != bundle.hash:
            return bundle
        return self.bundles.get(str(segmenter_hash))

    # -- the cases -------------------------------------------------------------------------------------
    def masked_cases(self) -> tuple[list, list]:
        """(masked fine-tune cases incl. masked unlabelled ones, masked held-out cases) of the run's split."""
        site = self.store.read_site()
        split = self.store.split(site)
        fine, held = set(split.fine_tune), set(split.held_out)
        masked = [c for c in site.cases if c.mask_path is not None]
        return ([c for c in masked if c.case_id in fine or c.label is None],
                [c for c in masked if c.case_id in held])

    def planned(self) -> dict[str, int]:
        """``{n-masked-fine-tune: k}`` for the bundle offer when the site opted in with enough masks."""
        if not self.config.segmenter_fine_tune:
            return {}
        n = len(self.masked_cases()[0])
        if n < self.config.min_cases:
            log.error("site %s: segmenter_fine_tune is on but only %d masked fine-tune cases (minimum %d): this site "
                      "will not fine-tune the segmenter (`ichfed site check` counts them)", self.config.name, n,
                      self.config.min_cases)
            return {}
        return {P.N_MASKED_FINE_TUNE: n}

    # -- train.segmenter ---------------------------------------------------------------------------------
    def train_round(self, content):
        """Fine-tune the received segmenter; reply with the trained tensors and aggregates."""
        from .seeds import segmenter_seed

        cfg = content[P.CONFIG]
        if not self.config.segmenter_fine_tune:
            log.error("site %s: asked for a segmenter round, but segmenter_fine_tune is off", self.config.name)
            raise Refusal(P.REASON_SEGMENTER_OFF)
        server_round = int(cfg.get(P.CFG_ROUND, 1))
        spec = self._within_budget(finetune_spec(cfg, segmenter_seed(self.config.seed, max(server_round, 1))))
        bundle = self.bundles.get(str(cfg[P.CFG_BUNDLE_HASH]))
        cases = self.masked_cases()[0]
        if len(cases) < self.config.min_cases:
            log.error("site %s: %d masked fine-tune cases, fewer than the minimum %d; no segmenter update",
                      self.config.name, len(cases), self.config.min_cases)
            raise Refusal(P.REASON_TOO_FEW)
        start = _received(content, bundle)
        result = self._fine_tune(bundle, cases, spec, start)
        self._keep_update(server_round, start, spec, result)
        return build_reply(self.config.name, segmenter=result.weights, metrics={
            P.NUM_EXAMPLES: result.n_cases, P.N_MASKED_FINE_TUNE: result.n_cases, P.TRAIN_LOSS: result.train_loss,
            **({P.TRAIN_DICE: min(max(result.train_dice, 0.0), 1.0)} if result.train_dice is not None else {})})

    def _within_budget(self, spec):
        """``spec``, unless it asks for more nnU-Net iterations than the site allows (``Refusal``)."""
        if spec.epochs * spec.iterations > self.config.segmenter_max_iterations:
            log.error("site %s: a segmenter fine-tune of %d x %d iterations exceeds segmenter_max_iterations %d",
                      self.config.name, spec.epochs, spec.iterations, self.config.segmenter_max_iterations)
            raise Refusal(P.REASON_SEGMENTER_BUDGET)
        return spec

    def _fine_tune(self, bundle, cases: list, spec, start):
        from shared.plumbing.device import pick_device
        from shared.training.segment_finetune import fine_tune

        return fine_tune(bundle.nnunet_dir, cases, self.folder / "work", spec, start=start,
                         file_hashes=bundle.nnunet_file_hashes, device=str(pick_device(self.config.device).type))

    def _keep_update(self, server_round: int, start, spec, result) -> None:
        """The latest update, kept at the site: with one round it is the local-only segmenter."""
        import dataclasses

        from shared.plumbing.atomic import write_json

        _save_weights(result.weights, self.folder / "last-update.safetensors")
        write_json(self.folder / "last-update.json", {"round": server_round, "start": start.digest(),
                                                       "spec": dataclasses.asdict(spec), "n_cases": result.n_cases})

    # -- query.segmenter ----------------------------------------------------------------------------------
    def evaluate(self, content):
        """Receive the federated segmenter's bundle, score the segmenter arms, decide; reply with aggregates."""
        from shared.federation.protocol import SEG_FEDERATED, SEG_LOCAL, SEG_REFERENCE

        cfg = content[P.CONFIG]
        parent = self.bundles.get(str(cfg[P.CFG_BUNDLE_HASH]))
        wanted = str(cfg[P.CFG_SEG_BUNDLE_HASH])
        if cfg.get(P.CFG_DELIVER, False) and not self.bundles.has(wanted):
            got = self.bundles.receive(content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG])
            if got != wanted:
                log.error("site %s: delivered segmenter bundle %s is not the announced %s", self.config.name,
                          got[:12], wanted[:12])
                raise Refusal(P.REASON_BUNDLE_VERIFICATION)
        federated = self.bundles.get(wanted)
        arms = {SEG_REFERENCE: parent, SEG_FEDERATED: federated}
        if self.config.segmenter_fine_tune and len(self.masked_cases()[0]) >= self.config.min_cases:
            arms[SEG_LOCAL] = self._local_bundle(parent, cfg)
        metrics, reasons, parts = self._score_arms(arms, parent)
        decision = self._decide(parent, federated, parts)
        return build_reply(self.config.name, metrics=metrics, reasons=reasons, bundle_hash=wanted,
                           segmenter_adoption=decision)

    def _score_arms(self, arms: dict, parent) -> tuple[dict, dict, dict]:
        """Every arm's held-out metrics with the parent's head at its threshold; the held-out parts."""
        from .evaluate import segmenter_arm_metrics

        head = self.bundles.reference_head(parent)
        metrics: dict[str, Any] = {}
        reasons: dict[str, str] = {}
        parts = {}
        for arm, bundle in arms.items():
            held = self.store.features(bundle).reference_parts[1]  # as shipped: the bundle's own statistics
            m, r = segmenter_arm_metrics(arm, held, head.p_neoplastic(held.features), float(parent.threshold.p),
                                         min_cases=self.config.min_cases, seed=self.config.seed)
            metrics.update(m), reasons.update(r)
            parts[arm] = held
        return metrics, reasons, parts

    def _decide(self, parent, federated, parts: dict) -> str:
        """The no-harm rule on the held-out masked cases; the decision and its evidence stay here."""
        from shared.evaluation.segmentation import summarise

        from .adoption import compare_segmenters

        ref, fed = parts[P.SEG_REFERENCE], parts[P.SEG_FEDERATED]
        comparison = compare_segmenters(fed.seg_scores, ref.seg_scores, margin=self.config.adoption_margin,
                                        min_cases=self.config.min_cases)
        summaries = {arm: summarise(list(part.seg_scores.values())) for arm, part in parts.items()}
        write_decision(self.config.state_dir, federated.hash, parent.hash, comparison.code, comparison.evidence,
                       summaries)
        ev = comparison.evidence
        level = logging.INFO if comparison.code == P.ADOPTION_ACTIVATED else logging.WARNING
        log.log(level, "site %s: segmenter decision %s (held-out ICH Dice, mean over %s masked cases: federated %s, "
                "reference %s)", self.config.name, comparison.code, ev.get("n"), _fmt(ev.get("candidate_mean")),
                _fmt(ev.get("current_mean")))
        return comparison.code

    def _local_bundle(self, parent, cfg):
        """The local-only segmenter (as long as the federation trained), as an unsigned bundle at the site."""
        import dataclasses

        from shared.bundle import derive_bundle, load_bundle
        from shared.models.head import Head

        from .seeds import segmenter_seed

        rounds = int(cfg.get(P.CFG_NUM_ROUNDS, 1))
        spec = finetune_spec(cfg, segmenter_seed(self.config.seed, 1))
        spec = self._within_budget(dataclasses.replace(spec, epochs=spec.epochs * rounds))
        weights = self._reused_update(parent, spec)
        if weights is None:
            weights = self._fine_tune(parent, self.masked_cases()[0], spec, None).weights
        out = self.folder / "local" / weights.digest()[:24]
        if not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            derive_bundle(parent, out, Head.from_bundle(parent), parent.threshold, f"{parent.manifest.version}+local",
                          lineage={"local_only_segmenter": {"site": self.config.name, "rounds": rounds}},
                          segmenter=weights)
        return load_bundle(out, None, allow_unsigned=True)

    def _reused_update(self, parent, spec):
        """The kept round update when it *is* the local-only fine-tune (one round, from the reference)."""
        import dataclasses

        from shared.models.segment_weights import SegmenterNetwork

        meta_path = self.folder / "last-update.json"
        if not meta_path.is_file():
            return None
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        reference = SegmenterNetwork(parent.nnunet_dir, parent.nnunet_file_hashes).weights(spec.trainable)
        if meta.get("round") != 1 or meta.get("start") != reference.digest() or meta.get("spec") != dataclasses.asdict(spec):
            return None
        return _load_weights(self.folder / "last-update.safetensors")


def finetune_spec(cfg, seed: int):
    """The fine-tune the server asked for (``protocol.CFG_SEG_*``), checked (``FineTuneSpec``'s ranges)."""
    from shared.training.segment_finetune import FineTuneSpec

    try:
        return FineTuneSpec(trainable=str(cfg[P.CFG_SEG_TRAINABLE]), epochs=int(cfg[P.CFG_SEG_EPOCHS]),
                            iterations=int(cfg[P.CFG_SEG_ITERATIONS]),
                            learning_rate=float(cfg[P.CFG_SEG_LEARNING_RATE]), seed=int(seed))
    except (KeyError, TypeError, ValueError, IchfedError) as e:
        log.error("segmenter round: unusable fine-tune settings from the server: %s", e)
        raise Refusal(P.REASON_SITE_ERROR) from None


def _received(content, bundle):
    """The round's global segmenter tensors, checked against the bundle's network (names, shapes, finite)."""
    from shared.models.segment_weights import SegmenterNetwork, SegmenterWeights

    try:
        start = SegmenterWeights.from_record(content[P.SEGMENTER])
        SegmenterNetwork(bundle.nnunet_dir, bundle.nnunet_file_hashes).load(start)
    except (KeyError, IchfedError) as e:
        log.error("segmenter round: the received segmenter is unusable: %s", e)
        raise Refusal(P.REASON_SITE_ERROR) from None
    return start


def _save_weights(weights, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from shared.plumbing.atomic import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: torch.from_numpy(a.copy()) for k, a in weights.arrays.items()}, str(tmp))


def _load_weights(path: Path):
    from safetensors.numpy import load_file

    from shared.models.segment_weights import SegmenterWeights

    return SegmenterWeights(load_file(str(path)))


def decision_path(state_dir, bundle_hash: str) -> Path:
    """``<state_dir>/segmenter/decisions/<bundle hash>.json``."""
    return Path(state_dir) / SEG_DIR / "decisions" / f"{bundle_hash}.json"


def write_decision(state_dir, bundle_hash: str, parent_hash: str, code: str, evidence: dict, summaries: dict) -> None:
    """Keep the site's segmenter decision for ``bundle_hash`` (aggregates; never sent)."""
    from shared.plumbing.atomic import write_json

    write_json(decision_path(state_dir, bundle_hash), {"segmenter_bundle": bundle_hash, "parent_hash": parent_hash,
                                                      "decision": code, "evidence": evidence, "arms": summaries})


def read_decision(state_dir, bundle_hash: str) -> dict[str, Any] | None:
    """The kept decision for ``bundle_hash``, or None; a broken file is a one-line error."""
    path = decision_path(state_dir, bundle_hash)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not P.HASH_RE.match(str(data["parent_hash"])) or data["decision"] not in P.ADOPTIONS:
            raise ValueError("parent_hash or decision out of range")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IchfedError(f"{path}: not a readable segmenter decision ({e})"[:300]) from None
    return data


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
