"""TensorRT lowering of the kimi ops: plugin nodes in ONNX, ahead-of-time PTX, plugin registration code.

Everything is generated from the descriptions in ``lowering/plugin_spec.py`` (one per op).  One file per job:

============================  ===========================================================================
``graph.py``                  opset-27 nodes <-> plugin nodes (:func:`to_plugin_graph`, :func:`to_standard_graph`)
``nodes.py``                  what a plugin graph needs (:func:`plugin_nodes`, :func:`kernel_variants`)
``kernels.py``                which Triton kernel a plugin runs and its launch (:func:`kernel_binding`, ...)
``kda_plugin.py``             the KDA token-loop kernel behind the plugin ABI, its launch config
``ptx.py``                    Triton -> PTX per kernel variant and arch (:func:`compile_ptx`)
``ptxas.py``                  Triton's ptxas and PTX version for an arch, as Triton picks them
``codegen.py``                the ``tensorrt.plugin`` registration module (``templates/plugin_runtime.py``)
``converters.py``             torch-tensorrt converters (registered only where ``torch_tensorrt`` imports)
============================  ===========================================================================

This package re-exports the public names of those files.
"""

from .codegen import launch_config_source, registration_module_source
from .converters import register_torch_tensorrt_converters
from .graph import PLUGIN_OPSET_VERSION, STANDARD_OPSET, set_aot, to_plugin_graph, to_standard_graph
from .kernels import kernel_binding, kernel_constexprs, launch_params
from .nodes import KernelVariant, PluginNode, kernel_variants, plugin_nodes, variant_for
from .ptx import PTX_ARCHS, PtxArtifact, compile_ptx, kernel_signature
from .ptxas import default_ptx_version, ptxas_check, ptxas_path, ptxas_tool

__all__ = [
    "PLUGIN_OPSET_VERSION",
    "STANDARD_OPSET",
    "PTX_ARCHS",
    "PluginNode",
    "KernelVariant",
    "PtxArtifact",
    "to_plugin_graph",
    "to_standard_graph",
    "set_aot",
    "plugin_nodes",
    "kernel_variants",
    "variant_for",
    "kernel_binding",
    "kernel_constexprs",
    "launch_params",
    "compile_ptx",
    "kernel_signature",
    "ptxas_tool",
    "ptxas_path",
    "ptxas_check",
    "default_ptx_version",
    "registration_module_source",
    "launch_config_source",
    "register_torch_tensorrt_converters",
]
