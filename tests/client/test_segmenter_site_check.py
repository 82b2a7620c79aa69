"""Issue 24: `ichfed site check` says how many masked cases a site has for segmenter rounds: masked
fine-tune cases (plus masked unlabelled ones) to fine-tune on, masked held-out cases to judge a
federated segmenter on, and what is missing, before anything runs."""

from __future__ import annotations

import csv
import json

import pytest

from client.site_config import SiteConfig, write_site_config
from ichfed.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from simulations.cohort import write_cohort

    root = tmp_path_factory.mktemp("segcheck") / "data"
    write_cohort("hamburg-like", 12, 9, root, scale="ci")
    return root


def _config(tmp_path, data, **fields):
    cfg = SiteConfig(name="site-a", data_dir=data, state_dir=tmp_path / "state", fine_tune_fraction=0.5, **fields)
    return write_site_config(cfg, tmp_path / "site.toml")


def test_site_check_counts_masked_cases_per_part(tmp_path, cohort, capsys):
    from client.site_check import check_site

    report = check_site(_config(tmp_path, cohort, segmenter_fine_tune=True), open_images=False)
    seg, split = report["segmenter"], report["split"]
    assert seg["opted_in"] and seg["masked_fine_tune"] == split["n_fine_tune"] and seg["masked_unlabelled"] == 0
    assert seg["masked_held_out"] == split["n_held_out"] == 12 - split["n_fine_tune"]
    assert seg["would_fine_tune"] and not seg["warnings"]
    rc = main(["site", "check", str(tmp_path / "site.toml"), "--headers-only"])
    out = capsys.readouterr().out
    assert f"segmenter   {seg['masked_fine_tune']} masked fine-tune case(s)" in out and "segmenter_fine_tune on" in out
    assert rc in (0, 1)
    main(["site", "check", str(tmp_path / "site.toml"), "--headers-only", "--json"])
    assert json.loads(capsys.readouterr().out)["segmenter"]["masked_held_out"] == seg["masked_held_out"]


def test_too_few_masks_are_named_with_the_fix(tmp_path, cohort):
    """Masks on two fine-tune cases only: the site will not fine-tune the segmenter, and with no masked
    held-out case it cannot check a federated one (it keeps the reference)."""
    import shutil

    from client.site_check import check_site
    from client.split import stratified_split

    data = tmp_path / "data"
    shutil.copytree(cohort, data)
    rows = list(csv.DictReader((data / "cases.csv").open(encoding="utf-8")))
    labels = {r["case_id"]: int(r["label"] == "neoplastic") for r in rows}
    split = stratified_split(labels, 0.5, 0)  # the site's seed 0: the split the run will use
    keep = set(split.fine_tune[:2])
    for f in (data / "masks").iterdir():
        if f.name.split(".")[0] not in keep:
            f.unlink()
    report = check_site(_config(tmp_path, data, segmenter_fine_tune=True), open_images=False)
    seg = report["segmenter"]
    assert (seg["masked_fine_tune"], seg["masked_held_out"], seg["would_fine_tune"]) == (2, 0, False)
    assert any("will not fine-tune the segmenter" in w and "fine_tune_fraction" in w for w in seg["warnings"])
    assert any("keeps the reference one" in w for w in seg["warnings"])
