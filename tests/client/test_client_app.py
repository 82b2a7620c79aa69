"""The real ClientApp, called in-process with real Flower messages and the real tiny bundle:
bundle offer and delivery, refusal of a tampered bundle, a training round, and the reply sizes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from client.app import build_client_app
from client.site_config import SiteConfig, write_site_config
from shared.bundle.transport import bundle_to_records, message_size
from shared.federation import protocol as P

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    from simulations.cohort import write_cohort

    out = tmp_path_factory.mktemp("client_site") / "data"
    write_cohort("community-hospital", 10, 21, out, scale="ci")
    return out


def _site(tmp_path, site_dir, public_key, name="site-a", fraction=0.9, state=None):
    # 0.9 of 10 cases keeps one case per class held out and leaves at least the floor (5) to fine-tune on
    cfg = SiteConfig(name=name, data_dir=site_dir, state_dir=tmp_path / (state or name), public_key=public_key,
                     device="cpu", local_epochs=3, fine_tune_fraction=fraction)
    return write_site_config(cfg, tmp_path / f"{name}.toml")


def _call(app, config_path, message_type, content):
    msg = Message(content=content, dst_node_id=5, message_type=message_type)
    ctx = Context(run_id=1, node_id=5, node_config={"site-config": str(config_path)}, state=RecordDict(), run_config={})
    return app(msg, ctx)


def _offer(bundle_hash, records=None, trains=False):
    content = RecordDict({P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle_hash, P.CFG_DELIVER: records is not None,
                                                  P.CFG_TRAINS: trains})})
    if records is not None:
        content[P.BUNDLE_ARRAYS], content[P.BUNDLE_CONFIG] = records
    return content


def test_site_receives_verifies_caches_and_trains(tiny_bundle, site_dir, tmp_path, flwr_task):
    from shared.bundle import load_bundle

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    app = build_client_app()
    cfg = _site(tmp_path, site_dir, tiny_bundle.public_key)

    reply = _call(app, cfg, P.QUERY_BUNDLE, _offer(bundle.hash))
    assert reply.content[P.INFO][P.INFO_STATUS] == P.STATUS_NEED
    reply = _call(app, cfg, P.QUERY_BUNDLE, _offer(bundle.hash, bundle_to_records(bundle.path)))
    assert reply.content[P.INFO][P.INFO_STATUS] == P.STATUS_HAVE
    assert (tmp_path / "site-a" / "bundles" / bundle.hash / "manifest.json").is_file()
    # a second offer finds it in the cache
    assert _call(app, cfg, P.QUERY_BUNDLE, _offer(bundle.hash)).content[P.INFO][P.INFO_STATUS] == P.STATUS_HAVE

    from shared.models.head import Head

    head = Head.from_bundle(bundle).to_arrays()
    train = RecordDict({P.HEAD: ArrayRecord({k: Array(v) for k, v in head.items()}),
                        P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_ROUND: 1})})
    reply = _call(app, cfg, P.TRAIN, train)
    assert reply.content[P.INFO][P.INFO_STATUS] == P.STATUS_OK, reply.content[P.INFO]
    new = reply.content[P.HEAD]["weight"].numpy()
    assert new.shape == head["weight"].shape == (2, bundle.head_inputs.n_features)
    assert not np.array_equal(new, head["weight"])
    n = reply.content[P.METRICS][P.NUM_EXAMPLES]
    assert n == reply.content[P.METRICS][P.N_FINE_TUNE] >= P.MIN_CASES_FLOOR
    size = message_size(reply)
    assert size <= 16 * 1024, f"a training reply is {size} bytes"
    print(f"training reply: {size} bytes")
    # every case is now in the cache: a repeat hits it and does not rebuild the predictor
    cache_files = sorted(p for p in (tmp_path / "site-a" / "cache").rglob("case.json"))
    assert len(cache_files) >= 5
    mtimes = [p.stat().st_mtime_ns for p in cache_files]
    reply = _call(app, cfg, P.EVALUATE, train)
    m = reply.content[P.METRICS]
    assert m["global.withheld"] == 1 and "global.n" not in m  # 1-2 held-out cases: not even their count leaves
    assert [p.stat().st_mtime_ns for p in cache_files] == mtimes

    # the same cases split 0.4 / 0.6 leave fewer fine-tune cases than the floor: no head update, and why
    small = _site(tmp_path, site_dir, tiny_bundle.public_key, name="site-small", fraction=0.4, state="site-a")
    reply = _call(app, small, P.TRAIN, train)
    info = reply.content[P.INFO]
    assert info[P.INFO_STATUS] == P.STATUS_REFUSED and info[P.INFO_REASON] == P.REASON_TOO_FEW
    assert P.HEAD not in reply.content


def test_a_site_too_small_for_its_split_refuses_the_first_message(tiny_bundle, site_dir, tmp_path, flwr_task):
    """Issue 22: the default fine-tune fraction 0.2 of 10 cases gives 2 fine-tune cases, below the floor
    of 5; the site says so in its reply to the bundle offer, before any bundle is sent or case read."""
    from shared.bundle import load_bundle

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    app = build_client_app()
    small = _site(tmp_path, site_dir, tiny_bundle.public_key, name="small", fraction=0.2)
    reply = _call(app, small, P.QUERY_BUNDLE, _offer(bundle.hash, trains=True))
    info = reply.content[P.INFO]
    assert (info[P.INFO_STATUS], info[P.INFO_REASON]) == (P.STATUS_REFUSED, P.REASON_TOO_FEW)
    assert P.METRICS not in reply.content  # a count below the floor does not leave the site
    assert not (tmp_path / "small" / "cache").exists()  # nothing was preprocessed
    # a site that can run says how many fine-tune cases it plans; a stats run (trains=False) asks nothing
    ok = _site(tmp_path, site_dir, tiny_bundle.public_key, name="ok", fraction=0.9)
    reply = _call(app, ok, P.QUERY_BUNDLE, _offer(bundle.hash, trains=True))
    assert reply.content[P.INFO][P.INFO_STATUS] == P.STATUS_NEED and reply.content[P.METRICS][P.N_FINE_TUNE] >= 5
    assert P.METRICS not in _call(app, small, P.QUERY_BUNDLE, _offer(bundle.hash)).content


def test_tampered_or_foreign_bundle_is_refused_and_logged(tiny_bundle, site_dir, tmp_path, flwr_task, caplog):
    from shared.bundle import load_bundle
    from shared.security.keys import generate_keypair

    bundle = load_bundle(tiny_bundle.path, tiny_bundle.public_key)
    app = build_client_app()
    arrays, config = bundle_to_records(bundle.path)
    data = arrays["classifier.safetensors"].numpy().copy()
    data[len(data) // 2] ^= 0xFF
    tampered = ArrayRecord({k: (Array(data) if k == "classifier.safetensors" else v) for k, v in arrays.items()})

    cfg = _site(tmp_path, site_dir, tiny_bundle.public_key, name="site-t")
    with caplog.at_level(logging.ERROR, logger="client.app"):
        reply = _call(app, cfg, P.QUERY_BUNDLE, _offer(bundle.hash, (tampered, config)))
    info = reply.content[P.INFO]
    assert info[P.INFO_STATUS] == P.STATUS_REFUSED and info[P.INFO_REASON] == P.REASON_BUNDLE_VERIFICATION
    assert any("site-t" in r.message and "verification" in r.message for r in caplog.records)
    assert not (tmp_path / "site-t" / "bundles" / bundle.hash).exists()
    # and it refuses to train on it
    train = RecordDict({P.HEAD: ArrayRecord({"weight": Array(np.zeros((2, 512), np.float32)),
                                             "bias": Array(np.zeros(2, np.float32))}),
                        P.CONFIG: ConfigRecord({P.CFG_BUNDLE_HASH: bundle.hash, P.CFG_ROUND: 1})})
    reply = _call(app, cfg, P.TRAIN, train)
    assert reply.content[P.INFO][P.INFO_STATUS] == P.STATUS_REFUSED and P.HEAD not in reply.content

    _, other_pub = generate_keypair(tmp_path / "other")
    cfg = _site(tmp_path, site_dir, other_pub, name="site-f")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="client.app"):
        reply = _call(app, cfg, P.QUERY_BUNDLE, _offer(bundle.hash, (arrays, config)))
    assert reply.content[P.INFO][P.INFO_REASON] == P.REASON_BUNDLE_VERIFICATION
    assert any("site-f" in r.message for r in caplog.records)
