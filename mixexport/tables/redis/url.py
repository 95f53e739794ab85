"""``redis://host:port[,host:port…][?name=MODEL&deadline_ms=50&cache_bytes=N]``: where the cluster
is and how the store behaves. Any one reachable node is enough to find the others (CLUSTER SLOTS);
listing more lets the client start while some node is down."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import parse_qsl

from mixexport.errors import BadInputError
from mixexport.tables.layout import NAME

DEFAULT_DEADLINE_MS = 50.0
DEFAULT_CACHE_BYTES = 64 * 1024**2  # per table
_HOSTPORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass(frozen=True)
class StoreUrl:
    """A parsed store URL."""

    nodes: tuple[tuple[str, int], ...]
    name: str | None = None            # the model the tables are published under (default: the bundle's)
    deadline_s: float = DEFAULT_DEADLINE_MS / 1000
    cache_bytes: int = DEFAULT_CACHE_BYTES

    def __str__(self) -> str:
        return "redis://" + ",".join(f"{h}:{p}" for h, p in self.nodes)


def _bad(url: str, why: str) -> BadInputError:
    return BadInputError(f"store URL {url!r}: {why}",
                         "expected redis://HOST:PORT[,HOST:PORT...][?name=MODEL&deadline_ms=50&cache_bytes=N]")


def parse_url(url: str) -> StoreUrl:
    """Parse a ``redis://`` URL, refusing anything else in one line."""
    if not isinstance(url, str) or not url.startswith("redis://"):
        raise _bad(str(url), "not a redis:// URL")
    body, _, query = url[len("redis://"):].partition("?")
    nodes = []
    for item in body.split(","):
        m = _HOSTPORT.match(item.strip())
        if not m or not 0 < int(m.group(2)) < 65536:
            raise _bad(url, f"{item!r} is not HOST:PORT")
        nodes.append((m.group(1).strip("[]"), int(m.group(2))))
    opts: dict[str, object] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        try:
            if key == "name":
                if not NAME.fullmatch(value):
                    raise ValueError("a name is a letter then letters, digits or _ (at most 64)")
                opts["name"] = value
            elif key == "deadline_ms":
                opts["deadline_s"] = float(value) / 1000
                if not 0 < float(value) <= 600_000:
                    raise ValueError("expected 0 < deadline_ms <= 600000")
            elif key == "cache_bytes":
                opts["cache_bytes"] = int(value)
                if int(value) < 0:
                    raise ValueError("expected cache_bytes >= 0")
            else:
                raise ValueError("unknown option (known: name, deadline_ms, cache_bytes)")
        except ValueError as e:
            raise _bad(url, f"option {key}={value!r}: {e}") from None
    return StoreUrl(tuple(nodes), **opts)  # type: ignore[arg-type]
