"""The errors a user can cause. Every message is written to be shown as is, in one line.

The CLI and the app catch `GLIPError` (and nothing broader), so a bug inside the library — an
internal invariant that fails — still surfaces as a traceback instead of posing as an input mistake.
Each class also derives from `ValueError` so that callers written against the standard hierarchy keep
working.
"""
from __future__ import annotations


class GLIPError(ValueError):
    """Base class of every user-facing error of this package."""


class ImageError(GLIPError):
    """An input image that cannot be used (missing, corrupt, too large, wrong type)."""


class PromptError(GLIPError):
    """A prompt that cannot be grounded (empty, no phrase, spans outside the caption...)."""


class CheckpointError(GLIPError):
    """A checkpoint or model config that cannot be loaded, with the reason and the offending keys."""


class DataError(GLIPError):
    """A dataset that cannot be read: unknown spec, missing file, malformed record (named by file and line)."""


class ConfigError(GLIPError):
    """An out-of-range or unknown setting (CLI flag, config key, training option)."""


class DataWarning(UserWarning):
    """Data that can be read but not all of it is used (e.g. annotations of images the file does not list);
    the CLI prints it as one line."""
