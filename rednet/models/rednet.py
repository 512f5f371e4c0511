"""RedNet: ResNet with involution in place of the 3×3 convolutions.

Paper: `Involution: Inverting the Inherence of Convolution for Visual Recognition` (Li et al., CVPR 2021),
https://arxiv.org/abs/2103.06255. Architecture, parameter names and initialization follow the official code
(https://github.com/d-li14/involution, classification part on mmcls), so official checkpoints load after dropping
their ``backbone.`` / ``head.`` prefixes (see ``rednet.weights``). Structure and timm hooks follow timm's resnet.py.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, create_classifier
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from rednet.convert_paddle import PADDLECLAS_ACCURACY, PADDLECLAS_URLS
from rednet.models.involution import ConvModule, Involution

__all__ = ["Bottleneck", "RedNet"]


class Bottleneck(nn.Module):
    """RedNet bottleneck: 1×1 conv → K×K involution (carrying the stride) → 1×1 conv, plus the shortcut."""

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        kernel_size: int = 7,
        drop_path: float = 0.0,
        memory_efficient: bool = False,
        involution_backend: str = "auto",
    ) -> None:
        super().__init__()
        out_channels = mid_channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, mid_channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        self.conv2 = Involution(
            mid_channels, kernel_size, stride, memory_efficient=memory_efficient, backend=involution_backend
        )
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(mid_channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def zero_init_last(self) -> None:
        """Zero the last BN's scale so that each block starts as the identity (the official default)."""
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(self.drop_path(x) + shortcut)


def make_stage(
    in_channels: int,
    mid_channels: int,
    num_blocks: int,
    stride: int,
    drop_path_rates: list[float],
    **block_kwargs: Any,
) -> nn.Sequential:
    """One stage; block 0 carries the stride and a 1×1 conv + BN downsample (on every stage, layer1 included)."""
    out_channels = mid_channels * Bottleneck.expansion
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
    )
    blocks = [Bottleneck(in_channels, mid_channels, stride, downsample, drop_path=drop_path_rates[0], **block_kwargs)]
    for index in range(1, num_blocks):
        blocks.append(Bottleneck(out_channels, mid_channels, drop_path=drop_path_rates[index], **block_kwargs))
    return nn.Sequential(*blocks)


class RedNet(nn.Module):
    """RedNet-26/38/50/101/152 as the official code builds it, with timm's model interface.

    Args:
        layers: blocks per stage, e.g. (3, 4, 6, 3) for RedNet-50.
        num_classes: classifier outputs; 0 for no classifier (``forward`` then returns pooled features).
        in_chans: input image channels.
        global_pool: timm pooling type ("avg", "max", "avgmax", "catavgmax", "" for none).
        stem_kernel_size: K of the stem involution: 3 (classification checkpoints) or 7 (detection backbones).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, rising linearly from 0 to this rate over the blocks.
        zero_init_last: zero-init each block's ``bn3`` (official default).
        memory_efficient: recompute the generated involution kernels in backward instead of storing them.
        involution_backend: operator backend for every involution ("auto" picks CuPy on CUDA, else torch).
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        stem_kernel_size: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        zero_init_last: bool = True,
        memory_efficient: bool = False,
        involution_backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"RedNet: layers must give 4 stage depths, got {layers!r}")
        if stem_kernel_size not in (3, 7):
            raise ValueError(
                f"RedNet: stem_kernel_size must be 3 (classification) or 7 (detection), not {stem_kernel_size}"
            )
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.stem_kernel_size = stem_kernel_size
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        involution_kwargs = dict(memory_efficient=memory_efficient, backend=involution_backend)

        self.stem = nn.Sequential(
            ConvModule(in_chans, 32, 3, stride=2),
            Involution(32, stem_kernel_size, 1, **involution_kwargs),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            ConvModule(32, 64, 3),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.feature_info = [dict(num_chs=64, reduction=2, module="stem")]

        total_blocks = sum(layers)
        rates = [drop_path_rate * index / max(total_blocks - 1, 1) for index in range(total_blocks)]
        in_channels = 64
        for stage, (num_blocks, mid_channels) in enumerate(zip(layers, (64, 128, 256, 512))):
            stride = 1 if stage == 0 else 2
            first = sum(layers[:stage])
            layer = make_stage(
                in_channels,
                mid_channels,
                num_blocks,
                stride,
                rates[first : first + num_blocks],
                memory_efficient=memory_efficient,
                involution_backend=involution_backend,
            )
            self.add_module(f"layer{stage + 1}", layer)
            in_channels = mid_channels * Bottleneck.expansion
            self.feature_info.append(dict(num_chs=in_channels, reduction=4 * 2**stage, module=f"layer{stage + 1}"))

        self.num_features = in_channels
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Official init: Kaiming normal (fan_out) convs with zero bias, BN 1/0, fc normal(0, 0.01)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)
        if zero_init_last:
            for module in self.modules():
                if isinstance(module, Bottleneck):
                    module.zero_init_last()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        """Regexes grouping parameters into stem and blocks (for layer-wise LR decay and the like)."""
        return dict(stem=r"^stem", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (timm's checkpoint_seq) to save memory."""
        self.grad_checkpointing = enable

    def set_memory_efficient(self, enable: bool = True) -> None:
        """Recompute the generated involution kernels in backward instead of storing them."""
        for module in self.modules():
            if isinstance(module, Involution):
                module.memory_efficient = enable

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The classifier module (or its name, "fc")."""
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a new one of ``num_classes`` outputs (0: none)."""
        self.num_classes = num_classes
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        self.global_pool, self.fc = create_classifier(self.num_features, num_classes, pool_type=global_pool)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        device = self.stem[0].conv.weight.device
        self.global_pool.to(device)
        self.fc.to(device)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's intermediate features: index 0 is the stem's output, 1–4 the stages' (``feature_info`` order).

        Args:
            x: input images.
            indices: the last n features if an int, these indices if a list, all if None.
            norm: unused (RedNet has no final norm); kept for timm's interface.
            stop_early: skip the stages after the last requested feature.
            output_fmt: "NCHW" only.
            intermediates_only: return the list of features alone.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"RedNet features are NCHW; output_fmt={output_fmt!r} is not supported")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        x = self.stem(x)
        if 0 in take_indices:
            intermediates.append(x)
        x = self.maxpool(x)
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        for index, stage in enumerate(stages[:max_index] if stop_early else stages, start=1):
            x = checkpoint_seq(stage, x) if self.grad_checkpointing and not torch.jit.is_scripting() else stage(x)
            if index in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and the head) after the features ``indices`` select; return the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        for name in ("layer1", "layer2", "layer3", "layer4")[max_index:]:
            setattr(self, name, nn.Sequential())  # empty, so that forward and checkpoint_seq still iterate it
        if max_index < 4:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or max_index < 4:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.stem(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq([self.layer1, self.layer2, self.layer3, self.layer4], x, flatten=True)
        # Written out, not looped over a list: TorchScript cannot call a list of differently typed stages.
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _rednet_with_weights(state_dict: dict[str, torch.Tensor], **kwargs: Any) -> RedNet:
    """A RedNet loaded with ``state_dict``: timm's builder calls this in place of the class, before it wraps the
    model for ``features_only``."""
    from rednet import weights

    model = RedNet(**kwargs)
    weights.load_state_dict(model, state_dict)
    return model


def _create_rednet(variant: str, pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """Build a RedNet through timm's builder; weights (True, a path or a URL) load through ``rednet.weights``.

    RedNet reads its own weights rather than through timm's loader: checkpoints come in several layouts (official
    mmcls, plain, this project's training checkpoints, safetensors), downloads are checked against full sha256
    digests, and the stem kernel size, class count, model arguments and preprocessing (into ``pretrained_cfg``)
    are read from the checkpoint unless given.
    """
    use_ema = kwargs.pop("use_ema", True)
    model_cls = RedNet
    if pretrained:
        from rednet import weights  # deferred: keeps `import rednet` light

        state_dict, settings = weights.load_pretrained(
            variant,
            pretrained,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
            cache_dir=kwargs.get("cache_dir"),
            use_ema=use_ema,
        )
        # Settings that travel with the weights, unless given: model shape, class count, and preprocessing as the
        # model's pretrained_cfg (what timm.data.resolve_data_config(model=model) reads).
        for name, value in {**settings.model_kwargs, **weights.model_kwargs_from_state_dict(state_dict)}.items():
            kwargs.setdefault(name, value)
        kwargs["pretrained_cfg_overlay"] = {**settings.pretrained_cfg, **(kwargs.get("pretrained_cfg_overlay") or {})}
        model_cls = functools.partial(_rednet_with_weights, state_dict)
    return build_model_with_cfg(model_cls, variant, pretrained=False, **kwargs)


def _cfg(url: str = "", **kwargs: Any) -> dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv",
        "classifier": "fc",
        "license": "mit",
        "origin_url": "https://github.com/d-li14/involution",
        "paper_ids": "arXiv:2103.06255",
        **kwargs,
    }


def _paddleclas_notes(name: str) -> tuple[str, ...]:
    """What the registered weights are and what their publisher reports for them (not measured here)."""
    top1, top5 = PADDLECLAS_ACCURACY[name]
    return (
        "weights: the official ImageNet-1k checkpoint converted to Paddle by PaddleClas "
        f"({PADDLECLAS_URLS[name]}), converted back by rednet.convert_paddle",
        f"ImageNet-1k val top-1 {top1}% / top-5 {top5}% at resize 256 / center crop 224, as reported by PaddleClas "
        "(docs/en/models/RedNet_en.md); not measured by this project",
    )


# Weights live in rednet.weights.PRETRAINED (URL, sha256, format): PaddleClas's conversion of the official release,
# whose own OneDrive links are dead. Its eval transform (resize 256, center crop 224, bilinear, ImageNet mean/std)
# is _cfg's.
default_cfgs = generate_default_cfgs(
    {f"rednet{depth}.in1k": _cfg(notes=_paddleclas_notes(f"rednet{depth}")) for depth in (26, 38, 50, 101, 152)}
)


@register_model
def rednet26(pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """RedNet-26: 9.23 M parameters, 1.73 GFLOPs, 75.96% top-1 (official)."""
    return _create_rednet("rednet26", pretrained, **dict(dict(layers=(1, 2, 4, 1)), **kwargs))


@register_model
def rednet38(pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """RedNet-38: 12.39 M parameters, 2.22 GFLOPs, 77.48% top-1 (official)."""
    return _create_rednet("rednet38", pretrained, **dict(dict(layers=(2, 3, 5, 2)), **kwargs))


@register_model
def rednet50(pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """RedNet-50: 15.54 M parameters, 2.71 GFLOPs, 78.35% top-1 (official)."""
    return _create_rednet("rednet50", pretrained, **dict(dict(layers=(3, 4, 6, 3)), **kwargs))


@register_model
def rednet101(pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """RedNet-101: 25.65 M parameters, 4.74 GFLOPs, 78.92% top-1 (official)."""
    return _create_rednet("rednet101", pretrained, **dict(dict(layers=(3, 4, 23, 3)), **kwargs))


@register_model
def rednet152(pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """RedNet-152: 33.98 M parameters, 6.79 GFLOPs, 79.12% top-1 (official)."""
    return _create_rednet("rednet152", pretrained, **dict(dict(layers=(3, 8, 36, 3)), **kwargs))
