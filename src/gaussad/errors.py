"""The errors a user can cause, under one base class the CLI catches.

Each message names the file, folder or value at fault and says what to do, on one line.
"""

from __future__ import annotations


class GaussadError(Exception):
    """Base of every error caused by input (data, model folders, weights, output paths, servers)."""


class DatasetError(GaussadError, ValueError):
    """A dataset folder or image file that cannot be used."""


class ModelFileError(GaussadError, ValueError):
    """A model folder that cannot be loaded, or whose config and tensors do not belong together."""


class OutputError(GaussadError, ValueError):
    """An output path gaussad refuses to write to, because it holds files gaussad did not write."""


class DeviceError(GaussadError, ValueError):
    """A device that does not exist here (e.g. cuda on a machine without a GPU)."""


class WeightsError(GaussadError, RuntimeError):
    """A weight source that cannot be loaded; the message says what to do instead."""


class CheckpointError(GaussadError, RuntimeError):
    """A checkpoint folder that does not belong to this training run (or cannot be read)."""


class TrackingError(GaussadError, ConnectionError):
    """The tracking server cannot be used; the message says where the results are and how to log them."""


class NotFittedError(GaussadError, RuntimeError):
    """A detector used (score, save) before it was fitted or loaded."""


class RuntimeUnavailableError(GaussadError, RuntimeError):
    """A feature runtime (ONNX Runtime) that cannot run this backbone here; the message names the way out."""


def first_line(error: BaseException) -> str:
    """The first line of `error`'s message (torch's and the hub's run over many lines; the first
    says what went wrong), or its type's name when the message is empty."""
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__
