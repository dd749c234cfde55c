"""A real redis-server for tests: on a free loopback port, in a temp dir, with nothing persisted.

redis_available() -> bool      whether a redis-server binary is on PATH (tests skip without one)
free_port() -> int             a TCP port on 127.0.0.1 that nothing listens on right now

RedisServer(workdir, port=None, cluster=False) methods:
    start()       spawn redis-server and wait until it answers PING (and, as a cluster, serves all slots)
    stop()        SIGTERM, wait for the exit (SIGKILL if it lingers)
    kill()        SIGKILL, as a crash would (the port is free again once this returns)
    pause()       SIGSTOP: the server accepts connections but never answers (a hung server)
    resume()      SIGCONT after pause()
    restart()     start again on the same port (after stop or kill)
    url           redis://127.0.0.1:<port>/0 (redis+cluster://... for a cluster)
    client()      a plain redis.Redis to read or tamper with the server's keys directly
Also a context manager: stops (or kills) the server on leaving the block.
"""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import redis

BINARY = "redis-server"
START_TIMEOUT_S = 15.0
HOST = "127.0.0.1"  # loopback only, never any other address


def redis_available() -> bool:
    return shutil.which(BINARY) is not None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server process that a test owns; see the module docstring."""

    def __init__(self, workdir, port: int | None = None, cluster: bool = False):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        scheme = "redis+cluster" if self.cluster else "redis"
        return f"{scheme}://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, socket_connect_timeout=5)

    def _argv(self) -> list[str]:
        argv = [BINARY, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"),
                "--daemonize", "no"]
        if self.cluster:
            # An explicit bus port: the default (port + 10000) may be taken or above 65535.
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                     "--cluster-port", str(self.bus_port)]
        return argv

    def start(self) -> "RedisServer":
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        # Output goes to a file, not a pipe nobody reads (a full pipe would block the server).
        with open(self.workdir / "redis.out", "ab") as out:
            self.proc = subprocess.Popen(self._argv(), stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        self._wait(deadline, self._pings)
        if self.cluster:
            self._assign_all_slots(deadline)
        return self

    restart = start

    def _wait(self, deadline: float, ready) -> None:
        while not ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} not ready after "
                                   f"{START_TIMEOUT_S} s: {self._log_tail()}")
            time.sleep(0.02)

    def _pings(self) -> bool:
        try:
            with redis.Redis(host=HOST, port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def _assign_all_slots(self, deadline: float) -> None:
        """A one-node cluster serving all 16384 slots (kept in nodes.conf across restarts)."""
        with self.client() as c:
            info = c.execute_command("CLUSTER", "INFO")
            info = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_slots_assigned:16384" not in info:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)

            def state_ok() -> bool:
                raw = c.execute_command("CLUSTER", "INFO")
                return "cluster_state:ok" in (raw.decode() if isinstance(raw, bytes) else str(raw))
            self._wait(deadline, state_ok)

    def _log_tail(self) -> str:
        try:
            return "".join((self.workdir / name).read_text(errors="replace")[-1000:]
                           for name in ("redis.out", "redis.log") if (self.workdir / name).exists())
        except OSError:
            return "(no log)"

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()  # a paused server cannot act on SIGTERM
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
