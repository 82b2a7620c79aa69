"""Issue 11 part 1: a signed bundle must not run code, and what is used is what was verified.

Every malicious bundle here is real: the tiny reference bundle with its nnU-Net ``plans.json``
edited, re-hashed and re-signed with the fixture's own key, so signature and file hashes pass
and only the plan check stands between the bundle and code execution.
"""

from __future__ import annotations

import json
import math
import os
import pydoc
import shutil
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from shared import bundle as B  # noqa: E402
from shared.models.head import Head  # noqa: E402
from shared.plumbing.errors import BundleVerificationError, IchfedError  # noqa: E402
from shared.security import keys  # noqa: E402

PLANS = "nnunet/plans.json"
HUB = "dynamic_network_architectures.architectures.unet.torch.hub.load"


def _link_copy(src: Path, dst: Path) -> Path:
    """Copy a bundle with hard links (the cached classifier is 250 MB); edits must replace files, never write in place."""

    def link(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    # A new inode, so the hard-linked original in the fixture cache is never changed.
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _resign(root: Path, private_key: Path, edit_manifest=None) -> None:
    """Re-hash every file into the manifest and sign it again, as a key holder would."""
    manifest = json.loads((root / B.MANIFEST).read_text("utf-8"))
    manifest["files"] = {rel: B.sha256_file(p) for rel, p in sorted(B._scan_files(root).items())}
    if edit_manifest is not None:
        edit_manifest(manifest)
    raw = B._manifest_bytes(manifest)
    _replace(root / B.MANIFEST, raw)
    # Signed directly (sign_bundle itself refuses to sign an inconsistent manifest).
    _replace(root / B.SIGNATURE, B._signature_blob(raw, keys.load_private_key(private_key)))


def _evil_bundle(tiny_bundle, tmp_path: Path, edit_arch) -> tuple[Path, Path]:
    """The tiny bundle with a hubconf.py beside plans.json and the architecture edited; returns (bundle, marker)."""
    root = _link_copy(tiny_bundle.path, tmp_path / "evil")
    marker = tmp_path / "PWNED"
    (root / "nnunet" / "hubconf.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        def evil(*args, **kwargs):
            Path({str(marker)!r}).write_text("code from a bundle ran")
            raise SystemExit("ran")
        """), encoding="utf-8")
    plans = json.loads((root / PLANS).read_text("utf-8"))
    for conf in plans["configurations"].values():
        if "architecture" in conf:
            edit_arch(conf["architecture"], root / "nnunet")
    _replace(root / PLANS, json.dumps(plans, indent=2).encode())
    _resign(root, tiny_bundle.private_key)
    return root, marker


def _hub_class(arch, folder):
    arch["network_class_name"] = HUB
    arch["arch_kwargs"] = {"repo_or_dir": str(folder), "model": "evil", "source": "local", "trust_repo": True}
    arch["_kw_requires_import"] = []


def _importlib_class(arch, folder):
    arch["network_class_name"] = "dynamic_network_architectures.architectures.unet.torch.importlib.import_module"
    arch["arch_kwargs"] = {"name": "hubconf"}
    arch["_kw_requires_import"] = []


def _op_walk(arch, folder):
    # Passed the old 'starts with torch.nn.' rule for *_op values.
    arch["arch_kwargs"]["conv_op"] = "torch.nn.modules.module.torch.hub.load"


VARIANTS = {
    "torch-hub-load": (_hub_class, HUB),
    "importlib-import-module": (_importlib_class,
                                "dynamic_network_architectures.architectures.unet.torch.importlib.import_module"),
    "conv-op-attribute-walk": (_op_walk, "torch.nn.modules.module.torch.hub.load"),
}


def test_payload_is_live_in_plain_nnunet(tiny_bundle, tmp_path):
    """The reproduction is real: nnU-Net's own builder runs the bundle's hubconf.py from these plans."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root, marker = _evil_bundle(tiny_bundle, tmp_path, _hub_class)
    arch = json.loads((root / PLANS).read_text("utf-8"))["configurations"]["3d_fullres"]["architecture"]
    with pytest.raises(SystemExit):
        get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], [], 1, 3, allow_init=False)
    assert marker.read_text(encoding="utf-8") == "code from a bundle ran"


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_signed_bundle_naming_code_is_refused(tiny_bundle, tmp_path, variant):
    edit, name = VARIANTS[variant]
    located = pydoc.locate(name)  # an attribute walk to something callable that is no network part
    assert callable(located) and not (isinstance(located, type) and issubclass(located, torch.nn.Module))
    root, marker = _evil_bundle(tiny_bundle, tmp_path, edit)
    with pytest.raises(BundleVerificationError, match=r"nnunet/plans\.json: configuration '3d_fullres'") as e:
        B.load_bundle(root, tiny_bundle.public_key)
    assert "\n" not in str(e.value)
    # The model folder on its own (bootstrap, benchmarks, Segmenter) is refused the same way.
    from shared.models.segment import Segmenter
    from shared.models.segment_model import validate_model_folder

    with pytest.raises(IchfedError, match=r"plans\.json: configuration '3d_fullres'"):
        validate_model_folder(root / "nnunet", check_weights=False)
    with pytest.raises(IchfedError, match=r"plans\.json"):
        Segmenter(root / "nnunet", device="cpu")
    assert not marker.exists()


def test_allow_unsigned_is_refused_for_code_in_plans(tiny_bundle, tmp_path):
    root, marker = _evil_bundle(tiny_bundle, tmp_path, _hub_class)
    (root / B.SIGNATURE).unlink()
    with pytest.raises(BundleVerificationError, match=r"plans\.json.*refused even with --allow-unsigned"):
        B.load_bundle(root, None, allow_unsigned=True)
    assert not marker.exists()


def test_cli_predict_refuses_code_bundle_in_one_line(tiny_bundle, tmp_path, capsys):
    from ichfed.cli import main

    root, marker = _evil_bundle(tiny_bundle, tmp_path, _hub_class)
    image = sorted((tiny_bundle.cohort_dir / "images").glob("*.nii.gz"))[0]
    assert main(["predict", "--bundle", str(root), "--pubkey", str(tiny_bundle.public_key), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "plans.json" in err and len(err.splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("value", [{"__class__": "x"}, "torch.nn.modules.activation.Threshold", "torch.nn.Module"])
def test_only_exact_ops_and_plain_kwargs(value):
    from shared.models.model_policy import check_architecture

    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"nonlin": value}, "_kw_requires_import": ["nonlin"]}
    with pytest.raises(IchfedError, match="arch_kwargs.nonlin"):
        check_architecture("plans.json", "3d_fullres", arch)


def test_swapped_classifier_after_load_is_refused_not_used(tiny_bundle, tmp_path):
    """A weights file swapped after load_bundle gave p = 1.0 under the verified hash; now it is refused."""
    from shared.models.classifier import build_model, save_weights
    from shared.pipeline import Predictor

    root = _link_copy(tiny_bundle.path, tmp_path / "b")
    bundle = B.load_bundle(root, tiny_bundle.public_key)
    evil = build_model()
    with torch.no_grad():
        fc = evil.fc if hasattr(evil, "fc") else list(evil.modules())[-1]
        fc.bias.copy_(torch.tensor([-1e4, 1e4]))  # would say "neoplastic, p = 1.0" for every case
    save_weights(evil, tmp_path / "evil.safetensors")
    _replace(root / B.CLASSIFIER_FILE, (tmp_path / "evil.safetensors").read_bytes())
    with pytest.raises(BundleVerificationError, match="classifier.safetensors: sha256 no longer matches"):
        bundle.build_classifier()
    with pytest.raises(BundleVerificationError, match="changed after loading"):
        Predictor(bundle, device="cpu")


def test_swapped_nnunet_checkpoint_after_load_is_refused(tiny_bundle, tmp_path):
    from shared.models.segment import Segmenter
    from shared.models.segment_model import CHECKPOINT

    root = _link_copy(tiny_bundle.path, tmp_path / "b")
    bundle = B.load_bundle(root, tiny_bundle.public_key)
    ckpt = root / "nnunet" / "fold_all" / CHECKPOINT
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    for v in state["network_weights"].values():
        v.zero_()
    torch.save(state, tmp_path / "zero.pth")
    _replace(ckpt, (tmp_path / "zero.pth").read_bytes())
    with pytest.raises(BundleVerificationError, match=f"fold_all/{CHECKPOINT}: sha256 no longer matches"):
        Segmenter(bundle.nnunet_dir, device="cpu", file_hashes=bundle.nnunet_file_hashes)


def _edited_manifest(tiny_bundle, tmp_path, edit) -> Path:
    root = _link_copy(tiny_bundle.path, tmp_path / "m")
    _resign(root, tiny_bundle.private_key, edit)
    return root


def test_threshold_p_and_log_p_must_agree(tiny_bundle, tmp_path):
    def edit(m):
        m["threshold"]["p"] = 0.9  # log_p still says the old threshold

    root = _edited_manifest(tiny_bundle, tmp_path, edit)
    with pytest.raises(BundleVerificationError, match="threshold.log_p .* does not match threshold.p 0.9"):
        B.load_bundle(root, tiny_bundle.public_key)
    with pytest.raises(BundleVerificationError, match="does not match threshold.p"):
        B.sign_bundle(root, tiny_bundle.private_key)  # nor will ichfed sign it


def test_unknown_format_version_refused_and_optional_entries_tolerated(tiny_bundle, tmp_path):
    root = _edited_manifest(tiny_bundle, tmp_path, lambda m: m.update(format_version=3))
    with pytest.raises(BundleVerificationError, match="format_version 3 is not supported"):
        B.load_bundle(root, tiny_bundle.public_key)
    later = _edited_manifest(tiny_bundle, tmp_path / "later",
                             lambda m: m.update(postprocessing_note={"kind": "future", "n": [1, 2]}))
    bundle = B.load_bundle(later, tiny_bundle.public_key)
    assert math.isclose(math.exp(bundle.threshold.log_p), bundle.threshold.p, rel_tol=1e-9, abs_tol=1e-300)


def test_predict_and_verify_accept_a_packed_bundle(tiny_bundle, tmp_path, capsys):
    """`--bundle B.tar` works as the help says: unpacked safely to a private folder, then verified."""
    from ichfed.cli import main

    tar = B.pack(tiny_bundle.path, tmp_path / "b.tar")
    assert main(["bundle", "verify", str(tar), "--pubkey", str(tiny_bundle.public_key)]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == B.bundle_hash(tiny_bundle.path)
    image = sorted((tiny_bundle.cohort_dir / "images").glob("*.nii.gz"))[0]
    rc = main(["predict", "--bundle", str(tar), "--pubkey", str(tiny_bundle.public_key), "--json", str(image)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["bundle"]["hash"] == B.bundle_hash(tiny_bundle.path)


def test_derive_refuses_to_sign_a_swapped_parent_model(tiny_bundle, tmp_path):
    """The server derives the federated bundle from the parent's files: a swap after load is not signed."""
    from shared.models.segment_model import CHECKPOINT
    from shared.plumbing.verified import read_verified

    root = _link_copy(tiny_bundle.path, tmp_path / "parent")
    parent = B.load_bundle(root, tiny_bundle.public_key)
    ckpt = root / "nnunet" / "fold_all" / CHECKPOINT
    _replace(ckpt, ckpt.read_bytes() + b"\0")
    with pytest.raises(BundleVerificationError, match="sha256 no longer matches"):
        read_verified(root, f"nnunet/fold_all/{CHECKPOINT}", parent.manifest.files)
    head = Head.from_bundle(parent)  # the classifier itself is unchanged and verified
    with pytest.raises(BundleVerificationError, match="changed since the parent bundle was verified"):
        B.derive_bundle(parent, tmp_path / "child", head, 0.5, version="2", private_key=tiny_bundle.private_key)
    assert not (tmp_path / "child").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".child")]


def test_v2_head_file_is_covered_by_the_signature(tiny_bundle, tmp_path):
    """Layout v2: the head file is verified at load and again at use, like the backbone."""
    root = tiny_bundle.path
    if B.load_bundle(root, tiny_bundle.public_key).head_path is None:  # a cached v1 reference bundle
        root = B.upgrade_bundle(root, tmp_path / "v2", tiny_bundle.public_key, private_key=tiny_bundle.private_key)
    root = _link_copy(root, tmp_path / "b")
    bundle = B.load_bundle(root, tiny_bundle.public_key)
    head = Head.from_bundle(bundle)
    evil = {"fc.weight": torch.zeros(2, head.n_features), "fc.bias": torch.tensor([-1e4, 1e4])}
    from shared.models.classifier import save_weights

    save_weights(evil, tmp_path / "evil.safetensors")
    _replace(root / B.HEAD_FILE, (tmp_path / "evil.safetensors").read_bytes())
    with pytest.raises(BundleVerificationError, match="head.safetensors: sha256 no longer matches"):
        bundle.build_classifier()
    with pytest.raises(BundleVerificationError, match="head.safetensors: sha256 no longer matches"):
        Head.from_bundle(bundle)
    with pytest.raises(BundleVerificationError, match="head.safetensors: sha256 does not match manifest"):
        B.load_bundle(root, tiny_bundle.public_key)
