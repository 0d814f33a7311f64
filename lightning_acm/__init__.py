"""lightning_acm: Attentive CutMix, CutMix and Mixup for PyTorch Lightning."""

__version__ = "0.1.0"
