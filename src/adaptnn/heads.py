"""Exit heads: small modules mapping a segment's state to class logits."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["PoolLinearHead"]


class PoolLinearHead(nn.Module):
    """Global average pooling over the spatial dims, then a linear classifier.

    The cheapest useful head for CNN feature maps ``[b, c, h, w]``: its MACs are ``c * num_classes``
    (pooling is not counted), so heads stay a negligible share of the backbone's cost.

    Args:
        in_features: channels of the feature map.
        num_classes: number of output classes.
        dropout: dropout before the classifier (training only).
    """

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(x).flatten(1)  # [b, c]
        return self.fc(self.dropout(x))
