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

The export is the list :data:`STAGES`, run in order on one :class:`_Job` inside a temporary folder next to
``out_dir`` that is renamed into place when every stage has passed (``atomic_dir.staging_dir``):

1. ``onnx export``  the ONNX exporter (``export/onnx.py``, opset 27) writes the standard graph;
2. ``plugin pass``  ``LinearAttention`` / ``CausalConvWithState`` become plugin nodes (``lowering/tensorrt``);
3. ``ptx``          the plugin kernels are compiled to PTX (no GPU needed), checked with Triton's ``ptxas``;
4. ``write``        the graph, the generated registration module and the engine scripts;
5. ``verify``       the graph swapped back to standard ops runs in ONNX Runtime against PyTorch (float32);
6. ``describe``     ``bundle.json`` and ``README.md``;
7. ``engine``       the engine is built only where TensorRT imports; otherwise the bundle says how.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import onnx
import onnx_ir as ir
import torch

from ..lowering import tensorrt as lt
from ..resolve import resolve_model
from . import onnx as onnx_export
from .atomic_dir import staging_dir
from .tensorrt_bundle import SCRIPTS, bundle_readme, script_path
from .tensorrt_verify import VerificationError, verify_with_onnxruntime

__all__ = ["export_tensorrt", "TensorRTExportResult", "VerificationError", "verify_with_onnxruntime", "STAGES",
           "BUNDLE_FILE", "REGISTRATION_MODULE", "tensorrt_available"]

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
                 + (", ".join(f"{pid} x{p['nodes']}{' aot' if p['aot'] else ' jit'}"
                              for pid, p in self.plugins.items()) or "no plugin nodes")
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

    def to_json(self) -> dict:
        """The result as JSON-ready data (paths as strings)."""
        return dict(out_dir=str(self.out_dir), onnx=str(self.onnx_path),
                    registration_module=str(self.registration_module), ptx_files=[str(p) for p in self.ptx_files],
                    plugins=self.plugins, verification=self.verification,
                    engine=None if self.engine_path is None else str(self.engine_path), messages=self.messages,
                    seconds=self.seconds)


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


# ------------------------------------------------------------------------------------------------ the job


@dataclasses.dataclass
class _Job:
    """What the stages share: the options, the temporary folder, and what each stage produced."""

    model: torch.nn.Module
    out_dir: Path
    archs: tuple[int, ...]
    aot: Union[bool, dict]
    ptx_version: Optional[int]
    verify: bool
    build_engine: Union[bool, str]
    optimize: bool
    engine_args: Sequence[str]
    say: Callable[[str], None]
    tmp: Path = Path()
    onnx_result: object = None
    graph: Optional[ir.Model] = None
    variants: list = dataclasses.field(default_factory=list)
    nodes: list = dataclasses.field(default_factory=list)
    manifest: dict = dataclasses.field(default_factory=dict)
    ptx_files: list[Path] = dataclasses.field(default_factory=list)
    have_ptxas: bool = False
    aot_by_plugin: dict = dataclasses.field(default_factory=dict)
    plugins: dict = dataclasses.field(default_factory=dict)
    io: tuple = ((), ())
    verification: dict = dataclasses.field(default_factory=dict)
    bundle: dict = dataclasses.field(default_factory=dict)
    engine_path: Optional[Path] = None
    messages: list[str] = dataclasses.field(default_factory=list)
    seconds: dict = dataclasses.field(default_factory=dict)

    @property
    def dtype_name(self) -> str:
        return str(self.model.dtype).replace("torch.", "")


def _onnx_export(job: _Job) -> None:
    job.say("exporting the ONNX graph (opset 27)")
    job.onnx_result = onnx_export.export_onnx(job.model, job.tmp / "_onnx", opset=27, mla_cache="absorbed",
                                              optimize=job.optimize, check=False, progress=False)


def _plugin_pass(job: _Job) -> None:
    job.graph = ir.load(os.fspath(job.onnx_result.model_path))
    lt.to_plugin_graph(job.graph, aot=False)
    job.variants = lt.kernel_variants(job.graph)
    job.nodes = lt.plugin_nodes(job.graph)


def _ptx(job: _Job) -> None:
    ptx_dir = job.tmp / PTX_DIR
    ptx_dir.mkdir(parents=True)
    entries = []
    has_kernel: dict[str, bool] = {}
    job.have_ptxas = all(lt.ptxas_path(arch) is not None for arch in job.archs)
    for v in job.variants:
        if lt.kernel_binding(v.spec) is None:
            has_kernel[v.plugin_id] = False
            job.messages.append(f"{v.plugin_id}: no ahead-of-time Triton kernel available; the plugin uses its "
                                "JIT impl (torch + kimi_compile needed where the engine runs)")
            continue
        for arch in job.archs:
            job.say(f"compiling {v.key()} for sm_{arch}")
            art = lt.compile_ptx(v, arch, ptx_version=job.ptx_version)
            name = f"{v.key()}__sm{arch}.ptx"
            (ptx_dir / name).write_text(art.ptx)
            entry = art.manifest_entry(name)
            if job.have_ptxas:
                passed, log = lt.ptxas_check(art.ptx, art.target)
                entry["ptxas"] = {"arch": art.target, "path": lt.ptxas_path(art.target), "passed": passed,
                                  "log": log[-2000:]}
                if not passed:
                    raise RuntimeError(f"ptxas rejected {name} for {art.target}: {log[-2000:]}")
            entries.append(entry)
            job.ptx_files.append(Path(PTX_DIR) / name)
        has_kernel.setdefault(v.plugin_id, True)
    job.manifest = {"format": "kimi-compile-ptx-manifest", "version": 1, "archs": list(job.archs),
                    "kernels": entries,
                    "calling_convention": "(input pointers..., int32 scalars..., output pointers...); "
                                          "Triton's scratch pointers are passed as null (kernels need none)"}
    (ptx_dir / "manifest.json").write_text(json.dumps(job.manifest, indent=2))
    if not job.have_ptxas:
        job.messages.append("Triton's ptxas was not found: the PTX was not assembled here")
    aot = job.aot
    want_aot = (lambda pid: bool(aot.get(pid, True))) if isinstance(aot, dict) else (lambda pid: bool(aot))
    job.aot_by_plugin = {pid: want_aot(pid) and ok for pid, ok in has_kernel.items()}
    lt.set_aot(job.graph, job.aot_by_plugin)


def _io_description(m: ir.Model) -> tuple[list, list]:
    def desc(v):
        dt = v.dtype.name.lower() if v.dtype is not None else None
        dt = {"float": "float32", "double": "float64"}.get(dt, dt)
        shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
        return {"name": v.name, "dtype": dt, "shape": shape}

    return [desc(v) for v in m.graph.inputs], [desc(v) for v in m.graph.outputs]


def _write(job: _Job) -> None:
    tmp, std_dir = job.tmp, job.tmp / "_onnx"
    ir.save(job.graph, tmp / MODEL_FILE, external_data=DATA_FILE if job.onnx_result.external_data else None)
    onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
    (tmp / PLUGIN_DIR / f"{REGISTRATION_MODULE}.py").write_text(lt.registration_module_source(job.manifest))
    for name in ("genai_config.json", "kimi_compile.json", "config.json"):
        if (std_dir / name).exists():
            shutil.copy2(std_dir / name, tmp / name)
    shutil.rmtree(std_dir)
    for name in SCRIPTS:
        shutil.copyfile(script_path(name), tmp / name)
    job.io = _io_description(job.graph)
    for pn in job.nodes:
        p = job.plugins.setdefault(pn.spec.plugin_id, {"op": pn.spec.op, "standard_op": pn.spec.standard_op,
                                                       "nodes": 0, "aot": job.aot_by_plugin.get(pn.spec.plugin_id, False),
                                                       "variants": []})
        p["nodes"] += 1
    for v in job.variants:
        job.plugins[v.plugin_id]["variants"].append(v.key())
    job.graph = None  # the weights can be large


def _verify(job: _Job) -> None:
    if not job.verify:
        job.verification = {"status": "skipped", "reason": "verify=False"}
    elif job.model.dtype != torch.float32:
        job.verification = {"status": "skipped", "reason": f"the ONNX Runtime check runs float32 models only "
                                                           f"(ONNX Runtime CPU lacks {job.dtype_name} kernels)"}
    else:
        job.say("verifying: plugin nodes swapped back, ONNX Runtime vs PyTorch (prefill + decode)")
        job.verification = verify_with_onnxruntime(job.tmp / MODEL_FILE, job.model)
        v = job.verification
        if v["status"] != "passed":
            raise VerificationError(f"verification failed: prefill max|diff| {v['prefill_max_abs_diff']:.3e}, "
                                    f"decode {v['decode_max_abs_diff']:.3e} > {v['tolerance']}", v)


def _describe(job: _Job) -> None:
    model = job.model
    inputs, outputs = job.io
    job.bundle = {
        "format": "kimi-compile-tensorrt-bundle", "version": 1,
        "model_type": str(model.config.model_type), "dtype": job.dtype_name,
        "onnx": MODEL_FILE, "external_data": bool(job.onnx_result.external_data),
        "registration_module": f"{PLUGIN_DIR}/{REGISTRATION_MODULE}.py",
        "inputs": inputs, "outputs": outputs,
        "state": [{"input": s.name, "output": s.present_name, "shape": list(s.shape),
                   "dtype": str(s.dtype).replace("torch.", "")} for s in model.state_specs()],
        "symbolic_axes": {"batch_size": "batch", "sequence_length": "new tokens per call",
                          "past_sequence_length": "tokens already in the MLA caches"},
        "plugins": job.plugins,
        "ptx": {"archs": list(job.archs), "files": [str(p) for p in job.ptx_files], "ptxas_checked": job.have_ptxas},
        "verification": job.verification,
        "engine": {"file": "model.plan", "built": False,
                   "needs": "TensorRT >= 10.7 with tensorrt.plugin (ONNX-parser plugin namespaces: >= 10.10)"},
    }
    (job.tmp / "README.md").write_text(bundle_readme(job.bundle))
    (job.tmp / BUNDLE_FILE).write_text(json.dumps(job.bundle, indent=2, default=str))


def _engine(job: _Job) -> None:
    trt_ok = tensorrt_available()
    if job.build_engine is True and not trt_ok:
        raise RuntimeError("build_engine=True but tensorrt (with tensorrt.plugin) does not import here")
    if not trt_ok:
        job.messages.append("TensorRT is not importable here: the engine was not built. Where TensorRT >= 10.7 "
                            f"is installed run: python {job.out_dir}/build_engine.py --bundle {job.out_dir}")
        return
    if not job.build_engine:
        return
    job.say("building the TensorRT engine")
    cmd = [sys.executable, str(job.tmp / "build_engine.py"), "--bundle", str(job.tmp), *job.engine_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        job.engine_path = job.out_dir / "model.plan"
        job.bundle["engine"]["built"] = True
    else:
        if job.build_engine is True:
            raise RuntimeError(f"engine build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        job.messages.append(f"engine build failed (see {BUNDLE_FILE}); the bundle is complete")
        job.bundle["engine"]["error"] = (proc.stdout + proc.stderr)[-4000:]
    (job.tmp / BUNDLE_FILE).write_text(json.dumps(job.bundle, indent=2, default=str))


#: the export, in order: (name, stage); each stage reads and fills the shared :class:`_Job`
STAGES: tuple[tuple[str, Callable[[_Job], None]], ...] = (
    ("onnx export", _onnx_export),
    ("plugin pass", _plugin_pass),
    ("ptx", _ptx),
    ("write", _write),
    ("verify", _verify),
    ("describe", _describe),
    ("engine", _engine),
)


def export_tensorrt(model=None, out_dir: Union[str, os.PathLike] = "kimi_export_out/tensorrt", dtype=None, *,
                    archs: Sequence[int] = lt.PTX_ARCHS, aot: Union[bool, dict] = True,
                    ptx_version: Optional[int] = None, verify: bool = True, build_engine: Union[bool, str] = "auto",
                    optimize: bool = True, engine_args: Sequence[str] = (), quiet: bool = False,
                    tiny: Optional[str] = None, seed: Optional[int] = None) -> TensorRTExportResult:
    """Export a Kimi model to a TensorRT bundle (see the module docstring for the layout and the stages).

    Args:
        model: a checkpoint directory, a :class:`~kimi_compile.KimiForCausalLM`, or None for a built-in tiny model.
        out_dir: destination folder (replaced when the export succeeds; untouched when it fails).
        dtype: "float32" / "float16" / "bfloat16" (or a torch dtype); default the model's dtype.
        archs: compute capabilities to compile PTX for (default sm_80 and sm_90).
        aot: mark plugin nodes ``aot = 1`` where an ahead-of-time kernel exists; False, or ``{plugin id: False}``
            for some plugins, makes them run their JIT ``impl`` instead (torch + kimi_compile in the TensorRT
            process; for ``kimi::kda`` that is the chunked multi-kernel prefill of ops/kda/).
        ptx_version: PTX ISA to emit (e.g. 84 for older drivers); default Triton's for each arch.
        verify: run the ONNX Runtime check of the bundle's graph against PyTorch (float32 only); a mismatch
            raises :class:`VerificationError` and writes nothing.
        build_engine: "auto" (build when TensorRT imports), True (build or fail), False (never).
        optimize: passed to the ONNX exporter's graph optimiser.
        engine_args: extra command-line arguments for ``build_engine.py``.
        quiet: no progress lines on stderr.
        tiny, seed: which built-in tiny model and weight seed when ``model`` is None
            (:func:`kimi_compile.resolve.resolve_model`).

    Returns:
        :class:`TensorRTExportResult` (printable summary).
    """
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
    job = _Job(model=resolve_model(model, dtype, tiny=tiny, seed=seed), out_dir=out_dir, archs=archs, aot=aot,
               ptx_version=ptx_version, verify=verify, build_engine=build_engine, optimize=optimize,
               engine_args=tuple(engine_args), say=say)
    with staging_dir(out_dir) as tmp:
        job.tmp = tmp
        for name, stage in STAGES:
            t0 = time.perf_counter()
            stage(job)
            job.seconds[name] = time.perf_counter() - t0
    for msg in job.messages:
        say(msg)
    return TensorRTExportResult(out_dir=out_dir, onnx_path=out_dir / MODEL_FILE,
                                registration_module=out_dir / PLUGIN_DIR / f"{REGISTRATION_MODULE}.py",
                                ptx_files=[out_dir / p for p in job.ptx_files], plugins=job.plugins,
                                verification=job.verification, engine_path=job.engine_path, messages=job.messages,
                                seconds=job.seconds)
