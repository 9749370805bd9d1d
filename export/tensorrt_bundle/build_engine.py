"""Build a TensorRT engine from a kimi-compile bundle (written by kimi_compile.export.tensorrt).

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
import importlib
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
