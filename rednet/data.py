"""Image-folder data for training and evaluation: layout checks, timm datasets and transforms, samplers, loaders.

Layout (ImageNet's): `<root>/train/<class>/<image>` and `<root>/val/<class>/<image>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import multiprocessing
import os
import random
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import EpsImagePlugin, Image, ImageOps, features
from timm.data import ImageDataset, Mixup, create_transform
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import ReaderImageFolder
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, default_collate, get_worker_info

from rednet.checkpoint import PREPROCESSING_KEYS

_logger = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image file that cannot be read or decoded, or whose pixel values have no known range."""


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`count` and `noun` in its number: plural(1, "file") is "1 file", plural(0, "file") "0 files" (`nouns`: the
    plural when it is not noun + "s")."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def describe_unreadable(bad: list[tuple[str, str]]) -> str:
    """'is not an image Pillow can open: 'PATH' (why)' / 'are not images ...: ...' for up to 10 (path, why) pairs."""
    listing = "; ".join(f"'{path}' ({why})" for path, why in bad[:10]) + (" ..." if len(bad) > 10 else "")
    return f"{'is not an image' if len(bad) == 1 else 'are not images'} Pillow can open: {listing}"


class UnreadableImagesError(BadImageError):
    """Files named as images that Pillow cannot open, found before training, in one or more splits.

    Attributes:
        reports: (split, [(path, why), ...] of its unreadable files, files in the split), one per split.
    """

    def __init__(self, reports: list[tuple[str, list[tuple[str, str]], int]]) -> None:
        self.reports = reports
        parts = []
        for split, bad, total in reports:
            parts.append(f"{split}/: {len(bad)} of {plural(total, 'file')} named as images {describe_unreadable(bad)}")
        super().__init__(
            " | ".join(parts) + "; replace or delete them, or set data.skip_bad_images=true to leave them out"
        )


# --- which files are images: every format this Pillow can decode


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions (with the dot) of the formats this Pillow opens and decodes, e.g. '.png', '.webp'.

    timm's default list is .png/.jpg/.jpeg only. Left out: formats whose decoder is missing here (WebP, AVIF or
    JPEG 2000 without their libraries, EPS without Ghostscript), Pillow's identify-only stubs (HDF5, GRIB, BUFR,
    WMF/EMF) and MPEG video, which Pillow can name but not decode.
    """
    Image.init()
    undecodable = {"MPEG", "BUFR", "GRIB", "HDF5", "WMF"}
    if not features.check("webp"):
        undecodable.add("WEBP")
    if not features.check("avif"):
        undecodable.add("AVIF")
    if not features.check("jpg_2000"):
        undecodable.add("JPEG2000")
    if not EpsImagePlugin.has_ghostscript():
        undecodable.add("EPS")
    formats = set(Image.OPEN) - undecodable
    extensions = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in formats}
    if "JPEG" in formats:
        extensions.add(".mpo")  # multi-picture JPEGs (camera files), opened by the JPEG plugin
    return frozenset(extensions)


def _is_image(name: str) -> bool:
    # Hidden files are never images, even named ._photo.jpg: macOS writes such AppleDouble files beside copies.
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in image_extensions()


# Folders and files operating systems write beside images, never images themselves: left out and counted under
# these kinds (a zip made on macOS holds __MACOSX/ with a ._<name> AppleDouble file for every file, and .DS_Store).
MACOS_FOLDER = "__MACOSX"
_SYSTEM_FILES = {".ds_store": "macOS metadata", "thumbs.db": "Windows metadata", "desktop.ini": "Windows metadata"}


def _left_out_kind(name: str) -> str:
    """How a file left out of a split is counted in the log, from its name: 'macOS metadata' (._*, .DS_Store),
    'Windows metadata' (Thumbs.db, desktop.ini), 'hidden', its extension, or 'no extension'."""
    if name.lower() in _SYSTEM_FILES:
        return _SYSTEM_FILES[name.lower()]
    if name.startswith("._"):
        return "macOS metadata"
    if name.startswith("."):
        return "hidden"
    return os.path.splitext(name)[1].lower() or "no extension"


def _skipped_folder_kind(name: str) -> str | None:
    """The kind every file in a folder named `name` is counted under (the folder is not read), or None: read it."""
    if name == MACOS_FOLDER:
        return "macOS metadata"
    if name.startswith("."):  # .ipynb_checkpoints/, .cache/, .git/
        return "in hidden folders"
    return None


def _files_under(folder: str) -> list[str]:
    """Every file below `folder` (symlinks followed, each directory once), as paths relative to it."""
    files, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop, or a second link to the same folder
            dirs[:] = []
            continue
        seen.add(real)
        files += [os.path.relpath(os.path.join(top, n), folder) for n in names]
    return files


@dataclasses.dataclass
class SplitListing:
    """What one split folder holds: its classes, the images of each, and every file that is not used.

    Attributes:
        folder: the split folder.
        classes: the class folder names, sorted as strings (Python's sorted(): '10' before '2', 'B' before 'a').
        samples: (image path, class name), sorted as timm sorts them (natural order of the path).
        left_out: (path relative to `folder`, kind) for every other file (see `_left_out_kind`).
        nested: images found in subfolders of a class folder (relative paths), used with their class folder's label.
        empty: class folders without any image: {class name: files they hold (relative to the class folder)}.
    """

    folder: Path
    classes: list[str]
    samples: list[tuple[str, str]]
    left_out: list[tuple[str, str]]
    nested: list[str]
    empty: dict[str, list[str]]


def _linked_elsewhere(real: str, seen: set[str], split_real: str, other_classes: set[str]) -> str | None:
    """Why a subfolder (by its real path) is not read, or None: a link back to a folder already read, to the split
    folder or one above it (a loop), or into another class folder (its images would get a second label)."""
    if real in seen or split_real == real or split_real.startswith(real + os.sep):
        return "symlink loops"
    if any(real == c or real.startswith(c + os.sep) for c in other_classes):
        return "links into other class folders"
    return None


def _walk_class_folder(class_dir: Path, listing: SplitListing, class_reals: set[str]) -> None:
    """Add one class folder's images, at any depth, and its other files to `listing`.

    Images in subfolders belong to the class folder, as in torchvision's ImageFolder (Tiny-ImageNet's
    train/<class>/images/): timm's reader would label them by the subfolder's name instead, which is no class.
    `class_reals`: the real paths of the split's class folders (links into another one are not followed).
    """
    name, direct, left_out, holders = class_dir.name, 0, [], set()
    seen = {os.path.realpath(class_dir)}
    split_real, other_classes = os.path.realpath(class_dir.parent), class_reals - seen
    for top, dirs, files in os.walk(class_dir, followlinks=True):
        relative_top = os.path.relpath(top, class_dir)
        kept = []
        for d in sorted(dirs):
            path, sub = os.path.join(top, d), os.path.normpath(os.path.join(relative_top, d))
            kind = _skipped_folder_kind(d)
            linked = None if kind else _linked_elsewhere(os.path.realpath(path), seen, split_real, other_classes)
            if linked is not None:
                left_out.append((f"{sub}/", linked))
                continue
            if kind is not None:
                left_out += [(f"{sub}/{f}", kind) for f in _files_under(path)]
                continue
            seen.add(os.path.realpath(path))
            kept.append(d)
        dirs[:] = kept
        for f in sorted(files):
            relative = os.path.normpath(os.path.join(relative_top, f))
            if not _is_image(f):
                left_out.append((relative, _left_out_kind(f)))
                continue
            listing.samples.append((os.path.join(top, f), name))
            if relative_top == ".":
                direct += 1
            else:
                listing.nested.append(f"{name}/{relative}")
                holders.add(relative.split(os.sep)[0])
    if direct == 0 and not holders:
        listing.empty[name] = sorted(path for path, _ in left_out)
    elif direct == 0 and len(holders) > 1:
        _logger.warning(
            "'%s' holds images only in its subfolders %s: all are class '%s'; if those subfolders are the classes, "
            "set data.root one level deeper", class_dir, ", ".join(f"{h}/" for h in sorted(holders)[:5]), name,
        )  # fmt: skip
    listing.left_out += [(f"{name}/{path}", kind) for path, kind in left_out]


def list_split(split_dir: str | Path) -> SplitListing:
    """The classes, images and left-out files of one split folder (`<root>/<split>`).

    A class is each folder directly in `split_dir` (symlinks followed), except hidden ones and macOS's __MACOSX/;
    its images are the files with an `image_extensions()` extension (any case, not hidden) at any depth in it.
    Every other file is in `left_out`, with its kind.
    """
    split_dir = Path(split_dir)
    listing = SplitListing(split_dir, [], [], [], [], {})
    class_dirs = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        if not entry.is_dir():  # files outside class folders are no class's either
            kind = _left_out_kind(entry.name)
            listing.left_out.append((entry.name, kind if "metadata" in kind else "outside class folders"))
        elif (kind := _skipped_folder_kind(entry.name)) is not None:
            listing.left_out += [(f"{entry.name}/{f}", kind) for f in _files_under(entry.path)]
        else:
            class_dirs.append(Path(entry.path))
    class_reals = {os.path.realpath(d) for d in class_dirs}
    for class_dir in class_dirs:
        listing.classes.append(class_dir.name)
        _walk_class_folder(class_dir, listing, class_reals)
    listing.samples.sort(key=lambda sample: natural_key(sample[0]))  # timm's order: runs keep their data order
    return listing


# timm's create_dataset(search_split=True) reads these folders when the split's own is missing: data.train_split=train
# also finds training/, data.val_split=val finds valid/, validation/, eval/ or evaluation/.
SPLIT_SYNONYMS = (("train", "training"), ("val", "valid", "validation", "eval", "evaluation"))


def split_folder(root: str | Path, split: str) -> Path:
    """The folder of `split` under data.root `root` (`~` expanded): `<root>/<split>`, else timm's synonym (logged).

    Raises:
        FileNotFoundError: `root` is missing, or holds neither; the message lists the folders it holds and the
            likely fix (data.root one level up or down, or data.train_split/data.val_split set to a folder there).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist; {LAYOUT}")
    if (root / split).is_dir():
        return root / split
    for names in SPLIT_SYNONYMS:
        found = next((root / n for n in names if split in names and (root / n).is_dir()), None)
        if found is not None:
            _log_once(f"data.root '{root}' has no {split}/ folder: reading {found.name}/ (as timm does; set "
                      f"data.{'train' if names[0] == 'train' else 'val'}_split={found.name} to name it)")  # fmt: skip
            return found
    raise FileNotFoundError(f"data.root '{root}' has no '{split}' folder: {_where_the_split_is(root, split)}; {LAYOUT}")


LAYOUT = "expected <data.root>/train/<class>/<image> and <data.root>/val/<class>/<image> (ImageNet's layout)"


def _subfolders(folder: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return sorted(p for p in folder.iterdir() if p.is_dir() and _skipped_folder_kind(p.name) is None)
    return []


def _holds_images(folder: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(_is_image(p.name) for p in folder.iterdir())
    return False


def _where_the_split_is(root: Path, split: str) -> str:
    """What `root` holds instead of `split`, and the likely fix: a data.root one level too deep or too high, or
    the split under another name."""
    names = [split, *next((n for n in SPLIT_SYNONYMS if split in n), ())]
    folders = _subfolders(root)
    listed = ", ".join(f"{p.name}/" for p in folders[:10]) + (" ..." if len(folders) > 10 else "") or "no folders"
    if root.name in names or (folders and any(_holds_images(p) for p in folders[:20])):
        return (f"it holds {listed}, folders of images: data.root seems to be a split folder itself; set "
                f"data.root='{root.parent}' (the folder holding train/ and val/), or make train/ and val/ folders "
                "of these class folders")  # fmt: skip
    deeper = [p for p in folders if any((p / n).is_dir() for n in names)]
    if deeper:
        return f"it holds {listed}; {deeper[0].name}/ holds {split}/: set data.root='{deeper[0]}'"
    others = [p.name for p in folders if p.name not in {n for group in SPLIT_SYNONYMS for n in group}]
    key = "data.train_split" if split in SPLIT_SYNONYMS[0] else "data.val_split"
    if others:
        return f"it holds {listed}; if {others[0]}/ is the split, set {key}={others[0]}"
    train = next((p.name for p in folders if p.name in SPLIT_SYNONYMS[0]), None)
    if key == "data.val_split" and train is not None:  # a folder of training images only: say how to get a val set
        return (f"it holds {listed}, no validation images: move some of each class's images (e.g. a fifth) from "
                f"{train}/<class>/ to {split}/<class>/, or set data.val_split={train} to evaluate on the training "
                "images (which measures no generalization)")  # fmt: skip
    return f"it holds {listed}"


def _log_listing(split: str, listing: SplitListing) -> None:
    """One INFO line of the files left out by kind, one of images in class subfolders, one of images per class."""
    used = len(listing.samples)
    if listing.left_out:
        counts = Counter(kind for _, kind in listing.left_out)
        _logger.info(
            "%s/: %s used, %s left out (not an image format this Pillow decodes, hidden, system metadata, or not "
            "in a class folder): %s; e.g. %s",
            split, plural(used, "image"), plural(len(listing.left_out), "file"),
            ", ".join(f"{kind} {n}" for kind, n in counts.most_common()),
            ", ".join(path for path, _ in listing.left_out[:3]),
        )  # fmt: skip
    if listing.nested:
        _logger.info(
            "%s/: %s of %d are in subfolders of their class folder (e.g. %s), labelled by the class folder (as "
            "torchvision's ImageFolder does)", split, plural(len(listing.nested), "image"), used, listing.nested[0],
        )  # fmt: skip
    per_class = Counter(name for _, name in listing.samples)
    fewest = min(listing.classes, key=lambda c: per_class[c])
    _logger.info(
        "%s/: %s in %s, %d to %d per class (fewest: '%s')", split, plural(used, "image"),
        plural(len(listing.classes), "class", "classes"), per_class[fewest], max(per_class.values()), fewest,
    )  # fmt: skip


def _differences(a: list[str], b: list[str]) -> str:
    """Pairs of class names in `a` and `b` that differ only in letter case or Unicode normalization, said."""
    pairs = []
    by_form = {unicodedata.normalize("NFC", y): y for y in b}
    by_case = {unicodedata.normalize("NFC", y).casefold(): y for y in b}
    for x in a:
        form = unicodedata.normalize("NFC", x)
        if form in by_form:
            y = by_form[form]
            pairs.append(f"'{x}' and '{y}' differ only in Unicode normalization (macOS writes decomposed accents)")
        elif form.casefold() in by_case:
            pairs.append(f"'{x}' and '{by_case[form.casefold()]}' differ only in letter case")
    return "; ".join(pairs[:5])


def check_image_folder(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> list[str]:
    """Check `root` holds the same class folders in each split, each with images; return the sorted class names.

    Each split's folder is `split_folder`'s; its classes, images and left-out files are `list_split`'s. Logged
    (INFO, per split): the files left out by kind, images in class subfolders, images per class. Class names
    are sorted as strings, as torchvision does: class index 1 of folders 1, 2, 10 is '10' (logged when so).

    Raises:
        FileNotFoundError / ValueError: naming the bad path, what it holds and the fix, before any work starts: a
            missing root or split, a split without class folders, a class folder without images (listing its
            files), splits with other class folders (naming those that differ only in case or normalization).
    """
    classes = {}
    folders = {split: split_folder(root, split) for split in splits}  # every split is there before any is listed
    for split in splits:
        listing = list_split(folders[split])
        if not listing.classes:
            raise ValueError(
                f"data.root '{Path(root).expanduser()}' has no class folders under {listing.folder.name}/: put its "
                f"images into {listing.folder.name}/<class>/ folders, the same class names in every split; {LAYOUT}"
            )
        for name, held in listing.empty.items():
            held_text = ", ".join(held[:10]) + (f", ... ({plural(len(held), 'file')})" if len(held) > 10 else "")
            raise ValueError(
                f"class folder '{listing.folder / name}' holds no image this Pillow can read "
                f"({held_text or 'it is empty'}); add images (.png, .jpg, .webp, .bmp, .tif, ...: "
                "rednet.data.image_extensions() lists them), convert the files, or remove the folder"
            )
        _log_listing(listing.folder.name, listing)
        classes[split] = listing.classes
    first = splits[0]
    for split in splits[1:]:
        if classes[split] != classes[first]:
            only_a = sorted(set(classes[first]) - set(classes[split]))
            only_b = sorted(set(classes[split]) - set(classes[first]))
            hint = _differences(only_a, only_b)
            raise ValueError(
                f"classes of {split}/ differ from {first}/ under data.root '{Path(root).expanduser()}': only in "
                f"{first}/: {only_a[:10]}, only in {split}/: {only_b[:10]}"
                + (f" ({hint})" if hint else "")
                + f"; both splits need the same class folders (the model's outputs are {first}/'s classes): rename "
                f"or add folders"
            )
    names = classes[first]
    numeric = sorted(names, key=int) if all(n.isdecimal() for n in names) else names
    if numeric != names:
        index = next(i for i, (a, b) in enumerate(zip(names, numeric)) if a != b)
        _logger.info(
            "class folders are numbers, indexed in string order as torchvision's ImageFolder does: class %d is "
            "'%s' (checkpoints keep the names, in 'classes')", index, names[index],
        )  # fmt: skip
    return names


def explain_error(error: BaseException) -> str:
    """'Type: message' of an error opening an image, with the fix for one too large for Pillow's bomb guard."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, Image.DecompressionBombError):
        # Pillow refuses more than 2 x Image.MAX_IMAGE_PIXELS (179 Mpx): a 20000 x 20000 scan or satellite tile
        text += (
            " Pillow refuses images this large; downscale the file (it is resized to data.img_size anyway), or tile "
            "it into several images"
        )
    return text


def _header_error(path: str) -> str | None:
    """Why Pillow cannot open `path` as an image (`explain_error`), or None when its header reads."""
    try:
        with Image.open(path):  # reads the header only: format, mode and size, no pixels
            return None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return explain_error(e)


def unreadable_files(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, why) for each file of `paths` that Pillow cannot open as an image, in order.

    Catches what an image extension does not tell: zero-byte files, text or HTML saved as .jpg, links to nothing,
    files this process may not read, decompression bombs. Only headers are read (60-80 us a file on 2 cores with a
    warm cache, so ImageNet's 1.28M take 1-2 min; threads overlap the I/O): a file whose pixel data is truncated
    still fails when it is loaded, naming the file.
    """
    with ThreadPoolExecutor(max_workers=min(32, 4 * usable_cpus())) as pool:
        errors = list(pool.map(_header_error, paths, chunksize=256))
    return [(path, error) for path, error in zip(paths, errors) if error is not None]


# data.verify_images=auto reads the headers of splits up to this many files (a few seconds); ImageNet's 1.28M would
# cost every rank minutes at every start (more on a network file system), so there a bad file fails when first
# loaded, naming the file (or is skipped with data.skip_bad_images=true), unless data.verify_images=true.
VERIFY_IMAGES_AUTO_LIMIT = 100_000


def _drop_unreadable(
    samples: list[tuple[str, int]], split: str, skip: bool, verify: bool | str = "auto"
) -> list[tuple[str, int]]:
    """`samples` without the files Pillow cannot open: an error listing them, or (skip) a warning, before any step.

    `verify`: data.verify_images (True, False, or "auto": splits of at most VERIFY_IMAGES_AUTO_LIMIT files).

    Raises:
        UnreadableImagesError: with `skip` false, naming up to 10 of the files, why, and the fix.
    """
    if verify is False or (verify == "auto" and len(samples) > VERIFY_IMAGES_AUTO_LIMIT):
        if verify == "auto":
            _logger.info(
                "%s/: %s, not reading each header before training (data.verify_images=auto stops at %d; "
                "set data.verify_images=true to check them all first)",
                split,
                plural(len(samples), "file"),
                VERIFY_IMAGES_AUTO_LIMIT,
            )
        return samples
    start = time.perf_counter()
    bad = unreadable_files([path for path, _ in samples])
    seconds = time.perf_counter() - start
    if seconds > 10:
        _logger.info("%s/: read the headers of %s in %.0f s", split, plural(len(samples), "file"), seconds)
    if not bad:
        return samples
    if not skip:
        raise UnreadableImagesError([(split, bad, len(samples))])
    _logger.warning("%s/: left out %s that %s", split, plural(len(bad), "file"), describe_unreadable(bad))
    left_out = {path for path, _ in bad}
    return [sample for sample in samples if sample[0] not in left_out]


# --- pixels: every image mode to 8-bit RGB

ALPHA_BACKGROUND = 255  # transparent pixels are composited over white, as a browser or document shows them
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _composite_over_background(img: Image.Image) -> Image.Image:
    # out = (c * a + bg * (255 - a)) / 255, rounded; the colour under a transparent pixel is often arbitrary (what
    # convert("RGB") would keep), so it must not reach the model.
    if img.mode == "La":  # premultiplied; Pillow converts it to RGBA only by way of LA
        img = img.convert("LA")
    rgba = np.asarray(img.convert("RGBA"), dtype=np.uint32)
    alpha = rgba[..., 3:]
    rgb = (rgba[..., :3] * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8))


def _scaled_gray(img: Image.Image) -> np.ndarray | None:
    """The 8-bit values of a 16-bit integer, 32-bit integer or float image, scaled from its range; None for others.

    Raises:
        ValueError: an I image outside 0..65535 or an F image outside 0.0..1.0 (or NaN) (see `to_rgb`).
    """
    mode = img.mode
    if mode in _UINT16_MODES or mode == "I":
        values = np.asarray(img)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"mode I (32-bit integer) image with values {values.min()}..{values.max()}: only 0..65535 (16-bit "
                "data) is read; rescale the file to 16 or 8 bits"
            )
        return ((values.astype(np.uint32) + 128) // 257).astype(np.uint8)  # == round(v / 257): 257 is odd, no ties
    if mode == "F":
        values = np.asarray(img, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(
                f"mode F (32-bit float) image with values {np.nanmin(values):.6g}..{np.nanmax(values):.6g}: only "
                "0.0..1.0 is read (no NaN or inf); rescale the file to 0..1, or save it as 8- or 16-bit"
            )
        return np.rint(values * 255).astype(np.uint8)
    return None


def to_rgb(img: Image.Image) -> Image.Image:
    """The image as 8-bit RGB, each mode scaled from its own full range (README "Image files and modes").

    - RGB as is; L, 1 (0/255), CMYK ((255-C)(255-K)/255), YCbCr, LAB, HSV, RGBX: Pillow's conversion; embedded ICC
      profiles are not applied.
    - P: its palette colours; with transparency, and LA, La, PA, RGBA, RGBa: alpha composited over white.
    - I;16 (any byte order; 16-bit PNG/TIFF): round(v / 257), so 0..65535 maps onto 0..255 and nothing saturates.
    - I (32-bit integer): taken as 16-bit data (what Pillow gives for 16-bit files and uint16 arrays), same scale.
    - F (32-bit float): taken as 0.0..1.0, round(v * 255).

    Raises:
        ValueError: an I image with values outside 0..65535 or an F image outside 0.0..1.0 (or NaN): no range can
            be assumed (stretching each image to its own min..max would make images that differ only in
            brightness identical), so the message says to rescale the files.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if mode in _ALPHA_MODES or mode == "P":
        return _composite_over_background(img)
    gray = _scaled_gray(img)
    if gray is not None:
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")


def to_gray(img: Image.Image) -> Image.Image:
    """The image as 8-bit grayscale (mode L), for models that take 1 channel.

    L and 1 (0/255) as Pillow gives them; 16-bit, 32-bit integer and float modes scaled from their range as in
    `to_rgb` (no 8-bit RGB step in between); every other mode is `to_rgb`'s 8-bit RGB (palette, alpha over white,
    CMYK, ...) converted by Pillow's ITU-R 601-2 luma, L = R * 299/1000 + G * 587/1000 + B * 114/1000 (rounded),
    so a gray RGB pixel (v, v, v) stays v.

    Raises:
        ValueError: as `to_rgb`.
    """
    if img.mode in ("L", "1"):
        return img.convert("L") if img.mode == "1" else img
    gray = _scaled_gray(img)
    if gray is not None:
        return Image.fromarray(gray)
    return to_rgb(img).convert("L")


# The Pillow mode images are decoded to for a model taking that many input channels (its in_chans).
IMAGE_MODES = {1: "L", 3: "RGB"}


def image_mode(in_chans: int) -> str:
    """The Pillow mode image files are decoded to for a model with `in_chans` input channels: 1 "L", 3 "RGB".

    Raises:
        ValueError: any other `in_chans`, naming it: an image file gives gray or colour, and which 2 or 4+ planes a
            model means (alpha? depth? a second band?) no file format says.
    """
    if in_chans not in IMAGE_MODES:
        raise ValueError(
            f"model in_chans={in_chans}: images are read as 1-channel grayscale (in_chans=1) or 3-channel RGB "
            "(in_chans=3) only; set model.in_chans=1 or 3 (or leave it out: 3)"
        )
    return IMAGE_MODES[in_chans]


def open_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Read an image file as 8-bit RGB or L (`mode`): decoded, EXIF orientation applied (as a viewer shows it), then
    `to_rgb` or `to_gray`.

    Multi-frame files (GIF, TIFF stacks) give their first frame.

    Raises:
        OSError / SyntaxError / ValueError / Image.DecompressionBombError: unreadable or undecodable file, or a
            mode whose values have no known range (see `to_rgb`).
        ValueError: a `mode` other than "RGB" or "L".
    """
    if mode not in IMAGE_MODES.values():
        raise ValueError(f"mode={mode!r}: images are read as 'RGB' or 'L'")
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now: truncated files fail here, while the file is open
        ImageOps.exif_transpose(img, in_place=True)
        return to_gray(img) if mode == "L" else to_rgb(img)


def open_rgb(path: str | Path) -> Image.Image:
    """`open_image(path, "RGB")`: the file as 8-bit RGB."""
    return open_image(path, "RGB")


# --- datasets, samplers, loaders


class CheckedImageFolder(Dataset):
    """A timm ImageDataset whose unreadable images raise an error naming the file, or are skipped and counted.

    Skipped training images are replaced by the next readable one (batches keep their size, mixup needs even
    ones); skipped evaluation images come back as None and are dropped by `collate_skip_none`, so nothing is
    counted twice. Each skipped file is warned about once per dataset (the first time any pass or worker meets it);
    `take_bad_count` counts every skip.

    With a `seed`, the random augmentation of image i in epoch e depends only on (seed, e, i): not on the loader
    worker that reads it, nor on where a resumed run restarted, so a resumed run sees the same images.

    `mode`: "RGB" or "L", what each file is decoded to (`open_image`; `image_mode` gives it for a model's in_chans).
    """

    def __init__(
        self, dataset: Any, skip_bad_images: bool, replace_bad: bool, seed: int | None = None, mode: str = "RGB"
    ) -> None:
        if mode not in IMAGE_MODES.values():  # here, not per file: open_image's ValueError would read as a bad image
            raise ValueError(f"mode={mode!r}: images are read as 'RGB' or 'L'")
        self.mode = mode
        self.dataset = dataset
        self.samples: list[tuple[str, int]] = dataset.reader.samples
        self.skip_bad_images = skip_bad_images
        self.replace_bad = replace_bad
        self.seed = seed
        self.bad_count = multiprocessing.Value("i", 0)  # shared with loader workers
        # 1 for each sample whose skip was logged: every pass (epochs, precise BatchNorm's, any worker) reads the same
        # bad file again, and one warning per file per run says it (shared memory: a byte per sample).
        self.warned = multiprocessing.Array("b", len(self.samples), lock=False)
        self.epoch = multiprocessing.Value("i", 0)  # shared, so persistent workers see set_epoch too

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentation the next samples get (with a `seed`)."""
        self.epoch.value = epoch

    @contextlib.contextmanager
    def _augmentation_rng(self, index: int) -> Iterator[None]:
        """Seed the global generators for sample `index`; in the training process, give them back their state after.

        timm/torchvision transforms draw from Python's, NumPy's and torch's (CPU) global generators. With
        num_workers=0 those are the training process's, which mixup, dropout and drop-path draw from too: restoring
        them keeps the run's stream the same whatever the worker count or where the run was resumed. A loader
        worker's generators serve only the augmentation, so it skips the save and restore (NumPy's is costly).
        """
        if self.seed is None:
            yield
            return
        seed = int(np.random.SeedSequence([self.seed, self.epoch.value, index]).generate_state(1)[0])
        in_worker = get_worker_info() is not None
        saved = None if in_worker else (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)  # CPU only: the CUDA generators are untouched
        try:
            yield
        finally:
            if saved is not None:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Image.Image | None:
        path = self.samples[index][0]
        try:
            return open_image(path, self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if not self.skip_bad_images:
                raise BadImageError(
                    f"cannot read image '{path}' ({explain_error(e)}); replace or delete the file, "
                    "or set data.skip_bad_images=true to skip unreadable images"
                ) from e
            with self.bad_count.get_lock():  # (the lock also makes the warned flag's test-and-set atomic)
                self.bad_count.value += 1
                first = not self.warned[index]
                self.warned[index] = 1
            if first:
                _logger.warning(
                    "skipping unreadable image '%s' (%s); later reads skip it without another warning", path, e
                )
            return None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        for offset in range(len(self.samples) if self.replace_bad else 1):
            i = (index + offset) % len(self.samples)
            img = self._load(i)
            if img is not None:
                with self._augmentation_rng(index):
                    return self.dataset.transform(img), self.samples[i][1]
        if self.replace_bad:
            raise BadImageError(f"no readable image in the {plural(len(self.samples), 'file')} of this dataset")
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


def create_transforms(data_cfg: Any, is_training: bool, in_chans: int = 3) -> Any:
    """timm's transform pipeline for the split: RandomResizedCrop/flip/RandAugment/erasing, or resize + center crop.

    The images it takes are `in_chans`-channel PIL images (see `image_mode`); the tensors it gives are float32
    (in_chans, H, W), normalized by data.mean / data.std (one value per channel).

    Raises:
        ValueError: a preprocessing key is still null (train.py and eval.py fill them from the model's weights),
            data.mean or data.std without one value per channel, or a setting timm refuses (an unknown
            data.auto_augment policy, ...), naming the data.* keys.
    """
    unresolved = [key for key in PREPROCESSING_KEYS if data_cfg[key] is None]
    if unresolved:
        raise ValueError(
            f"data.{', data.'.join(unresolved)} not resolved (null): set them, or resolve them from the model "
            "first (train.resolve_preprocessing / rednet.weights.resolve_preprocessing)"
        )
    for key in ("mean", "std"):
        if len(data_cfg[key]) not in (1, in_chans):  # one value: timm's Normalize applies it to every channel
            raise ValueError(
                f"data.{key}={list(data_cfg[key])} has {len(data_cfg[key])} values but the model takes {in_chans}-"
                f"channel images: give {plural(in_chans, 'value')}"
                + (" (one per channel) or 1 (for every channel)" if in_chans > 1 else "")
                + ", or null for the weights' values"
            )
    common = dict(
        input_size=data_cfg.img_size,
        interpolation=data_cfg.interpolation,
        mean=tuple(data_cfg.mean),
        std=tuple(data_cfg.std),
    )
    try:
        return _timm_transform(data_cfg, is_training, common)
    except (AssertionError, KeyError, ValueError, TypeError) as e:  # timm checks its arguments with assert
        keys = "img_size, interpolation, mean, std, crop_pct" if not is_training else "the augmentation keys"
        raise ValueError(
            f"timm cannot build the {'training' if is_training else 'evaluation'} transforms from data.* "
            f"({type(e).__name__}: {e}); check {keys} (configs/data/imagenet.yaml documents each)"
        ) from e


def _timm_transform(data_cfg: Any, is_training: bool, common: dict[str, Any]) -> Any:
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


class _ListedReader(ReaderImageFolder):
    """timm's folder reader over a given sample list [(path, class index)], without a walk of its own."""

    def __init__(self, root: str, samples: list[tuple[str, int]], class_to_idx: dict[str, int]) -> None:
        Reader.__init__(self)
        self.root, self.samples, self.class_to_idx = root, samples, class_to_idx


def create_image_dataset(
    data_cfg: Any,
    split: str,
    classes: list[str],
    is_training: bool,
    replace_bad: bool,
    seed: int | None = None,
    in_chans: int = 3,
) -> CheckedImageFolder:
    """timm dataset of the images `list_split` finds in `split_folder(data.root, split)`, each labelled by the index
    of its class folder in `classes` (same indices every split).

    Its samples are (float32 tensor (in_chans, H, W), class index): `in_chans` is the model's input channels, 1
    (files decoded to 8-bit grayscale, `to_gray`) or 3 (8-bit RGB, `to_rgb`).

    `seed` makes each image's augmentation a function of (seed, epoch, index) (see `CheckedImageFolder`). Every
    file's header is read first (`unreadable_files`; data.verify_images, see VERIFY_IMAGES_AUTO_LIMIT): files that
    are no image fail here, before any training step.

    Raises:
        UnreadableImagesError: files Pillow cannot open, listed (with data.skip_bad_images=true: left out, with a
            warning).
        ValueError: an `in_chans` other than 1 or 3 (`image_mode`), a class folder not in `classes`, a transform
            setting timm refuses, or data.mean/std of another length (see `create_transforms`).
        FileNotFoundError: no such split folder (see `split_folder`).
    """
    mode = image_mode(in_chans)  # before the headers are read: a bad in_chans fails at once
    # The split's listing, not timm's walk: timm's reader labels an image by its own folder (a class's images/
    # subfolder would be a class of its own) and takes hidden ._x.jpg files; these are the images check_image_folder
    # counted, labelled by their class folder.
    listing = list_split(split_folder(data_cfg.root, split))
    class_to_idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(listing.classes) - set(class_to_idx))
    if unknown:  # check_image_folder refuses these first; a caller passing other classes must not lose images
        raise ValueError(
            f"{listing.folder} has class folders {unknown[:10]} that are not among the classes {classes[:10]}"
        )
    samples = [(path, class_to_idx[name]) for path, name in listing.samples]
    dataset = ImageDataset(str(listing.folder), reader=_ListedReader(str(listing.folder), samples, class_to_idx))
    verify = data_cfg.get("verify_images", "auto")
    dataset.reader.samples = _drop_unreadable(samples, split, data_cfg.skip_bad_images, verify)
    dataset.transform = create_transforms(data_cfg, is_training, in_chans)
    return CheckedImageFolder(
        dataset, skip_bad_images=data_cfg.skip_bad_images, replace_bad=replace_bad, seed=seed, mode=mode
    )


def create_train_val_datasets(
    data_cfg: Any, classes: list[str], seed: int | None = None, in_chans: int = 3
) -> tuple[CheckedImageFolder, CheckedImageFolder]:
    """The training set (data.train_split: augmented, unreadable images replaced when skipped) and the validation set
    (data.val_split), each as `create_image_dataset` builds it.

    Both splits' headers are read before either error is raised, so one error lists the unreadable files of both (a
    user fixing train/'s files would otherwise learn of val/'s only on the next start).

    Raises:
        UnreadableImagesError: files Pillow cannot open in either split, listed by split.
        ValueError: as `create_image_dataset`.
    """
    datasets, reports = [], []
    for split, is_training in ((data_cfg.train_split, True), (data_cfg.val_split, False)):
        try:
            datasets.append(
                create_image_dataset(data_cfg, split, classes, is_training=is_training, replace_bad=is_training,
                                     seed=seed if is_training else None, in_chans=in_chans)
            )  # fmt: skip
        except UnreadableImagesError as e:
            reports += [report for report in e.reports if report[0] not in {r[0] for r in reports}]  # (val = train)
    if reports:
        raise UnreadableImagesError(reports)
    return datasets[0], datasets[1]


def cgroup_cpu_quota(root: str | Path = "/sys/fs/cgroup", proc_cgroup: str | Path = "/proc/self/cgroup") -> int | None:
    """The CPUs a cgroup CPU quota grants this process (docker --cpus=2, a Kubernetes CPU limit), rounded up, or None
    without a quota. Such a limit leaves the affinity mask at every host CPU: a container limited to 2 CPUs of a
    64-core host would otherwise start 64-CPU worth of workers, which only queue for the 2.

    Reads cgroup v2's cpu.max ("200000 100000": quota and period in us; "max ..": none) or v1's cpu.cfs_quota_us /
    cpu.cfs_period_us (-1: none), in this process's own cgroup (from /proc/self/cgroup) or else at `root`.
    """
    root = Path(root)
    own: dict[str, str] = {}  # controller ("" for v2) -> this process's cgroup path
    with contextlib.suppress(OSError):
        for line in Path(proc_cgroup).read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path.lstrip("/")
    candidates = []
    for base in dict.fromkeys([own.get("", ""), ""]):
        candidates.append(("v2", root / base / "cpu.max"))
    for base in dict.fromkeys([own.get("cpu", ""), ""]):
        candidates.append(("v1", root / "cpu" / base))
    for kind, path in candidates:
        try:
            if kind == "v2":
                quota, period = path.read_text().split()[:2]
                if quota == "max":
                    return None
            else:
                quota = (path / "cpu.cfs_quota_us").read_text().strip()
                period = (path / "cpu.cfs_period_us").read_text().strip()
                if int(quota) < 0:
                    return None
        except (OSError, ValueError):
            continue
        return max(1, math.ceil(int(quota) / int(period)))
    return None


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (cpusets, taskset, SLURM bindings), lowered to a cgroup CPU
    quota (`cgroup_cpu_quota`), else all of them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return min(cpus, quota) if quota else cpus


def cpus_per_process(cpus: int | None = None, env: Mapping[str, str] | None = None) -> tuple[int, str]:
    """This process's share of the CPUs (at least 1), and how it was found.

    `usable_cpus()` is divided among the processes torchrun started on this node (LOCAL_WORLD_SIZE), which share
    one affinity mask; a process SLURM started itself (srun, submitit) gets at most SLURM_CPUS_PER_TASK.
    """
    cpus = usable_cpus() if cpus is None else cpus
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" not in env and env.get("SLURM_CPUS_PER_TASK", "").isdigit():
        share = max(1, min(cpus, int(env["SLURM_CPUS_PER_TASK"])))
        return share, f"{cpus} usable, SLURM_CPUS_PER_TASK={env['SLURM_CPUS_PER_TASK']}"
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, cpus // local), f"{cpus} usable, shared by {local} local process(es)"


def capped_workers(requested: int, cpus: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """data.num_workers, lowered to this process's CPUs (`cpus_per_process`) with a log line when it was more:
    more workers than CPUs only compete with the training process (torch warns about it).

    Raises:
        ValueError: a negative `requested`.
    """
    if requested < 0:
        raise ValueError(f"data.num_workers={requested} is negative: set 0 (load in the training process) or more")
    share, how = cpus_per_process(cpus, env)
    if requested <= share:
        return requested
    _log_once(f"data.num_workers={requested} lowered to {share}, the CPUs this process may use ({how})")
    return share


@functools.cache
def _log_once(message: str) -> None:
    _logger.info(message)  # the train and val loaders would each say it


def _loader_kwargs(data_cfg: Any, device: torch.device) -> dict[str, Any]:
    workers = capped_workers(data_cfg.num_workers)
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
            f"data.batch_size={data_cfg.batch_size} is larger than the {plural(per_rank, 'training image')} per "
            f"process ({len(dataset)} in all); lower data.batch_size"
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
