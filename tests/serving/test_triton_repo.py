"""``mixexport triton``: the repositories it writes. Every ``config.pbtxt`` is parsed with Triton's own
``model_config.proto`` (tritonclient's ``model_config_pb2``, text format: an unknown field fails), the
native flavour's configs are checked against the ONNX files Triton would load, and the ensemble is
run step by step as its parsed config wires it (ONNX Runtime on the repository's model files)
against the eager model. Triton's own ONNX Runtime / TensorRT backends are not in the pytriton
wheel: that the server runs the native flavour is not tested here."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixexport.bundle import read_manifest
from mixexport.serving.triton import DATA_TYPES
from tests.cli_helpers import run_cli
from tests.serving.triton_env import require_triton

pytestmark = pytest.mark.xdist_group("triton")
BUNDLES = ("ugsep_split", "longer_kv")


def parse(path: Path):  # -> model_config_pb2.ModelConfig
    require_triton(server=False)
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype_name(cfg_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(cfg_type)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", BUNDLES)
def test_native_repository(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """One onnxruntime_onnx model per segment (its config equal to the ONNX file's own inputs and
    outputs, the file byte-identical to the verified one) and an ensemble whose steps, run as the
    parsed config wires them, score like the eager model."""
    import onnxruntime as ort

    from mixexport.runtime import Runtime
    from mixexport.source import load_source

    ckpt, bundle = request.getfixturevalue(which)
    manifest = read_manifest(bundle)
    repo = tmp_path / "repo"
    r = run_cli("triton", str(bundle), "--out", str(repo), "--flavour", "native", "--name", "m", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert sorted(configs) == sorted(["m", *(f"m_{s.name}" for s in manifest.segments)])
    assert all(cfg.name == name for name, cfg in configs.items())
    sessions = {}
    for seg in manifest.segments:
        cfg, model = configs[f"m_{seg.name}"], repo / f"m_{seg.name}" / "1" / "model.onnx"
        assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 0
        assert sha256(model) == manifest.data["files"][seg.file]
        sess = sessions[seg.name] = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        for declared, actual in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
            assert [t.name for t in declared] == [a.name for a in actual]
            for t, a in zip(declared, actual):
                assert list(t.dims) == [d if isinstance(d, int) else -1 for d in a.shape], t.name
                onnx_type = a.type[len("tensor("):-1].replace("float", "float32").replace("double", "float64")
                assert dtype_name(t.data_type) == DATA_TYPES[onnx_type], t.name
    ens = configs["m"]
    assert ens.platform == "ensemble" and (repo / "m" / "1").is_dir()
    external = {t.name for t in ens.input}
    assert external == {s.name for s in manifest.inputs} | {"user_index"}
    # run the ensemble as its config says: each step's input_map feeds it, its output_map names results
    src = load_source(ckpt)
    req = src.example_request(3, 7, seed=5)
    values = {**req.user, **req.item, "user_index": req.user_index}
    assert set(values) == external
    for step in ens.ensemble_scheduling.step:
        seg_name = step.model_name[len("m_"):]
        assert set(step.input_map.values()) <= set(values), f"{step.model_name} reads a tensor not yet produced"
        outs = sessions[seg_name].run(None, {k: values[v] for k, v in step.input_map.items()})
        names = [o.name for o in sessions[seg_name].get_outputs()]
        values.update({step.output_map[n]: o for n, o in zip(names, outs)})
    with Runtime.reference(src) as ref:
        want = ref.score(req)["logit"]
    assert [t.name for t in ens.output] == ["logit"]
    got = values["logit"]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-5
    kinds = {m["name"]: m["kind"] for m in summary["models"]}
    assert kinds["m"] == "ensemble" and all(kinds[f"m_{s.name}"] == "onnxruntime_onnx" for s in manifest.segments)
    assert any("max_batch_size 0" in n for n in summary["notes"])
    assert any("recomputed on every request" in n for n in summary["notes"]) == bool(manifest.data["caches"])


def test_native_unsplit_bundle_batches_dynamically(tiny_bundle: Path, tmp_path: Path) -> None:
    """An unsplit bundle: one onnxruntime_onnx model on flat rows, dynamic batching on its batch axis
    (dims without it), its config equal to the ONNX file's inputs and outputs."""
    import onnxruntime as ort

    manifest = read_manifest(tiny_bundle)
    r = run_cli("triton", str(tiny_bundle), "--out", str(tmp_path / "repo"), "--flavour", "native",
                "--name", "rm", "--max-batch-size", "512")
    assert r.code == 0, r.err
    assert [p.parent.name for p in (tmp_path / "repo").glob("*/config.pbtxt")] == ["rm"]
    cfg = parse(tmp_path / "repo" / "rm" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 512 and cfg.HasField("dynamic_batching")
    sess = ort.InferenceSession(str(tmp_path / "repo" / "rm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for declared, actual in ((cfg.input, sess.get_inputs()), (cfg.output, sess.get_outputs())):
        assert [(t.name, list(t.dims)) for t in declared] == [(a.name, list(a.shape[1:])) for a in actual]
        assert all(not isinstance(a.shape[0], int) for a in actual)  # the batch axis is dynamic in the file
    assert sha256(tmp_path / "repo" / "rm" / "1" / "model.onnx") == manifest.data["files"][manifest.segments[0].file]
    assert "dynamic batching on the batch axis" in r.out


@pytest.mark.parametrize("which", BUNDLES)
def test_python_repository(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """One python-backend model: the bundle's inputs, user_index and an optional user_id; the
    bundle copied byte for byte with its manifest's sha256 pinned in the config."""
    _, bundle = request.getfixturevalue(which)
    manifest = read_manifest(bundle)
    repo = tmp_path / "repo"
    r = run_cli("triton", str(bundle), "--out", str(repo), "--instances", "2")
    assert r.code == 0, r.err
    assert "each keeps its own per-user caches" in r.out
    name = bundle.name
    cfg = parse(repo / name / "config.pbtxt")
    assert cfg.name == name and cfg.backend == "python" and cfg.max_batch_size == 0
    assert [g.count for g in cfg.instance_group] == [2]
    ins = {t.name: t for t in cfg.input}
    assert list(ins) == [s.name for s in manifest.inputs] + ["user_index", "user_id"]
    for s in manifest.inputs:
        assert dtype_name(ins[s.name].data_type) == DATA_TYPES[s.dtype]
        assert list(ins[s.name].dims) == [d if isinstance(d, int) else -1 for d in s.shape]
    assert ins["user_id"].optional and dtype_name(ins["user_id"].data_type) == "TYPE_STRING"
    assert not ins["user_index"].optional
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("logit", [-1, 1])]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    copy = repo / name / "1" / "bundle"
    assert params["manifest_sha256"] == manifest.sha256 == sha256(copy / "manifest.json")
    for rel, digest in manifest.data["files"].items():
        assert sha256(copy / rel) == digest
    assert (repo / name / "1" / "model.py").read_text().startswith('"""Triton python-backend model')


def test_refusals(ugsep_split: tuple[Path, Path], tmp_path: Path) -> None:
    """Bad input: one line, exit 2 (or 1 for a changed file), no traceback, nothing written."""
    _, bundle = ugsep_split
    (tmp_path / "taken").mkdir()
    cases = [
        (["--out", str(tmp_path / "taken")], 2, "exists"),
        (["--out", str(tmp_path / "a"), "--name", "bad/name"], 2, "not a valid Triton model name"),
        (["--out", str(tmp_path / "a"), "--instances", "0"], 2, "must be >= 1"),
        (["--out", str(bundle / "repo")], 2, "inside the bundle"),
        (["--out", str(tmp_path / "a"), "--manifest-sha256", "0" * 64], 1, "not the pinned"),
    ]
    for args, code, message in cases:
        r = run_cli("triton", str(bundle), *args)
        assert r.code == code and message in r.err and "Traceback" not in r.err, (args, r.err)
    changed = tmp_path / "changed"
    shutil.copytree(bundle, changed)
    seg = read_manifest(changed).segments[-1].file
    (changed / seg).write_bytes((changed / seg).read_bytes() + b"\0")
    for flavour in ("python", "native"):
        r = run_cli("triton", str(changed), "--out", str(tmp_path / "b"), "--flavour", flavour)
        assert r.code == 1 and seg in r.err and "sha256" in r.err and "Traceback" not in r.err, r.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed", "taken"]  # no temp dirs left
    assert not (bundle / "repo").exists()


# --------------------------------------------------------------------------------------------
# the repository as a trust boundary (issue 23): names from the manifest, generated text, --out
# and --force, write failures. None of these needs a server.

def _tree(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _rename(bundle: Path, edit) -> None:  # noqa: ANN001 - a callable on the manifest dict
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


ESCAPES = ["../../../X", "../X", "/tmp/X", "a/../../X", "..", "sub/X"]


@pytest.mark.parametrize("flavour", ["native", "python"])
def test_manifest_names_never_become_paths_outside_the_repository(flavour: str, ugsep_split: tuple[Path, Path],
                                                                  longer_kv: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    """A segment, tensor or cache name that would climb out of the repository is refused when the
    manifest is read (exit 2, one line); nothing is written anywhere."""
    edits = {
        "segment": lambda m, n: m["segments"][0].__setitem__("name", n),
        "segment output": lambda m, n: m["segments"][0]["outputs"][0].__setitem__("name", n),
        "model input": lambda m, n: m["model"]["inputs"][0].__setitem__("name", n),
        "cache": lambda m, n: m["caches"][0].__setitem__("name", n),
    }
    work = tmp_path / "w" / "x" / "y"
    for place, edit in edits.items():
        for name in ESCAPES:
            bundle = work / "bundle"
            shutil.rmtree(bundle, ignore_errors=True)
            shutil.copytree((longer_kv if place == "cache" else ugsep_split)[1], bundle)
            _rename(bundle, lambda m: edit(m, name))
            r = run_cli("triton", str(bundle), "--out", str(work / "repo"), "--flavour", flavour)
            assert r.code == 2 and "breaks the name rule" in r.err and "Traceback" not in r.err, (place, name, r.err)
            assert sorted(p.name for p in work.iterdir()) == ["bundle"], (place, name)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.name != "bundle"
                  and "bundle" not in p.parts) == ["w", "w/x", "w/x/y"]
    assert not Path("/tmp/X").exists()


def test_built_paths_stay_inside_their_root(tmp_path: Path) -> None:
    """The second line behind the name rule: every path the writer builds is resolved and refused
    if it leaves the repository (a name, or a link planted inside)."""
    from mixexport.errors import IntegrityError
    from mixexport.serving.triton import _child

    repo = tmp_path / "repo"
    (repo / "ok").mkdir(parents=True)
    assert _child(repo, "ok", "1", "model.onnx") == repo / "ok" / "1" / "model.onnx"
    (repo / "planted").symlink_to(tmp_path)
    for parts in (("..", "X"), ("ok", "..", "..", "X"), ("/etc", "passwd"), ("planted", "X"), (".",)):
        with pytest.raises(IntegrityError, match="resolves outside"):
            _child(repo, *parts)


INJECTIONS = [
    'x" } parameters { key: "EXECUTION_ENV_PATH" value { string_value: "/tmp/env.tar.gz" } } input { name: "y',
    'x\\" }', 'a\nparameters {\n key: "EXECUTION_ENV_PATH"\n}\n', "é\u2028\x00\x7f\"'\\", "}" * 3 + "{",
]


@pytest.mark.parametrize("text", INJECTIONS, ids=range(len(INJECTIONS)))
def test_config_text_keeps_every_string_inside_its_value(text: str) -> None:
    """The config serializer on strings the name rule would refuse (it is the last line, so it is
    tested without the rule): Triton's own parser reads back exactly one input whose name is the
    string, one model name, no parameters, and a comment cannot end early."""
    from mixexport.serving.triton import _config, _parameter, _tensor

    cfg_text = _config(text, [("backend", "python"), ("max_batch_size", 0)], [_tensor(text, "float32", ("b", 3))],
                       [_tensor("out", "float32", ("b",))], header=[text, f"# {text}"],
                       tail=[_parameter("manifest_sha256", text)])
    require_triton(server=False)
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse(cfg_text, model_config_pb2.ModelConfig())
    assert cfg.name == text and [i.name for i in cfg.input] == [text] and list(cfg.input[0].dims) == [-1, 3]
    assert dict((k, v.string_value) for k, v in cfg.parameters.items()) == {"manifest_sha256": text}
    assert [o.name for o in cfg.output] == ["out"] and not cfg.HasField("optimization")


def test_hostile_names_through_the_cli(ugsep_split: tuple[Path, Path], tmp_path: Path) -> None:
    """An input name with a quote (the config injection) is refused at read; so is a --name that
    is not a safe name; the python flavour's model.py is the package's file byte for byte (no
    manifest name is written into code)."""
    from mixexport.serving.triton import MODEL_FILE

    _, src = ugsep_split
    bundle = tmp_path / "bundle"
    shutil.copytree(src, bundle)
    _rename(bundle, lambda m: m["model"]["inputs"][0].__setitem__("name", INJECTIONS[0]))
    for flavour in ("python", "native"):
        r = run_cli("triton", str(bundle), "--out", str(tmp_path / "repo"), "--flavour", flavour)
        assert r.code == 2 and "model.inputs[0].name" in r.err and "breaks the name rule" in r.err, r.err
    for name in ('x"y', "../x", "a/b", ".x", "-x", "a" * 65, "a b", "é"):
        r = run_cli("triton", str(src), "--out", str(tmp_path / "repo"), "--name", name)
        assert r.code == 2 and "is not a valid Triton model name" in r.err and "Traceback" not in r.err, (name, r.err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    r = run_cli("triton", str(src), "--out", str(tmp_path / "repo"))
    assert r.code == 0, r.err
    assert (tmp_path / "repo" / src.name / "1" / "model.py").read_bytes() == MODEL_FILE.read_bytes()


def test_force_never_deletes_the_bundle_or_a_directory_mixexport_did_not_write(ugsep_split: tuple[Path, Path],
                                                                                tmp_path: Path) -> None:
    """--out that is, contains or lies inside the bundle: exit 2 with or without --force, the bundle
    intact. --force replaces a repository mixexport wrote or an empty directory, never another
    directory, a bundle, or a link."""
    _, src = ugsep_split
    work = tmp_path / "W"
    bundle = work / "B"
    shutil.copytree(src, bundle)
    (tmp_path / "link").symlink_to(work)
    before = _tree(work)
    for out in (work, bundle, bundle / "repo", bundle / "segments", tmp_path / "link", work / "B" / ".." / ".."
                / "W", tmp_path / "link" / "B"):
        for force in ([], ["--force"]):
            r = run_cli("triton", str(bundle), "--out", str(out), *force)
            assert r.code == 2 and "which this command reads" in r.err and "Traceback" not in r.err, (out, r.err)
    assert _tree(work) == before
    repo = tmp_path / "repo"
    repo.mkdir()
    assert run_cli("triton", str(bundle), "--out", str(repo), "--force").code == 0  # empty: taken
    assert run_cli("triton", str(bundle), "--out", str(repo), "--force", "--flavour", "native").code == 0  # marked
    assert (repo / ".mixexport-output").is_file() and (repo / "B_item" / "config.pbtxt").is_file()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    other = tmp_path / "other-bundle"
    shutil.copytree(src, other)  # marked, but as a bundle
    for out, message in ((mine, "was not written by mixexport"), (other, "is a bundle written by mixexport")):
        kept = _tree(out)
        r = run_cli("triton", str(bundle), "--out", str(out), "--force")
        assert r.code == 2 and message in r.err and "Traceback" not in r.err, r.err
        assert _tree(out) == kept
    assert run_cli("verify", str(bundle), "--no-metrics").code == 0


def test_read_only_and_full_disk(ugsep_split: tuple[Path, Path], tmp_path: Path) -> None:
    """A read-only mount: exit 2; a full disk (a real small tmpfs, at the first copy or at a later
    file): exit 3; one line each, nothing left behind, and a repository that --force would have
    replaced is still there, whole."""
    from tests.mounts import leftovers, tmpfs

    _, bundle = ugsep_split
    with tmpfs(tmp_path / "ro", 512, read_only=True) as mnt:
        for out in (mnt / "repo", mnt / "a" / "b" / "repo"):
            r = run_cli("triton", str(bundle), "--out", str(out))
            assert r.code == 2 and "Read-only file system" in r.err and "Traceback" not in r.err, r.err
        assert leftovers(mnt) == []
    size = sum(len(b) for b in _tree(bundle).values()) // 1024
    for flavour, free in (("native", 64), ("python", 64), ("python", size + 8)):
        with tmpfs(tmp_path / "disk", size + 256, free_kib=free) as mnt:
            r = run_cli("triton", str(bundle), "--out", str(mnt / "repo"), "--flavour", flavour)
            assert r.code == 3 and "no space left writing" in r.err and "Traceback" not in r.err, (flavour, r.err)
            assert len(r.err.splitlines()) == 2
            assert leftovers(mnt) == []
    with tmpfs(tmp_path / "disk", 2 * size + 256) as mnt:
        assert run_cli("triton", str(bundle), "--out", str(mnt / "repo")).code == 0
        kept = _tree(mnt / "repo")
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * ((size - 64) * 1024))
        r = run_cli("triton", str(bundle), "--out", str(mnt / "repo"), "--force")
        assert r.code == 3 and "no space left" in r.err, r.err
        assert leftovers(mnt) == ["repo"] and _tree(mnt / "repo") == kept
