"""onnxruntime-genai 0.18 (CPU) runs what ``kimi-export --target onnx`` writes, unmodified.

Each folder of tests/test_onnx_export.py (exported once per run, shared through its fixtures) plus a
transformers DeepseekV3ForCausalLM checkpoint is loaded with ``og.Model(dir)`` and generated with GenAI's own
batched greedy search (``og.Generator``); tokens must equal ``kimi_compile.generate(..., backend="eager")``.
GenAI stops a row at eos and pads it with ``pad_token_id``; the eager side runs with the same ``eos_token_id``,
whose rule is that a finished row keeps producing eos, so GenAI's padding is read as eos.
Also here: the GenAI features tried on the export, ``generate(backend="onnx")`` through GenAI, the ``generate``
argument rules, the MLA cache halves, and the import-cycle check of the generation / lowering modules.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import kimi_compile
from kimi_compile.export.mla_cache import from_graph_state, graph_state_specs, to_graph_state
from kimi_compile.export.ort_runtime import OrtKimiModel

og = pytest.importorskip("onnxruntime_genai")

from test_onnx_export import (  # noqa: E402,F401  (fixtures shared with the ONNX Runtime tests)
    _ids,
    _shared,
    attnres_dir,
    cli_export,
    export_onnx,
    fallback_dir,
    hf_kimi_linear,
    k2_dir,
    tiny_model,
)

N_NEW = 12


@pytest.fixture(scope="module")
def deepseek_v3(tmp_path_factory):
    """A transformers DeepseekV3ForCausalLM (MLA with q-LoRA, YaRN RoPE, grouped MoE): (our model, export)."""
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path_factory.mktemp("hf-deepseek-v3")
    torch.manual_seed(3)
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=256,
        initializer_range=0.1, routed_scaling_factor=2.827, rms_norm_eps=1e-6, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 0.707})
    transformers.DeepseekV3ForCausalLM(cfg).eval().save_pretrained(ckpt)

    def build(target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(str(ckpt), target, progress=False)

    out = _shared(tmp_path_factory, "deepseek_v3", build)
    return kimi_compile.load_model(ckpt, progress=False).eval(), out


def genai_greedy(onnx_dir: Path, ids: torch.Tensor, n: int, eos: int, pad: int) -> torch.Tensor:
    """GenAI's own batched greedy search, as a deployment runs it; padding after eos read as eos."""
    model = og.Model(str(onnx_dir))
    params = og.GeneratorParams(model)
    B, T = ids.shape
    params.set_search_options(max_length=T + n, batch_size=B, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids.numpy().astype(np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    rows = []
    for b in range(B):
        seq = np.asarray(gen.get_sequence(b)).astype(np.int64)
        seq = np.concatenate([seq, np.full(T + n - len(seq), pad, np.int64)])
        hits = np.nonzero(seq[T:] == eos)[0]
        if len(hits):
            seq[T + hits[0]:] = eos
        rows.append(seq)
    return torch.from_numpy(np.stack(rows))


def assert_genai_matches_eager(onnx_dir: Path, model, seed: int, B: int = 3, T: int = 5) -> None:
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else cfg.eos_token_id[0]
    ids = _ids(B, T, seed, cfg.vocab_size)
    ref = kimi_compile.generate(model, ids, N_NEW, eos_token_id=eos)
    got = genai_greedy(onnx_dir, ids, N_NEW, eos, cfg.pad_token_id)
    assert torch.equal(got, ref), (got, ref)


# ------------------------------------------------------------------------------------------------ each model


def test_kimi_linear(cli_export):
    assert_genai_matches_eager(cli_export[0], tiny_model("kimi_linear"), seed=31)


def test_kimi_linear_attnres(attnres_dir):
    assert_genai_matches_eager(attnres_dir, tiny_model("attnres"), seed=32)


def test_k2(k2_dir):
    assert_genai_matches_eager(k2_dir, tiny_model("k2"), seed=33)


def test_fallback_lowering(fallback_dir):
    assert_genai_matches_eager(fallback_dir, tiny_model("kimi_linear"), seed=34)


def test_transformers_kimi_linear(hf_kimi_linear):
    _, out, ckpt = hf_kimi_linear
    assert_genai_matches_eager(out, kimi_compile.load_model(ckpt, progress=False).eval(), seed=35)


def test_transformers_deepseek_v3(deepseek_v3):
    model, out = deepseek_v3
    assert_genai_matches_eager(out, model, seed=36)


# ------------------------------------------------------------------------------------------------ features


def _generator(model, T: int, n: int, B: int = 1):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=T + n, batch_size=B)
    return og.Generator(model, params)


def _run(gen):
    while not gen.is_done():
        gen.generate_next_token()
    return np.asarray(gen.get_sequence(0)).astype(np.int64)


def test_max_length_and_rewind_to_start(cli_export):
    """max_length stops generation there; rewind_to(0) and a new prompt give the fresh-start tokens."""
    out, model = cli_export[0], tiny_model("kimi_linear")
    ids = _ids(1, 4, 41)
    ref = kimi_compile.generate(model, ids, N_NEW)[0].numpy()
    m = og.Model(str(out))
    short = _generator(m, 4, 5)
    short.append_tokens(ids.numpy().astype(np.int32))
    got = _run(short)
    assert len(got) == 9 and np.array_equal(got, ref[:9])
    gen = _generator(m, 4, N_NEW)
    gen.append_tokens(_ids(1, 6, 42).numpy().astype(np.int32))
    gen.generate_next_token()
    gen.rewind_to(0)
    gen.append_tokens(ids.numpy().astype(np.int32))
    assert np.array_equal(_run(gen), ref)


def test_rewind_into_the_recurrent_state_is_refused(cli_export):
    """KDA state cannot be partially rewound: GenAI refuses rewind_to(n > 0) without a snapshot."""
    m = og.Model(str(cli_export[0]))
    gen = _generator(m, 4, N_NEW)
    gen.append_tokens(_ids(1, 4, 43).numpy().astype(np.int32))
    for _ in range(4):
        gen.generate_next_token()
    with pytest.raises(RuntimeError, match="snapshot"):
        gen.rewind_to(6)


def test_continuous_batching_engine_fails(cli_export):
    """og.Engine (continuous batching) needs paged-attention graph inputs the export does not have."""
    m = og.Model(str(cli_export[0]))
    engine = og.Engine(m)
    request = engine.create_request()
    options = og.TurnOptions(request)
    options.set_max_generated_tokens(4)
    request.begin_turn(np.array([5, 6, 7, 8], np.int32), options)
    buffer = engine.create_event_buffer(16)
    reasons = []
    for _ in range(8):
        reasons += [event.finish_reason for event in (engine.run(buffer) or [])]
        if not engine.has_pending_requests():
            break
    assert og.FinishReason.FAILED in reasons


# ------------------------------------------------------------------------------------------------ generate()


def test_generate_onnx_backend_runs_genai(cli_export):
    """backend='onnx' goes through GenAI (batch-1 generators under the shared greedy loop): eager's tokens, with
    and without an eos rule."""
    out, model = cli_export[0], tiny_model("kimi_linear")
    ids = _ids(2, 5, 44)
    ref = kimi_compile.generate(model, ids, N_NEW)
    assert torch.equal(kimi_compile.generate(None, ids, N_NEW, backend="onnx", onnx_dir=out, onnx_runtime="genai"),
                       ref)
    eos = int(ref[0, 7])  # a token the first row produces: that row then repeats it
    ref_eos = kimi_compile.generate(model, ids, N_NEW, eos_token_id=eos)
    assert (ref_eos[0, 7:] == eos).all()
    assert torch.equal(kimi_compile.generate(str(out), ids, N_NEW, backend="onnx", eos_token_id=eos), ref_eos)


def test_generate_takes_any_step(cli_export):
    """A step (ids, state) -> (logits, state), here ONNX Runtime's, runs under the same loop as the model."""
    out, model = cli_export[0], tiny_model("kimi_linear")
    ids = _ids(2, 5, 45)
    assert torch.equal(kimi_compile.generate(OrtKimiModel(out).step, ids, N_NEW),
                       kimi_compile.generate(model, ids, N_NEW))


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(model="MODEL", backend="onnx", onnx_dir="DIR"), TypeError, "model must be None"),
    (dict(model="DIR", backend="onnx", onnx_dir="DIR"), ValueError, "not both"),
    (dict(model=None, backend="onnx"), ValueError, "onnx_dir"),
    (dict(model=None, backend="onnx", onnx_dir="DIR", onnx_runtime="trt"), ValueError, "onnx_runtime"),
    (dict(model="MODEL", backend="eager", onnx_dir="DIR"), ValueError, "onnx_dir"),
    (dict(model="STEP", backend="compile"), TypeError, "backend='compile'"),
    (dict(model=3, backend="eager"), TypeError, "model must be"),
    (dict(model="MODEL", backend="tvm"), ValueError, "backend"),
])
def test_generate_argument_errors(cli_export, kwargs, exc, words):
    out = str(cli_export[0])
    subst = {"MODEL": tiny_model("kimi_linear"), "DIR": out, "STEP": OrtKimiModel(out).step}
    kwargs = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    model = kwargs.pop("model")
    with pytest.raises(exc, match=words):
        kimi_compile.generate(model, _ids(1, 3, 46), 2, **kwargs)


# ------------------------------------------------------------------------------------------------ MLA cache halves


@pytest.mark.parametrize("width", [40, 41])
def test_mla_cache_halves_round_trip(width):
    """split -> join is exact; both halves have one head size (GenAI's), odd widths get one zero column."""
    cfg = tiny_model("kimi_linear").config
    gen = torch.Generator().manual_seed(width)
    state = {"past_key_values.1.key": torch.randn(2, 1, 7, width, generator=gen),
             "past_key_values.0.conv_state": torch.randn(2, 96, 3, generator=gen)}
    graph = to_graph_state(state, width, "split")
    key, value = graph["past_key_values.1.key"], graph["past_key_values.1.value"]
    assert key.shape == value.shape == (2, 1, 7, (width + 1) // 2)
    assert torch.equal(torch.cat([key, value], -1)[..., :width], state["past_key_values.1.key"])
    back = from_graph_state({k: v.numpy() for k, v in graph.items()}, width, "split")
    assert set(back) == set(state)
    for name, ref in state.items():
        assert np.array_equal(back[name], ref.numpy())
    specs = graph_state_specs(cfg, torch.float32, "split")
    assert [s.part for s in specs if s.layer == 1] == ["key", "value"]
    with pytest.raises(ValueError, match="mla_cache"):
        graph_state_specs(cfg, torch.float32, "paged")
    with pytest.raises(ValueError, match="past_key_values.1.value"):
        from_graph_state({"past_key_values.1.key": key}, width, "split")
