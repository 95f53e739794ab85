"""What ``read_manifest`` proves about a ``manifest.json`` before anything else reads it.

A manifest comes from outside (a registry, another host), so every value the runtime, ``verify``,
``inspect`` or a backend later uses is checked here for its type and range, and every cross
reference for consistency. Each problem is one line naming the entry (``segments[1].inputs[3]``):

- types and ranges: names are short printable strings, dims and counts are bounded non-negative
  integers (no huge or negative numbers reach an allocation), dtypes and roles are known words;
- paths: every path the manifest names obeys the bundle path rule (:mod:`mixexport.trust`);
- segments: unique names, one of the runtime's layouts (``full``; ``user`` + ``item``; ``cache`` +
  ``item``; ``cache`` + ``user`` + ``item``), and a segment graph without cycles: each segment reads
  model inputs, ``user_index`` or outputs of a segment that runs before it, with the same dtype;
- session options: only those the backend understands; for ONNX Runtime an allowlist of config
  entries with their values (:data:`ORT_CONFIG`), so none makes it read or write a file
  (``optimized_model_path``, EP-context paths) or fail on a value it cannot parse.

Keys a reader does not use (``ops``, ``created``, report fields) may be absent or hold anything;
unknown keys are ignored, as the schema version allows additions.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

from mixexport.manifest_values import MAX_ITEMS, Check, kind, short
from mixexport.trust import resolve_inside

SEGMENT_ROLES = ("full", "cache", "user", "item")
LAYOUTS = ({"full"}, {"user", "item"}, {"cache", "item"}, {"cache", "user", "item"})
RUN_ORDER = {"cache": 0, "full": 1, "user": 1, "item": 2}
_HEX64 = re.compile(r"[0-9a-f]{64}")
ORT_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
ORT_OPTIONS = ("graph_optimization_level", "config", "intra_op_num_threads")
#: the ONNX Runtime session config entries a bundle may set, with the values each accepts. An
#: allowlist: ORT has entries that read or write files (EP context, optimized-model paths, custom
#: op libraries) and fails session creation on a value it cannot parse; a new entry the build
#: writes must be added here.
ORT_CONFIG = {
    "session.qdq_matmulnbits_accuracy_level": re.compile(r"[0-4]"),
    "session.intra_op.allow_spinning": re.compile(r"[01]"),
    "session.inter_op.allow_spinning": re.compile(r"[01]"),
    "optimization.disable_specified_optimizers": re.compile(r"[A-Za-z0-9_]{1,64}(;[A-Za-z0-9_]{1,64}){0,63}"),
    **{f"session.{flag}": re.compile(r"[01]") for flag in (
        "disable_quant_qdq", "disable_prepacking", "set_denormal_as_zero", "disable_aot_function_inlining",
        "disable_cpu_ep_fallback", "disable_double_qdq_remover", "enable_quant_qdq_cleanup", "use_env_allocators")},
}


def validate(path: Path, root: Path, data: dict[str, Any]) -> None:
    """Raise one :class:`BadInputError` (or an :class:`IntegrityError` for a path leaving the bundle)
    for the first problem of the manifest ``data`` read from ``path`` in bundle ``root``."""
    c = Check(path)
    # JSON true is not 1 (Python's bool is an int, so ``True == 1`` passed the version check)
    c.integer(data["schema_version"], "schema_version", lo=1)
    model = c.obj(data["model"], "model")
    _model(c, model)
    inputs = c.specs(model["inputs"], "model.inputs")
    outputs = c.specs(model["outputs"], "model.outputs", lo=1)
    for key in ("target", "device", "precision"):
        if data.get(key) is not None:
            c.name(data[key], key, longest=64)
    for key in ("parity", "tolerance"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise c.fail(key, f"must be an object or null, found {kind(data[key])}")
    if data.get("tolerance") is not None:
        for key in ("rtol", "atol"):
            c.number(c.key(data["tolerance"], key, "tolerance"), f"tolerance.{key}")
    files = c.obj(data["files"], "files")
    if len(files) > MAX_ITEMS:
        raise c.fail("files", f"lists {len(files)} files, more than {MAX_ITEMS}")
    for rel, digest in files.items():
        resolve_inside(root, rel, "files key")
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise c.fail(f"files[{rel!r}]", f"must be a sha256 (64 lowercase hex digits), found {short(digest)}")
    segments = _segments(c, root, data["segments"])
    _graph(c, segments, {**inputs, **_tables(c, root, data.get("tables"), inputs)}, outputs)
    _caches(c, data["caches"], segments, inputs)
    for k, p in enumerate(c.array(data["passes"], "passes")):
        p = c.obj(p, f"passes[{k}]")
        c.name(c.key(p, "name", f"passes[{k}]"), f"passes[{k}].name", longest=64)
        for key in ("options", "report"):
            if not isinstance(p.get(key, {}), dict):
                raise c.fail(f"passes[{k}].{key}", f"must be an object, found {kind(p[key])}")
        if p["name"] == "quantize-w8a16":
            _w8a16_report(c, p.get("report") or {}, f"passes[{k}].report")


def _model(c: Check, model: dict[str, Any]) -> None:
    source = c.obj(model["source"], "model.source")
    c.name(c.key(source, "path", "model.source"), "model.source.path", longest=4096)
    sha = c.key(source, "sha256", "model.source")
    if not isinstance(sha, str) or not _HEX64.fullmatch(sha):
        raise c.fail("model.source.sha256", f"must be a sha256 (64 lowercase hex digits), found {short(sha)}")
    if model.get("family") is not None:
        c.name(model["family"], "model.family", longest=64)
    roles = model.get("roles")
    if roles is not None:
        for name, role in c.obj(roles, "model.roles").items():
            c.ident(name, "model.roles key")
            c.choice(role, f"model.roles[{name!r}]", ("user", "item", "sequence"))
    for name, entry in c.obj(model.get("multiples") or {}, "model.multiples").items():
        where = f"model.multiples[{c.name(name, 'model.multiples key', 64)!r}]"
        entry = c.array(entry, where)
        if len(entry) != 2:
            raise c.fail(where, f"must be [axis name, factor], found {len(entry)} entries")
        c.name(entry[0], f"{where}[0]", longest=64)
        c.integer(entry[1], f"{where}[1]", lo=1, hi=2**20)
    for name, lo in c.obj(model.get("minimums") or {}, "model.minimums").items():
        c.integer(lo, f"model.minimums[{c.name(name, 'model.minimums key', 64)!r}]", hi=2**20)
    for name, hi in c.obj(model.get("maximums") or {}, "model.maximums").items():  # a .pt2's Dim(max=)
        c.integer(hi, f"model.maximums[{c.name(name, 'model.maximums key', 64)!r}]", lo=1, hi=2**31)


def _segments(c: Check, root: Path, value: Any) -> list[dict[str, Any]]:
    segments = c.array(value, "segments", lo=1)
    names: set[str] = set()
    for i, seg in enumerate(segments):
        where = f"segments[{i}]"
        seg = c.obj(seg, where)
        for key in ("name", "role", "file", "backend", "inputs", "outputs"):
            c.key(seg, key, where)
        name = c.ident(seg["name"], f"{where}.name")
        if name in names:
            raise c.fail("segments", f"name segment {name!r} twice")
        names.add(name)
        c.choice(seg["role"], f"{where}.role", SEGMENT_ROLES)
        backend = c.name(seg["backend"], f"{where}.backend", longest=64)
        c.specs(seg["inputs"], f"{where}.inputs")
        c.specs(seg["outputs"], f"{where}.outputs", lo=1)
        resolve_inside(root, seg["file"], f"{where}.file")
        for k, rel in enumerate(c.array(seg.get("data_files") or [], f"{where}.data_files")):
            resolve_inside(root, rel, f"{where}.data_files[{k}]")
        for be, rel in c.obj(seg.get("engines") or {}, f"{where}.engines").items():
            c.name(be, f"{where}.engines key", longest=64)
            resolve_inside(root, rel, f"{where}.engines[{be!r}]")
        _session_options(c, backend, c.obj(seg.get("session_options") or {}, f"{where}.session_options"),
                         f"{where}.session_options")
        int8 = seg["engine_build"].get("int8") if isinstance(seg.get("engine_build"), dict) else None
        if int8 is not None:  # read by verify: the int8-in-the-engine check recorded at build
            int8 = c.obj(int8, f"{where}.engine_build.int8")
            c.name(c.key(int8, "status", f"{where}.engine_build.int8"), f"{where}.engine_build.int8.status", 32)
            for key in ("engine_bytes", "float_engine_bytes"):
                c.integer(c.key(int8, key, f"{where}.engine_build.int8"), f"{where}.engine_build.int8.{key}", hi=2**62)
            if c.key(int8, "ratio", f"{where}.engine_build.int8") is not None:
                c.number(int8["ratio"], f"{where}.engine_build.int8.ratio")
    roles = [s["role"] for s in segments]
    if set(roles) not in LAYOUTS or len(roles) != len(set(roles)):
        raise c.fail("segments", f"have roles {roles}: a bundle has one full segment, or user/cache segments "
                                 "and one item segment")
    return sorted(segments, key=lambda s: RUN_ORDER[s["role"]])


def _session_options(c: Check, backend: str, options: dict[str, Any], where: str) -> None:
    if backend == "onnxruntime":
        unknown = sorted(set(options) - set(ORT_OPTIONS))
        if unknown:
            raise c.fail(where, f"holds {unknown}, which a bundle may not set (known: {', '.join(ORT_OPTIONS)})")
        if options:  # empty: the backend's defaults; else what the session is built from, read as is
            c.choice(c.key(options, "graph_optimization_level", where), f"{where}.graph_optimization_level",
                     ORT_LEVELS)
        if options.get("intra_op_num_threads") is not None:
            c.integer(options["intra_op_num_threads"], f"{where}.intra_op_num_threads", hi=1024)
        for key, value in c.obj(options.get("config", {}), f"{where}.config").items():
            if key not in ORT_CONFIG:
                raise c.fail(f"{where}.config", f"sets {short(key)}, which a bundle may not set (allowed: "
                                                f"{', '.join(ORT_CONFIG)})")
            if not isinstance(value, (str, int)) or isinstance(value, bool) or not ORT_CONFIG[key].fullmatch(str(value)):
                raise c.fail(f"{where}.config[{key!r}]", f"is {short(value)}, not a value ONNX Runtime takes "
                                                         f"({ORT_CONFIG[key].pattern})")
        return
    if backend in ("tensorrt", "tensorrt-rtx"):  # archs: ["sm86", …]; profile: {axis: [min, opt, max]}
        options = dict(options)
        for k, arch in enumerate(c.array(options.pop("archs", None) or [], f"{where}.archs")):
            if not isinstance(arch, str) or not re.fullmatch(r"sm\d{2,3}", arch):
                raise c.fail(f"{where}.archs[{k}]", f"is {short(arch)}, not a compute capability like sm86")
        for axis, box in c.obj(options.pop("profile", None) or {}, f"{where}.profile").items():
            c.name(axis, f"{where}.profile key", longest=64)
            box = c.array(box, f"{where}.profile[{axis!r}]", lo=3)
            if len(box) != 3:
                raise c.fail(f"{where}.profile[{axis!r}]", f"has {len(box)} values, expected [min, opt, max]")
            for v in box:
                c.integer(v, f"{where}.profile[{axis!r}]", hi=1 << 31)
    scalar = (str, int, float, bool, type(None))
    for key, value in options.items():  # other backends: scalars or lists of them (aoti: device; tensorrt: archs)
        c.name(key, f"{where} key", longest=64)
        if not isinstance(value, scalar) and not (isinstance(value, list) and len(value) <= 64
                                                  and all(isinstance(v, scalar) for v in value)):
            raise c.fail(f"{where}[{key!r}]", f"must be a string, number, boolean or a short list of them, "
                                              f"found {kind(value)}")
    if backend == "aoti" and "device" in options:
        c.choice(options["device"], f"{where}.device", ("cpu", "cuda"))


def _graph(c: Check, segments: list[dict[str, Any]], inputs: Mapping[str, dict[str, Any]],
           outputs: Mapping[str, dict[str, Any]]) -> None:
    """Segments in run order; each reads model inputs, ``user_index`` or earlier segments' outputs."""
    producer: dict[str, tuple[int, str, dict[str, Any]]] = {}
    for order, seg in enumerate(segments):
        for s in seg["outputs"]:
            if s["name"] in inputs or s["name"] in producer:
                other = "a model input" if s["name"] in inputs else f"segment {producer[s['name']][1]!r}"
                raise c.fail(f"segment {seg['name']!r}", f"outputs {s['name']!r}, which {other} already provides")
            producer[s["name"]] = (order, seg["name"], s)
    for order, seg in enumerate(segments):
        for s in seg["inputs"]:
            where = f"segment {seg['name']!r} input {s['name']!r}"
            if s["name"] in producer:
                p_order, p_name, p_spec = producer[s["name"]]
                if p_order >= order:
                    how = "itself" if p_name == seg["name"] else f"segment {p_name!r}, which runs after it"
                    raise c.fail(where, f"is an output of {how} (a cycle between segment inputs and outputs)")
                want = p_spec
            elif s["name"] in inputs:
                want = inputs[s["name"]]
            elif s["name"] == "user_index" and seg["role"] == "item":
                want = {"dtype": "int64", "shape": ["candidates"], "role": "index"}
            else:
                raise c.fail(where, "is neither a model input nor an output of an earlier segment")
            if s["dtype"] != want["dtype"] or len(s["shape"]) != len(want["shape"]) or s["role"] != want["role"]:
                raise c.fail(where, f"is {s['dtype']} {s['role']} of rank {len(s['shape'])}, but its source is "
                                    f"{want['dtype']} {want['role']} of rank {len(want['shape'])}")
            if not _same_axes(s["shape"], want["shape"], exact=s["name"] not in inputs):
                raise c.fail(where, f"has shape {short(s['shape'])}, but its source has {short(want['shape'])}")
    last = segments[-1]
    got = {s["name"]: s for s in last["outputs"]}
    for name, spec in outputs.items():
        if name not in got or got[name]["dtype"] != spec["dtype"] or not _same_axes(got[name]["shape"], spec["shape"]):
            raise c.fail(f"segment {last['name']!r}", f"does not output the model output {name!r} "
                                                      f"({spec['dtype']}{short(spec['shape'])})")


def _same_axes(a: list[Any], b: list[Any], exact: bool = False) -> bool:
    """Shapes a tensor keeps from its source: the same static sizes and its rows (the axis the
    runtime gathers and cuts by user or candidate) at the same place; between segments, the same
    shape (the runtime hands the tensor over as it is)."""
    if exact or len(a) != len(b):
        return a == b
    for x, y in zip(a, b):
        if (isinstance(x, int) or isinstance(y, int)) and x != y:
            return False
        if (x in RUNTIME_AXES) != (y in RUNTIME_AXES):
            return False
    return True


def _caches(c: Check, value: Any, segments: list[dict[str, Any]], inputs: Mapping[str, dict[str, Any]]) -> None:
    caches = c.array(value, "caches")
    producer = next((s for s in segments if s["role"] == "cache"), None)
    if (producer is None) != (not caches) or len(caches) > 1:
        raise c.fail("caches", f"lists {len(caches)} caches for {'one cache segment' if producer else 'no cache segment'}")
    if producer is None:
        return
    where = "caches[0]"
    cache = c.obj(caches[0], where)
    for key in ("name", "producer", "tensors", "seq_axis", "input", "items_per_position", "appendable"):
        c.key(cache, key, where)
    c.ident(cache["name"], f"{where}.name")
    if cache["producer"] != producer["name"]:
        raise c.fail(f"{where}.producer", f"is {short(cache['producer'])}, not the cache segment {producer['name']!r}")
    tensors = c.specs(cache["tensors"], f"{where}.tensors", lo=1)
    outs = {s["name"]: s for s in producer["outputs"]}
    axes = c.obj(cache["seq_axis"], f"{where}.seq_axis")
    if set(tensors) != set(outs) or set(axes) != set(outs):
        raise c.fail(where, f"must describe exactly the cache segment's outputs {sorted(outs)}")
    for name, spec in outs.items():
        if "users" not in spec["shape"]:
            raise c.fail(f"segment {producer['name']!r} output {name!r}", "has no 'users' axis")
        c.integer(axes[name], f"{where}.seq_axis[{name!r}]", hi=len(spec["shape"]) - 1)
    seq = c.name(cache["input"], f"{where}.input")
    if seq not in inputs or inputs[seq]["role"] != "sequence" or seq not in {s["name"] for s in producer["inputs"]}:
        raise c.fail(f"{where}.input", f"is {short(seq)}, not a sequence input of the cache segment")
    c.integer(cache["items_per_position"], f"{where}.items_per_position", lo=1, hi=2**20)
    if "bytes_per_position" in cache:
        c.integer(cache["bytes_per_position"], f"{where}.bytes_per_position", hi=2**62)
    if not isinstance(cache["appendable"], bool):
        raise c.fail(f"{where}.appendable", f"must be true or false, found {kind(cache['appendable'])}")
    if "layout" in cache:
        layout = c.obj(cache["layout"], f"{where}.layout")
        if set(layout) - set(outs):
            raise c.fail(f"{where}.layout", f"describes tensors that are not the cache segment's outputs {sorted(outs)}")
        for name, entry in layout.items():
            entry = c.obj(entry, f"{where}.layout[{name!r}]")
            if entry.get("positions") not in ("per-position", "window"):
                raise c.fail(f"{where}.layout[{name!r}].positions", "must be 'per-position' or 'window'")
            if entry["positions"] == "window":
                c.integer(entry.get("window"), f"{where}.layout[{name!r}].window", lo=1, hi=2**20)


def _w8a16_report(c: Check, report: dict[str, Any], where: str) -> None:
    for name, seg in c.obj(report.get("segments") or {}, f"{where}.segments").items():
        seg = c.obj(seg, f"{where}.segments[{name!r}]")
        weights = seg.get("int8_weights")
        if weights is not None:
            for k, w in enumerate(c.array(weights, f"{where}.segments[{name!r}].int8_weights")):
                c.name(w, f"{where}.segments[{name!r}].int8_weights[{k}]", longest=1024)


#: axes the runtime acts on by name (rows per user, per candidate): a file and its manifest must agree
RUNTIME_AXES = ("batch", "users", "candidates")
_ORT_TYPES = {"float": "float32", "double": "float64"}


def interface_mismatch(specs: tuple[Any, ...], found: list[tuple[str, str, list[Any]]], what: str) -> str | None:
    """How a segment's ``what`` (``inputs``/``outputs``) in the manifest (``TensorSpec`` s) differ
    from those its model file declares (``found``: name, ONNX Runtime type like ``tensor(float)``,
    shape with ints, names or None), or None. Checked: names, dtypes, ranks, static sizes, and the
    axes the runtime acts on by name (a manifest that moved ``users`` would make the runtime cut
    per-user state along the wrong axis)."""
    got = {name: (typ, shape) for name, typ, shape in found}
    names = [s.name for s in specs]
    if sorted(names) != sorted(got):
        return f"its {what} are {sorted(names)} in the manifest, {sorted(got)} in the file"
    for s in specs:
        typ, shape = got[s.name]
        dtype = typ[len("tensor("):-1] if typ.startswith("tensor(") else typ
        dtype = _ORT_TYPES.get(dtype, dtype)
        bad = dtype != s.dtype or len(shape) != len(s.shape)
        for want, have in zip(s.shape, shape):
            static = isinstance(have, int) and not isinstance(have, bool)
            bad = bad or (static and want != have) or (
                (want in RUNTIME_AXES or have in RUNTIME_AXES) and want != have)
        if bad:
            return (f"{what[:-1]} {s.name!r} is {s.dtype}{list(s.shape)} in the manifest, "
                    f"{dtype}{list(shape)} in the file")
    return None


def _tables(c: Check, root: Path, value: Any, inputs: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Externalized tables (``externalize-embeddings``, docs/tables.md): each entry's shape, dtypes,
    partitions and part paths (the path rule, under ``tables/<name>/``), and the id inputs it serves;
    returns the rows inputs they add, which segments may read like model inputs."""
    from mixexport.tables.layout import DTYPES, MAX_PARTITIONS, NAME

    added: dict[str, dict[str, Any]] = {}
    names: set[str] = set()
    for k, t in enumerate(c.array(value if value is not None else [], "tables")):
        where = f"tables[{k}]"
        t = c.obj(t, where)
        for key in ("name", "rows", "dim", "dtype", "graph_dtype", "partitions", "inputs", "parts", "version"):
            c.key(t, key, where)
        name = c.ident(t["name"], f"{where}.name")
        if not NAME.fullmatch(name) or name in names:
            raise c.fail(f"{where}.name", f"is {short(name)}: expected a unique name of letters, digits and _")
        names.add(name)
        rows = c.integer(t["rows"], f"{where}.rows", lo=1, hi=2**62)
        c.integer(t["dim"], f"{where}.dim", lo=1)
        c.choice(t["dtype"], f"{where}.dtype", DTYPES)
        c.choice(t["graph_dtype"], f"{where}.graph_dtype", ("float32", "float16", "bfloat16"))
        parts = c.integer(t["partitions"], f"{where}.partitions", lo=1, hi=MAX_PARTITIONS)
        if t.get("padding_idx") is not None:
            c.integer(t["padding_idx"], f"{where}.padding_idx", hi=rows - 1)
        if not isinstance(t["version"], str) or not _HEX64.fullmatch(t["version"]):
            raise c.fail(f"{where}.version", f"must be a sha256, found {short(t['version'])}")
        total = 0
        for j, part in enumerate(c.array(t["parts"], f"{where}.parts", lo=parts)):
            part = c.obj(part, f"{where}.parts[{j}]")
            total += c.integer(c.key(part, "rows", f"{where}.parts[{j}]"), f"{where}.parts[{j}].rows", hi=2**62)
            for key in ("file", "ids", "scale"):
                rel = part.get(key)
                if rel is None and key == "scale" and t["dtype"] != "int8":
                    continue
                c.name(rel, f"{where}.parts[{j}].{key}", longest=4096)
                if not rel.startswith(f"tables/{name}/"):
                    raise c.fail(f"{where}.parts[{j}].{key}", f"is {short(rel)}, expected a file under tables/{name}/")
                resolve_inside(root, rel, f"{where}.parts[{j}].{key}")
        if len(t["parts"]) != parts or total != rows:
            raise c.fail(f"{where}.parts", f"holds {len(t['parts'])} parts of {total} rows, expected {parts} of {rows}")
        for j, use in enumerate(c.array(t["inputs"], f"{where}.inputs", lo=1)):
            use = c.obj(use, f"{where}.inputs[{j}]")
            source = inputs.get(c.name(c.key(use, "input", f"{where}.inputs[{j}]"), f"{where}.inputs[{j}].input"))
            if source is None:
                raise c.fail(f"{where}.inputs[{j}].input", f"is {short(use['input'])}, not a model input")
            if use.get("column") is not None:
                c.integer(use["column"], f"{where}.inputs[{j}].column", hi=len(source["shape"]))
            for i, off in enumerate(c.array(use.get("offsets") or [0], f"{where}.inputs[{j}].offsets", lo=1)):
                c.integer(off, f"{where}.inputs[{j}].offsets[{i}]", hi=2**62)
            spec = c.spec(c.key(use, "rows_input", f"{where}.inputs[{j}]"), f"{where}.inputs[{j}].rows_input")
            if spec["name"] in inputs or spec["name"] in added or spec["role"] != source["role"]:
                raise c.fail(f"{where}.inputs[{j}].rows_input", f"{short(spec['name'])} must be a new name with "
                                                                f"the role of {source['name']!r}")
            added[spec["name"]] = spec
    return added
