"""Graph passes. One pass per module, named ``verb_object``; the module's function of the same name
is the pass, and its ``PASS`` describes it to the pipeline (name in kebab case for the CLI,
stage, options type, precondition check). The default order is one tuple in
``mixexport.pipeline``; there is no registry.

A pass is ``run(bundle, options) -> PassResult(bundle, report)`` and is pure: it never mutates its
input bundle (each pass has a test that checks). ``requires(bundle)`` raises
:class:`~mixexport.errors.PreconditionError` saying what was expected and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mixexport.bundle import Bundle


@dataclass(frozen=True)
class PassResult:
    bundle: Bundle
    report: dict[str, Any] = field(default_factory=dict)
    changed: bool = True


@dataclass(frozen=True)
class PassInfo:
    name: str                                  # kebab case, as the CLI spells it
    stage: str                                 # "program" (torch.export graph) or "onnx"
    run: Callable[[Bundle, Any], PassResult]
    options: type                              # frozen dataclass of documented options
    requires: Callable[[Bundle], None] | None = None

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip()
