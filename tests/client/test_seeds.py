"""Issue 23: the site's seed streams (``client.seeds``) are SeedSequence children that never collide."""

from __future__ import annotations

import itertools

import pytest

from client import seeds


def _all_streams(site_seeds, rounds, folds) -> list[tuple[str, tuple, int]]:
    out = []
    for s in site_seeds:
        out += [("split", (s,), seeds.split_seed(s)), ("cross_fit", (s,), seeds.cross_fit_seed(s))]
        out += [("oof", (s, k), seeds.out_of_fold_seed(s, k)) for k in folds]
        for r in rounds:
            out.append(("round", (s, r), seeds.round_seed(s, r)))
            out += [("fold_head", (s, r, k), seeds.fold_head_seed(s, r, k)) for k in folds]
    return out


def test_the_reported_collision_is_gone():
    # The arithmetic formulas gave fold_head_seed(0, 1, 0) == round_seed(0, 32) == 32.
    assert seeds.fold_head_seed(0, 1, 0) != seeds.round_seed(0, 32)


def test_no_two_streams_share_a_seed_over_a_realistic_grid():
    values = _all_streams(range(6), range(0, 51), range(10))
    by_value: dict[int, tuple] = {}
    for name, args, v in values:
        assert v not in by_value, f"{name}{args} == {by_value[v][0]}{by_value[v][1]} == {v}"
        by_value[v] = (name, args)
    assert len(by_value) == len(values) > 3000


def test_seeds_are_fixed_32_bit_and_accepted_by_every_consumer():
    import numpy as np
    import torch
    from sklearn.model_selection import KFold

    a = [seeds.round_seed(2**31 - 1, r) for r in range(5)]
    assert a == [seeds.round_seed(2**31 - 1, r) for r in range(5)]  # deterministic
    for v in a + [seeds.split_seed(7), seeds.fold_head_seed(3, 4, 5)]:
        assert 0 <= v < 2**32
        np.random.default_rng(v), torch.Generator().manual_seed(v)
        KFold(n_splits=2, shuffle=True, random_state=v).split(np.zeros((4, 1)))
    with pytest.raises(ValueError):
        seeds.round_seed(-1, 0)


@pytest.mark.parametrize("stream", ["cross_fit_seed", "round_seed"])
def test_neighbouring_site_seeds_give_unrelated_seeds(stream):
    f = getattr(seeds, stream)
    values = [f(s) for s in range(200)]
    assert len(set(values)) == 200
    assert not any(b - a == 1 for a, b in itertools.pairwise(values))  # not the identity or a shift


def test_the_split_keeps_the_sites_seed_so_an_upgrade_moves_no_held_out_case():
    assert [seeds.split_seed(s) for s in (0, 7, 2**31 - 1)] == [0, 7, 2**31 - 1]
