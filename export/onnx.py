"""Whole-model ONNX export: one graph for prefill and decode with the state as explicit graph I/O.

``export_onnx(model, out_dir)`` writes::

    out_dir/model.onnx            the graph (opset 27 by default; weights inline, or in model.onnx.data)
    out_dir/model.onnx.data       external weights (large models, or external_data="always")
    out_dir/genai_config.json     onnxruntime-genai's config (``onnxruntime_genai.Model(out_dir)`` loads the folder)
    out_dir/kimi_compile.json     every graph input / output / state tensor, lowering, MLA cache layout
    out_dir/config.json           the model's KimiConfig (kimi_compile format)

(see ``export/genai_config.py``; genai_config.json is left out when GenAI cannot run the graph, e.g. with
``mla_cache="absorbed"``).

Graph I/O (CONTRACT.md): ``input_ids`` int64 [batch_size, sequence_length]; ``position_ids`` int64
[batch_size, sequence_length] only for rotary models (K2); ``past_key_values.{i}.<part>`` for every piece of
state; outputs ``logits`` float32 [batch_size, sequence_length, vocab] and ``present.{i}.<part>``.
MLA caches have axis ``past_sequence_length`` in and ``total_sequence_length`` out; by default each is two
halves ``.key`` / ``.value`` (``export/mla_cache.py``).

Steps: capture with ``torch.export`` (dynamic batch / sequence / past axes), translate with
``torch.onnx.export(dynamo=True, custom_translation_table=...)`` (lowerings in ``lowering/onnx.py``), rename the
symbolic axes, raise the default opset import to 27 (or keep 18 for the fallback), save, and run
``onnx.checker.check_model(full_check=True)``. Everything is written into a temporary folder next to the
destination, renamed into place only when complete; a failed export leaves no partial output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..dtypes import EXPORT_DTYPES, parse_dtype
from ..lowering.onnx import custom_translation_table
from ..lowering.onnx_passes import raise_default_opset, widen_bfloat16_einsum
from ..model import absorbed_attention
from ..resolve import resolve_model
from ..state import present_name
from .atomic_dir import staging_dir
from .genai_config import genai_unsupported_reason, write_genai_config, write_io_description
from .mla_cache import check_layout, from_graph_state, graph_state_specs, to_graph_state

__all__ = ["export_onnx", "OnnxExportResult", "ExportError", "MODEL_FILE", "DATA_FILE", "graph_op_counts",
           "DTYPES", "DEFAULT_LOWERING_NOTE"]

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
GENAI_CONFIG_FILE = "genai_config.json"
CONFIG_FILE = "config.json"

BATCH = "batch_size"
SEQ = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: above this many bytes of weights the graph keeps them in model.onnx.data (protobuf caps a file at 2 GiB)
EXTERNAL_DATA_THRESHOLD = 1 << 30

#: why export_onnx() writes the fallback graph unless asked for opset 27 (numbers: docs/benchmarks.md)
DEFAULT_LOWERING_NOTE = ("fallback lowering by default: faster CPU prefill than opset 27 in ONNX Runtime 1.32 "
                         "(which runs LinearAttention as a per-token loop), and it runs where opset 27 does not "
                         "(onnxruntime-gpu 1.31); opset=27 writes LinearAttention / CausalConvWithState")

STAGES = ("prepare", "capture", "translate", "finish graph", "save", "check", "describe", "finalize")
_FAIL_ENV = "KIMI_EXPORT_FAIL_AT"  # test hook: inject a failure at the start of a stage


class ExportError(RuntimeError):
    """The export failed; no output folder was left behind."""


@dataclass
class OnnxExportResult:
    out_dir: Path
    model_path: Path
    opset: int
    fallback: bool
    dtype: torch.dtype
    input_names: list[str]
    output_names: list[str]
    op_counts: dict[str, int]
    external_data: bool
    seconds: dict[str, float] = field(default_factory=dict)
    mla_cache: str = "split"
    #: why this lowering (the default's reason when neither opset nor fallback was given, else "as asked")
    lowering_note: str = "as asked"
    #: None when onnxruntime-genai can run the folder (genai_config.json written), else the reason
    genai_unsupported: Optional[str] = None


# ------------------------------------------------------------------------------------------------ helpers


class _GraphModule(torch.nn.Module):
    """The model with flat graph I/O: (input_ids, [position_ids], *state) -> (logits, *new_state).

    ``specs`` are the graph's state inputs (:func:`~kimi_compile.export.mla_cache.graph_state_specs`); with the
    split MLA layout each cache arrives as two halves that are joined for the model and split again after it.
    """

    def __init__(self, model, specs, use_positions: bool, mla_cache: str) -> None:
        super().__init__()
        self.model = model
        self.names = [s.name for s in specs]
        self.use_positions = use_positions
        self.mla_cache = mla_cache

    def forward(self, input_ids, *args):
        if self.use_positions:
            position_ids, flat = args[0], args[1:]
        else:
            position_ids, flat = None, args
        config = self.model.config
        state = from_graph_state(dict(zip(self.names, flat)), config, self.mla_cache)
        logits, new_state = self.model(input_ids, state, position_ids)
        new_state = to_graph_state(new_state, config, self.mla_cache)
        return (logits, *[new_state[n] for n in self.names])


def _sample_inputs(model, specs, batch: int, seq: int, past: int):
    """Example inputs for tracing; sizes >= 2 so no axis is specialised to 0/1."""
    gen = torch.Generator().manual_seed(0)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen)
    args = [ids]
    if cfg.use_rope:
        args.append((torch.arange(seq) + past).unsqueeze(0).repeat(batch, 1))
    for s in specs:
        args.append(torch.zeros(s.concrete_shape(batch, past), dtype=s.dtype))
    return tuple(args)


def _dynamic_shapes(specs, use_positions: bool):
    batch = torch.export.Dim(BATCH, min=1)
    # the model takes a separate (mask-free) branch for T == 1 that would specialise the axis; the T >= 2
    # branch traced here is exact for T == 1 too (its causal mask is all-true), so one graph serves both.
    seq = torch.export.Dim(SEQ, min=2)
    past = torch.export.Dim(PAST, min=0)
    axis = {BATCH: batch, PAST: past}
    tokens = {0: batch, 1: seq}
    state = [{i: axis[d] for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs]
    rest = ([tokens] if use_positions else []) + state
    return (tokens, tuple(rest))


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's chatter (missing torchvision, deprecations) for the duration."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                              "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _iter_values(graph):
    import onnx_ir as ir

    yield from graph.inputs
    yield from graph.initializers.values()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from node.outputs
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from attr.value.inputs


def _rename_axes(model, mapping: dict[str, str]) -> None:
    """Rename symbolic dims (and dims that are expressions of them) everywhere in ``model``."""
    import onnx_ir as ir

    ordered = sorted(mapping.items(), key=lambda kv: len(kv[0]), reverse=True)
    totals = {f"{PAST} + {SEQ}", f"{SEQ} + {PAST}"}

    def rename(expr: str) -> str:
        for old, new in ordered:
            expr = re.sub(rf"(?<![\w]){re.escape(old)}(?![\w])", new, expr)
        return TOTAL if expr in totals else expr

    values = list(_iter_values(model.graph))
    for fn in model.functions.values():
        values.extend(fn.inputs)
        for node in ir.traversal.RecursiveGraphIterator(fn):
            values.extend(node.outputs)
    for value in values:
        shape = value.shape
        if shape is None:
            continue
        dims, changed = [], False
        for d in shape:
            if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str):
                new = rename(d.value)
                changed |= new != d.value
                dims.append(new)
            else:
                dims.append(d)
        if changed:
            value.shape = ir.Shape(dims)


def _axis_mapping(model, names: list[str], specs) -> dict[str, str]:
    """Exporter symbol names (s11, s70, ...) -> contract axis names, read off the graph inputs."""
    import onnx_ir as ir

    inputs = {v.name: v for v in model.graph.inputs}
    mapping: dict[str, str] = {}

    def take(value, axis: int, name: str) -> None:
        d = value.shape[axis]
        if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str) and d.value not in mapping:
            mapping[d.value] = name

    take(inputs["input_ids"], 0, BATCH)
    take(inputs["input_ids"], 1, SEQ)
    for s in specs:
        for axis, d in enumerate(s.shape):
            if isinstance(d, str):
                take(inputs[s.name], axis, d)
    return mapping


def graph_op_counts(model) -> dict[str, int]:
    """op_type -> count over the graph and every subgraph (an ``onnx.ModelProto`` or ``onnx_ir.Model``)."""
    import onnx_ir as ir

    if not isinstance(model, ir.Model):
        model = ir.serde.deserialize_model(model)
    counts = Counter(node.op_type for node in ir.traversal.RecursiveGraphIterator(model.graph))
    for fn in model.functions.values():
        counts.update(node.op_type for node in ir.traversal.RecursiveGraphIterator(fn))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _initializer_bytes(model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def _fail_hook(stage: str, fail_at: Optional[str]) -> None:
    target = fail_at or os.environ.get(_FAIL_ENV)
    if target and target == stage:
        raise RuntimeError(f"injected failure at stage {stage!r} ({_FAIL_ENV} / _fail_at)")


def _progress(enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=len(STAGES), desc="kimi-export onnx", unit="step", disable=not enabled,
                bar_format="{desc}: {n}/{total} [{elapsed}] {postfix}")


# ------------------------------------------------------------------------------------------------ export


def export_onnx(model=None, out_dir: Union[str, os.PathLike] = "kimi_export_out/onnx", *,
                dtype: Union[str, torch.dtype, None] = None, opset: Optional[int] = None,
                fallback: Optional[bool] = None,
                external_data: Union[bool, str] = "auto", mla_cache: str = "split", optimize: bool = True,
                check: bool = True, progress: bool = True, _fail_at: Optional[str] = None) -> OnnxExportResult:
    """Export a Kimi model to one ONNX graph serving prefill and decode.

    Args:
        model: a :class:`~kimi_compile.KimiForCausalLM`, a checkpoint directory (loaded with
            :func:`kimi_compile.load_model`), or None for the built-in tiny Kimi Linear model.
        out_dir: destination folder (replaced when the export succeeds; untouched when it fails).
        dtype: "float32" / "float16" / "bfloat16" (or the torch dtype); default the model's dtype.
        opset: 27 (LinearAttention / CausalConvWithState) or 18..21 (the fallback graph); default 18 with the
            fallback lowering, 27 without.
        fallback: the opset <= 21 lowering (KDA as a chunked Loop, the conv as Conv). Default: ``opset < 27``;
            with neither given, True (:data:`DEFAULT_LOWERING_NOTE` says why).
        external_data: "auto" (external when weights exceed 1 GiB), True / "always", False / "never".
        mla_cache: "split" (default: each MLA cache as ``.key`` + ``.value`` halves, the layout
            onnxruntime-genai runs; same bytes as absorbed) or "absorbed" (one ``.key``, the model's own state
            layout, for runtimes that take any state names). See :mod:`kimi_compile.export.mla_cache`.
        optimize: run the exporter's graph optimiser (constant folding, dead code).
        check: run ``onnx.checker.check_model(full_check=True)`` on the written file.
        progress: show a progress bar (stderr).

    Returns:
        :class:`OnnxExportResult` with the paths, I/O names, op counts and per-stage seconds.
    """
    lowering_note = DEFAULT_LOWERING_NOTE if opset is None and fallback is None else "as asked"
    if opset is None:
        opset = 27 if fallback is False else 18
        if fallback is None:
            fallback = True
    if isinstance(opset, bool) or not isinstance(opset, int) or not (18 <= opset <= 21 or opset == 27):
        raise ValueError(f"opset must be 27 or 18..21 (the fallback graph), got {opset!r}")
    if fallback is None:
        fallback = opset < 27
    elif not fallback and opset < 27:
        raise ValueError(f"opset={opset} needs the fallback lowering (LinearAttention is opset 27); "
                         "drop fallback=False")
    if fallback and opset == 27:
        opset = 18
    if external_data not in (True, False, "auto", "always", "never"):
        raise ValueError(f"external_data must be 'auto', 'always', 'never' or a bool, got {external_data!r}")
    check_layout(mla_cache)
    dtype = parse_dtype(dtype, choices=EXPORT_DTYPES)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir {out_dir} exists and is not a directory")
    seconds: dict[str, float] = {}
    bar = _progress(progress)
    stage = STAGES[0]

    def enter(name: str) -> None:
        nonlocal stage
        if stage != name:
            bar.update(1)
        stage = name
        bar.set_postfix_str(name)
        _fail_hook(name, _fail_at)

    try:
        with staging_dir(out_dir) as tmp:
            t0 = time.perf_counter()
            enter("prepare")
            model = resolve_model(model, dtype)
            model.eval()
            dtype = model.dtype
            config = model.config
            specs = graph_state_specs(config, dtype, mla_cache)
            names = [s.name for s in specs]
            use_positions = bool(config.use_rope)
            in_names = ["input_ids"] + (["position_ids"] if use_positions else []) + names
            out_names = ["logits"] + [present_name(n) for n in names]
            with open(tmp / CONFIG_FILE, "w", encoding="utf-8") as f:
                json.dump(config.to_dict(), f, indent=2, default=str)
            seconds["prepare"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            enter("capture")
            wrapper = _GraphModule(model, specs, use_positions, mla_cache).eval()
            with _quiet(), torch.no_grad(), absorbed_attention(model):
                exported = torch.export.export(wrapper, _sample_inputs(model, specs, 2, 3, 4),
                                               dynamic_shapes=_dynamic_shapes(specs, use_positions))
            seconds["capture"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            enter("translate")
            with _quiet():
                program = torch.onnx.export(exported, dynamo=True,
                                            custom_translation_table=custom_translation_table(fallback),
                                            input_names=in_names, output_names=out_names, opset_version=18,
                                            optimize=optimize, verbose=False, report=False)
            del exported
            seconds["translate"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            enter("finish graph")
            onnx_model = program.model
            _rename_axes(onnx_model, _axis_mapping(onnx_model, names, specs))
            if dtype == torch.bfloat16:
                widen_bfloat16_einsum(onnx_model)
            if fallback:
                raise_default_opset(onnx_model, opset)
            else:
                raise_default_opset(onnx_model, 27)
            onnx_model.producer_name = "kimi-compile"
            onnx_model.metadata_props.update({
                "kimi_compile.lowering": "fallback" if fallback else "opset27",
                "kimi_compile.model_type": str(config.model_type),
                "kimi_compile.dtype": str(dtype).replace("torch.", ""),
            })
            seconds["finish graph"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            enter("save")
            import onnx_ir as ir

            weight_bytes = _initializer_bytes(onnx_model)
            external = (external_data in (True, "always")
                        or (external_data == "auto" and weight_bytes > EXTERNAL_DATA_THRESHOLD))
            model_path = tmp / MODEL_FILE
            if external:
                from tqdm.auto import tqdm

                with tqdm(desc="writing model.onnx.data", unit="tensor", disable=not progress, leave=False) as wbar:
                    def on_tensor(tensor, info) -> None:
                        if wbar.total is None:
                            wbar.total = info.total
                        wbar.update(1)

                    ir.save(onnx_model, model_path, external_data=DATA_FILE, callback=on_tensor)
            else:
                ir.save(onnx_model, model_path)
            op_counts = graph_op_counts(onnx_model)
            del program, onnx_model
            seconds["save"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            enter("check")
            if check:
                import onnx

                onnx.checker.check_model(str(model_path), full_check=True)
            seconds["check"] = time.perf_counter() - t0

            t0 = time.perf_counter()
            enter("describe")
            genai = genai_unsupported_reason(config, mla_cache)
            if genai is None:
                write_genai_config(tmp, config, specs)
            write_io_description(tmp, config, specs, dtype=dtype, opset=27 if not fallback else opset,
                                 fallback=fallback, external_data=external, mla_cache=mla_cache, genai=genai)
            seconds["describe"] = time.perf_counter() - t0

            enter("finalize")  # leaving the block renames the folder into place
        bar.update(1)
        bar.set_postfix_str("done")
    except Exception as e:
        raise ExportError(f"ONNX export failed at stage {stage!r}: {type(e).__name__}: {e}") from e
    finally:
        bar.close()

    return OnnxExportResult(out_dir=out_dir, model_path=out_dir / MODEL_FILE, opset=27 if not fallback else opset,
                            fallback=fallback, dtype=dtype, input_names=in_names, output_names=out_names,
                            op_counts=op_counts, external_data=external, seconds=seconds, mla_cache=mla_cache,
                            genai_unsupported=genai, lowering_note=lowering_note)
