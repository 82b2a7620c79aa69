"""Issue 24: a resumed run reuses the segmenter phase its first run recorded (``segmenter_phase.json``):
the same signed segmenter bundle, verified again, and the sites that adopted it; a record of another
bundle's phase is refused."""

from __future__ import annotations

import types

import pytest

from shared import bundle as B
from shared.federation import protocol as P
from shared.models.head import Head
from shared.models.segment_weights import SegmenterNetwork
from shared.plumbing.errors import IchfedError


def test_resume_reads_the_recorded_phase(tmp_path, tiny_bundle):
    from server.records import FederatedBundleInfo, SegmenterPhase
    from server.segmenter_phase import resume_segmenter_phase
    from shared.plumbing.atomic import write_json

    parent = B.load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    weights = SegmenterNetwork(parent.nnunet_dir, parent.nnunet_file_hashes).weights("decoder")
    path = B.derive_bundle(parent, tmp_path / "seg", Head.from_bundle(parent), parent.threshold, "s",
                           private_key=tiny_bundle.private_key, segmenter=weights)
    seg = B.load_bundle(path, tiny_bundle.public_key)
    record = SegmenterPhase(settings={"rounds": 1}, bundle=FederatedBundleInfo(str(path), seg.hash, parent.hash, 0.5, {}),
                            decisions={"site-a (node 1)": P.ADOPTION_ACTIVATED,
                                       "site-b (node 2)": P.ADOPTION_CLEARLY_WORSE})
    write_json(tmp_path / "segmenter_phase.json", record.to_dict())
    settings = types.SimpleNamespace(public_key=tiny_bundle.public_key)
    outcome = resume_segmenter_phase(tmp_path / "segmenter_phase.json", parent, {1: "site-a", 2: "site-b"}, settings)
    assert outcome.bundle.hash == seg.hash and outcome.adopted == {1}
    other = types.SimpleNamespace(hash="f" * 64)
    with pytest.raises(IchfedError, match="segmenter phase of bundle"):
        resume_segmenter_phase(tmp_path / "segmenter_phase.json", other, {1: "site-a"}, settings)
