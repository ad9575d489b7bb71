"""One exception root so the CLI can print a one-line message instead of a traceback.

Every message names the problem and the fix: "<what is wrong>; <what to do>".
"""

from __future__ import annotations


class LlamatrtError(Exception):
    """Base of every error llamatrt raises on purpose."""


class ConfigError(LlamatrtError):
    """A model config we cannot (or will not) turn into a static Llama."""


class CheckpointError(LlamatrtError):
    """A checkpoint that is missing, unreadable, or does not match its config."""


class ArtifactExistsError(LlamatrtError):
    """An output exists and --force was not given."""


class ManifestMismatchError(LlamatrtError):
    """An artifact whose manifest or files this llamatrt cannot use."""


class BackendUnavailable(LlamatrtError):
    """A backend whose libraries or device are missing on this machine."""


class InputError(LlamatrtError):
    """A bad argument: prompt, sampling parameter, shape."""


class ConstraintError(LlamatrtError):
    """A constrained answer that does not satisfy its schema: never handed out (a bug if it happens)."""


class NumericalError(LlamatrtError):
    """A graph produced NaN or infinite logits: a broken artifact, never a token."""


class ValidationError(LlamatrtError):
    """An export or engine whose outputs differ from PyTorch beyond tolerance."""
