"""Sort ImageNet-1k's flat validation folder into class folders, the layout train.py and eval.py read.

    python scripts/prepare_imagenet.py /data/imagenet/val --labels LOC_val_solution.csv        # Kaggle download
    python scripts/prepare_imagenet.py /data/imagenet/val --devkit ILSVRC2012_devkit_t12.tar.gz  # image-net.org

moves val/ILSVRC2012_val_00000001.JPEG to val/n01751748/ILSVRC2012_val_00000001.JPEG, and so on. The train split
already comes in class folders (train/<wnid>/*.JPEG). Files already in a class folder are left alone, so the
script can be run again after an interruption.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path


def labels_from_loc_csv(path: str | Path) -> dict[str, str]:
    """Image id -> wnid from Kaggle's LOC_val_solution.csv (`ImageId,PredictionString` = `wnid x y x y ...`)."""
    with open(path, newline="") as f:
        return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}


def labels_from_devkit(archive: str | Path) -> dict[str, str]:
    """Image id -> wnid from the devkit's ground truth (ILSVRC2012_devkit_t12.tar.gz), parsed by torchvision."""
    from torchvision.datasets.imagenet import ARCHIVE_META, load_meta_file, parse_devkit_archive

    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(Path(archive).resolve(), Path(tmp) / ARCHIVE_META["devkit"][0])  # the name torchvision expects
        parse_devkit_archive(tmp)
        _, val_wnids = load_meta_file(tmp)
    return {f"ILSVRC2012_val_{i:08d}": wnid for i, wnid in enumerate(val_wnids, start=1)}


def sort_into_class_folders(val_dir: str | Path, labels: dict[str, str], dry_run: bool = False) -> int:
    """Move every image at the top of `val_dir` into `val_dir/<wnid>/`; return how many were moved.

    Raises:
        ValueError: when an image has no label (the wrong labels file), before anything is moved.
    """
    val_dir = Path(val_dir)
    images = sorted(p for p in val_dir.iterdir() if p.is_file() and p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    unlabelled = [p.name for p in images if p.stem not in labels]
    if unlabelled:
        raise ValueError(
            f"{len(unlabelled)} images in '{val_dir}' have no label (e.g. {unlabelled[:3]}): "
            "is this ImageNet-1k's validation folder and the matching labels file?"
        )
    for image in images:
        target = val_dir / labels[image.stem] / image.name
        if not dry_run:
            target.parent.mkdir(exist_ok=True)
            os.replace(image, target)
    return len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("val_dir", type=Path, help="folder holding ILSVRC2012_val_*.JPEG")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", type=Path, help="Kaggle's LOC_val_solution.csv")
    source.add_argument("--devkit", type=Path, help="ILSVRC2012_devkit_t12.tar.gz from image-net.org")
    parser.add_argument("--dry-run", action="store_true", help="check the labels, move nothing")
    args = parser.parse_args()
    if not args.val_dir.is_dir():
        parser.error(f"val_dir '{args.val_dir}' is not a folder")
    labels = labels_from_loc_csv(args.labels) if args.labels else labels_from_devkit(args.devkit)
    moved = sort_into_class_folders(args.val_dir, labels, dry_run=args.dry_run)
    classes = len({p.name for p in args.val_dir.iterdir() if p.is_dir()})
    print(f"{'would move' if args.dry_run else 'moved'} {moved} images; {args.val_dir} has {classes} class folders")


if __name__ == "__main__":
    main()
