"""Soft-target cross-entropy and a LightningModule mixin that accepts index or mixed targets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_acm.validation import check_label_smoothing

__all__ = ["SoftTargetLossMixin", "soft_target_cross_entropy"]


def soft_target_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy of ``(B, K)`` logits against index ``(B,)`` or probability ``(B, K)`` targets.

    :func:`torch.nn.functional.cross_entropy` in float32 whatever the logits' dtype (bf16/fp16 autocast
    included); ``label_smoothing`` ``eps`` replaces the targets by ``(1 - eps) * y + eps / K``.

    Example::

        >>> import torch
        >>> float(soft_target_cross_entropy(torch.zeros(2, 4), torch.full((2, 4), 0.25)))  # log(4)
        1.3862...
    """
    check_label_smoothing(label_smoothing)
    if logits.ndim != 2:
        raise ValueError(f"Expected `logits` of shape (B, K), but got shape {tuple(logits.shape)}.")
    indices = targets.ndim == 1 and not targets.is_floating_point()
    if indices and targets.shape[0] != logits.shape[0]:
        raise ValueError(
            "Expected one target per row of `logits`, but the batch sizes do not match:"
            f" {targets.shape[0]} != {logits.shape[0]}."
        )
    if not indices and targets.shape != logits.shape:
        raise ValueError(
            "Expected soft `targets` with the shape of `logits` (B, K), but the shapes do not match:"
            f" {tuple(targets.shape)} != {tuple(logits.shape)}."
        )
    targets = targets.long() if indices else targets.float()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


class SoftTargetLossMixin:
    """Mixin for a ``LightningModule``: one loss for index and soft targets, with or without a mixing callback.

    Example::

        >>> import lightning as L, torch
        >>> class Net(SoftTargetLossMixin, L.LightningModule):
        ...     label_smoothing = 0.1
        >>> float(Net().soft_target_loss(torch.zeros(2, 3), torch.arange(2))), Net.hard_targets(torch.eye(3)[[2, 0]])
        (1.0986..., tensor([2, 0]))
    """

    label_smoothing: float = 0.0

    def soft_target_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy against index ``(B,)`` or soft ``(B, K)`` targets, with ``self.label_smoothing``."""
        return soft_target_cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    @staticmethod
    def hard_targets(targets: Tensor) -> Tensor:
        """Class indices ``(B,)`` for accuracy metrics: index targets as they are, soft targets by ``argmax``."""
        return targets.argmax(dim=1) if targets.ndim == 2 else targets.long()
