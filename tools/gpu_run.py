"""How tools/gpu_check.py runs a part, and what it prints first.

A GPU machine is lent for minutes and only files under $OUT come back, so a part's output goes
to the log file line by line as it is printed (and to this process's stdout), never held until
the part ends; and a part is one process group (start_new_session), killed as a group when its
time is up, so its pytest workers and compiler jobs cannot live on into the next part's timings.
Run directly (`python tools/gpu_run.py`), it prints environment() as JSON: the check asks in a
child so that its own process never holds a CUDA context.

    run(cmd, log, timeout_s, cwd, env, title) -> Ran   one part's command; Ran(rc, seconds,
                                                      timed_out, tail, offset): rc 124 when its
                                                      time ran out, tail its last lines, offset
                                                      where its output starts in the log
    section(log, ran) -> str              that output, read back from the log
    kill_group(pgid, grace_s)             SIGTERM to the group, SIGKILL to what is left after grace_s
    members(pgid) -> list[int]            live (not zombie) processes of a group, from /proc
    environment() -> dict                 python, torch, CUDA, triton, setuptools, GPU, tool paths,
                                          warnings (setuptools < 77, no ninja/nvcc/make, Triton != CI's)
    environment_lines(info) -> list[str]  the lines printed first
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

TAIL_LINES = 400
TOOLS = ("nvcc", "ninja", "g++", "make")
SETUPTOOLS_PEP639 = (77, 0)  # pyproject's `license = "Apache-2.0"` (a PEP 639 string) needs it
CI_TRITON = "3.9"


@dataclass
class Ran:
    rc: int
    seconds: float
    timed_out: bool
    tail: list[str] = field(default_factory=list)
    offset: int = 0


def members(pgid: int) -> list[int]:
    """Processes of group pgid that are alive (a zombie has ended and is only waiting to be reaped)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pgid: int) -> bool:
    if Path("/proc/self/stat").exists():
        return bool(members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(pgid: int, grace_s: float = 3.0, reap=None) -> None:
    """End every process of the group: SIGTERM, then SIGKILL to what is still there after
    grace_s. reap: called while waiting (the caller's Popen.poll, so its child leaves no zombie)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if reap:
            reap()
        if not _alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _pump(stream, log, tail: deque, echo: bool) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        tail.append(line.rstrip("\n"))
    stream.close()


def run(cmd: list[str], log: Path, timeout_s: float, cwd, env: dict, title: str, echo: bool = True) -> Ran:
    """cmd in a process group of its own, stdout and stderr appended to log as they come; at
    timeout_s the group is killed. Whatever the command left running is killed when it ends."""
    start = time.monotonic()
    tail: deque = deque(maxlen=TAIL_LINES)
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"==== {title}: {' '.join(map(str, cmd))}  (limit {timeout_s:.0f} s)\n")
        f.flush()
        offset = f.tell()
        if echo:
            print(f"==== {title} (limit {timeout_s:.0f} s)", flush=True)
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        reader = threading.Thread(target=_pump, args=(proc.stdout, f, tail, echo), daemon=True)
        reader.start()
        try:
            rc, timed_out = proc.wait(timeout=max(timeout_s, 0.1)), False
        except subprocess.TimeoutExpired:
            rc, timed_out = 124, True
        kill_group(proc.pid, reap=proc.poll)
        proc.wait()
        reader.join(timeout=5)  # a process that left the group may hold the pipe: do not wait on it
        seconds = time.monotonic() - start
        end = f"==== {title}: {'TIMED OUT, killed' if timed_out else f'rc {rc}'} after {seconds:.1f} s"
        f.write(end + "\n")
    if echo:
        print(end, flush=True)
    return Ran(rc, seconds, timed_out, list(tail), offset)


def section(log: Path, ran: Ran) -> str:
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(ran.offset)
        return f.read()


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def _tuple(version: str | None) -> tuple[int, ...]:
    parts = []
    for p in (version or "0").split(".")[:2]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _torch_facts() -> dict:
    try:
        import torch
    except ImportError as exc:
        return dict(torch=None, torch_error=str(exc))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return dict(torch=torch.__version__, cuda=torch.version.cuda, gpu=gpu)


def _nvcc_version(path: str | None) -> str | None:
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((ln.strip() for ln in out.splitlines() if "release" in ln), None)


def environment() -> dict:
    info = dict(python=sys.version.split()[0], **_torch_facts(), triton=_version("triton"),
                setuptools=_version("setuptools"), tools={t: shutil.which(t) for t in TOOLS})
    info["nvcc_version"] = _nvcc_version(info["tools"]["nvcc"])
    warn = []
    if _tuple(info["setuptools"]) < SETUPTOOLS_PEP639:
        warn.append(f"setuptools {info['setuptools']} < 77: pyproject.toml's license = \"Apache-2.0\" (PEP 639) fails "
                    "its validation, so setup.py build_ext cannot run; the build uses torch.utils.cpp_extension.load")
    if not info["tools"]["ninja"]:
        warn.append("no ninja: cpp_extension.load cannot build, and setup.py compiles one source at a time")
    if not info["tools"]["nvcc"]:
        warn.append("no nvcc on PATH: kvplug._C cannot be built (the cuda rows and tests are dropped)")
    if not info["tools"]["make"]:
        warn.append("no make: run `python3 tools/gpu_check.py` (what `make gpu-check` runs)")
    if info["triton"] and _tuple(info["triton"]) != _tuple(CI_TRITON):
        warn.append(f"triton {info['triton']} here, CI interprets with {CI_TRITON}: a kernel that fails only here "
                    "may be a Triton version difference")
    info["warnings"] = warn
    return info


def environment_lines(info: dict) -> list[str]:
    tools = "  ".join(f"{t}={info['tools'].get(t) or 'MISSING'}" for t in TOOLS)
    lines = [f"python {info.get('python')}  torch {info.get('torch')}  CUDA {info.get('cuda')}  "
             f"triton {info.get('triton')}  setuptools {info.get('setuptools')}",
             f"GPU {info.get('gpu') or 'none'}  nvcc {info.get('nvcc_version') or '-'}",
             f"which: {tools}"]
    return lines + [f"WARNING: {w}" for w in info.get("warnings", [])]


if __name__ == "__main__":
    print(json.dumps(environment()))
