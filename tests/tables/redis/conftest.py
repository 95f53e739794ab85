"""A real 3-master Redis Cluster per test module (loopback, free ports, no persistence), a tiny
externalized bundle for the session. Without redis-server the tests skip, unless
``MIXEXPORT_REQUIRE_REDIS=1`` (CI), where they fail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from mixexport.pipeline import BuildOptions, build
from tests.tables.redis.cluster import RedisCluster, available

TABLES = ("embed_item_table", "embed_seq_table", "embed_user_table")


def _need_redis() -> None:
    reason = available()
    if reason is None:
        try:
            import hiredis  # noqa: F401
        except ImportError:
            reason = "the hiredis package is not installed (pip install '.[redis]')"
    if reason:
        if os.environ.get("MIXEXPORT_REQUIRE_REDIS") == "1":
            pytest.fail(f"MIXEXPORT_REQUIRE_REDIS=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """3 masters, no replicas."""
    _need_redis()
    c = RedisCluster(tmp_path_factory.mktemp("redis")).start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def ext_bundles(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny rankmixer bundles with three tables out: fp32 rows (2 partitions) and int8 rows
    (3 partitions) — two different tables_versions of the same model."""
    _need_redis()
    out = []
    for dtype, parts in (("float32", 2), ("int8", 3)):
        path = tmp_path_factory.mktemp("redis-bundles") / f"rm-{dtype}"
        build(tiny_ckpt, BuildOptions(out=path, passes=("externalize-embeddings",), bench=False, metrics=False,
                                      pass_options=("externalize-embeddings.tables=" + ",".join(TABLES),
                                                    f"externalize-embeddings.partitions={parts}",
                                                    f"externalize-embeddings.dtype={dtype}")))
        out.append(path)
    return out[0], out[1]
