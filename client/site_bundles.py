"""The bundles a site holds: verified before use, received as records, kept in its cache.

A failure here is a ``Refusal`` with a reason code: the detail (a path, a verification
message) goes to the site's log and never into the reply.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shared.federation import protocol as P
from shared.models.head import Head
from shared.plumbing.errors import BundleVerificationError

from .site_config import SiteConfig

log = logging.getLogger(__name__)


class Refusal(Exception):
    """The site declines a request; ``reason`` is one of ``protocol.REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SiteBundles:
    """The site's verified bundles (by hash) and their reference heads, memoised per session."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self._bundles: dict[str, object] = {}
        self._reference: dict[str, Head] = {}

    @property
    def folder(self) -> Path:
        """``<state_dir>/bundles``: the content-addressed bundle cache."""
        from shared.bundle.transport import bundle_cache_dir

        return bundle_cache_dir(self.config.state_dir)

    def has(self, bundle_hash: str) -> bool:
        """Whether the cache holds a bundle folder with this hash (not yet verified)."""
        from shared.bundle.transport import cached_bundle

        return cached_bundle(self.folder, bundle_hash) is not None

    def get(self, bundle_hash: str):
        """The verified bundle with ``bundle_hash`` from the cache; raises ``Refusal``."""
        if bundle_hash in self._bundles:
            return self._bundles[bundle_hash]
        from shared.bundle import load_bundle
        from shared.bundle.transport import cached_bundle

        name = self.config.name
        path = cached_bundle(self.folder, bundle_hash)
        if path is None:
            log.error("site %s: bundle %s is not in %s", name, bundle_hash[:12], self.folder)
            raise Refusal(P.REASON_BUNDLE_MISSING)
        if self.config.public_key is None:
            log.error("site %s: no public_key in the site config, so no bundle can be verified; refusing", name)
            raise Refusal(P.REASON_BUNDLE_VERIFICATION)
        try:
            bundle = load_bundle(path, self.config.public_key)
        except BundleVerificationError as e:
            log.error("site %s: bundle %s failed verification, refusing to use it: %s", name, bundle_hash[:12], e)
            raise Refusal(P.REASON_BUNDLE_VERIFICATION) from None
        self._bundles[bundle_hash] = bundle
        return bundle

    def receive(self, arrays, config) -> str:
        """Verify and cache a bundle sent as records; returns its hash, or raises ``Refusal``."""
        from shared.bundle.transport import bundle_from_records

        name = self.config.name
        if self.config.public_key is None:
            log.error("site %s: no public_key in the site config; refusing the offered bundle", name)
            raise Refusal(P.REASON_BUNDLE_VERIFICATION)
        try:
            path = bundle_from_records(arrays, config, self.folder, self.config.public_key)
        except BundleVerificationError as e:
            log.error("site %s: received bundle failed verification, refusing it: %s", name, e)
            raise Refusal(P.REASON_BUNDLE_VERIFICATION) from None
        log.info("site %s: bundle cached at %s", name, path)
        return path.name

    def reference_head(self, bundle) -> Head:
        """The bundle's own head (before any fine-tuning)."""
        if bundle.hash not in self._reference:
            self._reference[bundle.hash] = Head.from_bundle(bundle)
        return self._reference[bundle.hash]
