"""``dcr-fast reproduce``: the paper's protocol (base, STL, STL-aug, DCR, DCR+STL) on a real model."""

from dcr_fast.reproduce.config import PRESETS, ReproduceConfig
from dcr_fast.reproduce.pipeline import reproduce

__all__ = ["PRESETS", "ReproduceConfig", "reproduce"]
