"""Issue 21 items 6-7: models that are not numbers.

Every hostile bundle here is real: a bundle created by ``create_bundle`` from a freshly built
ResNet-34, with its head (or a backbone tensor) replaced by NaN, infinity, 1e30 or a (5, 512)
matrix, re-hashed and signed with the bundle's own key as a key holder (or a compromised build)
would. ``sign``, ``verify``, ``upgrade`` and every load must refuse it with one line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from shared import bundle as B  # noqa: E402
from shared.models.head import MAX_HEAD_ABS, Head  # noqa: E402
from shared.plumbing.config import CropSpec  # noqa: E402
from shared.plumbing.errors import BundleVerificationError, IchfedError  # noqa: E402
from shared.security import keys  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A signed v2 bundle from a freshly initialised ResNet-34 and an nnU-Net-shaped folder; its keys."""
    from shared.models.classifier import build_model

    root = tmp_path_factory.mktemp("weights")
    priv, pub = keys.generate_keypair(root / "keys")
    torch.manual_seed(0)
    model = build_model()
    nnunet = root / "nnunet_model"
    (nnunet / "fold_all").mkdir(parents=True)
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ICH": 1, "PHE": 2}}), encoding="utf-8")
    (nnunet / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}), encoding="utf-8")
    (nnunet / "fold_all" / "checkpoint_final.pth").write_bytes(os.urandom(1024))
    bundle = B.create_bundle(root / "bundle", model, nnunet, threshold=0.3, crop_spec=CropSpec(size_xyz=(32, 32, 8)),
                             cohort={"n_cases": 10}, name="w", version="1", private_key=priv)
    return {"bundle": bundle, "priv": priv, "pub": pub, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _cli(capsys, *argv: str) -> tuple[int, str]:
    from ichfed.cli import main

    capsys.readouterr()
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def _copy(src: Path, dst: Path) -> Path:
    """A hard-linked copy (the classifier is 130 MB); files are only ever replaced (new inode), never edited."""
    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    return Path(shutil.copytree(src, dst, copy_function=link))


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _rehash(root: Path, edit=None) -> None:
    manifest = json.loads((root / B.MANIFEST).read_text("utf-8"))
    manifest["files"] = {rel: B.sha256_file(p) for rel, p in sorted(B.scan_files(root).items())}
    if edit is not None:
        edit(manifest)
    _replace(root / B.MANIFEST, B.manifest_bytes(manifest))


def _force_sign(root: Path, priv: Path) -> None:
    """Sign the manifest directly, as a build that skipped ``bundle sign``'s checks would."""
    raw = (root / B.MANIFEST).read_bytes()
    _replace(root / B.SIGNATURE, B.signature_blob(raw, keys.load_private_key(priv)))


def _head(weight, bias=None) -> dict:
    w = torch.as_tensor(np.asarray(weight, np.float32))
    return {"fc.weight": w, "fc.bias": torch.zeros(2) if bias is None else torch.as_tensor(np.asarray(bias, np.float32))}


def _normal_head(scale: float = 0.05):
    return np.random.default_rng(0).normal(scale=scale, size=(2, 512)).astype(np.float32)


HOSTILE = {
    "nan-head": lambda: _head(np.where(np.arange(1024).reshape(2, 512) == 7, np.nan, _normal_head())),
    "inf-bias": lambda: _head(_normal_head(), [np.inf, 0.0]),
    "1e30-head": lambda: _head(np.full((2, 512), 1e30)),
    "5x512-head": lambda: _head(np.zeros((5, 512))),
}
EXPECTED = {
    "nan-head": "head weight holds 1 NaN or infinite value(s)",
    "inf-bias": "head bias holds 1 NaN or infinite value(s)",
    "1e30-head": f"head weight holds a value of magnitude 1e+30, above the bound of {MAX_HEAD_ABS:g}",
    "5x512-head": "head weight has shape (5, 512), expected (2, 512)",
}


def _hostile_v2(made, tmp_path, name: str) -> Path:
    from shared.models.classifier import save_weights

    root = _copy(made["bundle"], tmp_path / name)
    save_weights(HOSTILE[name](), root / "head.safetensors")
    _rehash(root)
    return root


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_bundle_sign_refuses_a_head_that_is_not_a_trained_heads_numbers(made, tmp_path, capsys, name):
    root = _hostile_v2(made, tmp_path, name)
    with pytest.raises(IchfedError, match=re.escape(EXPECTED[name])):
        B.sign_bundle(root, made["priv"])
    rc, err = _cli(capsys, "bundle", "sign", str(root), "--key", str(made["priv"]))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and EXPECTED[name] in err


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_signed_hostile_head_fails_verify_and_every_load(made, tmp_path, capsys, name):
    root = _hostile_v2(made, tmp_path, name)
    _force_sign(root, made["priv"])
    bundle = B.load_bundle(root, made["pub"])  # signature and hashes are fine: only the numbers are wrong
    rc, err = _cli(capsys, "bundle", "verify", str(root), "--pubkey", str(made["pub"]))
    assert rc == 2 and err.count("\n") == 1 and EXPECTED[name] in err, err
    with pytest.raises(BundleVerificationError, match="expected|NaN or infinite|above the bound"):
        B.verify_bundle(root, made["pub"])
    for use in (Head.from_bundle, lambda b: b.build_classifier(), lambda b: b.classifier_weights()):
        with pytest.raises(BundleVerificationError) as e:
            use(bundle)
        assert EXPECTED[name] in str(e.value)


def test_a_nan_in_the_backbone_fails_sign_verify_and_load(made, tmp_path, capsys):
    from shared.models.classifier import save_weights

    root = _copy(made["bundle"], tmp_path / "nanbackbone")
    state = {k: v.clone() for k, v in made["state"].items() if not k.startswith("fc.")}
    state["layer3.1.conv2.weight"].view(-1)[123] = float("nan")
    save_weights(state, root / "classifier.safetensors")
    _rehash(root)
    with pytest.raises(IchfedError, match="tensor 'layer3.1.conv2.weight' holds 1 NaN or infinite value"):
        B.sign_bundle(root, made["priv"])
    _force_sign(root, made["priv"])
    rc, err = _cli(capsys, "bundle", "verify", str(root), "--pubkey", str(made["pub"]))
    assert rc == 2 and "layer3.1.conv2.weight" in err
    with pytest.raises(BundleVerificationError, match="layer3.1.conv2.weight"):
        B.load_bundle(root, made["pub"]).build_classifier()


def test_the_head_bound_leaves_trained_heads_alone(made, tmp_path):
    """A head inside the bound signs and loads; the cached reference bundle's trained head is far inside it."""
    from shared.models.classifier import save_weights

    root = _copy(made["bundle"], tmp_path / "big-but-bounded")
    save_weights(_head(np.full((2, 512), 0.5 * MAX_HEAD_ABS)), root / "head.safetensors")
    _rehash(root)
    B.sign_bundle(root, made["priv"])
    assert Head.from_bundle(B.load_bundle(root, made["pub"])).weight.max() == pytest.approx(0.5 * MAX_HEAD_ABS)
    assert np.abs(Head.from_bundle(B.load_bundle(made["bundle"], made["pub"])).weight).max() < 0.1


def _hostile_v1(made, tmp_path, name: str) -> Path:
    """A v1 bundle (the whole classifier in one file) whose head is hostile or absent, validly signed."""
    from shared.models.classifier import save_weights

    root = _copy(made["bundle"], tmp_path / f"v1-{name}")
    state = {k: v.clone() for k, v in made["state"].items()}
    if name == "missing-head":
        del state["fc.weight"], state["fc.bias"]
    else:
        state.update(HOSTILE[name]())
    save_weights(state, root / "classifier.safetensors")
    (root / "head.safetensors").unlink()

    def v1(manifest):
        manifest["format_version"] = 1
        del manifest["classifier"]["head_file"]

    _rehash(root, v1)
    _force_sign(root, made["priv"])
    return root


@pytest.mark.parametrize("name, expected", [
    ("nan-head", EXPECTED["nan-head"]),
    ("5x512-head", EXPECTED["5x512-head"]),
    ("missing-head", "no head (fc.weight, fc.bias missing)"),
])
def test_bundle_upgrade_of_a_hostile_v1_runs_the_checks_of_sign(made, tmp_path, capsys, name, expected):
    root = _hostile_v1(made, tmp_path, name)
    out = tmp_path / f"v2-{name}"
    rc, err = _cli(capsys, "bundle", "upgrade", str(root), str(out), "--pubkey", str(made["pub"]),
                   "--key", str(made["priv"]))
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not out.exists()  # nothing was signed or left behind
    with pytest.raises(IchfedError, match=re.escape(expected)):
        B.sign_bundle(root, made["priv"])  # the same verdict as bundle sign


@pytest.mark.slow
def test_predict_with_a_signed_nan_head_is_an_error_not_p_nan(tiny_bundle, tmp_path):
    """Before: exit 0, p = NaN, "non-neoplastic". Now: one line, exit 2."""
    from shared.models.classifier import save_weights
    from tests.shared.test_pipeline import UNSEEN_CASE, write_synthetic_case

    width = B.load_bundle(tiny_bundle.path, tiny_bundle.public_key).head_inputs.n_features  # 515: hybrid
    root = _copy(tiny_bundle.path, tmp_path / "nan")
    save_weights(_head(np.full((2, width), np.nan)), root / "head.safetensors")
    _rehash(root)
    _force_sign(root, tiny_bundle.private_key)
    case = tmp_path / "case.nii.gz"
    write_synthetic_case(UNSEEN_CASE, case)
    r = subprocess.run([sys.executable, "-m", "ichfed", "predict", "--bundle", str(root), "--pubkey",
                        str(tiny_bundle.public_key), "--json", "--device", "cpu", str(case)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, encoding="utf-8",
                       env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"head weight holds {2 * width} NaN or infinite value(s)" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
