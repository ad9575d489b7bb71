"""Every module imports on a CPU-only machine with TensorRT absent, and the floors read bottom-up:
base -> models -> exporter | runtime -> tools -> the CLI and the server. Each floor imports with every
floor above it (and, for models, ONNX) blocked, so a reach upward fails here."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

ROOF = (
    "llamatrt.server",
    "llamatrt.cli",
    "llamatrt.cli_chat",
    "llamatrt.cli_export",
    "llamatrt.cli_generate",
    "llamatrt.cli_options",
    "llamatrt.cli_serve",
    "llamatrt.cli_tools",
)
TOOLS = ("llamatrt.tools", *ROOF)


def all_modules() -> list[str]:
    import llamatrt.base
    import llamatrt.base.artifact
    import llamatrt.exporter
    import llamatrt.models
    import llamatrt.runtime
    import llamatrt.server
    import llamatrt.tools

    names = ["llamatrt"]
    packages = (
        llamatrt,
        llamatrt.base,
        llamatrt.base.artifact,
        llamatrt.models,
        llamatrt.exporter,
        llamatrt.runtime,
        llamatrt.tools,
        llamatrt.server,
    )
    for pkg in packages:
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
    assert (
        "llamatrt.runtime.trt_backend" in modules and "llamatrt.cli" in modules and "llamatrt.tools.compare" in modules
    )
    result = _import_with_blocked(modules, ("tensorrt", "tensorrt_rtx", "pycuda", "cuda"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("package", "blocked"),
    [
        ("llamatrt.base", ("llamatrt.models", "llamatrt.exporter", "llamatrt.runtime", *TOOLS)),
        (
            "llamatrt.models",
            ("llamatrt.exporter", "llamatrt.runtime", *TOOLS, "llamatrt.base.artifact", "onnx", "onnxruntime"),
        ),
        ("llamatrt.exporter", ("llamatrt.runtime", *TOOLS)),
        ("llamatrt.runtime", ("llamatrt.exporter", *TOOLS)),
        ("llamatrt.tools", ROOF),
        ("llamatrt.server", ("llamatrt.exporter", "llamatrt.tools", "llamatrt.cli")),
    ],
)
def test_floors_import_without_the_floors_above_them(package: str, blocked: tuple[str, ...]) -> None:
    modules = [m for m in all_modules() if m == package or m.startswith(package + ".")]
    assert len(modules) > 3
    result = _import_with_blocked(modules, blocked)
    assert result.returncode == 0, f"{package} reaches {blocked}: {result.stderr.strip().splitlines()[-1:]}"


def test_a_blocked_floor_is_really_blocked() -> None:
    """The check above can fail: importing the exporter from a test with it blocked is refused."""
    result = _import_with_blocked(["llamatrt.exporter.export"], ("llamatrt.exporter",))
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr
