"""Signed model bundles: create, sign, verify, refuse tampering, tar round trip, CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import stat
import tarfile

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from shared import bundle as B  # noqa: E402
from shared.plumbing.config import CropSpec  # noqa: E402
from shared.plumbing.errors import BundleVerificationError, IchfedError  # noqa: E402
from shared.security import keys  # noqa: E402

CROP = CropSpec(size_xyz=(32, 32, 8))


def _cli(*argv: str) -> int:
    from ichfed.cli import main

    return main(list(argv))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two key pairs, classifier weights and an nnU-Net-shaped model folder, made once."""
    from shared.models.classifier import build_model, save_weights

    root = tmp_path_factory.mktemp("bundle_parts")
    priv, pub = keys.generate_keypair(root / "keys")
    other_priv, other_pub = keys.generate_keypair(root / "other_keys")
    torch.manual_seed(0)
    model = build_model()
    weights = root / "classifier.safetensors"
    save_weights(model, weights)
    nnunet = root / "Dataset501_ICH" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (nnunet / "fold_all").mkdir(parents=True)
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "ICH": 1, "PHE": 2}}), encoding="utf-8")
    (nnunet / "plans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}), encoding="utf-8")
    (nnunet / "fold_all" / "checkpoint_final.pth").write_bytes(os.urandom(4096))
    return {
        "root": root,
        "priv": priv,
        "pub": pub,
        "other_priv": other_priv,
        "other_pub": other_pub,
        "weights": weights,
        "nnunet": nnunet,
        "model": model,
    }


@pytest.fixture(scope="module")
def signed(parts):
    return B.create_bundle(
        parts["root"] / "bundle",
        parts["weights"],
        parts["nnunet"],
        threshold=0.22,
        crop_spec=CROP,
        cohort={"profile": "charite-like", "n_cases": 40},
        name="test-model",
        version="1.2.3",
        lineage={"rounds": 0},
        private_key=parts["priv"],
    )


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def test_keygen_permissions_and_no_overwrite(parts):
    priv = parts["priv"]
    assert stat.S_IMODE(priv.stat().st_mode) == 0o600
    assert priv.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert parts["pub"].read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with pytest.raises(IchfedError, match="already exists; refusing to overwrite a key"):
        keys.generate_keypair(priv.parent)


def test_create_sign_verify_and_load(parts, signed):
    names = sorted(p.relative_to(signed).as_posix() for p in signed.rglob("*") if p.is_file())
    assert names == [
        "classifier.safetensors",
        "head.safetensors",
        "manifest.json",
        "manifest.sig",
        "nnunet/dataset.json",
        "nnunet/fold_all/checkpoint_final.pth",
        "nnunet/plans.json",
    ]
    manifest = B.verify_bundle(signed, parts["pub"])
    assert (manifest.name, manifest.version) == ("test-model", "1.2.3")
    assert manifest.threshold.p == 0.22 and math.isclose(manifest.threshold.log_p, math.log(0.22))
    assert manifest.crop == CROP
    assert manifest.cohort == {"profile": "charite-like", "n_cases": 40}
    assert manifest.lineage == {"rounds": 0}
    assert set(manifest.packages) >= {"torch", "monai", "nnunetv2", "SimpleITK", "ichfed"}
    assert torch.__version__.startswith(manifest.packages["torch"].split("+")[0])
    # every non-manifest file is hashed
    assert set(manifest.files) == set(names) - {"manifest.json", "manifest.sig"}
    assert manifest.files["nnunet/plans.json"] == B.sha256_file(signed / "nnunet/plans.json")

    bundle = B.load_bundle(signed, parts["pub"])
    assert bundle.hash == B.bundle_hash(signed) == B.sha256_file(signed / "manifest.json")
    assert bundle.signed_by == keys.fingerprint(keys.load_public_key(parts["pub"]))
    assert bundle.crop_spec == CROP and bundle.threshold.p == 0.22
    assert bundle.nnunet_dir == signed / "nnunet" and bundle.classifier_path.is_file()
    model = bundle.build_classifier("cpu")
    for k, v in parts["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not model.training
    assert not [p for p in signed.parent.iterdir() if p.name.startswith(".bundle.")], "temp build dir left behind"
    # layout v2: the head in its own file, the backbone without it; the model is their union
    assert manifest.format_version == 2 and bundle.head_path == signed / "head.safetensors"
    from shared.models.classifier import load_weights

    assert sorted(load_weights(bundle.head_path)) == ["fc.bias", "fc.weight"]
    assert "fc.weight" not in load_weights(bundle.classifier_path)


def test_create_refuses_bad_inputs(parts, tmp_path):
    args = dict(crop_spec=CROP, cohort={}, name="m", version="1")
    with pytest.raises(IchfedError, match="already exists"):
        B.create_bundle(parts["root"] / "bundle", parts["weights"], parts["nnunet"], 0.5, **args)
    with pytest.raises(IchfedError, match="plans.json missing"):
        bad = tmp_path / "nn"
        (bad / "fold_0").mkdir(parents=True)
        (bad / "dataset.json").write_text("{}", encoding="utf-8")
        B.create_bundle(tmp_path / "b1", parts["weights"], bad, 0.5, **args)
    with pytest.raises(IchfedError, match="threshold: must lie strictly between 0 and 1"):
        B.create_bundle(tmp_path / "b2", parts["weights"], parts["nnunet"], 1.5, **args)
    with pytest.raises(IchfedError, match="weights do not fit the 3D ResNet-34"):
        B.create_bundle(tmp_path / "b3", {"fc.weight": torch.zeros(2, 512)}, parts["nnunet"], 0.5, **args)
    assert not list(tmp_path.glob("b*")) and not list(tmp_path.glob(".b*"))


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda b: (b / "nnunet/fold_all/checkpoint_final.pth").write_bytes(b"\0" * 4096), "sha256 does not match manifest"),
        (lambda b: (b / "nnunet/fold_all/extra.pth").write_bytes(b"x"), "not listed in manifest"),
        (lambda b: (b / "nnunet/plans.json").unlink(), "listed in manifest but missing"),
        (
            lambda b: (b / "manifest.json").write_text(
                (b / "manifest.json").read_text(encoding="utf-8").replace('"p": 0.22', '"p": 0.01'), encoding="utf-8"
            ),
            "signature does not match",
        ),
        (lambda b: (b / "manifest.sig").unlink(), "bundle is unsigned"),
    ],
    ids=["changed", "added", "removed", "manifest-edited", "signature-removed"],
)
def test_tampered_bundle_is_refused(signed, parts, tmp_path, tamper, message):
    copy = _copy(signed, tmp_path)
    tamper(copy)
    with pytest.raises(BundleVerificationError, match=message) as e:
        B.load_bundle(copy, parts["pub"])
    assert "\n" not in str(e.value)


def test_wrong_key_is_refused(signed, parts, tmp_path):
    with pytest.raises(BundleVerificationError, match="not by the given public key"):
        B.load_bundle(signed, parts["other_pub"])
    # A forger who also rewrites the key fingerprint in the signature file still fails.
    copy = _copy(signed, tmp_path)
    sig = json.loads((copy / "manifest.sig").read_text(encoding="utf-8"))
    sig["key_fingerprint"] = keys.fingerprint(keys.load_public_key(parts["other_pub"]))
    (copy / "manifest.sig").write_text(json.dumps(sig), encoding="utf-8")
    with pytest.raises(BundleVerificationError, match="signature does not match"):
        B.load_bundle(copy, parts["other_pub"])


def test_unsigned_refused_unless_allowed(parts, tmp_path, caplog):
    unsigned = B.create_bundle(
        tmp_path / "unsigned", parts["weights"], parts["nnunet"], 0.5, CROP, {}, "u", "0.1"
    )
    assert not (unsigned / "manifest.sig").exists()
    with pytest.raises(BundleVerificationError, match="bundle is unsigned"):
        B.load_bundle(unsigned, parts["pub"])
    with pytest.raises(BundleVerificationError, match="no public key given"):
        B.load_bundle(unsigned, None)
    with caplog.at_level("WARNING", logger="shared.bundle"):
        bundle = B.load_bundle(unsigned, None, allow_unsigned=True)
    assert bundle.signed_by is None and bundle.manifest.name == "u"
    assert any("WITHOUT signature verification" in r.message for r in caplog.records)
    # allow_unsigned still checks every file hash
    (unsigned / "classifier.safetensors").write_bytes(b"changed")
    with pytest.raises(BundleVerificationError, match="sha256 does not match"):
        B.load_bundle(unsigned, None, allow_unsigned=True)
    # signing refuses to bless files that do not match the manifest
    with pytest.raises(BundleVerificationError, match="sha256 does not match"):
        B.sign_bundle(unsigned, parts["priv"])


def test_sign_then_verify(parts, tmp_path):
    path = B.create_bundle(tmp_path / "b", parts["weights"], parts["nnunet"], 0.4, CROP, {}, "s", "1")
    digest = B.sign_bundle(path, parts["priv"])
    assert digest == B.bundle_hash(path)
    assert B.load_bundle(path, parts["pub"]).hash == digest


def test_derive_bundle_records_parent(parts, signed, tmp_path):
    from shared.models.head import Head

    parent = B.load_bundle(signed, parts["pub"])
    head = Head(torch.randn(2, 512, generator=torch.Generator().manual_seed(1)), torch.tensor([0.1, -0.1]))
    child = B.derive_bundle(
        parent, tmp_path / "child", head, 0.3, version="1.2.3+fl1", lineage={"rounds": 3, "n_sites": 2},
        private_key=parts["priv"],
    )
    m = B.verify_bundle(child, parts["pub"])
    assert m.lineage == {"parent_hash": parent.hash, "parent_name": "test-model", "parent_version": "1.2.3", "rounds": 3, "n_sites": 2}
    assert m.crop == parent.crop_spec and m.format_version == 2
    # only the head differs; every other file is the parent's, hard-linked
    assert {k for k in m.files if m.files[k] != parent.manifest.files[k]} == {"head.safetensors"}
    assert (child / "classifier.safetensors").stat().st_ino == (signed / "classifier.safetensors").stat().st_ino
    model = B.load_bundle(child, parts["pub"]).build_classifier("cpu")
    assert torch.equal(model.fc.weight, torch.from_numpy(head.weight))
    assert torch.equal(model.conv1.weight, parts["model"].conv1.weight)
    with pytest.raises(IchfedError, match=r"main head: head weight has shape \(2, 3\), expected \(2, 512\)"):
        B.derive_bundle(parent, tmp_path / "bad", Head(torch.zeros(2, 3), torch.zeros(2)), 0.3, "x")
    with pytest.raises(IchfedError, match="'bias' holds NaN or Inf"):
        B.derive_bundle(parent, tmp_path / "bad", Head(torch.zeros(2, 512), torch.tensor([0.0, float("nan")])), 0.3, "x")
    with pytest.raises(IchfedError, match="expected a shared.models.head.Head, got OrderedDict"):
        B.derive_bundle(parent, tmp_path / "bad", parts["model"].state_dict(), 0.3, "x")
    assert not (tmp_path / "bad").exists()


def test_upgrade_v1_to_v2_keeps_the_model_and_refuses_unknown_versions(parts, signed, tmp_path):
    """A v1 bundle (the whole ResNet in one file) still loads and upgrades to v2 with the same weights."""
    from shared.models.classifier import save_weights

    v1 = _copy(signed, tmp_path, "v1")
    save_weights(parts["model"], v1 / "classifier.safetensors")
    (v1 / "head.safetensors").unlink()
    manifest = json.loads((v1 / "manifest.json").read_text(encoding="utf-8"))
    manifest["format_version"] = 1
    del manifest["classifier"]["head_file"], manifest["files"]["head.safetensors"]
    manifest["files"]["classifier.safetensors"] = B.sha256_file(v1 / "classifier.safetensors")
    (v1 / "manifest.json").write_bytes(B.manifest_bytes(manifest))
    B.sign_bundle(v1, parts["priv"])
    old = B.load_bundle(v1, parts["pub"])
    assert old.head_path is None and old.manifest.format_version == 1

    assert _cli("bundle", "upgrade", str(v1), str(tmp_path / "v2"), "--pubkey", str(parts["pub"]),
                "--key", str(parts["priv"])) == 0
    new = B.load_bundle(tmp_path / "v2", parts["pub"])
    assert new.manifest.format_version == 2 and new.manifest.lineage["upgraded_from"] == old.hash
    a, b = old.classifier_weights(), new.classifier_weights()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in new.manifest.files.items() if k.startswith("nnunet/")} == {
        k: v for k, v in old.manifest.files.items() if k.startswith("nnunet/")}
    with pytest.raises(IchfedError, match="already format_version 2"):
        B.upgrade_bundle(tmp_path / "v2", tmp_path / "v3", parts["pub"])
    assert _cli("bundle", "upgrade", str(tmp_path / "v2"), str(tmp_path / "v3"), "--pubkey", str(parts["pub"])) == 2
    manifest["format_version"] = 3
    (v1 / "manifest.json").write_bytes(B.manifest_bytes(manifest))
    with pytest.raises(BundleVerificationError, match="format_version 3 is not supported"):
        B.load_bundle(v1, None, allow_unsigned=True)


def test_tar_round_trip(signed, parts, tmp_path):
    tar_path = B.pack(signed, tmp_path / "b.tar")
    again = B.pack(signed, tmp_path / "b2.tar")
    assert tar_path.read_bytes() == again.read_bytes(), "packing is not reproducible"
    out = B.unpack(tar_path, tmp_path / "unpacked")
    bundle = B.load_bundle(out, parts["pub"])
    assert bundle.hash == B.bundle_hash(signed)
    with pytest.raises(IchfedError, match="already exists"):
        B.unpack(tar_path, out)
    with pytest.raises(BundleVerificationError, match="is a packed bundle; run 'ichfed bundle unpack' first"):
        B.load_bundle(tar_path, parts["pub"])


def _evil_tar(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        if member.isfile():
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
        else:
            tar.addfile(member)
    return path


@pytest.mark.parametrize(
    "member, message",
    [
        (tarfile.TarInfo("/etc/evil"), "unsafe path"),
        (tarfile.TarInfo("nnunet/../../evil"), "unsafe path"),
        ((lambda: (t := tarfile.TarInfo("nnunet/link"), setattr(t, "type", tarfile.SYMTYPE), setattr(t, "linkname", "/etc/passwd"), t)[-1])(), "link or special file"),
        ((lambda: (t := tarfile.TarInfo("nnunet/hard"), setattr(t, "type", tarfile.LNKTYPE), setattr(t, "linkname", "manifest.json"), t)[-1])(), "link or special file"),
    ],
    ids=["absolute", "dotdot", "symlink", "hardlink"],
)
def test_unpack_refuses_unsafe_archives(tmp_path, member, message):
    tar_path = _evil_tar(tmp_path / "evil.tar", member)
    with pytest.raises(BundleVerificationError, match=message):
        B.unpack(tar_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_end_to_end(parts, tmp_path, capsys):
    keys = tmp_path / "keys"
    assert _cli("bundle", "keygen", "--out", str(keys)) == 0
    out = json.loads(capsys.readouterr().out)
    priv, pub = out["private_key"], out["public_key"]
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert _cli("bundle", "keygen", "--out", str(keys)) == 2
    assert capsys.readouterr().err.startswith("error: ")

    crop_toml = tmp_path / "crop.toml"
    crop_toml.write_text("[crop]\nsize_xyz = [32, 32, 8]\n", encoding="utf-8")
    bundle = tmp_path / "imported"
    rc = _cli(
        "bundle", "import", "--nnunet-folder", str(parts["nnunet"]), "--classifier", str(parts["weights"]),
        "--threshold", "0.3", "--name", "imp", "--version", "2.0", "--crop-config", str(crop_toml),
        "--out", str(bundle),
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["signed"] is False

    assert _cli("bundle", "verify", str(bundle), "--pubkey", pub) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unsigned" in err and err.count("\n") == 1 and "Traceback" not in err

    assert _cli("bundle", "sign", str(bundle), "--key", priv) == 0
    capsys.readouterr()
    assert _cli("bundle", "verify", str(bundle), "--pubkey", pub) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["name"], shown["version"], shown["hash"]) == ("imp", "2.0", B.bundle_hash(bundle))
    assert B.load_bundle(bundle, pub).crop_spec == CROP

    assert _cli("bundle", "verify", str(bundle), "--pubkey", str(parts["pub"])) == 2
    assert "not by the given public key" in capsys.readouterr().err

    tar_path = tmp_path / "imported.tar"
    assert _cli("bundle", "pack", str(bundle), "-o", str(tar_path)) == 0
    capsys.readouterr()
    assert _cli("bundle", "unpack", str(tar_path), "-o", str(tmp_path / "back"), "--pubkey", pub) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == B.bundle_hash(bundle)

    (tmp_path / "back" / "nnunet" / "plans.json").write_text("{}", encoding="utf-8")
    assert _cli("bundle", "verify", str(tmp_path / "back"), "--pubkey", pub) == 2
    err = capsys.readouterr().err
    assert "plans.json: sha256 does not match manifest" in err and err.count("\n") == 1

    assert _cli("bundle", "verify", str(tmp_path / "back"), "--allow-unsigned") == 2  # hashes still checked
    capsys.readouterr()
    assert _cli("bundle", "import", "--nnunet-folder", str(tmp_path), "--classifier", str(parts["weights"]),
                "--threshold", "0.3", "--out", str(tmp_path / "x")) == 2
    assert "not an nnU-Net model folder" in capsys.readouterr().err
