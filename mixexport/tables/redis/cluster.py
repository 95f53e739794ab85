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
import select
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


class NodeError(Exception):
    """A socket operation on ``node`` failed (``cause``: the :class:`OSError`, or
    :class:`socket.timeout` past the deadline)."""

    def __init__(self, node: Node, cause: OSError) -> None:
        super().__init__(f"{node}: {cause}")
        self.node, self.cause = node, cause


class Node:
    """One connection to one node; not thread-safe (the store serialises requests).

    The socket is non-blocking, set once at connect: a request's sends and reads then cost one
    system call each, with no ``settimeout`` (an ``ioctl``) and no ``poll`` before every call,
    and waiting happens in one ``poll`` over all the nodes of a round trip (:func:`_wait`).
    Replies are received into one preallocated buffer (``recv_into``; ``recv(n)`` would allocate
    an ``n``-byte object per call) and parsed by hiredis (C)."""

    BUFFER = 1 << 18  # one receive: a 1×256 fetch's replies are ~13 kB per node

    def __init__(self, addr: Addr) -> None:
        self.addr = addr
        self.sock: socket.socket | None = None
        self.reader: Any = None
        self.fd = -1
        self.buf = bytearray(self.BUFFER)

    def __str__(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def _connect(self, deadline: float) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(self.addr, timeout=max(deadline - time.monotonic(), 1e-4))
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except OSError:
                sock.close()
                raise
            self.sock, self.reader, self.fd = sock, _hiredis().Reader(), sock.fileno()
        return self.sock

    def send(self, data: bytes, deadline: float) -> None:
        """Write all of ``data``, waiting for room in the socket's buffer until ``deadline``
        (:class:`NodeError` on failure)."""
        try:
            sock = self._connect(deadline)
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            while sent < len(data):  # a big write (publish): wait for room, send the rest
                _wait({self.fd: self}, select.POLLOUT, deadline)
                try:
                    sent += sock.send(memoryview(data)[sent:])
                except BlockingIOError:
                    continue
        except OSError as e:
            raise NodeError(self, e) from None

    def pull(self, count: int, out: list[Any]) -> bool:
        """Receive what the socket holds (one ``recv_into``) and append the complete replies to
        ``out``; True once ``out`` holds ``count``. Raises when the node closed the connection."""
        sock, buf = self.sock, self.buf
        assert sock is not None
        try:
            n = sock.recv_into(buf)
        except BlockingIOError:  # a spurious wake-up: nothing to read yet
            return False
        if not n:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed by the node")
        reader = self.reader
        reader.feed(buf, 0, n)
        while len(out) < count:
            reply = reader.gets()
            if reply is False:
                return False
            out.append(ReplyError(str(reply)) if isinstance(reply, Exception) else reply)
        return True

    def read(self, count: int, deadline: float) -> list[Any]:
        """The next ``count`` replies of this node, by ``deadline`` (:class:`NodeError` on failure)."""
        return read_all({self.fd: (self, count)}, deadline)[self.fd]

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock, self.reader, self.fd = None, None, -1


def read_all(pending: dict[int, tuple[Node, int]], deadline: float) -> dict[int, list[Any]]:
    """``{fd: (node, count)}`` → ``{fd: that node's next count replies}``: one ``poll`` over the
    nodes still owing replies, reading whichever is ready, until all have answered. Raises
    :class:`NodeError` naming the node that failed, or one still owing replies at ``deadline``."""
    out: dict[int, list[Any]] = {fd: [] for fd in pending}
    waiting: dict[int, Node] = {}
    for fd, (node, count) in pending.items():  # replies the reader holds already
        got = out[fd]
        while len(got) < count and (reply := node.reader.gets()) is not False:
            got.append(ReplyError(str(reply)) if isinstance(reply, Exception) else reply)
        if len(got) < count:
            waiting[fd] = node
    while waiting:
        try:
            ready = _wait(waiting, select.POLLIN, deadline)
        except socket.timeout as e:
            raise NodeError(next(iter(waiting.values())), e) from None
        for fd in ready:
            node, count = pending[fd]
            try:
                if node.pull(count, out[fd]):
                    del waiting[fd]
            except OSError as e:
                raise NodeError(node, e) from None
    return out


def _wait(nodes: dict[int, Node], events: int, deadline: float) -> list[int]:
    """The fds of ``nodes`` ready for ``events`` (or in error: the next call on them reports it),
    waiting at most until ``deadline`` (then :class:`socket.timeout`)."""
    poller = select.poll()
    for fd in nodes:
        poller.register(fd, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("deadline")
        ready = poller.poll(left * 1e3)
        if ready:
            return [fd for fd, _ in ready]


class Cluster:
    """The cluster as its slot map says: ``owner[slot]`` → index into :attr:`nodes` (masters)."""

    def __init__(self, seeds: Sequence[Addr], timeout: float = 2.0) -> None:
        self.seeds = tuple(seeds)
        self.pool: dict[Addr, Node] = {}
        self.nodes: list[Node] = []
        self.owner = np.full(SLOTS, -1, dtype=np.int64)
        self.generation = 0  # +1 per slot map read: what callers key their routing caches on
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
            except NodeError as e:
                node.close()
                tried.append(f"{node}: {_why(e.cause)}")
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
        self.generation += 1

    def roundtrip(self, batches: dict[int, list[bytes]], deadline: float) -> dict[int, list[Any]]:
        """Send every node its commands (``{node index: [packed command, …]}``), then read every
        reply: :meth:`exchange`, one command per list item."""
        return self.exchange({i: (cmds, len(cmds)) for i, cmds in batches.items()}, deadline)

    def exchange(self, payloads: dict[int, tuple[list[Any], int]], deadline: float) -> dict[int, list[Any]]:
        """``{node index: (buffers, number of commands in them)}``: every node gets its buffers
        (joined: one ``send``) before any reply is read, then every node's replies are read as
        they come (:func:`read_all`): one round trip per node, the nodes in parallel. Error
        replies come back as :class:`ReplyError` values. A node that fails or runs past
        ``deadline`` raises :class:`StoreUnavailableError` / :class:`StoreTimeoutError` naming it
        (every connection of the round trip is closed: their streams' positions are unknown)."""
        nodes = self.nodes
        try:
            pending = {}
            for i, (parts, count) in payloads.items():
                node = nodes[i]
                node.send(parts[0] if len(parts) == 1 else b"".join(parts), deadline)
                pending[node.fd] = (node, count)
            replies = read_all(pending, deadline)
            return {i: replies[nodes[i].fd] for i in payloads}
        except NodeError as e:
            for i in payloads:
                nodes[i].close()
            if isinstance(e.cause, socket.timeout) or time.monotonic() >= deadline:
                raise StoreTimeoutError(f"Redis node {e.node} did not answer within the deadline",
                                        "the node may be hung or failing over; retry, or raise deadline_ms") from None
            raise StoreUnavailableError(f"Redis node {e.node} is unreachable ({_why(e.cause)})",
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
