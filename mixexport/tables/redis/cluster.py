"""A small Redis Cluster client: the slot map, and one pipelined round trip per node, all nodes in
parallel, under one deadline.

Why not redis-py's ``RedisCluster``: its pipeline sends to the nodes one after another, and a call
to a killed master blocks for seconds (2.9–4.6 s measured) before raising. Here every node's
commands are written first and the replies read afterwards, so the nodes work at the same time;
every socket operation gets the time left to the request's deadline; replies are parsed by hiredis
(C). A connection whose round trip failed is closed (its stream position is unknown).

Routing is by hash slot (``CRC16(tag) % 16384``, :func:`mixexport.tables.redis.keys.key_slot`) over
the map from ``CLUSTER SLOTS``. The caller decides what a MOVED/ASK reply or a dead node means: the
store refreshes the map and retries once within the deadline, or raises.
"""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, Sequence

import numpy as np

from mixexport.errors import EnvironmentUnavailableError, StoreTimeoutError, StoreUnavailableError

SLOTS = 16384
Addr = tuple[str, int]


def _hiredis() -> Any:
    try:
        import hiredis
    except ImportError:
        raise EnvironmentUnavailableError("the redis table store needs the hiredis package, which is not installed",
                                          "pip install 'mixexport[redis]'") from None
    return hiredis


def pack(*args: bytes | str | int) -> bytes:
    """One command in RESP (for the few small commands; bulk lookups are packed by numpy)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class ReplyError(Exception):
    """An error reply (``-ERR …``, ``-MOVED …``, ``-OOM …``) as a value the caller inspects."""


class Node:
    """One connection to one node; not thread-safe (the store serialises requests)."""

    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.sock: socket.socket | None = None
        self.reader: Any = None

    def __str__(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def _connect(self, timeout: float) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(self.addr, timeout=max(timeout, 1e-4))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock, self.reader = sock, _hiredis().Reader()
        return self.sock

    def send(self, data: bytes, deadline: float) -> None:
        sock = self._connect(deadline - time.monotonic())
        sock.settimeout(max(deadline - time.monotonic(), 1e-4))
        sock.sendall(data)

    def read(self, count: int, deadline: float) -> list[Any]:
        out = []
        sock, reader = self.sock, self.reader
        assert sock is not None
        while len(out) < count:
            reply = reader.gets()
            if reply is False:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("deadline")
                sock.settimeout(left)
                data = sock.recv(1 << 20)
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "connection closed by the node")
                reader.feed(data)
                continue
            out.append(ReplyError(str(reply)) if isinstance(reply, Exception) else reply)
        return out

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock, self.reader = None, None


class Cluster:
    """The cluster as its slot map says: ``owner[slot]`` → index into :attr:`nodes` (masters)."""

    def __init__(self, seeds: Sequence[Addr], timeout: float = 2.0) -> None:
        self.seeds = tuple(seeds)
        self.pool: dict[Addr, Node] = {}
        self.nodes: list[Node] = []
        self.owner = np.full(SLOTS, -1, dtype=np.int64)
        self.refresh(time.monotonic() + timeout)

    def node(self, addr: Addr) -> Node:
        if addr not in self.pool:
            self.pool[addr] = Node(addr)
        return self.pool[addr]

    def refresh(self, deadline: float) -> None:
        """Read the slot map from the first node that answers (known masters first, then seeds).
        Raises :class:`StoreUnavailableError` naming every node tried and why."""
        tried = []
        candidates = [n.addr for n in self.nodes] + [a for a in self.seeds if a not in {n.addr for n in self.nodes}]
        for addr in candidates:
            node = self.node(addr)
            try:
                node.send(pack("CLUSTER", "SLOTS"), deadline)
                (reply,) = node.read(1, deadline)
            except (OSError, socket.timeout) as e:
                node.close()
                tried.append(f"{node}: {_why(e)}")
                if time.monotonic() >= deadline:
                    break
                continue
            if isinstance(reply, ReplyError):
                tried.append(f"{node}: {reply}")
                continue
            self._load(reply, addr)
            return
        raise StoreUnavailableError("no Redis Cluster node answered CLUSTER SLOTS (" + "; ".join(tried or ["none tried"])
                                    + ")", "start the cluster, or check the host:port list of the store URL")

    def _load(self, slots: list[Any], asked: Addr) -> None:
        owner = np.full(SLOTS, -1, dtype=np.int64)
        nodes: list[Node] = []
        index: dict[Addr, int] = {}
        for start, end, master, *_replicas in slots:
            host = master[0].decode() if master[0] else asked[0]  # "" means the host we asked
            addr = (host, int(master[1]))
            if addr not in index:
                index[addr] = len(nodes)
                nodes.append(self.node(addr))
            owner[int(start):int(end) + 1] = index[addr]
        self.nodes, self.owner = nodes, owner

    def roundtrip(self, batches: dict[int, list[bytes]], deadline: float) -> dict[int, list[Any]]:
        """Send every node its commands (``{node index: [packed command, …]}``), then read every
        reply: one round trip per node, the nodes in parallel. Error replies come back as
        :class:`ReplyError` values. A node that fails or runs past ``deadline`` raises
        :class:`StoreUnavailableError` / :class:`StoreTimeoutError` naming it (its connection is
        closed: the stream's position is unknown)."""
        current = None
        try:
            for i, cmds in batches.items():
                current = self.nodes[i]
                current.send(b"".join(cmds), deadline)
            out = {}
            for i, cmds in batches.items():
                current = self.nodes[i]
                out[i] = current.read(len(cmds), deadline)
            return out
        except (OSError, socket.timeout) as e:
            for i in batches:
                self.nodes[i].close()
            if isinstance(e, socket.timeout) or time.monotonic() >= deadline:
                raise StoreTimeoutError(f"Redis node {current} did not answer within the deadline",
                                        "the node may be hung or failing over; retry, or raise deadline_ms") from None
            raise StoreUnavailableError(f"Redis node {current} is unreachable ({_why(e)})",
                                        "the node is down or failing over; retry after the cluster recovers") from None

    def masters(self) -> list[tuple[Node, np.ndarray]]:
        """Every master and the slots it owns (ascending)."""
        return [(n, np.flatnonzero(self.owner == i)) for i, n in enumerate(self.nodes)]

    def close(self) -> None:
        for node in self.pool.values():
            node.close()


def _why(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    return e.strerror or type(e).__name__ if isinstance(e, OSError) else str(e)
