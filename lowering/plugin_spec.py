"""One description per kimi op of its TensorRT plugin: the single source for the ONNX plugin nodes and
for the generated ``tensorrt.plugin`` registration code (``lowering/tensorrt/``).

A :class:`PluginSpec` says, for one op:

* its plugin id ``namespace::name`` (the ONNX node gets ``op_type = name``, ``domain = namespace`` and
  the string attribute ``plugin_namespace = namespace``, which is how TensorRT's ONNX parser finds the
  plugin; ``aot = 1`` asks the parser for the ahead-of-time implementation),
* its inputs and outputs in order, each with a shape rule and a dtype rule,
* its attributes (name, Python type: int / float / str, allowed values),
* the standard ONNX op it stands for (opset 27 ``LinearAttention`` / ``CausalConvWithState``), so the
  same graph can be swapped back and run in ONNX Runtime,
* the Triton kernel that implements it ahead of time, if any (:class:`KernelBinding`).

Shape rules are tuples of dimension references:  ``"q.0"`` is dim 0 of input ``q``, ``"@num_heads"`` is
attribute ``num_heads``, an ``int`` is that constant.  Dtype rules: ``"T"`` is the plugin's compute dtype
(one of :data:`COMPUTE_DTYPES`, the same for every ``"T"`` tensor of one node), any other entry is a fixed
dtype name (``"float32"``).

Plugin tensors use the layouts of the opset-27 ops they replace, flattened per token:

``kimi::kda``        q, k, g [B, T, HV*K]; v [B, T, HV*V]; beta [B, T, HV]; state [B, HV, K, V] float32
                     -> o [B, T, HV*V], final_state [B, HV, K, V] float32.  q and k are already repeated
                     to the HV value heads (grouped value heads are expanded before the node).
``kimi::short_conv`` x [B, T, C]; weight [C, W]; bias [C]; state [B, C, W-1] -> y [B, T, C],
                     final_state [B, C, W-1].

Every input is required (a plugin has a fixed argument list): a missing bias or state becomes zeros
when the ONNX node is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

__all__ = [
    "COMPUTE_DTYPES",
    "TRITON_DTYPE",
    "AUTOTUNE_DTYPE",
    "PARSER_ATTRIBUTES",
    "TensorSpec",
    "AttrSpec",
    "KernelBinding",
    "PluginSpec",
    "KDA",
    "SHORT_CONV",
    "PLUGINS",
    "spec_for_node",
    "spec_for_op",
    "resolve_dim",
    "output_shapes",
    "output_dtypes",
]

#: dtypes a plugin's ``"T"`` tensors may take (ONNX / TensorRT spelling: float, float16, bfloat16)
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")

#: the compute dtypes as Triton signatures spell them (fp32, ...) and as tensorrt.plugin's autotune does (FP32, ...)
TRITON_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
AUTOTUNE_DTYPE = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16"}

#: attributes that only the ONNX parser reads (not plugin fields)
PARSER_ATTRIBUTES = ("plugin_namespace", "aot")

DimRef = Union[str, int]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[DimRef, ...]  # for inputs: the names of the dims ("B", "T", ...) for docs and checks
    dtype: str  # "T" or a fixed dtype name
    doc: str = ""

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: type  # int, float or str (types tensorrt.plugin.register accepts as attributes)
    doc: str = ""
    choices: Optional[tuple] = None

    def check(self, value: Any) -> Any:
        if self.type is float:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"plugin attribute {self.name} must be a float, got {value!r}")
            value = float(value)
        elif self.type is int:
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"plugin attribute {self.name} must be an int, got {value!r}")
        elif self.type is str:
            if isinstance(value, bytes):
                value = value.decode()
            if not isinstance(value, str):
                raise TypeError(f"plugin attribute {self.name} must be a str, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"plugin attribute {self.name} must be one of {self.choices}, got {value!r}")
        return value


@dataclass(frozen=True)
class KernelBinding:
    """How the plugin runs a Triton kernel ahead of time.

    The kernel's runtime parameters must be ``(input pointers in plugin order, int32 scalars,
    output pointers in plugin order)`` - the order TensorRT passes them.

    * ``module`` / ``kernel``: where the ``@triton.jit`` function lives,
    * ``launch_config``: name of a function in ``module`` returning ``dict(grid, num_warps, shared_mem, ...)``;
      it is called with ``launch_args`` (dim refs) and must only use ``+ - //`` on non-constant dims,
    * ``scalars``: ``(kernel parameter name, dim ref)`` for each int32 scalar, in kernel order,
    * ``constexprs``: name of a function in ``module`` called with the keyword arguments
      ``constexpr_args`` (``{kwarg: attr ref or literal}``) plus ``dtype`` (the Triton dtype name) that
      returns the kernel's compile-time constants.
    """

    module: str
    kernel: str
    launch_config: str
    launch_args: tuple[DimRef, ...]
    scalars: tuple[tuple[str, DimRef], ...]
    constexprs: str
    constexpr_args: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class PluginSpec:
    op: str  # the torch op, "kimi::kda"
    namespace: str
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # shapes are dim refs into inputs / attributes
    attributes: tuple[AttrSpec, ...]
    standard_op: str  # the opset-27 op the plugin stands for
    doc: str = ""
    kernel: Optional[KernelBinding] = None
    dtypes: tuple[str, ...] = COMPUTE_DTYPES

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def attr(self, name: str) -> AttrSpec:
        for a in self.attributes:
            if a.name == name:
                return a
        raise KeyError(f"{self.plugin_id} has no attribute {name!r}")

    def check_attributes(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validate a full attribute dict (every attribute present, right type and value)."""
        missing = [a.name for a in self.attributes if a.name not in values]
        extra = [k for k in values if k not in self.attribute_names]
        if missing or extra:
            raise ValueError(f"{self.plugin_id} attributes: missing {missing}, unexpected {extra}")
        return {a.name: a.check(values[a.name]) for a in self.attributes}

    def io_dtypes(self, compute: str) -> tuple[list[str], list[str]]:
        """Concrete dtypes of (inputs, outputs) when the compute dtype is ``compute``."""
        if compute not in self.dtypes:
            raise ValueError(f"{self.plugin_id}: compute dtype must be one of {self.dtypes}, got {compute!r}")
        pick = lambda t: compute if t.dtype == "T" else t.dtype  # noqa: E731
        return [pick(t) for t in self.inputs], [pick(t) for t in self.outputs]


# ------------------------------------------------------------------------------------------------------
# the two plugins
# ------------------------------------------------------------------------------------------------------

KDA = PluginSpec(
    op="kimi::kda",
    namespace="kimi",
    name="kda",
    inputs=(
        TensorSpec("q", ("B", "T", "HV*K"), "T", "queries, L2-normalised, repeated to HV heads"),
        TensorSpec("k", ("B", "T", "HV*K"), "T", "keys, L2-normalised, repeated to HV heads"),
        TensorSpec("v", ("B", "T", "HV*V"), "T", "values"),
        TensorSpec("g", ("B", "T", "HV*K"), "T", "log-space per-key-channel decay (<= 0)"),
        TensorSpec("beta", ("B", "T", "HV"), "T", "delta-rule step size"),
        TensorSpec("state", ("B", "HV", "K", "V"), "float32", "recurrent state before the first token"),
    ),
    outputs=(
        TensorSpec("o", ("q.0", "q.1", "v.2"), "T", "outputs"),
        TensorSpec("final_state", ("q.0", "@num_heads", "@key_dim", "@value_dim"), "float32", "state after the last token"),
    ),
    attributes=(
        AttrSpec("num_heads", int, "value heads HV (q/k already repeated to HV heads)"),
        AttrSpec("key_dim", int, "key head dim K"),
        AttrSpec("value_dim", int, "value head dim V"),
        AttrSpec("scale", float, "query scale (K ** -0.5 by default)"),
    ),
    standard_op="LinearAttention",
    doc="Kimi Delta Attention: S <- diag(exp g_t) S; S <- S + beta_t k_t (v_t - k_t^T S)^T; o_t = scale q_t^T S.",
    kernel=None,  # bound in lowering/tensorrt/kda_plugin.py (an adapter around ops/kda/recurrent.py's kernel)
)

SHORT_CONV = PluginSpec(
    op="kimi::short_conv",
    namespace="kimi",
    name="short_conv",
    inputs=(
        TensorSpec("x", ("B", "T", "C"), "T", "input"),
        TensorSpec("weight", ("C", "W"), "T", "depthwise kernel"),
        TensorSpec("bias", ("C",), "T", "bias (zeros when the op has none)"),
        TensorSpec("state", ("B", "C", "W-1"), "T", "the W-1 inputs before x[:, 0] (zeros on a first call)"),
    ),
    outputs=(
        TensorSpec("y", ("x.0", "x.1", "x.2"), "T", "act(bias + causal depthwise conv)"),
        TensorSpec("final_state", ("x.0", "x.2", "state.2"), "T", "the last W-1 entries of [state | x]"),
    ),
    attributes=(
        AttrSpec("channels", int, "C"),
        AttrSpec("kernel_size", int, "W"),
        AttrSpec("activation", str, "'silu' or 'none'", choices=("silu", "none")),
    ),
    standard_op="CausalConvWithState",
    doc="Depthwise causal convolution with carried state (kimi::short_conv).",
    kernel=KernelBinding(
        module="kimi_compile.ops.short_conv.kernel",
        kernel="short_conv_kernel",
        launch_config="short_conv_launch_config",
        launch_args=("x.0", "x.1", "@channels", "@kernel_size"),
        scalars=(("T", "x.1"), ("C", "@channels")),
        constexprs="short_conv_plugin_constexprs",
        constexpr_args=(("C", "@channels"), ("W", "@kernel_size"), ("activation", "@activation")),
    ),
)

PLUGINS: tuple[PluginSpec, ...] = (KDA, SHORT_CONV)


def spec_for_node(domain: str, op_type: str) -> Optional[PluginSpec]:
    """The spec whose plugin node has this ``domain`` / ``op_type``, or None."""
    for spec in PLUGINS:
        if spec.namespace == domain and spec.name == op_type:
            return spec
    return None


def spec_for_op(op: str) -> PluginSpec:
    for spec in PLUGINS:
        if spec.op == op:
            return spec
    raise KeyError(f"no TensorRT plugin description for {op!r}")


def resolve_dim(ref: DimRef, spec: PluginSpec, input_shapes: Sequence[Sequence[Any]], attrs: dict[str, Any]):
    """Evaluate one dim ref against concrete (or symbolic) input shapes and attribute values."""
    if isinstance(ref, int):
        return ref
    if ref.startswith("@"):
        return attrs[ref[1:]]
    name, _, axis = ref.partition(".")
    return input_shapes[spec.input_names.index(name)][int(axis)]


def output_shapes(spec: PluginSpec, input_shapes: Sequence[Sequence[Any]], attrs: dict[str, Any]) -> list[tuple]:
    """Output shapes from the spec's shape rules (works on ints and on symbolic dims)."""
    return [tuple(resolve_dim(r, spec, input_shapes, attrs) for r in out.shape) for out in spec.outputs]


def output_dtypes(spec: PluginSpec, input_dtypes: Sequence[str]) -> list[str]:
    """Output dtypes from the dtype rules, given the input dtypes (checks the inputs agree)."""
    compute = None
    for t, dt in zip(spec.inputs, input_dtypes):
        if t.dtype == "T":
            if compute is None:
                compute = dt
            elif dt != compute:
                raise TypeError(f"{spec.plugin_id}: input {t.name} is {dt} but the compute dtype is {compute}")
        elif dt != t.dtype:
            raise TypeError(f"{spec.plugin_id}: input {t.name} must be {t.dtype}, got {dt}")
    if compute not in spec.dtypes:
        raise TypeError(f"{spec.plugin_id}: compute dtype must be one of {spec.dtypes}, got {compute}")
    return spec.io_dtypes(compute)[1]
