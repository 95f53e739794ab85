"""The corpus of third-party recommender architectures (issue 27): our own small implementations of
what users bring from torch-rechub, deepctr-torch and the papers, each saved as the ``.pt2`` a user
would give ``mixexport``, with the outcome the issue asks for per serving pass and precision.

``CASES`` is the registry: one :class:`~tests.corpus.common.Case` per model, its integer inputs'
id ranges and, per combination of :data:`~tests.corpus.common.COMBOS` the test runs, either
``verifies`` (build, verify and a request with ids across their ranges pass) or ``refused`` with a
fragment of the one-line error or hint. ``awaits=N`` marks an outcome that needs issue 27 item N
(today's behaviour differs; the corpus test runs it as a strict xfail until the item lands).

The parity fuzz takes these cases too (:mod:`mixexport.testing.program_fuzz`): see
:func:`fuzz_entries`.
"""

from __future__ import annotations

from tests.corpus import bst, dcn_v2, deepfm, din, mmoe_ple, sasrec, two_tower
from tests.corpus.common import COMBOS, Case, Outcome, build_args, program_entry, refused, save_case, verifies

NOT_SPLIT = "split-user-item needs user-only computation"   # the user side meets items before any matmul
NO_SEQUENCE = "needs a behaviour-sequence input"
NO_ATTENTION = "found no attention over the sequence input"
BATCH_1 = "fails at batch 1 in eager"

CASES: tuple[Case, ...] = (
    Case("din", din.build,
         ids={"user_id": din.USERS, "seq_items": din.ITEMS, "item_id": din.ITEMS, "item_cat": din.CATS},
         padding={"seq_items": 0},
         expect={"fp32": verifies(), "split": verifies(), "kv": refused(NO_ATTENTION), "w8a16": verifies(),
                 "int8": verifies()},
         note="target attention; int32 ids cast with .long(); padding id 0 masks the history"),
    Case("two_tower", two_tower.build,
         ids={"user_id": two_tower.USERS, "seq_items": two_tower.ITEMS, "item_id": two_tower.ITEMS,
              "item_cat": two_tower.CATS},
         padding={"seq_items": 0},
         expect={"fp32": verifies(), "split": verifies(), "split+w8a16": verifies(), "int8": verifies(),
                 "precision-w8a16": verifies()},
         note="DSSM: deep user tower, light item tower, dot product"),
    Case("deepfm", deepfm.build,
         ids={"user_id": deepfm.FIELDS["user_id"], "user_city": deepfm.CITY_SPACE,
              "item_id": deepfm.FIELDS["item_id"], "item_cat": deepfm.FIELDS["item_cat"]},
         vocab={"user_city": None},  # hashed: any id >= 0 is valid
         expect={"fp32": verifies(), "split": refused(NOT_SPLIT),
                 "kv": refused(NO_SEQUENCE), "int8": verifies()},
         note="one shared table through per-field offsets on stacked fields; a hashed field (% rows)"),
    Case("dcn_v2", dcn_v2.build, ids={"user_id": dcn_v2.USERS, "item_id": dcn_v2.ITEMS},
         expect={"fp32": verifies(), "split": refused(NOT_SPLIT), "fp16": verifies()},
         note="full-rank cross layers beside a DNN"),
    Case("dcn_v2_squeeze", dcn_v2.build_squeeze, inspect=refused(BATCH_1),
         ids={"user_id": dcn_v2.USERS, "item_id": dcn_v2.ITEMS},
         expect={"fp32": refused(BATCH_1)},
         note="the library's bare .squeeze(): the model fails at batch 1 in eager"),
    Case("mmoe", mmoe_ple.build_mmoe, ids={"user_id": mmoe_ple.USERS, "item_id": mmoe_ple.ITEMS},
         expect={"fp32": verifies(), "split": refused(NOT_SPLIT), "pack": refused("expected a Sparse-MoE"),
                 "int8": verifies()},
         note="shared experts, one dense softmax gate per task (not a sparse MoE); tuple outputs (ctr, cvr)"),
    Case("ple", mmoe_ple.build_ple, ids={"user_id": mmoe_ple.USERS, "item_id": mmoe_ple.ITEMS},
         expect={"fp32": verifies(), "split": refused(NOT_SPLIT), "w8a16": verifies()},
         note="task-specific and shared experts; dict outputs {ctr, cvr}"),
    Case("bst", bst.build,
         ids={"user_id": bst.USERS, "seq_items": bst.ITEMS, "item_id": bst.ITEMS},
         padding={"seq_items": 0},
         expect={"fp32": verifies(), "split": refused(NOT_SPLIT),
                 "kv": refused("the candidate sits inside the sequence's self-attention"),
                 "fp16": verifies()},
         note="transformer over the history with the candidate concatenated; padding id 0 masks keys"),
    Case("sasrec", sasrec.build, ids={"seq_items": sasrec.ITEMS, "item_id": sasrec.ITEMS},
         padding={"seq_items": 0}, seq_lens=(2, 9),
         expect={"fp32": verifies(), "split": verifies(),
                 "kv": refused("no user-side tensor with a per-position sequence axis")},
         note="causal self-attention, dynamic seq Dim(min=2, max=200), int32 ids"),
)

BY_NAME = {case.name: case for case in CASES}


def fuzz_entries() -> list:
    """Every (case, combination) the corpus expects to verify today, as program-fuzz entries
    (outcomes still awaiting an issue 27 item are left out until it lands)."""
    return [program_entry(case, combo) for case in CASES for combo, outcome in case.expect.items()
            if outcome.verifies and outcome.awaits is None]


__all__ = ["BY_NAME", "CASES", "COMBOS", "Case", "Outcome", "build_args", "fuzz_entries", "save_case"]
