"""Exceptions with messages meant for the user: the CLI prints them without a traceback."""


class BnsPipeError(Exception):
    """Base class of every error bns_pipe raises on bad input or bad state."""


class DatasetError(BnsPipeError):
    """A dataset is unknown, missing, corrupt or malformed."""


class PartitionError(BnsPipeError):
    """A partition directory is missing, corrupt, tampered with or does not fit the run."""


class ConfigError(BnsPipeError):
    """A command-line or config-file option is invalid."""
