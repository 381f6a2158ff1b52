"""``NAME[:key=value,...]`` specs (``--hook``, ``bns-pipe compress --method``): the named
class of a registry, built with the options as string keyword arguments."""

from __future__ import annotations

from typing import TypeVar

from bns_pipe.errors import ConfigError

T = TypeVar("T")


def build_from_spec(spec: str, registry: dict[str, type[T]], what: str) -> T:
    """``registry[NAME](**options)``; a :class:`ConfigError` naming ``what`` (e.g. "hook")
    for an unknown name, a malformed option or one the class refuses."""
    name, _, options = spec.partition(":")
    if name not in registry:
        raise ConfigError(f"unknown {what} {name!r}; choose from {', '.join(sorted(registry))}")
    try:
        kwargs = dict(item.split("=", 1) for item in options.split(",") if item)
    except ValueError:
        raise ConfigError(
            f"{what} {spec!r}: options are key=value pairs, comma-separated"
        ) from None
    try:
        return registry[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad options for {what} {name!r}: {exc}") from exc
