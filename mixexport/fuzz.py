"""Fuzzed parity: random valid model configs × request shapes × pass combinations, each built and
verified by the real pipeline, then scored against the eager model.

A :class:`Case` is drawn by the family's sampler from a :class:`Chooser`: every random decision is a
named choice among options listed **simplest first** (fewest tokens, one layer, …). The chooser
records the index it took per name, so a case can be replayed exactly from its ``choices`` and
shrunk by lowering indices (:func:`shrink`) — hypothesis-style, without hypothesis's budget of
hundreds of builds. Samplers only produce configs their ``Config.__post_init__`` accepts: sizes
that must divide each other are derived (``dim = tokens · head_width``) or filtered before drawing.

:func:`run_case` does what a user does: ``save_checkpoint`` of a randomly initialised model,
``pipeline.build`` (which runs ``verify_bundle`` and refuses a failing bundle), then one request
of the case's U users × N candidates through :class:`~mixexport.runtime.Runtime` against
``Runtime.reference``, at the tolerance the bundle's precision implies, scored twice (the second
time from the per-user caches, which must give identical outputs).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

SPLIT, KV, PACK, QUANT = "split-user-item", "extract-kv-cache", "pack-moe-experts", "quantize-w8a16"
INT8 = "quantize-int8"  # what --precision int8 adds
#: Every applicable pass combination per family (pipeline order): none, each program pass, and
#: quantize-w8a16 alone and after it. tokenmixer-large's combinations with pack-moe-experts force
#: ``moe=True``; the others draw ``moe`` too (dense tokenmixer-large: [] and [quantize]). mixformer's
#: combinations with split-user-item force ``ui=True``; the others draw UI-MixFormer or plain MixFormer.
COMBOS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rankmixer": ((), (QUANT,)),
    "ugsep": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
    "longer": ((), (KV,), (QUANT,), (KV, QUANT)),
    "rankmixer-moe": ((), (PACK,), (QUANT,), (PACK, QUANT)),
    "tokenmixer-large": ((), (PACK,), (QUANT,), (PACK, QUANT)),
    "mixformer": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
    "hyformer": ((), (KV,), (QUANT,), (KV, QUANT)),
    "pyramid-mixer": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
    "msn": ((), (SPLIT,), (QUANT,), (SPLIT, QUANT)),
}
#: int8 compute (``--precision int8``) after each family's serving pass: listed after every COMBOS
#: combination, so the indices of those (and the CI slice's cases of them) are unchanged.
INT8_COMBOS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rankmixer": ((INT8,),),
    "ugsep": ((SPLIT, INT8),),
    "longer": ((KV, INT8),),
    "rankmixer-moe": ((PACK, INT8),),
    "tokenmixer-large": ((PACK, INT8),),
    "mixformer": ((SPLIT, INT8),),
    "hyformer": ((KV, INT8),),
    "pyramid-mixer": ((SPLIT, INT8),),
    "msn": ((INT8,),),
}
USER_INDEX_MODES = ("interleaved", "blocks", "random", "first-user")
#: Smallest normalised width (LayerNorm/RMSNorm) of cases with quantize-w8a16. A norm over 1-2
#: values is a (near) sign function: any weight rounding can flip it, so w8a16's 5e-2 tolerance
#: is not a property such a model has (fp32 cases keep the degenerate widths).
QUANT_MIN_WIDTH = 8


def combinations() -> list[tuple[str, tuple[str, ...]]]:
    """Every (family, passes) pair the fuzzer covers, in a fixed order."""
    return [(family, passes) for table in (COMBOS, INT8_COMBOS) for family, combos in table.items()
            for passes in combos]


class Chooser:
    """Named choices among options, by a seeded RNG or replayed from recorded indices.

    ``forced`` maps names to option indices (clipped to the list; a name not in it takes index 0
    when there is no RNG); ``limit`` caps every draw to the first ``limit`` options (the small,
    CI-sized corner of the space). ``choices`` records the index taken per name.
    """

    def __init__(self, rng: random.Random | None = None, forced: Mapping[str, int] | None = None,
                 limit: int | None = None) -> None:
        self.rng = rng
        self.forced = dict(forced or {})
        self.limit = limit
        self.choices: dict[str, int] = {}

    def _index(self, name: str, n: int) -> int:
        if name in self.forced or self.rng is None:
            return min(self.forced.get(name, 0), n - 1)
        return self.rng.randrange(n)

    def __call__(self, name: str, options: Sequence[T]) -> T:
        if not options:
            raise ValueError(f"no valid option for {name!r}")
        n = len(options) if self.limit is None else min(len(options), self.limit)
        if name in self.choices:
            raise ValueError(f"choice {name!r} drawn twice")
        i = self._index(name, n)
        self.choices[name] = i
        return options[i]


@dataclass(frozen=True)
class Case:
    """One fuzz case: a family config (as its checkpoint dict), passes and one request shape."""

    family: str
    passes: tuple[str, ...]
    seed: int                      # weights (torch.manual_seed) and request contents
    config: dict[str, Any]         # Config as config_to_dict writes it
    users: int                     # U
    candidates: int                # N
    user_index: str                # one of USER_INDEX_MODES
    seq_len: int | None = None     # request sequence length (dynamic-sequence families only)
    choices: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.family}[{','.join(self.passes) or 'none'}]"

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["passes"] = list(self.passes)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Case:
        return cls(**{**d, "passes": tuple(d["passes"])})


# ------------------------------------------------------------------------------------------------
# config samplers: one per family, ``(choose, moe=None, min_width=1, quantized=False, split=False) ->
# (Config, request seq_len or None)``; ``moe`` forces tokenmixer-large's MoE on (pack-moe-experts),
# ``min_width`` bounds the normed widths, ``quantized`` marks quantize-w8a16 cases and ``split`` forces
# mixformer's user/item heads (split-user-item). Families without the knob ignore it.

def _schema(choose: Chooser, seq_len: int) -> Any:
    from mixexport.models.common import FeatureSchema

    vocab = (1, 2, 7, 31)
    users = choose("user_columns", (1, 2, 3))
    items = choose("item_columns", (1, 2))
    return FeatureSchema(user_vocab=tuple(choose(f"user_vocab_{i}", vocab) for i in range(users)),
                         item_vocab=tuple(choose(f"item_vocab_{i}", vocab) for i in range(items)),
                         item_dense=choose("item_dense", (1, 3, 8)), seq_len=seq_len,
                         seq_vocab=choose("seq_vocab", (2, 11, 50)))


def _common(choose: Chooser) -> dict[str, Any]:
    return {"emb_dim": choose("emb_dim", (4, 8, 3)), "tasks": choose("tasks", (1, 2, 3)),
            "layers": choose("layers", (1, 2, 3))}


def _seq_len(choose: Chooser) -> int:
    return choose("seq_len", (4, 1, 7, 16))


def _widths(tokens: int, options: Sequence[int], min_width: int) -> list[int]:
    """``tokens · w`` for the options ``w`` that reach ``min_width``."""
    return [tokens * w for w in options if tokens * w >= min_width]


def sample_rankmixer(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                    **_: Any) -> tuple[Any, int | None]:
    """RankMixer: dim = tokens · head width (H = T heads)."""
    from mixexport.models import rankmixer

    tokens = choose("tokens", (2, 1, 3, 4, 6, 8))
    return rankmixer.Config(schema=_schema(choose, _seq_len(choose)), tokens=tokens,
                            dim=choose("dim", _widths(tokens, (2, 1, 4, 8), min_width)),
                            ffn_mult=choose("ffn_mult", (1, 2, 4)), **_common(choose)), None


def sample_ugsep(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                    **_: Any) -> tuple[Any, int | None]:
    """UG-Sep: dim = (user + item tokens) · head width."""
    from mixexport.models import ugsep

    tu, tg = choose("user_tokens", (1, 2, 3, 4)), choose("item_tokens", (1, 2, 3, 4))
    return ugsep.Config(schema=_schema(choose, _seq_len(choose)), user_tokens=tu, item_tokens=tg,
                        dim=choose("dim", _widths(tu + tg, (2, 1, 4, 8), min_width)),
                        ffn_mult=choose("ffn_mult", (1, 2, 4)), **_common(choose)), None


def sample_longer(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                    **_: Any) -> tuple[Any, int | None]:
    """seq_len = merge · groups with groups >= recent; the request may use another valid length."""
    from mixexport.models import longer

    merge, recent = choose("merge", (2, 1, 3, 4)), choose("recent", (2, 1, 3, 4))
    groups = recent + choose("extra_groups", (1, 0, 2, 5))
    heads = choose("heads", (1, 2, 4))
    config = longer.Config(schema=_schema(choose, merge * groups), merge=merge,
                           dim=choose("dim", _widths(heads, (2, 4, 8), min_width)), heads=heads, recent=recent,
                           cls_tokens=choose("cls_tokens", (1, 0, 2)), ffn_mult=choose("ffn_mult", (1, 2)),
                           bias_buckets=choose("bias_buckets", (4, 1, 2, 32)), **_common(choose))
    request_groups = choose("request_groups", (groups, recent, groups + 1, groups + 4))
    return config, merge * request_groups


def sample_rankmixer_moe(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                    **_: Any) -> tuple[Any, int | None]:
    """RankMixer Sparse-MoE: RankMixer's sizes plus 2-5 experts."""
    from mixexport.models import rankmixer_moe

    tokens = choose("tokens", (2, 1, 3, 4, 8))
    return rankmixer_moe.Config(schema=_schema(choose, _seq_len(choose)), tokens=tokens,
                                dim=choose("dim", _widths(tokens, (2, 1, 4, 8), min_width)),
                                ffn_mult=choose("ffn_mult", (1, 2)),
                                experts=choose("experts", (2, 3, 4, 5)), **_common(choose)), None


def sample_tokenmixer_large(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                            quantized: bool = False, **_: Any) -> tuple[Any, int | None]:
    """``dim`` is drawn among multiples of ``heads`` that make both SwiGLU hidden widths divisible
    by ``experts`` (the Config's MoE constraint) and both normalised widths (D and T·D/H) reach
    ``min_width``.

    Quantized with a real choice of experts (top_k < experts), ``down_init`` stays at the paper's
    small 0.01: top-k routing is discontinuous, and int8 weights upstream of a router flip the
    experts of tokens near a tie; with down-projections initialised at 1.0 one flip moves a logit
    by ~0.2 (measured: 9 of 2,000 rows flipped, max error 0.22 there, 5e-3 elsewhere), past any
    tolerance. verify then refuses the bundle, rightly; it is not a config w8a16 can promise."""
    from mixexport.models import tokenmixer_large

    use_moe = choose("moe", (True, False)) if moe is None else moe
    tokens, heads = choose("tokens", (2, 3, 4, 5, 8)), choose("heads", (1, 2, 4))
    ffn_mult = choose("ffn_mult", (1, 2, 3))
    experts = choose("experts", (2, 3, 4)) if use_moe else 4
    top_k = choose("top_k", tuple(range(2, experts + 1))) if use_moe else 2

    def valid(dim: int) -> bool:
        width = tokens * dim // heads
        return min(dim, width) >= min_width and (
            not use_moe or ((ffn_mult * dim) % experts == 0 and (ffn_mult * width) % experts == 0))

    dims = [d for d in (heads * m for m in range(1, 13)) if valid(d)]
    return tokenmixer_large.Config(
        schema=_schema(choose, _seq_len(choose)), tokens=tokens, dim=choose("dim", dims), heads=heads,
        ffn_mult=ffn_mult, moe=use_moe, experts=experts, top_k=top_k, alpha=choose("alpha", (2.0, 1.0, 0.5)),
        residual_every=choose("residual_every", (2, 1, 3)),
        down_init=choose("down_init", (0.01,) if quantized and use_moe and top_k < experts else (0.01, 1.0)),
        **_common(choose)), None


def sample_mixformer(choose: Chooser, min_width: int = 1, split: bool = False, quantized: bool = False,
                     **_: Any) -> tuple[Any, int | None]:
    """MixFormer: dim = heads · head width (H = T); UI-MixFormer needs 1 <= user_heads < heads; the
    action width is normed too (``min_width``).

    Quantized, every head group has at least two heads: a per-head weight group of one head is a
    ``[1, I, O]`` weight behind a blocked int8 DequantizeLinear, which TensorRT-RTX 1.7.1 fails to
    build (Myelin internal error ``CHECK(is_value())``; found by this fuzzer, the ONNX Runtime path
    is fine). Until quantize-w8a16 writes such weights in a form TensorRT-RTX takes, the fuzzer
    does not draw them with quantize-w8a16."""
    from mixexport.models import mixformer

    least = 2 if quantized else 1
    ui = True if split else choose("ui", (True, False))
    heads = choose("heads", tuple(h for h in ((2, 3, 4) if ui else (1, 2, 3, 4)) if h >= (2 * least if ui else least)))
    user_heads = choose("user_heads", tuple(range(least, heads - least + 1))) if ui else 1
    return mixformer.Config(schema=_schema(choose, _seq_len(choose)), heads=heads, user_heads=user_heads, ui=ui,
                            dim=choose("dim", _widths(heads, (2, 1, 4, 8), min_width)),
                            action_dim=choose("action_dim", [a for a in (2, 1, 4, 8, 16) if a >= min_width]),
                            ffn_mult=choose("ffn_mult", (1, 2)), **_common(choose)), None


def sample_pyramid_mixer(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                         **_: Any) -> tuple[Any, int | None]:
    """behaviour_len = periods · pool^levels; dim = T · head width with T = types · periods + Tu + Tg."""
    from mixexport.models import pyramid_mixer

    pool, levels, periods = choose("pool", (2, 1, 3)), choose("levels", (1, 2, 3)), choose("periods", (1, 2))
    types = choose("behaviour_types", (1, 2, 3))
    attrs = choose("behaviour_attributes", (1, 2, 4))
    vocab = (choose("behaviour_item_vocab", (2, 11, 50)),) + tuple(
        choose(f"behaviour_vocab_{i}", (1, 2, 7)) for i in range(1, attrs))
    schema = dataclasses.replace(_schema(choose, _seq_len(choose)), behaviour_len=periods * pool ** levels,
                                 behaviour_types=types, behaviour_vocab=vocab)
    tu, tg = choose("user_tokens", (1, 2)), choose("item_tokens", (1, 2))
    tokens = types * periods + tu + tg
    return pyramid_mixer.Config(schema=schema, levels=levels, pool=pool, mix_mult=choose("mix_mult", (1, 2)),
                                user_tokens=tu, item_tokens=tg,
                                dim=choose("dim", _widths(tokens, (1, 2, 4), min_width)),
                                ffn_mult=choose("ffn_mult", (1, 2)), **_common(choose)), None


def sample_msn(choose: Chooser, moe: bool | None = None, min_width: int = 1, quantized: bool = False,
               **_: Any) -> tuple[Any, int | None]:
    """MSN: dim = (Tu + Tg) · head width, top_k <= sub_keys, memory after one of the blocks; the
    query is drawn (``user``: split-user-item moves the memory read into the user segment).

    Quantized, top_k >= 2 and value rows of width >= 8: the memory read is a top-k choice, as an MoE
    router's, and int8 weights upstream move rows near a tie to other slots; with top_k = 1 and
    one-wide value rows (init std 1) a single flip replaces the whole read and moved a logit by 0.22
    (seed 11, case 34 of the hyformer/mixformer/pyramid-mixer/msn run; skipping no single layer
    group fixed it). verify refuses such a bundle, rightly; it is not a config int8 can promise."""
    from mixexport.models import msn

    tu, tg = choose("user_tokens", (1, 2, 3, 4)), choose("item_tokens", (1, 2, 3, 4))
    dim = choose("dim", _widths(tu + tg, (2, 1, 4, 8), min_width))
    sub_keys = choose("sub_keys", (2, 3, 4, 8))
    common = _common(choose)
    return msn.Config(schema=_schema(choose, _seq_len(choose)), user_tokens=tu, item_tokens=tg, dim=dim,
                      ffn_mult=choose("ffn_mult", (1, 2)),
                      memory_after=choose("memory_after", tuple(range(1, common["layers"] + 1))),
                      sub_keys=sub_keys, memory_heads=choose("memory_heads", (1, 2, 3)),
                      top_k=choose("top_k", tuple(range(2 if quantized else 1, sub_keys + 1))),
                      query_dim=choose("query_dim", (4, 8)),
                      value_dim=choose("value_dim", (8, 16) if quantized else (2, 1, 8, 16)),
                      query=choose("query", ("user", "pooled")), **common), None


def sample_hyformer(choose: Chooser, moe: bool | None = None, min_width: int = 1,
                    **_: Any) -> tuple[Any, int | None]:
    """dim: a multiple of both the token count T = 2·queries + user_tokens + item_tokens and heads;
    seq_len >= recent (and 2); the request may use another valid length."""
    import math

    from mixexport.models import hyformer

    tu, tg = choose("user_tokens", (1, 2, 3)), choose("item_tokens", (1, 2, 3))
    queries, heads = choose("queries", (1, 2)), choose("heads", (1, 2, 4))
    step = math.lcm(2 * queries + tu + tg, heads)
    recent = choose("recent", (2, 1, 3, 5))
    seq_len = max(2, recent) + choose("extra_items", (1, 0, 3, 9))
    dims = [d for d in (step * m for m in range(1, 9)) if d >= min_width][:2]
    config = hyformer.Config(schema=_schema(choose, seq_len), dim=choose("dim", dims),
                             user_tokens=tu, item_tokens=tg, queries=queries, recent=recent, heads=heads,
                             encoder=choose("encoder", hyformer.ENCODERS), ffn_mult=choose("ffn_mult", (1, 2)),
                             **_common(choose))
    return config, choose("request_seq_len", (seq_len, max(2, recent), seq_len + 1, seq_len + 6))


SAMPLERS: dict[str, Callable[..., tuple[Any, int | None]]] = {
    "rankmixer": sample_rankmixer, "ugsep": sample_ugsep, "longer": sample_longer,
    "rankmixer-moe": sample_rankmixer_moe, "tokenmixer-large": sample_tokenmixer_large,
    "mixformer": sample_mixformer, "hyformer": sample_hyformer, "pyramid-mixer": sample_pyramid_mixer,
    "msn": sample_msn,
}


def make_case(family: str, passes: tuple[str, ...], choose: Chooser, seed: int) -> Case:
    """Draw one case of ``family`` with ``passes`` (a config every pass applies to)."""
    from mixexport.models.common import config_to_dict

    quantized = QUANT in passes or INT8 in passes
    config, seq_len = SAMPLERS[family](choose, moe=True if PACK in passes else None,
                                       min_width=QUANT_MIN_WIDTH if quantized else 1, quantized=quantized,
                                       split=SPLIT in passes)
    users = choose("users", (1, 2, 3, 5))
    candidates = choose("candidates", (1, 7, 2, 16, 33, 64))
    mode = choose("user_index", USER_INDEX_MODES)
    return Case(family, tuple(passes), seed, config_to_dict(config), users, candidates, mode, seq_len,
                dict(choose.choices))


def replay(case: Case, forced: Mapping[str, int] | None = None) -> Case:
    """The case rebuilt from its recorded choices (with ``forced`` overriding some of them)."""
    return make_case(case.family, case.passes, Chooser(forced={**case.choices, **(forced or {})}), case.seed)


def generate_cases(count: int, seed: int, limit: int | None = None, families: Sequence[str] | None = None,
                   forced: Mapping[str, int] | None = None, start: int = 0, with_pass: str | None = None
                   ) -> list[Case]:
    """Cases ``start .. start+count-1``, cycling through every (family, passes) combination; case
    ``i`` depends only on ``(seed, i)`` (and the filters), so one can be re-run alone. ``limit`` keeps
    each draw among its first options; ``forced`` fixes some choices (e.g. ``{"layers": 0}``: one
    layer); ``families`` and ``with_pass`` keep the combinations of those families / with that pass."""
    combos = [c for c in combinations() if (families is None or c[0] in families)
              and (with_pass is None or with_pass in c[1])]
    out = []
    for i in range(start, start + count):
        family, passes = combos[i % len(combos)]
        rng = random.Random(f"mixexport-fuzz:{seed}:{i}")
        out.append(make_case(family, passes, Chooser(rng, forced, limit), seed=seed * 100_000 + i))
    return out


# ------------------------------------------------------------------------------------------------
# running a case

def make_request(case: Case, source: Any) -> Any:
    """The case's U × N request: random valid rows, ``user_index`` per the case's mode, user ids."""
    from mixexport.specs import Request

    base = source.example_request(case.users, case.candidates, seed=case.seed, seq_len=case.seq_len)
    n, u = case.candidates, case.users
    rng = np.random.default_rng(case.seed)
    index = {"interleaved": np.arange(n) % u, "blocks": np.arange(n) * u // n,
             "random": rng.integers(0, u, size=n), "first-user": np.zeros(n)}[case.user_index]
    return Request(user=base.user, item=base.item, user_index=index.astype(np.int64),
                   user_ids=tuple(f"fuzz-{case.seed}-u{i}" for i in range(u)))


def _error(stage: str, exc: BaseException) -> dict[str, Any]:
    from mixexport.errors import MixexportError

    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"stage": stage, "type": type(exc).__name__,
            "message": exc.message if isinstance(exc, MixexportError) else str(exc),
            "user_error": isinstance(exc, MixexportError), "traceback": "".join(tb)[-6000:]}


def _checkpoint(case: Case, path: Path) -> Path:
    import torch

    from mixexport.models import create_model, save_checkpoint

    torch.manual_seed(case.seed)
    return save_checkpoint(create_model(case.family, case.config).eval(), path, {"fuzz_case": case.seed})


def score(case: Case, bundle: Path, checkpoint: Path) -> dict[str, Any]:
    """The case's request through the bundle's runtime vs the eager reference, at the tolerances of
    the bundle's precision; then the same request again (per-user caches warm) must match exactly."""
    from mixexport.bundle import read_manifest
    from mixexport.runtime import Runtime
    from mixexport.source import load_source
    from mixexport.verification.compare import compare_outputs, resolve_tolerances
    from mixexport.verification.run import execution_plan

    manifest = read_manifest(bundle)
    source = load_source(checkpoint)
    precision = manifest.data.get("precision", "fp32")
    tol = manifest.data.get("tolerance")
    family_tol = (float(tol["rtol"]), float(tol["atol"])) if isinstance(tol, dict) else None
    per, default = resolve_tolerances([s.name for s in manifest.outputs], precision, {}, {}, family_tol)
    request = make_request(case, source)
    backend, device, _ = execution_plan(manifest, None, "cpu")  # engines that cannot run here: their ONNX
    with Runtime.open(manifest, backend, device) as rt, Runtime.reference(source) as ref:
        first = rt.score(request)
        results = compare_outputs(first, ref.score(request), per, default)
        again = rt.score(request)
    failures = [r.line() for r in results if not r.passed]
    failures += [f"FAIL {k}: a cached (second) score differs from the first" for k in first
                 if not np.array_equal(first[k], again[k])]
    return {"precision": precision, "outputs": [r.to_json() for r in results], "failures": failures}


#: ``run_case(engines=…)`` → the build target that makes those engines
ENGINE_TARGETS = {"tensorrt-rtx": "trt-rtx", "tensorrt": "trt"}


def run_case(case: Case, workdir: str | Path, keep: bool = False, engines: str | None = None) -> dict[str, Any]:
    """Checkpoint → build (verify included) → score the case's request. With ``engines``
    (``tensorrt-rtx``: no GPU needed) the build targets that TensorRT backend, as a user's would:
    its engines are built, and where they cannot run the ONNX segments are verified and scored.
    ``quantize-int8`` cases build for ONNX Runtime CPU whatever ``engines`` says (int8 compute is
    a CPU target; the result says so under ``engines_skipped``).
    Never raises for a failure of the case: the result says ``passed``, the ``stage`` reached and
    every error; the bundle is deleted unless ``keep`` or the case failed."""
    from mixexport.pipeline import BuildOptions, build

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"bundle-{case.seed}"
    t0 = time.perf_counter()
    result: dict[str, Any] = {"case": case.to_json(), "label": case.label, "passed": False, "errors": []}
    stage = "checkpoint"
    try:
        ckpt = _checkpoint(case, work / f"model-{case.seed}.pt")
        stage = "build"
        if engines and INT8 in case.passes:
            result["engines_skipped"] = "quantize-int8 builds integer GEMMs for ONNX Runtime CPU only"
            engines = None
        target = {"target": ENGINE_TARGETS[engines], "device": "cuda"} if engines else {}
        built = build(ckpt, BuildOptions(out=out, passes=case.passes, bench=False, metrics=False, force=True,
                                         **target))
        result["verify_max_rel"] = built.parity["max_rel"]
        if engines:
            result["engines"] = {s["name"]: {"bytes": s["engine_build"]["bytes"], "seconds": s["engine_build"]["seconds"],
                                             "int8": (s["engine_build"].get("int8") or {}).get("status")}
                                 for s in built.manifest["segments"]}
        stage = "score"
        parity = score(case, out, ckpt)
        result["score"] = parity
        result["errors"] += [{"stage": "score", "type": "ParityFailure", "message": m, "user_error": False}
                             for m in parity["failures"]]
        stage = "done"
        result["passed"] = not parity["failures"]
    except Exception as e:  # noqa: BLE001 - the report carries every failure, with its traceback
        result["errors"].append(_error(stage, e))
    result["stage"] = stage
    result["seconds"] = round(time.perf_counter() - t0, 2)
    if result["passed"] and not keep:
        shutil.rmtree(out, ignore_errors=True)
    return result


def failure_key(result: Mapping[str, Any]) -> tuple[str, str]:
    """What makes two failures "the same" while shrinking: stage and error type."""
    err = (result.get("errors") or [{}])[0]
    return result.get("stage", ""), str(err.get("type", ""))


def shrink(result: Mapping[str, Any], workdir: str | Path, max_runs: int = 40,
           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Greedy shrink of a failing case: lower one choice index at a time (to 0, then halfway, then by
    one), keeping any change that still fails the same way. Returns the smallest failing result."""
    say = log or (lambda _m: None)
    best = dict(result)
    key = failure_key(best)
    runs = 0
    improved = True
    while improved and runs < max_runs:
        improved = False
        case = Case.from_json(best["case"])
        for name, index in sorted(case.choices.items()):
            for lower in sorted({0, index // 2, index - 1}):
                if lower >= index or runs >= max_runs:
                    continue
                candidate = replay(case, {name: lower})
                if candidate == case:
                    continue
                runs += 1
                res = run_case(candidate, workdir)
                say(f"shrink {runs}: {name} {index}->{lower}: {'fails' if not res['passed'] else 'passes'}")
                if not res["passed"] and failure_key(res) == key:
                    best, improved = res, True
                    break
            if improved:
                break
    best["shrink_runs"] = runs
    return best


def signature(result: Mapping[str, Any]) -> str:
    """A failure's kind: stage, error type and first message line with the numbers masked."""
    err = (result.get("errors") or [{}])[0]
    line = str(err.get("message", "")).strip().splitlines()
    text = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "#", line[-1] if err.get("type") == "GateFailedError" and line
                  else (line[0] if line else ""))
    return f"{result.get('stage')}: {err.get('type')}: {text[:200]}"


def summarize(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts per (family, passes); failures grouped by :func:`signature`, each kind with its
    count and the configs that showed it."""
    per: dict[str, dict[str, int]] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for r in results:
        row = per.setdefault(r["label"], {"tried": 0, "passed": 0, "failed": 0})
        row["tried"] += 1
        row["passed" if r["passed"] else "failed"] += 1
        if r["passed"]:
            continue
        kind = kinds.setdefault(signature(r), {"count": 0, "cases": []})
        kind["count"] += 1
        kind["cases"].append({"label": r["label"], "describe": describe(Case.from_json(r["case"])),
                              "case": r["case"], "traceback": r["errors"][0].get("traceback", "")})
    failed = sum(not r["passed"] for r in results)
    return {"tried": len(results), "passed": len(results) - failed, "failed": failed,
            "per_combination": dict(sorted(per.items())), "failure_kinds": kinds}


def describe(case: Case) -> str:
    """One line: the case's passes, request shape and config (schema inlined)."""
    cfg = json.dumps(case.config, separators=(",", ":"))
    seq = f", seq_len {case.seq_len}" if case.seq_len is not None else ""
    return f"{case.label} U={case.users} N={case.candidates} ({case.user_index}{seq}) seed={case.seed} config={cfg}"

