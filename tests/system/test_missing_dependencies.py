"""One message for every missing optional package, naming its pip install line (issue #24)."""

import sys

import pytest

from tripletlab.cli import main
from tripletlab.errors import (
    OPTIONAL_PACKAGES,
    MissingDependencyError,
    missing_dependency,
    require,
)


@pytest.mark.parametrize("module", sorted(OPTIONAL_PACKAGES))
def test_every_optional_package_names_its_install_line(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    with pytest.raises(MissingDependencyError, match="pip install") as e:
        require(module, "this feature")
    pip_name, extra = OPTIONAL_PACKAGES[module]
    assert f"'{pip_name}'" in str(e.value) and "this feature needs" in str(e.value)
    if extra:
        assert f"pip install 'tripletlab[{extra}]'" in str(e.value)
    assert isinstance(e.value, ImportError)


def test_export_without_onnx_names_the_extra(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "--model", str(tmp_path), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tripletlab[serve]'" in err and "ModuleNotFoundError" not in err


def test_tune_and_tensorboard_use_the_same_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    from tripletlab.train.callbacks import TensorBoard

    with pytest.raises(MissingDependencyError, match=r"tripletlab\[tensorboard\]"):
        TensorBoard()
    assert "tripletlab[tune]" in str(missing_dependency("optuna", "tune"))


def test_bench_without_a_checkout_says_so(monkeypatch, capsys, tmp_path):
    from tripletlab.cli import bench

    monkeypatch.setattr(bench, "_candidates", lambda: [tmp_path / "absent.py"])
    monkeypatch.delitem(sys.modules, "bench_mining", raising=False)
    assert bench.run_benchmark([]) == 1
    assert "needs a source checkout" in capsys.readouterr().err
