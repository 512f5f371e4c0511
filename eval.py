"""Evaluate a checkpoint or published weights on an image folder's validation split.

    python eval.py checkpoint=outputs/train/.../checkpoints/best.pt data.root=/data/imagenet
    python eval.py checkpoint=outputs/train/.../checkpoints/best.pt     # the val set it was trained with
    python eval.py model=rednet50 pretrained=true data.root=/data/imagenet

The weights bring their settings: architecture and shape arguments (model= is needed only when the checkpoint does
not name its architecture; in_chans=1 reads the images as grayscale) and preprocessing (image size, crop_pct,
interpolation, mean, std), unless set on the command line (configs/eval.yaml). Prints top-1, top-5 (percent) and
loss, and writes them to results.json in the run directory. Without data.root= a train.py checkpoint is evaluated on
its training's val set: data.root and `VAL_SET_KEYS` (val_split, skip_bad_images, verify_images) from its saved
config, each unless set on the command line.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rednet import config_schema, data, distributed, engine, factory, monitor, weights
from rednet.checkpoint import PREPROCESSING_KEYS, WeightsSettings

log = logging.getLogger(__name__)


Loaded = tuple[Path, Mapping[str, Any]]  # a checkpoint file and what `weights.read_checkpoint` read from it


def read_weights(cfg: DictConfig) -> Loaded | None:
    """The checkpoint `cfg.checkpoint` (or `pretrained=<path or URL>`) names, fetched and read; None for
    `pretrained=true` (the registry's weights, built by `load_model`)."""
    source = cfg.checkpoint if cfg.checkpoint is not None else cfg.pretrained
    if not isinstance(source, str):
        return None
    path = weights.fetch(source)
    return path, weights.read_checkpoint(path)


def saved_config(loaded: Loaded | None) -> dict[str, Any] | None:
    """The training config a checkpoint saved (train.py's do), else None."""
    config = loaded[1].get("config") if loaded is not None else None
    return config if isinstance(config, dict) else None


def checkpoint_data_root(cfg: DictConfig, loaded: Loaded | None) -> str:
    """The data.root the checkpoint was trained on, for an evaluation whose command line sets none.

    Raises:
        ValueError: the weights carry no data.root (published weights, other frameworks' checkpoints).
        FileNotFoundError: the checkpoint's data.root does not exist on this machine (or, relative, from here).
    """
    root = ((saved_config(loaded) or {}).get("data") or {}).get("root")
    fix = "add data.root=/path/to/images (with a val/<class>/ folder)"
    if not isinstance(root, str) or not root:
        named = f"checkpoint '{loaded[0]}' saved no data.root" if loaded else "pretrained=true weights carry none"
        raise ValueError(f"data.root is not set and {named}: {fix}")
    if not Path(root).expanduser().is_dir():
        raise FileNotFoundError(f"data.root '{root}' (from checkpoint '{loaded[0]}') does not exist here: {fix}")
    log.info("data.root=%s (from the checkpoint's training config; data.root= on the command line overrides)", root)
    return root


# The data settings besides data.root that decide which files form the val set: its folder, and which files are left
# out (data.skip_bad_images, with data.verify_images deciding whether bad ones are found before or while loading).
VAL_SET_KEYS = ("val_split", "skip_bad_images", "verify_images")


def command_line_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys that Hydra override strings set ("data.val_split=v" -> "data.val_split"; +, ++, ~ too)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return {override.key_or_group for override in OverridesParser.create().parse_overrides(list(overrides))}


def checkpoint_val_set(cfg: DictConfig, loaded: Loaded | None, given: set[str]) -> dict[str, Any]:
    """The `VAL_SET_KEYS` values of the checkpoint's training config that the command line (`given`) leaves unset,
    for an evaluation on the data.root training used: it then reads the images training validated on (a bad file
    training skipped with data.skip_bad_images=true is skipped again, not an error). Logged in one line; keys an
    older checkpoint lacks keep `cfg`'s values."""
    trained = (saved_config(loaded) or {}).get("data") or {}
    taken = {key: trained[key] for key in VAL_SET_KEYS if key in trained and f"data.{key}" not in given}
    if taken:
        log.info(
            "%s (from the checkpoint's training config: the val set training used; set them on the command line "
            "to override)",
            " ".join(f"data.{key}={value}" for key, value in taken.items()),
        )
    return taken


def load_model(
    cfg: DictConfig, num_classes: int, classes: list[str], loaded: Loaded | None
) -> tuple[nn.Module, WeightsSettings]:
    """The model with its weights: `loaded` (from `read_weights`: `cfg.checkpoint`, or `pretrained=<path or URL>`,
    evaluated the same way, class checks included), or the registry's weights for `pretrained=true`.

    Returns:
        the model (CPU), and the settings the checkpoint carried (empty for registered weights).
    """
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"}
    given_classes = model_kwargs.pop("num_classes", None)  # the val folder fixes it
    if given_classes is not None and given_classes != num_classes:
        raise ValueError(
            f"model.num_classes={given_classes} but {cfg.data.root} has {num_classes} val class folders: leave "
            "model.num_classes out (the folder and the checkpoint set it)"
        )
    if loaded is not None:
        path, ckpt = loaded
        model, settings = factory.model_from_checkpoint(
            ckpt, path, cfg.model.name, num_classes, cfg.use_ema, classes, **model_kwargs
        )
        return model, settings
    if cfg.model.name is None:
        raise ValueError("pretrained=true evaluates a registered model's weights: set model=<name> (model=rednet50)")
    model = factory.build_model(cfg.model.name, num_classes, pretrained=True, **model_kwargs)
    if num_classes != model.pretrained_cfg.get("num_classes", num_classes):
        raise ValueError(
            f"pretrained {cfg.model.name} predicts {model.pretrained_cfg['num_classes']} classes but "
            f"{cfg.data.root} has {num_classes} val class folders: evaluate published weights on their data set"
        )
    return model, WeightsSettings(source="the model's pretrained_cfg")


def eval_data_config(cfg: DictConfig, model: nn.Module, settings: WeightsSettings) -> DictConfig:
    """`cfg.data` with the preprocessing resolved: command line, else the weights' (see configs/eval.yaml).

    Logs each value with where it came from, and warns about values set on the command line that differ from the
    checkpoint's (the accuracy will then differ from the one training logged).
    """
    explicit = {key: cfg.data[key] for key in PREPROCESSING_KEYS if cfg.data[key] is not None}
    resolved = weights.resolve_preprocessing(model, explicit)
    carried = weights.preprocessing_from_cfg(settings.pretrained_cfg)
    own = weights.preprocessing_from_cfg(model.pretrained_cfg)  # the checkpoint's values merged into the model's
    if not carried and cfg.checkpoint is not None:
        log.warning("checkpoint %s carries no preprocessing settings: using the model's and timm's defaults",
                    cfg.checkpoint)  # fmt: skip
    sources = [("command line", explicit), (settings.source, carried), ("the model's pretrained_cfg", own)]
    log.info("preprocessing: %s", weights.describe_preprocessing(resolved, sources))
    differ = [f"data.{key}={carried[key]}" for key in explicit if key in carried and resolved[key] != carried[key]]
    if differ:
        log.warning(
            "the checkpoint was trained and validated with %s; this evaluation uses other values (set on the command "
            "line), so its accuracy will differ from the logged one: leave them out to evaluate as in training",
            " ".join(differ),
        )
    return OmegaConf.merge(cfg.data, resolved)


def warn_about_other_precision(trained: dict[str, Any] | None, cfg: DictConfig) -> None:
    """Warn when the checkpoint was validated during training at another precision than this evaluation's."""
    amp = (trained or {}).get("trainer", {}).get("amp")
    if amp is not None and amp != cfg.trainer.amp:
        log.warning(
            "the checkpoint was validated with trainer.amp=%s, this evaluation uses trainer.amp=%s: its accuracy "
            "may differ slightly from the logged one",
            amp,
            cfg.trainer.amp,
        )


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Build the model, load `cfg.checkpoint` (or the published weights), evaluate, write results.json.

    Args:
        cfg: the composed eval config.
        run_dir: where eval.log and results.json go.
        overrides: the command line's Hydra overrides (main passes them): the `VAL_SET_KEYS` they set are kept when
            data.root is taken from the checkpoint; the others then come from the checkpoint's training config.
    """
    config_schema.check_known_keys(cfg, config_schema.EvalConfig)
    config_schema.check_values(cfg)  # e.g. data.std=[0, 1, 1], data.crop_pct=0: named before any data is read
    config_schema.make_paths_absolute(cfg, ("data.root", "checkpoint", "pretrained"))  # (from the starting dir)
    config_schema.check_checkpoint_paths(cfg)  # a missing file or a run directory: named before data is read
    dist = distributed.init_distributed(cfg.trainer.device)
    run_dir = distributed.shared_run_dir(run_dir)  # rank 0's directory for all ranks
    monitor.setup_logging(run_dir / "eval.log", dist.is_main)
    if cfg.checkpoint is not None and cfg.pretrained:
        raise ValueError(
            f"both checkpoint={cfg.checkpoint} and pretrained={cfg.pretrained} are set: give one of them (pretrained= "
            "takes the published weights or a path, evaluated like checkpoint=)"
        )
    if cfg.checkpoint is None and not cfg.pretrained:
        raise ValueError(
            "nothing to evaluate: set checkpoint=PATH (e.g. a run's checkpoints/best.pt) or pretrained=true"
        )
    loaded = None
    if OmegaConf.is_missing(cfg.data, "root"):  # else the folder is checked before the weights are read
        loaded = read_weights(cfg)
        root = checkpoint_data_root(cfg, loaded)
        val_set = checkpoint_val_set(cfg, loaded, command_line_keys(overrides))
        cfg = OmegaConf.merge(cfg, {"data": {"root": root, **val_set}})

    classes = data.check_image_folder(cfg.data.root, (cfg.data.val_split,))
    loaded = loaded or read_weights(cfg)
    model, settings = load_model(cfg, len(classes), classes, loaded)
    warn_about_other_precision(saved_config(loaded), cfg)
    in_chans = weights.model_in_chans(model)  # the checkpoint's in_chans (or model.in_chans): gray or RGB images
    data.image_mode(in_chans)  # 1 or 3, else an error naming it
    data_cfg = eval_data_config(cfg, model, settings)
    dataset = data.create_image_dataset(
        data_cfg, cfg.data.val_split, classes, is_training=False, replace_bad=False, in_chans=in_chans
    )
    loader = data.create_eval_loader(dataset, data_cfg, dist.world_size, dist.rank, dist.device)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model.to(device=dist.device, memory_format=memory_format)

    metrics = engine.evaluate(
        model, loader, dist.device, cfg.trainer.amp, cfg.trainer.channels_last, show_progress=cfg.trainer.progress_bar
    )
    skipped = dataset.take_bad_count()
    name = model.pretrained_cfg.get("architecture") or cfg.model.name or settings.arch
    source = cfg.checkpoint or (cfg.pretrained if isinstance(cfg.pretrained, str) else f"pretrained {name}")
    results = {**metrics, "model": name, "weights": str(source), "skipped_images": skipped}
    used = OmegaConf.to_container(data_cfg)
    results["preprocessing"] = {key: used[key] for key in PREPROCESSING_KEYS}
    if dist.is_main:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        log.info("%s on %s: %s (%d images)", source, cfg.data.root, monitor.format_metrics(metrics), metrics["count"])
        print(f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}")
    distributed.cleanup()
    return results


config_schema.register()  # the typed schemas that configs/*.yaml name in their defaults lists


@hydra.main(version_base="1.3", config_path="configs", config_name="eval")
def main(cfg: DictConfig) -> float:
    """Hydra entry point; returns top-1."""
    with distributed.end_job_on_error():  # an error on one of several ranks ends the job instead of hanging it
        hydra_cfg = HydraConfig.get()
        return evaluate_checkpoint(cfg, hydra_cfg.runtime.output_dir, hydra_cfg.overrides.task)["top1"]


if __name__ == "__main__":
    sys.argv[1:] = config_schema.expand_home_in_overrides(sys.argv[1:])  # data.root=~/x: Hydra refuses a bare ~
    main()
