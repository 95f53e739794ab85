"""The fuzzer's config samplers: one per family, each drawing a valid ``Config`` of it from a
:class:`Chooser` (every option list simplest first, so :func:`mixexport.testing.fuzz.shrink`
can lower indices towards the smallest config).

Signature: ``(choose, moe=None, min_width=1, quantized=False, split=False) -> (Config, request
seq_len or None)``; ``moe`` forces tokenmixer-large's MoE on (pack-moe-experts), ``min_width``
bounds the normed widths, ``quantized`` marks quantized cases (quantize-w8a16 or quantize-int8) and
``split`` forces mixformer's user/item heads (split-user-item). Families without the knob ignore it.
Samplers only produce configs their ``Config.__post_init__`` accepts: sizes that must divide each
other are derived (``dim = tokens · head_width``) or filtered before drawing. Where a quantized
case draws from a narrower range, the sampler's docstring says which model limit that avoids.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Mapping, Sequence, TypeVar

T = TypeVar("T")


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
