"""Errors a user can fix. Each message says what is wrong, where (file, key, sample) and how to fix it.

The CLI prints these without a traceback and exits with status 2.
"""


class LongcatError(Exception):
    """Base class for problems caused by inputs or settings rather than by a bug."""


class ConfigError(LongcatError):
    """A bad key or value in config.json or multidatabackend.json."""


class DataError(LongcatError):
    """A dataset problem: missing pairs, unreadable media, nothing usable left."""


class CheckpointError(LongcatError):
    """A model or training checkpoint folder that is missing files, keys or has wrong shapes."""


class GPUMemoryError(LongcatError):
    """The GPU ran out of memory under the run's memory settings (other processes, or a plan too tight)."""


class ShapeError(LongcatError):
    """A size, frame count or token grid that the model or an attention backend cannot take."""


class NonFiniteOutputError(LongcatError):
    """Sampling produced NaN or infinite latents: the weights (a LoRA, its multiplier, a diverged checkpoint)
    overflow, so the video would be black or noise."""
