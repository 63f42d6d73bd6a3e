"""Image-level aggregators: one image's patch sequence -> class logits.

Every aggregator takes the same padded batch, so the image model, its configs and the stages
never branch on which one runs:

    forward(features, mask, pos, probs) -> {"logits": B x C, "attention": B x N (if any)}

``features`` is B x N x D (the patch CNN's pooled features), ``mask`` B x N bool (True on real
patches; padding is always at the end), ``pos`` B x N x 2 long (row, col; -1 on padding) and
``probs`` B x N x C (the patch CNN's class probabilities). Padding never changes a result.
``trainable`` says whether there is anything to fit.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

ORDERS = ("row", "column", "snake")

VOTE_TIE_BREAK = 1e-3
"""Weight of the mean patch probability added to the vote counts: < 1, so it only breaks ties."""


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over real patches of B x N x K values: B x K (padding content never counts)."""
    x = x.masked_fill(~mask[..., None], 0.0)  # B x N x K
    return x.sum(1) / mask.sum(1, keepdim=True).clamp_min(1)


def safe_log(p: Tensor) -> Tensor:
    """log of probabilities, clamped so a zero gives a finite (very negative) logit."""
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def grid_order(pos: Tensor, mask: Tensor, order: str = "row") -> Tensor:
    """Indices B x N that sort each image's patches by grid position; padding stays last.

    ``row`` is row-major, ``column`` column-major, ``snake`` row-major with every odd row
    reversed (boustrophedon), so consecutive patches are always grid neighbours.
    """
    if order not in ORDERS:
        raise ValueError(f"unknown patch order {order!r}; known: {', '.join(ORDERS)}")
    row, col = pos.unbind(-1)  # each B x N
    height, width = row.max() + 1, col.max() + 1  # 0-dim tensors: no host sync
    if order == "column":
        key = col * height + row
    else:
        col = torch.where(row % 2 == 1, width - 1 - col, col) if order == "snake" else col
        key = row * width + col
    key = key.masked_fill(~mask, torch.iinfo(key.dtype).max)  # B x N
    return key.argsort(dim=1, stable=True)


class BiLSTM(nn.Module):
    """The paper's image model (Yan et al. 2018): a (bi)LSTM over the patch sequence, then FC.

    The patches of each image are re-sorted by grid position (``order``) so the LSTM sees a
    spatial scan; the last layer's final hidden states (both directions) feed the classifier.
    Sequences are packed, so an image's logits do not depend on the padding of its batch.

    Args:
        feature_dim: width D of the patch features.
        num_classes: output classes.
        hidden_size: LSTM hidden units per direction.
        num_layers: stacked LSTM layers.
        bidirectional: also read the sequence backwards.
        dropout: between LSTM layers and before the classifier.
        order: ``row``, ``column`` or ``snake`` scan of the patch grid.
    """

    trainable = True

    def __init__(
        self,
        feature_dim: int,
        num_classes: int = 4,
        hidden_size: int = 256,
        num_layers: int = 3,
        bidirectional: bool = True,
        dropout: float = 0.5,
        order: str = "row",
    ):
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown patch order {order!r}; known: {', '.join(ORDERS)}")
        self.num_classes = num_classes
        self.order = order
        self.lstm = nn.LSTM(
            feature_dim,
            hidden_size,
            num_layers=num_layers,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        """Logits from the final hidden states of the grid-ordered, packed sequence."""
        index = grid_order(pos, mask, self.order)  # B x N
        x = features.gather(1, index[..., None].expand_as(features))  # B x N x D
        lengths = mask.sum(1).cpu()
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # (layers * directions) x B x H, in batch order
        directions = 2 if self.lstm.bidirectional else 1
        h = h.view(self.lstm.num_layers, directions, *h.shape[1:])[-1]  # directions x B x H
        h = h.transpose(0, 1).flatten(1)  # B x (directions * H)
        return {"logits": self.fc(self.dropout(h))}


class Attention(nn.Module):
    """Gated attention-MIL (Ilse et al. 2018): an attention-weighted mean of patch features.

    ``a = softmax(w^T (tanh(V h) * sigmoid(U h)))`` over the real patches; the weights are
    returned, so they can be drawn as a heatmap over the image.

    Args:
        feature_dim: width D of the patch features.
        num_classes: output classes.
        hidden_size: width of the attention network.
        dropout: on both gates of the attention network (as CLAM).
    """

    trainable = True

    def __init__(
        self, feature_dim: int, num_classes: int = 4, hidden_size: int = 128, dropout: float = 0.25
    ):
        super().__init__()
        self.num_classes = num_classes
        self.attention_v = nn.Sequential(
            nn.Linear(feature_dim, hidden_size), nn.Tanh(), nn.Dropout(dropout)
        )
        self.attention_u = nn.Sequential(
            nn.Linear(feature_dim, hidden_size), nn.Sigmoid(), nn.Dropout(dropout)
        )
        self.attention_w = nn.Linear(hidden_size, 1)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        """Logits of the attention-pooled features, and the attention (0 on padding)."""
        h = features.masked_fill(~mask[..., None], 0.0)  # B x N x D
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1)  # B x N
        attention = scores.masked_fill(~mask, float("-inf")).softmax(dim=1)  # B x N
        pooled = torch.einsum("bn,bnd->bd", attention, h)  # B x D
        return {"logits": self.fc(pooled), "attention": attention}


class MeanFeatures(nn.Module):
    """Mean of the patch features, then a linear classifier: the order-free learned baseline.

    Args:
        feature_dim: width D of the patch features.
        num_classes: output classes.
        dropout: on the pooled features.
    """

    trainable = True

    def __init__(self, feature_dim: int, num_classes: int = 4, dropout: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        """Logits of the masked mean feature."""
        return {"logits": self.fc(self.dropout(masked_mean(features, mask)))}  # B x C


class MeanProbs(nn.Module):
    """The patch CNN's probabilities averaged over the image: nothing to train.

    ``softmax(logits)`` is exactly the mean patch probability.
    """

    trainable = False

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        """Log of the masked mean patch probability."""
        return {"logits": safe_log(masked_mean(probs, mask))}  # B x C


class Vote(nn.Module):
    """Majority vote of the patches' predicted classes: nothing to train.

    Ties go to the class with the larger summed probability. ``softmax(logits)`` is the vote
    counts plus the tie-break (``VOTE_TIE_BREAK`` x mean probability), normalised: its argmax
    is the vote's winner, and it is about the vote share, which still ranks classes for ROC.
    """

    trainable = False

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        """Log of the tie-broken vote share."""
        votes = F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)  # B x N x C
        counts = votes.masked_fill(~mask[..., None], 0.0).sum(1)  # B x C
        # Counts differ by whole votes; the tie-break adds at most VOTE_TIE_BREAK < 1.
        score = counts + VOTE_TIE_BREAK * masked_mean(probs, mask)  # B x C
        return {"logits": safe_log(score / score.sum(1, keepdim=True))}  # B x C


class LinearProbe(nn.Module):
    """Mean of the patch features, then a linear layer fitted in closed form, not by the
    Lightning loop: multinomial logistic regression on the standardised means, its L2 penalty
    C chosen by inner cross-validation on the training images alone
    (``breastnet.models.linear_probe``, which the image stage runs before it scores the model).

    The standardisation is folded into ``fc`` (W / sigma, b - W mu / sigma), so it reads the
    same raw features as ``MeanFeatures``. The chosen C and its inner-CV score are buffers:
    a checkpoint holds them with the weights.

    Args:
        feature_dim: width D of the patch features.
        num_classes: output classes.
        c_min: smallest C of the grid.
        c_max: largest C of the grid.
        n_c: log-spaced values of C from ``c_min`` to ``c_max``.
        folds: inner cross-validation folds (whole source groups, stratified, seeded).
        max_iter: L-BFGS iterations per fit.
    """

    trainable = False

    def __init__(
        self,
        feature_dim: int,
        num_classes: int = 4,
        c_min: float = 1.0e-4,
        c_max: float = 1.0e2,
        n_c: int = 25,
        folds: int = 5,
        max_iter: int = 1000,
    ):
        super().__init__()
        if not 0 < c_min <= c_max or n_c < 1:
            raise ValueError(
                f"the linear probe's grid needs 0 < c_min <= c_max and n_c >= 1, got "
                f"c_min={c_min}, c_max={c_max}, n_c={n_c}"
            )
        self.num_classes = num_classes
        self.c_min, self.c_max, self.n_c = c_min, c_max, n_c
        self.folds, self.max_iter = folds, max_iter
        self.fc = nn.Linear(feature_dim, num_classes).requires_grad_(False)
        self.register_buffer("C", torch.tensor(float("nan"), dtype=torch.float64))
        self.register_buffer(
            "inner_balanced_accuracy", torch.tensor(float("nan"), dtype=torch.float64)
        )

    @property
    def fitted(self) -> bool:
        """Whether a fit (or a checkpoint of one) has set the head."""
        return bool(self.C.isfinite())

    @torch.no_grad()
    def load_fit(self, weight: Tensor, bias: Tensor, C: float, score: float) -> None:
        """Set the head (``num_classes x D`` weight and bias on raw features), C and score."""
        self.fc.weight.copy_(weight)
        self.fc.bias.copy_(bias)
        self.C.fill_(C)
        self.inner_balanced_accuracy.fill_(score)

    def forward(self, features: Tensor, mask: Tensor, pos: Tensor, probs: Tensor) -> dict:
        """Logits of the masked mean feature."""
        if not self.fitted:
            raise RuntimeError(
                "the linear probe is not fitted: the image stage fits it "
                "(breastnet.models.linear_probe.fit_probe)"
            )
        return {"logits": self.fc(masked_mean(features, mask))}  # B x C
