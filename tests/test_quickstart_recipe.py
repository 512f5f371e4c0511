"""experiment=quickstart stays the measured small-data recipe (docs/benchmarks.md, "Quickstart recipe")."""

from __future__ import annotations

from train_utils import compose_config

import train


def test_quickstart_is_the_measured_recipe():
    cfg = compose_config("train", ["experiment=quickstart", "data.root=/unused"])
    assert (cfg.model.name, cfg.data.img_size, cfg.data.batch_size, cfg.trainer.epochs) == ("rednet26", 32, 32, 8)
    assert (cfg.optim.opt, cfg.sched.sched, cfg.sched.warmup_epochs, cfg.trainer.label_smoothing) == (
        "adamw",
        "cosine",
        1,
        0.1,
    )
    # 2e-3 at batch 32 with BatchNorm statistics recomputed before each evaluation: without them the old 3e-3 at
    # batch 64 made val top-1 fall 72 -> 24 -> 77% between epochs (stale running statistics, not the weights)
    assert train.scaled_lr(cfg.optim, cfg.data.batch_size) == 2e-3
    assert cfg.trainer.precise_bn_batches == 10
    assert cfg.data.hflip == 0.0  # a mirrored digit is another symbol
    assert tuple(cfg.data.scale) == (0.7, 1.0) and cfg.data.crop_pct == 1.0
    assert cfg.trainer.model_ema is False


def test_quickstart_stays_within_its_cpu_budget():
    # 8 epochs of 32 px images fit 3 minutes of training on 2 idle cores for the 1437 train digits; the cost per
    # epoch grows with the pixels per image, and batch 32 costs no more per image than 64 (docs/benchmarks.md)
    cfg = compose_config("train", ["experiment=quickstart", "data.root=/unused"])
    assert cfg.trainer.epochs * cfg.data.img_size**2 <= 8 * 32**2
    assert cfg.model.name == "rednet26" and cfg.model.drop_path_rate == 0.0
    # precise BN: a forward pass over at most a quarter of the 1437 train digits per epoch (10 x 32), under a tenth
    # of the epoch's compute (a training step costs about 3 forward passes)
    assert cfg.trainer.precise_bn_batches * cfg.data.batch_size <= 1437 // 4
