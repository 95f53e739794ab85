"""The eager reference: the original PyTorch model (from the checkpoint, or the ``.pt2``'s module)
run on flat (user, item) rows. It is the ground truth every parity check compares against."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.source import Source


class EagerSession(SessionBase):
    def __init__(self, source: Source) -> None:
        self.source = source

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.source.reference(feeds)


class EagerBackend:
    name = "eager"

    def unavailable_reason(self) -> str | None:
        return None

    def prepare_reference(self, source: Source) -> EagerSession:
        return EagerSession(source)

    def describe(self) -> dict[str, Any]:
        import torch

        return {"backend": self.name, "torch": torch.__version__, "threads": torch.get_num_threads()}


class ProgramSession(SessionBase):
    """A program-stage segment (a ``torch.export`` program) run eagerly in torch: how the stage
    ledger measures the error a program pass adds before any ONNX exists."""

    def __init__(self, program: Any, output_names: list[str]) -> None:
        self.module = program.module()
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            out = self.module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.detach().numpy() for n, o in zip(self.output_names, outs)}
