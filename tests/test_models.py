"""RedNet models against timm's model contract and the official architecture (CPU, tiny inputs)."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.models import group_parameters

import rednet
from rednet.models.involution import Involution

MODELS = timm.list_models("rednet*")
LAYERS = {"rednet26": (1, 2, 4, 1), "rednet38": (2, 3, 5, 2), "rednet50": (3, 4, 6, 3), "rednet101": (3, 4, 23, 3),
          "rednet152": (3, 8, 36, 3)}  # fmt: skip
# Official parameter counts (M, 1000 classes, stem K=3) and official checkpoint key counts.
PARAMS_M = {"rednet26": 9.2332, "rednet38": 12.3870, "rednet50": 15.5408, "rednet101": 25.6530, "rednet152": 33.9846}
OFFICIAL_KEYS = {"rednet26": 251, "rednet38": 351, "rednet50": 451, "rednet101": 876, "rednet152": 1301}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


pytestmark = pytest.mark.usefixtures("single_thread")


def official_state_dict_keys(layers: tuple[int, ...]) -> list[str]:
    """The keys of an official mmcls RedNet checkpoint, written out from the official module structure."""

    def bn(prefix: str) -> list[str]:
        return [f"{prefix}.{name}" for name in BN]

    def involution(prefix: str) -> list[str]:
        return [f"{prefix}.conv1.conv.weight", *bn(f"{prefix}.conv1.bn"), f"{prefix}.conv2.conv.weight",
                f"{prefix}.conv2.conv.bias"]  # fmt: skip

    keys = ["stem.0.conv.weight", *bn("stem.0.bn"), *involution("stem.1"), *bn("stem.2"), "stem.4.conv.weight",
            *bn("stem.4.bn")]  # fmt: skip
    for stage, depth in enumerate(layers, start=1):
        for block in range(depth):
            p = f"layer{stage}.{block}"
            keys += [f"{p}.conv1.weight", *bn(f"{p}.bn1"), *involution(f"{p}.conv2"), *bn(f"{p}.bn2"),
                     f"{p}.conv3.weight", *bn(f"{p}.bn3")]  # fmt: skip
            if block == 0:
                keys += [f"{p}.downsample.0.weight", *bn(f"{p}.downsample.1")]
    return ["backbone." + key for key in keys] + ["head.fc.weight", "head.fc.bias"]


def randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN affine parameters, so that no branch is silenced by the zero-init of bn3."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model


def make(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norms(rednet.create_model(name, **kwargs))


def image(batch: int = 2, size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[1])).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_registered():
    assert MODELS == ["rednet26", "rednet38", "rednet50", "rednet101", "rednet152"]
    assert rednet.list_models() == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_param_count_and_official_names(name):
    with torch.device("meta"):
        model = rednet.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 4) == PARAMS_M[name]
    official = official_state_dict_keys(LAYERS[name])
    assert len(official) == OFFICIAL_KEYS[name]
    stripped = [key.removeprefix("backbone.").removeprefix("head.") for key in official]
    assert list(model.state_dict()) == stripped


@pytest.mark.parametrize("name", MODELS)
def test_forward_finite_and_backward_reaches_every_parameter(name):
    model = make(name, num_classes=10).train()
    out, grads = forward_backward(model, image())
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    unreached = [n for n, g in grads.items() if not (torch.isfinite(g).all() and g.abs().sum() > 0)]
    assert unreached == []


@pytest.mark.parametrize("name", MODELS)
def test_num_classes_and_reset_classifier(name):
    x = image()
    model = make(name, num_classes=7).train()  # batch statistics: deterministic, and no overflow in deep models
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        assert model.get_classifier().__class__ is torch.nn.Identity
        pooled = model(x)
    assert pooled.shape == (2, model.num_features) == (2, 2048)
    torch.testing.assert_close(pooled, features)


@pytest.mark.parametrize("name", MODELS)
def test_grad_checkpointing_same_output(name):
    model = make(name, num_classes=10).train()
    x = image()
    out, grads = forward_backward(model, x)
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = forward_backward(model, x)
    torch.testing.assert_close(out_ckpt, out)
    torch.testing.assert_close(grads_ckpt, grads)


@pytest.mark.parametrize("name", MODELS)
def test_memory_efficient_same_output_and_gradients(name):
    model = make(name, num_classes=10).train()
    x = image()
    out, grads = forward_backward(model, x)
    model.set_memory_efficient(True)
    assert all(m.memory_efficient for m in model.modules() if isinstance(m, Involution))
    out_me, grads_me = forward_backward(model, x)
    torch.testing.assert_close(out_me, out)
    torch.testing.assert_close(grads_me, grads)


def test_memory_efficient_constructor_argument():
    model = rednet.create_model("rednet26", memory_efficient=True)
    involutions = [m for m in model.modules() if isinstance(m, Involution)]
    assert len(involutions) == 1 + 8 and all(m.memory_efficient for m in involutions)


def test_compile_fullgraph_matches_eager():
    # Training mode (batch statistics) at 64×64: in eval mode an untrained RedNet's fresh BN statistics let the
    # products of generated kernels and features overflow, and BN over the 2 values of a 1×1 map at 32×32 turns
    # rounding differences into sign flips; here the two paths agree to float32 rounding.
    x = image(size=64)
    torch.manual_seed(0)
    model = rednet.create_model("rednet26", num_classes=10, zero_init_last=False).train()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_pretrained_cfg_gives_official_eval_transform():
    model = rednet.create_model("rednet50")
    config = resolve_data_config(model=model)
    assert config["input_size"] == (3, 224, 224)
    assert config["crop_pct"] == 0.875
    assert config["interpolation"] == "bilinear"
    assert config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert config["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert model.pretrained_cfg["first_conv"] == "stem.0.conv"
    assert model.get_classifier(name_only=True) == model.pretrained_cfg["classifier"] == "fc"


def test_group_matcher_covers_every_parameter():
    model = rednet.create_model("rednet26")
    groups = group_parameters(model, model.group_matcher(coarse=False))
    grouped = [name for names in groups.values() for name in names]
    assert sorted(grouped) == sorted(name for name, _ in model.named_parameters())
    assert len(group_parameters(model, model.group_matcher(coarse=True))) == 1 + 4 + 1  # stem, 4 stages, head


def test_stem_kernel_size_7():
    model = rednet.create_model("rednet26", stem_kernel_size=7)
    assert model.stem[1].conv2.conv.weight.shape[0] == 98
    assert rednet.create_model("rednet26").stem[1].conv2.conv.weight.shape[0] == 18
    with pytest.raises(ValueError, match="stem_kernel_size"):
        rednet.create_model("rednet26", stem_kernel_size=5)


def test_in_chans_global_pool_channels_last_and_features():
    x = image(size=64, channels=1)  # 64×64: see test_compile_fullgraph_matches_eager
    torch.manual_seed(0)
    model = rednet.create_model("rednet26", in_chans=1, global_pool="avgmax", num_classes=5, zero_init_last=False)
    with torch.no_grad():
        out = model(x)
        out_cl = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 5)
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-4)
    features = timm.create_model("rednet26", features_only=True, out_indices=(1, 4))
    with torch.no_grad():
        maps = features(image())
    assert [tuple(f.shape) for f in maps] == [(2, 256, 8, 8), (2, 2048, 1, 1)]
    assert features.feature_info.channels() == [256, 2048]


def test_drop_rate_and_drop_path_rate_act_in_training_only():
    x = image()
    model = make("rednet26", drop_path_rate=0.5).train()
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for stage in (model.layer1, model.layer4) for block in stage]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.5)  # linear rise over the 8 blocks
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(x)
        torch.manual_seed(1)
        assert not torch.allclose(model(x), first)
        assert torch.equal(make("rednet26").train()(x), make("rednet26").train()(x))  # no drop path: deterministic
        model.eval()
        features = torch.randn(2, 2048, 3, 3)
        assert all(block.drop_path(features) is features for stage in (model.layer1, model.layer4) for block in stage)

        head = make("rednet26", drop_rate=0.5)
        assert torch.equal(head.eval().forward_head(features), head.forward_head(features))
        assert not torch.equal(head.train().forward_head(features), head.forward_head(features))


def test_unknown_model_name_lists_the_available_ones():
    with pytest.raises(ValueError, match="rednet26, rednet38"):
        rednet.create_model("rednet34")


def test_official_initialization():
    model = rednet.create_model("rednet50")
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0  # zero-init of each block's last BN
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.count_nonzero(model.layer1[0].conv2.conv2.conv.bias) == 0
    conv = model.layer3[0].conv3.weight  # Kaiming normal, fan_out: std = sqrt(2 / (out_channels · 1 · 1))
    assert conv.std().item() == pytest.approx((2 / conv.shape[0]) ** 0.5, rel=0.05)
    assert torch.count_nonzero(rednet.create_model("rednet26", zero_init_last=False).layer1[0].bn3.weight) == 256


def test_forward_intermediates_and_prune():
    x = image()
    model = make("rednet26").train()
    with torch.no_grad():
        final, features = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [f.shape[1] for f in features] == [info["num_chs"] for info in model.feature_info]
        assert [32 // f.shape[-1] for f in features] == [info["reduction"] for info in model.feature_info]
        kept = model.prune_intermediate_layers(indices=[1, 2])
        assert kept == [1, 2] and len(model.layer3) == len(model.layer4) == 0
        pruned = model.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
    torch.testing.assert_close(pruned, features[1:3])
    assert model(x).shape == (2, 512, 4, 4)  # the head is gone too: forward ends at layer2's map


@pytest.mark.parametrize("global_pool", ["avg", "catavgmax"])
def test_head_hidden_size_matches_pre_logits(global_pool):
    model = rednet.create_model("rednet26", global_pool=global_pool, num_classes=3).eval()
    with torch.no_grad():
        pre_logits = model.forward_head(model.forward_features(image(size=32)), pre_logits=True)
    assert pre_logits.shape[-1] == model.head_hidden_size
    model.reset_classifier(4)
    assert pre_logits.shape[-1] == model.head_hidden_size
