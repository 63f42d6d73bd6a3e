"""The CUDA paths: bf16-mixed, channels_last and torch.compile on a patch training step and on
feature extraction through ``Trainer.predict``. Skipped without a GPU (CI has none)."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from breastnet.data.datasets import pad_collate
from breastnet.inference.embedder import Embedder
from breastnet.models.embedding import embed_patches

from conftest import CPU_TRAINER, make_patch_model, patch_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_TRAINER = CPU_TRAINER | {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"}


@pytest.mark.parametrize("compile", [False, True])
def test_bf16_channels_last_training_step(compile: bool) -> None:
    model = make_patch_model("inception_v3", channels_last=True, compile=compile)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    trainer = pl.Trainer(max_steps=2, **GPU_TRAINER)
    trainer.fit(model, DataLoader(patch_samples(8, 299), batch_size=4))
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k].cpu()) for k in before)


def test_bf16_feature_extraction_matches_fp32() -> None:
    net = make_patch_model("inception_v3").net.eval()
    x = torch.stack([p["x"] for p in patch_samples(6, 299)])
    reference, _ = embed_patches(net, x, chunk_size=4)
    samples = [
        {"x": x[:3], "pos": torch.zeros(3, 2, dtype=torch.long), "y": 0, "image_id": "a"},
        {"x": x[3:], "pos": torch.zeros(3, 2, dtype=torch.long), "y": 0, "image_id": "b"},
    ]
    loader = DataLoader(samples, batch_size=2, collate_fn=pad_collate)
    (outputs,) = pl.Trainer(**GPU_TRAINER).predict(Embedder(net, chunk_size=4), loader)
    features = torch.cat([o["features"] for o in outputs])
    assert features.dtype == torch.float32 and features.shape == reference.shape
    assert torch.allclose(features, reference, rtol=0.05, atol=0.05)  # bf16: ~3 digits
