"""``examples/cpp`` mixexport_score_ort: the ONNX Runtime C++ serving core against the Python runtime.

For every serving form (plain, split, kv: LONGER and HyFormer, w8a16, int8, MoE-packed) one request
sequence (new users, repeated users: cache hits, grown histories: KV appends) is scored by one C++
process and by one Python ``Runtime``: same scores (max rel err <= 1e-6) and the same cache hits,
misses and appends. Bundle-trust and bad-request refusals give the Python runtime's one-line
message; a load run shares one Scorer across threads."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixexport.errors import MixexportError
from mixexport.runtime import Runtime
from mixexport.specs import Request, random_ids
from tests.cli_helpers import edit_manifest
from tests.cpp.manifest_fuzzing import assert_survives_manifest_fuzzing

from .conftest import CppBuild

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "cpp"))
from make_request import write_request_dir  # noqa: E402  (the example's own helper, not a package)

#: form -> (family, passes (None: the family's defaults), precision)
FORMS = {"plain": ("rankmixer", None, "fp32"), "split": ("ugsep", None, "fp32"),
         "kv-longer": ("longer", None, "fp32"), "kv-hyformer": ("hyformer", None, "fp32"),
         "w8a16": ("rankmixer", ("quantize-w8a16",), "fp32"), "int8": ("rankmixer", None, "int8"),
         "moe-packed": ("rankmixer-moe", None, "fp32")}


@pytest.fixture(scope="module")
def exe(cpp_build: CppBuild) -> Path:
    assert "building mixexport_score_ort" in cpp_build.log, cpp_build.log[-2000:]
    return cpp_build.dir / "mixexport_score_ort"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from mixexport.pipeline import BuildOptions, build

    from ..conftest import make_checkpoint

    root = tmp_path_factory.mktemp("ort-forms")
    out = {}
    for form, (family, passes, precision) in FORMS.items():
        ckpt = make_checkpoint(root / f"{form}.pt", family=family)
        build(ckpt, BuildOptions(out=root / form, passes=passes, precision=precision, bench=False, metrics=False))
        out[form] = root / form
    return out


def _user_rows(specs: list, users: int, seq: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for s in specs:
        shape = tuple(users if d == "batch" else seq if isinstance(d, str) else d for d in s.shape)
        out[s.name] = random_ids(s, shape, rng) if s.vocab is not None else rng.standard_normal(shape).astype(s.dtype)
    return out


def request_sequence(bundle: Path, candidates: int = 16) -> list[Request]:
    """Five requests over users 1-3: new users; a repeated and a new one; user 1's history slid by
    one position and user 2 again; user 1 slid by two positions; user 2 with a changed profile."""
    from mixexport.bundle import read_manifest

    manifest = read_manifest(bundle)
    model = manifest.data["model"]
    k = (model.get("multiples") or {}).get("seq", ["groups", 1])[1]
    seq = max(16, k * int((model.get("minimums") or {}).get("groups", 0)) + 2 * k)
    user_specs = [s for s in manifest.inputs if s.user_side]
    item_specs = [s for s in manifest.inputs if not s.user_side]
    rng = np.random.default_rng(0)
    people = {uid: _user_rows(user_specs, 1, seq, rng) for uid in (1, 2, 3)}
    seq_spec = next(s for s in user_specs if s.role == "sequence")

    def slide(uid: int, m: int) -> None:  # m new behaviours at the end, the oldest m dropped
        old = people[uid][seq_spec.name]
        people[uid][seq_spec.name] = np.concatenate([old[:, m:], random_ids(seq_spec, (1, m), rng)], axis=1)

    def request(uids: tuple[int, ...]) -> Request:
        user = {s.name: np.concatenate([people[u][s.name] for u in uids]) for s in user_specs}
        item = _user_rows(item_specs, candidates, seq, rng)
        return Request(user=user, item=item, user_index=np.arange(candidates, dtype=np.int64) % len(uids),
                       user_ids=uids)

    reqs = [request((1, 2)), request((1, 3))]
    slide(1, k)
    reqs.append(request((1, 2)))
    slide(1, 2 * k)
    reqs.append(request((2, 1)))
    people[2]["user_cat"] = _user_rows([s for s in user_specs if s.name == "user_cat"], 1, seq, rng)["user_cat"]
    reqs.append(request((2,)))
    return reqs


def parse_requests(stdout: str) -> list[dict[str, np.ndarray]]:
    """``request NAME`` lines open each request; then ``output NAME d0 d1…`` and one line per row."""
    out: list[dict[str, np.ndarray]] = []
    lines = stdout.strip().splitlines()
    i = 0
    while i < len(lines):
        head = lines[i].split()
        if head[0] == "request":
            out.append({})
            i += 1
            continue
        if not out:
            out.append({})
        assert head[0] == "output", lines[i]
        shape = tuple(int(d) for d in head[2:])
        rows = shape[0] if shape else 1
        values = [float(v) for line in lines[i + 1:i + 1 + rows] for v in line.split()]
        out[-1][head[1]] = np.asarray(values, dtype=np.float32).reshape(shape)
        i += 1 + rows
    return out


def max_rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - want) / np.maximum(np.abs(want), 1e-30)))


@pytest.mark.parametrize("form", list(FORMS))
def test_request_sequence_matches_python_runtime(exe: Path, bundles: dict[str, Path], form: str,
                                                 tmp_path: Path) -> None:
    bundle = bundles[form]
    reqs = request_sequence(bundle)
    for k, req in enumerate(reqs):
        write_request_dir(req, tmp_path / "seq" / f"r{k}")
    counts = _compare(exe, bundle, reqs, tmp_path / "seq", form)
    if form.startswith("kv"):
        assert counts[5] > 0 and counts[6] >= 2 and counts[7] > 0, counts  # kv hits, appends, misses
    if form == "split" or form.startswith("kv"):
        assert counts[0] > 0 and counts[1] > 0, counts  # user-state hits and misses
        # a cache bounded to about one and a half users' state: the same evictions in both runtimes
        bound = counts[4] * 3 // (2 * counts[3])
        tight = _compare(exe, bundle, reqs, tmp_path / "seq", form, bound)
        assert tight[2] > 0 and tight[3] == 1, tight


def _compare(exe: Path, bundle: Path, reqs: list[Request], seq: Path, form: str,
             cache_bytes: int | None = None) -> list[int]:
    """Score ``reqs`` (written under ``seq``) in one C++ process and one Python runtime: the same scores
    (max rel err <= 1e-6) and the same cache counts. Returns the C++ counts: user-state hits, misses,
    evictions, entries, bytes; kv hits, appends, misses."""
    extra = ("--cache-bytes", str(cache_bytes)) if cache_bytes is not None else ()
    r = subprocess.run([str(exe), str(bundle), str(seq), *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = parse_requests(r.stdout)
    with Runtime.open(bundle, **({"cache_bytes": cache_bytes} if cache_bytes is not None else {})) as rt:
        want = [rt.score(req) for req in reqs]
        stats, kv = rt.cache.stats, dict(rt.kv_stats)
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want)):
        assert set(g) == set(w), k
        for name in w:
            assert g[name].shape == w[name].shape
            assert max_rel(g[name], w[name]) <= 1e-6, (form, k, name, max_rel(g[name], w[name]))
    line = re.search(r"cache: user state (\d+) hits, (\d+) misses, (\d+) evictions, (\d+) entries, (\d+) bytes; "
                     r"kv (\d+) hits, (\d+) appends, (\d+) misses", r.stderr)
    assert line, r.stderr
    counts = [int(v) for v in line.groups()]
    assert counts[:4] + counts[5:] == [stats.hits, stats.misses, stats.evictions, stats.entries,
                                       kv["hits"], kv["appends"], kv["misses"]], (counts, stats, kv)
    return counts


@pytest.mark.parametrize("form", list(FORMS))
def test_load_mode_shares_one_scorer_across_threads(exe: Path, bundles: dict[str, Path], form: str,
                                                    tmp_path: Path) -> None:
    """The request sequence, round-robin on 2 threads through one Scorer: every answer is the one the
    sequential pass gave for that request (cache hits, appends and rebuilds race, scores do not)."""
    for k, req in enumerate(request_sequence(bundles[form])):
        write_request_dir(req, tmp_path / f"r{k}")
    r = subprocess.run([str(exe), str(bundles[form]), str(tmp_path), "--threads", "2", "--requests", "200"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"load: 200 requests on 2 threads: 0 errors, 0 mismatches \(max rel diff 0\), "
                  r"p50 [0-9.]+ ms, p99 [0-9.]+ ms, [0-9.]+ requests/s", r.stderr)
    assert m, (form, r.stderr)


@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_repeat_times_warm_calls_of_the_cache_path_the_benchmark_names(exe: Path, bundles: dict[str, Path],
                                                                        cache_bytes: int | None,
                                                                        tmp_path: Path) -> None:
    """``--repeat 3`` on a split bundle (benchmarks/cpp_score.py's hit and miss cases): after the first
    pass, untimed calls for at least 0.5 s (at least 5) then 3 timed ones, every one of them a
    user-state hit by default, and every one a miss (the user segment runs) with ``--cache-bytes 0``."""
    req = request_sequence(bundles["split"])[0]  # users 1 and 2, both new
    write_request_dir(req, tmp_path / "req")
    extra = ("--cache-bytes", str(cache_bytes)) if cache_bytes is not None else ()
    r = subprocess.run([str(exe), str(bundles["split"]), str(tmp_path / "req"), "--repeat", "3", *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = re.search(r"request \.: p50 [0-9.]+ ms, mean [0-9.]+ ms over 3 calls \(2 user\(s\) x 16 candidates\), "
                  r"after (\d+) untimed calls", r.stderr)
    assert m and int(m.group(1)) >= 5, r.stderr
    hits, misses = map(int, re.search(r"user state (\d+) hits, (\d+) misses", r.stderr).groups())
    calls = 1 + int(m.group(1)) + 3  # first pass, warm-up, timed
    assert (hits, misses) == ((0, 2 * calls) if cache_bytes == 0 else (2 * (calls - 1), 2)), r.stderr


# --------------------------------------------------------------------------------------------
# refusals: the bundle as a trust boundary, bad requests, what the C++ side does not serve


@pytest.fixture
def plain_copy(bundles: dict[str, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundles["plain"], dst)
    write_request_dir(request_sequence(dst)[0], tmp_path / "req")
    return dst


def _run(exe: Path, bundle: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(bundle), str(bundle.parent / "req"), *extra], capture_output=True,
                          text=True, timeout=120)


def _both_refuse(exe: Path, bundle: Path, needle: str, **open_kwargs: str) -> None:
    """Runtime.open and the scorer refuse with the same one line and the same exit code."""
    with pytest.raises(MixexportError) as e:
        Runtime.open(bundle, **open_kwargs)
    extra = ("--manifest-sha256", open_kwargs["manifest_sha256"]) if open_kwargs else ()
    r = _run(exe, bundle, *extra)
    assert r.stdout == "" and r.stderr.splitlines() == [f"error: {e.value.message}"], (r.stderr, e.value.message)
    assert r.returncode == e.value.exit_code
    assert needle in e.value.message


def test_refuses_a_segment_outside_the_bundle(exe: Path, plain_copy: Path) -> None:
    rel = json.loads((plain_copy / "manifest.json").read_text())["segments"][0]["file"]
    shutil.copy(plain_copy / rel, plain_copy.parent / "evil.onnx")
    edit_manifest(plain_copy, lambda d: d["segments"][0].update(file="../evil.onnx"))
    _both_refuse(exe, plain_copy, "segments[0].file '../evil.onnx' breaks the bundle path rule (relative, no '..', "
                                  "resolving inside the bundle): it climbs out with '..'")


def test_refuses_a_segment_symlinked_outside(exe: Path, plain_copy: Path) -> None:
    rel = json.loads((plain_copy / "manifest.json").read_text())["segments"][0]["file"]
    outside = plain_copy.parent / "elsewhere.onnx"
    shutil.move(plain_copy / rel, outside)
    (plain_copy / rel).symlink_to(outside)
    _both_refuse(exe, plain_copy, f"resolves to {outside.resolve()}, outside the bundle (through a symbolic link)")


def test_refuses_a_changed_or_unlisted_segment(exe: Path, plain_copy: Path) -> None:
    rel = json.loads((plain_copy / "manifest.json").read_text())["segments"][0]["file"]
    with open(plain_copy / rel, "ab") as f:
        f.write(b"\0")
    _both_refuse(exe, plain_copy, f"{rel} does not match its sha256 in the manifest (changed after the build)")
    edit_manifest(plain_copy, lambda d: d["files"].pop(rel))
    _both_refuse(exe, plain_copy, f"{rel} has no sha256 in the manifest's files")


def test_refuses_another_manifest_than_the_pinned_one(exe: Path, plain_copy: Path) -> None:
    digest = hashlib.sha256((plain_copy / "manifest.json").read_bytes()).hexdigest()
    r = _run(exe, plain_copy, "--manifest-sha256", digest.upper())
    assert r.returncode == 0, r.stderr
    edit_manifest(plain_copy, lambda d: d.update(notes=["edited"]))
    _both_refuse(exe, plain_copy, "not the pinned", manifest_sha256=digest)


def test_refuses_what_it_does_not_serve(exe: Path, plain_copy: Path) -> None:
    edit_manifest(plain_copy, lambda d: d.update(tables=[{"name": "user_cat", "file": "tables/user_cat.bin"}]))
    r = _run(exe, plain_copy)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["error: bundle has 1 embedding table(s) outside the engine (manifest 'tables'), "
                                     "which mixexport_score_ort does not serve: serve it with the Python runtime"]
    r = _run(exe, plain_copy, "--threads", "0")
    assert r.returncode == 2 and r.stderr == "error: --threads takes an integer >= 1, found 0\n"


def test_refuses_external_data(exe: Path, tmp_path: Path) -> None:
    """A segment whose tensors live in external-data files (bundles past 2 GB) is refused by name: built
    from bytes, ONNX Runtime would look for them relative to the working directory."""
    from mixexport.pipeline import BuildOptions, build

    from ..conftest import make_checkpoint

    bundle = tmp_path / "ext"
    build(make_checkpoint(tmp_path / "rm.pt"), BuildOptions(out=bundle, bench=False, metrics=False, external_threshold=0))
    write_request_dir(request_sequence(bundle)[0], tmp_path / "req")
    r = _run(exe, bundle)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("error: segments/model.onnx stores tensors in external-data files, which mixexport_score_ort "
                        "does not load: serve this bundle with the Python runtime\n")


def _bad_requests(req: Request) -> list[Request]:
    def changed(**kw: object) -> Request:
        return Request(**{**req.__dict__, **kw})

    dense = req.item["item_dense"].copy()
    dense[3, 2] = np.nan
    ids = req.user["user_cat"].copy()
    ids[1, 4] = 10_000
    return [changed(item={**req.item, "item_dense": dense}),
            changed(user={**req.user, "user_cat": ids}),
            changed(item={**req.item, "item_dense": req.item["item_dense"].astype(np.float64)}),
            changed(item={**req.item, "item_dense": req.item["item_dense"][:, :5]}),
            changed(user={**req.user, "user_cat": req.user["user_cat"][:, None]}),
            changed(user_index=np.where(req.user_index == 1, 7, req.user_index)),
            changed(user_index=req.user_index[:-1]),
            changed(user_ids=(1, 2, 3))]


def test_bad_requests_get_the_python_runtime_message(exe: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    bundle = bundles["plain"]
    bad = _bad_requests(request_sequence(bundle)[0])
    with Runtime.open(bundle) as rt:
        for k, req in enumerate(bad):
            with pytest.raises(MixexportError) as e:
                rt.check(req)
            write_request_dir(req, tmp_path / f"bad{k}")
            r = subprocess.run([str(exe), str(bundle), str(tmp_path / f"bad{k}")], capture_output=True, text=True)
            assert r.stdout == "" and r.stderr.splitlines() == [f"error: {e.value.message}"], (k, r.stderr)
            assert r.returncode == e.value.exit_code == 2


def test_refuses_an_axis_past_the_programs_maximum(exe: Path, plain_copy: Path) -> None:
    """A ``.pt2``'s ``Dim(max=)`` (manifest ``model.maximums``): a request past it gets the Python
    runtime's refusal; one at it is scored."""
    req = request_sequence(plain_copy)[0]
    rows = int(req.user_index.size)
    for limit, refused in ((rows - 1, True), (rows, False)):
        edit_manifest(plain_copy, lambda d: d["model"].update(maximums={"batch": limit}))
        r = _run(exe, plain_copy)
        with Runtime.open(plain_copy) as rt:
            if not refused:
                rt.check(req)
                assert r.returncode == 0 and r.stdout, r.stderr
                continue
            with pytest.raises(MixexportError) as e:
                rt.check(req)
        assert r.returncode == e.value.exit_code == 2 and r.stdout == ""
        assert r.stderr.splitlines() == [f"error: {e.value.message}"] == [
            f"error: the batch axis is {rows}, the model takes at most {rows - 1}"]


def test_survives_manifest_fuzzing(exe: Path, bundles: dict[str, Path], tmp_path: Path) -> None:
    """Random structural mutations (mixexport.testing.manifest_fuzz) of a KV bundle's manifest, the richest
    one (cache spec, three segments): scores or one ``error:`` line, never a crash, hang or partial answer."""
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["kv-longer"], bundle)
    write_request_dir(request_sequence(bundle)[0], tmp_path / "req")
    assert_survives_manifest_fuzzing(exe, bundle, tmp_path / "req", "cpp-ort", refusals=(1, 2))
