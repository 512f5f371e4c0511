"""Every config group option and experiment composes (Hydra compose API) and instantiates; the paper recipe holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image
from train_utils import CONFIG_DIR, TINY, compose_config

import train
from rednet import config_schema, data, factory

GROUPS = ("model", "data", "optim", "sched", "trainer")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


EXPERIMENTS = _options("experiment")


def _instantiate(cfg, num_classes: int = 10) -> dict:
    """Build what train.py builds from a config, short of reading data: model, optimizer, scheduler, transforms."""
    kwargs = {k: v for k, v in cfg.model.items() if k != "name"}
    model = factory.build_model(cfg.model.name, num_classes, **kwargs)
    train.resolve_preprocessing(cfg, model)  # the null preprocessing keys: the model's values, as in train.py
    lr = train.scaled_lr(cfg.optim, cfg.data.batch_size * cfg.trainer.grad_accum)
    optimizer = train.create_optimizer(model, cfg.optim, lr)
    scheduler = train.create_scheduler(optimizer, cfg.sched, lr, cfg.trainer.epochs, updates=10)
    transforms = [data.create_transforms(cfg.data, is_training) for is_training in (True, False)]
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, transforms=transforms, lr=lr)


def test_config_options_found():
    assert {"rednet26", "rednet38", "rednet50", "rednet101", "rednet152"} <= set(_options("model"))
    assert {f"rednet{d}_paper" for d in (26, 38, 50, 101, 152)} | {"quickstart"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g) if g != "model"])
def test_group_option_composes_and_instantiates(group, option):
    cfg = compose_config("train", [f"{group}={option}", "data.root=/unused", "trainer.device=cpu"])
    built = _instantiate(cfg)
    assert built["optimizer"].param_groups[0]["lr"] > 0
    image = built["transforms"][1](Image.new("RGB", (300, 260)))
    assert image.shape == (3, cfg.data.img_size, cfg.data.img_size)


def test_transforms_refuse_unresolved_preprocessing_naming_the_keys():
    cfg = compose_config("train", ["data=small", "data.root=/unused"])  # sets img_size and crop_pct only
    with pytest.raises(ValueError, match=r"^data.interpolation, data.mean, data.std not resolved \(null\)"):
        data.create_transforms(cfg.data, is_training=False)


@pytest.mark.parametrize("option", _options("model"))
def test_model_option_builds_its_model(option):
    cfg = compose_config("train", [f"model={option}", "data.root=/unused"])
    model = factory.build_model(cfg.model.name, 7, **{k: v for k, v in cfg.model.items() if k != "name"})
    assert type(model).__name__ == "RedNet"
    assert model.num_classes == 7


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_instantiates(experiment):
    cfg = compose_config("train", [f"experiment={experiment}", "data.root=/unused", "trainer.device=cpu"])
    built = _instantiate(cfg)
    assert cfg.model.name in experiment or experiment == "quickstart"
    assert len(built["transforms"]) == 2


@pytest.mark.parametrize("depth", [26, 38, 50, 101, 152])
def test_paper_experiments_follow_the_official_recipe(depth):
    cfg = compose_config("train", [f"experiment=rednet{depth}_paper", "data.root=/unused"])
    assert cfg.model.name == f"rednet{depth}"
    assert (cfg.optim.opt, cfg.optim.lr, cfg.optim.lr_base_size, cfg.optim.momentum) == ("sgd", 0.8, 2048, 0.9)
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.filter_bias_and_bn is False  # decay on all parameters
    assert (cfg.sched.sched, cfg.sched.warmup_epochs, cfg.sched.warmup_ratio, cfg.sched.min_lr) == (
        "cosine",
        5,
        0.25,
        0.0,
    )
    assert cfg.trainer.epochs == 130 and cfg.trainer.label_smoothing == 0.1 and cfg.trainer.clip_grad is None
    assert (cfg.data.img_size, cfg.data.crop_pct, tuple(cfg.data.scale), cfg.data.hflip) == (224, 0.875, (0.08, 1), 0.5)
    optimizer = train.create_optimizer(torch.nn.Linear(2, 2), cfg.optim, lr=0.1)
    assert optimizer.param_groups[0]["nesterov"] is True


def test_lr_scales_linearly_with_the_global_batch():
    cfg = compose_config("train", ["experiment=rednet50_paper", "data.root=/unused"])
    assert train.scaled_lr(cfg.optim, 2048) == pytest.approx(0.8)
    assert train.scaled_lr(cfg.optim, 8 * 32 * 2) == pytest.approx(0.8 * 512 / 2048)
    cfg = compose_config("train", ["optim.lr_base_size=null", "optim.lr=0.3", "data.root=/unused"])
    assert train.scaled_lr(cfg.optim, 12345) == 0.3


def test_schedule_warms_up_per_iteration_then_decays():
    cfg = compose_config("train", ["experiment=rednet50_paper", "data.root=/unused"])
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.4)
    scheduler = train.create_scheduler(optimizer, cfg.sched, lr=0.4, epochs=130, updates=100)
    lrs = []
    for step in range(1, 130 * 100 + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(step)
    assert lrs[0] == pytest.approx(0.25 * 0.4)  # warmup starts at 0.25 x lr
    assert lrs[1] > lrs[0] and lrs[50] > lrs[49]  # changes inside an epoch, not once per epoch
    assert lrs.index(max(lrs)) in (499, 500) and max(lrs) == pytest.approx(0.4, rel=1e-2)  # warmup ends after 5 epochs
    assert lrs[-1] < 1e-4 and all(a >= b for a, b in zip(lrs[500:], lrs[501:]))  # cosine down to ~0


def test_eval_config_composes_with_its_keys():
    cfg = compose_config("eval", ["model=rednet50", "checkpoint=/x/best.pt", "data.root=/data"])
    assert (cfg.model.name, cfg.checkpoint, cfg.pretrained, cfg.data.root) == ("rednet50", "/x/best.pt", False, "/data")
    for key in ("device", "amp", "channels_last"):
        assert key in cfg.trainer


def test_documented_key_names_exist():
    cfg = compose_config("train", ["data.root=/d"])
    for key in ("img_size", "batch_size", "num_workers", "root", "skip_bad_images"):
        assert key in cfg.data
    for key in ("epochs", "device", "amp", "channels_last", "compile", "grad_accum"):
        assert key in cfg.trainer
    for key in ("opt", "lr", "weight_decay", "momentum"):  # the default optim=sgd has momentum
        assert key in cfg.optim
    for key in ("sched", "warmup_epochs", "min_lr"):
        assert key in cfg.sched
    assert cfg.resume is None and "seed" in cfg and "pretrained" in cfg


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.epochs=abc", "trainer.epochs"),
        ("data.batch_size=1.5", "data.batch_size"),
        ("optim.lr=fast", "optim.lr"),
        ("trainer.model_ema=maybe", "trainer.model_ema"),
        ("optim.momentum=abc", "optim.momentum"),
        ("data.scale=[small,1]", "data.scale"),
        ("seed=1.5", "seed"),
    ],
)
def test_wrong_value_types_fail_at_composition_naming_the_key(override, key):
    with pytest.raises(ConfigCompositionException, match=re.escape(override)) as error:
        compose_config("train", [override, "data.root=/unused"])
    assert f"full_key: {key}" in str(error.value.__cause__)


def test_sched_step_keys_are_typed():
    with pytest.raises(ConfigCompositionException, match="sched.decay_rate"):
        compose_config("train", ["sched=step", "sched.decay_rate=abc", "data.root=/unused"])


def test_unknown_keys_fail_and_timm_keyword_groups_take_new_ones_with_plus():
    with pytest.raises(ConfigCompositionException, match=r"trainer\.epoch\b"):
        compose_config("train", ["trainer.epoch=3", "data.root=/unused"])
    cfg = compose_config("train", ["+model.memory_efficient=true", "optim=adamw", "+optim.betas=[0.9,0.95]"])
    assert cfg.model.memory_efficient is True and list(cfg.optim.betas) == [0.9, 0.95]
    assert "momentum" not in cfg.optim  # an AdamW config has no SGD-only keys
    with pytest.raises(ConfigCompositionException, match="data.colour_jitter"):
        compose_config("eval", ["data.colour_jitter=0.4"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+trainer.epoch=2", r"trainer\.epoch \(did you mean trainer\.epochs\?\)"),
        ("+data.batchsize=8", r"data\.batchsize \(did you mean data\.batch_size\?\)"),
        ("+sead=3", r"unknown config keys: sead \(did you mean seed\?\)"),
    ],
)
def test_keys_added_with_plus_outside_the_timm_groups_are_refused_before_training(override, message):
    # Hydra's own hint for a misspelt key is "+key=value", which a closed structured config then accepts: the run
    # would silently ignore it. train.check_config refuses it, naming the closest key; the timm groups stay open.
    cfg = compose_config("train", [override, "data.root=/unused"])
    with pytest.raises(ValueError, match=message):
        train.check_config(cfg)
    train.check_config(compose_config("train", ["+model.memory_efficient=true", "data.root=/unused"]))
    eval_cfg = compose_config("eval", ["+data.crop_pcts=0.9", "data.root=/unused"])
    with pytest.raises(ValueError, match=r"data\.crop_pcts \(did you mean data\.crop_pct\?\)"):
        config_schema.check_known_keys(eval_cfg, config_schema.EvalConfig)


def test_values_get_their_schema_types():
    cfg = compose_config("train", ["trainer.clip_grad=1", "data.hflip=1", "pretrained=/ckpt/best.pt", "resume=auto"])
    assert isinstance(cfg.trainer.clip_grad, float) and isinstance(cfg.data.hflip, float)
    assert (cfg.pretrained, cfg.resume) == ("/ckpt/best.pt", "auto")
    assert compose_config("train", ["pretrained=true"]).pretrained is True


def test_schema_declares_every_shipped_key():
    # Every key of every YAML file is a field of its schema (no key is typed Any by being absent).
    checks = {"data": config_schema.DataConfig, "trainer": config_schema.TrainerConfig}
    for group, schema in checks.items():
        fields = set(schema.__dataclass_fields__)
        for option in _options(group):
            assert set(compose_config("train", [f"{group}={option}"])[group]) == fields, (group, option)
    for group, base in (("model", config_schema.ModelConfig), ("optim", config_schema.OptimConfig),
                        ("sched", config_schema.SchedConfig)):  # fmt: skip
        for option in _options(group):
            node = compose_config("train", [f"{group}={option}"])[group]
            schema = OmegaConf.get_type(node)
            assert issubclass(schema, base) and set(node) == set(schema.__dataclass_fields__), (group, option)
    train_keys = set(config_schema.TrainConfig.__dataclass_fields__)
    assert set(compose_config("train")) == train_keys
    assert set(compose_config("eval")) == set(config_schema.EvalConfig.__dataclass_fields__)


def test_debug_tiny_is_the_tests_tiny_run():
    tiny = compose_config("train", ["debug=tiny", "data.root=/d"])
    assert (tiny.data.img_size, tiny.data.batch_size, tiny.data.num_workers, tiny.trainer.epochs) == (32, 4, 0, 1)
    assert (tiny.trainer.device, tiny.trainer.progress_bar) == ("cpu", False)
    # TINY = debug=tiny with the tests' recipe choices; keeps the two in step.
    recipe = ["data=small", "optim=adamw", "optim.lr=1e-3", "optim.lr_base_size=null", "sched.warmup_epochs=1"]
    assert compose_config("train", ["debug=tiny", *recipe]) == compose_config("train", [*TINY, "trainer.epochs=1"])
    # After an experiment it keeps the experiment's recipe at tiny sizes.
    cfg = compose_config("train", ["experiment=rednet50_paper", "debug=tiny", "data.root=/d"])
    assert (cfg.model.name, cfg.optim.opt, cfg.data.img_size, cfg.trainer.epochs) == ("rednet50", "sgd", 32, 1)
