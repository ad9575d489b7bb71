"""Every module imports on a CPU-only machine with TensorRT absent, and the layering of DESIGN.md §6
holds: runtime/ imports with exporter/ blocked, exporter/ with runtime/ blocked, models/ with both
(and ONNX) blocked, the neutral artifact module with both blocked."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest


def all_modules() -> list[str]:
    import llamatrt.artifact
    import llamatrt.exporter
    import llamatrt.models
    import llamatrt.runtime

    names = ["llamatrt"]
    for pkg in (llamatrt, llamatrt.artifact, llamatrt.models, llamatrt.exporter, llamatrt.runtime):
        names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted(set(names))


def _import_with_blocked(modules: list[str], blocked: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        f"for blocked in {blocked!r}: sys.modules[blocked] = None\n"
        f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_every_module_imports_without_tensorrt() -> None:
    modules = all_modules()
    assert "llamatrt.runtime.trt_backend" in modules and "llamatrt.cli" in modules
    result = _import_with_blocked(modules, ("tensorrt", "tensorrt_rtx", "pycuda", "cuda"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("package", "blocked"),
    [
        ("llamatrt.runtime", ("llamatrt.exporter",)),
        ("llamatrt.exporter", ("llamatrt.runtime",)),
        ("llamatrt.artifact", ("llamatrt.exporter", "llamatrt.runtime")),
        ("llamatrt.models", ("llamatrt.exporter", "llamatrt.runtime", "llamatrt.artifact", "onnx", "onnxruntime")),
    ],
)
def test_layers_import_without_the_layers_they_must_not_touch(package: str, blocked: tuple[str, ...]) -> None:
    modules = [m for m in all_modules() if m == package or m.startswith(package + ".")]
    assert len(modules) > 3
    result = _import_with_blocked(modules, blocked)
    assert result.returncode == 0, f"{package} reaches {blocked}: {result.stderr.strip().splitlines()[-1:]}"


def test_a_blocked_layer_is_really_blocked() -> None:
    """The check above can fail: importing the exporter from a test with it blocked is refused."""
    result = _import_with_blocked(["llamatrt.exporter.export"], ("llamatrt.exporter",))
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr
