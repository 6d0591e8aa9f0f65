"""What produced a result: package versions, the git commit, the command line, the time and the
hardware of the driver. Every field degrades to None rather than failing a finished run.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

#: Distributions whose versions decide the numbers (entk_ray first).
PACKAGES = ("entk_ray", "torch", "torchvision", "ray", "timm", "numpy", "scipy", "scikit-learn")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(folder: str | os.PathLike | None = None) -> dict[str, object] | None:
    """``{"commit": sha, "dirty": bool}`` of the checkout holding ``folder`` (default: this package's
    source), or None outside a git checkout (an installed wheel, a Ray job's working dir)."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if folder.resolve().parent != top and folder.resolve() != top:
            return None  # e.g. a virtualenv inside some other repository
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware() -> dict[str, object]:
    """The driver's CPU (model, logical cores, cores this process may use) and CUDA GPUs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    gpus = []
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    except Exception:  # a broken CUDA install must not fail a finished run
        pass
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable, "gpus": gpus,
            "platform": platform.platform(), "python": platform.python_version()}


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, shell-quoted: ``python scripts/run_demo.py --p 1000`` (credentials
    in ``--set storage_options…`` hidden: :func:`entk_ray.redaction.redact_argv`)."""
    from entk_ray.redaction import redact_argv

    argv = redact_argv(list(sys.argv if argv is None else argv))
    return shlex.join(["python", *argv]) if argv and argv[0].endswith(".py") else shlex.join(argv)


def run_context(argv: list[str] | None = None) -> dict[str, object]:
    """Everything above, with a UTC timestamp (ISO 8601)."""
    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "git": git_state(),
        "versions": package_versions(),
        "hardware": hardware(),
    }
