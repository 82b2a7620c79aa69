"""Every seed a site derives from its config's ``seed``, in one place.

Each stage gets its own stream so that changing one (say, the number of cross-fit folds) leaves
the others (the fine-tune / held-out split, the round's training order) as they were. The
formulas are arbitrary but fixed: changing one changes every result that depends on it.
"""

from __future__ import annotations


def split_seed(site_seed: int) -> int:
    """The fine-tune / held-out split (``client.split.stratified_split``)."""
    return int(site_seed)


def round_seed(site_seed: int, server_round: int = 0) -> int:
    """Training of the main head in ``server_round``; round 0 is the local-only baseline's run."""
    return int(site_seed) * 100_003 + int(server_round)


def fold_head_seed(site_seed: int, server_round: int, fold: int) -> int:
    """Training of cross-fit fold head ``fold`` in ``server_round``."""
    return round_seed(site_seed, server_round) * 31 + int(fold) + 1


def cross_fit_seed(site_seed: int) -> int:
    """The assignment of fine-tune cases to cross-fit folds (``client.split.assign_folds``)."""
    return int(site_seed) * 7_919 + 17


def out_of_fold_seed(seed: int, fold: int) -> int:
    """Fold ``fold`` of the site-local out-of-fold scores (``client.calibrate.out_of_fold_scores``)."""
    return int(seed) * 1009 + int(fold)
