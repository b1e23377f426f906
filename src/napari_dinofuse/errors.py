"""Errors a user can act on. Drivers (CLI, widgets) show their message as one line, no traceback.

Kept free of torch so that every driver can catch them cheaply.
"""


class DinofuseError(Exception):
    """Base class: the message says what went wrong and what to do."""


class BackboneError(DinofuseError, RuntimeError):
    """A backbone could not be loaded."""


class GeometryError(DinofuseError, ValueError):
    """Input that cannot be placed in space (dimensions, voxel sizes, coverage)."""


class InputError(DinofuseError, ValueError):
    """Data or settings that cannot be used as given (NaNs, unknown options)."""


class VolumeReadError(DinofuseError):
    """A file that cannot be opened as a volume."""


class CacheError(DinofuseError):
    """A cache folder that cannot be used."""


class CheckpointError(DinofuseError):
    """A model folder cannot be read or written as asked."""


class MemoryRetryWarning(UserWarning):
    """The device ran out of memory and the work was retried in smaller pieces (slower, same result)."""
