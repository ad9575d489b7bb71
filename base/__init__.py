"""The ground floor: the artifact contract (manifest, schema, graph names, feeds) and the
cross-cutting pieces (errors, progress, termination, lazy imports) that every layer above reads.

It imports nothing of llamatrt's above it, so the layers read bottom-up:
base -> models -> exporter | runtime -> tools -> the CLI and the server.
"""

__version__ = "0.1.0"
