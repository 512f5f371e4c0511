"""Image-folder checks, unreadable images, samplers, loaders and the digits demo data set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_utils import REPO, compose_config, make_image_folder

from rednet import data


def _data_cfg(root: Path, *overrides: str):
    return compose_config("train", [f"data.root={root}", "data=small", "data.batch_size=4", *overrides]).data


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


def test_images_in_a_class_subfolder_are_refused_not_dropped(tmp_path):
    root = make_image_folder(tmp_path)
    nested = root / "train" / "fox" / "images"
    nested.mkdir()
    for image in list((root / "train" / "fox").glob("*.png"))[:2]:
        image.rename(nested / image.name)
    (root / "train" / "fox" / ".cache").mkdir()  # hidden and image-free subfolders are fine
    (root / "train" / "fox" / "notes").mkdir()
    with pytest.raises(ValueError, match=r"'.*train/fox/images' holds images.*move them into '.*train/fox'"):
        data.check_image_folder(root)
    for image in nested.iterdir():
        image.rename(root / "train" / "fox" / image.name)
    assert data.check_image_folder(root) == sorted(p.name for p in (root / "train").iterdir())


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
