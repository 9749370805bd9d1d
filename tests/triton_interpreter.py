"""Running a test module's kernel cases under Triton's interpreter, in a subprocess (TRITON_INTERPRET=1 must be set
before triton is imported), from a test process that has imported triton already."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def interpreter_results(module: str, main: str) -> dict:
    """Call ``tests/<module>.py:<main>()`` under the interpreter; it prints one ``RESULT <json>`` line, returned
    parsed."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = "import sys; sys.path.insert(0, %r); import %s as t; t.%s()" % (HERE, module, main)
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and line, f"interpreter run failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(line[0][len("RESULT "):])
