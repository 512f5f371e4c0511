"""Build a small real ImageFolder from scikit-learn's bundled digits (1797 images of 8x8, 10 classes, no download).

    python scripts/make_demo_dataset.py data/digits

writes <out>/train/<digit>/<n>.png and <out>/val/<digit>/<n>.png: RGB PNGs upsampled to --size pixels, split
stratified by class (--val-fraction of each class to val).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def make_digits_folder(out: str | Path, size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> dict[str, int]:
    """Write the digits ImageFolder under `out` and return the number of images per split."""
    out = Path(out)
    digits = load_digits()
    # 0..16 grey levels -> 0..255, dark digit on white like ink on paper
    images = (255 - digits.images * (255 / 16)).round().astype(np.uint8)
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=digits.target, random_state=seed)
    counts = {}
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for i in split_idx:
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(images[i], mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
            img.save(folder / f"{i:04d}.png")
        counts[split] = len(split_idx)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class for val (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    args = parser.parse_args()
    if (args.out / "train").exists() or (args.out / "val").exists():
        parser.error(f"{args.out} already holds train/ or val/: remove it or choose another folder")
    counts = make_digits_folder(args.out, args.size, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images (10 classes) to {args.out}")


if __name__ == "__main__":
    main()
