"""End-to-end training and evaluation on a tiny image folder (CPU): artifacts, TensorBoard, resume, bad input."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.optim.optimizer import register_optimizer_step_pre_hook
from train_utils import REPO, TINY, compose_config, make_image_folder

import eval as eval_script
import train
from rednet import checkpoint, data, distributed, engine, run_state

UPDATES_PER_EPOCH = 6  # 3 classes x 8 train images, batch 4


def _train_cfg(root, *overrides):
    return compose_config("train", [*TINY, f"data.root={root}", *overrides])


def _scalars(run_dir) -> dict[str, list]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def trained(image_root, tmp_path_factory):
    """Two epochs with EMA, a checkpoint every 4 steps, one epoch checkpoint kept."""
    run_dir = tmp_path_factory.mktemp("run")
    overrides = ("trainer.epochs=2", "trainer.model_ema=true", "trainer.keep_last=1", "trainer.ckpt_every_steps=4")
    results = train.train(_train_cfg(image_root, *overrides), run_dir)
    return run_dir, results


def test_run_directory_holds_everything(trained, image_root):
    run_dir, results = trained
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["best.pt", "epoch_0002.pt", "last.pt", "last_prev.pt"]
    log = (run_dir / "train.log").read_text()
    assert "epoch 1/2 | train loss" in log and "epoch 2/2" in log and "val top1" in log and "ema top1" in log
    assert f"root: {image_root}" in (run_dir / "config.yaml").read_text()  # resolved, not ${...}
    on_disk = json.loads((run_dir / "results.json").read_text())
    assert on_disk == pytest.approx(results)
    assert 0 <= on_disk["top1"] <= on_disk["top5"] <= 100 and on_disk["loss"] > 0
    assert on_disk["count"] == 12 and on_disk["step"] == 2 * UPDATES_PER_EPOCH


def test_checkpoint_is_a_plain_weights_only_dict(trained):
    run_dir, _ = trained
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    for key in ("state_dict", "state_dict_ema", "optimizer", "amp_scaler", "rng", "config", "num_classes"):
        assert key in ckpt  # timm's layout (state_dict, state_dict_ema, optimizer, amp_scaler, epoch, arch) + ours
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_batches"], ckpt["arch"]) == (2, 12, 0, "rednet26")
    assert ckpt["config"]["trainer"]["epochs"] == 2 and isinstance(ckpt["config"], dict)
    assert ckpt["state_dict"].keys() == ckpt["state_dict_ema"].keys()
    assert not torch.equal(ckpt["state_dict"]["fc.weight"], ckpt["state_dict_ema"]["fc.weight"])


def test_timm_tools_read_our_checkpoints(trained, image_root):
    """timm's load_checkpoint (what timm's validate.py --checkpoint calls: load_checkpoint(model, path, use_ema))
    and resume_checkpoint read best.pt and last.pt; resume_checkpoint returns the epoch to start from."""
    import timm
    from timm.models import load_checkpoint, resume_checkpoint

    run_dir, _ = trained
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    for path in (run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt"):
        for use_ema in (True, False):
            model = timm.create_model("rednet26", num_classes=3)
            load_checkpoint(model, str(path), use_ema=use_ema)
            expected = run_state.load_checkpoint(path)["state_dict_ema" if use_ema else "state_dict"]
            for key, value in model.state_dict().items():
                assert torch.equal(value, expected[key]), key
    model = timm.create_model("rednet26", num_classes=3)
    cfg = _train_cfg(image_root)
    optimizer = train.create_optimizer(model, cfg.optim, cfg.optim.lr)
    epoch = resume_checkpoint(model, str(run_dir / "checkpoints" / "last.pt"), optimizer=optimizer)
    assert epoch == ckpt["epoch"] == 2  # both epochs done: the next one to run is epoch 2 (0-based)
    assert torch.equal(model.state_dict()["fc.weight"], ckpt["state_dict"]["fc.weight"])
    assert optimizer.state_dict()["state"][0]["step"] == ckpt["optimizer"]["state"][0]["step"]


def _in_old_layout(path, out):
    """A checkpoint as the code before the timm layout wrote it: model, model_ema, scaler, scheduler keys."""
    ckpt = torch.load(path, weights_only=True)
    old = {
        {"state_dict": "model", "state_dict_ema": "model_ema", "amp_scaler": "scaler"}.get(k, k): v
        for k, v in ckpt.items()
    }
    torch.save({**old, "scheduler": {"last_epoch": 0}}, out)
    return out


def test_checkpoint_in_the_old_layout_evaluates_and_resumes(trained, image_root, tmp_path):
    run_dir, results = trained
    old = _in_old_layout(run_dir / "checkpoints" / "best.pt", tmp_path / "old_best.pt")
    eval_overrides = [f"data.root={image_root}", "data.num_workers=0", "trainer.device=cpu", f"checkpoint={old}"]
    got = eval_script.evaluate_checkpoint(compose_config("eval", eval_overrides), tmp_path / "eval")
    assert got["top1"] == pytest.approx(results["best_top1"], abs=1e-4)
    old = _in_old_layout(run_dir / "checkpoints" / "last.pt", tmp_path / "old_last.pt")
    cfg = _train_cfg(image_root, "trainer.epochs=3", "trainer.model_ema=true", f"resume={old}")
    resumed = train.train(cfg, tmp_path / "run")
    assert (resumed["epoch"], resumed["step"]) == (3, 3 * UPDATES_PER_EPOCH)
    assert "holds no EMA weights" not in (tmp_path / "run" / "train.log").read_text()


def test_tensorboard_holds_the_scalars(trained):
    run_dir, results = trained
    scalars = _scalars(run_dir)
    expected = {"train/loss", "train/lr", "train/throughput", "train/epoch_time", "train/peak_memory_mb"}
    expected |= {f"{p}/{m}" for p in ("val", "ema") for m in ("top1", "top5", "loss")}
    assert expected <= scalars.keys()
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 13))  # log_interval=1: every step
    lrs = [v for _, v in scalars["train/lr"]]
    assert lrs[1] > lrs[0]  # per-step warmup
    assert all(v > 0 for _, v in scalars["train/throughput"])
    assert [s for s, _ in scalars["val/top1"]] == [6, 12]
    assert scalars["ema/top1"][-1][1] == pytest.approx(results["top1"], abs=1e-4)  # EMA weights are primary


def test_eval_reproduces_the_logged_top1(trained, image_root, tmp_path):
    run_dir, results = trained
    scalars = _scalars(run_dir)
    eval_overrides = [f"data.root={image_root}", "data=small", "data.batch_size=5", "data.num_workers=0"]
    eval_overrides += ["trainer.device=cpu", "trainer.progress_bar=false"]
    best = run_dir / "checkpoints" / "best.pt"
    cfg = compose_config("eval", [*eval_overrides, f"checkpoint={best}"])
    ema = eval_script.evaluate_checkpoint(cfg, tmp_path / "ema")
    assert ema["top1"] == pytest.approx(results["best_top1"], abs=1e-4) and ema["count"] == 12
    assert json.loads((tmp_path / "ema" / "results.json").read_text())["top1"] == pytest.approx(ema["top1"])
    last = run_dir / "checkpoints" / "last.pt"
    cfg = compose_config("eval", [*eval_overrides, f"checkpoint={last}", "use_ema=false"])
    raw = eval_script.evaluate_checkpoint(cfg, tmp_path / "raw")
    assert raw["top1"] == pytest.approx(scalars["val/top1"][-1][1], abs=1e-4)
    assert raw["loss"] == pytest.approx(scalars["val/loss"][-1][1], rel=1e-4)


def test_eval_takes_pretrained_path_and_warns_about_other_preprocessing(trained, image_root, tmp_path, caplog):
    run_dir, results = trained
    overrides = [f"data.root={image_root}", "data=small", "data.num_workers=0", "trainer.device=cpu"]
    overrides += ["trainer.progress_bar=false", f"pretrained={run_dir / 'checkpoints' / 'best.pt'}"]
    same = eval_script.evaluate_checkpoint(compose_config("eval", overrides), tmp_path / "same")
    assert same["top1"] == pytest.approx(results["best_top1"], abs=1e-4)  # the file, not a registry download
    assert "trained and validated with" not in caplog.text
    eval_script.evaluate_checkpoint(compose_config("eval", [*overrides, "data.img_size=40"]), tmp_path / "other")
    assert "trained and validated with data.img_size=32;" in caplog.text


def test_resume_auto_continues_at_the_next_epoch_and_step(trained, image_root, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    cfg = _train_cfg(image_root, "trainer.epochs=3", "trainer.model_ema=true", "resume=auto")
    results = train.train(cfg, run_dir)
    assert (results["epoch"], results["step"]) == (3, 3 * UPDATES_PER_EPOCH)
    # (1-based: the checkpoint ended epoch 2 of 3 at step 12, so epoch 3 comes next)
    assert "resumed from" in (run_dir / "train.log").read_text()
    assert "continues in epoch 3 after step 12" in (run_dir / "train.log").read_text()
    steps = [s for s, _ in _scalars(run_dir)["train/loss"]]
    assert steps[-6:] == list(range(13, 19))
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (3, 18)
    # The 2-epoch cosine had reached lr 0 at step 12; the 3-epoch one decays over the new third epoch instead.
    resumed_lrs = [v for s, v in _scalars(run_dir)["train/lr"] if s > 12]
    assert len(resumed_lrs) == 6 and resumed_lrs[0] > 1e-4 and all(a > b for a, b in zip(resumed_lrs, resumed_lrs[1:]))
    log = (run_dir / "train.log").read_text()
    assert "settings changed since the checkpoint" in log and "; trainer.epochs: 2 -> 3;" in log


def test_resume_after_a_crash_logs_each_step_once(image_root, tmp_path):
    """A crash after step 6 whose last checkpoint is step 4 (last.pt lost): the resumed run logs steps 5-6 and the
    epoch's validation again, and TensorBoard shows each step once (the writer purges the steps after the
    checkpoint's), not a zig-zag."""
    overrides = ("trainer.epochs=1", "trainer.ckpt_every_steps=4", "trainer.keep_last=0")
    train.train(_train_cfg(image_root, *overrides), tmp_path)
    (tmp_path / "checkpoints" / "last.pt").unlink()
    assert run_state.load_checkpoint(tmp_path / "checkpoints" / "last_prev.pt")["step"] == 4
    assert train.train(_train_cfg(image_root, *overrides, "resume=auto"), tmp_path)["step"] == UPDATES_PER_EPOCH
    scalars = _scalars(tmp_path)
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, UPDATES_PER_EPOCH + 1))
    assert [step for step, _ in scalars["val/top1"]] == [UPDATES_PER_EPOCH]
    # The resumed epoch's loss averages steps 5-6 only, and says so; the first run's line covered the whole epoch.
    first, resumed = re.findall(
        r"epoch 1/1 \| train loss [0-9.]+( \([^)]*\))? \|", (tmp_path / "train.log").read_text()
    )
    assert (first, resumed) == ("", f" (steps 5-{UPDATES_PER_EPOCH} of {UPDATES_PER_EPOCH}, resumed mid-epoch)")
    assert scalars["train/epoch_loss_steps"] == [(UPDATES_PER_EPOCH, 2)]  # the first run's point was purged


def _edited_checkpoint(trained, tmp_path, **changes):
    ckpt = run_state.load_checkpoint(trained[0] / "checkpoints" / "last.pt")
    path = tmp_path / "edited.pt"
    torch.save({**ckpt, **changes}, path)
    return path


def test_resume_on_other_classes_is_refused(trained, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog", "wolf"))
    cfg = _train_cfg(other, "trainer.epochs=3", f"resume={trained[0] / 'checkpoints' / 'last.pt'}")
    match = r"trained on 3 classes, data.root=.*other.* \(missing: \['fox'\], not in the checkpoint: \['wolf'"
    with pytest.raises(ValueError, match=match):
        train.train(cfg, tmp_path / "run")


def test_resume_mid_epoch_with_another_batch_size_is_refused(trained, image_root, tmp_path):
    path = _edited_checkpoint(trained, tmp_path, epoch=1, step=8, epoch_batches=2)
    cfg = _train_cfg(image_root, "data.batch_size=2", f"resume={path}")
    with pytest.raises(ValueError, match=r"inside epoch 2 after 2 batches of data.batch_size=4 .* data.batch_size=2"):
        train.train(cfg, tmp_path / "run")


def test_resume_with_another_optimizer_is_refused(trained, image_root, tmp_path):
    cfg = _train_cfg(image_root, "optim=sgd", "trainer.epochs=3", f"resume={trained[0] / 'checkpoints' / 'last.pt'}")
    with pytest.raises(ValueError, match=r"holds adamw optimizer state but optim.opt=sgd: resume with optim=adamw"):
        train.train(cfg, tmp_path / "run")


def test_resume_with_a_new_batch_size_and_epochs_follows_the_new_schedule(image_root, tmp_path):
    """2 epochs at batch 2 (12 updates each), then resumed at batch 4 (6 each) for a 3rd epoch and another weight
    decay: the 3rd epoch's learning rates are those of a 3-epoch run at batch 4, step for step."""
    used_lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used_lrs.append(optimizer.param_groups[0]["lr"])
    )
    try:
        train.train(_train_cfg(image_root, "trainer.epochs=3"), tmp_path / "reference")
        reference, used_lrs[:] = list(used_lrs), []
        train.train(_train_cfg(image_root, "trainer.epochs=2", "data.batch_size=2"), tmp_path / "run")
        assert len(used_lrs) == 24
        used_lrs.clear()
        overrides = ("trainer.epochs=3", "optim.weight_decay=0.07", "resume=auto")
        results = train.train(_train_cfg(image_root, *overrides), tmp_path / "run")
    finally:
        hook.remove()
    assert results["step"] == 24 + 6
    assert used_lrs == pytest.approx(reference[12:18], rel=1e-12) and min(used_lrs) > 0
    groups = run_state.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert 0.07 in {group["weight_decay"] for group in groups}  # the new setting, not the checkpoint's 0.05


def test_a_schedule_stepped_per_epoch_is_followed(image_root, tmp_path):
    """sched.step_on_epochs=true (timm's default, and the schema's for a new sched/*.yaml): timm's scheduler then
    ignores step_update, and the run trained its 3 epochs at the warmup's first LR (warmup_ratio x optim.lr). Each epoch
    now trains at timm's value for that epoch, also after a resume in the middle of one."""
    used_lrs: list[float] = []
    hook = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: used_lrs.append(optimizer.param_groups[0]["lr"])
    )
    overrides = ("trainer.epochs=3", "sched.step_on_epochs=true", "sched.warmup_epochs=1", "sched.warmup_ratio=0.1")
    cfg = _train_cfg(image_root, *overrides)
    try:
        stopped = train.train(cfg.copy(), tmp_path, should_stop=lambda: len(used_lrs) == 9)  # in epoch 2
        assert stopped["stopped"] and stopped["step"] == 9
        train.train(OmegaConf.merge(cfg, {"resume": "auto"}), tmp_path)
    finally:
        hook.remove()
    reference = train.create_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3), cfg.sched,
                                       1e-3, 3, UPDATES_PER_EPOCH)  # fmt: skip
    expected = []
    for epoch in range(3):
        reference.step(epoch)
        expected += [reference.optimizer.param_groups[0]["lr"]] * UPDATES_PER_EPOCH
    assert expected[::6] == pytest.approx([1e-4, 0.75e-3, 0.25e-3])  # the warmup's start, then the cosine
    assert used_lrs == pytest.approx(expected, rel=1e-12)


def test_resume_that_turns_on_ema_starts_it_from_the_model(trained, image_root, tmp_path):
    path = _edited_checkpoint(trained, tmp_path, state_dict_ema=None)
    results = train.train(
        _train_cfg(image_root, "trainer.epochs=2", "trainer.model_ema=true", f"resume={path}"), tmp_path / "run"
    )
    assert results["weights"] == "ema"  # a finished 2-epoch run: evaluated once, with the EMA = resumed weights
    assert results["top1"] == pytest.approx(_scalars(trained[0])["val/top1"][-1][1], abs=1e-4)
    assert "holds no EMA weights" in (tmp_path / "run" / "train.log").read_text()


def test_resume_mid_epoch_matches_an_uninterrupted_run(image_root, tmp_path, monkeypatch):
    overrides = ("trainer.epochs=1", "trainer.ckpt_every_steps=2", "trainer.label_smoothing=0.0")
    reference = train.train(_train_cfg(image_root, *overrides), tmp_path / "ref")
    original = engine.train_one_epoch

    def killed_at_step_3(*args, **kwargs):
        def kill() -> bool:
            if args[4].step >= 3:  # args[4] is the TrainProgress
                raise KeyboardInterrupt  # killed after step 3, whose checkpoint was never written
            return False

        return original(*args, **{**kwargs, "should_stop": kill})

    monkeypatch.setattr(engine, "train_one_epoch", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train.train(_train_cfg(image_root, *overrides), tmp_path / "cut")
    monkeypatch.setattr(engine, "train_one_epoch", original)
    ckpt = run_state.load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_batches"]) == (0, 2, 2)
    resumed = train.train(_train_cfg(image_root, *overrides, "resume=auto"), tmp_path / "cut")
    assert resumed["step"] == reference["step"] == UPDATES_PER_EPOCH
    final = run_state.load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["state_dict"]
    expected = run_state.load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["state_dict"]
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


def test_preemption_hook_saves_and_stops(image_root, tmp_path):
    results = train.train(_train_cfg(image_root, "trainer.epochs=2"), tmp_path, should_stop=lambda: True)
    assert results == {"stopped": True, "epoch": 0, "step": 1}
    assert run_state.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 1


def test_any_timm_model_trains_and_evaluates(image_root, tmp_path):
    results = train.train(_train_cfg(image_root, "model.name=test_resnet", "trainer.epochs=1"), tmp_path / "run")
    cfg = compose_config(
        "eval",
        ["model.name=test_resnet", "data=small", f"data.root={image_root}", "data.num_workers=0", "trainer.device=cpu"]
        + [f"checkpoint={tmp_path / 'run' / 'checkpoints' / 'best.pt'}", "trainer.progress_bar=false"],
    )
    assert eval_script.evaluate_checkpoint(cfg, tmp_path / "eval")["top1"] == pytest.approx(results["top1"], abs=1e-4)


@pytest.mark.parametrize("amp,model", [("bf16", "rednet26"), ("fp16", "test_resnet")])  # fp16 convs are slow on CPU
def test_loop_options_run_together(image_root, tmp_path, amp, model):
    """AMP (fp16 adds a GradScaler), channels_last, accumulation, clipping, RandAugment, random erasing and
    mixup/cutmix in one short run."""
    overrides = [f"model.name={model}", f"trainer.amp={amp}", "trainer.channels_last=true", "trainer.grad_accum=2"]
    overrides += ["trainer.clip_grad=1.0", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.25"]
    overrides += ["data.mixup=0.2", "data.cutmix=1.0", "trainer.epochs=1"]
    results = train.train(_train_cfg(image_root, *overrides), tmp_path)
    assert results["step"] == UPDATES_PER_EPOCH // 2 and results["loss"] > 0
    ckpt = run_state.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["amp_scaler"] is not None) == (amp == "fp16")


@pytest.mark.parametrize(
    "overrides,error,match",
    [
        (["model.name=rednet27"], ValueError, r"unknown model 'rednet27'.*rednet26, rednet38, rednet50"),
        (["resume=/no/such/last.pt"], checkpoint.CheckpointError, r"'/no/such/last.pt' does not exist"),
        (["trainer.amp=fp8"], ValueError, r"trainer.amp='fp8' is not one of none, bf16, fp16"),
        (["trainer.grad_accum=7"], ValueError, r"trainer.grad_accum=7 exceeds the 6 batches"),
        (["trainer.log_interval=0"], ValueError, r"trainer.log_interval=0 must be >= 1"),
    ],
)
def test_bad_settings_fail_before_training(image_root, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        train.train(_train_cfg(image_root, *overrides), tmp_path)
    assert not (tmp_path / "checkpoints" / "last.pt").exists()


def test_bad_data_root_fails_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.train(_train_cfg(tmp_path / "missing"), tmp_path / "run")
    with pytest.raises(ValueError, match="data.root is not set"):
        train.train(compose_config("train", TINY), tmp_path / "run")


def test_resume_from_a_file_that_is_not_a_checkpoint(image_root, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(checkpoint.CheckpointError, match="not a readable checkpoint"):
        train.train(_train_cfg(image_root, f"resume={junk}"), tmp_path / "run")


def test_checkpoint_of_another_architecture(trained, image_root, tmp_path):
    last = trained[0] / "checkpoints" / "last.pt"
    with pytest.raises(checkpoint.CheckpointError, match="holds a rednet26 but the run builds rednet38"):
        train.train(_train_cfg(image_root, "model=rednet38", f"resume={last}"), tmp_path)
    cfg = compose_config(
        "eval", ["model=rednet38", f"data.root={image_root}", f"checkpoint={last}", "data.num_workers=0"]
    )
    with pytest.raises(checkpoint.CheckpointError, match="set model=rednet26"):
        eval_script.evaluate_checkpoint(cfg, tmp_path / "eval")


def test_existing_run_directory_needs_resume(trained, image_root):
    with pytest.raises(FileExistsError, match="set resume=auto"):
        train.train(_train_cfg(image_root), trained[0])


def test_cuda_without_a_gpu(image_root, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="trainer.device=cuda but no CUDA GPU"):
        train.train(_train_cfg(image_root, "trainer.device=cuda"), tmp_path)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(image_root, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = torch.nn.CrossEntropyLoss.forward

    def nan_at_third_step(self, logits, targets):
        calls["n"] += 1
        loss = forward(self, logits, targets)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", nan_at_third_step)
    cfg = _train_cfg(image_root, "trainer.ckpt_every_steps=2", "trainer.log_interval=5")
    with pytest.raises(engine.NonFiniteLossError, match="training loss is nan at step 3 .*last good state"):
        train.train(cfg, tmp_path)
    assert run_state.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 2


def test_unreadable_training_image_is_named_and_work_is_kept(image_root, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    bad = root / "train" / "dog" / "3.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(data.BadImageError, match=f"cannot read image '{bad}'"):
        train.train(_train_cfg(root), tmp_path / "run")
    assert run_state.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] < UPDATES_PER_EPOCH
    # Skipped: each epoch line counts the epoch's skip once (precise BatchNorm's pass reads it again, uncounted), and
    # the file is warned about once in the run, not in each pass of each epoch.
    overrides = (
        "trainer.epochs=2",
        "data.skip_bad_images=true",
        "data.verify_images=false",
        "trainer.precise_bn_batches=6",
    )
    results = train.train(_train_cfg(root, *overrides), tmp_path / "skip")
    assert results["step"] == 2 * UPDATES_PER_EPOCH
    log = (tmp_path / "skip" / "train.log").read_text()
    assert len(re.findall(r"\| skipped 1 unreadable image\n", log)) == 2
    assert log.count(f"skipping unreadable image '{bad}'") == 1


def test_unreadable_validation_image_keeps_the_trained_epoch(image_root, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    bad = root / "val" / "cat" / "1.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:60])
    with pytest.raises(data.BadImageError, match=f"cannot read image '{bad}'"):
        train.train(_train_cfg(root, "trainer.epochs=1"), tmp_path / "run")
    ckpt = run_state.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_batches"]) == (0, UPDATES_PER_EPOCH, UPDATES_PER_EPOCH)
    bad.write_bytes(good)  # fixed: resume goes straight to the epoch's evaluation
    results = train.train(_train_cfg(root, "trainer.epochs=1", "resume=auto"), tmp_path / "run")
    assert (results["epoch"], results["step"], results["count"]) == (1, UPDATES_PER_EPOCH, 12)
    assert "epoch 1/1 | trained before the resume | val top1" in (tmp_path / "run" / "train.log").read_text()


def test_command_line_train_then_eval(tmp_path):
    """The real entry points: Hydra parses the overrides, picks the run directory, eval.py reads best.pt. What a new
    user types: `python train.py data.root=~/flowers` (the shell leaves that ~ alone) on a folder unzipped from macOS
    (AppleDouble ._ files, __MACOSX/), its splits named training/ and validation/, its images in <class>/images/
    (Tiny-ImageNet); then eval.py with paths relative to the starting directory and hydra.job.chdir=true (the
    process then runs in the run directory: eval.py looked for checkpoint= and data.root there)."""
    home = tmp_path / "home"
    root = make_image_folder(home / "flowers", n_train=4, n_val=2, size=16)
    for image in list(root.rglob("*.png")):
        (image.parent / "images").mkdir(exist_ok=True)
        image.rename(image.parent / "images" / image.name)
        (image.parent / "images" / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # AppleDouble
    (root / "train" / "__MACOSX").mkdir()
    (root / "train" / "__MACOSX" / "._cat").write_bytes(b"\x00\x05\x16\x07" + bytes(80))
    (root / "train").rename(root / "training")
    (root / "val").rename(root / "validation")
    env = {**os.environ, "HOME": str(home)}
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *TINY,
        "data.root=~/flowers",
        "trainer.epochs=1",
        "hydra.run.dir=run",
    ]
    done = subprocess.run([*cmd, "hydra.job.chdir=true"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert OmegaConf.load(run_dir / "config.yaml").data.root == str(root.resolve())
    log = (run_dir / "train.log").read_text()
    assert "training/: 12 images of 12 are in subfolders of their class folder" in log
    assert "training/: 12 images used, 13 files left out" in log and "macOS metadata 13" in log
    assert "validation/: 6 images in 3 classes" in log
    trained_top1 = json.loads((run_dir / "results.json").read_text())["top1"]
    cmd = [sys.executable, str(REPO / "eval.py"), "data=small", "data.root=home/flowers", "data.num_workers=0"]
    cmd += ["checkpoint=run/checkpoints/best.pt", "hydra.run.dir=eval", "trainer.device=cpu", "hydra.job.chdir=true"]
    out = subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    assert json.loads((eval_dir / "results.json").read_text())["top1"] == pytest.approx(trained_top1, abs=1e-4)
    assert f"top1 {trained_top1:.2f}" in out


def test_command_line_run_that_fails_says_why_in_train_log(image_root, tmp_path):
    # Under SLURM or with output sent elsewhere, the run directory is where one looks later: the error (a bad image
    # names its file) must be in train.log, not only on stderr.
    bad = tmp_path / "data"
    shutil.copytree(image_root, bad)
    victim = next(p for p in sorted((bad / "train").rglob("*")) if p.is_file())
    victim.write_bytes(b"not an image at all")
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, f"data.root={bad}", "trainer.epochs=1", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    log = (run_dir / "train.log").read_text()
    assert "the run failed: UnreadableImagesError" in log and str(victim) in log  # (a BadImageError)


def test_eval_refuses_other_class_folders(trained, image_root, tmp_path):
    # A val folder with a class missing would shift every label (and a plain state dict of another class count
    # would lose its classifier): both are errors, not a warning and meaningless numbers.
    other = make_image_folder(tmp_path / "other", classes=("cat", "dog"), n_train=1, n_val=1)
    last = trained[0] / "checkpoints" / "last.pt"
    overrides = [f"data.root={other}", "data=small", f"checkpoint={last}", "data.num_workers=0", "trainer.device=cpu"]
    with pytest.raises(ValueError, match=r"trained on 3 classes but the val folder has 2 \(missing: \['fox'\]"):
        eval_script.evaluate_checkpoint(compose_config("eval", overrides), tmp_path / "eval")
    plain = tmp_path / "plain.pt"
    torch.save(torch.load(last, weights_only=True)["state_dict"], plain)
    overrides[2] = f"checkpoint={plain}"
    overrides.append("model=rednet26")  # a bare state dict does not name its architecture
    with pytest.raises(ValueError, match="has a 3-class classifier but the val folder has 2 class folders"):
        eval_script.evaluate_checkpoint(compose_config("eval", overrides), tmp_path / "eval2")


# --- settings that cannot train fail before the first epoch, naming the fix


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.batch_size=1"], r"data.batch_size=1: every training batch would reach rednet26's \d+ BatchNorm"),
        (["data.batch_size=1", "trainer.grad_accum=4"], r"data.batch_size=1: .*set data.batch_size=2 or more"),
        (["data.batch_size=1", "data.img_size=64"], r"data.batch_size=1: .*no batch statistics"),  # not only 1x1
        (["data.batch_size=0"], r"data.batch_size=0 must be >= 1"),
        (["trainer.epochs=0"], r"trainer.epochs=0 must be >= 1"),
        (["data.batch_size=25"], r"data.batch_size=25 is larger than the 24 training images per process"),
        (["model.name=vit_tiny_patch16_224"], r"vit_tiny_patch16_224 cannot take data.img_size=32 images .*224"),
        (["+model.num_classes=5"], r"model.num_classes=5 but data.root '.*' has 3 class folders: .*remove"),
    ],
    ids=[
        "batch-1",
        "batch-1-accum",
        "batch-1-large-images",
        "batch-0",
        "epochs-0",
        "batch-above",
        "img-size",
        "classes",
    ],
)
def test_settings_that_cannot_train_fail_before_the_first_epoch(image_root, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: pytest.fail("an epoch started"))
    with pytest.raises(ValueError, match=match):
        train.train(_train_cfg(image_root, *overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_single_class_folder_is_refused(tmp_path, monkeypatch):
    """One class "trained" to loss 0 and 100% top-1 without a word."""
    root = make_image_folder(tmp_path / "images", classes=("digits",))
    monkeypatch.setattr(data, "create_image_dataset", lambda *args, **kwargs: pytest.fail("data was loaded"))
    with pytest.raises(ValueError, match=r"has 1 class folder under train/ \(\['digits'\]\): a classifier needs at "):
        train.train(_train_cfg(root), tmp_path / "run")


def test_images_smaller_than_the_downsampling_train_with_a_warning(image_root, tmp_path):
    """RedNet's padding carries any size >= 1 px through its 32x downsampling; below 32 px the log says so."""
    results = train.train(_train_cfg(image_root, "data.img_size=16"), tmp_path, should_stop=lambda: True)
    assert results["stopped"]
    assert "data.img_size=16 is smaller than rednet26's 32x downsampling" in (tmp_path / "train.log").read_text()


# --- two runs started in the same second from one folder


def test_two_runs_in_one_default_directory_each_get_their_own(image_root, tmp_path):
    """Started together from one folder with the default directory pattern (here per day, so they surely clash):
    the second to claim it takes <dir>_1; each directory holds one run's log, config, checkpoints and results."""
    cmd = [sys.executable, str(REPO / "train.py"), *TINY, f"data.root={image_root}", "trainer.epochs=1"]
    cmd += ["hydra.run.dir=outputs/${task_name}/${now:%Y-%m-%d}"]  # the default pattern, coarser
    runs = [
        subprocess.Popen([*cmd, f"seed={seed}"], cwd=tmp_path, stderr=subprocess.PIPE, text=True) for seed in (1, 2)
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-3000:]
    first, *others = sorted((tmp_path / "outputs" / "train").iterdir())
    assert [p.name for p in others] == [f"{first.name}_1"]  # (two days' names if midnight fell between the starts)
    seeds = set()
    for run_dir in (first, *others):
        log = (run_dir / "train.log").read_text()
        assert log.count("rednet26: 3 classes") == 1 and log.count("done: val top-1") == 1  # one run's lines only
        seed = OmegaConf.load(run_dir / "config.yaml").seed
        assert OmegaConf.load(run_dir / ".hydra" / "config.yaml").seed == seed
        assert f"seed={seed}" in OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
        assert run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")["config"]["seed"] == seed
        assert json.loads((run_dir / "results.json").read_text())["step"] == UPDATES_PER_EPOCH
        seeds.add(seed)
    assert seeds == {1, 2}
    assert "belongs to another run (host " in (others[0] / "train.log").read_text()


def test_resume_auto_continues_in_the_claimed_directory(trained, image_root, tmp_path):
    """resume says the directory is this run's: no new directory, even though another run claimed it."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    assert (run_dir / distributed.CLAIM_FILE).exists()
    results = train.train(_train_cfg(image_root, "resume=auto", "trainer.epochs=2"), run_dir)
    assert results["epoch"] == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_claimed_directory_without_checkpoints_is_not_shared(tmp_path):
    (tmp_path / "run").mkdir()
    assert distributed.claim_run_dir(tmp_path / "run") == tmp_path / "run"
    assert distributed.claim_run_dir(tmp_path / "run") == tmp_path / "run_1"
    assert distributed.claim_run_dir(tmp_path / "run") == tmp_path / "run_2"
    assert distributed.claim_run_dir(tmp_path / "run", continue_run=True) == tmp_path / "run"
    assert f"pid {os.getpid()}" in distributed.claim_holder(tmp_path / "run")


def test_a_directory_whose_run_failed_in_set_up_is_taken_over(image_root, tmp_path):
    """A run that ended before its first checkpoint (here: a typo in data.root) leaves its directory to a rerun."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-c", f"from rednet import distributed; distributed.claim_run_dir({str(run_dir)!r})"], cwd=REPO
    )
    assert done.returncode == 0 and (run_dir / distributed.CLAIM_FILE).exists()
    assert distributed.claim_run_dir(run_dir) == run_dir  # its process has ended, no checkpoints: taken over
    assert distributed.claim_run_dir(run_dir) == tmp_path / "run_1"  # this process is alive: not taken over


def test_grad_accum_that_does_not_divide_the_epoch_uses_every_batch():
    """5 batches at grad_accum=2: updates of 2, 2 and 1 micro-batches, each the mean over its micro-batches (the
    trailing batch was dropped before: 20% of the data)."""
    torch.manual_seed(0)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(5)]
    model, reference = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    progress = run_state.TrainProgress()
    settings = engine.LoopSettings(torch.device("cpu"), run_state.updates_per_epoch(5, 2), grad_accum=2)
    assert settings.epoch_updates == 3
    stats = engine.train_one_epoch(model, batches, optimizer, torch.nn.CrossEntropyLoss(), progress, settings)
    assert (stats["updates"], progress.step, progress.epoch_batches) == (3, 3, 5)
    for group in (batches[0:2], batches[2:4], batches[4:5]):  # plain SGD on each group's mean loss
        loss = sum(torch.nn.functional.cross_entropy(reference(x), y) for x, y in group) / len(group)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for param, grad in zip(reference.parameters(), grads):
                param -= 0.5 * grad
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    # The schedule counts the short update too: after epoch 1 (5 batches) the position is 3, mid-epoch ceil(b / 2).
    assert run_state.schedule_position(run_state.TrainProgress(epoch=1), 3, 2) == 3
    assert run_state.schedule_position(run_state.TrainProgress(epoch=1, epoch_batches=4), 3, 2) == 5


# --- more settings that cannot train (or train wrong without a word): refused before any data is read


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["trainer.label_smoothing=1.5"], r"trainer.label_smoothing=1.5 must be in \[0, 1\)"),  # failed at step 1
        (["trainer.label_smoothing=1.5", "data.mixup=0.2"], r"label_smoothing=1.5"),  # trained on negative targets
        (["trainer.clip_grad=1.0", "trainer.clip_mode=foo"], r"trainer.clip_mode='foo' must be one of norm"),
        (["trainer.clip_grad=-1.0"], r"trainer.clip_grad=-1.0 must be null \(off\) or > 0"),  # reversed gradients
        (["data.std=[0,1,1]"], r"data.std=\[0.0, 1.0, 1.0\] must be null, 3 values or 1, all > 0"),
        (["data.mean=[0.5,0.5]"], r"data.mean=\[0.5, 0.5\] must be null, 3 values \(R, G, B\) or 1 \(every channel\)"),
        (["data.crop_pct=0"], r"data.crop_pct=0.0 must be null .* or in \(0, 1\]"),  # timm read 0 as 0.875
        (["data.interpolation=foo"], r"data.interpolation='foo' must be null or a timm name"),
        (["data.num_workers=-1"], r"data.num_workers=-1 must be >= 0"),
        (["data.scale=[1.0,0.5]", "data.hflip=2"], r"data.scale=\[1.0, 0.5\] must be .*; data.hflip=2.0 must be"),
        (["trainer.model_ema=true", "trainer.model_ema_decay=1.5"], r"trainer.model_ema_decay=1.5 must be in"),
        (["optim.lr=0"], r"optim.lr=0.0 must be > 0"),
        (["data.batch_size=3", "data.cutmix=1.0"], r"data.batch_size=3 must be even .*set data.batch_size=4 or 2"),
        (["sched.cooldown_epochs=2"], r"lasts 3 epochs, but trainer.epochs=1: .*Set trainer.epochs=3"),
        (["sched.warmup_prefix=true"], r"warmup_prefix=true \(warmup_epochs=1\) lasts 2 epochs"),
        (["sched.sched=plateau"], r"sched.sched=plateau is not supported: .*use sched=cosine"),  # bare AssertionError
        (["sched.sched=none"], r"sched.sched=none keeps optim.lr constant .*warmup_epochs=1 warmup"),  # ignored it
    ],
)
def test_values_that_cannot_train_fail_before_data_is_read(image_root, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(data, "check_image_folder", lambda *args, **kwargs: pytest.fail("data was read"))
    with pytest.raises(ValueError, match=match):
        train.train(_train_cfg(image_root, "trainer.epochs=1", *overrides), tmp_path)


def test_a_file_that_is_no_image_fails_before_the_first_step(image_root, tmp_path, monkeypatch):
    """Text saved as .png passed the extension scan and failed when the loader first read it, mid-epoch."""
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    (root / "train" / "fox" / "download.png").write_text("<html>403 Forbidden</html>")
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: pytest.fail("an epoch started"))
    with pytest.raises(data.BadImageError, match=r"train/: 1 of 25 files .*download.png' \(UnidentifiedImageError"):
        train.train(_train_cfg(root), tmp_path / "run")


def test_warmup_as_long_as_the_run_and_val_on_the_train_split_warn(image_root, tmp_path):
    overrides = ("trainer.epochs=1", "sched.warmup_epochs=3", "data.val_split=train")
    train.train(_train_cfg(image_root, *overrides), tmp_path, should_stop=lambda: True)
    log = (tmp_path / "train.log").read_text()
    assert "sched.warmup_epochs=3 >= trainer.epochs=1: the learning rate rises for the whole run" in log
    assert "data.val_split=train is the training split" in log


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_passes_the_value_checks(experiment):
    train.check_config(compose_config("train", [f"experiment={experiment}", "data.root=/unused"]))


# --- 1-channel models: grayscale images end to end


def test_one_channel_model_trains_and_evaluates_from_the_checkpoint_alone(image_root, tmp_path):
    """+model.in_chans=1 could not train (the data gave RGB, the pre-flight check blamed data.img_size); the
    checkpoint carries in_chans, so eval.py checkpoint= alone reads the images as gray and reproduces the top-1."""
    results = train.train(_train_cfg(image_root, "+model.in_chans=1", "trainer.epochs=1"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["top1"] == pytest.approx(results["top1"])
    ckpt = checkpoint.read_torch_file(tmp_path / "run" / "checkpoints" / "best.pt")
    assert ckpt["model_kwargs"]["in_chans"] == 1 and tuple(ckpt["pretrained_cfg"]["input_size"]) == (1, 32, 32)
    assert len(ckpt["pretrained_cfg"]["mean"]) == 1 and len(ckpt["pretrained_cfg"]["std"]) == 1
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    overrides = [f"checkpoint={best}", "data.num_workers=0", "trainer.device=cpu", "trainer.progress_bar=false"]
    evaluated = eval_script.evaluate_checkpoint(compose_config("eval", overrides), tmp_path / "eval")
    assert evaluated["top1"] == pytest.approx(results["top1"], abs=1e-4) and evaluated["count"] == 12
    assert evaluated["loss"] == pytest.approx(results["loss"], rel=1e-4)


def test_channels_are_named_when_they_are_the_mismatch(image_root):
    from rednet import factory

    cfg = _train_cfg(image_root)
    gray = factory.build_model("rednet26", 3, in_chans=1)
    with pytest.raises(ValueError, match=r"rednet26 takes 1-channel images but the data gives 3-channel ones \(RGB\)"):
        train.check_model_fits_data(gray, cfg, 3, 1, in_chans=3)
    rgb = factory.build_model("rednet26", 3)
    with pytest.raises(ValueError, match=r"takes 3-channel images but the data gives 1-channel ones \(L\)"):
        train.check_model_fits_data(rgb, cfg, 3, 1, in_chans=1)
    train.check_model_fits_data(gray, cfg, 3, 1)  # the model's own channels: fits


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["+model.in_chans=2"], r"model in_chans=2: images are read as 1-channel grayscale \(in_chans=1\) or 3-"),
        (["+model.in_chans=1", "data.mean=[0.5,0.5,0.5]"], r"data.mean=\[0.5, 0.5, 0.5\] has 3 values but the model"),
    ],
    ids=["in_chans-2", "mean-length"],
)
def test_channel_settings_that_cannot_be_read_fail_before_data(image_root, tmp_path, monkeypatch, overrides, match):
    monkeypatch.setattr(data, "create_image_dataset", lambda *args, **kwargs: pytest.fail("data was loaded"))
    with pytest.raises(ValueError, match=match):
        train.train(_train_cfg(image_root, *overrides), tmp_path)


# --- run directories: more inputs of issue 9 kind 5 (a run claims its directory; only resume continues one)


def _claim_in_subprocess(run_dir, then: str = "") -> subprocess.Popen:
    """Another process claims `run_dir` (as a run starting there would), prints "claimed", then runs `then`."""
    code = f"from rednet import distributed; distributed.claim_run_dir({str(run_dir)!r}); print('claimed', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", f"{code}\n{then}"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "claimed\n"
    return proc


@pytest.fixture()
def no_job_id(monkeypatch):
    for name in ("SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_requeued_job_continues_in_the_directory_it_was_moved_to(tmp_path, no_job_id, caplog):
    """Two SLURM jobs whose Hydra directories clash: job 7 ran in run_1. Requeued (same job id, same Hydra
    directory name, resume=auto) it must continue run_1, not job 6's run (it did: both then wrote into run)."""
    run_dir = tmp_path / "run"
    no_job_id.setenv("SLURM_JOB_ID", "6")
    assert distributed.claim_run_dir(run_dir) == run_dir
    no_job_id.setenv("SLURM_JOB_ID", "7")
    assert distributed.claim_run_dir(run_dir) == tmp_path / "run_1"
    for folder in (run_dir, tmp_path / "run_1"):
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.pt").touch()
    assert distributed.claim_run_dir(run_dir, continue_run=True) == tmp_path / "run_1"
    assert distributed.read_claim(tmp_path / "run_1").moved_from == str(run_dir)  # kept by the new claim
    no_job_id.setenv("SLURM_JOB_ID", "6")
    assert distributed.claim_run_dir(run_dir, continue_run=True) == run_dir
    no_job_id.delenv("SLURM_JOB_ID")  # a rerun by hand: the directory named, and a word about the moved run
    assert distributed.claim_run_dir(run_dir, continue_run=True) == run_dir
    assert f"started in the same directory and moved to {tmp_path / 'run_1'}" in caplog.text


def test_resume_into_a_directory_whose_run_is_still_running_is_refused(tmp_path, no_job_id):
    run_dir = tmp_path / "run"
    running = _claim_in_subprocess(run_dir, "import time; time.sleep(60)")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").touch()  # its first checkpoint
    try:
        holder = distributed.claim_holder(run_dir)
        with pytest.raises(FileExistsError, match=rf"'{re.escape(str(run_dir))}' is in use by a run that is still"):
            distributed.claim_run_dir(run_dir, continue_run=True)
        assert distributed.claim_run_dir(run_dir) == run_dir  # a new run: train.py refuses it (checkpoints there)
        assert distributed.claim_holder(run_dir) == holder  # and the running run's claim was not overwritten
        shutil.rmtree(run_dir / "checkpoints")  # resume=auto with nothing to resume yet: a new run, its own directory
        assert distributed.claim_run_dir(run_dir, continue_run=True) == tmp_path / "run_1"
    finally:
        running.kill()
        running.wait()
    assert distributed.claim_run_dir(run_dir, continue_run=True) == run_dir  # its process ended: taken over


def test_a_run_killed_before_its_first_complete_checkpoint_leaves_its_directory(tmp_path, no_job_id):
    """SIGKILL in the middle of the first checkpoint write leaves checkpoints/ with only a temp file: a rerun of
    the same command takes the directory over (it took run_1, leaving an empty run behind)."""
    import signal  # (this module's imports are others' to edit: tests appended here import what they need)

    run_dir = tmp_path / "run"
    kill = "import os, signal; p = {0!r}; os.makedirs(p); open(p + '/.last.pt.1.tmp', 'wb').write(b'PK');"
    kill += " os.kill(os.getpid(), signal.SIGKILL)"
    killed = _claim_in_subprocess(run_dir, kill.format(str(run_dir / "checkpoints")))
    assert killed.wait() == -signal.SIGKILL
    assert distributed.claim_run_dir(run_dir) == run_dir


def test_a_claim_whose_pid_was_reused_is_not_a_running_run(tmp_path, no_job_id):
    """The claiming process ended and its pid now names another process (here: pytest's parent)."""
    import socket

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    claim = f"host {socket.gethostname()} pid {os.getppid()} start 1 at 2026-01-01 00:00:00\n"
    (run_dir / distributed.CLAIM_FILE).write_text(claim)
    assert distributed.claim_run_dir(run_dir) == run_dir


def test_an_unwritable_run_directory_names_it_and_the_fix(tmp_path, no_job_id):
    """A read-only parent folder (Hydra's directory pattern under it): the error names the directory and the fix.
    (Tests run as root here, so the read-only folder is a file in the way: the same error path, EEXIST/ENOTDIR.)"""
    (tmp_path / "readonly").write_text("a file where the parent folder should be")
    with pytest.raises(OSError, match=r"cannot claim the run directory '.*readonly/run' .*choose a writable"):
        distributed.claim_run_dir(tmp_path / "readonly" / "run")


# --- results do not depend on the worker count or on where a run was resumed (issue 9 kind 8, more inputs)

HEAVY_AUGMENTATION = (
    "data.auto_augment=rand-m9-mstd0.5-inc1", "data.re_prob=0.5", "data.color_jitter=0.4", "data.hflip=0.5",
    "data.mixup=0.4", "data.cutmix=1.0", "model.drop_path_rate=0.2",
    "trainer.grad_accum=4",  # 6 batches per epoch: updates of 4 and 2 micro-batches
    "trainer.epochs=2", "trainer.ckpt_every_steps=1",
)  # fmt: skip


@pytest.mark.usefixtures("single_thread")
def test_heavy_augmentation_is_the_same_with_any_workers_and_resume(image_root, tmp_path):
    """RandAugment, random erasing, colour jitter, flips, mixup/cutmix, drop-path and a short last accumulation:
    0 workers uninterrupted, and 2 workers stopped in the middle of epoch 2 then resumed with 1, end bit-identical."""
    reference = tmp_path / "reference"
    train.train(_train_cfg(image_root, *HEAVY_AUGMENTATION, "data.num_workers=0"), reference)
    run_dir = tmp_path / "run"
    calls = {"n": 0}

    def stop_at_step_3() -> bool:  # epoch 2's first update (2 updates per epoch)
        calls["n"] += 1
        return calls["n"] == 3

    stopped = train.train(_train_cfg(image_root, *HEAVY_AUGMENTATION, "data.num_workers=2"), run_dir, stop_at_step_3)
    assert stopped == {"stopped": True, "epoch": 1, "step": 3}
    train.train(_train_cfg(image_root, *HEAVY_AUGMENTATION, "data.num_workers=1", "resume=auto"), run_dir)
    expected = run_state.load_checkpoint(reference / "checkpoints" / "last.pt")
    final = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (final["step"], expected["step"]) == (4, 4)
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key


# --- a fresh user's runs: what a failed, finished or running run leaves and says


def _truncated_train_images(image_root, root):
    """A copy of `image_root` whose training images are all truncated: their headers read, their pixels do not, so
    the very first batch fails (the check before training passes them)."""
    shutil.copytree(image_root, root)
    for path in (root / "train").rglob("*.png"):
        path.write_bytes(path.read_bytes()[:60])
    return root


def test_a_run_that_fails_before_its_first_update_leaves_no_checkpoint(image_root, tmp_path):
    """It wrote last.pt at step 0 (untrained weights) and said "last.pt holds the last saved step"; the same command
    rerun after fixing the files was then refused ("already holds checkpoints")."""
    root, run_dir = _truncated_train_images(image_root, tmp_path / "images"), tmp_path / "run"
    cfg = _train_cfg(root, "trainer.epochs=1", "data.verify_images=false")
    with pytest.raises(data.BadImageError, match="cannot read image"):
        train.train(cfg, run_dir)
    assert not list((run_dir / "checkpoints").glob("*.pt"))
    log = (run_dir / "train.log").read_text()
    assert "no checkpoint was saved: nothing was trained yet" in log and "last.pt holds" not in log
    shutil.rmtree(root)
    shutil.copytree(image_root, root)  # fixed
    train.check_new_run_dir(_train_cfg(root), run_dir / "checkpoints")  # the same command is not refused
    results = train.train(_train_cfg(root, "trainer.epochs=1", "resume=auto"), run_dir)
    assert results["step"] == UPDATES_PER_EPOCH


def test_resume_of_a_finished_run_says_it_is_finished_and_how_to_train_longer(trained, image_root, tmp_path):
    """resume=auto on a run that trained all its epochs said "continues in epoch 3 after step 12", then "done"."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0], run_dir)
    results = train.train(_train_cfg(image_root, "trainer.epochs=2", "trainer.model_ema=true", "resume=auto"), run_dir)
    assert (results["epoch"], results["step"]) == (2, 2 * UPDATES_PER_EPOCH)
    log = (run_dir / "train.log").read_text()
    assert "continues in epoch 3" not in log
    assert "the run has finished (2 epochs trained, step 12; trainer.epochs=2), nothing is left to train" in log
    assert "raise trainer.epochs above 2 (e.g. trainer.epochs=4 resume=auto" in log


def test_a_new_run_into_a_directory_whose_run_is_still_running_says_so(image_root, tmp_path, no_job_id):
    """It said "set resume=auto to continue that run", which was then refused: the run was still running."""
    run_dir = tmp_path / "run"
    running = _claim_in_subprocess(run_dir, "import time; time.sleep(60)")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.pt").touch()
    try:
        with pytest.raises(FileExistsError, match=rf"still running \(host \S+ pid {running.pid} ") as error:
            train.train(_train_cfg(image_root), run_dir)
        assert "set resume=auto" not in str(error.value)
    finally:
        running.kill()
        running.wait()
    with pytest.raises(FileExistsError, match="already holds checkpoints: set resume=auto"):  # it ended
        train.train(_train_cfg(image_root), run_dir)


def test_unreadable_files_of_both_splits_are_listed_in_one_error(image_root, tmp_path, monkeypatch):
    """train/'s bad files were reported first, and val/'s only on the next start, after fixing those."""
    root = tmp_path / "images"
    shutil.copytree(image_root, root)
    (root / "train" / "fox" / "download.png").write_text("<html>403 Forbidden</html>")
    (root / "val" / "cat" / "page.png").write_text("<html>404</html>")
    monkeypatch.setattr(engine, "train_one_epoch", lambda *args, **kwargs: pytest.fail("an epoch started"))
    with pytest.raises(data.BadImageError) as error:
        train.train(_train_cfg(root), tmp_path / "run")
    message = str(error.value)
    assert re.search(r"train/: 1 of 25 files named as images is not an image .*download\.png' \(", message)
    assert re.search(r"val/: 1 of 13 files named as images is not an image .*page\.png' \(", message)


def test_a_torchrun_restart_continues_the_first_attempts_run(image_root, tmp_path, monkeypatch):
    """torchrun --max-restarts: the restarted workers are composed by Hydra again, under a new name for the default
    timestamped directory, and started the run again from scratch there (resume=null; with resume=PATH from that
    checkpoint again). Now they continue the first attempt's run in its directory from its last checkpoint.
    (In-process, with torchrun's variables: a real restart under gloo fails now and then in torch's own rendezvous,
    pytorch/pytorch#167288.)"""
    for name in ("SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "6f1c")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first, restarted = tmp_path / "runs" / "23-59-58", tmp_path / "runs" / "00-00-03"
    cfg = _train_cfg(image_root, "trainer.epochs=2", "trainer.ckpt_every_steps=1")
    steps = []
    train.train(cfg.copy(), first, should_stop=lambda: steps.append(1) or len(steps) == 4)  # (then "killed")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    results = train.train(cfg.copy(), restarted)
    assert not restarted.exists()
    assert (results["step"], results["epoch"]) == (2 * UPDATES_PER_EPOCH, 2)
    assert json.loads((first / "results.json").read_text())["step"] == 2 * UPDATES_PER_EPOCH
    log = (first / "train.log").read_text()
    assert f"torchrun restart 1: continuing the run in {first} from its last checkpoint (resume=auto)" in log
    assert re.search(r"resum\w+ .*last\.pt", log), log[-2000:]
