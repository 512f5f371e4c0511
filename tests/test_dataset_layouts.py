"""Image folders as they come in the real world: zips made on macOS or Windows, hidden folders, split folders named
otherwise, data.root a level off, class names that sort or compare surprisingly, odd image sizes."""

from __future__ import annotations

import logging
import os
import shutil
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_utils import compose_config, make_image_folder, resolved_config

from rednet import config_schema, data


def _data_cfg(root: Path, *overrides: str):
    return resolved_config("train", [f"data.root={root}", "data=small", "data.img_size=8", *overrides]).data


def _train_set(root: Path, classes: list[str], split: str = "train", *overrides: str) -> data.CheckedImageFolder:
    return data.create_image_dataset(_data_cfg(root, *overrides), split, classes, is_training=False, replace_bad=False)


def _relative(dataset: data.CheckedImageFolder, root: Path) -> list[str]:
    return sorted(Path(path).relative_to(root).as_posix() for path, _ in dataset.samples)


def _left_out_line(caplog, split: str) -> str:
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith(f"{split}/: ") and "left out" in
                r.getMessage())  # fmt: skip


def _apple_double(path: Path) -> None:
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))  # AppleDouble magic


def test_a_folder_zipped_on_macos_is_read_without_its_metadata(tmp_path, caplog):
    """macOS's zip: a ._<name> AppleDouble file beside every file, __MACOSX/ mirroring the tree, .DS_Store: never
    images, left out and counted, no error (a __MACOSX/ in a split was 'a class folder without images')."""
    root = make_image_folder(tmp_path / "ds", n_train=2, n_val=1, size=8)
    for image in list(root.rglob("*.png")):
        _apple_double(image.parent / f"._{image.name}")
        mirror = root / "__MACOSX" / image.parent.relative_to(root)
        mirror.mkdir(parents=True, exist_ok=True)
        _apple_double(mirror / f"._{image.name}")
    for split in ("train", "val"):  # the zip of one split folder puts __MACOSX/ inside it
        shutil.copytree(root / "__MACOSX" / split, root / split / "__MACOSX")
        (root / split / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    assert classes == ["cat", "dog", "fox"]
    # train: 6 ._ beside images, 6 in __MACOSX/, 2 .DS_Store; val: 3 + 3 + 1
    assert "train/: 6 images used, 14 files left out" in _left_out_line(caplog, "train")
    assert "macOS metadata 14" in _left_out_line(caplog, "train")
    assert "val/: 3 images used, 7 files left out" in _left_out_line(caplog, "val")
    assert _relative(_train_set(root, classes), root) == [f"train/{c}/{i}.png" for c in classes for i in (0, 1)]
    assert _relative(_train_set(root, classes, "val"), root) == [f"val/{c}/0.png" for c in classes]


def test_windows_metadata_and_hidden_folders_are_counted_by_their_files(tmp_path, caplog):
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    (root / "train" / "cat" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "train" / "dog" / "desktop.ini").write_text("[.ShellClassInfo]")
    (root / "train" / "desktop.ini").write_text("[.ShellClassInfo]")
    hidden = root / "train" / ".trash"  # a hidden folder of images: no class, each file counted
    hidden.mkdir()
    for name in ("a.png", "b.png"):
        shutil.copy(root / "train" / "cat" / "0.png", hidden / name)
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    assert classes == ["cat", "dog", "fox"]
    line = _left_out_line(caplog, "train")
    assert "3 images used, 5 files left out" in line
    assert "Windows metadata 3" in line and "in hidden folders 2" in line
    assert len(_train_set(root, classes)) == 3


@pytest.mark.parametrize(("train", "val"), [("training", "validation"), ("train", "valid"), ("training", "eval")])
def test_split_folders_under_timms_other_names_are_read(tmp_path, caplog, train, val):
    root = make_image_folder(tmp_path, n_train=2, n_val=1, size=8)
    (root / "train").rename(root / train)
    (root / "val").rename(root / val)
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)  # data.train_split=train, data.val_split=val
    assert classes == ["cat", "dog", "fox"]
    if val != "val":
        assert f"has no val/ folder: reading {val}/ (as timm does; set data.val_split={val}" in caplog.text
    assert _relative(_train_set(root, classes), root) == [f"{train}/{c}/{i}.png" for c in classes for i in (0, 1)]


def test_a_missing_val_folder_names_the_folder_that_may_be_it(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    (root / "val").rename(root / "test")
    with pytest.raises(FileNotFoundError, match=r"no 'val' folder: it holds test/, train/; if test/ is the split, "
                                                r"set data.val_split=test"):  # fmt: skip
        data.check_image_folder(root)
    assert data.check_image_folder(root, ("train", "test")) == ["cat", "dog", "fox"]


def test_a_folder_of_training_images_only_says_how_to_get_a_val_set(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=r"no 'val' folder: it holds train/, no validation images: move some "
                                                r"of each class's images .* from train/<class>/ to val/<class>/, or "
                                                r"set data.val_split=train"):  # fmt: skip
        data.check_image_folder(root)


def test_a_data_root_one_level_too_deep_or_too_high_says_which_root(tmp_path):
    root = make_image_folder(tmp_path / "parent" / "ds", n_train=1, n_val=1, size=8)
    with pytest.raises(FileNotFoundError, match=rf"data.root seems to be a split folder itself; set "
                                                rf"data.root='{root}'"):  # fmt: skip
        data.check_image_folder(root / "train")
    with pytest.raises(FileNotFoundError, match=rf"it holds ds/; ds/ holds train/: set data.root='{root}'"):
        data.check_image_folder(root.parent)


def test_an_empty_val_folder_says_what_to_put_there(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    with pytest.raises(ValueError, match=r"no class folders under val/: put its images into val/<class>/ folders"):
        data.check_image_folder(root)


@pytest.mark.parametrize("form", ["case", "unicode"])
def test_class_folders_that_differ_only_in_case_or_normalization_are_named(tmp_path, form):
    """'Cat' vs 'cat', and 'café' written by macOS (NFD) vs Linux (NFC): the same on screen, different folders."""
    train_name = "café"
    val_name = "Café" if form == "case" else unicodedata.normalize("NFD", train_name)
    root = make_image_folder(tmp_path, classes=("dog", train_name), n_train=1, n_val=1, size=8)
    (root / "val" / train_name).rename(root / "val" / val_name)
    assert sorted(os.listdir(root / "val")) != sorted(os.listdir(root / "train"))
    why = "letter case" if form == "case" else "Unicode normalization"
    with pytest.raises(ValueError, match=rf"only in train/: \['{train_name}'\], .*differ only in {why}"):
        data.check_image_folder(root)


def test_numeric_class_names_are_indexed_in_string_order_and_said(tmp_path, caplog):
    """torchvision's order (sorted strings): '10' before '2'. The index a class gets is logged when it is not
    the number's order, and each image's label is its folder's index in that order."""
    root = make_image_folder(tmp_path, classes=("1", "2", "10"), n_train=1, n_val=1, size=8)
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    assert classes == ["1", "10", "2"]
    assert "indexed in string order as torchvision's ImageFolder does: class 1 is '10'" in caplog.text
    labels = {Path(p).parent.name: t for p, t in _train_set(root, classes).samples}
    assert labels == {"1": 0, "10": 1, "2": 2}


@pytest.mark.parametrize(
    "link, kind",
    [
        ("cat", "symlink loops"),  # back to its own class folder
        (".", "symlink loops"),  # to the split folder: every class's images would become cats
        ("..", "symlink loops"),  # above it
        ("dog", "links into other class folders"),  # the dogs would be cats as well
    ],
)
def test_a_symlink_to_a_folder_read_elsewhere_is_not_followed(tmp_path, caplog, link, kind):
    root = make_image_folder(tmp_path, n_train=2, n_val=1, size=8)
    (root / "train" / "cat" / "linked").symlink_to((root / "train" / link).resolve())
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    assert f"{kind} 1" in _left_out_line(caplog, "train")
    train = _train_set(root, classes)
    assert sorted(Counter(label for _, label in train.samples).values()) == [2, 2, 2]


def test_a_class_of_images_only_in_several_subfolders_warns(tmp_path, caplog):
    """train/animals/{cat,dog}/: a level of class folders too many, or a super-class; all is class 'animals'."""
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    for sub in ("tabby", "siamese"):
        (root / "train" / "cat" / sub).mkdir()
        shutil.copy(root / "train" / "dog" / "0.png", root / "train" / "cat" / sub / "0.png")
    (root / "train" / "cat" / "0.png").unlink()
    caplog.set_level(logging.WARNING, logger="rednet")
    assert data.check_image_folder(root) == ["cat", "dog", "fox"]
    assert "holds images only in its subfolders siamese/, tabby/: all are class 'cat'" in caplog.text


def test_a_data_root_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    """The shell leaves data.root=~/x unexpanded (it is no variable assignment); train.py made it <cwd>/~/x."""
    import train

    monkeypatch.setenv("HOME", str(tmp_path))
    make_image_folder(tmp_path / "my data", n_train=1, n_val=1, size=8)
    assert data.check_image_folder("~/my data") == ["cat", "dog", "fox"]
    cfg = compose_config("train", ["data.root='~/my data'"])  # quoted, or from a YAML file: the ~ reaches train.py
    config_schema.make_paths_absolute(cfg, train.PATH_KEYS)
    assert cfg.data.root == str((tmp_path / "my data").resolve())


def test_an_image_too_large_for_pillow_says_to_downscale_it(tmp_path, monkeypatch):
    """A 20000 x 20000 scan is beyond Pillow's bomb guard (2 x 89.5 Mpx); the limit is lowered to stand in."""
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    Image.new("RGB", (40, 40)).save(root / "train" / "cat" / "scan.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1600 px > 2 x 700: DecompressionBombError
    classes = data.check_image_folder(root)
    with pytest.raises(data.UnreadableImagesError, match=r"scan.png' \(DecompressionBombError: .*downscale the file"):
        _train_set(root, classes)
    dataset = _train_set(root, classes, "train", "data.verify_images=false")
    index = next(i for i, (p, _) in enumerate(dataset.samples) if p.endswith("scan.png"))
    with pytest.raises(data.BadImageError, match=r"scan.png' \(DecompressionBombError: .*downscale the file"):
        dataset[index]


@pytest.mark.parametrize("is_training", [False, True])
def test_tiny_images_with_upper_case_extensions_in_paths_with_spaces_load(tmp_path, is_training):
    root = make_image_folder(tmp_path / "my data sets" / "ds 1", n_train=1, n_val=1, size=8)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(root / "train" / "cat" / "one pixel.PNG")
    Image.fromarray(np.full((2, 3, 3), 100, np.uint8)).save(root / "train" / "cat" / "IMG 2.JPG")
    (root / "train" / "cat" / "no_extension").write_bytes((root / "train" / "cat" / "0.png").read_bytes())
    classes = data.check_image_folder(root)
    cfg = _data_cfg(root)
    dataset = data.create_image_dataset(cfg, "train", classes, is_training=is_training, replace_bad=False, seed=0)
    assert _relative(dataset, root) == ["train/cat/0.png", "train/cat/IMG 2.JPG", "train/cat/one pixel.PNG",
                                        "train/dog/0.png", "train/fox/0.png"]  # fmt: skip
    for i in range(len(dataset)):
        image, _ = dataset[i]
        assert image.shape == (3, 8, 8) and bool(image.isfinite().all())


def test_per_class_counts_show_a_class_of_one_image(tmp_path, caplog):
    root = make_image_folder(tmp_path, n_train=6, n_val=1, size=8)
    for image in sorted((root / "train" / "fox").iterdir())[1:]:
        image.unlink()
    caplog.set_level(logging.INFO, logger="rednet")
    data.check_image_folder(root)
    assert "train/: 13 images in 3 classes, 1 to 6 per class (fewest: 'fox')" in caplog.text


def test_override_values_starting_with_a_tilde_are_the_home_folder(monkeypatch):
    monkeypatch.setenv("HOME", "/home/u")
    overrides = ["data.root=~/images", "checkpoint=~", "~trainer.foo", "+data.x=~/a b", "seed=1", "name=a~b"]
    overrides.append("data.root=~/a,~/b,/c")  # a sweep (train.py -m): each value
    assert config_schema.expand_home_in_overrides(overrides) == [
        "data.root=/home/u/images", "checkpoint=/home/u", "~trainer.foo", "+data.x=/home/u/a b", "seed=1", "name=a~b",
        "data.root=/home/u/a,/home/u/b,/c",
    ]  # fmt: skip


def test_class_names_of_other_digit_characters_are_not_read_as_numbers(tmp_path):
    """'²' is a digit to str.isdigit but no number to int(): the class-order note crashed on it."""
    root = make_image_folder(tmp_path, classes=("1", "²", "10"), n_train=1, n_val=1, size=8)
    assert data.check_image_folder(root) == ["1", "10", "²"]
