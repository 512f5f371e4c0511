"""PaddleClas RedNet weights (.pdparams): the restricted reader, the key map, pretrained=True end to end.

The .pdparams files here are synthetic: PaddleClas's parameter names and shapes (written out below from
ppcls/arch/backbone/model_zoo/rednet.py and paddle.vision's ResNet, independently of rednet.convert_paddle), random
values, pickled the way paddle.save writes a state dict (a dict of NumPy arrays plus the name table).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import rednet
from rednet import convert_paddle, weights

REPO = Path(__file__).resolve().parents[1]
LAYERS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
# Parameter counts (BN statistics excluded) from /work/shared/reference/rednet-facts.md (stem K=3, 1000 classes).
PARAMS = {26: 9_233_200, 38: 12_387_000, 50: 15_540_800, 101: 25_653_000, 152: 33_984_600}

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------------------------------------------
# PaddleClas's layout, by hand
# ----------------------------------------------------------------------------------------------------------------
def _bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "_mean", "_variance")}


def _involution(prefix: str, channels: int, kernel_size: int) -> dict[str, tuple[int, ...]]:
    reduced, groups = channels // 4, channels // 16
    return {
        f"{prefix}.conv1.conv.weight": (reduced, channels, 1, 1),
        **_bn(f"{prefix}.conv1.bn", reduced),
        f"{prefix}.conv2.conv.weight": (kernel_size**2 * groups, reduced, 1, 1),
        f"{prefix}.conv2.conv.bias": (kernel_size**2 * groups,),
    }


def paddleclas_layout(depth: int, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """The names and shapes of PaddleClas's RedNet{depth}().state_dict(): its stem Sequential, paddle.vision's
    BottleneckBlock with conv2 replaced by Involution(width, 7, stride), fc stored (in, out)."""
    layout = {"stem.0.conv.weight": (32, 3, 3, 3), **_bn("stem.0.bn", 32), **_involution("stem.1", 32, 3)}
    layout.update({**_bn("stem.2", 32), "stem.4.conv.weight": (64, 32, 3, 3), **_bn("stem.4.bn", 64)})
    inplanes = 64
    for stage, (blocks, planes) in enumerate(zip(LAYERS[depth], (64, 128, 256, 512)), start=1):
        for index in range(blocks):
            prefix = f"layer{stage}.{index}"
            layout[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
            layout.update(_bn(f"{prefix}.bn1", planes))
            layout.update(_involution(f"{prefix}.conv2", planes, 7))
            layout.update(_bn(f"{prefix}.bn2", planes))
            layout[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
            layout.update(_bn(f"{prefix}.bn3", planes * 4))
            if index == 0:  # stride != 1 or inplanes != planes * 4: every stage's first block
                layout[f"{prefix}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                layout.update(_bn(f"{prefix}.downsample.1", planes * 4))
            inplanes = planes * 4
    layout.update({"fc.weight": (2048, num_classes), "fc.bias": (num_classes,)})
    return layout


def random_arrays(depth: int = 26, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 values of sensible scale (fan-in convs, positive BN variances) in PaddleClas's layout."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in paddleclas_layout(depth).items():
        if name.endswith("._variance"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(".weight") and len(shape) == 1:  # BN scale
            value = rng.uniform(0.5, 1.0, shape)
        elif len(shape) == 1:  # BN bias / mean, conv and fc biases
            value = rng.normal(0.0, 0.1, shape)
        else:
            fan_in = shape[0] if name == "fc.weight" else int(np.prod(shape[1:]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        arrays[name] = value.astype(np.float32)
    return arrays


def paddle_save_bytes(arrays: dict[str, np.ndarray], protocol: int = 2, numpy_1_names: bool = True) -> bytes:
    """What paddle.save(state_dict, path, protocol) writes: {name: ndarray, "StructuredToParameterName@@": {...}}.

    ``numpy_1_names`` writes the array reconstructor as numpy 1.x names it (numpy.core.multiarray), as in the 2021
    PaddleClas files; this numpy (2.x) writes numpy._core. Protocol 2 names globals as text, so a rename is exact.
    """
    saved = dict(arrays)
    saved["StructuredToParameterName@@"] = {name: f"param_{index}.w_0" for index, name in enumerate(arrays)}
    data = pickle.dumps(saved, protocol=protocol)
    if numpy_1_names:
        assert protocol == 2, "only protocol 2 names globals as plain text lines"
        data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    return data


# ----------------------------------------------------------------------------------------------------------------
# A paddle-free PaddleClas RedNet forward, from the arrays by their PaddleClas names
# ----------------------------------------------------------------------------------------------------------------
def _batch_norm(x: torch.Tensor, p: dict, prefix: str) -> torch.Tensor:
    return F.batch_norm(x, p[f"{prefix}._mean"], p[f"{prefix}._variance"], p[f"{prefix}.weight"],
                        p[f"{prefix}.bias"], training=False, eps=1e-5)  # fmt: skip  # paddle's default epsilon


def _paddle_involution(x: torch.Tensor, p: dict, prefix: str, kernel_size: int, stride: int) -> torch.Tensor:
    """PaddleClas's Involution.forward: AvgPool2D(s, s) → conv1 (conv, bn, relu) → conv2 → unfold-and-sum."""
    pooled = F.avg_pool2d(x, stride, stride) if stride > 1 else x
    reduced = F.relu(_batch_norm(F.conv2d(pooled, p[f"{prefix}.conv1.conv.weight"]), p, f"{prefix}.conv1.bn"))
    weight = F.conv2d(reduced, p[f"{prefix}.conv2.conv.weight"], p[f"{prefix}.conv2.conv.bias"])
    b, c, h, w = x.shape[0], x.shape[1], weight.shape[2], weight.shape[3]
    groups = c // 16
    weight = weight.reshape(b, groups, kernel_size**2, h, w).unsqueeze(2)
    unfolded = F.unfold(x, kernel_size, 1, (kernel_size - 1) // 2, stride)
    unfolded = unfolded.reshape(b, groups, 16, kernel_size**2, h, w)
    return (weight * unfolded).sum(dim=3).reshape(b, c, h, w)


def paddleclas_forward(arrays: dict[str, np.ndarray], depth: int, x: torch.Tensor) -> torch.Tensor:
    p = {name: torch.from_numpy(value) for name, value in arrays.items()}
    x = F.relu(_batch_norm(F.conv2d(x, p["stem.0.conv.weight"], stride=2, padding=1), p, "stem.0.bn"))
    x = F.relu(_batch_norm(_paddle_involution(x, p, "stem.1", 3, 1), p, "stem.2"))
    x = F.relu(_batch_norm(F.conv2d(x, p["stem.4.conv.weight"], padding=1), p, "stem.4.bn"))
    x = F.max_pool2d(x, 3, 2, 1)
    for stage, blocks in enumerate(LAYERS[depth], start=1):
        for index in range(blocks):
            q, stride = f"layer{stage}.{index}", 2 if stage > 1 and index == 0 else 1
            out = F.relu(_batch_norm(F.conv2d(x, p[f"{q}.conv1.weight"]), p, f"{q}.bn1"))
            out = F.relu(_batch_norm(_paddle_involution(out, p, f"{q}.conv2", 7, stride), p, f"{q}.bn2"))
            out = _batch_norm(F.conv2d(out, p[f"{q}.conv3.weight"]), p, f"{q}.bn3")
            if index == 0:
                x = _batch_norm(F.conv2d(x, p[f"{q}.downsample.0.weight"], stride=stride), p, f"{q}.downsample.1")
            x = F.relu(out + x)
    return x.mean(dim=(2, 3)) @ p["fc.weight"] + p["fc.bias"]  # paddle's Linear: x @ W(in, out) + b


# ----------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def isolated_cache(weights_cache):
    return weights_cache


@pytest.fixture(scope="module")
def rednet26_arrays():
    return random_arrays(26)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------
def test_registry_has_paddleclas_urls_and_the_pretrained_cfg_their_eval_transform_and_reported_accuracy():
    root = "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph"
    for depth, top1 in zip(LAYERS, ("75.95", "77.47", "78.33", "78.94", "79.17")):
        spec = weights.PRETRAINED[f"rednet{depth}"]
        assert spec.url == f"{root}/RedNet{depth}_pretrained.pdparams" and spec.sha256 == ""
        cfg = timm.models.get_pretrained_cfg(f"rednet{depth}")
        assert (cfg.num_classes, cfg.input_size, cfg.crop_pct, cfg.interpolation) == (1000, (3, 224, 224), 0.875,
                                                                                       "bilinear")  # fmt: skip
        assert (cfg.mean, cfg.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        assert f"top-1 {top1}%" in cfg.notes[1] and "as reported by PaddleClas" in cfg.notes[1]
        assert "not measured" in cfg.notes[1]
    # resize 256 = 224 / 0.875, then center crop 224
    config = timm.data.resolve_data_config(model=rednet.create_model("rednet26"))
    assert round(config["input_size"][-1] / config["crop_pct"]) == 256


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_key_map_covers_every_key_and_shape_of_every_depth(depth):
    layout = paddleclas_layout(depth)
    learnable = sum(int(np.prod(shape)) for name, shape in layout.items() if not name.endswith(("_mean", "_variance")))
    assert round(learnable, -2) == PARAMS[depth]  # the hand-written PaddleClas layout is the published model
    arrays = {name: np.zeros(shape, np.float32) for name, shape in layout.items()}
    converted = convert_paddle.convert_state_dict(arrays)
    with torch.device("meta"):
        ours = rednet.create_model(f"rednet{depth}").state_dict()
    assert {key: tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in ours.items()
    }


def test_conversion_renames_bn_statistics_and_transposes_fc(rednet26_arrays):
    converted = convert_paddle.convert_state_dict(rednet26_arrays)
    expected = {  # by hand: our key -> the PaddleClas array it holds
        "stem.0.bn.running_mean": rednet26_arrays["stem.0.bn._mean"],
        "stem.1.conv2.conv.bias": rednet26_arrays["stem.1.conv2.conv.bias"],
        "layer3.2.conv2.conv1.bn.running_var": rednet26_arrays["layer3.2.conv2.conv1.bn._variance"],
        "layer4.0.downsample.1.weight": rednet26_arrays["layer4.0.downsample.1.weight"],
        "fc.weight": rednet26_arrays["fc.weight"].T,
    }
    for key, value in expected.items():
        torch.testing.assert_close(converted[key], torch.from_numpy(np.ascontiguousarray(value)), rtol=0, atol=0)
    assert converted["layer1.0.bn1.num_batches_tracked"].item() == 0


def test_pretrained_true_downloads_records_the_digest_converts_loads_and_then_works_offline_with_the_check(
    rednet26_arrays, server, isolated_cache, caplog
):
    root, base_url, stop = server
    (root / "RedNet26_pretrained.pdparams").write_bytes(paddle_save_bytes(rednet26_arrays))
    digest = sha256(root / "RedNet26_pretrained.pdparams")
    spec = weights.PRETRAINED["rednet26"]  # the registered entry, with its URL pointed at the loopback server
    weights.PRETRAINED["rednet26"] = dataclasses.replace(spec, url=f"{base_url}/RedNet26_pretrained.pdparams")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = paddleclas_forward(rednet26_arrays, 26, x)

    with caplog.at_level(logging.WARNING, logger="rednet.weights"):
        model = rednet.create_model("rednet26", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4 * reference.abs().max().item())
    (cached,) = isolated_cache.iterdir()
    assert cached.name == f"RedNet26_pretrained-{digest[:16]}.pdparams"
    assert digest in caplog.text and "register_weights" in caplog.text

    stop()  # offline from here: the recorded file serves, checked against the digest in its name
    with torch.no_grad():
        torch.testing.assert_close(timm.create_model("rednet26", pretrained=True).eval()(x), model(x), rtol=0, atol=0)
    tampered = bytearray(cached.read_bytes())
    tampered[-100] ^= 1  # inside the last array's data: still a readable pickle
    cached.write_bytes(bytes(tampered))
    with pytest.raises(RuntimeError, match=f"sha256 mismatch .*expected {digest[:16]}"):
        rednet.create_model("rednet26", pretrained=True)

    # A pinned digest (register_weights) uses the recorded file when its prefix agrees, and checks the whole digest.
    cached.write_bytes((root / "RedNet26_pretrained.pdparams").read_bytes())
    weights.register_weights("rednet26", url=f"{base_url}/RedNet26_pretrained.pdparams", sha256=digest)
    assert weights.fetch(weights.PRETRAINED["rednet26"].url, sha256=digest) == cached


def test_a_pickle_with_any_other_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps({"fc.bias": np.zeros(3, np.float32), "x": Payload()}, protocol=2))
    with pytest.raises(convert_paddle.PaddleWeightsError, match=r"global (__builtin__|builtins)\.exec") as error:
        rednet.create_model("rednet26", pretrained=str(path))
    assert "refusing to read" in str(error.value)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the test has teeth: a plain unpickler runs the payload
    assert marker.exists()


def test_other_dtypes_and_objects_are_refused(tmp_path):
    path = tmp_path / "objects.pdparams"
    path.write_bytes(pickle.dumps({"fc.bias": np.array(["a", 1], dtype=object)}, protocol=4))
    with pytest.raises(convert_paddle.PaddleWeightsError, match=r"'fc.bias' is an array of object"):
        convert_paddle.read_pdparams(path)
    path.write_bytes(pickle.dumps([np.zeros(2)], protocol=4))
    with pytest.raises(convert_paddle.PaddleWeightsError, match="holds a list, not the dict"):
        convert_paddle.read_pdparams(path)


def test_protocol_4_numpy_2_names_and_paddles_split_big_arrays_are_read(tmp_path):
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(2, np.float32)}
    path = tmp_path / "p4.pdparams"
    path.write_bytes(paddle_save_bytes(arrays, protocol=4, numpy_1_names=False))
    read = convert_paddle.read_pdparams(path)
    assert read.keys() == arrays.keys() and all(np.array_equal(read[key], arrays[key]) for key in arrays)
    # protocol 2/3 split an array of more than (2**30 - 1) / itemsize elements into flat parts (io_utils.py)
    flat = arrays["a"].ravel()
    split = {"a@@.0": flat[:5], "a@@.1": flat[5:], "b": arrays["b"],
             "UnpackBigParamInfor@@": {"a": {"OriginShape": (3, 4), "slices": ["a@@.0", "a@@.1"]}}}  # fmt: skip
    path.write_bytes(paddle_save_bytes(split, protocol=2))
    read = convert_paddle.read_pdparams(path)
    assert read.keys() == {"a", "b"} and np.array_equal(read["a"], arrays["a"])


def test_mismatch_error_lists_unmapped_missing_and_misshapen_keys(rednet26_arrays):
    arrays = dict(rednet26_arrays)
    del arrays["layer2.1.bn2._variance"]
    arrays["layer2.1.conv2.weight"] = np.zeros((128, 128, 3, 3), np.float32)  # a ResNet 3×3 conv in place of it
    arrays["stem.0.conv.weight"] = np.zeros((32, 3, 7, 7), np.float32)
    arrays["fc.weight"] = np.zeros((1000, 2048), np.float32)  # stored (out, in) by mistake
    with pytest.raises(convert_paddle.PaddleWeightsError) as error:
        convert_paddle.convert_state_dict(arrays, origin="RedNet26_pretrained.pdparams")
    message = str(error.value)
    assert "1 PaddleClas keys that map to no RedNet key: layer2.1.conv2.weight" in message
    assert "1 RedNet keys missing: layer2.1.bn2.running_var (PaddleClas layer2.1.bn2._variance)" in message
    assert "2 shape mismatches" in message
    assert "stem.0.conv.weight: (32, 3, 7, 7), expected (32, 3, 3, 3)" in message
    assert "fc.weight: (1000, 2048) stored as (in, out), expected (1000, 2048)" in message


def test_convert_checkpoint_script_turns_a_pdparams_into_a_clean_weights_file(rednet26_arrays, tmp_path):
    source = tmp_path / "RedNet26_pretrained.pdparams"
    source.write_bytes(paddle_save_bytes(rednet26_arrays))
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "scripts" / "convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    written = script.convert(str(source), str(tmp_path / "out" / "rednet26"))
    assert written.name == f"rednet26-{sha256(written)[:8]}.pth"
    clean = torch.load(written, weights_only=True)
    expected = convert_paddle.load_pdparams(source)
    assert clean.keys() == expected.keys()
    torch.testing.assert_close(clean, expected, rtol=0, atol=0)
    model = rednet.create_model("rednet26", pretrained=str(written))
    torch.testing.assert_close(model.fc.weight, torch.from_numpy(rednet26_arrays["fc.weight"].T), rtol=0, atol=0)
