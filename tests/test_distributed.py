"""Several processes on the CPU (gloo): the real train.py under torchrun (multi-node rendezvous, and --standalone
stopped by SIGTERM) and under hydra-submitit-launcher's local executor (the SLURM code path: ranks from submitit's
environment, preempted by SIGUSR1, requeued, resumed exactly); the SLURM launcher config; SyncBatchNorm conversion."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import convert_sync_batchnorm
from train_utils import REPO, TINY, compose_config, make_image_folder, sigterm_after_first_checkpoint

import eval as eval_script
import rednet
from rednet import distributed, run_state

# Two epochs of 3 updates: 24 training images, 2 ranks x batch 4; 9 validation images (an odd count: a padding
# sampler would count one twice); lr given for global batch 4, so the 2 ranks must double it.
RUN = [*TINY, "trainer.epochs=2", "optim.lr_base_size=4", "trainer.ckpt_every_steps=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images"), n_val=3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torchrun(image_root, tmp_path_factory):
    """train.py under torchrun, 2 gloo processes as 2 "nodes" meeting through torchrun's c10d rendezvous (the
    multi-node command); every rank names its own Hydra run directory (microseconds in the name)."""
    base = tmp_path_factory.mktemp("torchrun")
    probes = base / "probes"
    probes.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d"]
    cmd += [f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=test", "tests/ddp_probe.py", str(probes)]
    cmd += [*RUN, f"data.root={image_root}", f"hydra.run.dir={base}/outputs/${{now:%H-%M-%S-%f}}"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=ENV, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=240)
        assert node.returncode == 0, stderr[-3000:]
    run_dirs = sorted((base / "outputs").iterdir())
    ranks = [torch.load(probes / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return run_dirs, ranks


def test_torchrun_one_run_directory_and_one_set_of_checkpoints(torchrun):
    run_dirs, _ = torchrun
    assert len(run_dirs) == 1  # rank 1's own Hydra directory was given up for rank 0's
    run_dir = run_dirs[0]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt", "last_prev.pt",
    ]  # fmt: skip
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # TensorBoard from rank 0 only
    log = (run_dir / "train.log").read_text()
    assert log.count("epoch 2/2 | train loss") == 1  # rank 1 does not log
    assert "global batch 8, lr 0.002, 3 updates/epoch, cpu x2" in log


def test_torchrun_ranks_read_different_shards_and_end_with_the_same_weights(torchrun):
    run_dirs, ranks = torchrun
    # two "nodes" of one process each: global ranks 0 and 1, both local rank 0
    assert [r["env"] for r in ranks] == [{"RANK": str(i), "LOCAL_RANK": "0", "WORLD_SIZE": "2"} for i in range(2)]
    for epoch in range(2):
        shards = [set(r["images"][12 * epoch : 12 * (epoch + 1)]) for r in ranks]
        assert len(shards[0]) == len(shards[1]) == 12
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 24
    assert len(ranks[0]["images"]) == len(ranks[1]["images"]) == 24  # nothing read beyond the epochs
    assert ranks[0]["rng_digest"] != ranks[1]["rng_digest"]  # per-rank seeds
    saved = run_state.load_checkpoint(run_dirs[0] / "checkpoints" / "last.pt")["state_dict"]
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys() == saved.keys()
    for key, value in saved.items():  # parameters and BatchNorm statistics
        assert torch.equal(ranks[0]["state"][key], value), key
        assert torch.equal(ranks[1]["state"][key], value), key


def test_torchrun_lr_is_scaled_to_the_global_batch(torchrun):
    run_dirs, _ = torchrun
    ckpt = run_state.load_checkpoint(run_dirs[0] / "checkpoints" / "last.pt")
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(1e-3 * 8 / 4)


def test_torchrun_logged_top1_equals_single_process_eval(torchrun, image_root, tmp_path):
    run_dirs, _ = torchrun
    results = json.loads((run_dirs[0] / "results.json").read_text())
    assert results["count"] == 9  # every validation image once over both ranks
    acc = EventAccumulator(str(run_dirs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    logged_top1 = acc.Scalars("val/top1")[-1].value
    assert logged_top1 == pytest.approx(results["top1"], abs=1e-4)
    overrides = ["data=small", "data.img_size=32", "data.batch_size=5", "data.num_workers=0", "trainer.device=cpu"]
    overrides += [f"data.root={image_root}", f"checkpoint={run_dirs[0] / 'checkpoints' / 'last.pt'}"]
    single = eval_script.evaluate_checkpoint(compose_config("eval", overrides), tmp_path)
    assert single["count"] == 9
    assert single["top1"] == pytest.approx(logged_top1, abs=1e-4)
    assert single["loss"] == pytest.approx(results["loss"], rel=1e-4)


def test_sigterm_to_torchrun_stops_both_ranks_at_the_same_step(image_root, tmp_path):
    """torchrun passes SIGTERM on to its workers: they finish the step, rank 0 writes last.pt with both RNG states."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "train.py", *RUN]
    cmd += [f"data.root={image_root}", f"hydra.run.dir={run_dir}"]
    _, stderr = sigterm_after_first_checkpoint(cmd, run_dir, ENV, timeout=120)
    assert "got signal: 15" in stderr  # torchrun's own exit (status 1) after its workers ended
    log = (run_dir / "train.log").read_text()
    assert "SIGTERM: stopping after this step" in log and "stopped in epoch 1" in log
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 1 <= ckpt["step"] < 3 and ckpt["epoch_batches"] == ckpt["step"]  # in the middle of the first epoch
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert not (run_dir / "results.json").exists()


def test_ranks_come_from_slurm_under_submitit(monkeypatch):
    """A task of a 2-node x 8-GPU SLURM job started by submitit: torchrun's variables from SLURM's, before init."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "11", "SLURM_NTASKS": "16"}
    slurm |= {"SLURM_LOCALID": "3", "SLURM_NODEID": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    torchrun_names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in torchrun_names} | slurm
    monkeypatch.setattr(os, "environ", env)  # a copy: what the export writes goes away with it
    distributed.export_submitit_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("11", "16", "3")
    assert env["MASTER_ADDR"] == "gpu07" and 20000 <= int(env["MASTER_PORT"]) <= 60000
    port = env.pop("MASTER_PORT")
    del env["RANK"]
    distributed.export_submitit_env()
    assert env["MASTER_PORT"] == port  # every task of the job derives the same port from the job id


def test_sync_bn_converts_every_batchnorm_and_keeps_the_checkpoint_keys():
    """trainer.sync_bn (GPU only) goes through timm's converter: nothing of RedNet's may stay a plain BatchNorm."""
    model = rednet.create_model("rednet26", num_classes=3)
    keys = list(model.state_dict())
    synced = convert_sync_batchnorm(model)
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 20 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert list(synced.state_dict()) == keys


def _submitit_tasks(folder: Path) -> dict[int, int]:
    """Global rank -> process id of the submitit tasks running jobs of `folder` (their command line names it)."""
    tasks = {}
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(v.split(b"=", 1) for v in (proc / "environ").read_bytes().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if proc.name.isdigit() and b"submitit.core._submit" in args and any(str(folder).encode() in a for a in args):
            tasks[int(env[b"SUBMITIT_LOCAL_GLOBALID"])] = int(proc.name)
    return tasks


@pytest.fixture(scope="module")
def submitit_preempted(image_root, tmp_path_factory):
    """The same run through `-m hydra/launcher=submitit_local` with 2 tasks; SIGUSR1 to rank 1 alone after step 1.

    (SLURM signals every task; one rank alone is the harder case: rank 0 must stop at the same step and requeue.)
    """
    sweep = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.gpus_per_node=0"]
    cmd += ["hydra.launcher.tasks_per_node=2", *RUN, f"data.root={image_root}", "resume=auto"]
    cmd += [f"hydra.sweep.dir={sweep}"]
    last = sweep / "0" / "checkpoints" / "last.pt"
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        tasks = _submitit_tasks(sweep)
        assert sorted(tasks) == [0, 1], (tasks, proc.poll())
        os.kill(tasks[1], signal.SIGUSR1)
        output, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    return sweep, proc.returncode, output


def test_submitit_preemption_requeues_and_resumes_exactly(submitit_preempted, torchrun):
    sweep, returncode, output = submitit_preempted
    assert returncode == 0, output[-3000:]
    run_dir = sweep / "0"
    log = (run_dir / "train.log").read_text()
    assert "cpu x2" in log and "SIGUSR1: stopping after this step" in log  # rank 0 logs rank 1's signal
    assert "stopped in epoch" in log and "resumed from" in log and log.count("epoch 2/2 | train loss") == 1
    task_logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_0_log.out"))
    assert "Requeued job" in task_logs  # submitit's protocol: rank 0 asked for the requeue (exit code 144)
    final = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (final["epoch"], final["step"]) == (2, 6)
    # Interrupted and requeued, the 2-process run ends with the weights of the uninterrupted torchrun one.
    expected = run_state.load_checkpoint(torchrun[0][0] / "checkpoints" / "last.pt")["state_dict"]
    for key, value in expected.items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore schema")
def test_slurm_launcher_config_makes_one_task_per_gpu_and_a_requeue_signal(tmp_path, monkeypatch):
    """The plugin's launcher, given our config, asks SLURM for one task per GPU and a signal before the time limit."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    overrides = ["hydra/launcher=submitit_slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4"]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("train", [*overrides, f"hydra.sweep.dir={tmp_path}"], return_hydra_config=True)
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were installed
    executors = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: executors.append(self) or [])
    launcher.launch([["seed=1"]], initial_job_idx=0)  # builds the executor like a real submission, submits nothing
    sbatch = executors[0]._executor._make_submission_file_text("python -m submitit.core._submit x", "uid")
    for option in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--signal=USR2@180", "--time=4320"):
        assert f"#SBATCH {option}\n" in sbatch
    assert executors[0]._executor.max_num_timeout == 20


# --- one failing rank ends the whole job: the error and its rank printed, a non-zero exit, the checkpoints kept

FAIL_LIMIT_S = 60  # from the failure to the end of every process (torchrun waits for all of its workers)


# Checkpoints at epoch ends only and losses checked every 50 steps: an error in the middle of an epoch meets
# unchecked losses (whose check is a collective) and no checkpoint write in progress.
EPOCH_END_RUN = [*(a for a in RUN if not a.startswith(("trainer.log_interval", "trainer.ckpt_every"))), "seed=1"]


def _torchrun_failing(
    image_root: Path, run_dir: Path, probe_fail: str = "", on_first_checkpoint=None, run: list[str] = RUN
) -> tuple[int, str, float]:
    """train.py under torchrun --standalone, 2 gloo processes; returns (exit status, output, seconds from the failure
    to the end). `on_first_checkpoint(torchrun_pid)` runs once last.pt exists and returns the failure time; else the
    probe's PROBE_FAIL=KIND:RANK:N injects it and reports the time."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "tests/ddp_probe.py"]
    cmd += [str(run_dir.parent), *run, f"data.root={image_root}", f"hydra.run.dir={run_dir}"]
    env = {**ENV, "PROBE_FAIL": probe_fail}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    failed_at = None
    try:
        if on_first_checkpoint is not None:
            deadline = time.monotonic() + 120
            while not (run_dir / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            failed_at = on_first_checkpoint(proc.pid)
        output, _ = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(ProcessLookupError):  # torchrun and its workers, should they hang (the failure here)
            os.killpg(proc.pid, signal.SIGKILL)
    ended = time.time()
    if failed_at is None:
        failed_at = float(re.search(r"PROBE injected \w+ at ([\d.]+)", output).group(1))
    return proc.returncode, output, ended - failed_at


def _assert_job_failed(returncode: int, output: str, elapsed: float, error: str, rank: str = r"\d") -> re.Match:
    assert returncode != 0, output[-3000:]
    assert elapsed < FAIL_LIMIT_S, output[-3000:]
    found = re.search(rf"rank ({rank}) of 2 failed: {error}", output)
    assert found, output[-5000:]
    return found


@pytest.fixture()
def fresh_images(tmp_path):
    return make_image_folder(tmp_path / "images", n_val=3)


def test_unreadable_training_image_on_one_rank_ends_the_job(fresh_images, tmp_path):
    """An image that becomes unreadable after the first epoch (garbage bytes): read by one rank in the middle of
    the second epoch, it ends both, naming the file (this hung: the failing rank entered a collective)."""
    bad = fresh_images / "train" / "cat" / "3.png"

    def damage(torchrun_pid: int) -> float:
        bad.write_bytes(b"not a png" * 50)
        return time.time()

    run_dir = tmp_path / "run"
    returncode, output, elapsed = _torchrun_failing(
        fresh_images, run_dir, on_first_checkpoint=damage, run=EPOCH_END_RUN
    )
    _assert_job_failed(returncode, output, elapsed, rf"BadImageError: cannot read image '{re.escape(str(bad))}'")
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 3)  # the first epoch is kept


def test_unreadable_validation_image_ends_the_job(fresh_images, tmp_path):
    bad = fresh_images / "val" / "dog" / "img3.png"
    # Cut short: its header reads, its pixels do not (a file of no image at all is refused before training starts).
    bad.write_bytes((fresh_images / "val" / "dog" / "0.png").read_bytes()[:60])
    run_dir = tmp_path / "run"
    started = time.time()
    returncode, output, elapsed = _torchrun_failing(fresh_images, run_dir, on_first_checkpoint=lambda pid: started)
    # val/ in order: cat 0-2, dog 0-2, dog/img3 is the 7th image (index 6), rank 6 % 2 = 0's shard
    _assert_job_failed(returncode, output, elapsed, rf"BadImageError: cannot read image '{re.escape(str(bad))}'", "0")
    ckpt = run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (0, 3)  # the first epoch's training, saved step by step, is kept


@pytest.mark.parametrize(
    "probe_fail, error, rank, step",
    [
        ("forward:1:2", "RuntimeError: injected failure in forward on rank 1", "1", 1),
        ("nan:1:2", r"NonFiniteLossError: training loss is nan at step 2", "[01]", 1),  # one rank's NaN stops both
        (
            "save:0:3",
            r"CheckpointError: could not write checkpoint '\S+/last.pt': the disk is full "
            r"\(OSError: \[Errno 28\] No space left on device \(injected\)\)",
            "0",
            2,
        ),
    ],
    ids=["exception-in-forward-on-rank-1", "nan-loss-on-rank-1", "checkpoint-write-fails-on-rank-0"],
)
def test_failure_on_one_rank_ends_the_job(image_root, tmp_path, probe_fail, error, rank, step):
    run_dir = tmp_path / "run"
    returncode, output, elapsed = _torchrun_failing(image_root, run_dir, probe_fail)
    _assert_job_failed(returncode, output, elapsed, error, rank)
    assert run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == step  # the last good save


# More injection points (issue 9 kind 1): each ends both ranks within the limit, names the error and its rank, exits
# non-zero and keeps the checkpoints written before (`step`: the last one; None: none was written yet). The probe's
# "build" and "precise_bn" points behave as "data-root" does, "val" (an exception in validation on rank 1) as
# test_unreadable_validation_image_ends_the_job, "ema" (in the EMA update) as an exception in forward: tried, not kept
# (suite time).
@pytest.mark.parametrize(
    "probe_fail, overrides, error, rank, step",
    [
        (  # the 13th image a rank-1 loader worker reads: the first of epoch 2
            "worker:1:13",
            ["data.num_workers=1"],
            r"RuntimeError: Caught RuntimeError in DataLoader worker process 0.\n(.*\n)*"
            r"RuntimeError: injected failure in a loader worker on rank 1",
            "1",
            3,
        ),
        ("data:1:1", [], "FileNotFoundError: injected: data.root missing on rank 1", "1", None),
        (  # after the last epoch's training, evaluation and checkpoint: results.json cannot be written
            "results:0:1",
            [],
            r"OSError: \[Errno 28\] No space left on device \(injected\)",
            "0",
            6,
        ),
        ("kill:1:2", [], r"RuntimeError: \S+ (Connection closed by peer|Read error)", "0", 1),  # rank 1: SIGKILL
    ],
    ids=["loader-worker", "data-root", "results", "sigkill"],
)
def test_failure_at_other_points_ends_the_job(image_root, tmp_path, probe_fail, overrides, error, rank, step):
    run_dir = tmp_path / "run"
    returncode, output, elapsed = _torchrun_failing(image_root, run_dir, probe_fail, run=[*RUN, *overrides])
    _assert_job_failed(returncode, output, elapsed, error, rank)
    last = run_dir / "checkpoints" / "last.pt"
    assert (run_state.load_checkpoint(last)["step"] if last.exists() else None) == step
    assert not (run_dir / "results.json").exists()
    if probe_fail.startswith("kill"):
        assert "exitcode  : -9" in output and "(SIGKILL)" in output  # torchrun's summary names the killed rank


def test_torn_last_pt_seen_by_one_rank_ends_the_job(torchrun, image_root, tmp_path):
    """resume=auto where rank 1 cannot read last.pt (rank 0 can): rank 1 does not continue from another checkpoint
    than rank 0 (it would fall back to last_prev.pt); it stops the job, and the checkpoints stay as they were."""
    run_dir = tmp_path / "run"
    shutil.copytree(torchrun[0][0], run_dir)
    overrides = [*RUN, "trainer.epochs=3", "resume=auto"]
    returncode, output, elapsed = _torchrun_failing(image_root, run_dir, "resume:1:1", run=overrides)
    _assert_job_failed(returncode, output, elapsed, "CheckpointError: injected: torn last.pt on rank 1", "1")
    assert run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6


def test_ctrl_c_ends_the_job_and_keeps_the_checkpoints(image_root, tmp_path):
    """Ctrl-C in a terminal: SIGINT to torchrun and both ranks (the foreground process group) at once."""
    run_dir = tmp_path / "run"

    def ctrl_c(torchrun_pid: int) -> float:
        os.killpg(torchrun_pid, signal.SIGINT)  # (torchrun leads a process group of its own here)
        return time.time()

    returncode, output, elapsed = _torchrun_failing(image_root, run_dir, on_first_checkpoint=ctrl_c)
    assert returncode != 0 and elapsed < FAIL_LIMIT_S, output[-3000:]
    assert "KeyboardInterrupt" in output and "got signal: 2" in output
    assert run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] >= 1


def test_a_restart_continues_only_its_own_torchruns_directory(tmp_path, monkeypatch):
    """Matched by rendezvous id and elastic agent, not by the batch job: two torchruns of one sbatch job (the same
    SLURM_JOB_ID, often the same --rdzv-id too) must not continue each other's runs."""
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "812")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    first = tmp_path / "runs" / "a"
    distributed.claim_run_dir(first)
    assert distributed.read_claim(first).job == "812"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.earlier_attempt_dir(tmp_path / "runs" / "b") == first  # the same torchrun, restarted
    monkeypatch.setattr(os, "getppid", lambda: 1)  # another torchrun (agent) of the same batch job and rendezvous id
    assert distributed.earlier_attempt_dir(tmp_path / "runs" / "b") is None
    monkeypatch.undo()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another")
    assert distributed.earlier_attempt_dir(tmp_path / "runs" / "b") is None


def test_a_restart_past_midnight_finds_the_first_attempts_directory(tmp_path, monkeypatch):
    """Hydra's default <date>/<time> directory: a restart after midnight looks in the other date folders too; a
    claim of another job is not this run's; outside a restart there is no earlier attempt."""
    for name in ("SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    first, other, own = (tmp_path / p for p in ("2026-11-29/23-59-59", "2026-11-29/23-59-58", "2026-11-30/00-00-03"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "other-job")
    distributed.claim_run_dir(other)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "6f1c")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    distributed.claim_run_dir(first)
    assert distributed.earlier_attempt_dir(own) is None
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert distributed.earlier_attempt_dir(own) == first
    assert distributed.earlier_attempt_dir(tmp_path / "runs" / "fixed") is None  # not a date folder: not looked for
