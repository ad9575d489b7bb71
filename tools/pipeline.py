"""What spans exporter/ and runtime/: an export checked by the runtime before it lands.

The exporter knows nothing of generation and the runtime nothing of exporting (DESIGN.md §6); an
export is only done when the runtime has run its graphs, so the two meet here, above both.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llamatrt.base.artifact.manifest import Manifest
from llamatrt.base.progress import Progress, no_progress

log = logging.getLogger(__name__)


def export_artifact(
    model: str | Path | Any, out: Path, options: Any = None, force: bool = False, progress: Progress = no_progress
) -> Manifest:
    """Export `model` (smollm2, an HF folder, a .gguf, a transformers model) to `out`, validated by
    the runtime (ExportOptions.validate) before it replaces anything."""
    from llamatrt.exporter.export import ExportOptions
    from llamatrt.exporter.export import export_artifact as write_artifact
    from llamatrt.tools.export_check import validate_artifact

    options = options or ExportOptions()
    manifest = write_artifact(model, out, options, force, progress, validate_artifact)
    if manifest.dtype == "float16" and manifest.weights_bytes <= FP16_SCAN_MAX_BYTES:
        _warn_fp16(out)
    elif manifest.dtype == "float16":
        log.info(
            "fp16 safety scan skipped: it runs the whole model twice (fp16 and an fp32 twin) with every tensor "
            "kept, which an artifact of %.1f GB of weights does not fit; `llamatrt diff --layerwise` on a GPU does it",
            manifest.weights_bytes / 1e9,
        )
    return manifest


# The scan holds the fp16 weights, an fp32 twin of them and every activation at once.
FP16_SCAN_MAX_BYTES = 2 << 30


def _warn_fp16(out: Path) -> None:
    """The fp16 safety scan (llamatrt.tools.layerwise): one warning line when a tensor comes near fp16's
    maximum or underflows in bulk, naming the first."""
    from llamatrt.tools.layerwise import fp16_scan

    findings = fp16_scan(out)
    if findings:
        first = findings[0]
        log.warning(
            "fp16 safety scan: %d tensors need fp32 (first: %s, %s in %s, %s); see `llamatrt diff %s --layerwise`",
            len(findings),
            first.tensor,
            first.op,
            first.layer,
            first.reason,
            out,
        )
