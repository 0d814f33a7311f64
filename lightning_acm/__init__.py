"""lightning_acm: Attentive CutMix, CutMix and Mixup for PyTorch Lightning (see ``AttentiveCutMix``)."""

from lightning_acm.attention import AttentionModel, Teacher, build_attention_model
from lightning_acm.cache import HeatmapCache, HeatmapCacheConfig
from lightning_acm.callbacks import AttentiveCutMix, CutMix, MixingCallback, MixUp, RandomMixing
from lightning_acm.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageNetDataModule,
    VisionDataModule,
)
from lightning_acm.functional import attention_grid, attentive_cutmix, cutmix, mixup, topk_cell_mask
from lightning_acm.loss import SoftTargetLossMixin, soft_target_cross_entropy
from lightning_acm.model import ImageClassifier
from lightning_acm.visualize import MixVisualizer, PastedAttentionMonitor

__version__ = "0.1.0"

__all__ = [
    "AttentionModel",
    "AttentiveCutMix",
    "CIFAR100DataModule",
    "CIFAR10DataModule",
    "CutMix",
    "FashionMNISTDataModule",
    "HeatmapCache",
    "HeatmapCacheConfig",
    "ImageClassifier",
    "ImageNetDataModule",
    "MixUp",
    "MixVisualizer",
    "MixingCallback",
    "PastedAttentionMonitor",
    "RandomMixing",
    "SoftTargetLossMixin",
    "Teacher",
    "VisionDataModule",
    "attention_grid",
    "attentive_cutmix",
    "build_attention_model",
    "cutmix",
    "mixup",
    "soft_target_cross_entropy",
    "topk_cell_mask",
]
