"""``kimi-export`` and ``export_onnx`` behaviour that needs no full tiny-model export: failures leave nothing
behind, a previous output survives a failed export, argument errors, the TensorRT target when missing.
(The full CLI run in a fresh process, and external weights, are in ``test_onnx_export.py``.)"""

from __future__ import annotations

import sys
import warnings

import pytest

from kimi_compile import KimiForCausalLM, tiny_config
from kimi_compile.cli import main
from kimi_compile.config import DENSE, LINEAR
from kimi_compile.export.onnx import ExportError, export_onnx


def one_layer_model() -> KimiForCausalLM:
    """A single KDA layer with a dense MLP: the cheapest model that exercises the whole export path."""
    cfg = tiny_config("kimi_linear").replace(num_hidden_layers=1, layer_types=[LINEAR], mlp_layer_types=[DENSE])
    return KimiForCausalLM.from_config(cfg, seed=3).eval()


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_cli_injected_failure_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KIMI_EXPORT_FAIL_AT", "capture")  # after the temporary folder got its first file
    out = tmp_path / "onnx_out"
    assert main(["--target", "onnx", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "injected failure" in err and "nothing was written" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_previous_output(tmp_path):
    out = tmp_path / "model_dir"
    out.mkdir()
    (out / "previous.txt").write_text("keep me")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ExportError, match="finalize"):
            export_onnx(one_layer_model(), out, progress=False, _fail_at="finalize")  # everything written by then
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert leftovers(tmp_path, "model_dir") == []


def test_failure_inside_the_model_leaves_nothing(tmp_path):
    model = one_layer_model()

    def broken(*args, **kwargs):
        raise RuntimeError("boom in forward")

    model.model.forward = broken
    out = tmp_path / "x"
    with pytest.raises(ExportError, match="capture.*boom in forward"):
        export_onnx(model, out, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs,match", [
    (dict(opset=22), "opset"),
    (dict(opset=21, fallback=False), "opset=21"),
    (dict(dtype="int8"), "dtype"),
    (dict(external_data="sometimes"), "external_data"),
])
def test_export_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(None, tmp_path / "o", progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_export_rejects_non_model(tmp_path):
    with pytest.raises(ExportError, match="model must be"):
        export_onnx(object(), tmp_path / "o", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_missing_model_dir(tmp_path, capsys):
    assert main(["--target", "onnx", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--target", "onnx", "--opset", "25"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["--target", "coreml"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_tensorrt_target_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kimi_compile.export.tensorrt", None)  # import fails
    assert main(["--target", "tensorrt", "--out", str(tmp_path / "trt")]) == 3
    assert "tensorrt is not available" in capsys.readouterr().err
    assert not (tmp_path / "trt").exists()
