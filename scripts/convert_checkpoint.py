"""Turn a RedNet checkpoint into a clean weights file ready to publish: NAME-<sha256[:8]>.pth or .safetensors.

Reads any layout rednet.weights accepts (official mmcls, plain state dict, training checkpoint of train.py, timm,
safetensors, PaddleClas .pdparams: read without paddle, converted by rednet.convert_paddle), keeps the model
weights only (EMA preferred, optimizer and the rest dropped), in this package's key names, and names the file after
its own sha256 as torch.hub expects (``pretrained=<URL>`` then checks it).

    python scripts/convert_checkpoint.py outputs/run/checkpoints/best.pt weights/rednet50.pth [--safetensors]
    python scripts/convert_checkpoint.py RedNet50_pretrained.pdparams weights/rednet50.pth
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from rednet import weights


def convert(source: str, out: str, safetensors: bool = False, use_ema: bool = True) -> Path:
    """Write the clean weights of ``source`` next to ``out`` as NAME-<sha256[:8]>.ext; return the path.

    The file's bytes depend only on the tensors (names, dtypes, shapes, values): the same weights give the same file
    and name whatever the input's layout (plain, DDP ``module.`` / torch.compile ``_orig_mod.`` prefixes, a training
    checkpoint, EMA only), key order or file name, and however often they are converted.
    """
    path = weights.fetch(source)
    state_dict = weights.to_state_dict(weights.read_checkpoint(path), use_ema=use_ema, origin=str(path))
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
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="checkpoint (any accepted layout, .pdparams too): path or http(s)/file URL")
    parser.add_argument("out", help="output path; the name gets -<sha256[:8]> before the extension")
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors instead of .pth")
    parser.add_argument("--no-ema", dest="use_ema", action="store_false", help="take the raw weights, not the EMA")
    args = parser.parse_args()
    path = convert(args.source, args.out, safetensors=args.safetensors, use_ema=args.use_ema)
    print(path)


if __name__ == "__main__":
    main()
