"""Tests for ``lightning_acm.loss``: soft-target cross-entropy, the mixin and its ``hard_targets``."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_acm.functional import attentive_cutmix, mixup
from lightning_acm.loss import SoftTargetLossMixin, soft_target_cross_entropy


def reference_soft_cross_entropy(logits: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """Row by row in float64: ``-sum_k y_k log softmax(z)_k``, averaged over the batch."""
    rows = []
    for z, y in zip(logits.double().tolist(), probabilities.double().tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v - max(z)) for v in z)) + max(z)
        rows.append(-sum(p * (v - log_norm) for p, v in zip(y, z, strict=True)))
    return torch.tensor(sum(rows) / len(rows), dtype=torch.float64)


@pytest.mark.parametrize(("batch", "classes"), [(1, 2), (8, 10), (5, 1000)])
def test_index_and_one_hot_targets_equal_cross_entropy(batch, classes, generator):
    logits = 3 * torch.randn(batch, classes, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    expected = F.cross_entropy(logits, labels)
    torch.testing.assert_close(soft_target_cross_entropy(logits, labels), expected)
    torch.testing.assert_close(soft_target_cross_entropy(logits, F.one_hot(labels, classes).float()), expected)
    torch.testing.assert_close(soft_target_cross_entropy(logits, labels.int()), expected)


@pytest.mark.parametrize("label_smoothing", [0.05, 0.1, 0.5, 0.9])
def test_label_smoothing_matches_cross_entropy(label_smoothing, generator):
    logits = 2 * torch.randn(6, 7, generator=generator)
    labels = torch.randint(0, 7, (6,), generator=generator)
    expected = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    index = soft_target_cross_entropy(logits, labels, label_smoothing=label_smoothing)
    one_hot = soft_target_cross_entropy(logits, F.one_hot(labels, 7).float(), label_smoothing=label_smoothing)
    torch.testing.assert_close(index, expected)
    torch.testing.assert_close(one_hot, expected)
    smoothed = F.one_hot(labels, 7).float() * (1 - label_smoothing) + label_smoothing / 7
    torch.testing.assert_close(soft_target_cross_entropy(logits, smoothed), expected)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_soft_targets_match_the_reference(label_smoothing, generator):
    logits = 4 * torch.randn(5, 6, generator=generator)
    targets = torch.distributions.Dirichlet(torch.ones(6)).sample((5,))
    smoothed = targets * (1 - label_smoothing) + label_smoothing / 6
    loss = soft_target_cross_entropy(logits, targets, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss.double(), reference_soft_cross_entropy(logits, smoothed), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits, targets, label_smoothing=label_smoothing))


def test_uniform_logits_give_log_k():
    loss = soft_target_cross_entropy(torch.zeros(3, 4), torch.full((3, 4), 0.25))
    torch.testing.assert_close(loss, torch.tensor(math.log(4)))


def test_loss_is_linear_in_the_mixed_targets(generator):
    """On a mixed batch: ``lam * CE(y[p]) + (1 - lam) * CE(y)``, sample by sample."""
    images = torch.rand(4, 3, 14, 14, generator=generator)
    labels = torch.tensor([0, 1, 2, 3])
    permutation = torch.tensor([1, 2, 3, 0])
    _, soft, lam = attentive_cutmix(
        images, labels, torch.rand(4, 7, 7, generator=generator), num_classes=4, permutation=permutation
    )
    logits = torch.randn(4, 4, generator=generator)
    per_sample = lam * F.cross_entropy(logits, labels[permutation], reduction="none") + (1 - lam) * F.cross_entropy(
        logits, labels, reduction="none"
    )
    torch.testing.assert_close(soft_target_cross_entropy(logits, soft), per_sample.mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["index", "soft"])
def test_low_precision_logits_give_a_float32_loss(dtype, label_smoothing, kind, generator):
    logits = (8 * torch.randn(4, 5, generator=generator)).to(dtype)
    labels = torch.tensor([0, 4, 2, 2])
    targets = labels if kind == "index" else F.one_hot(labels, 5).to(dtype)
    loss = soft_target_cross_entropy(logits, targets, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, expected)


def test_gradient_is_softmax_minus_targets(generator):
    logits = torch.randn(3, 4, generator=generator, requires_grad=True)
    targets = torch.distributions.Dirichlet(torch.ones(4)).sample((3,))
    soft_target_cross_entropy(logits, targets).backward()
    torch.testing.assert_close(logits.grad, (logits.detach().softmax(1) - targets) / 3)


@pytest.mark.parametrize("label_smoothing", [-0.1, 1.0, 2.0, float("nan")])
def test_error_label_smoothing(label_smoothing):
    with pytest.raises(ValueError, match=r"Expected `label_smoothing` to be in \[0, 1\), but got"):
        soft_target_cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), label_smoothing=label_smoothing)


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4)])
def test_error_logits_not_2d(shape):
    with pytest.raises(ValueError, match=r"Expected `logits` of shape \(B, K\), but got shape"):
        soft_target_cross_entropy(torch.zeros(shape), torch.tensor([0, 1]))


def test_error_target_shapes():
    logits = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"one target per row of `logits`, but the batch sizes do not match: 3 != 4\."):
        soft_target_cross_entropy(logits, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"with the shape of `logits` \(B, K\).*\(4, 2\) != \(4, 3\)\."):
        soft_target_cross_entropy(logits, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"with the shape of `logits` \(B, K\).*\(4,\) != \(4, 3\)\."):
        soft_target_cross_entropy(logits, torch.zeros(4))


def test_hard_targets():
    labels = torch.tensor([3, 0, 2], dtype=torch.int32)
    hard = SoftTargetLossMixin.hard_targets(labels)
    assert torch.equal(hard, labels.long()) and hard.dtype == torch.long
    soft = torch.tensor([[0.3, 0.0, 0.7], [0.0, 0.6, 0.4], [0.5, 0.5, 0.0]])
    assert torch.equal(SoftTargetLossMixin.hard_targets(soft), torch.tensor([2, 1, 0]))


def test_hard_targets_of_a_mixed_batch_is_the_canvas_label_when_lam_is_small(generator):
    labels = torch.tensor([0, 1, 2, 3])
    _, soft, lam = attentive_cutmix(
        torch.rand(4, 3, 14, 14),
        labels,
        torch.rand(4, 7, 7),
        top_k=6,
        num_classes=4,
        generator=np.random.default_rng(0),
    )
    assert (lam < 0.5).all()
    assert torch.equal(SoftTargetLossMixin.hard_targets(soft), labels)


class _Net(SoftTargetLossMixin, L.LightningModule):
    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.net = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.soft_target_loss(self.net(x), y)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mixin_handles_index_and_mixed_targets(label_smoothing, generator):
    torch.manual_seed(0)
    net = _Net(label_smoothing)
    x, labels = torch.randn(4, 4, generator=generator), torch.tensor([0, 1, 2, 0])
    logits = net.net(x)
    hard = net.training_step((x, labels), 0)
    torch.testing.assert_close(hard, F.cross_entropy(logits, labels, label_smoothing=label_smoothing))
    _, soft, _ = mixup(x.view(4, 1, 2, 2), labels, num_classes=3, generator=np.random.default_rng(0))
    mixed_loss = net.training_step((x, soft), 0)
    torch.testing.assert_close(mixed_loss, F.cross_entropy(logits, soft, label_smoothing=label_smoothing))
    mixed_loss.backward()
    assert net.net.weight.grad is not None and torch.isfinite(net.net.weight.grad).all()
    assert torch.equal(net.hard_targets(labels), labels)
    assert torch.equal(_Net.hard_targets(soft), soft.argmax(1))


def test_mixin_default_label_smoothing_is_zero():
    assert SoftTargetLossMixin.label_smoothing == 0.0
    logits = torch.randn(2, 3)
    torch.testing.assert_close(
        SoftTargetLossMixin().soft_target_loss(logits, torch.tensor([1, 2])),
        F.cross_entropy(logits, torch.tensor([1, 2])),
    )
