"""Load what the user gives ``build`` — a mixexport checkpoint or a ``torch.export`` ``.pt2`` — into a
:class:`Source`: the eager reference module, its input/output specs with roles, and a
``torch.export`` program with a dynamic batch axis. Every pass after this is model-agnostic.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mixexport.errors import BadInputError
from mixexport.program.outputs import flat_outputs, output_names
from mixexport.program.shapes import concrete_shape, example_size, output_shape, program_dims
from mixexport.pt2 import is_pt2, load_program
from mixexport.program.id_ranges import compat_vocab, id_notes
from mixexport.program.ids import find_id_ranges
from mixexport.specs import INPUT_ROLES, Request, TensorSpec, random_ids, role_from_name
from mixexport.trust import file_digest

EXAMPLE_BATCH = 5  # odd on purpose: avoids torch.export's 0/1 specialisation and clashes with T or D


@dataclass(frozen=True)
class Source:
    kind: str                        # "checkpoint" | "program"
    path: Path
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    module: torch.nn.Module          # the eager reference, eval mode
    family: str | None = None
    config: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    default_passes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    multiples: dict[str, tuple[str, int]] = field(default_factory=dict)  # "seq" -> ("groups", K): seq = K·groups
    minimums: dict[str, int] = field(default_factory=dict)  # "groups" -> k: the model needs >= k positions
    maximums: dict[str, int] = field(default_factory=dict)  # "seq" -> 200: a .pt2's Dim(max=200)

    @property
    def dataset(self) -> str | None:
        ds = self.metadata.get("dataset")
        return ds if isinstance(ds, str) else None

    @property
    def params(self) -> int:
        return int(sum(p.numel() for p in self.module.parameters()))

    def example_feeds(self, rows: int, seed: int = 0, seq_len: int | None = None) -> dict[str, np.ndarray]:
        """Valid random rows (ids inside their vocabularies); ``seq_len`` overrides the sequence
        length of models whose sequence axis is dynamic."""
        if self.kind == "checkpoint":
            if seq_len is not None:
                from mixexport.models.common import random_feeds

                schema = dataclasses.replace(self.module.config.schema, seq_len=seq_len)  # type: ignore[union-attr]
                return random_feeds(schema, rows, seed)
            return self.module.example_inputs(rows, seed)  # type: ignore[operator]
        rng = np.random.default_rng(seed)
        feeds = {}
        sizes = self.dim_sizes(seq_len)
        for s in self.inputs:
            shape = concrete_shape(s.shape, rows, sizes)
            if s.dtype.startswith("int"):  # across each column's range, the padding id among them
                feeds[s.name] = random_ids(s, shape, rng, padding=True)
            else:
                feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
        return feeds

    def dim_sizes(self, seq_len: int | None = None) -> dict[str, int]:
        """Sizes of a program's named non-batch axes in example inputs, inside their ranges;
        ``seq_len`` sizes the ``seq`` axis (see :mod:`mixexport.program.shapes`)."""
        axes = {d for s in self.inputs for d in s.shape if isinstance(d, str) and d != "batch" and d.isidentifier()}
        return {a: example_size(a, self.minimums, self.maximums, seq_len if a == "seq" else None) for a in axes}

    def example_request(self, users: int, candidates: int, seed: int = 0, seq_len: int | None = None) -> Request:
        """U users × N candidates; user_index interleaves the users (0,1,..,U-1,0,1,..)."""
        user_rows = self.example_feeds(users, seed, seq_len)
        item_rows = self.example_feeds(candidates, seed + 1, seq_len)
        return Request(user={s.name: user_rows[s.name] for s in self.inputs if s.user_side},
                       item={s.name: item_rows[s.name] for s in self.inputs if not s.user_side},
                       user_index=np.arange(candidates, dtype=np.int64) % users,
                       user_ids=tuple(range(users)))

    def reference(self, feeds: Mapping[str, np.ndarray], chunk: int = 4096) -> dict[str, np.ndarray]:
        """Run the eager model on flat rows (in chunks), outputs by name."""
        n = int(next(iter(feeds.values())).shape[0])
        parts: list[list[np.ndarray]] = [[] for _ in self.outputs]
        with torch.inference_mode():
            for lo in range(0, max(n, 1), chunk):
                args = {k: torch.from_numpy(np.ascontiguousarray(v[lo:lo + chunk])) for k, v in feeds.items()}
                out = self.module(**args)
                outs = out if isinstance(out, (tuple, list)) else (out,)
                for p, o in zip(parts, outs):
                    p.append(o.detach().numpy())
        return {s.name: np.concatenate(p) for s, p in zip(self.outputs, parts)}

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path.resolve()), "sha256": self.sha256,
                "family": self.family, "config": self.config, "params": self.params,
                "metadata": self.metadata}


def load_source(path: str | Path, roles: Mapping[str, str] | None = None) -> Source:
    """A checkpoint (``.pt``) or a torch.export program (``.pt2``), told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path} does not exist or is not a file",
                            "pass a mixexport checkpoint (.pt) or a torch.export program (.pt2)")
    if is_pt2(path):
        return _load_program(path, roles or {})
    from mixexport.models import load_checkpoint

    ckpt = load_checkpoint(path)
    model = ckpt.model
    if roles:
        raise BadInputError("--roles applies to .pt2 programs only; reference families declare "
                            "their roles", "drop --roles")
    from mixexport.models import default_passes

    multiples = model.dim_multiples() if hasattr(model, "dim_multiples") else {}
    minimums = model.dim_minimums() if hasattr(model, "dim_minimums") else {}
    return Source(kind="checkpoint", path=path, sha256=file_digest(path), inputs=model.input_specs(),
                  outputs=model.output_specs(), module=model, family=ckpt.family, config=ckpt.config,
                  metadata=ckpt.metadata, default_passes=default_passes(ckpt.family, model.config),
                  multiples=multiples, minimums=minimums)


def _load_program(path: Path, roles: Mapping[str, str]) -> Source:
    from mixexport.program.eager_check import check_eager

    loaded = load_program(path)  # read once, checked, rebuilt: see mixexport/pt2/archive.py
    try:
        source = _program_source(path, loaded.program, loaded.sha256, roles)
    except BadInputError:
        raise
    except Exception as e:  # noqa: BLE001 - torch accepted a malformed program (e.g. a null input
        # name) that fails when it is turned into a module: bad input, reported in one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise BadInputError(f"{path}: the program loads but is malformed: {type(e).__name__}: {first[:200]}",
                            "re-export it with torch.export.save") from None
    check_eager(source)  # before any export: a model that fails in eager is refused with eager's error
    return source


def _program_source(path: Path, ep: torch.export.ExportedProgram, sha256: str,
                    roles: Mapping[str, str]) -> Source:
    names = list(ep.graph_signature.user_inputs)
    resolved = {}
    unknown = []
    for name in names:
        role = roles.get(name) or role_from_name(name)
        if role not in INPUT_ROLES:
            unknown.append(name)
        resolved[name] = role
    bad_roles = {k: v for k, v in roles.items() if v not in INPUT_ROLES or k not in names}
    if bad_roles:
        raise BadInputError(f"--roles {bad_roles}: roles must be one of {INPUT_ROLES} and names must "
                            f"be program inputs {names}", "e.g. --roles uid=user --roles cand=item")
    if unknown:
        raise BadInputError(f"{path}: inputs {unknown} have no role; expected names starting with "
                            "user_, item_ or seq_",
                            "rename the forward() arguments, or pass --roles NAME=user|item|sequence")
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    ids = find_id_ranges(ep)  # through casts, offsets, clamps and hashing (mixexport/program/ids.py)
    dims = program_dims(ep, names, resolved)  # named symbolic axes and their ranges
    specs = []
    for name in names:
        val = placeholders[name].meta["val"]
        specs.append(TensorSpec(name, str(val.dtype).replace("torch.", ""), dims.shapes[name], resolved[name],
                                vocab=compat_vocab(ids.get(name)), ids=ids.get(name)))
    notes = []
    if any(s.shape and not isinstance(s.shape[0], str) for s in specs):
        raise BadInputError(f"{path}: the program's batch axis is static "
                            f"({[(s.name, s.shape) for s in specs]})",
                            "export with dynamic_shapes={name: {0: torch.export.Dim('batch')}} for every input")
    notes += id_notes(tuple(specs))
    module = _named_inputs_module(ep, names)
    outs = list(ep.graph_signature.user_outputs)
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    out_vals = [getattr(a, "meta", {}).get("val") for a in out_node.args[0]]
    # dict, tuple, list or nested outputs: flat and named by their keys (mixexport/program/outputs.py)
    out_names = output_names(ep.call_spec.out_spec, len(outs))
    outputs = tuple(TensorSpec(n, str(v.dtype).replace("torch.", "") if v is not None else "float32",
                               output_shape(v, dims), "output") for n, v in zip(out_names, out_vals))
    return Source(kind="program", path=path, sha256=sha256, inputs=tuple(specs), outputs=outputs,
                  module=module, metadata={}, notes=tuple(notes), minimums=dims.minimums, maximums=dims.maximums)


def _named_inputs_module(ep: torch.export.ExportedProgram, names: list[str]) -> torch.nn.Module:
    """The program as a module called with its inputs by name (the convention every later stage
    uses), whether it was exported with positional or keyword arguments."""
    import inspect

    inner = ep.module()
    spec = ep.call_spec.in_spec  # a pytree spec of (args, kwargs)
    # TreeSpec.child(i) replaced the deprecated children_specs (a FutureWarning) in newer torch
    args_spec = None if spec is None else spec.child(0) if hasattr(spec, "child") else spec.children_specs[0]
    positional = args_spec is None or args_spec.num_children > 0

    class NamedInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> Any:
            bound = dict(zip(names, args), **kwargs)
            if positional:
                return flat_outputs(self.inner(*[bound[n] for n in names]))
            return flat_outputs(self.inner(**{n: bound[n] for n in names}))

    # torch.export binds inputs through the signature: give forward the program's input names
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *names]]
    NamedInputs.forward.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return NamedInputs()  # no .eval(): an unlifted program refuses train()/eval() switches


def dynamic_shapes(specs: tuple[TensorSpec, ...], multiples: Mapping[str, tuple[str, int]] | None = None,
                   minimums: Mapping[str, int] | None = None,
                   maximums: Mapping[str, int] | None = None) -> dict[str, dict[int, Any]]:
    """torch.export ``dynamic_shapes`` for inputs named by ``specs``: every symbolic axis becomes a
    named Dim shared across inputs; ``multiples`` derives axes (``seq`` = K · ``groups``),
    ``minimums`` gives lower bounds (e.g. what the original program's range constraints proved) and
    ``maximums`` upper bounds (a ``.pt2``'s ``Dim("seq", max=200)``)."""
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            if multiples and name in multiples:
                base, k = multiples[name]
                dims[name] = dim(base) if k == 1 else k * dim(base)  # 1·Dim would be a second Dim
            elif name.isidentifier():
                hi = (maximums or {}).get(name)
                dims[name] = (torch.export.Dim(name, min=max(1, (minimums or {}).get(name, 1))) if hi is None
                              else torch.export.Dim(name, min=max(1, (minimums or {}).get(name, 1)), max=int(hi)))
            else:  # a linear expression of one named dim, e.g. "groups + 3"
                import sympy

                e = sympy.sympify(name)
                (sym,) = e.free_symbols
                a, c = sympy.Poly(e, sym).all_coeffs()
                dims[name] = int(a) * dim(str(sym)) + int(c)
        return dims[name]

    return {s.name: {i: dim(d) for i, d in enumerate(s.shape) if isinstance(d, str)} for s in specs}


def export_program(source: Source, rows: int = EXAMPLE_BATCH) -> torch.export.ExportedProgram:
    """``torch.export`` the reference: a dynamic ``batch`` axis shared by every input, plus any other
    symbolic axis its specs declare (e.g. a variable-length behaviour sequence)."""
    feeds = {k: torch.from_numpy(v) for k, v in source.example_feeds(rows, seed=1234).items()}
    dynamic = dynamic_shapes(source.inputs, source.multiples, source.minimums, source.maximums)
    try:
        return torch.export.export(source.module, (), kwargs=feeds, dynamic_shapes=dynamic, strict=False)
    except Exception as e:  # noqa: BLE001 - report torch's reason in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BadInputError(f"torch.export of the model failed: {first[:300]}",
                            "the model must be exportable with a dynamic batch axis") from None
