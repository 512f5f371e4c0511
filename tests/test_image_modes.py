"""Every Pillow image mode becomes 8-bit RGB with the documented pixel values; EXIF orientation is applied."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import resolved_config

from rednet import data

WHITE = (255, 255, 255)


def _rgb_list(rgb: Image.Image) -> list[tuple[int, int, int]]:
    assert rgb.mode == "RGB"
    return [tuple(p) for p in np.asarray(rgb).reshape(-1, 3).tolist()]


def _pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    rgb = data.to_rgb(img)
    assert rgb.size == img.size
    return _rgb_list(rgb)


def _gray(mode: str, values: list) -> Image.Image:
    img = Image.new(mode, (len(values), 1))
    img.putdata(values)
    return img


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("1", [0, 1], [0, 255]),
        ("L", [0, 37, 255], [0, 37, 255]),
        # 16-bit: round(v / 257), the full 0..65535 range onto 0..255 (Pillow's convert("RGB") clips at 255)
        ("I;16", [0, 128, 129, 257, 4000, 16000, 65535], [0, 0, 1, 1, 16, 62, 255]),
        # 32-bit integer: taken as 16-bit data, the same scale
        ("I", [0, 1000, 32768, 65535], [0, 4, 128, 255]),
        # float: 0.0..1.0, round(v * 255)
        ("F", [0.0, 0.2, 0.5, 1.0], [0, 51, 128, 255]),
    ],
)
def test_gray_modes_are_scaled_by_their_range(mode, values, expected):
    assert _pixels(_gray(mode, values)) == [(v, v, v) for v in expected]


def test_big_endian_16_bit_reads_like_little_endian():
    values = [0, 257, 4000, 16000, 65535]
    big = Image.frombytes("I;16B", (len(values), 1), np.array(values, ">u2").tobytes())
    assert _pixels(big) == [(v, v, v) for v in (0, 1, 16, 62, 255)]


@pytest.mark.parametrize(
    ("mode", "values", "match"),
    [
        ("I", [0, 70000], r"values 0\.\.70000: only 0\.\.65535"),
        ("I", [-5, 100], r"values -5\.\.100"),
        ("F", [0.0, 1.5], r"values 0\.\.1\.5: only 0\.0\.\.1\.0"),
        ("F", [0.0, float("nan")], r"only 0\.0\.\.1\.0 is read \(no NaN or inf\)"),
    ],
)
def test_values_outside_the_assumed_range_are_refused(mode, values, match):
    with pytest.raises(ValueError, match=match):
        data.to_rgb(_gray(mode, values))


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 100, 0, 128), (10, 20, 30, 0), (10, 20, 30, 255)])
    # round((c * a + 255 * (255 - a)) / 255): (25600 + 32385) / 255 = 227.4, (12800 + 32385) / 255 = 177.2, 127
    assert _pixels(rgba) == [(227, 177, 127), WHITE, (10, 20, 30)]
    la = Image.new("LA", (3, 1))
    la.putdata([(100, 128), (100, 0), (100, 255)])
    assert _pixels(la) == [(177, 177, 177), WHITE, (100, 100, 100)]
    premultiplied = Image.new("RGBa", (1, 1), (100, 50, 0, 128))  # 100 + 255 * 127 / 255 = 227, 177, 127
    assert np.abs(np.subtract(_pixels(premultiplied)[0], (227, 177, 127))).max() <= 1
    assert _pixels(Image.new("La", (1, 1), (100, 128))) in ([(227, 227, 227)], [(228, 228, 228)])


def _palette_image(mode: str = "P") -> Image.Image:
    img = Image.new(mode, (3, 1))
    img.putpalette([0, 0, 0, 200, 10, 20, 30, 40, 250] + [0] * (256 * 3 - 9))
    img.putdata([1, 2, 0] if mode == "P" else [(1, 255), (2, 128), (0, 0)])
    return img


def test_palette_modes_with_and_without_transparency():
    plain = _palette_image()
    assert _pixels(plain) == [(200, 10, 20), (30, 40, 250), (0, 0, 0)]
    plain.info["transparency"] = 0  # index 0 is transparent: white, not the palette's black
    assert _pixels(plain) == [(200, 10, 20), (30, 40, 250), WHITE]
    # PA: (30 * 128 + 255 * 127) / 255 = 142.1, (40 * 128 + 32385) / 255 = 147.1, (250 * 128 + 32385) / 255 = 252.5
    assert _pixels(_palette_image("PA")) == [(200, 10, 20), (142, 147, 252), WHITE]


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("CMYK", (10, 20, 30, 40), (207, 198, 190)),  # (255 - C)(255 - K) / 255
        ("YCbCr", (128, 128, 128), (128, 128, 128)),
        ("LAB", (128, 128, 128), (119, 119, 119)),  # L* 50 (128/255 of 100), a* = b* = 0: sRGB mid grey
        ("HSV", (0, 0, 200), (200, 200, 200)),
        ("RGBX", (1, 2, 3, 4), (1, 2, 3)),
    ],
)
def test_colour_modes(mode, value, expected):
    assert _pixels(Image.new(mode, (1, 1), value)) == [expected]


@pytest.mark.parametrize(
    ("name", "img", "expected"),
    [
        ("depth.png", _gray("I;16", [4000, 65535]), [16, 255]),
        ("scan.tif", _gray("I;16B", [16000, 257]), [62, 1]),
        ("int32.tif", _gray("I", [1000, 65535]), [4, 255]),
        ("float.tif", _gray("F", [0.2, 1.0]), [51, 255]),
        ("mask.png", _gray("1", [1, 0]), [255, 0]),
        ("cmyk.tif", Image.new("CMYK", (2, 1), (10, 20, 30, 40)), None),
        ("gray_alpha.png", Image.new("LA", (2, 1), (100, 0)), [255, 255]),
        ("rgba.webp", Image.new("RGBA", (2, 1), (10, 20, 30, 0)), [255, 255]),
    ],
)
def test_files_are_read_with_these_values(tmp_path, name, img, expected):
    path = tmp_path / name
    img.save(path, **({"lossless": True} if name.endswith(".webp") else {}))
    with Image.open(path) as reopened:
        saved_mode = reopened.mode
    rgb = data.open_rgb(path)
    assert rgb.mode == "RGB"
    if expected is None:
        assert _rgb_list(rgb) == [(207, 198, 190)] * 2
    else:
        assert _rgb_list(rgb) == [(v, v, v) for v in expected], saved_mode


def test_16_bit_classes_that_differ_by_4x_stay_distinct(tmp_path):
    """16-bit PNGs of two classes, one 4x as bright as the other: Pillow's convert("RGB") makes both 255."""
    for split in ("train", "val"):
        for name, value in (("dim", 4000), ("bright", 16000)):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            Image.fromarray(np.full((32, 32), value, np.uint16)).save(folder / "0.png")
    cfg = resolved_config("train", [f"data.root={tmp_path}", "data=small", "data.mean=[0,0,0]", "data.std=[1,1,1]"])
    classes = data.check_image_folder(tmp_path)
    val = data.create_image_dataset(cfg.data, "val", classes, is_training=False, replace_bad=False)
    by_class = {classes[target]: image for image, target in (val[0], val[1])}
    torch.testing.assert_close(by_class["dim"], torch.full((3, 32, 32), 16 / 255))  # round(4000 / 257)
    torch.testing.assert_close(by_class["bright"], torch.full((3, 32, 32), 62 / 255))  # round(16000 / 257)


def _exif_jpeg(path, orientation: int) -> None:
    """A 16x8 JPEG, left half red and right half blue, tagged with an EXIF orientation."""
    pixels = np.zeros((8, 16, 3), np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


@pytest.mark.parametrize(("orientation", "top", "bottom"), [(6, "red", "blue"), (8, "blue", "red"), (1, None, None)])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    _exif_jpeg(tmp_path / "photo.jpg", orientation)
    rgb = np.asarray(data.open_rgb(tmp_path / "photo.jpg")).astype(int)
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    if orientation == 1:
        assert rgb.shape == (8, 16, 3)  # as stored
        return
    # 6: shown turned 90 degrees clockwise (the left half on top); 8: counter-clockwise. Both 8 wide, 16 tall.
    assert rgb.shape == (16, 8, 3)
    assert np.abs(rgb[2, 4] - colours[top]).max() < 40
    assert np.abs(rgb[13, 4] - colours[bottom]).max() < 40


def test_dataset_applies_exif_orientation(tmp_path):
    for split in ("train", "val"):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            _exif_jpeg(tmp_path / split / name / "0.jpg", 6)
    cfg = resolved_config("train", [f"data.root={tmp_path}", "data=small", "data.img_size=16", "data.crop_pct=1.0"])
    cfg.data.mean, cfg.data.std = [0, 0, 0], [1, 1, 1]
    val = data.create_image_dataset(cfg.data, "val", data.check_image_folder(tmp_path), False, replace_bad=False)
    image, _ = val[0]  # resized short side 16, center crop 16x16 of the 8x16 portrait: rows 0-7 red, 8-15 blue
    assert image[0, 2, 8] > 0.8 and image[2, 2, 8] < 0.2
    assert image[2, 13, 8] > 0.8 and image[0, 13, 8] < 0.2


# --- 16-bit colour, palettes with alpha, several frames, every EXIF orientation in every format that carries one


def _png(path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow writes 16 bits for one channel only): 2 = RGB, 4 = LA, 6 = RGBA."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width = pixels.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_16_bit_grey_modes_of_every_byte_order():
    values = [0, 4000, 16000, 65535]
    for mode, dtype in (("I;16L", "<u2"), ("I;16N", "=u2"), ("I;16B", ">u2")):
        img = Image.frombytes(mode, (4, 1), np.array(values, dtype).tobytes())
        assert _pixels(img) == [(v, v, v) for v in (0, 16, 62, 255)], mode


def test_16_bit_colour_pngs_keep_their_high_byte(tmp_path):
    """Pillow decodes 48/64-bit PNGs (and 16-bit grey + alpha) to 8 bits itself, keeping each value's high byte:
    floor(v / 256), within 1 of the round(v / 257) of one-channel 16-bit images; nothing saturates."""
    _png(tmp_path / "rgb48.png", np.array([[[0, 4000, 65535], [257, 16000, 32768]]]), 2)
    assert _rgb_list(data.open_rgb(tmp_path / "rgb48.png")) == [(0, 15, 255), (1, 62, 128)]
    # alpha 32768 -> 128: (255 * 128 + 255 * 127) / 255 = 255, (0 + 32385) / 255 = 127
    _png(tmp_path / "rgba64.png", np.array([[[0, 4000, 65535, 65535], [65535, 0, 0, 32768], [9, 9, 9, 0]]]), 6)
    assert _rgb_list(data.open_rgb(tmp_path / "rgba64.png")) == [(0, 15, 255), (255, 127, 127), WHITE]
    _png(tmp_path / "la32.png", np.array([[[4000, 65535], [16000, 0]]]), 4)
    assert _rgb_list(data.open_rgb(tmp_path / "la32.png")) == [(15, 15, 15), WHITE]


def test_palette_files_with_alpha(tmp_path):
    img = _palette_image()  # pixels: index 1, 2, 0
    img.save(tmp_path / "alpha.png", transparency=bytes([0, 128, 255]))  # tRNS: one alpha per palette index
    # index 1 (200, 10, 20) at alpha 128: (200 * 128 + 32385) / 255 = 227.4, 132.0, 137.0
    assert _rgb_list(data.open_rgb(tmp_path / "alpha.png")) == [(227, 132, 137), (30, 40, 250), WHITE]
    img.save(tmp_path / "transparent.gif", transparency=0)
    assert _rgb_list(data.open_rgb(tmp_path / "transparent.gif")) == [(200, 10, 20), (30, 40, 250), WHITE]


@pytest.mark.parametrize("name", ["animated.gif", "stack.tif", "frames.webp"])
def test_multi_frame_files_give_their_first_frame(tmp_path, name):
    frames = [Image.new("RGB", (2, 1), (10 + 100 * i, 20, 30)) for i in range(3)]
    frames[0].save(
        tmp_path / name, save_all=True, append_images=frames[1:], **({"lossless": True} if "webp" in name else {})
    )
    assert _rgb_list(data.open_rgb(tmp_path / name)) == [(10, 20, 30)] * 2


def test_cmyk_jpeg_with_adobe_marker(tmp_path):
    """Pillow writes CMYK JPEGs inverted with an Adobe marker, as Photoshop does, and reads them back."""
    Image.new("CMYK", (2, 1), (10, 20, 30, 40)).save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as img:
        assert img.mode == "CMYK" and "adobe" in img.info
    assert _rgb_list(data.open_rgb(tmp_path / "cmyk.jpg")) == [(207, 198, 190)] * 2


_SHOWN_AS = {  # EXIF orientation -> what a viewer does to the stored pixels
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@pytest.mark.parametrize("ext", [".png", ".webp", ".tif", ".jpg"])
def test_every_exif_orientation_in_every_format(tmp_path, ext):
    stored = np.array([[(255, 0, 0), (0, 255, 0), (0, 0, 255)], [(255, 255, 0), (0, 255, 255), (255, 0, 255)]])
    image = Image.fromarray(stored.astype(np.uint8))
    options = {".webp": {"lossless": True}, ".jpg": {"quality": 100, "subsampling": 0}}.get(ext, {})
    for orientation in range(0, 10):  # 0 and 9 are no orientation: left as stored
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(tmp_path / f"{orientation}{ext}", exif=exif, **options)
        got = np.asarray(data.open_rgb(tmp_path / f"{orientation}{ext}")).astype(int)
        expected = np.asarray(image.transpose(_SHOWN_AS[orientation]) if orientation in _SHOWN_AS else image)
        assert got.shape == expected.shape, orientation
        assert np.abs(got - expected).max() <= (40 if ext == ".jpg" else 0), orientation  # JPEG: lossy


def test_exif_orientation_of_16_bit_and_float_files(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees clockwise: the row becomes a column, first value on top
    Image.fromarray(np.array([[0, 4000, 65535]], np.uint16)).save(tmp_path / "depth.png", exif=exif)
    Image.fromarray(np.array([[0.0, 0.2, 1.0]], np.float32)).save(tmp_path / "float.tif", exif=exif)
    assert _rgb_list(data.open_rgb(tmp_path / "depth.png")) == [(v, v, v) for v in (0, 16, 255)]
    assert data.open_rgb(tmp_path / "depth.png").size == (1, 3)
    assert _rgb_list(data.open_rgb(tmp_path / "float.tif")) == [(v, v, v) for v in (0, 51, 255)]


# --- 1-channel models: every mode to 8-bit grayscale (L)


def _values(gray: Image.Image) -> list[int]:
    assert gray.mode == "L"
    return np.asarray(gray).ravel().tolist()


def test_to_gray_uses_pillow_luma_of_the_8_bit_rgb_and_the_16_bit_path():
    """L = (299 R + 587 G + 114 B) / 1000 (Pillow's fixed point) of `to_rgb`'s pixels; 16-bit and float data scaled
    from their range without an 8-bit RGB step; gray stays gray."""
    rgb = Image.new("RGB", (3, 1))
    rgb.putdata([(200, 100, 50), (255, 0, 0), (7, 7, 7)])
    assert _values(data.to_gray(rgb)) == [124, 76, 7]  # 124.2, 76.2
    assert data.to_gray(rgb).mode == "L"
    assert _values(data.to_gray(_gray("I;16", [0, 1000, 65535]))) == [0, 4, 255]  # round(v / 257)
    assert _values(data.to_gray(_gray("F", [0.0, 0.2, 1.0]))) == [0, 51, 255]
    assert _values(data.to_gray(_gray("1", [0, 1]))) == [0, 255]
    assert _values(data.to_gray(_gray("L", [0, 17, 255]))) == [0, 17, 255]
    transparent = Image.new("LA", (2, 1))
    transparent.putdata([(10, 255), (10, 0)])
    assert _values(data.to_gray(transparent)) == [10, 255]  # alpha over white, as in RGB
    with pytest.raises(ValueError, match=r"mode I .*65536"):
        data.to_gray(_gray("I", [0, 65536]))


def test_open_image_gray_applies_exif_like_rgb(tmp_path):
    img = Image.new("RGB", (2, 1))
    img.putdata([(200, 100, 50), (0, 0, 255)])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rotated.png", exif=exif)
    gray = data.open_image(tmp_path / "rotated.png", "L")
    assert gray.mode == "L" and gray.size == (1, 2)
    assert _values(gray) == [124, 29]
    with pytest.raises(ValueError, match="'CMYK'"):
        data.open_image(tmp_path / "rotated.png", "CMYK")
