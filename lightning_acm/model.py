"""The image classifier ``LightningModule`` used by the CLI: a torchvision classifier, SGD/AdamW, warmup + schedule."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, Optional

import lightning as L
import torch
import torchvision
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models.resnet import BasicBlock
from typing_extensions import override

from lightning_acm.attention import _load_torchvision
from lightning_acm.loss import SoftTargetLossMixin, soft_target_cross_entropy
from lightning_acm.validation import check_choice, check_int, check_label_smoothing, check_real, is_int

__all__ = ["CifarResNet", "ImageClassifier"]

#: DenseNet-264 (Huang et al., 2017) of the Attentive CutMix paper; torchvision has no such configuration.
DENSENET264_CONFIG: dict[str, Any] = {"growth_rate": 32, "block_config": (6, 12, 64, 48), "num_init_features": 64}

# Auxiliary heads return a tuple in training mode and add a loss this module does not use.
_BUILDER_KWARGS: dict[str, dict[str, Any]] = {"inception_v3": {"aux_logits": False}, "googlenet": {"aux_logits": False}}

#: CIFAR ResNets (He et al., 2016, section 4.2): name -> blocks per stage (depth = 6n + 2).
CIFAR_RESNET_BLOCKS: dict[str, int] = {"cifar_resnet8": 1, "cifar_resnet20": 3}


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2) for 32 px inputs: a 3x3 stem, then three stages of
    ``blocks`` basic blocks (``width``, ``2 * width``, ``4 * width`` channels); depth ``6 * blocks + 2``.

    Example::

        >>> CifarResNet(blocks=1, num_classes=10)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, blocks: int, *, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        check_int(blocks, "blocks", minimum=1)
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        channels = width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                shortcut = None  # a 1x1 projection where the shape changes (option B)
                if stride != 1 or channels != out_channels:
                    conv = nn.Conv2d(channels, out_channels, 1, stride=stride, bias=False)
                    shortcut = nn.Sequential(conv, nn.BatchNorm2d(out_channels))
                layers.append(BasicBlock(channels, out_channels, stride, downsample=shortcut))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _resolve_weights(arch: str, weights: str) -> torchvision.models.WeightsEnum:
    if arch == "densenet264" or arch in CIFAR_RESNET_BLOCKS:
        what = "DenseNet-264" if arch == "densenet264" else "weights for it"
        raise ValueError(f"Expected `weights` to be None for `arch={arch!r}`: torchvision has no pretrained {what}.")
    enum = torchvision.models.get_model_weights(arch)
    prefix, _, name = weights.rpartition(".")
    names = ["DEFAULT", *(member.name for member in enum)]
    if (prefix and prefix != enum.__name__) or name not in names:
        raise ValueError(f"Expected `weights` to be one of {names} for `arch={arch!r}`, but got {weights!r}.")
    return enum[name]


def _replace_head(model: nn.Module, num_classes: int, arch: str) -> None:
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"Expected `arch={arch!r}` to end with an `nn.Linear` head so that pretrained `weights` can be"
            f" used with `num_classes={num_classes}`, but found none."
        )
    name, head = linears[-1]
    model.set_submodule(name, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))


def _make_small_input(model: nn.Module, arch: str) -> None:
    """A stride-1 stem without pooling; the new 3x3 convolution is initialised as the family does."""
    if isinstance(model, torchvision.models.EfficientNet):
        model.features[0][0].stride = (1, 1)
        return
    if isinstance(model, torchvision.models.ResNet):
        conv_name, pool_name, init = "conv1", "maxpool", {"mode": "fan_out", "nonlinearity": "relu"}
    elif isinstance(model, torchvision.models.DenseNet):
        conv_name, pool_name, init = "features.conv0", "features.pool0", {}
    else:
        raise ValueError(
            "Expected `arch` to be a ResNet, DenseNet or EfficientNet when `small_input=True`, but got"
            f" {arch!r} ({type(model).__name__})."
        )
    old = model.get_submodule(conv_name)
    conv = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, **init)
    model.set_submodule(conv_name, conv)
    model.set_submodule(pool_name, nn.Identity())


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    name, old = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if old.groups != 1:
        raise ValueError(
            f"Expected the first convolution to have groups=1 to change `in_channels`, but got {old.groups}."
        )
    keep = ("out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode")
    new = nn.Conv2d(in_channels, bias=old.bias is not None, **{key: getattr(old, key) for key in keep})
    with torch.no_grad():
        # Summing (1 channel) or tiling and rescaling keeps the stem's response to a uniform image.
        weight, old_in = old.weight, old.weight.shape[1]
        tiled = weight.repeat(1, math.ceil(in_channels / old_in), 1, 1)[:, :in_channels] * (old_in / in_channels)
        new.weight.copy_(weight.sum(dim=1, keepdim=True) if in_channels == 1 else tiled)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    model.set_submodule(name, new)


def _build_classifier(
    arch: str, *, num_classes: int = 10, in_channels: int = 3, small_input: bool = False, weights: Optional[str] = None
) -> nn.Module:
    """The classifier of :class:`ImageClassifier`'s arguments."""
    arch = arch.lower()
    names = sorted([*torchvision.models.list_models(module=torchvision.models), "densenet264", *CIFAR_RESNET_BLOCKS])
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(f"Expected `arch` to be a torchvision classification model name, but got {arch!r}.{hint}")
    resolved = None if weights is None else _resolve_weights(arch, weights)
    if arch in CIFAR_RESNET_BLOCKS:
        # Already a small-input network: `small_input` has nothing to change.
        return CifarResNet(CIFAR_RESNET_BLOCKS[arch], num_classes=num_classes, in_channels=in_channels)
    kwargs = _BUILDER_KWARGS.get(arch, {})
    if arch == "densenet264":
        model = torchvision.models.DenseNet(**DENSENET264_CONFIG, num_classes=num_classes)
    elif resolved is None:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    else:
        model = _load_torchvision(arch, resolved, **kwargs)
        if len(resolved.meta["categories"]) != num_classes:
            _replace_head(model, num_classes, arch)
    if small_input:
        _make_small_input(model, arch)
    if in_channels != 3:
        _adapt_input_channels(model, in_channels)
    return model


def _lr_factor(
    step: int, *, schedule: str, warmup_steps: int, total_steps: float, milestone_steps: Sequence[int], gamma: float
) -> float:
    """Multiplier of the base learning rate after ``step`` optimizer steps (for ``LambdaLR``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "multistep":
        return gamma ** sum(step >= milestone for milestone in milestone_steps)
    return 1.0


def _unpack(batch: Any, *, with_target: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    if isinstance(batch, Tensor) and not with_target:
        return batch, None
    if isinstance(batch, dict):
        return batch["image"], batch["target"] if with_target else batch.get("target")
    if not isinstance(batch, (list, tuple)):
        raise TypeError(
            "Expected a batch as a tuple/list (images, targets, ...) or a dict with 'image' and 'target' keys,"
            f" but got {type(batch).__name__}."
        )
    if with_target and len(batch) < 2:
        raise ValueError(f"Expected a batch of at least (images, targets), but got {len(batch)} element(s).")
    return batch[0], batch[1] if len(batch) > 1 else None


class ImageClassifier(SoftTargetLossMixin, L.LightningModule):
    """A torchvision classifier trained with soft-target cross-entropy, for plain or mixed batches.

    Batches are ``(images, targets, ...)`` tuples/lists or dicts with ``"image"`` and ``"target"``. Logs
    ``train/loss`` per step; ``train/acc`` (dominant label), ``{val,test}/{loss,acc,acc_top5}`` per epoch.

    Args:
        arch: a torchvision classification model name (case-insensitive), ``"densenet264"`` (no pretrained
            weights) or a CIFAR ResNet (``"cifar_resnet8"``, ``"cifar_resnet20"``, no pretrained weights).
        num_classes: outputs; with ``weights``, a pretrained head of another size is replaced.
        in_channels: input channels; when not 3, the first convolution's weights are summed (1) or tiled.
        small_input: stride-1 stem without pooling for 32 px inputs (ResNet, DenseNet, EfficientNet).
        weights: a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``), or None for random init;
            offline, the ``RuntimeError`` says where to put the weights file.
        label_smoothing: ``eps`` in ``[0, 1)`` for the training loss.
        optimizer: ``"sgd"`` or ``"adamw"`` (``momentum`` and ``nesterov`` unused; ``lr`` near 1e-3).
        lr: base learning rate (the peak after warmup).
        momentum, nesterov: SGD momentum in ``[0, 1)`` and Nesterov momentum (needs ``momentum > 0``).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay, ``>= 0``.
        no_weight_decay_on_bn_and_bias: no weight decay on parameters with at most one dimension.
        lr_scheduler: ``"cosine"`` (to 0), ``"multistep"`` (times ``gamma`` at ``milestones``) or ``"none"``.
        milestones, gamma: epochs at which ``"multistep"`` multiplies the learning rate by ``gamma`` in ``(0, 1]``.
        warmup_epochs: epochs of linear warmup to ``lr``, before any schedule (updated every step); warmup and
            schedules need a sized training loader (``configure_optimizers`` raises a ``MisconfigurationException``).

    Example::

        >>> model = ImageClassifier(arch="resnet18", num_classes=10, small_input=True)
        >>> images, targets = torch.randn(2, 3, 32, 32), torch.tensor([[0.7, 0.3] + [0.0] * 8, [0.0] * 9 + [1.0]])
        >>> bool(torch.isfinite(model.training_step((images, targets), 0)))
        True
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        small_input: bool = False,
        weights: Optional[str] = None,
        label_smoothing: float = 0.0,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        no_weight_decay_on_bn_and_bias: bool = True,
        lr_scheduler: Literal["cosine", "multistep", "none"] = "cosine",
        milestones: Sequence[int] = (150, 225),
        gamma: float = 0.1,
        warmup_epochs: int = 0,
    ) -> None:
        super().__init__()
        check_int(num_classes, "num_classes", minimum=2)
        check_int(in_channels, "in_channels", minimum=1)
        check_label_smoothing(label_smoothing)
        check_choice(optimizer, "optimizer", ("sgd", "adamw"))
        check_real(lr, "lr", low=0.0, low_open=True)
        check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        if optimizer == "sgd" and nesterov and momentum == 0:
            raise ValueError(f"Expected `momentum` to be > 0 when `nesterov=True`, but got {momentum}.")
        check_real(weight_decay, "weight_decay", low=0.0)
        check_choice(lr_scheduler, "lr_scheduler", ("cosine", "multistep", "none"))
        milestones = list(milestones)  # a list, so that hparams.yaml stays plain YAML
        if not all(is_int(m) and m >= 1 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"Expected `milestones` to be strictly increasing epochs >= 1, but got {milestones}.")
        if lr_scheduler == "multistep" and not milestones:
            raise ValueError("Expected `milestones` to be non-empty with `lr_scheduler='multistep'`, but got [].")
        check_real(gamma, "gamma", low=0.0, high=1.0, low_open=True)
        check_int(warmup_epochs, "warmup_epochs", minimum=0)
        if optimizer == "adamw" and lr > 0.01:
            rank_zero_warn(f"`lr={lr}` is large for AdamW; values near 1e-3 are usual. Set `lr` explicitly.")
        self.save_hyperparameters()
        self.label_smoothing = label_smoothing
        self.net = _build_classifier(
            arch, num_classes=num_classes, in_channels=in_channels, small_input=small_input, weights=weights
        )
        top1, top5 = (MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in (1, min(5, num_classes)))
        self.train_acc, self.val_acc, self.test_acc = top1, top1.clone(), top1.clone()
        self.val_acc_top5, self.test_acc_top5 = top5, top5.clone()

    @override
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, K)`` of images ``(B, C, H, W)``."""
        return self.net(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = _unpack(batch)
        logits = self(images)
        loss = self.soft_target_loss(logits, targets)
        self.train_acc.update(logits.detach(), self.hard_targets(targets))
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, stage: str, top1: MulticlassAccuracy, top5: MulticlassAccuracy) -> Tensor:
        images, targets = _unpack(batch)
        logits = self(images)
        loss = soft_target_cross_entropy(logits, targets)
        for metric in (top1, top5):
            metric.update(logits, self.hard_targets(targets))
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, prog_bar=True)
        self.log(f"{stage}/acc", top1, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc_top5", top5, on_step=False, on_epoch=True)
        return loss

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "val", self.val_acc, self.val_acc_top5)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluate(batch, "test", self.test_acc, self.test_acc_top5)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Softmax probabilities ``(B, K)`` (float32) of a batch of images, with or without targets."""
        images, _ = _unpack(batch, with_target=False)
        return self(images).float().softmax(dim=1)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer: with and (optionally) without weight decay."""
        params, decay = [p for p in self.parameters() if p.requires_grad], self.hparams.weight_decay
        if not self.hparams.no_weight_decay_on_bn_and_bias:
            return [{"params": params, "weight_decay": decay}]
        return [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]

    @override
    def configure_optimizers(self) -> Any:
        hp, groups = self.hparams, self.parameter_groups()
        if hp.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.SGD(
                groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        if hp.lr_scheduler == "none" and hp.warmup_epochs == 0:
            return optimizer
        total_steps, batches = self.trainer.estimated_stepping_batches, self.trainer.num_training_batches
        per_epoch = hp.warmup_epochs > 0 or hp.lr_scheduler == "multistep"
        cosine_unknown = hp.lr_scheduler == "cosine" and not 0 < total_steps < math.inf
        if cosine_unknown or (per_epoch and not 0 < batches < math.inf):
            raise MisconfigurationException(
                f"`lr_scheduler={hp.lr_scheduler!r}` with `warmup_epochs={hp.warmup_epochs}` needs the length of"
                f" training, but the trainer estimates {total_steps} steps in all and {batches} batches per epoch."
                " Use a sized training dataloader and set `max_epochs` (or `max_steps` for 'cosine')."
            )
        steps_per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if per_epoch else 0
        factor = partial(
            _lr_factor,
            schedule=hp.lr_scheduler,
            warmup_steps=hp.warmup_epochs * steps_per_epoch,
            total_steps=total_steps,
            milestone_steps=[m * steps_per_epoch for m in hp.milestones],
            gamma=hp.gamma,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
