"""Embedding models, the registry / build_model, and plain-torch augmentation."""

from __future__ import annotations

import pytest
import torch

from tripletlab import InputError, InputTypeError
from tripletlab.data.augment import AUGMENT_PRESETS, Augment
from tripletlab.models import MODEL_DEFAULTS, MODELS, build_augment, build_model
from tripletlab.models import default_model_config as default_config

# ------------------------------------------------------------------------------- models


@pytest.mark.parametrize("shape", [[1, 28, 28], [3, 17, 23], [1, 5, 5], [1, 1, 1], [3, 112, 92]])
@pytest.mark.parametrize("pool", ["avg", "flatten"])
def test_cnn_any_size_unit_norm(shape, pool):
    m = build_model(
        {
            "name": "cnn",
            "input_shape": shape,
            "embedding_dim": 16,
            "channels": [4, 8, 8],
            "pool": pool,
        }
    )
    e = m(torch.rand(3, *shape))
    assert e.shape == (3, 16)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)


def test_cnn_block_structure_and_global_average_pool():
    m = build_model({"name": "cnn", "input_shape": [1, 32, 32], "channels": [8, 16]})
    kinds = [type(layer).__name__ for layer in m.body]
    block = ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert kinds == block * 2
    assert m.head.proj.in_features == 16  # global average pooling: independent of the size


@pytest.mark.parametrize("name, shape", [("mlp", [64]), ("cnn", [1, 12, 10]), ("cnn", [3, 9, 9])])
def test_rebuild_from_saved_config_gives_the_same_function(name, shape):
    torch.manual_seed(0)
    m = build_model({"name": name, "input_shape": shape, "embedding_dim": 8}).eval()
    m2 = build_model(dict(m.config))
    m2.load_state_dict(m.state_dict())
    m2.eval()
    x = torch.rand(4, *shape)
    assert torch.equal(m(x), m2(x))
    assert set(m.config) >= {"name", "input_shape", "embedding_dim", "normalize"}


def test_normalize_off_and_per_image_standardisation():
    m = build_model({"name": "mlp", "input_shape": [10], "normalize": False, "embedding_dim": 5})
    e = m.eval()(torch.rand(6, 10) * 10)
    assert not torch.allclose(e.norm(dim=1), torch.ones(6))
    c = build_model({"name": "cnn", "input_shape": [1, 8, 8], "input_norm": "per_image"}).eval()
    x = torch.rand(2, 1, 8, 8)
    # brightness and contrast changes do not change the embedding
    assert torch.allclose(c(x), c(3.0 * x + 0.5), atol=1e-4)


def test_registry_is_the_single_list_of_models():
    assert sorted(MODELS) == sorted(MODEL_DEFAULTS) == ["backbone", "cnn", "mlp"]
    m = MODELS["mlp"](input_shape=[6], embedding_dim=3)  # a registry entry is a plain factory
    assert m(torch.rand(2, 6)).shape == (2, 3)
    no_hidden = build_model({"name": "mlp", "input_shape": [6], "hidden": []})
    assert no_hidden(torch.rand(2, 6)).shape == (2, 64)
    assert default_config([64])["name"] == "mlp"
    assert default_config([3, 32, 32], embedding_dim=32) == {
        "name": "cnn",
        "input_shape": [3, 32, 32],
        "embedding_dim": 32,
    }


@pytest.mark.parametrize(
    "config, error, match",
    [
        ({"name": "os.system", "input_shape": [4]}, InputError, "unknown model"),
        ({"name": "torch.nn.Linear", "input_shape": [4]}, InputError, "unknown model"),
        ({"input_shape": [4]}, InputError, "unknown model"),
        ({"name": "mlp", "input_shape": [4], "evil": 1}, InputError, "unknown keys"),
        ({"name": "mlp"}, InputError, "input_shape"),
        ({"name": "mlp", "input_shape": [0]}, InputError, "input_shape"),
        ({"name": "mlp", "input_shape": "64"}, InputError, "input_shape"),
        ({"name": "mlp", "input_shape": [4], "embedding_dim": "64"}, InputError, "embedding_dim"),
        ({"name": "mlp", "input_shape": [4], "embedding_dim": 0}, InputError, "embedding_dim"),
        ({"name": "mlp", "input_shape": [4], "normalize": "yes"}, InputError, "normalize"),
        ({"name": "mlp", "input_shape": [1, 8, 8]}, InputError, "vectors"),
        ({"name": "cnn", "input_shape": [64]}, InputError, "images"),
        ({"name": "cnn", "input_shape": [1, 8, 8], "pool": "max"}, InputError, "pool"),
        ({"name": "cnn", "input_shape": [1, 8, 8], "input_norm": "x"}, InputError, "input_norm"),
        ({"name": "mlp", "input_shape": [4], "hidden": 7}, InputError, "hidden"),
        ({"name": "mlp", "input_shape": [4], "hidden": [-1]}, InputError, "hidden"),
        ({"name": "cnn", "input_shape": [1, 8, 8], "channels": []}, InputError, "channels"),
        ({"name": "cnn", "input_shape": [1, 8, 8], "channels": [8.5]}, InputError, "channels"),
        ({"name": "cnn", "input_shape": [1, 8, 8], "dropout": 1.0}, InputError, "dropout"),
        (["mlp"], InputTypeError, "dict"),
    ],
)
def test_bad_configs_are_clear_errors(config, error, match):
    with pytest.raises(error, match=match):
        build_model(config)


# ------------------------------------------------------------------------- augmentation


def test_augment_is_seeded_resumable_and_keeps_shape_and_range():
    x = torch.rand(5, 1, 20, 16)
    a1 = build_augment("faces", seed=0)
    a2 = build_augment(dict(AUGMENT_PRESETS["faces"]), seed=0)
    y1, y2 = a1(x), a2(x)
    assert y1.shape == x.shape and torch.equal(y1, y2) and not torch.equal(y1, x)
    assert y1.min() >= 0.0 and y1.max() <= 1.0  # bilinear + border padding stays in range
    state = a1.get_state()
    z = a1(x)
    a1.set_state(state)
    assert torch.equal(a1(x), z)
    assert not torch.equal(build_augment("faces", seed=1)(x), y1)


def test_flip_only_flips_and_identity_affine_is_identity():
    x = torch.rand(64, 3, 6, 7)
    y = Augment(hflip=True, seed=0)(x)
    flipped = [torch.equal(y[i], x[i].flip(2)) for i in range(64)]
    kept = [torch.equal(y[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 10 < sum(flipped) < 54
    assert torch.equal(Augment(seed=0)(x), x)


def test_crop_pad_shifts_within_the_pad():
    x = torch.zeros(8, 1, 10, 10)
    x[:, :, 5, 5] = 1.0
    y = build_augment({"crop_pad": 2}, seed=3)(x)
    assert y.shape == x.shape
    for i in range(8):
        r, c = divmod(int(y[i, 0].argmax()), 10)
        assert abs(r - 5) <= 2 and abs(c - 5) <= 2 and y[i].sum() == 1.0


def test_affine_rotation_moves_pixels():
    x = torch.zeros(4, 1, 21, 21)
    x[:, :, 10, 2:19] = 1.0  # a horizontal bar
    y = Augment(affine_degrees=45.0, seed=0)(x)
    assert not torch.allclose(y, x)
    assert torch.allclose(y[:, :, 10, 10], x[:, :, 10, 10], atol=0.05)  # centre stays put


def test_augment_options_errors():
    assert build_augment(None) is None and build_augment("none") is None
    assert build_augment({}) is None
    with pytest.raises(InputError, match="preset"):
        build_augment("wild")
    with pytest.raises(InputError, match="unknown augmentation keys"):
        build_augment({"rotate": 5})
    with pytest.raises(InputError, match=">= 0"):
        build_augment({"affine_degrees": -1.0})
    for bad in ({"scale": 1.1}, {"scale": [1.2, 0.9]}, {"translate": 2.0}):
        with pytest.raises(InputError, match="invalid augmentation"):
            build_augment(bad)


# --------------------------------------------------------------- test-time augmentation


def test_tta_averages_views_in_eval_mode_only():
    torch.manual_seed(0)
    cfg = {"name": "cnn", "input_shape": [1, 16, 12], "channels": [4, 8], "embedding_dim": 8}
    plain = build_model(cfg)
    tta = build_model({**cfg, "tta": {"scales": [0.9, 1.0, 1.1], "hflip": True}})
    tta.load_state_dict(plain.state_dict())
    x = torch.rand(5, 1, 16, 12)
    torch.manual_seed(1)
    a = plain.train()(x)
    torch.manual_seed(1)
    assert torch.equal(tta.train()(x), a)  # training sees the plain forward
    plain.eval(), tta.eval()
    e = tta(x)
    assert torch.allclose(e.norm(dim=1), torch.ones(5), atol=1e-5)
    assert not torch.allclose(e, plain(x), atol=1e-4)
    assert torch.allclose(e, tta(x.flip(3)), atol=1e-5)  # mirrored views: flip-invariant
    assert tta.config["tta"] == {"scales": [0.9, 1.0, 1.1], "hflip": True}
    rebuilt = build_model(dict(tta.config))
    rebuilt.load_state_dict(tta.state_dict())
    assert torch.equal(rebuilt.eval()(x), e)  # config.json carries the TTA views


@pytest.mark.parametrize(
    "tta",
    [{"scales": []}, {"scales": [0.0]}, {"scales": ["1"]}, {"hflip": "yes"}, {"zoom": 1}, [1.0]],
)
def test_tta_bad_options(tta):
    with pytest.raises(InputError, match="tta"):
        build_model({"name": "cnn", "input_shape": [1, 8, 8], "tta": tta})
