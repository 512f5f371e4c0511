"""Fault tolerance on the CPU: stop signals, kill -9 in the middle of a checkpoint write, a damaged last.pt, and the
exact resume (to 1e-6) after each of them; CUDA out-of-memory advice; SyncBatchNorm on the CPU."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from train_utils import REPO, TINY, compose_config, make_image_folder, resolved_config, sigterm_after_first_checkpoint

import train
from rednet import checkpoint, data, preemption, run_state
from rednet.models.rednet import RedNet

UPDATES = 6  # 3 classes x 8 training images, batch 4
# One epoch with EMA on (it must be restored too) and the lr changing every step. Runs that are to be killed also
# write last.pt after every step (writes cost ~0.5 s each: 115 MB with EMA and AdamW state).
RUN = ("trainer.epochs=1", "trainer.model_ema=true", "trainer.model_ema_decay=0.9")
EVERY_STEP = "trainer.ckpt_every_steps=1"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# One thread here as in the subprocesses: summation order depends on the thread count, and AdamW's first
# steps (g / |g|) turn last-bit differences of near-zero gradients into visible ones.
pytestmark = pytest.mark.usefixtures("single_thread")


def _cfg(root, *overrides):
    return compose_config("train", [*TINY, f"data.root={root}", *RUN, *overrides])


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(image_root, tmp_path_factory):
    """The uninterrupted run's final checkpoint."""
    run_dir = tmp_path_factory.mktemp("reference")
    train.train(_cfg(image_root), run_dir)
    return run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _resume_and_compare(image_root, run_dir, reference) -> str:
    """Continue `run_dir` with resume=auto; the final weights (model and EMA) must be the uninterrupted run's."""
    results = train.train(_cfg(image_root, "resume=auto"), run_dir)
    assert results["step"] == UPDATES and results["epoch"] == 1
    final = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    for part in ("state_dict", "state_dict_ema"):
        for key, value in reference[part].items():
            torch.testing.assert_close(final[part][key], value, rtol=0, atol=1e-6, msg=f"{part}.{key}")
    assert final["optimizer"]["state"].keys() == reference["optimizer"]["state"].keys()
    return (run_dir / "train.log").read_text()


# --- kill -9 in the middle of writing a checkpoint

KILL_AT_WRITE = 4  # last.pt after steps 1-3 are written; the write of step 4 dies half-way

DRIVER = """
import io, os, signal, sys
sys.path[:0] = [{repo!r}, {tests!r}]
import torch
import train
from train_utils import compose_config

real_save, calls = torch.save, [0]

def save_then_die(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {kill_at}:  # half of the checkpoint reaches the disk, then kill -9
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f, *args, **kwargs)

torch.save = save_then_die
train.train(compose_config("train", {overrides!r}), {run_dir!r})
"""


@pytest.fixture(scope="module")
def killed_mid_write(image_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("killed")
    overrides = [*TINY, f"data.root={image_root}", *RUN, EVERY_STEP]
    code = DRIVER.format(
        repo=str(REPO), tests=str(REPO / "tests"), kill_at=KILL_AT_WRITE, overrides=overrides, run_dir=str(run_dir)
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    return run_dir


def test_kill_mid_checkpoint_write_leaves_a_loadable_checkpoint(killed_mid_write):
    ckpt_dir = killed_mid_write / "checkpoints"
    (torn,) = ckpt_dir.glob(".last.pt.*.tmp")  # the write that was killed
    with pytest.raises(checkpoint.CheckpointError):
        run_state.load_checkpoint(torn)
    last = run_state.load_checkpoint(ckpt_dir / "last.pt")
    assert (last["epoch"], last["step"], last["epoch_batches"]) == (0, KILL_AT_WRITE - 1, KILL_AT_WRITE - 1)
    # last.pt became last_prev.pt just before the write began: a copy of it survives whatever happens to last.pt
    assert run_state.load_checkpoint(ckpt_dir / "last_prev.pt")["step"] == KILL_AT_WRITE - 1


def test_resume_after_kill_mid_write_matches_an_uninterrupted_run(killed_mid_write, image_root, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_mid_write, run_dir)
    log = _resume_and_compare(image_root, run_dir, reference)
    last = run_dir / "checkpoints" / "last.pt"
    assert f"resumed from {last}: continues in epoch 1 after step {KILL_AT_WRITE - 1}" in log
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the torn temp file is cleaned up


def test_truncated_last_pt_falls_back_to_the_previous_one(killed_mid_write, image_root, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(killed_mid_write, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    log = _resume_and_compare(image_root, run_dir, reference)
    assert "skipping damaged checkpoint" in log and str(last) in log
    assert f"resumed from {last.with_name('last_prev.pt')}: continues in epoch 1 after step {KILL_AT_WRITE - 1}" in log


def test_no_loadable_checkpoint_is_an_error_not_a_fresh_start(image_root, tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    for name in ("last.pt", "last_prev.pt", "epoch_0001.pt"):
        (ckpt_dir / name).write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(checkpoint.CheckpointError, match="no loadable checkpoint in"):
        train.train(_cfg(image_root, "resume=auto"), tmp_path)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["epoch_0001.pt", "last.pt", "last_prev.pt"]


def test_each_write_keeps_the_previous_last_pt(tmp_path):
    state = {"model": {"w": torch.zeros(2)}, "optimizer": {}, "epoch": 0, "step": 1, "arch": "rednet26"}
    run_state.write_checkpoints(state, tmp_path, epoch_end=False, is_best=False, keep_last=1)
    assert not (tmp_path / "last_prev.pt").exists()
    run_state.write_checkpoints({**state, "step": 2}, tmp_path, epoch_end=False, is_best=False, keep_last=1)
    assert run_state.load_checkpoint(tmp_path / "last.pt")["step"] == 2
    assert run_state.load_checkpoint(tmp_path / "last_prev.pt")["step"] == 1


# --- stop signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_finishes_the_step_writes_last_pt_and_resumes_exactly(sig, image_root, reference, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = torch.nn.CrossEntropyLoss.forward

    def signal_during_step_3(self, logits, targets):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)  # arrives in the middle of step 3
        return forward(self, logits, targets)

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", signal_during_step_3)
    with preemption.StopOnSignal() as stop:
        results = train.train(_cfg(image_root), tmp_path, should_stop=stop)
    assert signal.getsignal(sig) is signal.SIG_DFL  # the handlers are put back
    assert stop.received == sig
    assert results == {"stopped": True, "epoch": 0, "step": 3}  # step 3 was finished, not dropped
    ckpt = run_state.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_batches"]) == (0, 3, 3)
    assert f"{sig.name}: stopping after this step" in (tmp_path / "train.log").read_text()
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", forward)
    _resume_and_compare(image_root, tmp_path, reference)


def test_sigterm_to_the_command_line_run_exits_cleanly_mid_epoch(image_root, reference, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, f"data.root={image_root}", *RUN, EVERY_STEP, f"hydra.run.dir={run_dir}"]
    returncode, stderr = sigterm_after_first_checkpoint(cmd, run_dir, ENV, timeout=60)
    assert returncode == 0, stderr[-2000:]
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 1 <= ckpt["step"] < UPDATES and ckpt["epoch_batches"] == ckpt["step"] and ckpt["epoch"] == 0
    assert "SIGTERM: stopping after this step" in (run_dir / "train.log").read_text()
    assert not (run_dir / "results.json").exists()
    _resume_and_compare(image_root, run_dir, reference)


# --- data order and augmentation do not depend on workers or on where a run restarted


def test_augmentation_depends_on_seed_epoch_and_index_only(image_root):
    cfg = resolved_config("train", [*TINY, f"data.root={image_root}"]).data
    classes = data.check_image_folder(image_root)
    dataset = data.create_image_dataset(cfg, "train", classes, is_training=True, replace_bad=True, seed=7)

    def epoch_batches(workers: int, epoch: int, start_batch: int = 0) -> list[torch.Tensor]:
        cfg.num_workers = workers
        loader = data.create_train_loader(dataset, cfg, 1, 0, seed=7, device=torch.device("cpu"))
        loader.sampler.set_epoch(epoch, start_index=start_batch * cfg.batch_size)
        dataset.set_epoch(epoch)
        return [images for images, _ in loader]

    torch.manual_seed(0)
    in_process = epoch_batches(0, epoch=1)
    torch.manual_seed(1)  # the global RNG does not matter either
    with_workers = epoch_batches(2, epoch=1)
    resumed = epoch_batches(2, epoch=1, start_batch=2)
    for a, b in zip(in_process, with_workers, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(in_process[2:], resumed, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(epoch_batches(0, epoch=2)[0], in_process[0])


# --- CUDA out of memory, SyncBatchNorm


def test_out_of_memory_suggests_a_smaller_batch_with_accumulation(image_root, tmp_path, monkeypatch):
    def out_of_memory(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(RedNet, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as info:
        train.train(_cfg(image_root, "data.batch_size=4", "trainer.grad_accum=3"), tmp_path)
    message = str(info.value)
    assert "data.batch_size=4 per process: set data.batch_size=2 trainer.grad_accum=6" in message
    assert "Tried to allocate 2.00 GiB" in message


def test_sync_bn_needs_cuda(image_root, tmp_path):
    with pytest.raises(ValueError, match=r"trainer.sync_bn=true needs CUDA GPUs .* on cpu: set it to false"):
        train.train(_cfg(image_root, "trainer.sync_bn=true"), tmp_path)


def test_per_rank_rng_states_are_restored_only_for_the_same_world_size():
    states = [{"rank": 0}, {"rank": 1}]
    assert run_state.rank_rng_state(states, rank=1, world_size=2) == {"rank": 1}
    assert run_state.rank_rng_state({"rank": 0}, rank=0, world_size=1) == {"rank": 0}  # one process's state
    assert run_state.rank_rng_state(states, rank=0, world_size=4) is None


def test_lr_scales_with_batch_and_accumulation(image_root, tmp_path):
    overrides = ("optim.lr=1e-3", "optim.lr_base_size=4", "data.batch_size=4", "trainer.grad_accum=2")
    train.train(_cfg(image_root, *overrides), tmp_path, should_stop=lambda: True)
    ckpt = run_state.load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3 * 4 * 2 / 4)
    assert "global batch 8, lr 0.002" in (tmp_path / "train.log").read_text()


BLOCKED_RANK = """
import sys, time
sys.path.insert(0, {repo!r})
import torch.distributed as dist
from rednet import preemption

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
if rank == 1:
    time.sleep(120)  # never joins the barrier
with preemption.StopOnSignal(blocked_exit_s=2):
    print("blocked", flush=True)
    dist.barrier()  # Python's signal handler cannot run in here
"""


def test_sigterm_ends_a_rank_blocked_in_a_collective(tmp_path):
    """Rank 0 waits in a barrier rank 1 never joins: SIGTERM still ends it, 2 s later, instead of never."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = BLOCKED_RANK.format(repo=str(REPO), port=port)
    ranks = [
        subprocess.Popen([sys.executable, "-c", code, str(r)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for r in range(2)
    ]
    try:
        assert ranks[0].stdout.readline() == b"blocked\n"
        time.sleep(0.5)
        ranks[0].send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, stderr = ranks[0].communicate(timeout=30)
        assert time.monotonic() - sent < 15
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    assert ranks[0].returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    assert b"SIGTERM not handled for 2 s (blocked outside Python" in stderr


# --- checkpoint files: new inputs of issue 13 point 6


def _epoch_state(epoch: int) -> dict:
    return {"state_dict": {"w": torch.full((2,), float(epoch))}, "optimizer": {}, "epoch": epoch, "step": epoch,
            "arch": "rednet26"}  # fmt: skip


def test_keep_last_after_resuming_from_an_earlier_epoch_keeps_the_new_epochs(tmp_path):
    """A run resumed from an earlier checkpoint (resume=<run>/checkpoints/best.pt of epoch 3, same directory) finds
    epochs 9-10 of its first course: newer by number, older by time. Its own new epoch files must not be the ones
    rotated out (epoch 4 was deleted as soon as it was written); the first course's files are left alone."""
    for epoch in range(1, 11):
        run_state.write_checkpoints(_epoch_state(epoch), tmp_path, epoch_end=True, is_best=False, keep_last=2)
    for epoch in (4, 5, 6):  # the second course, from epoch 3 on
        run_state.write_checkpoints(_epoch_state(epoch), tmp_path, epoch_end=True, is_best=False, keep_last=2)
        assert run_state.load_checkpoint(tmp_path / f"epoch_{epoch:04d}.pt")["epoch"] == epoch
    kept = [p.name for p in run_state.epoch_files(tmp_path)]
    assert kept == ["epoch_0005.pt", "epoch_0006.pt", "epoch_0009.pt", "epoch_0010.pt"]


def test_a_checkpoint_that_cannot_be_pickled_leaves_no_temp_file(tmp_path):
    """torch.save failing on an object it cannot pickle (not an OSError): the error as it is, no .tmp left."""
    import threading

    with pytest.raises(TypeError, match="pickle"):
        run_state.save_checkpoint({"lock": threading.Lock()}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_best_pt_copy_names_the_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """On a file system without hard links best.pt is a copy; the disk filling up during that copy names best.pt
    and the cause (last.pt is written already and stays)."""
    import errno

    run_state.write_checkpoints(_epoch_state(1), tmp_path, epoch_end=True, is_best=True, keep_last=0)

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    copy = shutil.copyfile

    def full_disk(src, dst):  # the disk fills up during the copy to best.pt
        if "best" not in os.path.basename(dst):
            return copy(src, dst)
        open(dst, "wb").write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"could not write checkpoint '\S+/best.pt': the disk is full"):
        run_state.write_checkpoints(_epoch_state(2), tmp_path, epoch_end=False, is_best=True, keep_last=0)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "last_prev.pt"]
    assert run_state.load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert run_state.load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


def test_ctrl_c_says_in_the_log_why_the_run_stopped(image_root, tmp_path, monkeypatch):
    """A single process stopped by Ctrl-C: train.log says so and what is kept (it ended without a word)."""
    from rednet import distributed, engine

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "evaluate", interrupt)  # after the first epoch's training and its checkpoints
    with pytest.raises(KeyboardInterrupt), distributed.end_job_on_error():
        train.train(_cfg(image_root, "trainer.ckpt_every_steps=3"), tmp_path)
    log = (tmp_path / "train.log").read_text()
    assert "interrupted (SIGINT, Ctrl-C) on rank 0: the run stops here; the checkpoints written so far are kept" in log
    assert run_state.load_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == UPDATES


SIGTERM_DURING_REPORT = """
import logging, os, runpy, signal, sys, time
sys.path.insert(0, {repo!r})
os.environ.update(WORLD_SIZE="2", RANK="0")
sys.argv = [{train!r}, "hydra.run.dir={run_dir}"]
from rednet import distributed, monitor

def lost_peer(*args, **kwargs):
    raise RuntimeError("Connection closed by peer (injected)")

class SigtermWhileReporting(logging.Handler):  # (runs before the console handler prints the report)
    def emit(self, record):
        if "failed" in record.getMessage():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

distributed.init_distributed = lost_peer  # (the first step of train(): the process group is not needed)
monitor.setup_logging(None)  # as train() sets it up: the console
logging.getLogger("rednet").handlers.insert(0, SigtermWhileReporting())
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["train.py", "eval.py"])
def test_sigterm_while_a_failing_rank_reports_does_not_lose_the_report(tmp_path, script):
    """A rank whose collective failed because a peer died reports the error, then exits 1, even when torchrun's
    SIGTERM (sent as soon as it sees the dead peer) arrives during the report: it killed the rank mid-report (exit
    -15, no error line): train.main restored the default SIGTERM action before reporting (CI, a flaky
    test_failure_at_other_points_ends_the_job[sigkill]); eval.py never had another."""
    code = SIGTERM_DURING_REPORT.format(repo=str(REPO), train=str(REPO / script), run_dir=tmp_path / "run")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "rank 0 of 2 failed: RuntimeError: Connection closed by peer (injected)" in done.stderr
