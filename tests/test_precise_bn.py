"""Precise BatchNorm (trainer.precise_bn_batches): statistics recomputed before evaluations, nothing else changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from train_utils import TINY, compose_config, make_image_folder

import train
from rednet import engine, run_state


def _loader(n: int = 12, batch_size: int = 4) -> DataLoader:
    images = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(0)) * 3 + 5
    return DataLoader(TensorDataset(images, torch.zeros(n, dtype=torch.long)), batch_size=batch_size)


@pytest.mark.parametrize("batches", [1, 3])
def test_running_statistics_become_those_of_the_batches_fed(batches):
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Dropout(0.5)).eval()
    model[0].running_mean.fill_(100.0)  # stale statistics are replaced, not averaged with
    loader = _loader()
    fed = [images for images, _ in engine.precise_bn_loader(loader, batches)]
    assert len(fed) == batches and all(len(b) == 4 for b in fed)
    rng = torch.get_rng_state()
    engine.recompute_batchnorm_stats(model, loader, batches, torch.device("cpu"))
    # update_bn's cumulative average (momentum None): the mean of the batches' means and unbiased variances
    expected_mean = torch.stack([b.mean((0, 2, 3)) for b in fed]).mean(0)
    expected_var = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in fed]).mean(0)
    torch.testing.assert_close(model[0].running_mean, expected_mean)
    torch.testing.assert_close(model[0].running_var, expected_var)
    assert not model.training  # its mode is given back
    assert torch.equal(torch.get_rng_state(), rng)  # dropout in train mode drew from a forked generator


def test_batches_cover_the_classes_and_stay_the_same():
    # the folder order is by class: the subset is a seeded permutation, not the first images; same every call
    loader = DataLoader(TensorDataset(torch.arange(40.0)), batch_size=4)
    first = [b[0] for b in engine.precise_bn_loader(loader, 2)]
    again = [b[0] for b in engine.precise_bn_loader(loader, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert torch.cat(first).max() >= 20  # not just the first 8 images
    assert len(list(engine.precise_bn_loader(loader, 100))) == 10  # capped at the dataset's full batches


def test_zero_batches_changes_nothing():
    model = nn.BatchNorm2d(3)
    model.running_mean.fill_(7.0)
    engine.recompute_batchnorm_stats(model, _loader(), 0, torch.device("cpu"))
    assert torch.equal(model.running_mean, torch.full((3,), 7.0))


def test_training_is_the_same_with_precise_bn_only_the_statistics_differ(tmp_path):
    # drop-path and mixup draw from the global generators: a recompute that consumed them would change epoch 2
    root = make_image_folder(tmp_path / "images")
    common = [*TINY, f"data.root={root}", "trainer.epochs=2", "model.drop_path_rate=0.2", "data.mixup=0.2"]
    for name, batches in (("off", 0), ("on", 2)):
        train.train(compose_config("train", [*common, f"trainer.precise_bn_batches={batches}"]), tmp_path / name)
    off, on = (run_state.load_checkpoint(tmp_path / n / "checkpoints" / "last.pt")["state_dict"] for n in ("off", "on"))
    stats = [k for k in off if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in off:
        if key not in stats and not key.endswith("num_batches_tracked"):  # (update_bn counts its own batches)
            torch.testing.assert_close(on[key], off[key], rtol=0, atol=0, msg=key)
    assert all(not torch.equal(on[k], off[k]) for k in stats)
