"""A real Redis Cluster on loopback for the tests (and the benchmark): Debian's redis-server, one
temp dir and config per node (no persistence), made with ``redis-cli --cluster create``, stopped
by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

SERVER, CLI = shutil.which("redis-server") or "/usr/bin/redis-server", shutil.which("redis-cli") or "/usr/bin/redis-cli"


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    for exe in (SERVER, CLI):
        if not os.access(exe, os.X_OK):
            return f"{exe} is not installed (apt-get install redis-server)"
    return None


def free_ports(n: int) -> list[int]:
    """``n`` free loopback ports whose cluster-bus ports (+10000) are free too."""
    out: list[int] = []
    while len(out) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536 and port not in out:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            out.append(port)
    return out


def cli(port: int, *args: str, timeout: float = 10) -> str:
    return subprocess.run([CLI, "-p", str(port), *args], capture_output=True, text=True, timeout=timeout,
                          check=False).stdout


@dataclass
class RedisCluster:
    """Masters (and replicas) on loopback; ``url`` is the store URL of the masters."""

    root: Path
    masters: int = 3
    replicas: int = 0
    node_timeout_ms: int = 500
    ports: list[int] = field(default_factory=list)
    procs: dict[int, subprocess.Popen] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return "redis://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:self.masters])

    def start(self) -> RedisCluster:
        self.ports = free_ports(self.masters * (1 + self.replicas))
        for port in self.ports:
            d = self.root / str(port)
            d.mkdir(parents=True)
            (d / "redis.conf").write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\nsave \"\"\nappendonly no\ncluster-enabled yes\n"
                f"cluster-config-file nodes.conf\ncluster-node-timeout {self.node_timeout_ms}\n"
                # the other masters keep serving while one is down: what a table store wants, and what
                # lets a test hold one node (SIGSTOP) without taking the whole cluster down
                "cluster-require-full-coverage no\nprotected-mode no\nlogfile redis.log\n")
            self.procs[port] = subprocess.Popen([SERVER, str(d / "redis.conf")], cwd=d, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL)
        for port in self.ports:
            self._wait(lambda p=port: cli(p, "PING").strip() == "PONG", f"node {port} to answer")
        args = [f"127.0.0.1:{p}" for p in self.ports]
        r = subprocess.run([CLI, "--cluster", "create", *args, "--cluster-replicas", str(self.replicas),
                            "--cluster-yes"], capture_output=True, text=True, timeout=60, check=False)
        if r.returncode:
            self.stop()
            raise RuntimeError(f"redis-cli --cluster create failed: {r.stdout[-400:]} {r.stderr[-400:]}")
        for port in self.ports:
            self._wait(lambda p=port: "cluster_state:ok" in cli(p, "CLUSTER", "INFO"), f"node {port} cluster_state:ok")
        if self.replicas:  # every replica attached and synced before a failover is tested
            self._wait(lambda: cli(self.ports[0], "CLUSTER", "NODES").count("slave") == self.masters * self.replicas
                       and all("master_link_status:up" in cli(p, "INFO", "replication")
                               for p in self.ports[self.masters:]), "replicas to sync")
        self.masters_ports = [p for p in self.ports if "role:master" in cli(p, "INFO", "replication")]
        return self

    def _wait(self, ok, what: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if ok():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"timed out waiting for {what}")

    def kill(self, port: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one node by its PID (SIGKILL: it is gone; SIGSTOP: it hangs)."""
        self.procs[port].send_signal(sig)
        if sig == signal.SIGKILL:
            self.procs[port].wait(10)

    def stop(self) -> None:
        for port, proc in self.procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)
        self.procs.clear()
