"""torch.hub entry points: ``torch.hub.load("<owner>/rednet", "rednet50", pretrained=...)``.

Each entry point is ``rednet.create_model`` for that name: the same keyword arguments (num_classes, pretrained as
True, a path or a URL, memory_efficient, ...). torch.hub puts this repository on sys.path, so ``rednet`` and ``ops``
import from the checkout; timm and torch must be installed.
"""

from __future__ import annotations

dependencies = ["torch", "torchvision", "timm"]

_MODELS = ("rednet26", "rednet38", "rednet50", "rednet101", "rednet152")


def _entry_point(name: str):
    def create(pretrained: bool | str = False, **kwargs):
        import rednet  # deferred: `torch.hub.list` reads this file without building anything

        return rednet.create_model(name, pretrained=pretrained, **kwargs)

    create.__name__ = name
    create.__doc__ = f"{name} (rednet.create_model({name!r}, pretrained, **kwargs))."
    return create


rednet26, rednet38, rednet50, rednet101, rednet152 = (_entry_point(name) for name in _MODELS)
