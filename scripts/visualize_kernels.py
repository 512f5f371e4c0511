"""Show what involution kernels do: per-pixel kernel heat maps of a few RedNet layers over an image.

As in the paper's figure, each pixel's generated K×K kernel is summarized by the sum of its K² values; one heat map
per kernel group, drawn over the image. Rows: layers; columns: the image, then groups.

    python scripts/visualize_kernels.py --model rednet26 --checkpoint best.pt --image cat.jpg --out kernels.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from timm.data import create_transform

import rednet
from rednet import factory
from rednet.data import image_mode, open_image
from rednet.models.involution import Involution
from rednet.weights import model_in_chans, resolve_preprocessing

# A perceptual dark-to-bright colour map (anchors sampled from matplotlib's "inferno").
_COLORMAP = torch.tensor(
    [[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21], [250, 193, 39],
     [252, 255, 164]], dtype=torch.float32,
)  # fmt: skip
_LABEL_HEIGHT = 16
# Panels are drawn at least this many pixels on their short side (whole-number upscaling, each input pixel a block):
# a model trained at 32 px would otherwise give 32 px panels under labels cut off at the sheet's edge.
_MIN_PANEL = 128


def colorize(values: torch.Tensor) -> torch.Tensor:
    """Map values in [0, 1] of shape (H, W) to RGB (H, W, 3) in [0, 255] by linear interpolation of the anchors."""
    position = values.clamp(0, 1) * (len(_COLORMAP) - 1)
    low = position.floor().long().clamp(max=len(_COLORMAP) - 2)
    weight = (position - low).unsqueeze(-1)
    return _COLORMAP[low] * (1 - weight) + _COLORMAP[low + 1] * weight


def kernel_maps(model: torch.nn.Module, image: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """Per layer, the kernels' K² sums (G, Ho, Wo) for one image (1, 3, H, W)."""
    modules = dict(model.named_modules())
    unknown = [name for name in layers if not isinstance(modules.get(name), Involution)]
    if unknown:
        choices = [name for name, module in modules.items() if isinstance(module, Involution)]
        raise SystemExit(f"not involution layers: {unknown}; choose from {', '.join(choices)}")
    maps = {}

    def capture(name: str):
        def hook(module: Involution, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            maps[name] = module.generate_kernels(inputs[0])[0].sum(dim=(1, 2))

        return hook

    handles = [modules[name].register_forward_hook(capture(name)) for name in layers]
    with torch.no_grad():
        model(image)
    for handle in handles:
        handle.remove()
    return maps


def overlay(picture: Image.Image, values: torch.Tensor, alpha: float = 0.55) -> Image.Image:
    """The image with the min-max-normalized heat map drawn over it."""
    values = (values - values.min()) / (values.max() - values.min()).clamp_min(1e-12)
    heat = Image.fromarray(colorize(values).round().byte().numpy()).resize(picture.size, Image.Resampling.BILINEAR)
    return Image.blend(picture, heat, alpha)


def render(picture: Image.Image, maps: dict[str, torch.Tensor], groups: int, title: str) -> Image.Image:
    """A grid: one row per layer, the image and then one heat map per group, with labels.

    Panels are the picture upscaled by a whole factor to at least `_MIN_PANEL` pixels on the short side, and the
    sheet is widened to its longest label, so small inputs still give a readable figure with whole labels.
    """
    scale = -(-_MIN_PANEL // min(picture.size))  # ceil; 1 for pictures already large enough
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    width, height = picture.size
    columns = 1 + groups
    labels = [f"{name}  ({values.shape[0]} groups, kernel sum per pixel)" for name, values in maps.items()]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(text)) + 8 for text in [title, *labels])
    sheet_size = (max(columns * width, text_width), _LABEL_HEIGHT + len(maps) * (height + _LABEL_HEIGHT))
    sheet = Image.new("RGB", sheet_size, "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), title, fill="black")
    for row, (values, label) in enumerate(zip(maps.values(), labels)):
        top = _LABEL_HEIGHT + row * (height + _LABEL_HEIGHT)
        draw.text((4, top + 2), label, fill="black")
        sheet.paste(picture, (0, top + _LABEL_HEIGHT))
        for group in range(min(groups, values.shape[0])):
            sheet.paste(overlay(picture, values[group]), ((1 + group) * width, top + _LABEL_HEIGHT))
            draw.text(((1 + group) * width + 4, top + _LABEL_HEIGHT + 2), f"g{group}", fill="white")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, choices=rednet.list_models(), help="default: the checkpoint's, else rednet26"
    )
    parser.add_argument("--checkpoint", help="weights: path or URL in any layout rednet.weights reads")
    parser.add_argument("--image", required=True, help="an image file (read as gray for a 1-channel model)")
    parser.add_argument("--out", default="kernels.png", help="output PNG")
    parser.add_argument("--layers", nargs="+", default=["stem.1", "layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"])
    parser.add_argument("--groups", type=int, default=4, help="heat maps (kernel groups) per layer")
    parser.add_argument(
        "--size", type=int, default=None, help="input resolution (center crop; default: the weights', else 224)"
    )
    args = parser.parse_args()

    model = factory.model_from_weights(args.checkpoint, args.model, "rednet26")
    # The weights' preprocessing (their pretrained_cfg: size, crop, interpolation, mean/std), unless --size; the
    # image's channels are the model's (in_chans=1: grayscale, one mean/std value), as training reads them.
    in_chans = model_in_chans(model)
    prep = resolve_preprocessing(model, {"img_size": args.size})
    size = prep["img_size"] if isinstance(prep["img_size"], list) else [prep["img_size"]] * 2
    config = dict(
        input_size=(in_chans, *size), crop_pct=prep["crop_pct"], interpolation=prep["interpolation"],
        mean=tuple(prep["mean"]), std=tuple(prep["std"]),
    )  # fmt: skip
    transform = create_transform(**config)  # the eval transform: resize, center crop, normalize
    picture = open_image(args.image, image_mode(in_chans))  # EXIF orientation, 16-bit and alpha handled
    image = transform(picture).unsqueeze(0)
    # The cropped image as the network sees it, without normalization, to draw on (gray drawn as RGB).
    shown = create_transform(**dict(config, mean=(0.0,) * in_chans, std=(1.0,) * in_chans))(picture).expand(3, -1, -1)
    shown = Image.fromarray((shown.permute(1, 2, 0) * 255).round().byte().numpy())

    maps = kernel_maps(model, image, args.layers)
    weights = args.checkpoint or "random init (no --checkpoint)"
    title = f"{model.pretrained_cfg['architecture']} involution kernels, {weights}"
    render(shown, maps, args.groups, title).save(args.out)
    print(Path(args.out).resolve())


if __name__ == "__main__":
    main()
