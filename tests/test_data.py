"""Image-folder checks, unreadable images, samplers, loaders and the digits demo data set."""

from __future__ import annotations

import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import REPO, TINY, compose_config, make_image_folder, resolved_config

from rednet import data, engine, monitor, run_state


def _data_cfg(root: Path, *overrides: str):
    return resolved_config("train", [f"data.root={root}", "data=small", "data.batch_size=4", *overrides]).data


def _corrupt(path: Path) -> None:
    """Cut a PNG in half: the header still opens, decoding fails."""
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def test_check_image_folder_returns_sorted_classes(tmp_path):
    root = make_image_folder(tmp_path, classes=("b", "a", "c"))
    assert data.check_image_folder(root) == ["a", "b", "c"]


def test_missing_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root '.*nowhere' does not exist"):
        data.check_image_folder(tmp_path / "nowhere")


def test_root_without_split_folder(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="has no 'val' folder"):
        data.check_image_folder(tmp_path)


def test_split_without_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "d")
    shutil.rmtree(root / "train")
    (root / "train").mkdir()
    (root / "train" / "loose.png").write_bytes(b"")
    with pytest.raises(ValueError, match="no class folders under train/"):
        data.check_image_folder(root)


def test_empty_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path)
    (root / "val" / "empty_one").mkdir()
    with pytest.raises(ValueError, match="empty_one"):
        data.check_image_folder(root)


def test_images_in_a_class_subfolder_belong_to_the_class_folder(tmp_path, caplog):
    """Tiny-ImageNet's train/<class>/images/ layout: torchvision's rule (the class folder's label), not timm's (the
    subfolder's name, which is no class)."""
    root = make_image_folder(tmp_path, n_train=4, n_val=1, size=8)
    nested = root / "train" / "fox" / "images"
    nested.mkdir()
    for image in sorted((root / "train" / "fox").glob("*.png"))[:2]:
        image.rename(nested / image.name)
    (nested / "deeper").mkdir()
    shutil.copy(root / "train" / "cat" / "0.png", nested / "deeper" / "x.png")
    (root / "train" / "fox" / "fox_boxes.txt").write_text("0.png 0 0 8 8")
    (root / "train" / "fox" / ".cache").mkdir()
    shutil.copy(root / "train" / "cat" / "0.png", root / "train" / "fox" / ".cache" / "thumb.png")
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    assert classes == ["cat", "dog", "fox"]
    assert "train/: 3 images of 13 are in subfolders of their class folder (e.g. fox/images/0.png)" in caplog.text
    assert "2 files left out" in caplog.text and ".txt 1" in caplog.text and "in hidden folders 1" in caplog.text
    train = data.create_image_dataset(_data_cfg(root), "train", classes, is_training=False, replace_bad=False)
    fox = sorted(Path(p).relative_to(root / "train" / "fox").as_posix() for p, t in train.samples if t == 2)
    assert fox == ["2.png", "3.png", "images/0.png", "images/1.png", "images/deeper/x.png"]
    assert len(train) == 13


def test_val_classes_that_differ_from_train(tmp_path):
    root = make_image_folder(tmp_path)
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(ValueError, match=r"only in train/: \['fox'\], only in val/: \['wolf'\]"):
        data.check_image_folder(root)


def test_datasets_share_class_indices(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    cfg = _data_cfg(root)
    classes = data.check_image_folder(root)
    train = data.create_image_dataset(cfg, "train", classes, is_training=True, replace_bad=True)
    val = data.create_image_dataset(cfg, "val", classes, is_training=False, replace_bad=False)
    for ds in (train, val):
        for path, target in ds.samples:
            assert Path(path).parent.name == classes[target]
    image, target = val[0]
    assert image.shape == (3, 32, 32)


def test_unreadable_image_error_names_the_file(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=2)
    bad = root / "val" / "dog" / "1.png"
    _corrupt(bad)
    cfg = _data_cfg(root, "data.num_workers=0")
    val = data.create_image_dataset(cfg, "val", data.check_image_folder(root), is_training=False, replace_bad=False)
    loader = data.create_eval_loader(val, cfg, world_size=1, rank=0, device=torch.device("cpu"))
    with pytest.raises(data.BadImageError, match=rf"cannot read image '{bad}'.*data.skip_bad_images=true"):
        list(loader)


def test_skip_bad_images_skips_and_counts(tmp_path):
    root = make_image_folder(tmp_path, n_train=4, n_val=2)
    _corrupt(root / "val" / "dog" / "1.png")
    _corrupt(root / "train" / "cat" / "2.png")
    cfg = _data_cfg(root, "data.skip_bad_images=true")
    classes = data.check_image_folder(root)
    val = data.create_image_dataset(cfg, "val", classes, is_training=False, replace_bad=False)
    seen = sum(len(b[1]) for b in data.create_eval_loader(val, cfg, 1, 0, torch.device("cpu")) if b is not None)
    assert seen == len(val) - 1  # dropped, not replaced: nothing is counted twice
    assert val.take_bad_count() == 1 and val.take_bad_count() == 0
    train = data.create_image_dataset(cfg, "train", classes, is_training=True, replace_bad=True)
    batches = list(data.create_train_loader(train, cfg, 1, 0, seed=0, device=torch.device("cpu")))
    assert all(len(b[1]) == 4 for b in batches)  # replaced: full batches for BatchNorm and mixup
    assert train.take_bad_count() == 1


def test_resumable_sampler_skips_into_the_same_permutation():
    dataset = list(range(23))
    sampler = data.ResumableSampler(dataset, num_replicas=1, rank=0, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == dataset
    sampler.set_epoch(2, start_index=8)
    assert list(sampler) == full[8:] and len(sampler) == 15
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_train_shards_differ_across_ranks():
    dataset = list(range(20))
    shards = []
    for rank in range(2):
        sampler = data.ResumableSampler(dataset, num_replicas=2, rank=rank, seed=0)
        sampler.set_epoch(0)
        shards.append(set(sampler))
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(dataset)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_every_image_exactly_once(world_size):
    dataset = list(range(11))
    indices = [i for rank in range(world_size) for i in data.ShardSampler(dataset, world_size, rank)]
    assert sorted(indices) == dataset


def test_batch_size_larger_than_the_data(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1)
    cfg = _data_cfg(root, "data.batch_size=16")
    train = data.create_image_dataset(cfg, "train", data.check_image_folder(root), is_training=True, replace_bad=True)
    with pytest.raises(ValueError, match="data.batch_size=16 is larger than the 3 training images"):
        data.create_train_loader(train, cfg, 1, 0, seed=0, device=torch.device("cpu"))


def test_mixup_is_built_only_when_asked():
    cfg = compose_config("train", ["data.root=/d"]).data
    assert data.create_mixup(cfg, 0.1, 10) is None
    cfg = compose_config("train", ["data.root=/d", "data.mixup=0.2", "data.cutmix=1.0"]).data
    assert data.create_mixup(cfg, 0.1, 10).mixup_alpha == 0.2


def test_demo_dataset_is_a_stratified_image_folder(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_dataset", REPO / "scripts" / "make_demo_dataset.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    counts = module.make_digits_folder(tmp_path, size=16, val_fraction=0.2)
    assert counts == {"train": 1437, "val": 360}
    assert data.check_image_folder(tmp_path) == [str(d) for d in range(10)]
    for digit in range(10):
        n_train = len(list((tmp_path / "train" / str(digit)).glob("*.png")))
        n_val = len(list((tmp_path / "val" / str(digit)).glob("*.png")))
        assert abs(n_val / (n_train + n_val) - 0.2) < 0.02  # every class split 80/20
    from PIL import Image

    with Image.open(next((tmp_path / "val" / "3").glob("*.png"))) as img:
        assert img.size == (16, 16) and img.mode == "RGB"


def test_prepare_imagenet_sorts_val_into_class_folders(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_imagenet", REPO / "scripts" / "prepare_imagenet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    val = tmp_path / "val"
    val.mkdir()
    for i in (1, 2, 3):
        (val / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"jpeg")
    csv_file = tmp_path / "LOC_val_solution.csv"
    csv_file.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01751748 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n09193705 5 6 7 8 n09193705 1 1 2 2\n"
        "ILSVRC2012_val_00000003,n01751748 1 2 3 4\n"
    )
    labels = module.labels_from_loc_csv(csv_file)
    assert module.sort_into_class_folders(val, labels) == 3
    assert sorted(p.relative_to(val).as_posix() for p in val.rglob("*.JPEG")) == [
        "n01751748/ILSVRC2012_val_00000001.JPEG",
        "n01751748/ILSVRC2012_val_00000003.JPEG",
        "n09193705/ILSVRC2012_val_00000002.JPEG",
    ]
    assert module.sort_into_class_folders(val, labels) == 0  # a second run has nothing left to move
    (val / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"jpeg")
    with pytest.raises(ValueError, match="1 images in .* have no label"):
        module.sort_into_class_folders(val, labels)


# --- which files are read: every format Pillow decodes, the rest reported


MIXED_EXTENSIONS = (".png", ".JPG", ".webp", ".bmp", ".tif", ".TIFF")


def _mixed_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    """Class folders whose images cycle through MIXED_EXTENSIONS, each file a valid image of its format."""
    for split, n in (("train", per_class), ("val", 2)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.full((8, 8, 3), 60 + 120 * c, np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}{MIXED_EXTENSIONS[i % len(MIXED_EXTENSIONS)]}")
    return root


def test_every_pillow_format_in_any_case_is_used(tmp_path):
    root = _mixed_folder(tmp_path)
    cfg = _data_cfg(root, "data.img_size=8")
    classes = data.check_image_folder(root)
    train = data.create_image_dataset(cfg, "train", classes, is_training=False, replace_bad=False)
    assert len(train) == 24  # 12 per class, 2 of each extension
    assert sorted({Path(p).suffix for p, _ in train.samples}) == sorted(MIXED_EXTENSIONS)
    for i in range(len(train)):
        image, target = train[i]
        assert image.shape == (3, 8, 8) and Path(train.samples[i][0]).parent.name == classes[target]


def test_a_class_of_webp_only_is_read(tmp_path):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    for image in (root / "train" / "fox").iterdir():
        Image.open(image).save(image.with_suffix(".webp"))
        image.unlink()
    classes = data.check_image_folder(root)
    train = data.create_image_dataset(_data_cfg(root), "train", classes, is_training=False, replace_bad=False)
    assert sum(classes[t] == "fox" for _, t in train.samples) == 2


def test_files_left_out_are_logged_by_kind(tmp_path, caplog):
    root = _mixed_folder(tmp_path)
    cat = root / "train" / "cat"
    (cat / "notes.txt").write_text("x")
    (cat / "labels.TXT").write_text("x")
    (cat / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (cat / "._0.png").write_bytes(b"\0\5\26\7")  # macOS AppleDouble: not an image, whatever its name
    (cat / "README").write_text("x")
    (root / "train" / "dog" / "extra").mkdir()
    (root / "train" / "dog" / "extra" / "meta.json").write_text("{}")
    (root / "train" / "loose.png").write_bytes(b"")  # in no class folder
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("train/"))
    assert "train/: 24 images used, 7 files left out" in line
    for count in (".txt 2", "macOS metadata 2", "no extension 1", ".json 1", "outside class folders 1"):
        assert count in line
    assert not any(r.getMessage().startswith("val/") and "left out" in r.getMessage() for r in caplog.records)
    train = data.create_image_dataset(_data_cfg(root), "train", classes, is_training=False, replace_bad=False)
    assert len(train) == 24  # the dataset takes exactly the files counted as images: not ._0.png


def test_a_class_without_readable_images_lists_its_files(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1)
    for image in (root / "train" / "fox").iterdir():
        image.unlink()
    (root / "train" / "fox" / "scan.heic").write_bytes(b"heic")
    (root / "train" / "fox" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"'.*train/fox' holds no image this Pillow can read \(notes.txt, scan.heic\)"):
        data.check_image_folder(root)


def test_image_extensions_cover_pillows_common_formats():
    assert {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm"} <= data.image_extensions()
    assert not {".txt", ".h5", ".mpg", ".pdf"} & data.image_extensions()  # not images, or not decodable by Pillow


# --- results do not depend on the worker count (per-sample augmentation has generators of its own)

# Mixup/cutmix draw from NumPy's global generator and drop-path from torch's: the ones the per-sample augmentation
# seeding would reseed in the main process with num_workers=0.
STOCHASTIC = ("trainer.epochs=1", "data.mixup=0.4", "data.cutmix=1.0", "model.drop_path_rate=0.2", "data.hflip=0.5")


def _train_final_weights(image_root: Path, run_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    import train

    train.train(compose_config("train", [*TINY, f"data.root={image_root}", *STOCHASTIC, *overrides]), run_dir)
    return run_state.load_checkpoint(run_dir / "checkpoints" / "last.pt")["state_dict"]


@pytest.fixture(scope="module")
def no_workers_run(tmp_path_factory, single_thread):
    image_root = make_image_folder(tmp_path_factory.mktemp("images"))
    return image_root, _train_final_weights(image_root, tmp_path_factory.mktemp("run"), "data.num_workers=0")


@pytest.mark.usefixtures("single_thread")
def test_weights_do_not_depend_on_the_worker_count(no_workers_run, tmp_path):
    image_root, expected = no_workers_run
    assert data.capped_workers(2) > 0  # the run below really loads in worker processes
    with_workers = _train_final_weights(image_root, tmp_path, "data.num_workers=2")
    for key, value in expected.items():
        assert torch.equal(with_workers[key], value), key


@pytest.mark.usefixtures("single_thread")
def test_resuming_with_another_worker_count_ends_as_the_uninterrupted_run(no_workers_run, tmp_path):
    import train

    image_root, expected = no_workers_run
    cfg = compose_config("train", [*TINY, f"data.root={image_root}", *STOCHASTIC, "data.num_workers=2"])
    steps = iter(range(100))
    stopped = train.train(cfg, tmp_path, should_stop=lambda: next(steps) == 2)  # last.pt after step 3 of 6
    assert stopped == {"stopped": True, "epoch": 0, "step": 3}
    resumed = _train_final_weights(image_root, tmp_path, "data.num_workers=0", "resume=auto")
    for key, value in expected.items():
        assert torch.equal(resumed[key], value), key


# --- worker counts and progress output fit the machine and the output


@pytest.mark.parametrize(
    ("requested", "cpus", "env", "expected"),
    [
        (8, 2, {}, 2),  # the default 8 workers on a 2-core machine
        (1, 2, {}, 1),
        (0, 1, {}, 0),
        (8, 16, {"LOCAL_WORLD_SIZE": "4"}, 4),  # torchrun: 4 processes share the 16 CPUs
        (8, 2, {"LOCAL_WORLD_SIZE": "4"}, 1),  # at least one each
        (8, 64, {"SLURM_CPUS_PER_TASK": "6"}, 6),  # a SLURM task is bound to its own CPUs
        (8, 64, {"SLURM_CPUS_PER_TASK": "6", "TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8"}, 8),
    ],
)
def test_workers_are_capped_by_this_process_cpus(requested, cpus, env, expected):
    assert data.capped_workers(requested, cpus=cpus, env=env) == expected


@pytest.mark.parametrize(
    "files,own,expected",
    [
        ({"cpu.max": "200000 100000\n"}, "0::/\n", 2),  # v2, docker --cpus=2
        ({"job/cpu.max": "150000 100000\n", "cpu.max": "max 100000\n"}, "0::/job\n", 2),  # own cgroup, 1.5 -> 2
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # v2 without a quota
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", 4),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "4:cpu,cpuacct:/\n", None),
        ({"cpu.max": "50000 100000\n"}, "0::/\n", 1),  # half a CPU: still one worker's worth
        ({}, "", None),  # no cgroup file system at all
    ],
)
def test_a_cgroup_cpu_quota_lowers_the_usable_cpus(tmp_path, files, own, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self_cgroup").write_text(own)
    assert data.cgroup_cpu_quota(tmp_path, tmp_path / "self_cgroup") == expected


def test_usable_cpus_takes_the_smaller_of_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(data, "cgroup_cpu_quota", lambda: 1)
    assert data.usable_cpus() == 1
    monkeypatch.setattr(data, "cgroup_cpu_quota", lambda: 10_000)
    assert data.usable_cpus() == len(os.sched_getaffinity(0))


def test_capping_is_logged_and_reaches_the_loader(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(data, "usable_cpus", lambda: 1)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    caplog.set_level(logging.INFO, logger="rednet")
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    cfg = _data_cfg(root, "data.num_workers=7", "data.persistent_workers=false")
    val = data.create_image_dataset(cfg, "val", data.check_image_folder(root), is_training=False, replace_bad=False)
    assert data.create_eval_loader(val, cfg, 1, 0, torch.device("cpu")).num_workers == 1
    assert "data.num_workers=7 lowered to 1, the CPUs this process may use (1 usable" in caplog.text
    with pytest.raises(ValueError, match="data.num_workers=-1 is negative"):
        data.capped_workers(-1)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere(caplog):
    caplog.set_level(logging.INFO, logger="rednet")
    terminal = _Terminal()
    list(monitor.progress(range(50), "train 0", file=terminal))
    assert terminal.getvalue().startswith("\rtrain 0:   0%|")  # tqdm's frames
    log_file = io.StringIO()
    bar = monitor.progress(range(50), "train 0", file=log_file, every_s=0.0)
    for _ in bar:
        bar.set_postfix(loss="0.1234")
    bar.close()
    assert log_file.getvalue() == ""  # no frames
    lines = [r.getMessage() for r in caplog.records if r.name == "rednet.progress"]
    assert len(lines) == 50 and lines[-1].startswith("train 0: 50/50 (100%) [") and "loss=0.1234" in lines[-1]
    caplog.clear()
    list(monitor.progress(range(50), "train 0", file=log_file))  # the default: a line a minute at most
    assert not caplog.records and log_file.getvalue() == ""
    list(monitor.progress(range(5), "val", enabled=False, file=terminal))
    assert "val" not in terminal.getvalue()


def test_training_without_a_terminal_writes_no_bar_frames(capsys):
    model = torch.nn.Linear(4, 2)
    batches = [(torch.randn(2, 4), torch.tensor([0, 1])) for _ in range(3)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = engine.LoopSettings(torch.device("cpu"), epoch_updates=3)
    engine.train_one_epoch(model, batches, optimizer, torch.nn.CrossEntropyLoss(), run_state.TrainProgress(), settings)
    engine.evaluate(model, batches, torch.device("cpu"))
    err = capsys.readouterr().err  # pytest's captured stderr is no terminal
    assert "\r" not in err and "it/s" not in err


# --- files named as images that are none: reported before training, not in the middle of an epoch


def _not_images(root: Path) -> list[Path]:
    """A zero-byte .jpg, text saved as .png and a link to nothing, in train/cat."""
    cat = root / "train" / "cat"
    (cat / "zero.jpg").write_bytes(b"")
    (cat / "page.png").write_text("<html>404 Not Found</html>")
    (cat / "moved.PNG").symlink_to(root / "no_such_file.png")
    return [cat / "moved.PNG", cat / "page.png", cat / "zero.jpg"]


def test_files_that_are_no_images_fail_when_the_dataset_is_built(tmp_path):
    """They passed the extension scan and failed at their first read, mid-epoch (or only with skip_bad_images)."""
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    bad = _not_images(root)
    classes = data.check_image_folder(root)
    with pytest.raises(data.BadImageError, match=r"train/: 3 of 9 files named as images are not images") as error:
        data.create_image_dataset(_data_cfg(root), "train", classes, is_training=True, replace_bad=True)
    for path in bad:
        assert f"'{path}' (" in str(error.value)
    assert "data.skip_bad_images=true" in str(error.value)


@pytest.mark.parametrize("verify,limit,checked", [("auto", 100, True), ("auto", 8, False), (True, 8, True),
                                                   (False, 100, False)])  # fmt: skip
def test_verify_images_reads_headers_of_small_splits_or_when_asked(tmp_path, monkeypatch, caplog, verify, limit,
                                                                  checked):  # fmt: skip
    """auto: splits up to the limit (9 train files here) are checked before training; larger ones are not (their bad
    files fail when loaded, naming the file), and the log says how to check them; true / false force it."""
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    _not_images(root)
    monkeypatch.setattr(data, "VERIFY_IMAGES_AUTO_LIMIT", limit)
    caplog.set_level(logging.INFO, logger="rednet")
    cfg = _data_cfg(root, f"data.verify_images={str(verify).lower()}")
    build = lambda: data.create_image_dataset(cfg, "train", data.check_image_folder(root), True, replace_bad=True)  # noqa: E731
    if checked:
        with pytest.raises(data.BadImageError, match="3 of 9 files"):
            build()
        return
    dataset = build()
    assert len(dataset) == 9
    assert ("set data.verify_images=true to check them all first" in caplog.text) == (verify == "auto")


def test_skip_bad_images_leaves_files_that_are_no_images_out(tmp_path, caplog):
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    bad = _not_images(root)
    caplog.set_level(logging.WARNING, logger="rednet")
    cfg = _data_cfg(root, "data.skip_bad_images=true")
    train = data.create_image_dataset(cfg, "train", data.check_image_folder(root), is_training=True, replace_bad=True)
    assert len(train) == 6 and not {str(p) for p in bad} & {p for p, _ in train.samples}
    assert "train/: left out 3 files that are not images Pillow can open" in caplog.text
    assert all(train[i][0].shape == (3, 32, 32) for i in range(len(train)))
    assert train.take_bad_count() == 0  # left out up front: none is met at load time


def test_symlinked_images_and_class_folders_are_read(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=2, n_val=1)
    (root / "train" / "cat" / "linked.png").symlink_to(root / "train" / "dog" / "0.png")
    shutil.move(root / "train" / "fox", tmp_path / "fox_elsewhere")
    (root / "train" / "fox").symlink_to(tmp_path / "fox_elsewhere")
    classes = data.check_image_folder(root)
    train = data.create_image_dataset(_data_cfg(root), "train", classes, is_training=False, replace_bad=False)
    names = sorted(Path(p).relative_to(root).as_posix() for p, _ in train.samples)
    assert names == ["train/cat/0.png", "train/cat/1.png", "train/cat/linked.png"] + [
        f"train/{c}/{i}.png" for c in ("dog", "fox") for i in (0, 1)
    ]
    assert train.samples[names.index("train/cat/linked.png")][1] == classes.index("cat")  # its folder's class


def test_more_extensions_hidden_folders_and_unicode_names(tmp_path, caplog):
    root = make_image_folder(tmp_path, n_train=1, n_val=1, size=8)
    cat = root / "train" / "cat"
    pixels = Image.fromarray(np.full((8, 8, 3), 90, np.uint8))
    names = ["a.PNG", "b.jpeg", "c.JPEG", "d.tiff", "e.jfif", "f.gif", "g.ico", "h.ppm", "i.tar.png", "j.png.JPG"]
    for name in names:
        pixels.save(cat / name, {".jfif": "JPEG"}.get(Path(name).suffix.lower()))
    Image.new("L", (8, 8), 5).save(cat / "k.pgm")
    frames = [Image.new("RGB", (8, 8), (50 * i, 0, 0)) for i in range(3)]
    frames[0].save(cat / "l.gif", save_all=True, append_images=frames[1:])  # animated
    unicode_class = "chat noir é 猫"
    for split in ("train", "val"):
        (root / split / unicode_class).mkdir()
        pixels.save(root / split / unicode_class / "ph oto ü.png")
        (root / split / ".ipynb_checkpoints").mkdir()  # Jupyter's: no class, logged
        pixels.save(root / split / ".ipynb_checkpoints" / "0-checkpoint.png")
    caplog.set_level(logging.INFO, logger="rednet")
    classes = data.check_image_folder(root)
    assert classes == ["cat", unicode_class, "dog", "fox"]
    assert "train/: 16 images used, 1 file left out" in caplog.text and "hidden folders 1" in caplog.text
    cfg = _data_cfg(root, "data.img_size=8")
    train = data.create_image_dataset(cfg, "train", classes, is_training=False, replace_bad=False)
    assert len(train) == 16  # 1 per class folder + 12 in cat
    assert all(train[i][0].shape == (3, 8, 8) for i in range(len(train)))


def test_an_empty_val_class_folder_is_named(tmp_path):
    root = make_image_folder(tmp_path, n_train=1, n_val=1)
    (root / "val" / "dog" / "0.png").unlink()
    with pytest.raises(ValueError, match=r"class folder '.*val/dog' holds no image .*\(it is empty\)"):
        data.check_image_folder(root)


def test_transform_settings_timm_refuses_are_named():
    cfg = resolved_config("train", ["data.root=/d", "data.auto_augment=rand-x9"]).data
    with pytest.raises(ValueError, match=r"timm cannot build the training transforms from data\.\* \(Assert"):
        data.create_transforms(cfg, is_training=True)


# --- 1-channel models: images read as grayscale, mean/std one value per channel


def _one_colour_folder(root: Path, colour: tuple[int, int, int]) -> Path:
    for split in ("train", "val"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), colour).save(root / split / name / "0.png")
    return root


@pytest.mark.parametrize("is_training", [False, True])
def test_one_channel_dataset_yields_the_luma_of_each_rgb_pixel(tmp_path, is_training):
    """The data pipeline read every image as RGB whatever the model took: a 1-channel model got (3, H, W)."""
    root = _one_colour_folder(tmp_path, (200, 100, 50))
    cfg = _data_cfg(root, "data.img_size=8", "data.re_prob=0", "data.color_jitter=0")
    cfg.mean, cfg.std = [0.0], [1.0]  # the tensor is value / 255
    classes = data.check_image_folder(root)
    dataset = data.create_image_dataset(cfg, "train", classes, is_training, replace_bad=False, seed=0, in_chans=1)
    image, _ = dataset[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32
    # Pillow's ITU-R 601-2 luma: (200 * 299 + 100 * 587 + 50 * 114) / 1000 = 124.2 -> 124
    torch.testing.assert_close(image, torch.full((1, 8, 8), 124 / 255), rtol=0, atol=1e-6)
    rgb, _ = data.create_image_dataset(cfg.copy(), "train", classes, is_training, False, seed=0, in_chans=3)[0]
    assert rgb.shape == (3, 8, 8)  # mean=[0] applies to every channel (timm's rule for one value)


def test_one_channel_augmentation_runs_with_rand_augment(tmp_path):
    root = _one_colour_folder(tmp_path, (10, 200, 30))
    overrides = ("data.img_size=8", "data.auto_augment=rand-m9-mstd0.5-inc1", "data.color_jitter=0.4", "data.re_prob=1")
    cfg = _data_cfg(root, *overrides)
    cfg.mean, cfg.std = [0.5], [0.25]
    dataset = data.create_image_dataset(cfg, "train", data.check_image_folder(root), True, False, seed=0, in_chans=1)
    assert all(dataset[i % 2][0].shape == (1, 8, 8) for i in range(8))


def test_mean_and_std_need_one_value_per_channel(tmp_path):
    from rednet import factory, weights

    gray = factory.build_model("rednet26", 2, in_chans=1)
    with pytest.raises(ValueError, match=r"data.mean=\[0.5, 0.5, 0.5\] has 3 values but the model takes 1-channel"):
        weights.resolve_preprocessing(gray, {"mean": [0.5, 0.5, 0.5]})
    with pytest.raises(ValueError, match=r"data.std=\[0.2, 0.2\] has 2 values but the model takes 3-channel"):
        weights.resolve_preprocessing(factory.build_model("rednet26", 2), {"std": [0.2, 0.2]})
    # One value is every channel's (timm's rule); the weights' RGB values become their luma-weighted sum.
    assert weights.resolve_preprocessing(factory.build_model("rednet26", 2), {"mean": [0.5]})["mean"] == [0.5] * 3
    resolved = weights.resolve_preprocessing(gray)
    assert resolved["mean"] == [round(0.299 * 0.485 + 0.587 * 0.456 + 0.114 * 0.406, 6)]  # ImageNet's, as gray
    assert resolved["std"] == [round(0.299 * 0.229 + 0.587 * 0.224 + 0.114 * 0.225, 6)]
    cfg = _data_cfg(_one_colour_folder(tmp_path, (1, 2, 3)))  # resolved for an RGB model
    with pytest.raises(ValueError, match=r"data.mean=\[0.485, 0.456, 0.406\] has 3 values but the model takes 1-"):
        data.create_transforms(cfg, is_training=False, in_chans=1)


@pytest.mark.parametrize("in_chans", [2, 4])
def test_other_channel_counts_are_refused_naming_them(tmp_path, in_chans):
    root = _one_colour_folder(tmp_path, (1, 2, 3))
    with pytest.raises(ValueError, match=rf"model in_chans={in_chans}: images are read as 1-channel grayscale"):
        data.create_image_dataset(_data_cfg(root), "val", ["a", "b"], False, False, in_chans=in_chans)


def test_counts_name_one_file_in_the_singular(tmp_path, caplog):
    """ "left out 1 files" and "1 of 7 files ... are not images": a count says "file" for one."""
    assert [data.plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert data.plural(1, "class", "classes") == "1 class" and data.plural(3, "class", "classes") == "3 classes"
    root = make_image_folder(tmp_path, n_train=2, n_val=1)
    (root / "train" / "cat" / "page.png").write_text("<html>404</html>")
    caplog.set_level(logging.WARNING, logger="rednet")
    classes = data.check_image_folder(root)
    data.create_image_dataset(_data_cfg(root, "data.skip_bad_images=true"), "train", classes, True, replace_bad=True)
    assert "train/: left out 1 file that is not an image Pillow can open: " in caplog.text
    with pytest.raises(data.BadImageError, match="train/: 1 of 7 files named as images is not an image Pillow"):
        data.create_image_dataset(_data_cfg(root), "train", classes, True, replace_bad=True)


def test_a_skipped_file_is_warned_about_once_whatever_reads_it(tmp_path, caplog):
    """The epoch's pass and precise BatchNorm's pass each warned (and each later epoch again): one warning per file."""
    root = make_image_folder(tmp_path, n_train=4, n_val=2)
    bad = root / "train" / "cat" / "2.png"
    _corrupt(bad)
    cfg = _data_cfg(root, "data.skip_bad_images=true", "data.verify_images=false", "data.num_workers=0")
    train = data.create_image_dataset(cfg, "train", data.check_image_folder(root), True, replace_bad=True, seed=0)
    loader = data.create_train_loader(train, cfg, 1, 0, seed=0, device=torch.device("cpu"))
    caplog.set_level(logging.WARNING, logger="rednet")
    for epoch in range(2):
        train.set_epoch(epoch)
        list(loader)
        list(engine.precise_bn_loader(loader, 3))  # every training image again
    assert train.take_bad_count() == 4  # every skip is counted
    assert caplog.text.count(f"skipping unreadable image '{bad}'") == 1
