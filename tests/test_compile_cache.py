"""save_compile_cache / load_compile_cache: a fresh process with an empty Inductor cache loads the graphs another
process compiled and runs them without AOTAutograd or Inductor compiling (cache hits only), to the same logits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from kimi_compile.compiled import load_compile_cache, save_compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one process: optionally load a cache, run a 2-layer tiny model's prompt through the compiled step, report the
# compile counters and the logits, optionally save the cache
SCRIPT = r"""
import json, sys, torch
from torch._dynamo.utils import counters
from kimi_compile import KimiForCausalLM, tiny_config
from kimi_compile.compiled import compiled_step, load_compile_cache, save_compile_cache
mode, path = sys.argv[1], sys.argv[2]
out = {}
if mode == "save":
    try:
        save_compile_cache(path)
    except RuntimeError as e:
        out["empty_error"] = str(e)
else:
    out["loaded"] = load_compile_cache(path)
cfg = tiny_config("kimi_linear")
cfg = cfg.replace(num_hidden_layers=2, layer_types=cfg.layer_types[:2], mlp_layer_types=cfg.mlp_layer_types[:2])
model = KimiForCausalLM.from_config(cfg, 0).eval()
ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits, _ = compiled_step(model)(ids)
out["logits"] = logits[:, -1].tolist()
out["counters"] = {k: dict(counters[k]) for k in ("inductor", "aot_autograd")}
if mode == "save":
    out["bytes"] = save_compile_cache(path)
print(json.dumps(out))
"""


def _run(mode, path, cache_dir):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_fresh_process_loads_the_compiled_graphs(tmp_path):
    path = tmp_path / "graphs.bin"
    saved = _run("save", path, tmp_path / "inductor_a")
    assert "compiled nothing" in saved["empty_error"]
    assert saved["counters"]["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert saved["bytes"] == os.path.getsize(path) > 0
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written under a temporary name, renamed

    loaded = _run("load", path, tmp_path / "inductor_b")  # an empty Inductor cache: only the file can hit
    assert loaded["loaded"] >= 2
    inductor, aot = loaded["counters"]["inductor"], loaded["counters"]["aot_autograd"]
    assert inductor.get("fxgraph_cache_hit", 0) >= 1 and inductor.get("fxgraph_cache_miss", 0) == 0, inductor
    assert aot.get("autograd_cache_hit", 0) >= 1 and aot.get("autograd_cache_miss", 0) == 0, aot
    torch.testing.assert_close(torch.tensor(loaded["logits"]), torch.tensor(saved["logits"]), rtol=0, atol=0)


@pytest.mark.parametrize("content,exc,word", [(None, FileNotFoundError, "missing.bin"),
                                              (b"not a cache", ValueError, "path"),
                                              (b"", ValueError, "path")])
def test_load_bad_file_names_the_path(tmp_path, content, exc, word):
    path = tmp_path / "missing.bin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(exc, match=word):
        load_compile_cache(path)


def test_save_writes_under_a_temporary_name(tmp_path, monkeypatch):
    """The bytes land in path only when complete: a failed write leaves no file at path."""
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"abc", None))
    assert save_compile_cache(tmp_path / "c.bin") == 3 and (tmp_path / "c.bin").read_bytes() == b"abc"

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_compile_cache(tmp_path / "d.bin")
    assert not (tmp_path / "d.bin").exists()
