"""A user's own program (issue 27, items 3-6): outputs of any pytree shape keep their names, a
dynamic sequence axis survives re-export with its range, a model that fails in eager is refused
in one line, and ``--precision`` covers w8a16 and int8. Tiny modules, saved with
``torch.export.save`` into ``tmp_path`` and driven through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from mixexport.errors import BadInputError
from mixexport.program.outputs import output_names
from mixexport.program.precision_speed import slower_than_fp32
from mixexport.runtime import Runtime
from mixexport.source import load_source
from mixexport.specs import Request
from tests.cli_helpers import run_cli

BATCH = Dim("batch")


class MultiTask(torch.nn.Module):
    """PLE-style heads returning a nested dict (with a tuple inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.user = torch.nn.Embedding(20, 8)
        self.item = torch.nn.Embedding(30, 8)
        self.ctr = torch.nn.Linear(16, 1)
        self.cvr = torch.nn.Linear(16, 2)

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor) -> dict:
        h = torch.cat([self.user(user_id), self.item(item_id)], 1)  # [B, 16]
        return {"ctr": torch.sigmoid(self.ctr(h)), "aux": {"cvr": self.cvr(h), "parts": (h[:, :3], h.sum(1))}}


class History(torch.nn.Module):
    """Mean-pooled behaviour sequence with a dynamic length."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8)
        self.out = torch.nn.Linear(16, 1)

    def forward(self, seq_hist: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        pooled = self.emb(seq_hist).mean(1)  # [B, T, 8] -> [B, 8]
        return self.out(torch.cat([pooled, self.emb(item_id)], 1))


class BareSqueeze(torch.nn.Module):
    """DCN-v2's bare ``.squeeze()``: at batch 1 the batch axis goes too."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(30, 8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(user_id) * self.emb(item_id)).squeeze()


class SqueezeThenStack(BareSqueeze):
    """The same squeeze, then an op that needs the batch axis: eager raises at batch 1."""

    def forward(self, user_id: torch.Tensor, item_id: torch.Tensor) -> torch.Tensor:
        s = super().forward(user_id, item_id)  # [B], or [] at batch 1
        return torch.stack([s, 2 * s], 1)  # [B, 2]


def ids(rows: int, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, (rows, *shape))


def save(path: Path, module: torch.nn.Module, args: tuple, dynamic: dict) -> Path:
    torch.manual_seed(0)
    torch.export.save(torch.export.export(module.eval(), args, dynamic_shapes=dynamic), path)
    return path


@pytest.fixture(scope="module")
def multitask(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return save(tmp_path_factory.mktemp("mt") / "ple.pt2", MultiTask(), (ids(4, 20), ids(4, 30)),
                {"user_id": {0: BATCH}, "item_id": {0: BATCH}})


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    seq = Dim("seq", min=2, max=64)
    return save(tmp_path_factory.mktemp("hist") / "hist.pt2", History(), (ids(4, 30, 9), ids(4, 30)),
                {"seq_hist": {0: BATCH, 1: seq}, "item_id": {0: BATCH}})


EXPECTED = ["ctr", "aux.cvr", "aux.parts.0", "aux.parts.1"]


def test_output_names_follow_the_pytree() -> None:
    t = torch.zeros(1)

    def names(tree: object) -> list[str]:
        leaves, spec = pytree.tree_flatten(tree)
        return output_names(spec, len(leaves))

    assert names(t) == ["output"]
    assert names((t,)) == ["output"]
    assert names((t, t)) == ["output_0", "output_1"]
    assert names([t, {"a": t, "b": [t]}]) == ["output_0", "output_1.a", "output_1.b.0"]
    assert names({"ctr": t, "aux": {"cvr": t}}) == ["ctr", "aux.cvr"]
    with pytest.raises(BadInputError, match="'ctr score'.*breaks the name rule"):
        names({"ctr score": t})
    with pytest.raises(BadInputError, match=r"\['a.b'\] occur twice"):
        names({"a.b": t, "a": {"b": t}})


def test_dict_outputs_through_inspect_build_verify_and_triton(multitask: Path, tmp_path: Path) -> None:
    r = run_cli("inspect", str(multitask), "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert [o["name"] for o in info["outputs"]] == EXPECTED
    assert [o["shape"] for o in info["outputs"]] == [["batch", 1], ["batch", 2], ["batch", 3], ["batch"]]
    speed = info["precision_speed"]  # measured here: fp32, w8a16 and int8 on ONNX Runtime CPU
    assert set(speed["p50_ms"]) == {"fp32", "w8a16", "int8"} and min(speed["p50_ms"].values()) > 0
    assert all(w.startswith("--precision ") and "slower than fp32" in w for w in speed["warnings"])

    out = tmp_path / "ple"
    r = run_cli("build", str(multitask), "--out", str(out), "--no-bench")
    assert r.code == 0, r.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["name"] for o in manifest["segments"][0]["outputs"]] == EXPECTED
    parity = json.loads((out / "reports" / "parity.json").read_text())
    assert [o["name"] for o in parity["tensor"][0]["outputs"]] == EXPECTED
    model = onnx.load(out / "segments" / "model.onnx")
    assert [o.name for o in model.graph.output] == EXPECTED
    assert run_cli("verify", str(out)).code == 0

    with Runtime.open(out) as rt:  # each name carries its own head's values
        request = load_source(multitask).example_request(1, 4, seed=5)
        got = rt.score(request)
    with Runtime.reference(load_source(multitask)) as ref:
        want = ref.score(request)
    assert list(got) == EXPECTED and all(np.allclose(got[k], want[k], atol=1e-5) for k in EXPECTED)

    from tests.serving.test_triton_repo import parse

    repo = tmp_path / "repo"
    r = run_cli("triton", str(out), "--out", str(repo), "--flavour", "native")
    assert r.code == 0, r.err
    cfg = parse(repo / "ple" / "config.pbtxt")
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("ctr", [1]), ("aux.cvr", [2]), ("aux.parts.0", [3]),
                                                            ("aux.parts.1", [])]
    # the python flavour: the model's own user_id input keeps its name, the cache key moves aside
    r = run_cli("triton", str(out), "--out", str(tmp_path / "py"), "--flavour", "python")
    assert r.code == 0, r.err
    cfg = parse(tmp_path / "py" / "ple" / "config.pbtxt")
    assert [i.name for i in cfg.input] == ["user_id", "item_id", "user_index", "mixexport_user_id"]
    assert cfg.parameters["user_id_input"].string_value == "mixexport_user_id"
    assert [o.name for o in cfg.output] == EXPECTED


def test_seq_axis_survives_with_its_range(history: Path, tmp_path: Path) -> None:
    source = load_source(history)
    assert [s.shape for s in source.inputs] == [("batch", "seq"), ("batch",)]
    assert (source.minimums, source.maximums) == ({"seq": 2}, {"seq": 64})
    r = run_cli("inspect", str(history), "--no-timing")
    assert r.code == 0 and "axis seq: 2..64" in r.out, r.err

    out = tmp_path / "hist"
    r = run_cli("build", str(history), "--out", str(out), "--no-bench")
    assert r.code == 0, r.err
    model = onnx.load(out / "segments" / "model.onnx")
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims == {"seq_hist": ["batch", "seq"], "item_id": ["batch"]}
    assert json.loads((out / "manifest.json").read_text())["model"]["maximums"] == {"seq": 64}
    assert run_cli("verify", str(out)).code == 0

    with Runtime.open(out) as rt, Runtime.reference(source) as ref:
        for length in (2, 64):  # the range's two ends, neither the traced length
            request = source.example_request(2, 5, seed=length, seq_len=length)
            assert request.user["seq_hist"].shape == (2, length)
            np.testing.assert_allclose(rt.score(request)["output"], ref.score(request)["output"], rtol=1e-5,
                                       atol=1e-6)
        long = Request(user={"seq_hist": np.zeros((1, 65), np.int64)}, item={"item_id": np.zeros(3, np.int64)},
                       user_index=np.zeros(3, np.int64))
        with pytest.raises(BadInputError, match="the seq axis is 65, the model takes at most 64"):
            rt.score(long)

    r = run_cli("bench", str(out), "--seq-len", "65", "--candidates", "1", "--budget", "0")
    assert r.code == 2 and "a seq length of 65 is outside the model's range 2..64" in r.err

    repo = tmp_path / "repo"
    assert run_cli("triton", str(out), "--out", str(repo), "--flavour", "native").code == 0
    assert "dims: [ -1 ]" in (repo / "hist" / "config.pbtxt").read_text()  # seq_hist [batch, seq]: seq is -1


def test_seq_range_survives_a_pass_that_re_exports(history: Path, tmp_path: Path) -> None:
    out = tmp_path / "ext"  # externalize-embeddings re-exports the segment: the Dim(max=64) goes with it
    r = run_cli("build", str(history), "--passes", "externalize-embeddings", "--option",
                "externalize-embeddings.min_bytes=0", "--out", str(out), "--no-bench")
    assert r.code == 0, r.err
    inputs = json.loads((out / "manifest.json").read_text())["segments"][0]["inputs"]
    assert ["batch", "seq"] in [i["shape"] for i in inputs]


def test_seq_axis_survives_in_aoti(history: Path, tmp_path: Path) -> None:
    out = tmp_path / "aoti"  # AOTInductor compiles the re-exported program: the range goes with it
    r = run_cli("build", str(history), "--target", "aoti", "--out", str(out), "--no-bench")
    assert r.code == 0, r.err
    source = load_source(history)
    with Runtime.open(out) as rt, Runtime.reference(source) as ref:
        for length in (2, 64):
            request = source.example_request(1, 3, seed=length, seq_len=length)
            np.testing.assert_allclose(rt.score(request)["output"], ref.score(request)["output"], rtol=1e-5,
                                       atol=1e-6)


def test_trt_rtx_profile_carries_the_range(history: Path, tmp_path: Path) -> None:
    from mixexport.backends.trt_profiles import derive_profile

    source = load_source(history)
    profile = derive_profile(source.inputs, {}, None, source.minimums, source.maximums)
    assert profile["seq_hist"] == ((1, 2), (256, 64), (4096, 64))  # opt and max capped at the Dim's max
    with pytest.raises(BadInputError, match="MAX 100 is above the 64 the model allows"):
        derive_profile(source.inputs, {"seq": (2, 8, 100)}, None, source.minimums, source.maximums)

    from tests.trt_rtx import require_trt_rtx

    require_trt_rtx()
    out = tmp_path / "rtx"
    r = run_cli("build", str(history), "--target", "trt-rtx", "--arch", "sm86", "--out", str(out), "--no-bench",
                "--shapes", "seq:2,16,64")
    assert r.code == 0, r.err
    built = json.loads((out / "manifest.json").read_text())["segments"][0]["engine_build"]["profile"]
    assert built["seq_hist"] == [[1, 2], [256, 16], [4096, 64]]


@pytest.mark.parametrize("case", ["squeeze", "stack", "min-batch"])
def test_model_failing_in_eager_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    both = {"user_id": {0: BATCH}, "item_id": {0: BATCH}}
    if case == "squeeze":  # eager runs, but the output loses its batch axis at batch 1
        pt2 = save(tmp_path / "dcn.pt2", BareSqueeze(), (ids(4, 30), ids(4, 30)), both)
        expect = "your model's output 'output' has shape [] at batch 1 in eager"
    elif case == "stack":  # eager raises at batch 1: its error is quoted (type and message)
        pt2 = save(tmp_path / "dcn.pt2", SqueezeThenStack(), (ids(4, 30), ids(4, 30)), both)
        expect = "your model fails at batch 1 in eager: IndexError: Dimension out of range"
    else:  # the program's batch range excludes 1
        two = Dim("batch", min=2)
        pt2 = save(tmp_path / "min2.pt2", BareSqueeze(), (ids(4, 30), ids(4, 30)),
                   {"user_id": {0: two}, "item_id": {0: two}})
        expect = "the program was exported with batch >= 2"
    out = tmp_path / "b"
    for args in (("build", str(pt2), "--out", str(out)), ("inspect", str(pt2))):
        r = run_cli(*args)
        assert r.code == 2, r.err
        lines = r.err.strip().splitlines()
        error = [line for line in lines if line.startswith("error:")]
        assert len(error) == 1 and expect in error[0] and "mixexport serves 1 user × N candidates" in error[0]
        assert "Traceback" not in r.err and lines[-1].startswith("hint: ")
    assert not out.exists()


@pytest.mark.parametrize("precision", ["w8a16", "int8"])
def test_precision_names_every_quantization(precision: str, history: Path, tmp_path: Path) -> None:
    out = tmp_path / precision
    r = run_cli("build", str(history), "--precision", precision, "--out", str(out), "--no-bench")
    assert r.code == 0, r.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == precision
    assert [p["name"] for p in manifest["passes"]] == [f"quantize-{precision}"]
    other = "quantize-int8" if precision == "w8a16" else "quantize-w8a16"
    r = run_cli("build", str(history), "--precision", precision, "--passes", other, "--out", str(tmp_path / "x"))
    assert r.code == 2 and "each quantize the weights, only one can" in r.err and "Traceback" not in r.err


def test_bench_warns_when_a_reduced_precision_is_slower() -> None:
    def runner(p50: float) -> dict:
        return {"1": {"p50_ms": p50}, "64": {"p50_ms": p50 * 2}}

    report = {"candidates": [1, 64], "users": 1,
              "runners": {"eager": runner(1.0), "bundle (onnxruntime)": runner(0.3), "ort-default": runner(0.1)}}
    warnings = slower_than_fp32(report, "int8")
    assert len(warnings) == 2 and warnings[0].startswith("--precision int8 is 3.00x slower than fp32")
    assert slower_than_fp32(report, "fp32") == []
    report["runners"]["ort-default"] = runner(0.3)
    assert slower_than_fp32(report, "int8") == []
