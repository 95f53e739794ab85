"""The ray engine (Ray Data actors, local Ray with 2 CPUs): the same report bytes as the local engine,
the same scores, and an actor that dies is one line, with no report written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from mixexport.errors import EnvironmentUnavailableError
from mixexport.scale.ray import pieces, sizes
from mixexport.scale.run import dumps, score_dataset, verify_dataset

pytestmark = pytest.mark.xdist_group("ray")


def test_actor_sizes_always_leave_a_cpu_for_the_driver() -> None:
    for cpus in (1.0, 2.0, 3.0, 16.0):
        for workers in (1, 2, 3, 8, 64):
            actor = sizes(cpus, workers)
            assert actor * workers <= cpus - 1.0 + 1e-9 and actor <= 1.0


def test_pieces_are_runs_of_whole_row_groups_in_file_order(eval_rows: dict[str, Path]) -> None:
    files = sorted(str(p) for p in eval_rows["three"].glob("*.parquet"))
    for batch in (1, 64, 10**6):
        got = pieces(files, batch)
        assert [p["path"] for p in got] == sorted((p["path"] for p in got), key=files.index)
        for path in files:
            groups = [g for p in got if p["path"] == path for g in p["row_groups"]]
            assert groups == list(range(pq.ParquetFile(path).metadata.num_row_groups))
        if batch == 10**6:
            assert len(got) == len(files)


def test_ray_report_is_the_local_report(ray_local, split_bundle: Path, eval_rows: dict[str, Path],
                                        local_report: str) -> None:
    remote, facts = verify_dataset(split_bundle, str(eval_rows["three"]), engine="ray", workers=2, batch_rows=200)
    assert facts["engine"] == "ray" and facts["actor_cpus"] == 0.5
    assert dumps(remote) == local_report


def test_ray_scores_are_the_local_scores(ray_local, split_bundle: Path, eval_rows: dict[str, Path],
                                         tmp_path: Path) -> None:
    score_dataset(split_bundle, str(eval_rows["three"]), tmp_path / "local")
    score_dataset(split_bundle, str(eval_rows["three"]), tmp_path / "ray", engine="ray", workers=2, batch_rows=111)
    for p in sorted((tmp_path / "local").glob("*.parquet")):
        assert pq.read_table(tmp_path / "ray" / p.name).equals(pq.read_table(p))


def _actors() -> dict[int, psutil.Process]:
    """The scoring actors of this test session's Ray (its raylet is our child), by PID."""
    found = {}
    for p in psutil.Process().children(recursive=True):
        try:
            if "_ScaleActor" in " ".join(p.cmdline()):
                found[p.pid] = p
        except psutil.Error:
            continue
    return found


def _kill_first_actor(stop: threading.Event, killed: list[int], before: set[int]) -> None:
    """Kill (by PID) the first scoring actor started after ``before`` was taken (earlier tests' idle
    actors may still be there)."""
    while not stop.is_set():
        for pid, proc in _actors().items():
            if pid not in before:
                proc.kill()
                killed.append(proc.pid)
                return
        time.sleep(0.05)


def test_a_dead_actor_is_one_line_and_no_report(ray_local, split_bundle: Path, eval_rows: dict[str, Path]) -> None:
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_first_actor, args=(stop, killed, set(_actors())))
    killer.start()
    try:
        with pytest.raises(EnvironmentUnavailableError, match="a Ray actor died") as err:
            verify_dataset(split_bundle, str(eval_rows["three"]), engine="ray", workers=1, batch_rows=20)
    finally:
        stop.set()
        killer.join()
    assert killed and "\n" not in err.value.message


@pytest.fixture(scope="module")
def tables_bundle(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny rankmixer with its item table out (two partitions), and 600 rows for it in two files."""
    from mixexport.pipeline import BuildOptions, build
    from mixexport.scale.synth import write_eval_parquet

    root = tmp_path_factory.mktemp("ray-tables")
    build(tiny_ckpt, BuildOptions(out=root / "ext", passes=("externalize-embeddings",), bench=False, metrics=False,
                                  pass_options=("externalize-embeddings.tables=embed_item_table",
                                                "externalize-embeddings.partitions=2")))
    write_eval_parquet(root / "ext", root / "rows", rows=600, files=2, seed=5)
    return root


def test_ray_actors_open_the_table_store(ray_local, tables_bundle: Path, tiny_ckpt: Path, tmp_path: Path) -> None:
    """--tables reaches every actor: the ray engine's report and scores are the local engine's."""
    bundle, rows = tables_bundle / "ext", str(tables_bundle / "rows")
    local, _ = verify_dataset(bundle, rows, reference=str(tiny_ckpt), tables="local")
    remote, facts = verify_dataset(bundle, rows, reference=str(tiny_ckpt), tables="local", engine="ray", workers=2,
                                   batch_rows=128)
    assert facts["engine"] == "ray" and dumps(remote) == dumps(local)
    score_dataset(bundle, rows, tmp_path / "local", tables="local")
    score_dataset(bundle, rows, tmp_path / "ray", tables="local", engine="ray", workers=2, batch_rows=97)
    for p in sorted((tmp_path / "local").glob("*.parquet")):
        assert pq.read_table(tmp_path / "ray" / p.name).equals(pq.read_table(p))


def test_a_wrong_table_store_is_one_line_before_any_scoring(tables_bundle: Path, tmp_path: Path) -> None:
    from tests.cli_helpers import run_cli

    r = run_cli("score", str(tables_bundle / "ext"), "--data", str(tables_bundle / "rows"), "--out",
                str(tmp_path / "s"), "--engine", "ray", "--tables", "memcached://x")
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2 and errors == ["error: unknown table store 'memcached://x'"] and "Traceback" not in r.err
    assert "scoring" not in r.err
    assert not (tmp_path / "s").exists()
