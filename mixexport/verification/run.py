"""``verify`` and ``bench`` on a bundle directory (they read only the bundle, plus the original
checkpoint as the eager reference)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mixexport.bundle import Manifest, check_integrity, read_manifest
from mixexport.data import MOVIELENS, Split, load_npz_split, movielens_100k, movielens_available
from mixexport.errors import BadInputError, GateFailedError
from mixexport.runtime import Runtime
from mixexport.source import Source, load_source
from mixexport.specs import Request, check_feeds, random_ids
from mixexport.tables.open import store_stats
from mixexport.verification.compare import Tolerance, compare_outputs, gate_precision, resolve_tolerances
from mixexport.verification.int8 import int8_survival
from mixexport.verification.latency import DEFAULT_CANDIDATES, machine_info, summarize, time_interleaved
from mixexport.verification.metrics import metric_parity
from mixexport.verification.variation import gate_status, mark_tensor_gate

#: (users, candidates) of the generated requests checked besides the bundle's sample request.
PARITY_REQUESTS = ((1, 1), (1, 7), (3, 7), (1, 256), (3, 256))
#: |ΔAUC| gate per precision (RankMixer calls 1e-4 absolute significant).
AUC_GATE = {"fp32": 1e-4, "fp16": 1e-3, "bf16": 1e-3, "w8a16": 1e-3, "int8": 1e-3}
#: Smallest mean per-request Kendall tau (bundle vs eager ranking of each request's candidates) per
#: precision, where one is gated: int8 and bf16 round every GEMM input (bf16 keeps 8 bits of
#: mantissa), so ranking agreement is checked too.
TAU_GATE = {"bf16": 0.98, "int8": 0.98}
Progress = Callable[[str], None]


def load_reference(manifest: Manifest, checkpoint: str | Path | None = None) -> Source:
    """The eager reference the bundle was built from (its sha256 must match the manifest's)."""
    src = manifest.source
    path = Path(checkpoint) if checkpoint else Path(src["path"])
    if not path.is_file():
        raise BadInputError(f"the reference model {path} recorded in the bundle is not there",
                            "pass --checkpoint PATH (the file the bundle was built from)")
    source = load_source(path, roles=manifest.data["model"].get("roles") or None)
    if source.sha256 != src["sha256"]:
        raise BadInputError(f"{path} is not the model this bundle was built from (sha256 "
                            f"{source.sha256[:12]}…, bundle expects {src['sha256'][:12]}…)",
                            "pass the original checkpoint with --checkpoint, or rebuild the bundle")
    return source


def _labelled_split(source: Source, data: str | Path | None) -> tuple[Split | None, str]:
    if data is not None:
        split = load_npz_split(data, source.inputs)
        check_feeds(source.inputs, split.feeds, what=f"--data {data}: input")  # bad ids: refused before eager runs
        return split, str(data)
    if source.dataset == MOVIELENS:
        reason = movielens_available()
        if reason:
            return None, f"{reason} (pip install --no-deps recbole==1.2.1)"
        schema = source.module.config.schema  # type: ignore[union-attr]
        ds = movielens_100k(seq_len=schema.seq_len, behaviour_len=schema.behaviour_len)
        if ds.schema != schema:
            raise BadInputError(f"the model's feature schema {schema} differs from MovieLens-100k's {ds.schema}",
                                "pass the data the model was trained on with --data")
        return ds.test, f"{MOVIELENS} test split"
    return None, "no labelled data: the model was not trained on a known dataset (pass --data FILE.npz)"


def execution_plan(manifest: Manifest, backend: str | None, device: str) -> tuple[str | None, str, dict[str, Any] | None]:
    """(backend, device, engines note) that verify and bench run ``manifest`` with.

    An explicit ``backend`` is used as given (exit 3 when it cannot run here). Otherwise the
    manifest's; when that is a TensorRT-family backend whose engines cannot execute on this machine
    (no GPU, or not one of the compute capabilities they were built for), the same segments' ONNX
    runs on ONNX Runtime CPU and the note says plainly that the engines were not executed — they are
    never reported as checked.
    """
    from mixexport.backends import BACKENDS

    if backend is not None:  # as asked; TensorRT engines run on CUDA only, whatever --device says
        return backend, "cuda" if hasattr(BACKENDS.get(backend), "engines_unavailable_reason") else device, None
    names = {s.backend for s in manifest.segments}
    cls = BACKENDS.get(next(iter(names))) if len(names) == 1 else None
    if cls is None or not hasattr(cls, "engines_unavailable_reason"):
        return backend, device, None
    reason = cls(device="cuda").engines_unavailable_reason(manifest)
    if reason is None:
        return None, "cuda", {"executed": True, "backend": cls.name}
    return "onnxruntime", "cpu", {"executed": False, "backend": cls.name, "reason": reason,
                                  "checked_instead": "the bundle's ONNX segments on ONNX Runtime CPU"}


def engine_int8(manifest: Manifest) -> dict[str, Any]:
    """The int8-in-the-engine checks recorded at build (engine bytes vs the float twin's), by segment."""
    return {s["name"]: s["engine_build"]["int8"] for s in manifest.data.get("segments", [])
            if isinstance(s, dict) and isinstance(s.get("engine_build"), dict) and "int8" in s["engine_build"]}


def verify_bundle(bundle: str | Path | Manifest, *, checkpoint: str | Path | None = None,
                  backend: str | None = None, device: str = "cpu", data: str | Path | None = None,
                  metrics: bool = True, atol: dict[str, float] | None = None,
                  rtol: dict[str, float] | None = None, integrity: bool = True,
                  progress: Progress | None = None, tables: str | None = None) -> dict[str, Any]:
    """Tensor parity on the sample and generated requests, metric parity on labelled data.
    ``tables``: the table store of a bundle with externalized tables (``Runtime.open``'s)."""
    say = progress or (lambda _msg: None)
    manifest = bundle if isinstance(bundle, Manifest) else read_manifest(bundle)
    if integrity:
        say("checking file hashes")
        check_integrity(manifest)
    source = load_reference(manifest, checkpoint)
    backend, device, engines = execution_plan(manifest, backend, device)
    if engines and not engines["executed"]:
        say(engines["reason"])
    precision = manifest.data.get("precision", "fp32")
    held, per, default = bundle_tolerances(manifest, atol, rtol)
    sample = dict(np.load(manifest.file("inputs/sample.npz"), allow_pickle=False))
    requests = [("sample", Request.from_npz_dict(sample))]
    requests += [(f"{u}user x {n}", source.example_request(u, n, seed=100 + i))
                 for i, (u, n) in enumerate(PARITY_REQUESTS)]
    tensor, failures = [], []
    with Runtime.open(manifest, backend, device, tables=tables) as rt, Runtime.reference(source) as ref:
        for label, req in requests:
            say(f"tensor parity: {label}")
            res = compare_outputs(rt.score(req), ref.score(req), per, default)
            tensor.append({"request": label, "users": req.num_users, "candidates": req.num_candidates,
                           "outputs": [r.to_json() for r in res], "passed": all(r.passed for r in res)})
            failures += [f"{label}: {r.line()}" for r in res if not r.passed]
        say("cache checks")
        cache_report = _cache_checks(manifest, source, rt, ref, per, default)
        failures += [f"cache {c['check']}: {c['detail']}" for c in cache_report if not c["passed"]]
        metric_report = _metrics(source, rt, data, held, say) if metrics else {
            "status": "skipped", "reason": "disabled with --no-metrics"}
    if metric_report.get("status") == "FAIL":
        failures.append(metric_report["gate"]["message"])
    variation = mark_tensor_gate(source.inputs, [r for _, r in requests], tensor, metric_report)
    if variation is not None and variation["blocks_pass"]:  # constant ids alone never PASS
        failures.append(variation["message"])
    say("int8 survival")
    try:  # {"status": "skipped"} for bundles without int8 weights
        int8 = int8_survival(manifest, device=device)
    except GateFailedError as e:
        int8 = {"status": "FAIL", "failures": e.message.splitlines()[1:]}
        failures.append(e.message)
    in_engines = engine_int8(manifest)
    if in_engines:
        int8["engines"] = in_engines
        failures += [f"segment {k}: int8 weights folded to float in the engine ({v['engine_bytes']} B vs "
                     f"float twin {v['float_engine_bytes']} B)" for k, v in in_engines.items() if v["status"] == "FAIL"]
    worst = max((o["max_rel"] for t in tensor for o in t["outputs"]), default=0.0)
    return {"status": gate_status(failures, variation), "backend": rt.name, "device": device,
            "precision": precision, **({"gate_precision": held} if held != precision else {}), "max_rel": worst,
            "tolerances": {n: {"rtol": t.rtol, "atol": t.atol} for n, t in per.items()},
            "tensor": tensor, "cache": cache_report, "metrics": metric_report, "int8": int8,
            **({"engines": engines} if engines else {}), **({"variation": variation} if variation else {}),
            "failures": failures}


def _cache_checks(manifest: Manifest, source: Source, rt: Runtime, ref: Runtime, per: dict[str, Tolerance],
                  default: Tolerance) -> list[dict[str, Any]]:
    """For bundles with per-user caches: a cache hit scores exactly like the miss that filled it, and
    (appendable caches) a window extended by new behaviours scores like the eager model on it."""
    roles = {s.role for s in manifest.segments}
    if not roles & {"user", "cache"}:
        return []
    out = []
    req = source.example_request(2, 9, seed=321)
    req = Request(user=req.user, item=req.item, user_index=req.user_index, user_ids=("verify-u0", "verify-u1"))
    first = rt.score(req)
    second = rt.score(req)
    same = all(np.array_equal(first[k], second[k]) for k in first)
    out.append({"check": "hit equals miss", "passed": same,
                "detail": "identical outputs" if same else "a cached user scored differently from the fresh one"})
    for spec in manifest.data.get("caches", []):
        if not spec.get("appendable"):
            out.append({"check": f"{spec['name']} append", "passed": True, "detail": "not appendable: skipped"})
            continue
        seq, k = spec["input"], int(spec["items_per_position"])
        window = req.user[seq]
        m = min(2 * k, (window.shape[1] // k - 1) * k)  # an append keeps at least one position
        if m <= 0:
            out.append({"check": f"{spec['name']} append", "passed": True,
                        "detail": "the sample window holds one position, none to keep: skipped"})
            continue
        seq_spec = next(s for s in source.inputs if s.name == seq)
        new_items = random_ids(seq_spec, (window.shape[0], m), np.random.default_rng(5))
        user = dict(req.user)
        user[seq] = np.ascontiguousarray(np.concatenate([window[:, m:], new_items], axis=1))
        appended = Request(user=user, item=req.item, user_index=req.user_index, user_ids=req.user_ids)
        before = rt.kv_stats["appends"]
        res = compare_outputs(rt.score(appended), ref.score(appended), per, default)
        used = rt.kv_stats["appends"] - before
        ok = all(r.passed for r in res) and used == window.shape[0]
        out.append({"check": f"{spec['name']} append", "passed": ok, "appended_items": m,
                    "appends_used": used, "outputs": [r.to_json() for r in res],
                    "detail": f"{m} new items per user appended ({used} incremental updates); "
                              + "; ".join(r.line() for r in res)})
    return out


def bundle_tolerances(manifest: Manifest, atol: dict[str, float] | None = None,
                      rtol: dict[str, float] | None = None) -> tuple[str, dict[str, Tolerance], Tolerance]:
    """(gate precision, per-output tolerances, default) a bundle is verified at: its precision's,
    loosened to the row dtypes of its externalized tables, the manifest's own ``tolerance`` where it
    records one, and the user's ``--atol/--rtol`` over all of them."""
    held = gate_precision(manifest.data.get("precision", "fp32"),
                          [t.get("dtype", "float32") for t in manifest.data.get("tables") or []])
    tol = manifest.data.get("tolerance")
    family = (float(tol["rtol"]), float(tol["atol"])) if isinstance(tol, dict) else None
    per, default = resolve_tolerances([s.name for s in manifest.outputs], held, atol or {}, rtol or {}, family)
    return held, per, default


def _metrics(source: Source, rt: Runtime, data: str | Path | None, precision: str,
             say: Progress) -> dict[str, Any]:
    split, name = _labelled_split(source, data)
    if split is None:
        return {"status": "skipped", "reason": name}
    say(f"metric parity: reference on {len(split)} rows of {name}")
    first = source.outputs[0].name
    ref = source.reference(split.feeds)[first].reshape(len(split), -1)[:, 0]
    cand = np.empty_like(ref)
    requests = split.requests(source.inputs)
    say(f"metric parity: bundle on {len(requests)} requests")
    for req in requests:
        cand[req.meta["rows"]] = rt.score(req)[first].reshape(req.num_candidates, -1)[:, 0]
    report = metric_parity(split.label, ref, cand, [r.meta["rows"] for r in requests])
    gate = AUC_GATE.get(precision, AUC_GATE["fp32"])
    delta = abs(report["auc"]["delta"])
    ok = bool(delta <= gate)
    message = f"|ΔAUC| {delta:.3g} {'<=' if ok else '>'} {gate:g} on {name}"
    gates: dict[str, Any] = {"max_abs_delta_auc": gate}
    if precision in TAU_GATE:
        tau, need = report["ranking"]["kendall_tau_mean"], TAU_GATE[precision]
        tau_ok = bool(tau >= need)  # NaN (no request with two candidates) fails
        ok = ok and tau_ok
        gates["min_kendall_tau_mean"] = need
        message += f"; mean Kendall tau {tau:.4f} {'>=' if tau_ok else '<'} {need:g}"
    report.update(dataset=name, status="PASS" if ok else "FAIL", output=f"{first}[:, 0]",
                  gate={**gates, "passed": ok, "message": message})
    return report


def bench_bundle(bundle: str | Path | Manifest, *, checkpoint: str | Path | None = None,
                 backend: str | None = None, device: str = "cpu",
                 candidates: Sequence[int] = DEFAULT_CANDIDATES, users: int = 1, budget_s: float = 2.0,
                 peers: Sequence[str] = (), compare: Sequence[str | Path] = (), cache_modes: bool = False,
                 seq_len: int | None = None, progress: Progress | None = None,
                 tables: str | None = None) -> dict[str, Any]:
    """p50/p90/p99 per N for eager and the bundle, measured in one run in interleaved rounds.

    ``peers``: other tools on the same model; ``compare``: other bundles of the same model (e.g.
    the unsplit one); ``cache_modes``: for bundles with per-user caches, also time a cache hit
    (same user, warm) and an append (each request adds one position's worth of new behaviours).
    """
    from mixexport.verification.peers import make_peers, unavailable_peers
    from mixexport.verification.split_gain import split_gain

    say = progress or (lambda _msg: None)
    manifest = bundle if isinstance(bundle, Manifest) else read_manifest(bundle)
    source = load_reference(manifest, checkpoint)
    backend, device, engines = execution_plan(manifest, backend, device)
    if engines and not engines["executed"]:
        say(engines["reason"])
    others = [read_manifest(p) for p in compare]
    for other in others:
        if [s.to_json() for s in other.inputs] != [s.to_json() for s in manifest.inputs]:
            raise BadInputError(f"--compare {other.root}: its inputs differ from {manifest.root}'s",
                                "compare bundles built from the same model")
    results = {}
    with Runtime.open(manifest, backend, device, tables=tables) as rt, Runtime.reference(source) as ref, \
            contextlib.ExitStack() as stack:
        other_rts = {f"compare: {o.root.name} ({', '.join(p['name'] for p in o.data['passes']) or 'no passes'})":
                     stack.enter_context(Runtime.open(o, backend, device)) for o in others}
        sample = Request.from_npz_dict(dict(np.load(manifest.file("inputs/sample.npz"), allow_pickle=False)))
        peer_fns = make_peers(peers, source, say, calibration=sample)
        label = f"bundle ({rt.name})"
        for n in candidates:
            sample = source.example_request(users, n, seed=7, seq_len=seq_len)
            # no user ids: every request recomputes its user side (the cache runners reuse it)
            req = Request(user=sample.user, item=sample.item, user_index=sample.user_index)
            say(f"latency: {users} user x {n} candidates")
            fns: dict[str, Callable[[], Any]] = {"eager": lambda r=req: ref.score(r, validate=False),
                                                 label: lambda r=req: rt.score(r, validate=False)}
            fns.update({name: (lambda r=req, o=o: o.score(r, validate=False)) for name, o in other_rts.items()})
            fns.update({name: (lambda r=req, f=f: f(r)) for name, f in peer_fns.items()})
            if cache_modes and {s.role for s in manifest.segments} & {"user", "cache"}:
                fns.update(_cache_runners(rt, manifest, req, label))
            results[n] = time_interleaved(fns, budget_s=budget_s)
        store = store_stats(rt.tables) if tables and rt.tables is not None else None
    return {"users": users, "candidates": list(candidates), "device": device, "machine": machine_info(),
            "seq_len": seq_len, "note": "input validation excluded from timings; the plain bundle runner's "
            "requests carry no user ids (every request recomputes its user side)",
            **({"engines": engines} if engines else {}), **({"tables": store} if store else {}),
            "runners": summarize(results),
            **split_gain(manifest, label, dict(zip(other_rts, others)), summarize(results)),
            **({"peers_unavailable": unavailable_peers(peers)} if unavailable_peers(peers) else {})}


def _cache_runners(rt: Runtime, manifest: Manifest, req: Request, label: str) -> dict[str, Callable[[], Any]]:
    """Runners reusing per-user caches: ``hit`` (same user and history every time) and, for an
    appendable cache, ``append`` (every request slides the history by one new position)."""
    ids = tuple(f"bench-{u}" for u in range(req.num_users))
    hit = Request(user=req.user, item=req.item, user_index=req.user_index, user_ids=ids)
    rt.score(hit, validate=False)
    out: dict[str, Callable[[], Any]] = {f"{label} cache hit": lambda: rt.score(hit, validate=False)}
    spec = next((c for c in manifest.data.get("caches", []) if c.get("appendable")), None)
    if spec is not None:
        seq, k = spec["input"], int(spec["items_per_position"])
        rng = np.random.default_rng(0)
        state = {"user": dict(req.user)}
        vocab = int(np.max(req.user[seq])) + 1

        def append() -> Any:
            window = state["user"][seq]
            new = rng.integers(1, max(vocab, 2), size=(window.shape[0], k))
            state["user"] = {**state["user"], seq: np.ascontiguousarray(np.concatenate([window[:, k:], new], 1))}
            return rt.score(Request(user=state["user"], item=req.item, user_index=req.user_index, user_ids=ids),
                            validate=False)

        out[f"{label} cache append ({k} items)"] = append
    return out
