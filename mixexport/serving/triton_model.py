"""Triton python-backend model serving a mixexport bundle through :class:`mixexport.runtime.Runtime`.

``mixexport triton --flavour python`` copies this file as ``<model>/1/model.py`` beside the bundle
(``<model>/1/bundle/``). It runs inside Triton's python-backend stub, whose interpreter must import
mixexport, numpy and onnxruntime (start ``tritonserver`` with that environment's ``bin`` first on
``PATH``). It is not imported by mixexport itself: ``triton_python_backend_utils`` exists only there.

Per request: the user inputs (U rows), the item inputs and ``user_index`` (N rows), and an optional
``user_id`` (U strings; ``mixexport_user_id`` when the model has a ``user_id`` input of its own) that
keys the per-user caches (user state; KV caches, extended by appends).
The runtime checks every input against the manifest; a request it refuses gets an error response
(``error: … hint: …``) and the other requests of the batch are still answered. Cache hits and
misses are counted in the ``mixexport_cache_total`` family on Triton's metrics endpoint.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from mixexport.errors import MixexportError
from mixexport.runtime import Runtime
from mixexport.specs import Request

USER_ID = "user_id"
USER_INDEX = "user_index"
CACHE_KINDS = ("user_hit", "user_miss", "kv_hit", "kv_append", "kv_miss")


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        # "mixexport_user_id" when the model has its own user_id input (mixexport.serving.triton.user_id_input)
        self.user_id_input = params.get("user_id_input", USER_ID)
        # the pinned manifest sha256, then every file's against it, before any session is created
        self.runtime = Runtime.open(bundle, manifest_sha256=params["manifest_sha256"],
                                    cache_bytes=int(params.get("cache_bytes", "268435456")),
                                    tables=params.get("tables") or None)
        self.user_names = [s.name for s in self.runtime.inputs if s.user_side]
        self.item_names = [s.name for s in self.runtime.inputs if not s.user_side]
        self.output_names = [s.name for s in self.runtime.outputs]
        # the family must outlive its metrics: kept on self, dropped after them in finalize
        self.family = family = pb_utils.MetricFamily(name="mixexport_cache_total",
                                       description="mixexport per-user cache lookups by kind",
                                       kind=pb_utils.MetricFamily.COUNTER)
        self.metrics = {k: family.Metric(labels={"model": args["model_name"], "kind": k}) for k in CACHE_KINDS}
        self.logger = pb_utils.Logger

    def _counts(self) -> dict[str, int]:
        rt = self.runtime
        return {"user_hit": rt.cache.stats.hits, "user_miss": rt.cache.stats.misses,
                "kv_hit": rt.kv_stats["hits"], "kv_append": rt.kv_stats["appends"], "kv_miss": rt.kv_stats["misses"]}

    def _request(self, request: Any) -> Request:
        def get(name: str) -> np.ndarray:
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        ids = pb_utils.get_input_tensor_by_name(request, self.user_id_input)
        user_ids = None
        if ids is not None:
            user_ids = tuple(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                             for v in ids.as_numpy().reshape(-1))
        return Request(user={n: get(n) for n in self.user_names}, item={n: get(n) for n in self.item_names},
                       user_index=get(USER_INDEX), user_ids=user_ids)

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = []
        for request in requests:
            try:
                before = self._counts()
                out = self.runtime.score(self._request(request))
                for kind, n in self._counts().items():
                    if n > before[kind]:
                        self.metrics[kind].increment(n - before[kind])
                tensors = [pb_utils.Tensor(n, np.ascontiguousarray(out[n])) for n in self.output_names]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except MixexportError as e:  # the request's fault: one line, as the CLI prints it
                message = f"error: {e.message}" + (f" hint: {e.hint}" if e.hint else "")
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(message, invalid=True)))
            except Exception:  # noqa: BLE001 - a bug: answer this request, log the traceback, keep serving
                self.logger.log_error(traceback.format_exc())
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=_error("internal error in mixexport (a bug; the server log has the "
                                                    "traceback)", invalid=False)))
        return responses

    def finalize(self) -> None:
        self.runtime.close()
        self.metrics.clear()
        self.family = None


def _error(message: str, invalid: bool) -> Any:
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
