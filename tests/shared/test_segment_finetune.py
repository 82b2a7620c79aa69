"""Issue 24: a site's short nnU-Net fine-tune of a received segmenter, with real nnU-Net at ci scale.

The tiny bundle's own nnU-Net is fine-tuned on five of its development cases through
``shared.training.segment_finetune.fine_tune`` (nnU-Net's preprocessor under the bundle's plans, its
``run_training`` with ``nnUNetTrainer_ichfedFineTune``), and the result is read back without pickle.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.models.segment_weights import SegmenterNetwork, SegmenterWeights
from shared.plumbing.errors import IchfedError
from shared.training.segment_finetune import FineTuneSpec, fine_tune


@pytest.fixture(scope="module")
def masked_cases(tiny_nnunet_model):
    from shared.imaging.sitedata import read_site

    site = read_site(tiny_nnunet_model.site_dir)
    return [c for c in site.cases if c.mask_path is not None and c.case_id in tiny_nnunet_model.train_ids][:5]


def test_canonical_weights_are_the_distinct_tensors(tiny_nnunet_model):
    """The state dict lists encoder tensors twice (the decoder holds the encoder, blocks list their ops
    again); only the distinct tensors travel, and a checkpoint written back holds every alias again."""
    import io

    import torch

    net = SegmenterNetwork(tiny_nnunet_model.model_dir)
    names, decoder = net.names("all"), net.names("decoder")
    assert len(set(names)) == len(names) and set(decoder) < set(names)
    assert all(n.startswith("decoder.") and not n.startswith("decoder.encoder.") for n in decoder)
    assert not any(n.startswith("decoder.encoder.") or ".all_modules." in n for n in names)
    state = net.network.state_dict()
    assert net.weights().n_values == sum(t.numel() for t in {id(t): t for t in net.tensors().values()}.values())
    assert net.weights().n_values < sum(t.numel() for t in state.values())  # aliases not sent twice
    ckpt = torch.load(io.BytesIO(net.checkpoint_bytes()), weights_only=True)
    assert set(ckpt["network_weights"]) == set(state)


def test_decoder_fine_tune_starts_from_the_given_weights_and_keeps_the_encoder(tiny_nnunet_model, masked_cases,
                                                                               tmp_path):
    net = SegmenterNetwork(tiny_nnunet_model.model_dir)
    reference = net.weights("decoder")
    rng = np.random.default_rng(0)
    start = SegmenterWeights({k: (a + rng.normal(0, 0.05, a.shape)).astype(np.float32)
                              for k, a in reference.arrays.items()})
    spec = FineTuneSpec(trainable="decoder", epochs=1, iterations=3, learning_rate=1e-4)
    result = fine_tune(tiny_nnunet_model.model_dir, masked_cases, tmp_path / "work", spec, start=start)
    assert set(result.weights.arrays) == set(reference.arrays) and result.weights.problem(like=reference) is None
    assert result.n_cases == 5 and result.iterations == 3 and np.isfinite(result.train_loss)
    assert result.train_dice is None or 0.0 <= result.train_dice <= 1.0
    # it trained from ``start``: a few small steps from it, far from the reference it was moved away from
    assert 0 < result.weights.distance(start) < 0.5 * result.weights.distance(reference)
    # the encoder was frozen: the trained checkpoint's encoder is the reference's, bit for bit
    from shared.training.segment_finetune import _trained_folder

    trained = SegmenterNetwork(_trained_folder(tmp_path / "work", net.meta["configuration"]), fold="all")
    enc = [n for n in net.names("all") if n.startswith("encoder.")]
    assert enc and all(np.array_equal(trained.weights().arrays[n], net.weights().arrays[n]) for n in enc)

    # a second round on the same cases trains without preprocessing again
    again = fine_tune(tiny_nnunet_model.model_dir, masked_cases, tmp_path / "work",
                      FineTuneSpec(trainable="all", epochs=1, iterations=2), start=result.weights)
    log = (tmp_path / "work" / "logs" / "finetune.log").read_text(encoding="utf-8")
    assert "Preprocessing dataset" not in log
    assert set(again.weights.arrays) == set(net.names("all"))


def test_bad_inputs_are_one_line_errors(tiny_nnunet_model, masked_cases, tmp_path):
    with pytest.raises(IchfedError, match="segmenter-trainable"):
        FineTuneSpec(trainable="encoder")
    with pytest.raises(IchfedError, match="segmenter-learning-rate"):
        FineTuneSpec(learning_rate=5.0)
    no_masks = [type(c)(c.case_id, c.label, c.image_path, None, c.extra) for c in masked_cases]
    with pytest.raises(IchfedError, match="no case with a mask"):
        fine_tune(tiny_nnunet_model.model_dir, no_masks, tmp_path / "w", FineTuneSpec(epochs=1, iterations=1))
    net = SegmenterNetwork(tiny_nnunet_model.model_dir)
    bad = net.weights("decoder")
    key = next(iter(bad.arrays))
    with pytest.raises(IchfedError, match="NaN or infinite"):
        net.load(SegmenterWeights({**bad.arrays, key: np.full_like(bad.arrays[key], np.nan)}))
    with pytest.raises(IchfedError, match="has shape"):
        net.load(SegmenterWeights({**bad.arrays, key: np.zeros((3, 3), np.float32)}))
