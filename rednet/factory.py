"""Building models: a RedNet or any timm model by name, from registered weights, or from a checkpoint of any layout
rednet.weights reads; and the checks that a checkpoint fits a model and a class folder."""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

import rednet
from rednet import weights
from rednet.checkpoint import WeightsSettings, check_arch, weights_settings
from rednet.models import rednet as rednet_model

_logger = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """Fail early on a model name that is neither a RedNet nor a timm model, listing the RedNets."""
    if name not in rednet.list_models() and not timm.is_model(name):
        close = similar_model_names(name)
        raise ValueError(
            f"unknown model {name!r}"
            + (f" (did you mean {' or '.join(f'model.name={c}' for c in close)}?)" if close else "")
            + f": set model=<one of {', '.join(rednet.list_models())}> "
            "(any timm model name, e.g. model.name=resnet50, works too)"
        )


def similar_model_names(name: str, n: int = 3) -> list[str]:
    """RedNet and timm names close to `name`: the same but for case, '_' and '-' (RedNet50, rednet_50), else
    difflib's closest (rednet5)."""
    known = [*rednet.list_models(), *timm.list_models()]
    plain = {k.lower().replace("_", "").replace("-", ""): k for k in reversed(known)}  # (first name wins)
    typed = name.lower().replace("_", "").replace("-", "")
    if typed in plain:
        return [plain[typed]]
    return [plain[k] for k in difflib.get_close_matches(typed, list(plain), n=n)]


def build_model(name: str, num_classes: int, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """A RedNet by name (rednet.create_model), or any other timm model.

    ``pretrained``: True (the registered weights, with their pretrained_cfg) or a checkpoint path/URL in any layout
    rednet.weights reads: the model then takes the checkpoint's model arguments (``kwargs`` win) and carries its
    preprocessing in ``model.pretrained_cfg``; a classifier of another class count is left fresh (fine-tuning).
    """
    check_model_name(name)
    if isinstance(pretrained, (str, Path)):
        path = weights.fetch(pretrained)
        model, _ = model_from_checkpoint(weights.read_checkpoint(path), path, name, num_classes, **kwargs)
        return model
    if name in rednet.list_models():
        return rednet.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    return timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)


def model_from_checkpoint(
    ckpt: dict[str, Any],
    path: str | Path,
    name: str | None = None,
    num_classes: int | None = None,
    use_ema: bool = True,
    classes: list[str] | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, WeightsSettings]:
    """Build the model a loaded checkpoint holds and load its weights; one path for eval, fine-tuning and scripts.

    Args:
        ckpt: a checkpoint as ``rednet.weights.read_checkpoint`` returns it (any layout it reads).
        path: where it came from, for messages.
        name: model name; None takes the checkpoint's architecture (an error when it names none).
        num_classes: classifier outputs; None takes the checkpoint's. Another count than the checkpoint's leaves the
            classifier fresh, with a warning (fine-tuning); with ``classes`` it is an error instead.
        use_ema: load the EMA weights when the checkpoint has them.
        classes: the evaluation folder's classes: the checkpoint must predict exactly these, in this order.
        **kwargs: model arguments; they win over the checkpoint's (``WeightsSettings.model_kwargs``).

    Returns:
        the model, on the CPU, with the checkpoint's preprocessing merged into ``model.pretrained_cfg``, and the
        settings read from the checkpoint.
    """
    settings = weights_settings(ckpt)
    if name is None:
        name = settings.arch
        if name is None:
            raise ValueError(
                f"checkpoint '{path}' does not name its architecture: set model=<name> (e.g. model=rednet50, or "
                "model.name=<timm model>)"
            )
    check_model_name(name)
    check_arch(ckpt, name, path)
    state_dict = weights.to_state_dict(ckpt, use_ema=use_ema, origin=str(path))
    shape = {**settings.model_kwargs, **rednet_model.model_kwargs_from_state_dict(state_dict)}
    if name not in rednet.list_models():
        shape = {key: value for key, value in shape.items() if key in settings.model_kwargs and key != "num_classes"}
    checkpoint_classes = shape.pop("num_classes", None) or settings.num_classes
    model_kwargs = {**shape, **kwargs}
    num_classes = num_classes or checkpoint_classes
    if num_classes is not None:
        model_kwargs["num_classes"] = num_classes
    create = rednet.create_model if name in rednet.list_models() else timm.create_model
    model = create(name, pretrained=False, **model_kwargs)
    if classes is not None:
        check_checkpoint_classes(ckpt, state_dict, model, classes, Path(path))
    weights.load_state_dict(model, state_dict)
    model.pretrained_cfg = {**model.pretrained_cfg, **settings.pretrained_cfg}
    return model, settings


def model_from_weights(source: str | Path | None, name: str | None, default_name: str, **kwargs: Any) -> nn.Module:
    """A model for inference scripts (export, visualization), in eval mode: from a checkpoint path/URL with its
    architecture, shape arguments and preprocessing (``model.pretrained_cfg``), or ``name`` / ``default_name`` with
    random weights when ``source`` is None. ``kwargs`` (e.g. num_classes) win over the checkpoint's."""
    if source is None:
        return timm.create_model(name or default_name, pretrained=False, **kwargs).eval()
    path = weights.fetch(source)
    model, _ = model_from_checkpoint(weights.read_checkpoint(path), path, name, **kwargs)
    return model.eval()


def class_difference(trained: list[str] | None, classes: list[str]) -> str:
    """How ``classes`` differ from a checkpoint's ``trained`` ones ("" when they match or are unknown)."""
    if trained is None or list(trained) == list(classes):
        return ""
    missing, extra = sorted(set(trained) - set(classes)), sorted(set(classes) - set(trained))
    if not missing and not extra:
        return "same names in another order"
    return f"missing: {missing[:5]}, not in the checkpoint: {extra[:5]}"


def check_checkpoint_classes(
    ckpt: dict[str, Any], state_dict: dict[str, torch.Tensor], model: nn.Module, classes: list[str], path: Path
) -> None:
    """Refuse to evaluate a checkpoint on class folders other than the ones it was trained on; one that names no
    classes (a plain state dict, other tools' files) takes the folders' sorted order, with a log line saying so."""
    if ckpt.get("classes") is None:
        shown = ", ".join(classes[:5]) + (f", ... ({len(classes)} in all)" if len(classes) > 5 else "")
        _logger.info(
            "checkpoint '%s' does not name its classes: output i is taken as the i-th val class folder in sorted "
            "order (%s); correct only if the weights were trained with that order",
            path,
            shown,
        )
    difference = class_difference(ckpt.get("classes"), classes)
    if difference:
        raise ValueError(
            f"checkpoint '{path}' was trained on {len(ckpt['classes'])} classes but the val folder has "
            f"{len(classes)} ({difference}): evaluate on the data it was trained on"
        )
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    weight = state_dict.get(f"{classifier}.weight") if classifier else None
    body = {key for key in model.state_dict() if not (classifier and key.startswith(f"{classifier}."))}
    if not body <= set(state_dict):
        return  # weights of another architecture: loading them names the keys that do not fit
    if weight is not None and weight.shape[0] != len(classes):
        raise ValueError(
            f"checkpoint '{path}' has a {weight.shape[0]}-class classifier but the val folder has {len(classes)} "
            "class folders: evaluate on the data it was trained on"
        )
