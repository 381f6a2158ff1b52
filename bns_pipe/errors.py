"""Exceptions with messages meant for the user: the CLI prints them without a traceback."""

import pickle


class BnsPipeError(Exception):
    """Base class of every error bns_pipe raises on bad input or bad state."""


class DatasetError(BnsPipeError):
    """A dataset is unknown, missing, corrupt or malformed."""


class PartitionError(BnsPipeError):
    """A partition directory is missing, corrupt, tampered with or does not fit the run."""


class ConfigError(BnsPipeError):
    """A command-line or config-file option is invalid."""


def unreadable(exc: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in one line: torch's own
    message goes on to suggest ``weights_only=False``, which bns_pipe never does."""
    if isinstance(exc, pickle.UnpicklingError):
        return (
            "torch.load(weights_only=True) refused it: not a torch file, or one holding more "
            "than tensors and plain values (bns_pipe never unpickles code)"
        )
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
