"""The eager reference: the original PyTorch model (from the checkpoint, or the ``.pt2``'s module)
run on flat (user, item) rows. It is the ground truth every parity check compares against."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from mixexport.backends.base import SessionBase
from mixexport.source import Source


class EagerSession(SessionBase):
    def __init__(self, source: Source) -> None:
        from mixexport.pages import MappedWeights

        self.source = source
        # a memory-mapped checkpoint (>= 1 GiB): the pages each call touched go back to the kernel,
        # so scoring a few thousand random ids of a 4 GB table does not leave GBs resident
        self.mapped = MappedWeights(source.module, source.path) if source.kind == "checkpoint" else None

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_open()
        try:
            return self.source.reference(feeds)
        finally:
            if self.mapped is not None:
                self.mapped.release()

    def close(self) -> None:
        """Drop the session's reference to the source (the model itself belongs to the caller)."""
        self.source = None  # type: ignore[assignment]
        super().close()


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
    ledger measures the error a program pass adds before any ONNX exists, and how passes run the
    segments they build. Inputs are cast to the program's input dtypes; bfloat16 outputs come back
    as float32 (numpy has no bfloat16)."""

    def __init__(self, program: Any, output_names: list[str]) -> None:
        self.module = program.module()
        self.output_names = output_names
        self.dtypes = {n.name: n.meta["val"].dtype for n in program.graph.nodes
                       if n.op == "placeholder" and "val" in n.meta}

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        self._check_open()
        args = {}
        for k, v in feeds.items():
            t = torch.from_numpy(np.ascontiguousarray(v))
            args[k] = t.to(self.dtypes[k]) if k in self.dtypes else t
        with torch.inference_mode():
            out = self.module(**args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return {n: (o.float() if o.dtype == torch.bfloat16 else o).detach().numpy()
                for n, o in zip(self.output_names, outs)}

    def close(self) -> None:
        """Release the unlifted module (its own copy of the program's graph and weights)."""
        self.module = None
        super().close()
