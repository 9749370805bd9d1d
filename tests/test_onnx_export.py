"""Whole-model ONNX export + ONNX Runtime (CPU) against PyTorch.

Exports (each done once per test run, shared across pytest-xdist workers through a file lock):
* the built-in tiny Kimi Linear, through the ``kimi-export`` console script in a fresh process (as CI runs it),
* tiny Kimi Linear with Block Attention Residuals (random, non-zero pseudo-queries),
* tiny Kimi K2 (MLA + YaRN RoPE: ``position_ids`` input),
* tiny Kimi Linear with the opset <= 21 fallback lowering (weights as external data),
* a transformers-saved tiny ``KimiLinearForCausalLM`` checkpoint (loaded with ``kimi_compile.load_model``).

tests/test_genai.py runs the same folders in onnxruntime-genai (its fixtures are imported from here).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import kimi_compile
from kimi_compile import KimiForCausalLM, tiny_config
from kimi_compile.export.onnx import export_onnx, graph_op_counts
from kimi_compile.export.mla_cache import graph_state_specs
from kimi_compile.export.ort_runtime import OrtKimiModel

pytest.importorskip("onnxruntime")

TOL = 1e-4  # float32 logits, ONNX Runtime vs PyTorch


# ------------------------------------------------------------------------------------------------ shared exports


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shared(tmp_path_factory, key: str, build) -> Path:
    """``build(target)`` once per test run (all xdist workers share the base temp's parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    target = root / f"kimi-onnx-{key}"
    with _locked(root / f"kimi-onnx-{key}.lock"):
        if not (target / "model.onnx").is_file():
            build(target)
    return target


@functools.lru_cache(maxsize=None)
def tiny_model(kind: str) -> KimiForCausalLM:
    if kind == "kimi_linear":
        return KimiForCausalLM.from_config(tiny_config("kimi_linear"), seed=0).eval()  # == the CLI's model
    if kind == "attnres":
        model = KimiForCausalLM.from_config(tiny_config("kimi_linear", attn_res_block_size=2), seed=1).eval()
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():  # non-uniform depth mixing (the paper's zero init would be a plain average)
            for name, p in model.named_parameters():
                if "attn_res_query" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        return model
    if kind == "k2":
        return KimiForCausalLM.from_config(tiny_config("k2"), seed=2).eval()
    raise ValueError(kind)


def _kimi_export_command() -> list[str]:
    script = Path(sys.executable).with_name("kimi-export")
    found = str(script) if script.is_file() else shutil.which("kimi-export")
    assert found, "the kimi-export console script is not installed (pip install -e .)"
    return [found]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """``kimi-export --target onnx --opset 27 --out DIR`` in a fresh process, from a directory outside the repository
    (the opset-27 graph; the default lowering is the fallback graph, covered by test_genai)."""
    def build(target: Path) -> None:
        work = target.parent / "cli-cwd"
        work.mkdir(exist_ok=True)
        report = target.parent / "cli-report.json"
        proc = subprocess.run(_kimi_export_command() + ["--target", "onnx", "--opset", "27", "--out", str(target),
                                                        "--report-json", str(report), "--quiet"],
                              cwd=work, capture_output=True, text=True, timeout=900)
        (target.parent / "cli-stdout.txt").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    out = _shared(tmp_path_factory, "cli", build)
    report = json.loads((out.parent / "cli-report.json").read_text())
    stdout = (out.parent / "cli-stdout.txt").read_text()
    return out, report, stdout


def _export_fixture(tmp_path_factory, key, model_fn, **kwargs) -> Path:
    def build(target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(model_fn(), target, progress=False, **kwargs)

    return _shared(tmp_path_factory, key, build)


@pytest.fixture(scope="module")
def attnres_dir(tmp_path_factory):
    return _export_fixture(tmp_path_factory, "attnres", lambda: tiny_model("attnres"), opset=27)


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory):
    return _export_fixture(tmp_path_factory, "k2", lambda: tiny_model("k2"), opset=27)


@pytest.fixture(scope="module")
def fallback_dir(tmp_path_factory):
    # also the external-data layout: weights in model.onnx.data
    return _export_fixture(tmp_path_factory, "fallback", lambda: tiny_model("kimi_linear"), opset=21,
                           external_data="always")


# ------------------------------------------------------------------------------------------------ helpers


def _ids(B: int, T: int, seed: int, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_matches(onnx_dir: Path, model: KimiForCausalLM, B: int, T: int, seed: int, tol: float = TOL) -> None:
    """Logits and every present.* of one fresh-state call agree with the model."""
    runner = OrtKimiModel(onnx_dir)
    ids = _ids(B, T, seed, model.config.vocab_size)
    logits, state = runner(ids)
    with torch.no_grad():
        ref_logits, ref_state = model(ids)
    assert logits.shape == (B, T, model.config.vocab_size)
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=tol)
    state = runner.model_state(state)  # the split MLA halves joined back into the model's absorbed cache
    assert set(state) == set(ref_state)
    for name, ref in ref_state.items():
        np.testing.assert_allclose(state[name].numpy(), ref.numpy(), rtol=0, atol=tol, err_msg=name)


def assert_split_prefill(onnx_dir: Path, B: int, T: int, cut: int, seed: int) -> None:
    runner = OrtKimiModel(onnx_dir)
    ids = _ids(B, T, seed)
    one_logits, one_state = runner(ids)
    l1, st = runner(ids[:, :cut])
    l2, two_state = runner(ids[:, cut:], st)
    np.testing.assert_allclose(np.concatenate([l1, l2], 1), one_logits, rtol=0, atol=TOL)
    for name in one_state:
        np.testing.assert_allclose(two_state[name].numpy(), one_state[name].numpy(), rtol=0, atol=TOL)


def assert_same_tokens(onnx_dir: Path, model: KimiForCausalLM, B: int, T: int, seed: int, n: int = 32) -> None:
    ids = _ids(B, T, seed, model.config.vocab_size)
    ref = kimi_compile.generate(model, ids, n)
    got = kimi_compile.generate(None, ids, n, backend="onnx", onnx_dir=str(onnx_dir), onnx_runtime="onnxruntime")
    assert got.shape == (B, T + n) and got.dtype == torch.int64
    assert torch.equal(got, ref), (got, ref)


def _io(onnx_dir: Path):
    m = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return m, {v.name: dims(v) for v in m.graph.input}, {v.name: dims(v) for v in m.graph.output}


def assert_contract_io(onnx_dir: Path, model: KimiForCausalLM) -> None:
    m, inputs, outputs = _io(onnx_dir)
    specs = graph_state_specs(model.config, model.dtype, "split")
    expected_in = ["input_ids"] + (["position_ids"] if model.config.use_rope else []) + [s.name for s in specs]
    assert [v.name for v in m.graph.input] == expected_in
    assert [v.name for v in m.graph.output] == ["logits"] + [s.present_name for s in specs]
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert outputs["logits"] == ["batch_size", "sequence_length", model.config.vocab_size]
    for s in specs:
        assert inputs[s.name] == list(s.shape)
        assert outputs[s.present_name] == ["total_sequence_length" if d == "past_sequence_length" else d
                                           for d in s.shape]
    if model.config.use_rope:
        assert inputs["position_ids"] == ["batch_size", "sequence_length"]
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    onnx.checker.check_model(str(onnx_dir / "model.onnx"), full_check=True)
    io = json.loads((onnx_dir / "kimi_compile.json").read_text())
    assert [e["input"] for e in io["state"]] == [s.name for s in specs]
    assert io["mla_cache"] == "split" and io["onnxruntime_genai"]
    genai = json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
    if model.config.mla_layers:  # GenAI's MQA view of the cache: one kv head of half the absorbed row
        assert genai["head_size"] * 2 >= model.config.mla_cache_dim and genai["num_key_value_heads"] == 1


# ------------------------------------------------------------------------------------------------ tiny Kimi Linear (CLI)


def test_cli_fresh_process_export(cli_export):
    out, report, stdout = cli_export
    assert report["status"] == 0 and report["opset"] == 27 and not report["fallback"]
    assert report["verify"]["tokens_identical"] and report["verify"]["new_tokens"] == 32
    assert report["verify"]["max_logit_err"] < TOL
    assert "LinearAttention 3" in stdout and "CausalConvWithState 3" in stdout
    assert "identical" in stdout and "timing" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "genai_config.json", "kimi_compile.json",
                                                     "model.onnx"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".kimi-onnx-cli.tmp")]


def test_kimi_linear_graph(cli_export):
    out, _, _ = cli_export
    model = tiny_model("kimi_linear")
    assert_contract_io(out, model)
    m, _, _ = _io(out)
    assert {o.domain: o.version for o in m.opset_import}[""] == 27
    ops = graph_op_counts(m)
    n_kda = len(model.config.kda_layers)
    assert ops["LinearAttention"] == n_kda and ops["CausalConvWithState"] == n_kda


@pytest.mark.parametrize("B,T", [(1, 1), (3, 1), (1, 2), (3, 5), (1, 16), (3, 33)])
def test_kimi_linear_logits_match(cli_export, B, T):
    assert_matches(cli_export[0], tiny_model("kimi_linear"), B, T, seed=10 * B + T)


def test_kimi_linear_prefill_in_two_calls(cli_export):
    assert_split_prefill(cli_export[0], B=3, T=21, cut=8, seed=1)
    assert_split_prefill(cli_export[0], B=1, T=9, cut=1, seed=2)


def test_kimi_linear_generate_32_tokens(cli_export):
    assert_same_tokens(cli_export[0], tiny_model("kimi_linear"), B=3, T=6, seed=3)


def test_state_is_interchangeable_with_pytorch(cli_export):
    """PyTorch's state continues in ONNX Runtime and vice versa (same names, layouts, dtypes)."""
    model, runner = tiny_model("kimi_linear"), OrtKimiModel(cli_export[0])
    ids = _ids(2, 11, 3)
    with torch.no_grad():
        _, pt_state = model(ids[:, :7])
        ref_logits, _ = model(ids[:, 7:], pt_state)
    logits, _ = runner(ids[:, 7:], runner.graph_state(pt_state))
    np.testing.assert_allclose(logits, ref_logits.numpy(), rtol=0, atol=TOL)
    _, ort_state = runner(ids[:, :7])
    with torch.no_grad():
        got, _ = model(ids[:, 7:], runner.model_state(ort_state))
    np.testing.assert_allclose(got.numpy(), ref_logits.numpy(), rtol=0, atol=TOL)


# ------------------------------------------------------------------------------------------------ AttnRes, K2, fallback


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (2, 19)])
def test_attnres_logits_match(attnres_dir, B, T):
    assert_matches(attnres_dir, tiny_model("attnres"), B, T, seed=B + T)


def test_attnres_graph_and_tokens(attnres_dir):
    model = tiny_model("attnres")
    assert_contract_io(attnres_dir, model)
    ops = graph_op_counts(onnx.load(str(attnres_dir / "model.onnx")))
    assert ops["LinearAttention"] == len(model.config.kda_layers)
    assert_split_prefill(attnres_dir, B=2, T=12, cut=5, seed=4)
    assert_same_tokens(attnres_dir, model, B=3, T=5, seed=9)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 6), (1, 30)])
def test_k2_logits_match(k2_dir, B, T):
    assert_matches(k2_dir, tiny_model("k2"), B, T, seed=B * 7 + T)


def test_k2_graph_tokens_and_positions(k2_dir):
    model = tiny_model("k2")
    assert_contract_io(k2_dir, model)
    ops = graph_op_counts(onnx.load(str(k2_dir / "model.onnx")))
    assert "LinearAttention" not in ops and "CausalConvWithState" not in ops  # K2 has no KDA layer
    assert_split_prefill(k2_dir, B=2, T=10, cut=3, seed=5)
    assert_same_tokens(k2_dir, model, B=3, T=4, seed=11)
    # explicit position_ids (rows at different offsets) reach the rotary embedding
    ids = _ids(2, 5, 12)
    pos = torch.tensor([[0, 1, 2, 3, 4], [40, 41, 42, 43, 44]])
    logits, _ = OrtKimiModel(k2_dir)(ids, position_ids=pos)
    with torch.no_grad():
        ref, _ = model(ids, None, pos)
    np.testing.assert_allclose(logits, ref.numpy(), rtol=0, atol=TOL)


def test_fallback_graph_has_no_opset27_ops(fallback_dir):
    model = tiny_model("kimi_linear")
    assert_contract_io(fallback_dir, model)
    m = onnx.load(str(fallback_dir / "model.onnx"))
    assert {o.domain: o.version for o in m.opset_import}[""] <= 21
    ops = graph_op_counts(m)  # counts nodes inside Loop bodies too
    assert "LinearAttention" not in ops and "CausalConvWithState" not in ops
    assert ops["Conv"] == len(model.config.kda_layers) and ops["Loop"] >= 2 * len(model.config.kda_layers)
    # external weights: every initializer above a few hundred bytes lives in model.onnx.data
    bare = onnx.load(str(fallback_dir / "model.onnx"), load_external_data=False)
    inline = [t.name for t in bare.graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL and len(t.raw_data) > 1024]
    assert inline == []
    assert (fallback_dir / "model.onnx.data").stat().st_size > 2 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("B,T", [(1, 1), (3, 17), (1, 40)])
def test_fallback_logits_match(fallback_dir, B, T):
    assert_matches(fallback_dir, tiny_model("kimi_linear"), B, T, seed=3 * B + T)


def test_fallback_prefill_split_and_tokens(fallback_dir):
    assert_split_prefill(fallback_dir, B=2, T=37, cut=20, seed=6)
    assert_same_tokens(fallback_dir, tiny_model("kimi_linear"), B=3, T=6, seed=3)


# ------------------------------------------------------------------------------------------------ transformers checkpoint


def _hf_kimi_linear(tmp_path_factory):
    """A transformers KimiLinearForCausalLM (KDA + MLA + MoE) with clear argmax margins, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path_factory.mktemp("hf-kimi-linear")
    cfg = transformers.KimiLinearConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"], linear_head_dim=16, linear_num_heads=2,
        linear_conv_kernel_dim=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    torch.manual_seed(0)
    hf = transformers.KimiLinearForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: clear argmax margins, real routing choices
        for name, p in hf.named_parameters():
            if name.endswith("weight") and p.dim() >= 2:
                p.mul_(4.0)
        for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape) * 0.1)
    hf.save_pretrained(ckpt)
    return hf, ckpt


@pytest.fixture(scope="module")
def hf_kimi_linear(tmp_path_factory):
    """(transformers model, its ONNX export folder, the checkpoint)."""
    hf, ckpt = _hf_kimi_linear(tmp_path_factory)

    def build(target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(str(ckpt), target, progress=False)

    return hf, _shared(tmp_path_factory, "transformers", build), ckpt


def test_transformers_checkpoint_generates_like_transformers(hf_kimi_linear):
    hf, out, _ = hf_kimi_linear
    ids = _ids(2, 7, 21, vocab=256)
    n = 32
    hf.generation_config.eos_token_id = None  # exactly n tokens, no stopping rule, no logits processors
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    got = kimi_compile.generate(None, ids, n, backend="onnx", onnx_dir=str(out), onnx_runtime="onnxruntime")
    assert torch.equal(got, ref), (got, ref)


# ------------------------------------------------------------------------------------------------ half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_export(tmp_path, dtype):
    """A [KDA, MLA] model with a MoE layer in float16 / bfloat16: the graph passes the full checker with the
    model dtype on every state tensor; float16 also runs in ONNX Runtime CPU close to PyTorch (bfloat16 has
    no CPU kernels there: it is for GPU runtimes)."""
    from kimi_compile.config import DENSE, FULL, LINEAR, SPARSE

    cfg = tiny_config("kimi_linear").replace(num_hidden_layers=2, layer_types=[LINEAR, FULL],
                                             mlp_layer_types=[DENSE, SPARSE])
    model = KimiForCausalLM.from_config(cfg, seed=4, dtype=dtype).eval()
    out = tmp_path / "half"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, out, opset=27, progress=False)  # runs onnx.checker (full) itself
    assert_contract_io(out, model)
    m, _, _ = _io(out)
    elem = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    types = {v.name: v.type.tensor_type.elem_type for v in m.graph.input}
    assert types["past_key_values.0.conv_state"] == elem and types["past_key_values.1.key"] == elem
    assert types["past_key_values.0.recurrent_state"] == onnx.TensorProto.FLOAT
    assert graph_op_counts(m)["LinearAttention"] == 1
    if dtype == torch.float16:
        ids = _ids(2, 9, 8)
        logits, state = OrtKimiModel(out)(ids)
        with torch.no_grad():
            ref, _ = model(ids)
        scale = float(ref.abs().max())
        assert np.abs(logits - ref.numpy()).max() < 2e-2 * max(scale, 1.0)
        assert state["past_key_values.1.key"].numpy().dtype == np.float16
