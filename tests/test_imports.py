"""Every module imports on a CPU-only machine with TensorRT absent (blocked in sys.modules)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys


def all_modules() -> list[str]:
    import llamatrt.exporter
    import llamatrt.models
    import llamatrt.runtime

    names = ["llamatrt"]
    for pkg in (llamatrt, llamatrt.models, llamatrt.exporter, llamatrt.runtime):
        names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted(set(names))


def test_every_module_imports_without_tensorrt() -> None:
    modules = all_modules()
    assert "llamatrt.runtime.trt_backend" in modules and "llamatrt.cli" in modules
    code = (
        "import sys\n"
        "for blocked in ('tensorrt', 'tensorrt_rtx', 'pycuda', 'cuda'): sys.modules[blocked] = None\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
