"""Pass options validate at construction and name the known values; ``--option`` is checked while
the command line is parsed, before torch loads, so a typo fails in well under a second."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixexport.errors import BadInputError
from mixexport.passes import extract_kv_cache, pack_moe_experts, quantize_w8a16, split_user_item
from mixexport.passes.options import BY_PASS, check_specs
from mixexport.passes.order import ORDER
from mixexport.pipeline import BuildOptions, build, parse_pass_options, pass_by_name
from tests.cli_helpers import run_cli


def test_the_options_are_the_pass_tables() -> None:
    assert {p.name: p.options for p in ORDER} == BY_PASS
    for module in (extract_kv_cache, pack_moe_experts, quantize_w8a16, split_user_item):
        assert module.PASS.options is module.Options
    for cls in BY_PASS.values():
        cls()  # the defaults are valid


@pytest.mark.parametrize("pass_name,kwargs,message", [
    ("quantize-w8a16", {"granularity": "per-chanel"},
     "quantize-w8a16: unknown granularity 'per-chanel'; known: per-token-channel, per-channel, per-tensor"),
    ("quantize-w8a16", {"embeddings": "per-col"}, "quantize-w8a16: unknown embeddings mode 'per-col'; known: "
                                                  "per-row, per-column, float"),
    ("quantize-w8a16", {"skip": "*router*"}, "quantize-w8a16: skip must be a tuple of name patterns"),
    ("pack-moe-experts", {"form": "sparse"}, "pack-moe-experts: unknown form 'sparse'; known: hidden-slice, stacked"),
    ("split-user-item", {"check_atol": -1.0}, "split-user-item: check_atol must be a number >= 0, found -1.0"),
    ("extract-kv-cache", {"check_atol": float("nan")}, "extract-kv-cache: check_atol must be a number >= 0"),
])
def test_bad_values_fail_at_construction_naming_the_known_ones(pass_name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(BadInputError) as e:
        pass_by_name(pass_name).options(**kwargs)
    assert e.value.message.startswith(message) and e.value.hint.startswith(f"e.g. --option {pass_name}.")


@pytest.mark.parametrize("spec,message", [
    ("quantize-w8a16.granularity=per-chanel", "unknown granularity 'per-chanel'"),
    ("quantize-w8a16.granularty=per-channel", "--option quantize-w8a16.granularty: unknown option; quantize-w8a16 has"),
    ("quantize-w8a16.skip_head=maybe", "--option quantize-w8a16.skip_head='maybe': expected bool"),
    ("split-user-item.check_atol=tiny", "--option split-user-item.check_atol='tiny': expected float"),
    ("quantise-w8a16.granularity=per-channel", "unknown pass 'quantise-w8a16'; known passes: pack-moe-experts,"),
    ("nonsense", "expected PASS.FIELD=VALUE"),
])
def test_check_specs_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(BadInputError, match=None) as e:
        check_specs((spec,))
    assert message in e.value.message


def test_parse_for_the_build_coerces_and_refuses_passes_that_do_not_run() -> None:
    passes = [pass_by_name("quantize-w8a16")]
    opts = parse_pass_options(("quantize-w8a16.skip=a*,b*", "quantize-w8a16.skip_head=yes"), passes,
                              {"quantize-w8a16": {"granularity": "per-tensor"}})
    q = opts["quantize-w8a16"]
    assert (q.skip, q.skip_head, q.granularity) == (("a*", "b*"), True, "per-tensor")
    with pytest.raises(BadInputError, match=r"passes that do not run: \['split-user-item'\]"):
        parse_pass_options(("split-user-item.check_atol=1e-4",), passes)


def test_the_options_module_imports_nothing_heavy() -> None:
    code = ("import sys, mixexport.passes.options\n"
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy', 'onnxscript') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_bad_option_on_the_cli_fails_before_torch_loads(tiny_ckpt: Path, tmp_path: Path) -> None:
    code = ("import sys, time\n"
            "t = time.perf_counter()\n"
            "from mixexport.cli import main\n"
            "try:\n"
            "    main(sys.argv[1:])\n"
            "except SystemExit as e:\n"
            "    print(e.code, 'torch' in sys.modules, f'{time.perf_counter() - t:.2f}')\n")
    args = ["build", str(tiny_ckpt), "--passes", "quantize-w8a16", "--out", str(tmp_path / "b"),
            "--option", "quantize-w8a16.granularity=per-chanel"]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    code_, torch_loaded, _seconds = r.stdout.split()
    assert (code_, torch_loaded) == ("2", "False"), r.stderr
    assert r.stderr.startswith("error: quantize-w8a16: unknown granularity 'per-chanel'; known: per-token-channel")
    assert wall < 10, f"{wall:.1f}s"  # ~0.5 s here (the budget is 2 s); loose against shared-machine noise
    assert not (tmp_path / "b").exists()


def test_bad_option_in_the_library_fails_before_the_model_loads(tiny_ckpt: Path, tmp_path: Path) -> None:
    said: list[str] = []
    with pytest.raises(BadInputError, match="unknown form 'sparse'"):
        build(tiny_ckpt, BuildOptions(out=tmp_path / "b", pass_options=("pack-moe-experts.form=sparse",)),
              progress=said.append)
    assert said == []  # not even "loading model"
    r = run_cli("build", str(tiny_ckpt), "--option", "pack-moe-experts.form=sparse", "--out", str(tmp_path / "c"))
    assert r.code == 2 and "unknown form 'sparse'" in r.err and "Traceback" not in r.err
