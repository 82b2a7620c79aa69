"""Issue 24: what a site refuses of a segmenter round before any work: a round for a site that did not opt
in, a fine-tune longer than the site allows (``segmenter_max_iterations``) and settings outside the
fine-tune's ranges; each a refusal whose code the ClientApp sends (``client.app.handle``)."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, RecordDict

from client.session import SiteSession
from client.site_bundles import Refusal
from client.site_config import SiteConfig
from shared.federation import protocol as P


def _content(epochs: int, iterations: int) -> RecordDict:
    return RecordDict({P.CONFIG: ConfigRecord({
        P.CFG_BUNDLE_HASH: "a" * 64, P.CFG_ROUND: 1, P.CFG_SEG_TRAINABLE: "all", P.CFG_SEG_EPOCHS: epochs,
        P.CFG_SEG_ITERATIONS: iterations, P.CFG_SEG_LEARNING_RATE: 1e-3})})


@pytest.mark.parametrize("opted_in, epochs, reason", [
    (False, 10, P.REASON_SEGMENTER_OFF),
    (True, 1000, P.REASON_SEGMENTER_BUDGET),  # 1000 x 15 iterations against the site's 2000
])
def test_refused_before_any_work(tmp_path, opted_in, epochs, reason):
    cfg = SiteConfig(name="site-a", data_dir=tmp_path / "data", state_dir=tmp_path / "state",
                     segmenter_fine_tune=opted_in)
    with pytest.raises(Refusal) as e:
        SiteSession(cfg).train_segmenter(_content(epochs, 15))
    assert e.value.reason == reason
    assert not (tmp_path / "state" / "segmenter").exists()


def test_bad_settings_from_the_server_are_refused(tmp_path):
    cfg = SiteConfig(name="site-a", data_dir=tmp_path / "data", state_dir=tmp_path / "state", segmenter_fine_tune=True)
    content = _content(10, 15)
    content[P.CONFIG][P.CFG_SEG_TRAINABLE] = "everything"
    with pytest.raises(Refusal) as e:
        SiteSession(cfg).train_segmenter(content)
    assert e.value.reason == P.REASON_SITE_ERROR
