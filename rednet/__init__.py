"""RedNet (involution backbones, Li et al., CVPR 2021) for timm: importing rednet registers the models with timm."""

from __future__ import annotations

from typing import Any

import timm

from rednet.models import Involution, RedNet

__all__ = ["Involution", "RedNet", "create_model", "list_models"]


def list_models(pattern: str = "rednet*") -> list[str]:
    """The registered RedNet model names matching ``pattern`` (timm's wildcard syntax)."""
    return [name for name in timm.list_models(pattern) if name.startswith("rednet")]


def create_model(model_name: str, pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """Create a RedNet, like ``timm.create_model``.

    Args:
        model_name: one of ``list_models()``, e.g. "rednet50".
        pretrained: False; True for the registered weights (``rednet.weights.PRETRAINED``); or a local path or an
            http(s)/file URL of a checkpoint (official mmcls, plain state dict, safetensors, or a training checkpoint
            of this project).
        **kwargs: model arguments (num_classes, in_chans, drop_path_rate, memory_efficient, stem_kernel_size, ...),
            ``use_ema`` (prefer EMA weights in training checkpoints, default True), and timm's
            ``pretrained_cfg_overlay`` / ``cache_dir``.
    """
    available = list_models()
    if model_name not in available:
        raise ValueError(f"unknown model {model_name!r}: choose one of {', '.join(available)}")
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)
