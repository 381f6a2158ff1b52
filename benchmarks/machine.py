"""The machine a benchmark ran on, for its results file.

``describe()`` at the start of a run (CPU, cores, RAM, OS, library versions, git commit, date,
load average); ``finish(description)`` at the end adds the end time and load average. The
load average matters: the benchmark machines are shared, so times are upper bounds.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARIES = ("numpy", "torch", "torch_geometric", "pymetis")


def describe(libraries: tuple[str, ...] = LIBRARIES) -> dict:
    """A JSON-ready description of this machine, the code and its libraries, taken now."""
    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
        "ram_available_gib_at_start": round(_meminfo_kib("MemAvailable") / 2**20, 1),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{name: _version(name) for name in libraries},
        **_git(),
        "started": _now(),
        "load_average_at_start": load_average(),
    }


def finish(description: dict) -> dict:
    """``description`` with the end time and the load average at the end added."""
    return {**description, "finished": _now(), "load_average_at_end": load_average()}


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def summary(description: dict) -> str:
    """One Markdown-ready sentence naming the machine, versions, commit and load."""
    d = description
    versions = ", ".join(f"{name} {d[name]}" for name in LIBRARIES if name in d)
    commit = d.get("git_commit", "unknown")[:10] + (" (dirty tree)" if d.get("git_dirty") else "")
    end = d.get("load_average_at_end", ["?"])[0]
    return (
        f"{d['cpu_model']} ({d['cpu_cores']} cores, {d['ram_gib']} GiB RAM), {d['os']}, "
        f"Python {d['python']}, {versions}; commit {commit}; {d['started']}. "
        f"1-minute load average {d['load_average_at_start'][0]} at start, {end} at end "
        "(a shared machine: times are upper bounds)."
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release()["PRETTY_NAME"]
    except OSError:
        return platform.platform()


def _version(name: str) -> str | None:
    """The installed version of ``name``, read from its metadata without importing it."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git() -> dict:
    """HEAD's commit, and which tracked or new files under the package differ from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--", "bns_pipe", "csrc", "setup.py").splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "git_dirty": None}
    return {
        "git_commit": commit,
        "git_dirty": bool(changed),
        "git_changed_code": [line[3:] for line in changed],
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
