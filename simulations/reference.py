"""The reference models trained on the synthetic development cohort ("the Charité-trained models").

``server.bootstrap`` trains on a site folder it is handed; this module writes that folder when
there is no real one: the ``charite-like`` cohort sized by the bootstrap recipe (``scale``,
``n_cases``), reused when it is already there. ``ichfed bootstrap`` without ``--site``, the demo
and the test suite's ``tiny_bundle`` come through here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEVELOPMENT_PROFILE = "charite-like"  # the development site's patients (a recipe may add its scanner fleet)


def development_cohort(recipe: Any, work_dir: Path, seed: int) -> tuple[Path, dict[str, Any]]:
    """Write (or reuse) ``work_dir/cohort`` for ``recipe`` (a ``server.bootstrap.BootstrapRecipe``).

    Returns the site folder and its description for the bootstrap report.
    """
    from .cohort import write_cohort

    site_dir = Path(work_dir) / "cohort"
    profile = getattr(recipe, "development_profile", DEVELOPMENT_PROFILE)
    if not (site_dir / "cases.csv").exists():
        log.info("generating the development cohort (%s, %d cases, %s scale)", profile, recipe.n_cases, recipe.scale)
        write_cohort(profile, recipe.n_cases, seed, site_dir, scale=recipe.scale)
    return site_dir, {"profile": profile, "scale": recipe.scale, "n_cases": recipe.n_cases, "seed": seed}


def bootstrap_development(recipe: Any, *, out: Path, work_dir: Path, seed: int = 0, **kwargs: Any) -> dict[str, Any]:
    """``server.bootstrap.bootstrap`` on the development cohort (written first when missing).

    ``kwargs`` go to ``bootstrap`` (``key_path``, ``device``). The bundle folder is checked
    before the cohort is written, so an existing one costs nothing.
    """
    from server.bootstrap import bootstrap, check_out

    check_out(out)
    site_dir, cohort = development_cohort(recipe, work_dir, seed)
    return bootstrap(recipe, site_dir=site_dir, out=out, work_dir=work_dir, seed=seed, cohort=cohort, **kwargs)
