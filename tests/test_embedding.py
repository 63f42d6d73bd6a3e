"""embed_patches: the backbone's features and probabilities, chunked, and averaged over views."""

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from breastnet.models.backbone import Backbone, build_backbone
from breastnet.models.embedding import embed_patches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def net() -> Backbone:
    """A random-init MobileNetV2 whose BatchNorm statistics are those of random patches.

    Left at their init (mean 0, variance 1) they collapse the eval-mode features to ~1e-9,
    where any tolerance would pass.
    """
    torch.manual_seed(0)
    net = build_backbone("mobilenet_v2", weights="none")
    for bn in net.modules():
        if isinstance(bn, _BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None  # a plain average: one batch sets the statistics
    with torch.no_grad():
        net.train()(net.normalize(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)))
    return net.eval()


def test_chunks_give_the_backbone_outputs(net: Backbone) -> None:
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        features, probs = embed_patches(net, x, chunk_size=2)  # chunks of 2, 2 and 1
        expected = net.forward_features(net.normalize(x))
        torch.testing.assert_close(features, expected, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(probs, net(net.normalize(x)).softmax(1), rtol=1e-3, atol=1e-4)
    assert features.shape == (5, 1280) and probs.shape == (5, 4)
    assert features.abs().mean() > 0.01 and probs.std() > 1e-3  # not collapsed


def test_tta_is_the_mean_over_the_eight_rotations_and_flips(net: Backbone) -> None:
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    views = [v for k in range(4) for r in [torch.rot90(x, k, (2, 3))] for v in (r, r.flip(3))]
    assert len({v.numpy().tobytes() for v in views}) == 8  # random patches: no symmetry
    with torch.no_grad():
        features, probs = embed_patches(net, x, chunk_size=8, tta=True)  # one patch a call
        view_features = [net.forward_features(net.normalize(v)) for v in views]
        view_probs = [net.forward_head(f).softmax(1) for f in view_features]
    torch.testing.assert_close(features, torch.stack(view_features).mean(0), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(probs, torch.stack(view_probs).mean(0), rtol=1e-3, atol=1e-4)
    # A random-init net sees each view differently: the mean is not the plain view.
    assert not torch.allclose(features, view_features[0], rtol=1e-2, atol=1e-3)
