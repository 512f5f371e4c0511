"""Evaluate a checkpoint or published weights on an image folder's validation split.

    python eval.py model=rednet50 checkpoint=outputs/train/.../checkpoints/best.pt data.root=/data/imagenet
    python eval.py model=rednet50 pretrained=true data.root=/data/imagenet

Prints top-1, top-5 (percent) and loss, and writes them to results.json in the run directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from rednet import config_schema, data, distributed, engine, monitor

log = logging.getLogger(__name__)


# The settings that change what the model sees or computes: evaluating with others changes the accuracy.
EVAL_SETTINGS = (
    ("data", "img_size"), ("data", "crop_pct"), ("data", "interpolation"), ("data", "mean"), ("data", "std"),
    ("trainer", "amp"),
)  # fmt: skip


def warn_about_other_eval_settings(trained: dict[str, Any] | None, cfg: DictConfig) -> None:
    """Warn when the checkpoint was evaluated during training with other preprocessing or precision than now."""
    if not trained:
        return
    current = OmegaConf.to_container(cfg, resolve=True)
    differ = [
        f"{group}.{key}={trained[group][key]}"
        for group, key in EVAL_SETTINGS
        if key in trained.get(group, {}) and trained[group][key] != current[group].get(key)
    ]
    if differ:
        log.warning(
            "the checkpoint was trained and validated with %s; this evaluation uses other values, so its accuracy "
            "will differ from the logged one: add those overrides to evaluate as in training",
            " ".join(differ),
        )


def evaluate_checkpoint(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Build the model, load `cfg.checkpoint` (or the published weights), evaluate, write results.json."""
    dist = distributed.init_distributed(cfg.trainer.device)
    run_dir = distributed.shared_run_dir(run_dir)  # rank 0's directory for all ranks
    monitor.setup_logging(run_dir / "eval.log", dist.is_main)
    if cfg.checkpoint is None and not cfg.pretrained:
        raise ValueError(
            "nothing to evaluate: set checkpoint=PATH (e.g. a run's checkpoints/best.pt) or pretrained=true"
        )
    if OmegaConf.is_missing(cfg.data, "root"):
        raise ValueError("data.root is not set: add data.root=/path/to/images (with a val/<class>/ folder)")

    classes = data.check_image_folder(cfg.data.root, (cfg.data.val_split,))
    dataset = data.create_image_dataset(cfg.data, cfg.data.val_split, classes, is_training=False, replace_bad=False)
    loader = data.create_eval_loader(dataset, cfg.data, dist.world_size, dist.rank, dist.device)

    # pretrained=<path or URL> is a checkpoint like any other (class checks included); pretrained=true the registry's.
    checkpoint_path = cfg.checkpoint
    if checkpoint_path is None and isinstance(cfg.pretrained, str):
        from rednet import weights

        checkpoint_path = weights.fetch(cfg.pretrained)
    pretrained = checkpoint_path is None and bool(cfg.pretrained)
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k != "name"}
    model = engine.build_model(cfg.model.name, len(classes), pretrained=pretrained, **model_kwargs)
    if pretrained and len(classes) != model.pretrained_cfg.get("num_classes", len(classes)):
        raise ValueError(
            f"pretrained {cfg.model.name} predicts {model.pretrained_cfg['num_classes']} classes but "
            f"{cfg.data.root} has {len(classes)} val class folders: evaluate published weights on their data set"
        )
    if checkpoint_path is not None:
        trained = engine.load_model_weights(model, checkpoint_path, cfg.model.name, cfg.use_ema, classes=classes)
        warn_about_other_eval_settings(trained, cfg)
    memory_format = torch.channels_last if cfg.trainer.channels_last else torch.contiguous_format
    model.to(device=dist.device, memory_format=memory_format)

    metrics = engine.evaluate(
        model, loader, dist.device, cfg.trainer.amp, cfg.trainer.channels_last, show_progress=cfg.trainer.progress_bar
    )
    skipped = dataset.take_bad_count()
    source = (cfg.checkpoint or cfg.pretrained) if checkpoint_path is not None else f"pretrained {cfg.model.name}"
    results = {**metrics, "model": cfg.model.name, "weights": str(source), "skipped_images": skipped}
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
    return evaluate_checkpoint(cfg, HydraConfig.get().runtime.output_dir)["top1"]


if __name__ == "__main__":
    main()
