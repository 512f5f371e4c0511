"""Turn a RedNet checkpoint into a clean weights file ready to publish: NAME-<sha256[:8]>.pth or .safetensors.

Reads any layout rednet.weights accepts (official mmcls, plain state dict, training checkpoint of train.py, timm,
safetensors, PaddleClas .pdparams: read without paddle, converted by rednet.convert_paddle), keeps the model
weights only (EMA preferred, optimizer and the rest dropped), in this package's key names, and names the file after
its own sha256 as torch.hub expects (``pretrained=<URL>`` then checks it). What the checkpoint says about the weights
(architecture, shape arguments, class count and names, preprocessing: input size, crop_pct, interpolation, mean,
std) goes into a settings file beside it, NAME-<sha256[:8]>.json in timm's config.json layout, which
rednet.weights.read_checkpoint reads with the weights (eval.py, train.py pretrained=, the scripts); none is written
for a checkpoint that carries no settings (a plain state dict, official weights).

    python scripts/convert_checkpoint.py outputs/run/checkpoints/best.pt weights/rednet50.pth [--safetensors]
    python scripts/convert_checkpoint.py RedNet50_pretrained.pdparams weights/rednet50.pth
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from rednet import weights
from rednet.checkpoint import weights_settings

_logger = logging.getLogger(__name__)


def convert(source: str, out: str, safetensors: bool = False, use_ema: bool = True) -> Path:
    """Write the clean weights of ``source`` next to ``out`` as NAME-<sha256[:8]>.ext; return the path.

    The file's bytes depend only on the tensors (names, dtypes, shapes, values): the same weights give the same file
    and name whatever the input's layout (plain, DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes, a training
    checkpoint, EMA only), key order or file name, and however often they are converted. The checkpoint's settings
    go into NAME-<sha256[:8]>.json beside it (`weights.sidecar_config`), when it has any.
    """
    path = weights.fetch(source)
    checkpoint = weights.read_checkpoint(path)  # with the source's own sidecar, if it is a converted file
    state_dict = weights.to_state_dict(checkpoint, use_ema=use_ema, origin=str(path))
    # Contiguous copies: safetensors refuses shared or strided storage, and torch.save would keep whole storages.
    # Sorted: the input's order varies (safetensors files read back sorted, others in the model's order).
    state_dict = {key: state_dict[key].detach().contiguous().clone() for key in sorted(state_dict)}
    out_path = Path(out)
    suffix = ".safetensors" if safetensors else ".pth"
    name = out_path.name.removesuffix(out_path.suffix) if out_path.suffix else out_path.name
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # A private directory, and in it a file of a fixed name: torch.save names the zip's inner folder after the file's
    # stem ("archive/data.pkl", as for a buffer), so a random temporary name would change the bytes and the hash.
    # torch's zip writer stores no timestamps (1980-01-01 for every entry); safetensors' header is sorted.
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{name}-") as directory:
        temporary = Path(directory) / f"archive{suffix}"
        if safetensors:
            from safetensors.torch import save_file

            save_file(state_dict, str(temporary), metadata={"format": "pt"})
        else:
            torch.save(state_dict, temporary)
        final = out_path.parent / f"{name}-{weights.sha256_file(temporary)[:8]}{suffix}"
        os.replace(temporary, final)
        write_sidecar(weights.sidecar_config(weights_settings(checkpoint)), final, Path(directory))
    return final


def write_sidecar(config: dict, weights_path: Path, directory: Path) -> None:
    """Write ``config`` as the sidecar of ``weights_path`` (atomically, through ``directory``); with no settings,
    write none and leave an existing one (of the same tensors, written by an earlier conversion) with a warning."""
    json_path = weights.sidecar_path(weights_path)
    if not config:
        if json_path.is_file():
            _logger.warning("the source carries no weights settings: %s (an earlier conversion's) is left as it is",
                            json_path)  # fmt: skip
        return
    temporary = directory / "archive.json"
    temporary.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, json_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint (any accepted layout, .pdparams too): path or http(s)/file URL")
    parser.add_argument("out", help="output path; the name gets -<sha256[:8]> before the extension")
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pth")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the raw weights, not the EMA")
    args = parser.parse_args()
    path = convert(args.source, args.out, safetensors=args.safetensors, use_ema=args.use_ema)
    print(path)
    if weights.sidecar_path(path).is_file():
        print(weights.sidecar_path(path))


if __name__ == "__main__":
    main()
