"""kimi_compile.load_model: formats (hub, sharded, transformers-native names, own names, FP8) and bad checkpoints."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kimi_compile
from kimi_compile import KimiForCausalLM, load_model, tiny_config
from model_helpers import tiny_hf_kimi_linear_config

transformers = pytest.importorskip("transformers")


def read_all(path):
    with safe_open(path, "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def logits_of(model, seed=0, T=9):
    ids = torch.randint(3, 256, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)[0]


@pytest.fixture(scope="module")
def hf_kimi(tmp_path_factory):
    """A transformers KimiLinearForCausalLM saved single-file and sharded (hub-style names)."""
    from transformers import KimiLinearForCausalLM

    torch.manual_seed(0)
    cfg = tiny_hf_kimi_linear_config(["linear_attention", "full_attention", "linear_attention", "full_attention"])
    model = KimiLinearForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("hf_kimi")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="40KB")
    return model, root


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_single_and_sharded_hub_checkpoints_agree(hf_kimi):
    model, root = hf_kimi
    assert not os.path.exists(root / "single" / "model.safetensors.index.json")
    index = json.loads((root / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    names = set(index["weight_map"])
    assert "model.layers.0.self_attn.q_conv1d.weight" in names  # hub names on disk
    assert "model.layers.1.block_sparse_moe.experts.7.w2.weight" in names
    single, sharded = load_model(root / "single", progress=False), load_model(root / "sharded", progress=False)
    expected = model(torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))).logits
    torch.testing.assert_close(logits_of(single), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_of(sharded), logits_of(single), rtol=0, atol=0)
    # experts streamed into one stacked tensor each
    w_gate = single.model.layers[1].mlp.experts.w_gate
    assert w_gate.shape == (8, 32, 64)
    src = read_all(root / "single" / "model.safetensors")
    assert torch.equal(w_gate[5], src["model.layers.1.block_sparse_moe.experts.5.w1.weight"])
    conv = single.model.layers[0].self_attn.conv1d.weight
    assert torch.equal(conv[32:64], src["model.layers.0.self_attn.k_conv1d.weight"][:, 0])


def test_transformers_in_memory_names(hf_kimi, tmp_path):
    """state_dict() names of transformers' KimiLinear (fused conv1d, forget_gate.*, gate_up_proj) load too."""
    model, root = hf_kimi
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd and "model.layers.0.self_attn.conv1d.weight" in sd
    save_file(sd, tmp_path / "model.safetensors")
    shutil.copy(root / "single" / "config.json", tmp_path / "config.json")
    torch.testing.assert_close(logits_of(load_model(tmp_path, progress=False)),
                               logits_of(load_model(root / "single", progress=False)), rtol=0, atol=0)


def test_own_names_round_trip(tmp_path):
    model = KimiForCausalLM.from_config(tiny_config("k2", attn_res_block_size=2), 5).eval()
    with torch.no_grad():
        model.model.layers[1].attn_res_query_mlp.normal_()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    loaded = load_model(tmp_path, progress=False)
    assert loaded.config == model.config
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=0)


def test_bfloat16_load_keeps_fp32_parts(hf_kimi):
    _, root = hf_kimi
    model = load_model(root / "sharded", dtype=torch.bfloat16, progress=False)
    attn = model.model.layers[0].self_attn
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert attn.A_log.dtype == torch.float32 and attn.dt_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    src = read_all(root / "single" / "model.safetensors")
    assert torch.equal(attn.A_log, src["model.layers.0.self_attn.A_log"].view(-1))  # not rounded to bf16
    # the same as loading in float32 and casting afterwards (random tiny models are too sensitive to bf16 routing
    # flips for a tolerance against float32 to mean anything)
    cast = load_model(root / "single", progress=False).cast_(torch.bfloat16)
    torch.testing.assert_close(logits_of(model), logits_of(cast), rtol=0, atol=0)


def test_fp8_block_quantised_weights_are_dequantised(tmp_path):
    model = KimiForCausalLM.from_config(tiny_config("k2"), 6).eval()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    name = "model.layers.1.self_attn.kv_b_proj.weight"  # [64, 32] -> blocks of 16 x 16, one partial row block
    w = sd[name]
    block = 16
    out_b, in_b = -(-w.shape[0] // block), -(-w.shape[1] // block)
    scale = torch.empty(out_b, in_b)
    q = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    for i in range(out_b):
        for j in range(in_b):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    expected = torch.empty_like(w)
    for i in range(out_b):
        for j in range(in_b):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            expected[sl] = q[sl].float() * scale[i, j]
    sd[name] = q
    sd[name + "_scale_inv"] = scale
    save_file(sd, tmp_path / "model.safetensors")
    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_model(tmp_path, progress=False)
    torch.testing.assert_close(loaded.model.layers[1].self_attn.kv_b_proj.weight, expected, rtol=0, atol=0)
    assert not torch.equal(expected, w)  # the quantisation was lossy: the dequantised values are what loaded


# ------------------------------------------------------------------------------------------------ bad checkpoints

def test_missing_shard(hf_kimi, tmp_path):
    _, root = hf_kimi
    ckpt = copy_dir(root / "sharded", tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(ckpt / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        load_model(ckpt, progress=False)


def rewrite_single(hf_kimi, tmp_path, edit):
    _, root = hf_kimi
    ckpt = copy_dir(root / "single", tmp_path / "ckpt")
    tensors = read_all(ckpt / "model.safetensors")
    edit(tensors)
    save_file(tensors, ckpt / "model.safetensors")
    return ckpt


# one tensor added or replaced in a hub checkpoint -> the ValueError that names it
BAD_TENSORS = {
    "wrong shape": ("model.layers.1.self_attn.kv_b_proj.weight", (128, 30),
                    r"kv_b_proj.weight.*shape \[128, 30\].*expected \[128, 32\]"),
    # a piece of KDA's fused qkv_proj: named, with the fused parameter
    "wrong shape of a fused piece": ("model.layers.0.self_attn.k_proj.weight", (32, 63),
                                     r"k_proj\.weight.*shape \[32, 63\].*expected \[32, 64\].*qkv_proj"),
    "unexpected": ("model.layers.0.self_attn.rogue_proj.weight", (2, 2), "unexpected tensor.*rogue_proj"),
    # the hub's q_conv1d and transformers' fused conv1d both fill the same rows: refuse, do not pick one
    "duplicate": ("model.layers.0.self_attn.conv1d.weight", (96, 1, 4), "duplicate"),
    # our own fused name next to the hub's f_a / g_a / b pieces
    "fused duplicate": ("model.layers.0.self_attn.gate_in_proj.weight", (34, 64), "gate_in_proj.*duplicate"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensor_is_named(hf_kimi, tmp_path, case):
    name, shape, pattern = BAD_TENSORS[case]
    ckpt = rewrite_single(hf_kimi, tmp_path, lambda t: t.__setitem__(name, torch.randn(shape)))
    with pytest.raises(ValueError, match=pattern):
        load_model(ckpt, progress=False)


def test_missing_expert_tensor(hf_kimi, tmp_path):
    name = "model.layers.3.block_sparse_moe.experts.6.w3.weight"
    ckpt = rewrite_single(hf_kimi, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match="missing tensor.*" + name.replace(".", r"\.")):
        load_model(ckpt, progress=False)


@pytest.mark.parametrize("piece,fused", [("q_proj", "qkv_proj"), ("v_proj", "qkv_proj"), ("f_a_proj", "gate_in_proj"),
                                          ("g_a_proj", "gate_in_proj"), ("b_proj", "gate_in_proj")])
def test_missing_piece_of_a_fused_projection(hf_kimi, tmp_path, piece, fused):
    """KDA's separate projections fill rows of qkv_proj / gate_in_proj: a missing one is named, with its parameter."""
    name = f"model.layers.2.self_attn.{piece}.weight"
    ckpt = rewrite_single(hf_kimi, tmp_path, lambda t: t.pop(name))
    want = re.escape(f"{name} (parameter model.layers.2.self_attn.{fused}.weight)")
    with pytest.raises(ValueError, match="missing tensor.*" + want):
        load_model(ckpt, progress=False)


def test_truncated_and_corrupt_files(hf_kimi, tmp_path):
    _, root = hf_kimi
    ckpt = copy_dir(root / "single", tmp_path / "truncated")
    path = ckpt / "model.safetensors"
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match="truncated safetensors file.*model.safetensors"):
        load_model(ckpt, progress=False)
    ckpt = copy_dir(root / "sharded", tmp_path / "corrupt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (ckpt / shard).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt safetensors file.*" + shard):
        load_model(ckpt, progress=False)


def test_unknown_model_type_and_missing_files(hf_kimi, tmp_path):
    _, root = hf_kimi
    ckpt = copy_dir(root / "single", tmp_path / "llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown model_type 'llama'"):
        load_model(ckpt, progress=False)
    with pytest.raises(FileNotFoundError, match="checkpoint directory"):
        load_model(tmp_path / "nowhere", progress=False)
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(ckpt, progress=False)
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(root / "single" / "config.json", empty / "config.json")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(empty, progress=False)


def test_public_api_exports():
    for name in ("load_model", "generate", "tiny_config", "KimiConfig", "KimiForCausalLM", "empty_state"):
        assert hasattr(kimi_compile, name)


# ------------------------------------------------------------------------------------------------ config checks

def test_tiny_config_accepts_every_cli_kind():
    from kimi_compile.resolve import TINY_MODELS as CLI_KINDS
    from kimi_compile.config import TINY_KINDS

    for kind, (base, block) in CLI_KINDS.items():
        assert kind in TINY_KINDS
        assert tiny_config(kind) == tiny_config(base, attn_res_block_size=block)
    assert tiny_config("kimi_linear_attnres", attn_res_block_size=3).attn_res_block_size == 3
    with pytest.raises(ValueError, match="kind.*'kimi_linear_attnres'.*got 'llama'"):
        tiny_config("llama")


def test_config_bounds_name_the_field():
    """Every bounded field refuses one past each end and a bool, naming itself; real model shapes pass."""
    from kimi_compile.config import FLOAT_BOUNDS, INT_BOUNDS, kimi_linear_48b_config

    base = tiny_config("k2")  # has q_lora_rank, so every INT_BOUNDS field is set
    for name, (lo, hi) in INT_BOUNDS.items():
        for bad in (lo - 1, hi + 1, True, float(max(lo, 1))):
            with pytest.raises(ValueError, match=f"KimiConfig.{name}"):
                base.replace(**{name: bad})
    for name in FLOAT_BOUNDS:
        for bad in (float("nan"), float("inf"), -1.0, "1e-6"):
            with pytest.raises(ValueError, match=f"KimiConfig.{name}"):
                base.replace(**{name: bad})
    kimi_linear_48b_config()
    kimi_linear_48b_config(num_experts=384, hidden_size=7168, num_hidden_layers=61,
                           layer_types=["full_attention"] * 61, mlp_layer_types=["sparse"] * 61)


def test_loader_checks_everything_before_allocating(hf_kimi, tmp_path, monkeypatch):
    """A checkpoint that cannot load fails before the model gets any storage: the headers are checked first, so
    a bad file never costs a full-size allocation."""
    allocated = []
    real = KimiForCausalLM.materialize_
    monkeypatch.setattr(KimiForCausalLM, "materialize_", lambda self, *a: allocated.append(1) or real(self, *a))
    bad = {"missing": lambda t: t.pop("model.layers.3.block_sparse_moe.experts.6.w3.weight"),
           "int weight": lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int64)),
           "unexpected": lambda t: t.__setitem__("model.rogue.weight", torch.ones(2))}
    for what, edit in bad.items():
        ckpt = rewrite_single(hf_kimi, tmp_path / what.replace(" ", "_"), edit)
        with pytest.raises(ValueError):
            load_model(ckpt, progress=False)
        assert not allocated, what
    load_model(hf_kimi[1] / "single", progress=False)
    assert allocated == [1]


def test_shards_in_subfolders_and_symlinked_blobs_load(hf_kimi, tmp_path):
    """The out-of-folder check is on the index's names, not on where files resolve: shards in a subfolder load, and
    so do shard files that are symlinks into a blob store elsewhere (the Hugging Face cache layout)."""
    _, root = hf_kimi
    ckpt = copy_dir(root / "sharded", tmp_path / "ckpt")
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (ckpt / "shards").mkdir()
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    for j, shard in enumerate(sorted(set(index["weight_map"].values()))):
        if j % 2:
            shutil.move(ckpt / shard, blobs / f"blob{j}")
            os.symlink(blobs / f"blob{j}", ckpt / shard)
        else:
            shutil.move(ckpt / shard, ckpt / "shards" / shard)
            index["weight_map"] = {n: (f"shards/{s}" if s == shard else s) for n, s in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.testing.assert_close(logits_of(load_model(ckpt, progress=False)),
                               logits_of(load_model(root / "single", progress=False)), rtol=0, atol=0)
