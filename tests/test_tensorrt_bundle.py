"""TensorRT bundle of the tiny model (export/tensorrt.py, lowering/tensorrt/, lowering/plugin_spec.py).

TensorRT cannot be installed here, so the bundle is checked piece by piece on CPU:

* the graph passes onnx.checker; every plugin node matches its description (inputs, outputs, attributes,
  shape and dtype rules) and the generated registration module, imported against a stub ``tensorrt.plugin``,
  registers a plugin with the same inputs, outputs and attributes whose output shapes / dtypes agree;
* every PTX assembles with Triton's ptxas for sm_90 (and for its own target);
* the plugin kernels, launched with the plugin's launch parameters, compute the right thing under
  TRITON_INTERPRET=1 (float64 loops as references), and those launch parameters equal the Triton launchers';
* the graph with every plugin node swapped back to LinearAttention / CausalConvWithState runs in ONNX Runtime
  and matches PyTorch within 1e-4 (float32) for prefill and decode;
* without TensorRT the export returns normally and says the engine build needs TensorRT.
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import types

import onnx
import pytest
import torch
from symbolic_dims import Sym, ev

from kimi_compile.lowering import plugin_spec as ps
from kimi_compile.lowering import tensorrt as lt


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The tiny model's bundle, exported once per session even when pytest-xdist splits this module over
    workers (the first worker exports into the session's shared temp root, the others wait for it)."""
    from kimi_compile.export.tensorrt import export_tensorrt, tensorrt_available

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    shared = root / "kimi_trt_bundle"
    done, failed = shared / "result.pkl", shared / "FAILED"
    try:
        os.mkdir(root / "kimi_trt_bundle.lock")
        owner = True
    except FileExistsError:
        owner = False
    if owner:
        try:
            out = shared / "bundle"
            out.mkdir(parents=True)
            (out / "stale.txt").write_text("replaced by the export")
            # "auto" (the CLI's default) where TensorRT is absent: it must return normally; never build here
            result = export_tensorrt(None, out, "float32", optimize=False, quiet=True,
                                     build_engine=False if tensorrt_available() else "auto")
            (shared / "result.tmp").write_bytes(pickle.dumps(result))
            os.replace(shared / "result.tmp", done)
        except BaseException:
            shared.mkdir(parents=True, exist_ok=True)
            failed.write_text("export failed in another worker")
            raise
        return result
    deadline = time.monotonic() + 900
    while not done.exists():
        if failed.exists():
            pytest.fail("the bundle export failed (see the worker that ran it)")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the bundle export")
        time.sleep(0.5)
    return pickle.loads(done.read_bytes())


@pytest.fixture(scope="module")
def manifest(bundle):
    return json.loads((bundle.out_dir / "plugins" / "ptx" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def model_proto(bundle):
    return onnx.load(str(bundle.onnx_path))


def stub_tensorrt():
    """Minimal ``tensorrt`` / ``tensorrt.plugin`` stand-ins recording what the generated module registers."""
    trt = types.ModuleType("tensorrt")
    for name in ("float32", "float16", "bfloat16", "int32", "int64"):
        setattr(trt, name, f"trt.{name}")
    trtp = types.ModuleType("tensorrt.plugin")
    trtp.REGISTRY = {}

    def decorator(kind):
        def outer(plugin_id):
            def inner(fn):
                slot = trtp.REGISTRY.setdefault(plugin_id, {})
                assert kind not in slot, f"{kind} registered twice for {plugin_id}"
                slot[kind] = fn
                return fn
            return inner
        return outer

    for kind in ("register", "impl", "aot_impl", "autotune"):
        setattr(trtp, kind, decorator(kind))

    class TensorDesc:
        def __init__(self, shape_expr, dtype):
            self.shape_expr, self.dtype = list(shape_expr), dtype

    class AutoTuneCombination:
        def __init__(self, spec):
            self.spec = spec

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None

    class SymInt32:
        def __init__(self, value):
            self.value = value

    class SymIntExprs(list):
        def __init__(self, n):
            super().__init__([None] * n)

    trtp.TensorDesc = TensorDesc
    trtp.Tensor = TensorDesc
    trtp.AutoTuneCombination = AutoTuneCombination
    trtp.KernelLaunchParams = KernelLaunchParams
    trtp.SymInt32 = SymInt32
    trtp.SymIntExprs = SymIntExprs
    trtp.SymExprs = SymIntExprs
    trtp.from_shape_expr = lambda shape, dtype: TensorDesc(shape, dtype)
    trt.plugin = trtp
    return trt, trtp


@pytest.fixture
def registration(bundle, monkeypatch):
    """The bundle's generated registration module, imported against the stub."""
    trt, trtp = stub_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    spec = importlib.util.spec_from_file_location("kimi_trt_plugins_under_test", bundle.registration_module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, trt, trtp


def _trt_dtype(name):
    return f"trt.{name}"


# ------------------------------------------------------------------------------------------------ graph


def test_bundle_layout_and_no_tensorrt(bundle):
    out = bundle.out_dir
    for name in ("model.onnx", "bundle.json", "build_engine.py", "run_engine.py", "README.md", "config.json",
                 "plugins/kimi_trt_plugins.py", "plugins/ptx/manifest.json"):
        assert (out / name).is_file(), name
    assert not (out / "stale.txt").exists()  # the old folder was replaced as a whole
    assert not any(p.name.startswith(".bundle.tmp-") for p in out.parent.iterdir())
    info = json.loads((out / "bundle.json").read_text())
    assert info["engine"]["built"] is False and bundle.engine_path is None
    from kimi_compile.export.tensorrt import tensorrt_available

    if not tensorrt_available():  # the export returned normally and said what the engine needs
        assert any("TensorRT is not importable" in m and "build_engine.py" in m for m in bundle.messages)
        assert "TensorRT is not importable" in str(bundle)
    assert info["verification"]["status"] == "passed"
    for path in ("build_engine.py", "run_engine.py", "plugins/kimi_trt_plugins.py"):
        compile((out / path).read_text(), path, "exec")


def test_onnx_checker_and_standard_ops_only(model_proto):
    onnx.checker.check_model(model_proto, full_check=True)
    imports = {o.domain: o.version for o in model_proto.opset_import}
    assert imports.get("kimi") == lt.PLUGIN_OPSET_VERSION and imports.get("") == 27
    kinds = {(n.domain, n.op_type) for n in model_proto.graph.node}
    assert ("kimi", "kda") in kinds and ("kimi", "short_conv") in kinds
    for domain, op_type in kinds:
        if domain == "kimi":
            assert ps.spec_for_node(domain, op_type) is not None
        else:  # everything else is a standard ONNX op, none of the ops the plugins replaced
            assert domain in ("", "ai.onnx"), (domain, op_type)
            onnx.defs.get_schema(op_type, 27, domain)
            assert op_type not in ("LinearAttention", "CausalConvWithState")


def test_plugin_nodes_follow_their_description(model_proto, manifest):
    nodes = lt.plugin_nodes(model_proto)
    assert len(nodes) == 6  # tiny model: 3 KDA layers, each one conv + one KDA
    for pn in nodes:
        spec = pn.spec
        assert len(pn.inputs) == len(spec.inputs) and all(pn.inputs)
        assert len(pn.outputs) == len(spec.outputs)
        assert set(pn.attributes) == set(spec.attribute_names)
        spec.check_attributes(pn.attributes)  # types and allowed values
        assert pn.parser_attributes == {"plugin_namespace": spec.namespace, "aot": 1}
        assert pn.output_dtypes == tuple(ps.output_dtypes(spec, pn.input_dtypes))
        assert list(pn.output_shapes) == ps.output_shapes(spec, pn.input_shapes, pn.attributes)
        for t, shape in zip(spec.inputs, pn.input_shapes):
            assert len(shape) == t.rank
        if spec is ps.KDA:
            hv, K, V = pn.attributes["num_heads"], pn.attributes["key_dim"], pn.attributes["value_dim"]
            assert pn.input_shapes[0][2] == hv * K and pn.input_shapes[2][2] == hv * V
            assert pn.input_shapes[5][1:] == (hv, K, V)
            assert pn.attributes["scale"] == pytest.approx(K ** -0.5)
        else:
            C, W = pn.attributes["channels"], pn.attributes["kernel_size"]
            assert pn.input_shapes[1] == (C, W) and pn.input_shapes[3][1:] == (C, W - 1)
    # every specialisation in the graph has PTX for both archs
    have = {(e["plugin"], e["key"], e["arch"]) for e in manifest["kernels"]}
    for v in lt.kernel_variants(model_proto):
        for arch in (80, 90):
            assert (v.plugin_id, v.key(), arch) in have


def test_registration_module_matches_the_descriptions(model_proto, registration):
    module, trt, trtp = registration
    assert set(trtp.REGISTRY) == {s.plugin_id for s in ps.PLUGINS}
    import inspect

    for spec in ps.PLUGINS:
        reg = trtp.REGISTRY[spec.plugin_id]
        assert set(reg) == {"register", "impl", "aot_impl", "autotune"}
        names = list(spec.input_names) + list(spec.attribute_names)
        params = inspect.signature(reg["register"]).parameters
        assert list(params) == names
        assert [params[n].annotation for n in spec.input_names] == [trtp.TensorDesc] * len(spec.inputs)
        assert [params[a.name].annotation for a in spec.attributes] == [a.type for a in spec.attributes]
        assert list(inspect.signature(reg["aot_impl"]).parameters) == names + ["outputs"]
        assert list(inspect.signature(reg["impl"]).parameters) == names + ["outputs", "stream"]
        assert module.PLUGIN_SPECS[spec.plugin_id]["inputs"] == list(spec.input_names)
        assert module.PLUGIN_SPECS[spec.plugin_id]["outputs"] == list(spec.output_names)
        combos = [c.spec for c in reg["autotune"](*[None] * len(spec.inputs), outputs=None)]
        assert combos == [", ".join(ps.AUTOTUNE_DTYPE[d] for d in sum(spec.io_dtypes("float32"), []))]

    # the register functions reproduce every node's output shapes and dtypes
    for pn in lt.plugin_nodes(model_proto):
        reg = trtp.REGISTRY[pn.spec.plugin_id]["register"]
        descs = [trtp.TensorDesc(shape, _trt_dtype(dt)) for shape, dt in zip(pn.input_shapes, pn.input_dtypes)]
        outs = reg(*descs, **pn.attributes)
        assert len(outs) == len(pn.outputs)
        for o, shape, dt in zip(outs, pn.output_shapes, pn.output_dtypes):
            assert tuple(o.shape_expr) == shape and o.dtype == _trt_dtype(dt)


def test_aot_impl_returns_the_ptx_and_the_launchers_launch(bundle, model_proto, manifest, registration, monkeypatch):
    module, trt, trtp = registration
    B, T = Sym.var("B"), Sym.var("T")
    for pn in lt.plugin_nodes(model_proto):
        spec = pn.spec
        binding = lt.kernel_binding(spec)
        aot = trtp.REGISTRY[spec.plugin_id]["aot_impl"]
        shapes = [[B if d == "batch_size" else T if d == "sequence_length" else d for d in s] for s in pn.input_shapes]
        descs = [trtp.TensorDesc(s, _trt_dtype(dt)) for s, dt in zip(shapes, pn.input_dtypes)]
        for sm, arch in (("80", 80), ("90", 90), ("86", 80), ("100", 90)):
            monkeypatch.setenv("KIMI_TRT_SM", sm)
            name, ptx, params, scalars = aot(*descs, **pn.attributes, outputs=None)
            entry = next(e for e in manifest["kernels"] if e["plugin"] == spec.plugin_id and e["arch"] == arch
                         and e["attributes"] == pn.attributes)
            assert name == entry["kernel_name"].encode()
            assert ptx == (bundle.out_dir / "plugins" / "ptx" / entry["file"]).read_bytes()
            assert f".target sm_{arch}".encode() in ptx
            for b, t in ((1, 1), (3, 7), (2, 4096)):
                env = {"B": b, "T": t}
                concrete = [[ev(d, env) for d in s] for s in shapes]
                want = lt.launch_params(spec, binding, concrete, pn.attributes)
                assert [ev(g, env) for g in (params.grid_x, params.grid_y, params.grid_z)] == list(want["grid"])
                assert params.block_x == want["block"][0] == entry["block_x"]
                assert params.shared_mem == max(want["shared_mem"], entry["compiled_shared_mem"])
                assert [ev(s.value, env) for s in scalars] == list(want["scalars"])
    monkeypatch.setenv("KIMI_TRT_SM", "75")
    pn = lt.plugin_nodes(model_proto)[0]
    descs = [trtp.TensorDesc(s, _trt_dtype(dt)) for s, dt in zip(pn.input_shapes, pn.input_dtypes)]
    with pytest.raises(RuntimeError, match="no PTX"):
        trtp.REGISTRY[pn.spec.plugin_id]["aot_impl"](*descs, **pn.attributes, outputs=None)


def test_embedded_launch_configs_are_the_launchers_functions(bundle):
    import importlib
    import inspect

    from kimi_compile.ops.short_conv import kernel as short_conv_triton

    source = bundle.registration_module.read_text()
    kda = lt.kernel_binding(ps.KDA)
    kda_launch_config = getattr(importlib.import_module(kda.module), kda.launch_config)
    for fn in (short_conv_triton.short_conv_launch_config, kda_launch_config):
        assert textwrap.dedent(inspect.getsource(fn)) in source


def test_ptx_assembles_with_tritons_ptxas(bundle, manifest):
    assert len(manifest["kernels"]) == len(bundle.ptx_files) == 4  # 2 plugins x sm_80, sm_90
    for entry in manifest["kernels"]:
        path = bundle.out_dir / "plugins" / "ptx" / entry["file"]
        for arch in {"sm_90", entry["target"]}:
            ptxas = lt.ptxas_path(arch)  # Triton's assembler for that arch (>= 3.8 ships two)
            assert ptxas is not None and os.path.join("backends", "nvidia", "bin", "ptxas") in ptxas
            proc = subprocess.run([ptxas, f"-arch={arch}", str(path), "-o", os.devnull], capture_output=True, text=True)
            assert proc.returncode == 0, (entry["file"], arch, proc.stderr)
        assert entry["ptxas"]["passed"] and entry["ptxas"]["path"] == lt.ptxas_path(entry["target"])
        assert entry["target"] == f"sm_{entry['arch']}"
        assert entry["shared_mem"] >= entry["compiled_shared_mem"]
        sig = list(entry["signature"].values())
        spec = ps.spec_for_op("kimi::" + entry["plugin"].split("::")[1])
        n_in, n_out = len(spec.inputs), len(spec.outputs)
        assert all(s.startswith("*") for s in sig[:n_in] + sig[len(sig) - n_out:])
        assert all(s == "i32" for s in sig[n_in:len(sig) - n_out])
    sc = [e for e in manifest["kernels"] if e["plugin"] == "kimi::short_conv"]
    assert all(e["compiled_shared_mem"] == 0 for e in sc)  # what short_conv_launch_config promises


# ------------------------------------------------------------------------------------------------ kernels

PLUGIN_KERNEL_SCRIPT = textwrap.dedent(r'''
    import json, math, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from kimi_compile.lowering import plugin_spec as ps
    from kimi_compile.lowering import tensorrt as lt
    from kimi_compile.ops.kda import recurrent as kda_triton
    from kimi_compile.ops.short_conv import kernel as short_conv_triton

    variants = json.loads(sys.argv[1])

    def conv_loop(x, w, b, s, act):
        B, T, C = x.shape
        W = w.shape[1]
        y = torch.zeros(B, T, C, dtype=torch.float64)
        fs = torch.zeros(B, C, W - 1, dtype=torch.float64)
        for bi in range(B):
            for c in range(C):
                xpad = [float(v) for v in s[bi, c]] + [float(x[bi, t, c]) for t in range(T)]
                for t in range(T):
                    acc = float(b[c]) + sum(float(w[c, j]) * xpad[t + j] for j in range(W))
                    y[bi, t, c] = acc / (1.0 + math.exp(-acc)) if act == "silu" else acc
                for i in range(W - 1):
                    fs[bi, c, i] = xpad[T + i]
        return y, fs

    def kda_loop(q, k, v, g, beta, state, HV, K, V, scale):
        B, T = q.shape[:2]
        q, k, g = (t.double().view(B, T, HV, K) for t in (q, k, g))
        v = v.double().view(B, T, HV, V)
        o = torch.zeros(B, T, HV, V, dtype=torch.float64)
        S = state.double().clone()
        for b in range(B):
            for h in range(HV):
                for t in range(T):
                    S[b, h] = torch.exp(g[b, t, h])[:, None] * S[b, h]
                    u = beta[b, t, h].double() * (v[b, t, h] - k[b, t, h] @ S[b, h])
                    S[b, h] = S[b, h] + torch.outer(k[b, t, h], u)
                    o[b, t, h] = scale * (q[b, t, h] @ S[b, h])
        return o.view(B, T, HV * V), S

    # what the Triton launchers launch
    launched = []
    real_launch = kda_triton._launch

    def spy(kernel, grid, *args, **kwargs):
        launched.append(dict(kernel=kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), grid=list(grid),
                             num_warps=kwargs.get("num_warps"), BK=kwargs.get("BK"), BV=kwargs.get("BV")))
        return real_launch(kernel, grid, *args, **kwargs)

    kda_triton._launch = spy
    real_conv = short_conv_triton.short_conv_kernel

    class ConvSpy:
        def __getitem__(self, grid):
            def go(*args, **kwargs):
                launched.append(dict(kernel="short_conv_kernel", grid=list(grid), num_warps=kwargs["num_warps"]))
                return real_conv[grid](*args, **kwargs)
            return go

    short_conv_triton.short_conv_kernel = ConvSpy()

    results = []
    for plugin_id, attrs in variants:
        spec = next(s for s in ps.PLUGINS if s.plugin_id == plugin_id)
        binding = lt.kernel_binding(spec)
        module = __import__(binding.module, fromlist=[binding.kernel])
        kernel = getattr(module, binding.kernel)
        if kernel is short_conv_triton.short_conv_kernel:
            kernel = real_conv
        consts = lt.kernel_constexprs(spec, binding, attrs)
        for B, T in ((1, 1), (2, 5), (3, 19)):
            g = torch.Generator().manual_seed(B * 100 + T)
            if spec is ps.SHORT_CONV:
                C, W = attrs["channels"], attrs["kernel_size"]
                ins = [torch.randn(B, T, C, generator=g), torch.randn(C, W, generator=g),
                       torch.randn(C, generator=g), torch.randn(B, C, W - 1, generator=g)]
                outs = [torch.empty(B, T, C), torch.empty(B, C, W - 1)]
                ref = conv_loop(*ins, attrs["activation"])
                launched.clear()
                short_conv_triton.short_conv_forward(ins[0], ins[1], ins[2], ins[3], attrs["activation"])
            else:
                HV, K, V = attrs["num_heads"], attrs["key_dim"], attrs["value_dim"]
                q = torch.nn.functional.normalize(torch.randn(B, T, HV, K, generator=g), dim=-1)
                k = torch.nn.functional.normalize(torch.randn(B, T, HV, K, generator=g), dim=-1)
                v = torch.randn(B, T, HV, V, generator=g)
                gg = -torch.nn.functional.softplus(torch.randn(B, T, HV, K, generator=g))
                beta = torch.sigmoid(torch.randn(B, T, HV, generator=g))
                s0 = torch.randn(B, HV, K, V, generator=g)
                ins = [q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1), gg.reshape(B, T, -1), beta, s0]
                outs = [torch.empty(B, T, HV * V), torch.empty(B, HV, K, V)]
                ref = kda_loop(*ins, HV, K, V, attrs["scale"])
                launched.clear()
                kda_triton.kda_forward_recurrent(q, k, v, gg, beta, s0, attrs["scale"], None)
            shapes = [tuple(t.shape) for t in ins]
            p = lt.launch_params(spec, binding, shapes, attrs)
            kernel[p["grid"]](*ins, *p["scalars"], *outs, num_warps=p["num_warps"], **consts)
            results.append(dict(plugin=plugin_id, B=B, T=T, launch=dict(grid=list(p["grid"]), num_warps=p["num_warps"],
                                consts={k_: v_ for k_, v_ in consts.items() if k_ in ("BK", "BV", "BLOCK_T", "BLOCK_C")}),
                                launcher=list(launched),
                                errors=[float((a.double() - r).abs().max()) for a, r in zip(outs, ref)]))
    print(json.dumps(results))
''')


@pytest.fixture(scope="module")
def plugin_kernel_runs(model_proto):
    variants = [(v.plugin_id, v.attrs) for v in lt.kernel_variants(model_proto)]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", PLUGIN_KERNEL_SCRIPT, json.dumps(variants)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_plugin_kernels_with_plugin_launch_match_float64_loops(plugin_kernel_runs):
    assert {r["plugin"] for r in plugin_kernel_runs} == {"kimi::kda", "kimi::short_conv"}
    for r in plugin_kernel_runs:
        assert max(r["errors"]) < 2e-5, r


def test_plugin_launch_equals_triton_launchers(plugin_kernel_runs):
    for r in plugin_kernel_runs:
        assert len(r["launcher"]) == 1, r
        ran = r["launcher"][0]
        if r["plugin"] == "kimi::kda":  # kda_triton.kda_forward_recurrent: grid (V blocks, N * HV)
            assert ran["grid"] + [1] == r["launch"]["grid"]
            assert (ran["BK"], ran["BV"]) == (r["launch"]["consts"]["BK"], r["launch"]["consts"]["BV"])
        else:
            assert ran["grid"] == r["launch"]["grid"]
        assert ran["num_warps"] == r["launch"]["num_warps"]


# ------------------------------------------------------------------------------------------------ ORT


def test_swapped_back_graph_matches_pytorch_in_onnxruntime(bundle):
    from kimi_compile import tiny_config
    from kimi_compile.export.tensorrt import verify_with_onnxruntime
    from kimi_compile.model import KimiForCausalLM

    std = lt.to_standard_graph(onnx.load(str(bundle.onnx_path)))
    ops = [n.op_type for n in std.graph.node]
    assert ops.count("LinearAttention") == 3 and ops.count("CausalConvWithState") == 3
    assert not lt.plugin_nodes(std) and "kimi" not in {o.domain for o in std.opset_import}
    onnx.checker.check_model(std, full_check=True)
    model = KimiForCausalLM.from_config(tiny_config(), seed=0, dtype=torch.float32).eval()
    report = verify_with_onnxruntime(bundle.onnx_path, model, batch=3, prompt_len=7, seed=11)
    assert report["status"] == "passed", report
    assert report["prefill_max_abs_diff"] <= 1e-4 and report["decode_max_abs_diff"] <= 1e-4
    assert any(k.endswith("recurrent_state") for k in report["decode"])
    # the check can fail: a wrong model (other weights) is caught
    other = KimiForCausalLM.from_config(tiny_config(), seed=1, dtype=torch.float32).eval()
    assert verify_with_onnxruntime(bundle.onnx_path, other)["status"] == "failed"


# ------------------------------------------------------------------------------------------------ scripts


def _load_script(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_engine_scripts_profiles_and_state_feedback(bundle):
    info = json.loads((bundle.out_dir / "bundle.json").read_text())
    build = _load_script(bundle.out_dir / "build_engine.py", "kimi_build_engine_under_test")
    run = _load_script(bundle.out_dir / "run_engine.py", "kimi_run_engine_under_test")
    args = types.SimpleNamespace(max_batch=8, opt_batch=2, max_seq=512, opt_seq=64, max_past=1024, opt_past=128)
    names = {i["name"] for i in info["inputs"]}
    assert "input_ids" in names and any(n.endswith(".recurrent_state") for n in names)
    for phase in ("prefill", "decode"):
        shapes = build.profile_shapes(info, args, phase)
        assert set(shapes) == names
        for name, (lo, opt, hi) in shapes.items():
            assert len(lo) == len(opt) == len(hi)
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), (name, lo, opt, hi)
        assert shapes["input_ids"][2] == ((8, 512) if phase == "prefill" else (8, 1))
    zero = run.zero_state_shapes(info, 3)
    assert set(zero) == names - {"input_ids"}
    outs = {"logits": 0, **{"present." + n[len("past_key_values."):]: n for n in zero}}
    fed = run.next_state(outs)
    assert fed == {n: n for n in zero}  # every present.* lands on its past_key_values.* input


def test_failed_export_leaves_the_destination_alone(tmp_path, monkeypatch):
    from kimi_compile.export import onnx as onnx_export
    from kimi_compile.export.tensorrt import export_tensorrt

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(onnx_export, "export_onnx", boom)
    with pytest.raises(RuntimeError, match="injected"):
        export_tensorrt(None, out, "float32", quiet=True)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    with pytest.raises(ValueError, match="dtype"):
        export_tensorrt(None, out, "int8", quiet=True)
    with pytest.raises(ValueError, match="archs"):
        export_tensorrt(None, out, archs=(50,), quiet=True)


# ------------------------------------------------------------------------------------------------ bundle files


def test_bundle_scripts_are_the_packaged_files(bundle):
    from kimi_compile.export.tensorrt_bundle import SCRIPTS, script_path

    for name in SCRIPTS:
        assert (bundle.out_dir / name).read_bytes() == script_path(name).read_bytes(), name


@pytest.mark.parametrize("name", ["build_engine", "run_engine"])
def test_engine_scripts_run_standalone_without_tensorrt(name, tmp_path):
    """The scripts import with the standard library only (tensorrt / torch load where they run): --help works
    from a folder holding nothing but the script."""
    from kimi_compile.export.tensorrt_bundle import script_path

    copy = tmp_path / f"{name}.py"
    copy.write_bytes(script_path(f"{name}.py").read_bytes())
    probe = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = [{str(copy)!r}, "--help"]
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, e.code
        assert "tensorrt" not in sys.modules and "torch" not in sys.modules
    """)
    proc = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--bundle" in proc.stdout


def test_runner_positions_follow_the_cache_length():
    from kimi_compile.export.tensorrt_bundle import run_engine

    bundle = {"inputs": [{"name": "input_ids", "shape": ["batch_size", "sequence_length"]},
                         {"name": "position_ids", "shape": ["batch_size", "sequence_length"]},
                         {"name": "past_key_values.0.key", "shape": ["batch_size", 1, "past_sequence_length", 40]}]}
    state = {"past_key_values.0.key": torch.zeros(2, 1, 7, 40)}
    assert run_engine.past_length(bundle, None) == 0
    assert run_engine.past_length(bundle, state) == 7
    assert run_engine.position_ids(7, 2, 3) == [[7, 8, 9], [7, 8, 9]]
    kda_only = {"inputs": [{"name": "past_key_values.0.recurrent_state", "shape": ["batch_size", 2, 16, 16]}]}
    assert run_engine.past_length(kda_only, {"past_key_values.0.recurrent_state": torch.zeros(1, 2, 16, 16)}) == 0


@pytest.fixture
def plugin_runtime(monkeypatch):
    """The fixed part of the generated registration module (templates/plugin_runtime.py) against the stub."""
    from kimi_compile.lowering.tensorrt.codegen import RUNTIME_TEMPLATE

    trt, trtp = stub_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    spec = importlib.util.spec_from_file_location("kimi_plugin_runtime_under_test", RUNTIME_TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runtime_template_picks_the_newest_ptx_the_gpu_runs(plugin_runtime, monkeypatch):
    rt = plugin_runtime
    attrs = dict(num_heads=2, key_dim=16, value_dim=16, scale=0.25)
    entries = [dict(plugin="kimi::kda", dtype="float32", arch=arch, attributes=dict(attrs), file=f"k{arch}.ptx")
               for arch in (80, 90)]
    entries.append(dict(plugin="kimi::kda", dtype="float32", arch=90, attributes=dict(attrs, key_dim=32), file="x"))
    monkeypatch.setattr(rt, "MANIFEST", {"kernels": entries})
    assert rt.select_kernel("kimi::kda", attrs, "float32", sm=86)["arch"] == 80
    assert rt.select_kernel("kimi::kda", attrs, "float32", sm=100)["file"] == "k90.ptx"
    assert rt.select_kernel("kimi::kda", dict(attrs, scale=0.25 + 1e-9), "float32", sm=90)["arch"] == 90
    monkeypatch.setenv("KIMI_TRT_SM", "90")
    assert rt.select_kernel("kimi::kda", attrs, "float32")["file"] == "k90.ptx"
    for bad in (dict(sm=75), dict(dtype="float16"), dict(attributes=dict(attrs, value_dim=32))):
        kwargs = dict(plugin_id="kimi::kda", attributes=attrs, dtype="float32", sm=90) | bad
        with pytest.raises(RuntimeError, match="no PTX"):
            rt.select_kernel(**kwargs)
    assert rt._dtype_name("trt.bfloat16") == "bfloat16"
    with pytest.raises(TypeError, match="float32"):
        rt._dtype_name("trt.int32")


def test_runtime_template_has_a_jit_fallback_per_plugin(plugin_runtime):
    import inspect

    for spec in ps.PLUGINS:
        fn = getattr(plugin_runtime, f"{spec.name}_jit")
        assert list(inspect.signature(fn).parameters) == [*spec.input_names, *spec.attribute_names, "outputs", "stream"]
