"""`kvplug bench ARGS...`: run benchmarks/offload.py of the source checkout with ARGS.

    offload_script() -> Path    benchmarks/offload.py next to this package; CliError if absent
    run(args) -> int            its exit status

Kept thin on purpose: the benchmark owns its options (`kvplug bench --help` shows them).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kvplug
from kvplug.cli.common import CliError


def offload_script() -> Path:
    script = Path(kvplug.__file__).resolve().parents[1] / "benchmarks" / "offload.py"
    if not script.is_file():
        raise CliError("benchmarks ship with the source tree, not the installed package: clone "
                       "kvplug, `pip install -e .` it, and run `kvplug bench` (or "
                       "`python benchmarks/offload.py`) there")
    return script


def run(args: list[str]) -> int:
    return subprocess.call([sys.executable, str(offload_script()), *args])
