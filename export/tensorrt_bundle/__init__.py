"""Files copied into every TensorRT bundle: ``build_engine.py`` and ``run_engine.py`` (standalone programs:
the standard library at import time, tensorrt / torch only where they run) and the bundle's ``README.md``
(``bundle_readme.md``, filled in with :func:`bundle_readme`)."""

from __future__ import annotations

import string
from pathlib import Path

__all__ = ["SCRIPTS", "script_path", "bundle_readme"]

_HERE = Path(__file__).parent
SCRIPTS = ("build_engine.py", "run_engine.py")


def script_path(name: str) -> Path:
    if name not in SCRIPTS:
        raise ValueError(f"name must be one of {SCRIPTS}, got {name!r}")
    return _HERE / name


def bundle_readme(bundle: dict) -> str:
    """The bundle's README.md from its ``bundle.json`` description."""
    plugins = "\n".join(f"- `{pid}` ({p['op']}, stands for ONNX `{p['standard_op']}`): {p['nodes']} nodes, "
                        f"{'ahead-of-time PTX' if p['aot'] else 'JIT impl (torch)'}"
                        for pid, p in bundle["plugins"].items()) or "- none (the model has no KDA layer)"
    v = bundle["verification"]
    verified = (f"prefill max|diff| {v['prefill_max_abs_diff']:.2e}, decode {v['decode_max_abs_diff']:.2e}"
                if v.get("status") == "passed" else v.get("status", "no"))
    template = string.Template((_HERE / "bundle_readme.md").read_text())
    return template.substitute(model_type=bundle["model_type"], dtype=bundle["dtype"], plugins=plugins,
                               verified=verified, what=v.get("what", ""))
