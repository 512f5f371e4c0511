"""Image-folder data for training and evaluation: layout checks, timm datasets and transforms, samplers, loaders.

Layout (ImageNet's): `<root>/train/<class>/<image>` and `<root>/val/<class>/<image>`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_dataset, create_transform
from timm.data.readers.img_extensions import get_img_extensions
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate

_logger = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded."""


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in get_img_extensions(as_set=True)


def _class_folders(split_dir: Path) -> dict[str, bool]:
    """Class folder name -> whether it holds an image directly.

    Images in a class's subfolder would be lost without a word (timm labels an image by the folder it is in, which
    is no class), so a subfolder holding images is an error, with the fix.
    """
    folders = {}
    for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
        with os.scandir(class_dir) as scan:  # scandir: file types without a stat per image (1.28M in ImageNet)
            entries = list(scan)
        for sub in (e for e in entries if e.is_dir() and not e.name.startswith(".")):
            if any(_is_image(f.name) for f in Path(sub.path).rglob("*")):
                raise ValueError(
                    f"'{sub.path}' holds images, but only images directly inside a class folder are read (timm "
                    f"labels an image by its own folder): move them into '{class_dir}' (e.g. Tiny-ImageNet's "
                    "train/<class>/images/ layout)"
                )
        folders[class_dir.name] = any(_is_image(e.name) for e in entries)
    return folders


def check_image_folder(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Check `root` holds the same non-empty class folders in each split; return the sorted class names.

    Raises:
        FileNotFoundError / ValueError: naming the bad path and the expected layout, before any work starts.
    """
    root = Path(root).expanduser()
    layout = "expected <root>/" + "|".join(splits) + "/<class>/<image> (ImageNet layout)"
    if not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist; {layout}")
    for split in splits:
        if not (root / split).is_dir():
            raise FileNotFoundError(f"data.root '{root}' has no '{split}' folder; {layout}")
    classes: dict[str, list[str]] = {}
    for split in splits:
        split_dir = root / split
        counts = _class_folders(split_dir)
        if not counts:
            raise ValueError(f"data.root '{root}' has no class folders under {split}/: {layout}")
        empty = [c for c, has_images in counts.items() if not has_images]
        if empty:
            raise ValueError(
                f"class folders without images under '{split_dir}': {empty[:10]}; remove them or add images"
            )
        classes[split] = sorted(counts)
    first = splits[0]
    for split in splits[1:]:
        if classes[split] != classes[first]:
            only_a = sorted(set(classes[first]) - set(classes[split]))[:10]
            only_b = sorted(set(classes[split]) - set(classes[first]))[:10]
            raise ValueError(
                f"classes of {split}/ differ from {first}/ under data.root '{root}': only in {first}/: {only_a}, "
                f"only in {split}/: {only_b}; both splits need the same class folders"
            )
    return classes[first]


class CheckedImageFolder(Dataset):
    """A timm ImageDataset whose unreadable images raise an error naming the file, or are skipped and counted.

    Skipped training images are replaced by the next readable one (batches keep their size, mixup needs even
    ones); skipped evaluation images come back as None and are dropped by `collate_skip_none`, so nothing is
    counted twice.

    With a `seed`, the random augmentation of image i in epoch e depends only on (seed, e, i): not on the loader
    worker that reads it, nor on where a resumed run restarted, so a resumed run sees the same images.
    """

    def __init__(self, dataset: Any, skip_bad_images: bool, replace_bad: bool, seed: int | None = None) -> None:
        self.dataset = dataset
        self.samples: list[tuple[str, int]] = dataset.reader.samples
        self.skip_bad_images = skip_bad_images
        self.replace_bad = replace_bad
        self.seed = seed
        self.bad_count = multiprocessing.Value("i", 0)  # shared with loader workers
        self.epoch = multiprocessing.Value("i", 0)  # shared, so persistent workers see set_epoch too

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation the next samples get (with a `seed`)."""
        self.epoch.value = epoch

    def _seed_augmentation(self, index: int) -> None:
        # timm/torchvision transforms draw from Python's, NumPy's and torch's (CPU) global generators.
        seed = int(np.random.SeedSequence([self.seed, self.epoch.value, index]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")  # convert() decodes, so truncated files fail here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if not self.skip_bad_images:
                raise BadImageError(
                    f"cannot read image '{path}' ({type(e).__name__}: {e}); replace or delete the file, "
                    "or set data.skip_bad_images=true to skip unreadable images"
                ) from e
            with self.bad_count.get_lock():
                self.bad_count.value += 1
            _logger.warning("skipping unreadable image '%s' (%s)", path, e)
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        if self.seed is not None:
            self._seed_augmentation(index)
        for offset in range(len(self.samples) if self.replace_bad else 1):
            i = (index + offset) % len(self.samples)
            img = self._load(i)
            if img is not None:
                return self.dataset.transform(img), self.samples[i][1]
        if self.replace_bad:
            raise BadImageError(f"no readable image in the {len(self.samples)} files of this dataset")
        return None

    def take_bad_count(self) -> int:
        """Unreadable images met since the last call."""
        with self.bad_count.get_lock():
            n, self.bad_count.value = self.bad_count.value, 0
        return n


def collate_skip_none(batch: list[Any]) -> Any:
    """Default collation without the samples a dataset skipped (None)."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, sharded by rank) that can start part way into an epoch.

    Data order depends only on (seed, epoch), so a run resumed in the middle of an epoch sees the same batches as
    one that was never stopped.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's permutation and skip its first `start_index` samples of this rank."""
        super().set_epoch(epoch)
        self.start_index = start_index

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start_index :])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)  # 0: the epoch's training is done, only its eval is left


class ShardSampler(Sampler[int]):
    """Every index exactly once over all ranks, in order, without the padding DistributedSampler adds."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = range(rank, len(dataset), num_replicas)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def create_transforms(data_cfg: Any, is_training: bool) -> Any:
    """timm's transform pipeline for the split: RandomResizedCrop/flip/RandAugment/erasing, or resize + center crop."""
    common = dict(
        input_size=data_cfg.img_size,
        interpolation=data_cfg.interpolation,
        mean=tuple(data_cfg.mean),
        std=tuple(data_cfg.std),
    )
    if not is_training:
        return create_transform(**common, is_training=False, crop_pct=data_cfg.crop_pct)
    return create_transform(
        **common,
        is_training=True,
        scale=tuple(data_cfg.scale),
        ratio=tuple(data_cfg.ratio),
        hflip=data_cfg.hflip,
        vflip=0.0,
        color_jitter=data_cfg.color_jitter or None,
        auto_augment=data_cfg.auto_augment,
        re_prob=data_cfg.re_prob,
        re_mode=data_cfg.re_mode,
        re_count=data_cfg.re_count,
    )


def create_image_dataset(
    data_cfg: Any, split: str, classes: list[str], is_training: bool, replace_bad: bool, seed: int | None = None
) -> CheckedImageFolder:
    """timm folder dataset of `<root>/<split>` with the class order fixed by `classes` (same indices every split).

    `seed` makes each image's augmentation a function of (seed, epoch, index) (see `CheckedImageFolder`).
    """
    dataset = create_dataset(
        "",
        root=str(Path(data_cfg.root).expanduser()),
        split=split,
        search_split=True,
        class_map={c: i for i, c in enumerate(classes)},
        is_training=is_training,
    )
    dataset.transform = create_transforms(data_cfg, is_training)
    return CheckedImageFolder(dataset, skip_bad_images=data_cfg.skip_bad_images, replace_bad=replace_bad, seed=seed)


def _loader_kwargs(data_cfg: Any, device: torch.device) -> dict[str, Any]:
    workers = data_cfg.num_workers
    return dict(
        num_workers=workers,
        pin_memory=bool(data_cfg.pin_memory) and device.type == "cuda",
        persistent_workers=bool(data_cfg.persistent_workers) and workers > 0,
        collate_fn=collate_skip_none,
    )


def create_train_loader(
    dataset: CheckedImageFolder, data_cfg: Any, world_size: int, rank: int, seed: int, device: torch.device
) -> DataLoader:
    """Shuffled, sharded, last partial batch dropped (BatchNorm and mixup want full batches)."""
    per_rank = math.ceil(len(dataset) / world_size)
    if per_rank < data_cfg.batch_size:
        raise ValueError(
            f"data.batch_size={data_cfg.batch_size} is larger than the {per_rank} training images per process "
            f"({len(dataset)} in all); lower data.batch_size"
        )
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, seed=seed)
    # Worker seeds come from the loader's own generator, so starting an epoch leaves the global RNG untouched.
    generator = torch.Generator().manual_seed(seed + rank)
    return DataLoader(
        dataset,
        batch_size=data_cfg.batch_size,
        sampler=sampler,
        drop_last=True,
        generator=generator,
        **_loader_kwargs(data_cfg, device),
    )


def create_eval_loader(
    dataset: CheckedImageFolder, data_cfg: Any, world_size: int, rank: int, device: torch.device
) -> DataLoader:
    """In order, sharded without padding: every image is evaluated exactly once over all ranks."""
    sampler = ShardSampler(dataset, num_replicas=world_size, rank=rank)
    return DataLoader(
        dataset, batch_size=data_cfg.batch_size, sampler=sampler, drop_last=False, **_loader_kwargs(data_cfg, device)
    )


def create_mixup(data_cfg: Any, label_smoothing: float, num_classes: int) -> Mixup | None:
    """timm's batch mixup/cutmix (soft targets), or None when both are off."""
    if not (data_cfg.mixup > 0 or data_cfg.cutmix > 0):
        return None
    return Mixup(
        mixup_alpha=data_cfg.mixup,
        cutmix_alpha=data_cfg.cutmix,
        prob=data_cfg.mixup_prob,
        switch_prob=data_cfg.mixup_switch_prob,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
