"""What spans exporter/ and runtime/: an export checked by the runtime before it lands.

The exporter knows nothing of generation and the runtime nothing of exporting (DESIGN.md §6); an
export is only done when the runtime has run its graphs, so the two meet here, above both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamatrt.artifact.manifest import Manifest
from llamatrt.progress import Progress, no_progress


def export_artifact(model: str | Path | Any, out: Path, options: Any = None, force: bool = False,
                    progress: Progress = no_progress) -> Manifest:  # fmt: skip
    """Export `model` (smollm2, an HF folder, a .gguf, a transformers model) to `out`, validated by
    the runtime (ExportOptions.validate) before it replaces anything."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.exporter.export import export_artifact as write_artifact
    from llamatrt.runtime.export_check import validate_artifact

    return write_artifact(model, out, options or ExportOptions(), force, progress, validate_artifact)
