"""RedNet: ResNet with involution in place of the 3×3 convolutions.

Paper: `Involution: Inverting the Inherence of Convolution for Visual Recognition` (Li et al., CVPR 2021),
https://arxiv.org/abs/2103.06255. Architecture, parameter names and initialization follow the official code
(https://github.com/d-li14/involution, classification part on mmcls), so official checkpoints load after dropping
their ``backbone.`` / ``head.`` prefixes (see ``rednet.weights``). Structure and timm hooks follow timm's resnet.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
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

__all__ = [
    "Bottleneck",
    "RedNet",
    "checkpoint_filter_fn",
    "detect_stem_kernel_size",
    "model_kwargs_from_state_dict",
    "remap_checkpoint",
]


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


_MMCLS_PREFIXES = ("backbone.", "head.")  # mmcls ImageClassifier: backbone.<RedNet keys>, head.fc.*
_STEM_KERNEL_KEY = "stem.1.conv2.conv.weight"  # the stem involution's kernel generator: G·K² output rows
_STEM_GROUPS = 2  # the stem involution has 32 channels in groups of 16
_FIRST_CONV_KEY = "stem.0.conv.weight"


def remap_checkpoint(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A RedNet state dict in this package's key names: the official (mmcls / mmpretrain) layout loses its
    ``backbone.`` / ``head.`` prefixes (``backbone.stem.0.conv.weight`` -> ``stem.0.conv.weight``, ``head.fc.*`` ->
    ``fc.*``); a dict already in our names is returned as a copy, unchanged."""
    if not any(key.startswith("backbone.") for key in state_dict):
        return dict(state_dict)
    return {_strip_mmcls_prefix(key): value for key, value in state_dict.items()}


def _strip_mmcls_prefix(key: str) -> str:
    for prefix in _MMCLS_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def detect_stem_kernel_size(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """K of the stem involution of a state dict in our key names (G·K² rows, G=2: 18 -> 3, 98 -> 7); None if the
    key is absent.

    Raises:
        ValueError: the row count is not 2·K² for any K.
    """
    weight = state_dict.get(_STEM_KERNEL_KEY)
    if weight is None:
        return None
    rows = weight.shape[0]
    kernel_size = math.isqrt(rows // _STEM_GROUPS)
    if kernel_size**2 * _STEM_GROUPS != rows:
        raise ValueError(f"{_STEM_KERNEL_KEY} has {rows} rows: not 2·K² for any K (expected 18 or 98)")
    return kernel_size


def model_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """The RedNet arguments a checkpoint (our or the mmcls key names) fixes: ``stem_kernel_size`` and
    ``num_classes``, where it has them."""
    state_dict = remap_checkpoint(state_dict)
    kwargs = {}
    stem_kernel_size = detect_stem_kernel_size(state_dict)
    if stem_kernel_size is not None:
        kwargs["stem_kernel_size"] = stem_kernel_size
    if "fc.weight" in state_dict:
        kwargs["num_classes"] = state_dict["fc.weight"].shape[0]
    return kwargs


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: RedNet) -> dict[str, torch.Tensor]:
    """timm's checkpoint filter for RedNet: ``state_dict`` (our or the mmcls key names, wrapper prefixes already
    removed by ``rednet.weights.to_state_dict``) as a dict that loads into ``model``.

    A classifier of another class count is dropped with a warning (the model keeps its fresh one). The first conv
    is left to timm's ``load_pretrained`` (in_chans adaptation, pretrained_cfg ``first_conv``).

    Raises:
        ValueError: the checkpoint's stem involution has another K than ``model.stem_kernel_size``.
        RuntimeError: keys other than the classifier's are missing or unexpected (another depth or another model),
            with their counts and the first few.
    """
    state_dict = remap_checkpoint(state_dict)
    stem_kernel_size = detect_stem_kernel_size(state_dict)
    if stem_kernel_size is not None and stem_kernel_size != model.stem_kernel_size:
        raise ValueError(
            f"the checkpoint's stem involution has K={stem_kernel_size} but the model has "
            f"stem_kernel_size={model.stem_kernel_size}: create the model with stem_kernel_size={stem_kernel_size}"
        )
    own = model.state_dict()
    classifier = [f"fc.{kind}" for kind in ("weight", "bias")]
    dropped = [  # another class count only, as rednet.weights.load_state_dict: another input width is another
        # architecture, named by the shape check
        key
        for key in classifier
        if key in state_dict and (key not in own or own[key].shape[:1] != state_dict[key].shape[:1])
    ]
    if dropped:
        # timm's load_pretrained drops it too (pretrained_cfg num_classes != the model's), but only logs.
        warnings.warn(
            f"checkpoint classifier has {state_dict[dropped[0]].shape[0]} classes, the model {model.num_classes}: "
            f"the classifier ({', '.join(dropped)}) is left at its fresh initialization",
            stacklevel=2,
        )
        for key in dropped:
            del state_dict[key]
    missing = [key for key in own if key not in state_dict and key not in classifier]
    unexpected = [key for key in state_dict if key not in own]
    if missing or unexpected:  # checked here: torch's strict-load error lists every key of a whole network
        raise RuntimeError(
            f"checkpoint does not match {type(model).__name__}: {len(missing)} missing keys "
            f"{missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]} (a checkpoint of another RedNet "
            "depth or another model?)"
        )
    return state_dict


def _create_rednet(variant: str, pretrained: bool | str = False, **kwargs: Any) -> RedNet:
    """Build a RedNet through timm's builder; weights (True, a path or a URL) are read by ``rednet.weights``.

    ``rednet.weights.load_pretrained`` finds and reads the checkpoint (any layout it accepts: official mmcls,
    plain, training checkpoints, timm's, safetensors, PaddleClas .pdparams; downloads checked against sha256
    digests; torch files read with weights_only) and hands timm the tensors as ``pretrained_cfg['state_dict']``, so
    timm never unpickles a user file. The stem kernel size, class count, model arguments and preprocessing (into
    ``pretrained_cfg``) come from the checkpoint unless given; timm's ``load_pretrained`` then loads through
    ``checkpoint_filter_fn``, resets a classifier of another size and adapts the first conv to ``in_chans``.
    """
    use_ema = kwargs.pop("use_ema", True)
    if not pretrained:
        return build_model_with_cfg(RedNet, variant, pretrained=False, **kwargs)
    from rednet import weights  # deferred: keeps `import rednet` light

    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    # In our key names already: load_pretrained's to_state_dict strips the mmcls backbone./head. prefixes.
    state_dict, settings = weights.load_pretrained(
        variant,
        pretrained,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=overlay,
        cache_dir=kwargs.get("cache_dir"),
        use_ema=use_ema,
    )
    checkpoint_kwargs = {**settings.model_kwargs, **model_kwargs_from_state_dict(state_dict)}
    checkpoint_classes = checkpoint_kwargs.pop("num_classes", None)
    for name, value in checkpoint_kwargs.items():
        kwargs.setdefault(name, value)
    # What timm's load_pretrained compares the model with: the checkpoint's class count and input channels (the
    # builder also takes them as the model's defaults), then the checkpoint's preprocessing, then the caller's.
    weights_cfg: dict[str, Any] = {**settings.pretrained_cfg}
    if checkpoint_classes is not None:
        weights_cfg["num_classes"] = checkpoint_classes
    if _FIRST_CONV_KEY in state_dict:
        height_width = tuple(weights_cfg.get("input_size") or _cfg()["input_size"])[-2:]
        weights_cfg["input_size"] = (state_dict[_FIRST_CONV_KEY].shape[1], *height_width)
    overlay = {**weights_cfg, **overlay, "state_dict": state_dict}
    model = build_model_with_cfg(
        RedNet,
        variant,
        pretrained=True,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_cfg_overlay=overlay,
        **kwargs,
    )
    model.pretrained_cfg.pop("state_dict", None)  # the tensors are in the model now: don't keep a second copy
    return model


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
