"""torch.hub: hubconf.py exposes every registered RedNet, and loads weights as rednet.create_model does."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import rednet

REPO = Path(__file__).resolve().parents[1]


def test_hubconf_has_an_entry_point_per_registered_model():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    entry_points = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entry_points == set(rednet.list_models())
    assert set(hubconf.dependencies) <= {"torch", "torchvision", "timm"}


def test_hub_load_builds_the_model_with_the_given_weights(tmp_path):
    source = rednet.create_model("rednet26", num_classes=5)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_()
    torch.save(source.state_dict(), tmp_path / "rednet26.pth")

    model = torch.hub.load(str(REPO), "rednet26", source="local", pretrained=str(tmp_path / "rednet26.pth"))
    assert type(model) is type(source) and model.num_classes == 5  # the class count came from the checkpoint
    expected, got = source.state_dict(), model.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
