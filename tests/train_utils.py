"""Helpers shared by the training tests: tiny image folders and composed configs."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from rednet import config_schema

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(REPO / "configs")
if str(REPO) not in sys.path:  # train.py and eval.py live at the repository root
    sys.path.insert(0, str(REPO))

# Fast, deterministic settings for a tiny CPU run: no workers, no progress bars, small images.
TINY = [
    "model=rednet26",
    "data=small",
    "data.img_size=32",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.device=cpu",
    "trainer.progress_bar=false",
    "trainer.log_interval=1",
    "optim=adamw",
    "optim.lr=1e-3",
    "optim.lr_base_size=null",
    "sched.warmup_epochs=1",
]


def make_image_folder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"), n_train: int = 8, n_val: int = 4, size: int = 32
) -> Path:
    """Write train/ and val/ class folders of PNGs whose colour depends on the class (so they can be learned)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), np.float32)
                base[..., c % 3] = 200
                pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def compose_config(name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The config that `python <name>.py <overrides>` would run with."""
    config_schema.register()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides or [])


def resolved_config(name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """`compose_config` with the null preprocessing keys filled from the model, as train.py does before reading data."""
    import train  # the repository root is on sys.path (above)
    from rednet import factory

    cfg = compose_config(name, overrides)
    train.resolve_preprocessing(cfg, factory.build_model(cfg.model.name, 2))
    return cfg


def sigterm_after_first_checkpoint(
    cmd: list[str], run_dir: Path, env: dict[str, str], timeout: float
) -> tuple[int, str]:
    """Start `cmd`, send SIGTERM as soon as run_dir holds checkpoints/last.pt; return (exit status, stderr)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not (run_dir / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, stderr
