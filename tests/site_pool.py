"""Synthetic site folders and the sites' preprocessing written once per test session.

Several tests run sites on generated cohorts with the session's ``tiny_bundle``: Flower
simulations, the ClientApp in-process, Ray, deployments. Writing a ci cohort is cheap; preprocessing
it is not (nnU-Net segmentation and ResNet-34 embedding of every case). Two pools keep each piece
of that work to once a session:

- ``CohortPool.get(profile, n_cases, seed)``: the cohort folder, written on first use. Cohorts are
  deterministic to the byte (``simulations.cohort``), so every test asking for the same cohort
  gets the same cases. Tests must not edit a pooled folder; ``copy`` gives them their own.
- ``CachePool``: the site case cache (``client/cache.py``) is content-addressed (case bytes, mask,
  bundle hash, crop spec; the adapted cache by the cases its statistics came from), so an entry
  computed for one site is exactly the entry any other site with that case would compute.
  ``seed(state_dir)`` copies every pooled entry into a site's state folder before it runs,
  ``keep(state_dir)`` takes what it computed into the pool afterwards. Entries are copied, never
  linked, so a test that damages its own cache damages nothing else.

A test about preprocessing itself (what is cached, what survives a crash) does not seed its site.
"""

from __future__ import annotations

import shutil
from pathlib import Path


class CohortPool:
    """Cohort folders by (profile, n_cases, seed), written at ci scale on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[tuple[str, int, int], Path] = {}

    def get(self, profile: str, n_cases: int, seed: int) -> Path:
        """The shared, read-only cohort folder."""
        from simulations.cohort import write_cohort

        key = (profile, int(n_cases), int(seed))
        if key not in self._made:
            out = self.root / f"{profile}-{n_cases}-{seed}"
            write_cohort(profile, n_cases, seed, out, scale="ci")
            self._made[key] = out
        return self._made[key]

    def copy(self, profile: str, n_cases: int, seed: int, dst: Path) -> Path:
        """A private copy of the cohort at ``dst`` (for a test that edits its site folder)."""
        shutil.copytree(self.get(profile, n_cases, seed), dst)
        return dst


class CachePool:
    """Every site cache entry computed in the session, by its content address."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def seed(self, state_dir: Path) -> int:
        """Copy the pooled entries a site does not have into ``<state_dir>/cache``; returns how many files."""
        return _merge(self.root, Path(state_dir) / "cache")

    def keep(self, state_dir: Path) -> int:
        """Take the entries ``<state_dir>/cache`` computed into the pool; returns how many files."""
        cache = Path(state_dir) / "cache"
        return _merge(cache, self.root) if cache.is_dir() else 0


def _merge(src: Path, dst: Path) -> int:
    """Copy the complete entries of cache ``src`` missing in ``dst``.

    An entry is a folder whose ``case.json`` (case cache) or ``stats.json`` (adapted cache) is
    written last; an incomplete one (a site killed mid-entry) is left behind. Files of a complete
    folder are copied with the marker last, as the cache itself writes them.
    """
    n = 0
    for marker in [*src.rglob("case.json"), *src.rglob("stats.json")]:
        entry = marker.parent
        target = dst / entry.relative_to(src)
        files = sorted((f for f in entry.iterdir() if f.is_file() and not f.name.startswith(".")),  # no temp files
                       key=lambda f: f == marker)
        if not target.is_dir():
            target.mkdir(parents=True)
            shutil.copymode(entry, target)  # the adapted cache's folders are owner-only
        for f in files:
            if not (target / f.name).exists():
                shutil.copy2(f, target / f.name)
                n += 1
    return n
