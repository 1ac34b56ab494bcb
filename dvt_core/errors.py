"""Errors a user can cause, under one root (:class:`DVTError`). Each names the problem; the CLI prints its
message as one line, exit 2."""
from __future__ import annotations

from typing import Optional


class DVTError(ValueError):
    """The root of every error a user can cause: the CLI maps it, and only it, to one line and status 2.

    (A ValueError too, so code that caught ValueError before keeps working.)
    """


class SpecError(DVTError):
    """A spec, or an override of one, that cannot describe a working model."""


class DataError(DVTError):
    """A data file or folder that is missing, unreadable or not what it claims to be."""


class InputError(DVTError):
    """An image batch that does not fit the model (rank, channels, size) or bad call arguments."""


class ConfigError(DVTError):
    """A configuration value out of its range (a training run's, say); ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class CheckpointError(DVTError):
    """A file that is not a usable checkpoint for the requested model."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(message)


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would run code when loaded: refused, never executed."""


def check_images_shape(shape, spec) -> None:
    """Raise InputError unless ``shape`` is (B, in_chans, img_size, img_size) for ``spec``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        raise InputError(f"{spec.name} expects an image batch shaped (B, C, H, W); got rank {len(shape)} "
                         f"shape {shape}")
    b, c, h, w = shape
    if c != spec.in_chans:
        raise InputError(f"{spec.name} expects {spec.in_chans} channel(s); the batch has {c} (shape {shape})")
    if (h, w) != (spec.img_size, spec.img_size):
        raise InputError(f"{spec.name} expects {spec.img_size}x{spec.img_size} images; got {h}x{w}")
    if b < 1:
        raise InputError(f"empty image batch (shape {shape})")


def list_problems(missing, unexpected, mismatched, limit: int = 12) -> str:
    """One readable line listing key problems of a state dict."""
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched)):
        items = list(items)
        if items:
            shown = ", ".join(str(i) for i in items[:limit])
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {shown}{more}")
    return "; ".join(parts)


class ManifestError(CheckpointError):
    """An export folder whose ``dvt.json`` or files cannot be trusted: malformed, inconsistent with its spec,
    naming a path outside the folder, or not matching its SHA-256."""


class ArgumentError(InputError):
    """A command-line argument or API argument of the wrong type or out of range, named."""


class OutputError(DVTError):
    """An output that could not be written (the disk full, a quota, a write the file system refused); nothing
    half-written is left."""


class ImageReadError(DataError, InputError):
    """An image file that is missing, unreadable, of a refused format or too large."""


class UnreadableImagesError(DataError):
    """Image files of a folder that cannot be read, every one of them named (found in one pass)."""

    def __init__(self, root: str, problems: list[str]):
        self.problems = list(problems)
        shown = "; ".join(self.problems[:20]) + (f"; ... {len(self.problems) - 20} more" if len(self.problems) > 20
                                                  else "")
        super().__init__(f"image folder {root}: {len(self.problems)} unreadable image file(s) (fix or remove "
                         f"them, or skip them): {shown}")


class CheckpointWarning(UserWarning):
    """A lossless change made while loading (a dtype widened to float32), listed rather than hidden."""


class TrainingDiverged(DVTError):
    """The training loss became NaN or infinite; the run stopped and wrote no weights for it."""


class RequestError(DVTError):
    """A request the service refuses: an HTTP status and a message that names the problem."""

    def __init__(self, status: int, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.headers = status, dict(headers or {})


class ServerStartError(DVTError):
    """The server did not print its URL in time (its stderr tail is in the message)."""


class QueueFullError(DVTError):
    """The service holds ``queue_limit`` images already: the request is refused at once (HTTP 503)."""


class SchedulerClosedError(DVTError):
    """The scheduler is shutting down and takes no new image."""
