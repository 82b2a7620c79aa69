"""Cross-fitted federation at a site: seeded stratified folds, fold head k trained without fold k,
out-of-fold scores from the fold heads, and the head record's keys (real torch training on
synthetic 512-d embeddings)."""

from __future__ import annotations

import numpy as np
import pytest

from client.calibrate import site_threshold
from client.cross_fit import case_folds, cross_fit_scores, train_head_set
from client.features import Part
from client.finetune import train_head
from client.seeds import cross_fit_seed
from client.session import SiteSession
from client.site_config import SiteConfig
from client.split import assign_folds
from shared.federation import protocol as P
from shared.models.head import Head, HeadSet
from shared.plumbing.errors import IchfedError

START = Head(np.zeros((2, 512), np.float32), np.array([0.0, -0.5], np.float32))


def _part(n_pos, n_neg, seed=0):
    rng = np.random.default_rng(seed)
    y = np.array([1] * n_pos + [0] * n_neg, dtype=np.int64)
    x = (rng.normal(size=(len(y), 512)) + y[:, None] * 0.3).astype(np.float32)
    ids = tuple(f"case-{i:03d}" for i in rng.permutation(len(y)))
    return Part(features=x, labels=y, n_no_lesion=0, dice_ich=[], dice_phe=[], has_masks=False, case_ids=ids)


def test_folds_are_seeded_stratified_and_independent_of_order():
    part = _part(7, 11)
    folds = assign_folds(part.case_ids, part.labels, 5, seed=3)
    assert set(folds.tolist()) == set(range(5))
    for label, n in ((1, 7), (0, 11)):
        per_fold = np.bincount(folds[part.labels == label], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.sum() == n  # each class dealt evenly
    assert np.array_equal(assign_folds(part.case_ids, part.labels, 5, seed=3), folds)
    assert not np.array_equal(assign_folds(part.case_ids, part.labels, 5, seed=4), folds)
    order = np.arange(part.n)[::-1]
    again = assign_folds(tuple(np.asarray(part.case_ids)[order]), part.labels[order], 5, seed=3)
    assert np.array_equal(again, folds[order])  # a case keeps its fold whatever the row order
    with pytest.raises(ValueError):
        assign_folds(part.case_ids, part.labels, 1, seed=0)


def test_fold_head_k_never_trains_on_fold_k():
    part = _part(6, 8, seed=1)
    folds = case_folds(part, 3, seed=11)
    seen: dict[int, set[str]] = {}
    row_of = {x.tobytes(): cid for x, cid in zip(part.features, part.case_ids)}

    def train(start, x, y, fold):
        seen[fold] = {row_of[r.tobytes()] for r in x}
        r = train_head(start, x, y, epochs=3, learning_rate=1e-2, batch_size=8, seed=fold + 1)
        return r.head, r.loss

    heads = HeadSet(main=START, folds=(START,) * 3)
    trained, loss = train_head_set(heads, part, folds, train)
    ids = np.asarray(part.case_ids)
    assert seen[-1] == set(part.case_ids) and np.isfinite(loss)
    for k in range(3):
        assert seen[k] == set(ids[folds != k]) and seen[k].isdisjoint(ids[folds == k])
        assert not np.array_equal(trained.folds[k].weight, START.weight)
    # out-of-fold scores: each case scored by its own fold's head
    oof = cross_fit_scores(trained, part, folds)
    for k in range(3):
        rows = folds == k
        np.testing.assert_allclose(oof[rows], trained.folds[k].p_neoplastic(part.features[rows]))


def test_head_record_keys_roundtrip_and_refusal_of_other_keys():
    rng = np.random.default_rng(0)

    def head():
        return Head(rng.normal(size=(2, 512)).astype(np.float32), rng.normal(size=2).astype(np.float32))

    hs = HeadSet(main=head(), folds=(head(), head()))
    arrays = hs.to_arrays()
    assert tuple(arrays) == P.head_keys(2) and P.cross_fit_folds(arrays) == 2
    back = HeadSet.from_arrays(arrays)
    assert back.n_folds == 2 and np.array_equal(back.folds[1].bias, hs.folds[1].bias)
    assert HeadSet.from_arrays({k: arrays[k] for k in P.head_keys(0)}).n_folds == 0
    for bad in ({k: arrays[k] for k in ("weight", "bias", "fold1.weight", "fold1.bias")},  # fold 0 missing
                {**arrays, "fold2.weight": arrays["weight"]}, {"weight": arrays["weight"]}):
        with pytest.raises(IchfedError, match="head record"):
            HeadSet.from_arrays(bad)
    # the record form round-trips, and the digest names the whole record
    assert HeadSet.from_record(hs.to_record()).allclose(hs)
    assert HeadSet.from_record(hs.to_record()).digest() == hs.digest() != HeadSet.replicate(hs.main, 2).digest()
    assert HeadSet.replicate(hs.main, 3).distances(HeadSet.replicate(hs.main, 3)) == {
        "": 0.0, "fold0.": 0.0, "fold1.": 0.0, "fold2.": 0.0}


def test_session_threshold_comes_from_the_fold_heads_scores(tmp_path):
    """A main head that separates the fine-tune cases perfectly, and fold heads that did not see
    them: the threshold is the midpoint rule on the fold heads' scores, not on the main head's."""
    part = _part(6, 6, seed=2)
    config = SiteConfig(name="a", data_dir=tmp_path, state_dir=tmp_path, seed=4)
    folds = case_folds(part, 3, cross_fit_seed(config.seed))
    main = train_head(START, part.features, part.labels, epochs=60, learning_rate=1e-2, batch_size=16, seed=0).head
    fold_heads = tuple(train_head(START, part.features[folds != k], part.labels[folds != k], epochs=60,
                                  learning_rate=1e-2, batch_size=16, seed=k).head for k in range(3))
    heads = HeadSet(main=main, folds=fold_heads)
    t = SiteSession(config).threshold(heads, part, fallback=0.5)
    expected = site_threshold(part.labels, cross_fit_scores(heads, part, folds), 0.5)
    in_sample = site_threshold(part.labels, main.p_neoplastic(part.features), 0.5)
    assert t == expected and t.reason is None
    assert t.p != in_sample.p
