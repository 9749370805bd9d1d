"""``kimi-export``'s contract (kimi_compile/cli.py) and ``export_onnx`` failures that need no full export:
one-line ``kimi-export: ...`` errors, the documented exit codes (0 ok, 1 verification failed, 2 bad usage,
3 export failed, 143 SIGTERM), no traceback without ``--debug``, nothing left behind, ``--overwrite``.
(The full CLI run in a fresh process, and external weights, are in ``test_onnx_export.py``; the TensorRT
bundle itself in ``test_tensorrt_bundle.py``.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

from kimi_compile import KimiForCausalLM, tiny_config
from kimi_compile.cli import EXIT_CODES, main
from kimi_compile.config import DENSE, LINEAR
from kimi_compile.export.onnx import ExportError, export_onnx
from kimi_compile.resolve import parse_dtype, resolve_model


def one_layer_model() -> KimiForCausalLM:
    """A single KDA layer with a dense MLP: the cheapest model that exercises the whole export path."""
    cfg = tiny_config("kimi_linear").replace(num_hidden_layers=1, layer_types=[LINEAR], mlp_layer_types=[DENSE])
    return KimiForCausalLM.from_config(cfg, seed=3).eval()


def leftovers(parent, name):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def error_line(err: str) -> str:
    """The CLI's stderr must be exactly one line, ``kimi-export: ...``, and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("kimi-export: ") and "Traceback" not in err, err
    return lines[0]


def run_cli(argv, capsys) -> tuple[int, str]:
    """``main(argv)``; argparse's own errors arrive as SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad usage


def _bad_checkpoint(tmp):
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "config.json").write_text("{ not json")
    return str(tmp / "ckpt")


def _empty_folder(tmp):
    (tmp / "empty").mkdir()
    return str(tmp / "empty")


def _a_file(tmp):
    (tmp / "a_file").write_text("x")
    return str(tmp / "a_file")


def _full_out(tmp):
    (tmp / "out").mkdir(exist_ok=True)
    (tmp / "out" / "previous.txt").write_text("keep me")
    return str(tmp / "out")


# (argv with {model}/{file}/{ckpt}/{out} placeholders, exit code, what the one line must name)
BAD_USAGE = [
    (["--target", "tensorrt", "--opset", "21"], 2, "--opset"),
    (["--target", "tensorrt", "--fallback"], 2, "--fallback"),
    (["--target", "tensorrt", "--benchmark"], 2, "--benchmark"),
    (["--target", "tensorrt", "--new-tokens", "8"], 2, "--new-tokens"),
    (["--target", "tensorrt", "--external-data", "always"], 2, "--external-data"),
    (["--target", "tensorrt", "--bench-prompt-len", "8"], 2, "--bench-prompt-len"),
    (["--target", "tensorrt", "--bench-batch", "2"], 2, "--bench-batch"),
    (["--target", "tensorrt", "--threads", "2"], 2, "--threads"),
    (["--target", "onnx", "--model", "{model}", "--tiny", "k2"], 2, "--tiny"),
    (["--target", "tensorrt", "--model", "{model}", "--seed", "3"], 2, "--seed"),
    (["--target", "onnx", "--model", "{missing}"], 2, "--model"),
    (["--target", "tensorrt", "--model", "{missing}"], 2, "--model"),
    (["--target", "onnx", "--new-tokens", "0"], 2, "--new-tokens"),
    (["--target", "onnx", "--seed", "-1"], 2, "--seed"),
    (["--target", "onnx", "--threads", "0", "--benchmark"], 2, "--threads"),
    (["--target", "onnx", "--out", "{out}"], 2, "--overwrite"),
    (["--target", "tensorrt", "--out", "{out}"], 2, "--overwrite"),
    (["--target", "onnx", "--opset", "25"], 2, "--opset"),
    (["--target", "coreml"], 2, "--target"),
    (["--model", "x"], 2, "--target"),
    (["--target", "tensorrt", "--tiny", "gpt2"], 2, "--tiny"),
    (["--target", "onnx", "--dtype", "int8"], 2, "--dtype"),
    (["--target", "tensorrt", "--seed", "one"], 2, "--seed"),
    (["--target", "onnx", "--out", "{file}"], 3, "{file}"),
    (["--target", "tensorrt", "--out", "{file}"], 3, "{file}"),
    (["--target", "onnx", "--out", "{file}/sub"], 3, "{file}"),  # cannot be created
    (["--target", "tensorrt", "--out", "{file}/sub/deeper"], 3, "{file}"),
    (["--target", "onnx", "--model", "{ckpt}"], 3, "{ckpt}"),  # a bad checkpoint
    (["--target", "tensorrt", "--model", "{ckpt}"], 3, "{ckpt}"),
    (["--target", "onnx", "--model", "{model}"], 3, "{model}"),  # a folder without config.json
]


@pytest.mark.parametrize("argv,code,names", BAD_USAGE, ids=[" ".join(c[0]) for c in BAD_USAGE])
def test_bad_input_gets_one_line_and_its_exit_code(tmp_path, capsys, argv, code, names):
    subs = dict(model=_empty_folder(tmp_path), missing=str(tmp_path / "missing"), file=_a_file(tmp_path),
                ckpt=_bad_checkpoint(tmp_path), out=_full_out(tmp_path))
    argv = [a.format(**subs) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "fresh")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    got, err = run_cli(argv + ["--quiet"], capsys)
    assert got == code, err
    line = error_line(err)
    assert names.format(**subs) in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing removed
    assert (tmp_path / "out" / "previous.txt").read_text() == "keep me"


def test_exit_codes_are_documented():
    import kimi_compile.cli as cli

    assert EXIT_CODES == {0: "ok", 1: "verification failed", 2: "bad usage", 3: "export failed",
                          130: "interrupted (SIGINT)", 143: "terminated (SIGTERM)"}
    for code, what in EXIT_CODES.items():
        assert f"{code} {what}" in cli.build_parser().format_help().replace("\n", " ").replace("  ", " ")


# ------------------------------------------------------------------------------------------------ export failures


@pytest.fixture
def failing_tensorrt_stage(monkeypatch):
    """Replace the TensorRT export's stages by one that raises ``exc`` after writing into the staging folder."""
    from kimi_compile.export import tensorrt as trt_export

    def install(exc):
        def stage(job):
            (job.tmp / "partial.txt").write_text("half done")
            raise exc

        monkeypatch.setattr(trt_export, "STAGES", (("boom", stage),))

    return install


def test_tensorrt_failure_is_exit_3_and_leaves_nothing(tmp_path, capsys, failing_tensorrt_stage):
    failing_tensorrt_stage(RuntimeError("ptxas rejected kda_fp32.ptx\nline 2 of the log"))
    out = tmp_path / "bundle"
    code, err = run_cli(["--target", "tensorrt", "--out", str(out), "--quiet"], capsys)
    assert code == 3
    line = error_line(err)
    assert "ptxas rejected kda_fp32.ptx" in line and "line 2" not in line and str(out) in line
    assert list(tmp_path.iterdir()) == []


def test_debug_adds_the_traceback(tmp_path, capsys, failing_tensorrt_stage):
    failing_tensorrt_stage(RuntimeError("boom"))
    code, err = run_cli(["--target", "tensorrt", "--out", str(tmp_path / "b"), "--quiet", "--debug"], capsys)
    assert code == 3 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("kimi-export: export failed")
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_verification_failure_is_exit_1(tmp_path, capsys, failing_tensorrt_stage):
    from kimi_compile.export.tensorrt import VerificationError

    failing_tensorrt_stage(VerificationError("verification failed: prefill max|diff| 3e-01", {"status": "failed"}))
    report = tmp_path / "report.json"
    code, err = run_cli(["--target", "tensorrt", "--out", str(tmp_path / "b"), "--quiet", "--report-json",
                         str(report)], capsys)
    assert code == 1 and "verification failed" in error_line(err)
    assert json.loads(report.read_text())["status"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_cli_injected_failure_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KIMI_EXPORT_FAIL_AT", "capture")  # after the temporary folder got its first file
    out = tmp_path / "onnx_out"
    code, err = run_cli(["--target", "onnx", "--out", str(out), "--quiet"], capsys)
    assert code == 3
    line = error_line(err)
    assert "injected failure" in line and f"--out {out} is unchanged" in line
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_tensorrt_target_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "kimi_compile.export.tensorrt", None)  # import fails
    code, err = run_cli(["--target", "tensorrt", "--out", str(tmp_path / "trt")], capsys)
    assert code == 3 and "--target tensorrt is not available" in error_line(err)
    assert not (tmp_path / "trt").exists()


# ------------------------------------------------------------------------------------------------ --out


def test_overwrite_replaces_a_previous_export(tmp_path, capsys, monkeypatch):
    from kimi_compile.export import tensorrt as trt_export

    def write_bundle(job):  # a complete (stand-in) bundle: the CLI and the staging folder do the rest
        (job.tmp / "bundle.json").write_text("{}")

    monkeypatch.setattr(trt_export, "STAGES", (("write", write_bundle),))
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("old")
    code, err = run_cli(["--target", "tensorrt", "--out", str(out), "--quiet"], capsys)
    assert code == 2 and "--overwrite" in error_line(err) and (out / "previous.txt").exists()
    code, err = run_cli(["--target", "tensorrt", "--out", str(out), "--quiet", "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["bundle.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_out_folder_needs_no_overwrite(tmp_path, capsys, failing_tensorrt_stage):
    failing_tensorrt_stage(RuntimeError("stop after the usage checks"))
    (tmp_path / "empty").mkdir()
    code, err = run_cli(["--target", "tensorrt", "--out", str(tmp_path / "empty"), "--quiet"], capsys)
    assert code == 3 and "stop after the usage checks" in error_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ------------------------------------------------------------------------------------------------ signals

SIGTERM_PROBE = textwrap.dedent("""
    import sys
    from kimi_compile.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("target", ["onnx", "tensorrt"])
def test_sigterm_removes_the_temporary_folder(tmp_path, target):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_PROBE, "--target", target, "--out", str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not leftovers(tmp_path, "out"):  # the export has started writing
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never created its temporary folder"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in error_line(err)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ --tiny


def test_tiny_k2_exports_a_k2_tensorrt_bundle(tmp_path, capsys):
    out, report = tmp_path / "k2", tmp_path / "k2.json"
    code, err = run_cli(["--target", "tensorrt", "--tiny", "k2", "--seed", "5", "--out", str(out), "--quiet",
                         "--report-json", str(report)], capsys)
    assert code == 0, err
    bundle = json.loads((out / "bundle.json").read_text())
    assert bundle["model_type"] == "kimi_k2" and bundle["plugins"] == {}  # no KDA layer: no plugin node
    assert "position_ids" in {i["name"] for i in bundle["inputs"]}
    assert bundle["verification"]["status"] == "passed"  # ORT fed position_ids, matched PyTorch
    assert json.loads(report.read_text())["verification"]["status"] == "passed"
    # --seed reached the model: the exported weights are the seed-5 model's, not the default seed's
    from kimi_compile.export.tensorrt import verify_with_onnxruntime

    other = KimiForCausalLM.from_config(tiny_config("k2"), seed=0).eval()
    assert verify_with_onnxruntime(out / "model.onnx", other)["status"] == "failed"


# ------------------------------------------------------------------------------------------------ export_onnx


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


# ------------------------------------------------------------------------------------------------ resolve_model


@pytest.mark.parametrize("value,want", [
    (None, None), ("float32", torch.float32), ("torch.bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
    ("half", torch.float16), (torch.float16, torch.float16),
])
def test_parse_dtype_accepts(value, want):
    assert parse_dtype(value) is want


@pytest.mark.parametrize("value", ["int8", "float64", torch.float64, torch.int32, 32, "", "floaty"])
def test_parse_dtype_rejects_and_names_the_argument(value):
    with pytest.raises(ValueError, match=r"^export dtype must be one of float32, float16, bfloat16, got"):
        parse_dtype(value, name="export dtype")


def test_parse_dtype_choices():
    from kimi_compile.dtypes import MODEL_DTYPES

    assert parse_dtype("fp64", choices=MODEL_DTYPES) is torch.float64


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(tiny="gpt2"), ValueError, "tiny must be one of kimi_linear, kimi_linear_attnres, k2"),
    (dict(seed=-1), ValueError, "seed must be"),
    (dict(seed=1.5), ValueError, "seed must be"),
    (dict(dtype="int8"), ValueError, "dtype must be"),
    (dict(model="/nonexistent/ckpt"), FileNotFoundError, "model /nonexistent/ckpt"),
    (dict(model=object()), TypeError, "model must be"),
    (dict(model="MODEL", tiny="k2"), ValueError, "tiny="),
    (dict(model="MODEL", seed=1), ValueError, "seed="),
    (dict(model="MODEL", dtype="bfloat16"), ValueError, "dtype=torch.bfloat16"),
])
def test_resolve_model_rejects_and_names_the_argument(kwargs, exc, match):
    if kwargs.get("model") == "MODEL":
        kwargs["model"] = one_layer_model()
    with pytest.raises(exc, match=match):
        resolve_model(**kwargs)


def test_resolve_model_builds_the_named_tiny_model():
    model = resolve_model(None, "bfloat16", tiny="kimi_linear_attnres", seed=4)
    assert model.dtype == torch.bfloat16 and model.config.attn_res_block_size == 2 and not model.training
    again = resolve_model(tiny="kimi_linear_attnres", seed=4)
    other = resolve_model(tiny="kimi_linear_attnres", seed=5)
    w = "model.embed_tokens.weight"
    assert torch.equal(again.state_dict()[w], resolve_model(tiny="kimi_linear_attnres", seed=4).state_dict()[w])
    assert not torch.equal(again.state_dict()[w], other.state_dict()[w])
    assert resolve_model(tiny="k2").config.model_type == "kimi_k2"
