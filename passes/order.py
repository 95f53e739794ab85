"""The pass table: every pass, in the order the pipeline runs them (program stage first, then the
ONNX stage), and the lookup by the name the CLI spells. One explicit tuple, no registry."""

from __future__ import annotations

from mixexport.errors import BadInputError
from mixexport.passes import (PassInfo, externalize_embeddings, extract_kv_cache, pack_moe_experts, quantize_int8,
                             quantize_w8a16, split_user_item)

#: Every pass, in pipeline order. A family's ``DEFAULT_PASSES`` picks which of them run by default.
#: externalize-embeddings runs after the request-level passes, on every segment they cut: a lookup
#: stays in the segment of its id input (user lookups run once per user), and their checks run on
#: the original inputs. It is opt-in: no family lists it in its defaults.
ORDER: tuple[PassInfo, ...] = (pack_moe_experts.PASS, split_user_item.PASS, extract_kv_cache.PASS,
                               externalize_embeddings.PASS, quantize_w8a16.PASS, quantize_int8.PASS)


def pass_by_name(name: str) -> PassInfo:
    """The pass the CLI calls ``name`` (kebab case); raises with the known names otherwise."""
    for p in ORDER:
        if p.name == name:
            return p
    known = ", ".join(p.name for p in ORDER) or "(none yet)"
    raise BadInputError(f"unknown pass {name!r}; known passes: {known}", "see `mixexport passes`")
