"""Every seed a site derives from its config's ``seed``, in one place.

Each stage gets its own stream so that changing one (say, the number of cross-fit folds) leaves
the others (the fine-tune / held-out split, the round's training order) as they were. The split
uses the site's seed itself; the other streams are ``numpy.random.SeedSequence`` children: the
site seed is the entropy and the spawn key names the stream and its indices (round, fold), so
two streams never share a seed by arithmetic coincidence, as the earlier ``seed * 100_003 +
round`` formulas did (``fold_head_seed(0, 1, 0)`` equalled ``round_seed(0, 32)``).

Each seed is one 32-bit word of the child's state: valid for ``numpy.random.default_rng``,
``torch.Generator.manual_seed`` and scikit-learn's ``random_state`` alike. Changing a stream's
key changes every result that depends on it.
"""

from __future__ import annotations

import numpy as np

# Stream names in the spawn key; fixed forever (changing one changes that stage's results).
# 0 was reserved for the split, which keeps the site's seed itself (see split_seed).
_ROUND, _FOLD_HEAD, _CROSS_FIT, _OUT_OF_FOLD, _SEGMENTER = range(1, 6)


def _derive(entropy: int, *key: int) -> int:
    if int(entropy) < 0 or any(int(k) < 0 for k in key):
        raise ValueError(f"seeds are non-negative, got entropy {entropy} and key {key}")
    seq = np.random.SeedSequence(int(entropy), spawn_key=tuple(int(k) for k in key))
    return int(seq.generate_state(1, np.uint32)[0])


def split_seed(site_seed: int) -> int:
    """The fine-tune / held-out split (``client.split.stratified_split``): the site's seed itself.

    The split decides which cases a site never trains on; it stays what it was before the streams
    below became ``SeedSequence`` children (and what ``split.json`` records), so an upgrade never moves
    a held-out case into fine-tuning. The derived streams are hashes, so they do not meet it by formula.
    """
    if int(site_seed) < 0:
        raise ValueError(f"seeds are non-negative, got {site_seed}")
    return int(site_seed)


def round_seed(site_seed: int, server_round: int = 0) -> int:
    """Training of the main head in ``server_round``; round 0 is the local-only baseline's run."""
    return _derive(site_seed, _ROUND, server_round)


def fold_head_seed(site_seed: int, server_round: int, fold: int) -> int:
    """Training of cross-fit fold head ``fold`` in ``server_round``."""
    return _derive(site_seed, _FOLD_HEAD, server_round, fold)


def cross_fit_seed(site_seed: int) -> int:
    """The assignment of fine-tune cases to cross-fit folds (``client.split.assign_folds``)."""
    return _derive(site_seed, _CROSS_FIT)


def out_of_fold_seed(seed: int, fold: int) -> int:
    """Fold ``fold`` of the site-local out-of-fold scores (``client.calibrate.out_of_fold_scores``)."""
    return _derive(seed, _OUT_OF_FOLD, fold)


def segmenter_seed(site_seed: int, server_round: int) -> int:
    """nnU-Net's seed for the site's segmenter fine-tune in ``server_round`` (issue 24). The local-only
    segmenter uses round 1's: with one round it is exactly the site's round-1 update."""
    return _derive(site_seed, _SEGMENTER, server_round)
