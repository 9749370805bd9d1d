"""TensorRT export: a bundle that TensorRT (>= 10.x, with ``tensorrt.plugin``) turns into an engine.

``export_tensorrt(model, out_dir, dtype)`` writes::

    out_dir/model.onnx                 the TensorRT-ready graph: kimi ops are plugin nodes (op_type = plugin
                                       name, domain / plugin_namespace "kimi", aot = 1), the rest standard ops
    out_dir/model.onnx.data            external weights (large models only)
    out_dir/plugins/kimi_trt_plugins.py   registers the plugins with tensorrt.plugin (generated)
    out_dir/plugins/ptx/*.ptx          the project's Triton kernels compiled to PTX (sm_80, sm_90)
    out_dir/plugins/ptx/manifest.json  kernel name, launch block, shared memory, signature per PTX
    out_dir/build_engine.py            TensorRT build: ONNX parser + plugins, prefill / decode profiles
    out_dir/run_engine.py              runner: feeds present.* back as past_key_values.*, greedy generation
    out_dir/bundle.json                I/O, plugins, kernels, what was verified here
    out_dir/kimi_compile.json, config.json   as written by the ONNX exporter (I/O description, model config)
    out_dir/README.md

Steps: the ONNX exporter (``export/onnx.py``, opset 27) writes the standard graph; ``to_plugin_graph``
(``lowering/tensorrt.py``) swaps ``LinearAttention`` / ``CausalConvWithState`` for plugin nodes; the plugin
kernels are compiled to PTX (no GPU needed) and checked with Triton's ``ptxas``; the registration module is
generated from the same plugin descriptions (``lowering/plugin_spec.py``).  With ``verify`` the bundle's graph is
swapped back to standard ops and run in ONNX Runtime against PyTorch (prefill, then one decode step).  The
engine is built only where TensorRT imports; otherwise the bundle says how to build it and this returns normally.
Everything is written into a temporary folder next to ``out_dir`` and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence, Union

from .atomic_dir import move_into_place

__all__ = ["export_tensorrt", "TensorRTExportResult", "verify_with_onnxruntime", "BUNDLE_FILE",
           "REGISTRATION_MODULE", "tensorrt_available"]

BUNDLE_FILE = "bundle.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
REGISTRATION_MODULE = "kimi_trt_plugins"
PLUGIN_DIR = "plugins"
PTX_DIR = "plugins/ptx"


@dataclasses.dataclass
class TensorRTExportResult:
    out_dir: Path
    onnx_path: Path
    registration_module: Path
    ptx_files: list[Path]
    plugins: dict  # plugin id -> {"nodes": n, "aot": bool, "variants": [...]}
    verification: dict
    engine_path: Optional[Path]
    messages: list[str]
    seconds: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"kimi-export: TensorRT bundle -> {self.out_dir}",
                 f"  graph      : {self.onnx_path.name} ("
                 + ", ".join(f"{pid} x{p['nodes']}{' aot' if p['aot'] else ' jit'}" for pid, p in self.plugins.items())
                 + ")",
                 f"  plugins    : {PLUGIN_DIR}/{REGISTRATION_MODULE}.py, {len(self.ptx_files)} PTX files"]
        v = self.verification
        if v.get("status") == "passed":
            lines.append(f"  verified   : plugin nodes swapped back to standard ops, ONNX Runtime vs PyTorch: "
                         f"prefill max|diff| {v['prefill_max_abs_diff']:.2e}, decode {v['decode_max_abs_diff']:.2e} "
                         f"(tol {v['tolerance']:g})")
        else:
            lines.append(f"  verified   : {v.get('status', 'no')} ({v.get('reason', '')})")
        lines.append(f"  engine     : {self.engine_path if self.engine_path else 'not built'}")
        lines.extend(f"  note       : {m}" for m in self.messages)
        return "\n".join(lines)


def tensorrt_available() -> bool:
    """True when ``tensorrt`` and ``tensorrt.plugin`` import (TensorRT >= 10.7)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except Exception:  # noqa: BLE001 - the package index's tensorrt stubs fail here
        return False
    return True


# ------------------------------------------------------------------------------------------------ verification


def _numpy_state(specs, batch: int, past: int = 0):
    import numpy as np
    import torch

    out = {}
    for s in specs:
        dt = {torch.float32: np.float32, torch.float16: np.float16}.get(s.dtype)
        if dt is None:
            raise TypeError(f"ONNX Runtime check supports float32 / float16 state, got {s.dtype}")
        out[s.name] = np.zeros(s.concrete_shape(batch, past), dtype=dt)
    return out


def verify_with_onnxruntime(onnx_path: Union[str, os.PathLike], model, *, batch: int = 2, prompt_len: int = 5,
                            tolerance: float = 1e-4, seed: int = 0) -> dict:
    """Swap the plugin nodes of ``onnx_path`` back to their standard ops, run prefill and one decode step in
    ONNX Runtime (CPU) and compare logits and every ``present.*`` with ``model`` (PyTorch).

    Returns ``dict(status="passed"|"failed", prefill_max_abs_diff, decode_max_abs_diff, tolerance, ...)``.
    """
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    import torch

    from kimi_compile.lowering.tensorrt import plugin_nodes, to_standard_graph
    from kimi_compile.state import present_name

    std = to_standard_graph(ir.load(os.fspath(onnx_path)))
    remaining = plugin_nodes(std)
    if remaining:
        raise RuntimeError(f"{len(remaining)} plugin nodes survived the swap back to standard ops")
    specs = model.state_specs()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen)
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_FILE
        ir.save(std, path, external_data=DATA_FILE if (Path(onnx_path).parent / DATA_FILE).exists() else None)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        out_names = [o.name for o in sess.get_outputs()]

        def run(x, state):
            feeds = {"input_ids": x.numpy().astype(np.int64)}
            feeds.update(state)
            return dict(zip(out_names, sess.run(None, feeds)))

        def compare(ort_out, logits, new_state):
            diffs = {"logits": float(np.abs(ort_out["logits"].astype(np.float64)
                                            - logits.double().numpy()).max())}
            for s in specs:
                ref = new_state[s.name].double().numpy()
                got = ort_out[present_name(s.name)].astype(np.float64)
                if got.shape != ref.shape:
                    raise RuntimeError(f"{present_name(s.name)}: ONNX Runtime shape {got.shape} != PyTorch {ref.shape}")
                diffs[present_name(s.name)] = float(np.abs(got - ref).max()) if ref.size else 0.0
            return diffs

        with torch.no_grad():
            logits1, state1 = model(ids, None)
            logits2, state2 = model(nxt, state1)
        o1 = run(ids, _numpy_state(specs, batch, 0))
        d1 = compare(o1, logits1, state1)
        past = {s.name: o1[present_name(s.name)] for s in specs}
        o2 = run(nxt, past)
        d2 = compare(o2, logits2, state2)
    worst1, worst2 = max(d1.values()), max(d2.values())
    ok = worst1 <= tolerance and worst2 <= tolerance
    return dict(status="passed" if ok else "failed", prefill_max_abs_diff=worst1, decode_max_abs_diff=worst2,
                tolerance=tolerance, batch=batch, prompt_len=prompt_len, prefill=d1, decode=d2,
                what="plugin nodes swapped back to LinearAttention / CausalConvWithState (opset 27), "
                     "ONNX Runtime CPU vs PyTorch, prefill then one decode step")


# ------------------------------------------------------------------------------------------------ export


def _resolve_model(model, dtype):
    """A KimiForCausalLM (the same object is exported and used as the verification reference)."""
    import torch

    from kimi_compile.config import tiny_config
    from kimi_compile.model import KimiForCausalLM

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if isinstance(dtype, str):
        if dtype.replace("torch.", "") not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        dtype = dtypes[dtype.replace("torch.", "")]
    elif dtype is not None and dtype not in dtypes.values():
        raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
    if model is None:
        return KimiForCausalLM.from_config(tiny_config(), seed=0, dtype=dtype or torch.float32).eval()
    if isinstance(model, (str, os.PathLike)):
        from kimi_compile import load_model

        if not os.path.isdir(model):
            raise FileNotFoundError(f"model {model}: no such directory")
        return load_model(model, dtype=dtype, device="cpu").eval()
    if not isinstance(model, KimiForCausalLM):
        raise TypeError(f"model must be a checkpoint directory, a KimiForCausalLM or None, got {type(model).__name__}")
    if dtype is not None and model.dtype != dtype:
        raise ValueError(f"model is {model.dtype} but dtype={dtype} was asked: cast the model first")
    return model.eval()


def _io_description(m) -> tuple[list, list]:
    def desc(v):
        dt = v.dtype.name.lower() if v.dtype is not None else None
        dt = {"float": "float32", "double": "float64"}.get(dt, dt)
        shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
        return {"name": v.name, "dtype": dt, "shape": shape}

    return [desc(v) for v in m.graph.inputs], [desc(v) for v in m.graph.outputs]


def _set_aot(m, aot: dict) -> None:
    import onnx_ir as ir

    from kimi_compile.lowering import plugin_spec as ps

    for node in m.graph:
        spec = ps.spec_for_node(node.domain, node.op_type)
        if spec is not None:
            node.attributes["aot"] = ir.Attr("aot", ir.AttributeType.INT, int(bool(aot.get(spec.plugin_id))))


def export_tensorrt(model=None, out_dir: Union[str, os.PathLike] = "kimi_export_out/tensorrt", dtype=None, *,
                    archs: Sequence[int] = (80, 90), aot: Union[bool, dict] = True, ptx_version: Optional[int] = None,
                    verify: bool = True, build_engine: Union[bool, str] = "auto", optimize: bool = True,
                    engine_args: Sequence[str] = (), quiet: bool = False) -> TensorRTExportResult:
    """Export a Kimi model to a TensorRT bundle (see the module docstring for the layout).

    Args:
        model: a checkpoint directory, a :class:`~kimi_compile.KimiForCausalLM`, or None for the built-in tiny model.
        out_dir: destination folder (replaced when the export succeeds; untouched when it fails).
        dtype: "float32" / "float16" / "bfloat16" (or a torch dtype); default the model's dtype.
        archs: compute capabilities to compile PTX for (default sm_80 and sm_90).
        aot: mark plugin nodes ``aot = 1`` where an ahead-of-time kernel exists; False, or ``{plugin id: False}``
            for some plugins, makes them run their JIT ``impl`` instead (torch + kimi_compile in the TensorRT
            process; for ``kimi::kda`` that is the chunked multi-kernel prefill of ops/kda_triton.py).
        ptx_version: PTX ISA to emit (e.g. 84 for older drivers); default Triton's.
        verify: run the ONNX Runtime check of the bundle's graph against PyTorch (float32 only).
        build_engine: "auto" (build when TensorRT imports), True (build or fail), False (never).
        optimize: passed to the ONNX exporter's graph optimiser.
        engine_args: extra command-line arguments for ``build_engine.py``.
        quiet: no progress lines on stderr.

    Returns:
        :class:`TensorRTExportResult` (printable summary).
    """
    import onnx
    import onnx_ir as ir
    import torch

    from kimi_compile.export.onnx import export_onnx
    from kimi_compile.lowering import tensorrt as lt

    def say(msg: str) -> None:
        if not quiet:
            print(f"[kimi-export tensorrt] {msg}", file=sys.stderr, flush=True)

    if build_engine not in (True, False, "auto"):
        raise ValueError(f"build_engine must be True, False or 'auto', got {build_engine!r}")
    archs = tuple(int(a) for a in archs)
    if not archs or any(a < 70 for a in archs):
        raise ValueError(f"archs must name CUDA compute capabilities >= 70 (e.g. 80, 90), got {archs}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    model = _resolve_model(model, dtype)
    dtype_name = str(model.dtype).replace("torch.", "")
    parent = out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    seconds: dict[str, float] = {}
    messages: list[str] = []
    done = False
    try:
        # 1. the standard ONNX graph
        t0 = time.perf_counter()
        say("exporting the ONNX graph (opset 27)")
        std_dir = tmp / "_onnx"
        res = export_onnx(model, std_dir, opset=27, mla_cache="absorbed", optimize=optimize, check=False,
                              progress=False)
        seconds["onnx export"] = time.perf_counter() - t0

        # 2. plugin nodes
        t0 = time.perf_counter()
        m = ir.load(os.fspath(res.model_path))
        lt.to_plugin_graph(m, aot=False)
        variants = lt.kernel_variants(m)
        nodes = lt.plugin_nodes(m)
        seconds["plugin pass"] = time.perf_counter() - t0

        # 3. PTX
        t0 = time.perf_counter()
        ptx_dir = tmp / PTX_DIR
        ptx_dir.mkdir(parents=True)
        entries, ptx_files = [], []
        has_kernel: dict[str, bool] = {}
        have_ptxas = lt.ptxas_path() is not None
        for v in variants:
            binding = lt.kernel_binding(v.spec)
            if binding is None:
                has_kernel[v.plugin_id] = False
                messages.append(f"{v.plugin_id}: no ahead-of-time Triton kernel available; the plugin uses its "
                                "JIT impl (torch + kimi_compile needed where the engine runs)")
                continue
            for arch in archs:
                say(f"compiling {v.key()} for sm_{arch}")
                art = lt.compile_ptx(v, arch, ptx_version=ptx_version)
                name = f"{v.key()}__sm{arch}.ptx"
                (ptx_dir / name).write_text(art.ptx)
                entry = art.manifest_entry(name)
                if have_ptxas:
                    passed, log = lt.ptxas_check(art.ptx, art.target)
                    entry["ptxas"] = {"arch": art.target, "passed": passed, "log": log[-2000:]}
                    if not passed:
                        raise RuntimeError(f"ptxas rejected {name} for {art.target}: {log[-2000:]}")
                entries.append(entry)
                ptx_files.append(Path(PTX_DIR) / name)
            has_kernel.setdefault(v.plugin_id, True)
        manifest = {"format": "kimi-compile-ptx-manifest", "version": 1, "archs": list(archs), "kernels": entries,
                    "calling_convention": "(input pointers..., int32 scalars..., output pointers...); "
                                          "Triton's scratch pointers are passed as null (kernels need none)"}
        (ptx_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if not have_ptxas:
            messages.append("Triton's ptxas was not found: the PTX was not assembled here")
        seconds["ptx"] = time.perf_counter() - t0

        want_aot = (lambda pid: bool(aot.get(pid, True))) if isinstance(aot, dict) else (lambda pid: bool(aot))
        aot_by_plugin = {pid: want_aot(pid) and ok for pid, ok in has_kernel.items()}
        _set_aot(m, aot_by_plugin)

        # 4. write the graph, the registration module, the scripts
        t0 = time.perf_counter()
        external = res.external_data
        ir.save(m, tmp / MODEL_FILE, external_data=DATA_FILE if external else None)
        onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
        (tmp / PLUGIN_DIR / f"{REGISTRATION_MODULE}.py").write_text(lt.registration_module_source(manifest))
        for name in ("genai_config.json", "kimi_compile.json", "config.json"):
            if (std_dir / name).exists():
                shutil.copy2(std_dir / name, tmp / name)
        shutil.rmtree(std_dir)
        (tmp / "build_engine.py").write_text(BUILD_ENGINE_SCRIPT)
        (tmp / "run_engine.py").write_text(RUN_ENGINE_SCRIPT)
        inputs, outputs = _io_description(m)
        plugins = {}
        for pn in nodes:
            p = plugins.setdefault(pn.spec.plugin_id, {"op": pn.spec.op, "standard_op": pn.spec.standard_op,
                                                       "nodes": 0, "aot": aot_by_plugin.get(pn.spec.plugin_id, False),
                                                       "variants": []})
            p["nodes"] += 1
        for v in variants:
            plugins[v.plugin_id]["variants"].append(v.key())
        del m
        seconds["write"] = time.perf_counter() - t0

        # 5. verification
        t0 = time.perf_counter()
        if not verify:
            verification = {"status": "skipped", "reason": "verify=False"}
        elif model.dtype != torch.float32:
            verification = {"status": "skipped", "reason": f"the ONNX Runtime check runs float32 models only "
                                                           f"(ONNX Runtime CPU lacks {dtype_name} kernels)"}
        else:
            say("verifying: plugin nodes swapped back, ONNX Runtime vs PyTorch (prefill + decode)")
            verification = verify_with_onnxruntime(tmp / MODEL_FILE, model)
            if verification["status"] != "passed":
                raise RuntimeError(f"verification failed: prefill max|diff| {verification['prefill_max_abs_diff']:.3e}, "
                                   f"decode {verification['decode_max_abs_diff']:.3e} > {verification['tolerance']}")
        seconds["verify"] = time.perf_counter() - t0

        bundle = {
            "format": "kimi-compile-tensorrt-bundle", "version": 1,
            "model_type": str(model.config.model_type), "dtype": dtype_name,
            "onnx": MODEL_FILE, "external_data": bool(external),
            "registration_module": f"{PLUGIN_DIR}/{REGISTRATION_MODULE}.py",
            "inputs": inputs, "outputs": outputs,
            "state": [{"input": s.name, "output": s.present_name, "shape": list(s.shape),
                       "dtype": str(s.dtype).replace("torch.", "")} for s in model.state_specs()],
            "symbolic_axes": {"batch_size": "batch", "sequence_length": "new tokens per call",
                              "past_sequence_length": "tokens already in the MLA caches"},
            "plugins": plugins,
            "ptx": {"archs": list(archs), "files": [str(p) for p in ptx_files], "ptxas_checked": have_ptxas},
            "verification": verification,
            "engine": {"file": "model.plan", "built": False,
                       "needs": "TensorRT >= 10.7 with tensorrt.plugin (ONNX-parser plugin namespaces: >= 10.10)"},
        }
        (tmp / "README.md").write_text(_bundle_readme(bundle))

        # 6. the engine, where TensorRT imports
        engine_path = None
        trt_ok = tensorrt_available()
        if build_engine is True and not trt_ok:
            raise RuntimeError("build_engine=True but tensorrt (with tensorrt.plugin) does not import here")
        if build_engine and trt_ok:
            t0 = time.perf_counter()
            say("building the TensorRT engine")
            cmd = [sys.executable, str(tmp / "build_engine.py"), "--bundle", str(tmp), *engine_args]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                engine_path = out_dir / "model.plan"
                bundle["engine"]["built"] = True
            else:
                if build_engine is True:
                    raise RuntimeError(f"engine build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
                messages.append(f"engine build failed (see {BUNDLE_FILE}); the bundle is complete")
                bundle["engine"]["error"] = (proc.stdout + proc.stderr)[-4000:]
            seconds["engine"] = time.perf_counter() - t0
        elif not trt_ok:
            messages.append("TensorRT is not importable here: the engine was not built. Where TensorRT >= 10.7 "
                            f"is installed run: python {out_dir}/build_engine.py --bundle {out_dir}")
        (tmp / BUNDLE_FILE).write_text(json.dumps(bundle, indent=2, default=str))

        # 7. into place
        move_into_place(tmp, out_dir)
        done = True
    finally:
        if not done:
            shutil.rmtree(tmp, ignore_errors=True)
    for msg in messages:
        say(msg)
    return TensorRTExportResult(out_dir=out_dir, onnx_path=out_dir / MODEL_FILE,
                                registration_module=out_dir / PLUGIN_DIR / f"{REGISTRATION_MODULE}.py",
                                ptx_files=[out_dir / p for p in ptx_files], plugins=plugins,
                                verification=verification, engine_path=engine_path, messages=messages,
                                seconds=seconds)


def _bundle_readme(bundle: dict) -> str:
    plugins = "\n".join(f"- `{pid}` ({p['op']}, stands for ONNX `{p['standard_op']}`): {p['nodes']} nodes, "
                        f"{'ahead-of-time PTX' if p['aot'] else 'JIT impl (torch)'}" for pid, p in bundle["plugins"].items())
    v = bundle["verification"]
    verified = (f"prefill max|diff| {v['prefill_max_abs_diff']:.2e}, decode {v['decode_max_abs_diff']:.2e}"
                if v.get("status") == "passed" else v.get("status", "no"))
    return f"""# kimi-compile TensorRT bundle ({bundle['model_type']}, {bundle['dtype']})

Needs TensorRT >= 10.7 with its Python package (`tensorrt.plugin`); TensorRT >= 10.10 for the ONNX parser to
use the `plugin_namespace` of the plugin nodes.

    python build_engine.py --bundle .                      # writes model.plan (prefill + decode profiles)
    python run_engine.py --bundle . --prompt-ids 1,2,3 --max-new-tokens 16

Plugins:
{plugins}

`plugins/kimi_trt_plugins.py` registers them (import it before parsing the ONNX file or loading an engine
whose plugins run JIT). Graph checked here: {verified} ({v.get('what', '')}).
"""


# ------------------------------------------------------------------------------------------------ scripts

BUILD_ENGINE_SCRIPT = r'''"""Build a TensorRT engine from a kimi-compile bundle (written by kimi_compile.export.tensorrt).

    python build_engine.py --bundle DIR [--engine model.plan] [--max-batch 8] [--max-seq 2048] [--max-past 4096]
                           [--opt-batch 1] [--opt-seq 256] [--opt-past 1024] [--fp16 | --bf16] [--weakly-typed]
                           [--workspace-gb 8] [--verbose]

Two optimisation profiles: 0 = prefill (sequence_length 1..max-seq), 1 = decode (sequence_length 1).
past_sequence_length (MLA caches) ranges over 0..max-past in both. By default the network is strongly typed
(the ONNX graph already carries the bundle's dtype); --weakly-typed with --fp16 / --bf16 lets TensorRT pick
reduced precision by itself (builder flags). Needs TensorRT >= 10.7 (tensorrt.plugin); >= 10.10 for the
ONNX parser's plugin namespaces.
"""

import argparse
import json
import os
import sys


def load_bundle(bundle_dir):
    with open(os.path.join(bundle_dir, "bundle.json")) as f:
        return json.load(f)


def register_plugins(bundle_dir, bundle):
    """Import the generated plugin module (it registers the kimi plugins with tensorrt.plugin)."""
    plugin_dir = os.path.join(bundle_dir, os.path.dirname(bundle["registration_module"]))
    sys.path.insert(0, plugin_dir)
    import importlib

    return importlib.import_module(os.path.splitext(os.path.basename(bundle["registration_module"]))[0])


def axis_ranges(args, phase):
    """(min, opt, max) per symbolic axis for the 'prefill' or 'decode' profile."""
    seq = (1, max(1, min(args.opt_seq, args.max_seq)), args.max_seq) if phase == "prefill" else (1, 1, 1)
    return {
        "batch_size": (1, max(1, min(args.opt_batch, args.max_batch)), args.max_batch),
        "sequence_length": seq,
        "past_sequence_length": (0, 0 if phase == "prefill" else min(args.opt_past, args.max_past), args.max_past),
    }


def profile_shapes(bundle, args, phase):
    """{input name: (min shape, opt shape, max shape)} from the bundle's I/O description."""
    ranges = axis_ranges(args, phase)
    shapes = {}
    for inp in bundle["inputs"]:
        dims = [ranges[d] if isinstance(d, str) else (d, d, d) for d in inp["shape"]]
        shapes[inp["name"]] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--engine", default=None, help="output file (default BUNDLE/model.plan)")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--opt-batch", type=int, default=1)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--opt-seq", type=int, default=256)
    p.add_argument("--max-past", type=int, default=4096)
    p.add_argument("--opt-past", type=int, default=1024)
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--weakly-typed", action="store_true")
    p.add_argument("--workspace-gb", type=float, default=8.0)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    import tensorrt as trt

    bundle = load_bundle(args.bundle)
    register_plugins(args.bundle, bundle)
    logger = trt.Logger(trt.Logger.VERBOSE if args.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = not args.weakly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.path.join(args.bundle, bundle["onnx"])):
        for i in range(parser.num_errors):
            print(parser.get_error(i), file=sys.stderr)
        raise SystemExit("ONNX parse failed")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(args.workspace_gb * (1 << 30)))
    if not strongly_typed:
        if args.fp16 or bundle["dtype"] == "float16":
            config.set_flag(trt.BuilderFlag.FP16)
        if args.bf16 or bundle["dtype"] == "bfloat16":
            config.set_flag(trt.BuilderFlag.BF16)
    for phase in ("prefill", "decode"):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile_shapes(bundle, args, phase).items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SystemExit("engine build failed")
    out = args.engine or os.path.join(args.bundle, "model.plan")
    with open(out, "wb") as f:
        f.write(engine)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB); profiles: 0 = prefill, 1 = decode")


if __name__ == "__main__":
    main()
'''

RUN_ENGINE_SCRIPT = r'''"""Run a kimi-compile TensorRT engine: explicit state, present.* fed back as past_key_values.*.

    python run_engine.py --bundle DIR [--engine model.plan] --prompt-ids 1,2,3 [--batch 1] [--max-new-tokens 16]

    from run_engine import TrtKimiRunner
    runner = TrtKimiRunner("bundle_dir")
    logits, state = runner(input_ids)          # first call: zero state, past_sequence_length 0
    logits, state = runner(next_ids, state)    # state = previous present.* under past_key_values.* names

Profile 0 (prefill) serves calls with more than one new token, profile 1 (decode) single-token calls.
Needs TensorRT >= 10.7 and torch with CUDA (device buffers).
"""

import argparse
import json
import os
import sys

PAST, PRESENT = "past_key_values.", "present."


def next_state(outputs):
    """present.{i}.<part> outputs -> the past_key_values.{i}.<part> inputs of the next call."""
    return {PAST + name[len(PRESENT):]: value for name, value in outputs.items() if name.startswith(PRESENT)}


def zero_state_shapes(bundle, batch):
    """Shapes of a first call's state inputs (batch rows, past_sequence_length 0)."""
    sizes = {"batch_size": batch, "past_sequence_length": 0}
    return {inp["name"]: tuple(sizes[d] if isinstance(d, str) else d for d in inp["shape"])
            for inp in bundle["inputs"] if inp["name"].startswith(PAST)}


class TrtKimiRunner:
    def __init__(self, bundle_dir, engine_path=None, device=0):
        import tensorrt as trt
        import torch

        with open(os.path.join(bundle_dir, "bundle.json")) as f:
            self.bundle = json.load(f)
        sys.path.insert(0, os.path.join(bundle_dir, os.path.dirname(self.bundle["registration_module"])))
        __import__(os.path.splitext(os.path.basename(self.bundle["registration_module"]))[0])  # JIT plugins
        self.trt, self.torch = trt, torch
        self.device = torch.device("cuda", device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path or os.path.join(bundle_dir, "model.plan"), "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(self.device)
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                        trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        self.profile = None

    def dtype(self, name):
        return self._dtypes[self.engine.get_tensor_dtype(name)]

    def empty_state(self, batch):
        return {n: self.torch.zeros(s, dtype=self.dtype(n), device=self.device)
                for n, s in zero_state_shapes(self.bundle, batch).items()}

    def __call__(self, input_ids, state=None):
        torch = self.torch
        ids = torch.as_tensor(input_ids, dtype=torch.int64).to(self.device).contiguous()
        if state is None:
            state = self.empty_state(ids.shape[0])
        profile = 1 if ids.shape[1] == 1 and self.engine.num_optimization_profiles > 1 else 0
        if profile != self.profile:
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            self.profile = profile
        feeds = {"input_ids": ids}
        feeds.update({n: state[n].contiguous() for n in self.inputs if n != "input_ids"})
        for name in self.inputs:
            self.context.set_input_shape(name, tuple(feeds[name].shape))
            self.context.set_tensor_address(name, feeds[name].data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtype(name), device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outs["logits"], next_state(outs)

    def generate(self, input_ids, max_new_tokens):
        torch = self.torch
        ids = torch.as_tensor(input_ids, dtype=torch.int64).to(self.device)
        logits, state = self(ids)
        out = [ids]
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits, state = self(nxt, state)
        return torch.cat(out, dim=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--engine", default=None)
    p.add_argument("--prompt-ids", default="1,2,3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args(argv)
    import torch

    runner = TrtKimiRunner(args.bundle, args.engine)
    prompt = torch.tensor([[int(t) for t in args.prompt_ids.split(",")]] * args.batch)
    print(runner.generate(prompt, args.max_new_tokens).tolist())


if __name__ == "__main__":
    main()
'''
