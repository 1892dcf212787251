"""The wheel installs everything under the dzc namespace (nothing generic at top level) and imports on its own."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_layout_and_import(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("dzc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"dzc", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for module in ("dzc/ir/node.py", "dzc/passes/pipeline.py", "dzc/codegen/llvm.py", "dzc/codegen/kernels/linear.py",
                   "dzc/codegen/metal_shim.h", "dzc/runtime/generate.py", "dzc/checkpoint/loader.py"):
        assert module in names, module
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # run from an empty folder so the source tree cannot be imported instead of the wheel's copy
    code = ("import dzc.cli, dzc.codegen.compile, dzc.runtime.server, dzc.passes.pipeline, dzc.ir.interpreter; "
            "print(dzc.ir.interpreter.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site))
