"""Aggregators and their configs: shapes, padding, attention, vote tie-break, grid order,
learning."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from breastnet.models.aggregators import BiLSTM, MeanFeatures, grid_order

from conftest import CONF, build_aggregator, image_model_config

D, C = 8, 4
SMALL = {"hidden_size": 16, "num_layers": 2}  # small enough to be fast, deep enough to stack
NAMES = ("bilstm", "attention", "mean_features", "mean_probs", "vote")
VARIANTS = [("bilstm", {"order": order}) for order in ("row", "column", "snake")] + [
    (name, {}) for name in NAMES if name != "bilstm"
]
pytestmark = pytest.mark.usefixtures("one_thread")


def grid(n: int, width: int = 3) -> Tensor:
    """Row-major (row, col) of the first n cells of a grid ``width`` wide: n x 2."""
    return torch.stack([torch.arange(n) // width, torch.arange(n) % width], dim=1)


def padded_batch(lengths: list[int], seed: int = 0) -> dict[str, Tensor]:
    """Images with these patch counts, padded to the longest with garbage (not zeros)."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    mask = torch.arange(n) < torch.tensor(lengths)[:, None]  # B x N
    return {
        "features": torch.randn(b, n, D, generator=g) * 5,
        "mask": mask,
        "pos": grid(n).expand(b, n, 2).masked_fill(~mask[..., None], -1),
        "probs": torch.randn(b, n, C, generator=g).mul(3).softmax(-1),
    }


def take(batch: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    """Image i alone, without padding."""
    n = int(batch["mask"][i].sum())
    return {k: v[i : i + 1, :n] for k, v in batch.items()}


def build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return build_aggregator(name, D, C, **SMALL, **kwargs).eval()


@pytest.mark.parametrize(("name", "kwargs"), VARIANTS)
def test_shapes_and_padding_never_counts(name: str, kwargs: dict) -> None:
    model = build(name, **kwargs)
    batch = padded_batch([9, 5, 1])
    with torch.no_grad():
        out = model(**batch)
        assert out["logits"].shape == (3, C) and out["logits"].isfinite().all()
        for i in range(3):
            alone = model(**take(batch, i))
            torch.testing.assert_close(out["logits"][i], alone["logits"][0])
    assert model.trainable == any(p.requires_grad for p in model.parameters())


def test_attention_rows_sum_to_one_and_skip_padding() -> None:
    batch = padded_batch([9, 5, 1])
    with torch.no_grad():
        attention = build("attention")(**batch)["attention"]  # B x N
    assert attention.shape == (3, 9)
    torch.testing.assert_close(attention.sum(1), torch.ones(3))
    assert (attention[~batch["mask"]] == 0).all() and (attention[batch["mask"]] > 0).all()
    assert attention[2, 0] == 1.0


def test_mean_probs_is_the_mean_probability() -> None:
    batch = padded_batch([9, 5])
    logits = build("mean_probs")(**batch)["logits"]
    torch.testing.assert_close(logits.softmax(1)[1], batch["probs"][1, :5].mean(0))


def vote(argmax: list[int], confidence: list[float]) -> Tensor:
    """The vote of patches predicting ``argmax`` with these top probabilities: 1 x C probs."""
    probs = torch.stack(
        [
            torch.full((C,), (1 - p) / (C - 1)).index_fill(0, torch.tensor(k), p)
            for k, p in zip(argmax, confidence, strict=True)
        ]
    )[None]  # 1 x N x C
    n = len(argmax)
    mask = torch.ones(1, n, dtype=torch.bool)
    return build("vote")(probs.new_zeros(1, n, D), mask, grid(n)[None], probs)["logits"]


def test_vote_majority_then_summed_probability() -> None:
    # Three unsure votes for class 1 beat one sure vote for class 3.
    logits = vote([1, 1, 1, 3], [0.4, 0.4, 0.4, 0.99])
    assert logits.argmax(1).item() == 1
    torch.testing.assert_close(
        logits.softmax(1), torch.tensor([[0, 0.75, 0, 0.25]]), atol=1e-3, rtol=0
    )
    # Two votes each for classes 0 and 2: the larger summed probability (class 2) wins.
    assert vote([0, 0, 2, 2], [0.5, 0.5, 0.5, 0.6]).argmax(1).item() == 2
    assert vote([2, 2, 0, 0], [0.5, 0.5, 0.5, 0.6]).argmax(1).item() == 0


def test_grid_order_permutations() -> None:
    # A 2 x 3 grid given row-major, plus two padding slots.
    mask = torch.tensor([[True] * 6 + [False] * 2])
    pos = torch.cat([grid(6), torch.full((2, 2), -1)])[None]  # 1 x 8 x 2
    expected = {
        "row": [0, 1, 2, 3, 4, 5, 6, 7],
        "column": [0, 3, 1, 4, 2, 5, 6, 7],
        "snake": [0, 1, 2, 5, 4, 3, 6, 7],
    }
    for order, index in expected.items():
        assert grid_order(pos, mask, order)[0].tolist() == index, order
    # Shuffled input: row order restores row-major.
    shuffle = torch.tensor([4, 0, 5, 2, 1, 3, 6, 7])
    index = grid_order(pos[:, shuffle], mask, "row")[0]
    assert shuffle[index].tolist() == expected["row"]
    with pytest.raises(ValueError, match="order"):
        grid_order(pos, mask, "diagonal")


@pytest.mark.parametrize("name", NAMES)
def test_each_aggregator_config_has_only_its_own_keys(name: str) -> None:
    """Every key of an aggregator's config is an argument of its class, and an override of a
    key it does not have fails when the config is composed."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from hydra.utils import get_class

    node = image_model_config(name).aggregator
    arguments = set(inspect.signature(get_class(node._target_)).parameters)
    assert set(node.keys()) - {"_target_"} <= arguments
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for key in {"num_layers", "hidden_size"} - set(node.keys()):
            with pytest.raises(ConfigCompositionException, match=key):
                compose(
                    "config", overrides=[f"image_model={name}", f"image_model.aggregator.{key}=5"]
                )


def test_mean_is_the_mean_probs_alias() -> None:
    assert image_model_config("mean") == image_model_config("mean_probs")


SIGNAL_POSITIONS = torch.tensor([1, 3, 5, 7])
"""Class k: the signal vector sits at position SIGNAL_POSITIONS[k] of 9."""


def positional_data(n: int, g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """Sequences of 9 noise vectors, one replaced by a fixed signal: class = its position.

    Every class has the same bag of vectors, so an order-free pooling is at chance.
    """
    x = torch.randn(n, 9, D, generator=g)  # B x 9 x D
    y = torch.randint(0, C, (n,), generator=g)
    x[torch.arange(n), SIGNAL_POSITIONS[y]] = 3.0
    batch = {
        "features": x,
        "mask": torch.ones(n, 9, dtype=torch.bool),
        "pos": grid(9).expand(n, 9, 2),
        "probs": torch.full((n, 9, C), 1 / C),
    }
    return batch, y


def fit_accuracy(model: nn.Module, steps: int = 200) -> float:
    """Held-out accuracy after ``steps`` Adam steps on fresh batches of 32."""
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch, y = positional_data(32, g)
        loss = F.cross_entropy(model(**batch)["logits"], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    batch, y = positional_data(512, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (model.eval()(**batch)["logits"].argmax(1) == y).float().mean().item()


def test_bilstm_learns_a_positional_rule_that_mean_pooling_cannot() -> None:
    torch.manual_seed(0)
    assert fit_accuracy(BiLSTM(D, C, hidden_size=32, num_layers=3, dropout=0.0)) >= 0.9
    torch.manual_seed(0)
    assert fit_accuracy(MeanFeatures(D, C)) <= 0.5
