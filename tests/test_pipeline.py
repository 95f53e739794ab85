"""The pass contract that :func:`mixexport.pipeline.run_pass` enforces, on dummy passes: requires →
run → ensures once each and in that order, what each kind of failure becomes, and the CLI's exit
code for a request-level pass whose segments do not reproduce the program (a check: exit 1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mixexport.bundle import Bundle
from mixexport.errors import BadInputError, PassError, PostconditionError, PreconditionError
from mixexport.passes import PassInfo, PassResult
from mixexport.pipeline import run_pass


@dataclass(frozen=True)
class Opts:
    factor: int = 2


def _bundle(stage: str = "program") -> Bundle:
    return Bundle(source=None, stage=stage, segments=())  # type: ignore[arg-type] - dummies never read it


class Recorder:
    """A dummy pass whose hooks record their calls and can be told to fail."""

    def __init__(self, fail: dict[str, BaseException] | None = None, result: Any = None,
                 measured: dict[str, Any] | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = fail or {}
        self.result = result
        self.measured = measured

    def _hook(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if name in self.fail:
            raise self.fail[name]

    def requires(self, bundle: Bundle) -> None:
        self._hook("requires", bundle)

    def run(self, bundle: Bundle, options: Opts) -> PassResult:
        """A dummy pass."""
        self._hook("run", bundle, options)
        if self.result is not None:
            return self.result
        return PassResult(bundle.replace(precision="w8a16"), {"factor": options.factor})

    def ensures(self, before: Bundle, after: Bundle, options: Opts) -> dict[str, Any] | None:
        self._hook("ensures", before, after, options)
        return self.measured

    def info(self, **kw: Any) -> PassInfo:
        return PassInfo(name="dummy", stage="program", run=self.run, options=Opts, requires=self.requires,
                        ensures=self.ensures, **kw)


def test_requires_run_ensures_once_each_in_order() -> None:
    rec = Recorder(measured={"check_max_abs_diff": 0.0})
    bundle, opts = _bundle(), Opts(3)
    result = run_pass(rec.info(), bundle, opts, [])
    assert [name for name, _ in rec.calls] == ["requires", "run", "ensures"]
    assert rec.calls[0][1] == (bundle,) and rec.calls[1][1] == (bundle, opts)
    before, after, got_opts = rec.calls[2][1]
    assert before is bundle and after is result.bundle and got_opts is opts  # before and after, not re-run
    assert result.report == {"factor": 3, "check_max_abs_diff": 0.0}        # measurements join the report
    assert bundle.precision == "fp32" and result.bundle.precision == "w8a16"


def test_hooks_are_optional() -> None:
    rec = Recorder()
    info = PassInfo(name="bare", stage="program", run=rec.run, options=Opts)
    assert run_pass(info, _bundle(), Opts(), []).report == {"factor": 2}
    assert [name for name, _ in rec.calls] == ["run"]


def test_precondition_error_stops_before_run() -> None:
    rec = Recorder(fail={"requires": PreconditionError("dummy expects X, found Y")})
    with pytest.raises(PreconditionError, match="dummy expects X, found Y") as e:
        run_pass(rec.info(), _bundle(), Opts(), ["earlier"])
    assert e.value.exit_code == 2 and [name for name, _ in rec.calls] == ["requires"]


def test_postcondition_error_is_a_failed_check() -> None:
    rec = Recorder(fail={"ensures": PostconditionError("dummy: the result differs")})
    with pytest.raises(PostconditionError, match="the result differs") as e:
        run_pass(rec.info(), _bundle(), Opts(), [])
    assert e.value.exit_code == 1 and [name for name, _ in rec.calls] == ["requires", "run", "ensures"]


def test_user_errors_from_run_pass_through_unchanged() -> None:
    err = BadInputError("cannot cut at node x", "keep the batch on one axis")
    with pytest.raises(BadInputError) as e:
        run_pass(Recorder(fail={"run": err}).info(), _bundle(), Opts(), [])
    assert e.value is err


@pytest.mark.parametrize("hook", ["requires", "run", "ensures"])
def test_unknown_exception_names_the_pass_and_the_passes_before(hook: str) -> None:
    cause = ZeroDivisionError("division by zero")
    with pytest.raises(PassError) as e:
        run_pass(Recorder(fail={hook: cause}).info(), _bundle(), Opts(), ["pack-moe-experts", "split-user-item"])
    assert str(e.value) == ("pass dummy failed (after pack-moe-experts, split-user-item): "
                            "ZeroDivisionError: division by zero")
    assert e.value.pass_name == "dummy" and e.value.before == ("pack-moe-experts", "split-user-item")
    assert e.value.__cause__ is cause and isinstance(e.value, RuntimeError)


def test_first_pass_failure_says_so() -> None:
    with pytest.raises(PassError, match=r"^pass dummy failed \(the first pass of this build\): KeyError"):
        run_pass(Recorder(fail={"run": KeyError("x")}).info(), _bundle(), Opts(), [])


@pytest.mark.parametrize("result,found", [({"not": "a result"}, "dict"),
                                          (PassResult(_bundle("onnx")), "a bundle at the onnx stage")])
def test_invalid_result_is_a_pass_error(result: Any, found: str) -> None:
    rec = Recorder(result=result)
    with pytest.raises(PassError, match=f"returned {found}, expected a PassResult at the program stage"):
        run_pass(rec.info(), _bundle(), Opts(), [])
    assert [name for name, _ in rec.calls] == ["requires", "run"]  # no ensures on an invalid result


def test_stage_mismatch_is_refused_before_any_hook() -> None:
    rec = Recorder()
    with pytest.raises(BadInputError, match=r"works on the program stage, the bundle is at onnx \(after a, b\)"):
        run_pass(rec.info(), _bundle("onnx"), Opts(), ["a", "b"])
    assert rec.calls == []


def test_composition_failure_exits_1_with_its_own_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split whose segments do not reproduce the program is a failed check (exit 1), not a model
    the pass "does not apply" to (exit 2)."""
    import torch

    import mixexport.partition as partition
    from mixexport.models import save_checkpoint, ugsep
    from tests.cli_helpers import run_cli

    torch.manual_seed(0)
    ckpt = save_checkpoint(ugsep.Model(ugsep.tiny()).eval(), tmp_path / "ug.pt")
    real = partition.compose

    def off_by_one(segments: Any, request: Any) -> dict[str, np.ndarray]:
        return {k: v + 1 if k == "logit" else v for k, v in real(segments, request).items()}

    monkeypatch.setattr(partition, "compose", off_by_one)
    r = run_cli("build", str(ckpt), "--passes", "split-user-item", "--out", str(tmp_path / "b"), "--no-bench")
    assert r.code == 1, r.err
    assert "\nerror: split-user-item: the segments it cut do not reproduce the program" in r.err
    assert "logit" in r.err and "hint: build without split-user-item" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "b").exists()


def test_a_model_past_the_protobuf_limit_opens_from_external_data() -> None:
    """The stage ledger opens in-memory segments; one past protobuf's 2 GB cannot be serialized, so
    it is opened from a temporary external-data copy (the path a > 2 GB MSN value table takes; here
    with the limit lowered to 0), gives the same scores, and leaves the bundle's model unchanged."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from mixexport.backends.onnxruntime import OnnxRuntimeBackend
    from mixexport.export import weight_bytes
    from mixexport.stages import open_in_memory

    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    before = model.SerializeToString()
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    backend = OnnxRuntimeBackend()
    inline, external = open_in_memory(backend, model), open_in_memory(backend, model, limit=0)
    try:
        a, b = inline.run({"x": x}), external.run({"x": x})
    finally:
        inline.close()
        external.close()
    np.testing.assert_array_equal(a["y"], b["y"])
    np.testing.assert_allclose(b["y"], x @ w, rtol=1e-5, atol=1e-5)
    assert model.SerializeToString() == before and weight_bytes(model) == w.nbytes
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
