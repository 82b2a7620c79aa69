"""The 3D ResNet-34 classifier: backbone/head split, embeddings, weights I/O, training."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from server.training import classifier_augment as aug  # noqa: E402
from server.training import classifier_history as hist  # noqa: E402
from server.training import classifier_training as training  # noqa: E402
from shared.models import classifier as clf  # noqa: E402
from shared.models.head import Head  # noqa: E402
from shared.plumbing.errors import IchfedError  # noqa: E402

# Small crops keep CPU tests fast; the network ends in adaptive pooling, so it accepts any
# size, and the paper's (20, 200, 200) only changes the cost.
ZYX = (8, 32, 32)


def synthetic_crops(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lesion-masked crops whose class is written in the lesion's density.

    Each crop holds one ellipsoidal lesion of random size and position, zero outside like a
    real ICH∪PHE-masked crop. Neoplastic lesions are brighter (0.8 vs 0.4 on the [0, 1] HU
    scale) with noise of SD 0.05, so the classes are separated by 8 noise SDs while lesion
    size (which dominates pooled activations) is uninformative.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    z, y, x = np.meshgrid(*(np.arange(s) for s in ZYX), indexing="ij")
    crops = np.zeros((n, *ZYX), np.float32)
    for i, label in enumerate(labels):
        cz, cy, cx = ZYX[0] / 2 + rng.uniform(-1, 1), ZYX[1] / 2 + rng.uniform(-4, 4), ZYX[2] / 2 + rng.uniform(-4, 4)
        rz, ry, rx = rng.uniform(1.5, 3), rng.uniform(4, 10), rng.uniform(4, 10)
        inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        level = 0.8 if label == 1 else 0.4
        crops[i][inside] = np.clip(level + rng.normal(0, 0.05, inside.sum()), 0, 1)
    return crops, labels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return clf.build_model().eval()


def test_head_of_backbone_equals_full_model(model):
    backbone, head = clf.backbone_and_head(model)
    assert isinstance(head, torch.nn.Linear) and (head.in_features, head.out_features) == (512, 2)
    x = torch.from_numpy(synthetic_crops(3, seed=1)[0]).unsqueeze(1)
    with torch.no_grad():
        full = clf.model_log_probs(model, x)
        features = backbone(x)
        split = Head.from_linear(head).log_probs(features)
    assert features.shape == (3, 512)
    torch.testing.assert_close(torch.from_numpy(split).float(), full, rtol=0, atol=1e-6)
    # log-softmax: probabilities of the two classes sum to one.
    torch.testing.assert_close(full.exp().sum(1), torch.ones(3, dtype=full.dtype))


def test_backbone_is_monai_resnet_without_fc_sharing_the_model_parameters(model):
    from monai.networks.nets import ResNet

    backbone, head = clf.backbone_and_head(model)
    assert isinstance(backbone, ResNet) and backbone.fc is None
    # The same tensors, not copies: the keys are the model's minus fc, and no meta tensor is left.
    model_state = model.state_dict()
    bb_state = backbone.state_dict()
    assert set(bb_state) == {k for k in model_state if not k.startswith("fc.")}
    assert all(bb_state[k].data_ptr() == model_state[k].data_ptr() for k in bb_state)
    assert not any(p.is_meta for p in backbone.parameters())
    with pytest.raises(IchfedError, match="fc = Linear"):
        clf.backbone_and_head(backbone)


def test_embed_matches_backbone_and_is_batch_independent(model):
    backbone, head = clf.backbone_and_head(model)
    crops, _ = synthetic_crops(5, seed=2)
    e_batched = clf.embed(backbone, crops, torch.device("cpu"), batch_size=4)
    e_single = clf.embed(backbone, crops, torch.device("cpu"), batch_size=1)
    assert e_batched.shape == (5, 512) and e_batched.dtype == np.float32
    # Eval-mode BatchNorm: a case's features do not depend on its batch mates.
    np.testing.assert_allclose(e_batched, e_single, rtol=1e-5, atol=1e-5)
    p_split = Head.from_linear(head).p_neoplastic(e_batched)
    with torch.no_grad():
        p_full = clf.model_log_probs(model, clf.as_batch_tensor(crops, "cpu"))[:, 1].exp().double().numpy()
    np.testing.assert_allclose(p_split, p_full, rtol=1e-5, atol=1e-6)
    assert np.all((p_full > 0) & (p_full < 1))


def test_head_shares_parameters_with_model(model):
    _, head = clf.backbone_and_head(model)
    assert head is model.fc
    assert not any(p.requires_grad is False for p in head.parameters())


def test_embed_rejects_wrong_shape(model):
    backbone, _ = clf.backbone_and_head(model)
    with pytest.raises(IchfedError, match=r"crops: expected an array of shape \(N, z, y, x\)"):
        clf.embed(backbone, np.zeros(ZYX, np.float32), torch.device("cpu"))


def test_safetensors_round_trip(model, tmp_path):
    path = tmp_path / "w.safetensors"
    clf.save_weights(model, path)
    raw = path.read_bytes()
    # safetensors: 8-byte little-endian header length, then a JSON header; no pickle/zip container.
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert "fc.weight" in header and header["fc.weight"]["shape"] == [2, 512]
    assert not raw.startswith(b"PK") and b"\x80\x02" not in raw[:2]
    state = clf.load_weights(path)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    reloaded = clf.load_classifier(path)
    x = torch.from_numpy(synthetic_crops(2, seed=3)[0]).unsqueeze(1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp*")), "atomic write left a temporary file"


def test_bad_weights_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(IchfedError, match=r"bad\.safetensors: not a valid safetensors file") as e:
        clf.load_weights(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(IchfedError, match="weights file not found"):
        clf.load_weights(tmp_path / "missing.safetensors")
    wrong = tmp_path / "wrong.safetensors"
    clf.save_weights({"fc.weight": torch.zeros(2, 512)}, wrong)
    with pytest.raises(IchfedError, match="weights do not fit the 3D ResNet-34") as e:
        clf.load_classifier(wrong)
    assert "\n" not in str(e.value)


def test_augmentation_keeps_lesion_masking():
    cfg = aug.AugmentationConfig(p_rotation=1.0, p_scale=1.0, p_brightness=1.0, p_contrast=1.0, p_noise=1.0)
    augmenter = aug.build_augmenter(cfg, ZYX)
    crops, _ = synthetic_crops(6, seed=4)
    np.random.seed(0)
    out = aug.augment_batch(augmenter, crops)
    assert out.shape == crops.shape and out.dtype == np.float32
    assert not np.allclose(out, crops), "augmentation changed nothing"
    # Noise and brightness act only inside the (moved) lesion: the background stays exactly 0,
    # and the lesion keeps roughly its size (in-plane rotation, scale 0.9-1.1).
    for a, b in zip(out, crops):
        assert (a == 0).mean() > 0.5
        assert 0.6 < (a != 0).sum() / (b != 0).sum() < 1.6


def test_train_config_recipes_and_validation():
    paper = training.ClassifierTrainConfig.named("paper")
    assert (paper.epochs, paper.batch_size, paper.learning_rate) == (182, 64, 2.96e-4)
    assert paper.augmentation.enabled
    assert training.ClassifierTrainConfig.named("ci").epochs < 10
    with pytest.raises(IchfedError, match="classifier recipe: must be one of"):
        training.ClassifierTrainConfig.named("fast")
    from shared.plumbing.config import from_dict

    with pytest.raises(IchfedError, match="'augmentation.p_noise' must be between 0.0 and 1.0"):
        from_dict(training.ClassifierTrainConfig, {"augmentation": {"p_noise": 2}})


def test_train_rejects_single_class_validation():
    crops, labels = synthetic_crops(6, seed=5)
    with pytest.raises(IchfedError, match="val_labels: need both classes"):
        training.train_classifier(crops, labels, crops[:2], np.zeros(2, int), training.ClassifierTrainConfig.ci(), "cpu", 0)


@pytest.mark.slow
def test_training_learns_an_easy_signal(tmp_path):
    """ci recipe on 16 training crops: held-out AUC must beat 0.85.

    With 20 held-out cases (10/10) a model at chance has AUC 0.5 with SD about 0.13, so 0.85 is
    more than 2.5 SD above chance; the signal (8 noise SDs between class densities) is
    easy enough that a working training loop clears it with margin.
    """
    from sklearn.metrics import roc_auc_score

    # 16 crops (two batches an epoch) learn it from the first epoch (held-out AUC 1.0, as with 32);
    # the test is about the recipe's loop, history and threshold, not about data size.
    train_x, train_y = synthetic_crops(16, seed=10)
    val_x, val_y = synthetic_crops(12, seed=11)
    test_x, test_y = synthetic_crops(20, seed=12)
    result = training.train_classifier(train_x, train_y, val_x, val_y, training.ClassifierTrainConfig.ci(), "cpu", seed=0)
    assert [h["epoch"] for h in result.history] == list(range(1, 5))
    assert all(set(h) == {"epoch", "train_loss", "val_loss", "val_auc"} for h in result.history)
    p = np.exp(clf.predict_log_probs(result.model, test_x, "cpu")[:, 1])
    auc = roc_auc_score(test_y, p)
    assert auc > 0.85, f"held-out AUC {auc:.3f}; history {result.history}"
    assert 0.0 <= result.threshold.p <= 1.0
    assert result.threshold.sensitivity * result.threshold.specificity > 0.5
    hist.plot_history(result.history, tmp_path / "curves.png")
    hist.save_history(result.history, tmp_path / "curves.json")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "curves.json").read_text(encoding="utf-8"))["history"] == result.history
