"""Former home of the site's runtime, kept only so that older imports still resolve.

The runtime was split by job (issue 10); import from the new modules:

- ``client.site_config``: ``SiteConfig``, ``load_site_config``, ``write_site_config``
- ``client.split``: ``SiteSplit`` (was ``Split``), ``stratified_split``, ``assign_folds``
- ``client.features``: ``Part``, ``SiteFeatures``, ``FeatureStore`` (was ``SiteRuntime.features``)
- ``client.overlay``: the site's threshold and calibration per bundle (was ``save/load_local_threshold``)
- ``client.session.SiteSession``: calibration and evaluation of a head (was ``SiteRuntime.calibrate/evaluate``)
"""

from __future__ import annotations

from .features import Part, SiteFeatures
from .site_config import SiteConfig, load_site_config, write_site_config
from .split import stratified_split

__all__ = ["Part", "SiteConfig", "SiteFeatures", "load_site_config", "stratified_split", "write_site_config"]
