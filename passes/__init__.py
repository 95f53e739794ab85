"""Graph passes. One pass per module, named ``verb_object``; the module's function of the same name
is the pass, and its ``PASS`` describes it to the pipeline (name in kebab case for the CLI, stage,
options type, pre- and postcondition checks). The pass table — every pass in pipeline order — is
the one tuple :data:`mixexport.passes.order.ORDER`; there is no registry.

The contract (enforced by :func:`mixexport.pipeline.run_pass`, as onnx-ir's ``PassBase.__call__``
does): ``requires(bundle)`` → ``run(bundle, options)`` → ``ensures(before, after, options)``, each
once.

- ``requires`` raises :class:`~mixexport.errors.PreconditionError` saying what was expected and
  found: the pass does not apply to this model (exit 2).
- ``run`` returns ``PassResult(bundle, report)`` and is pure: it never mutates its input bundle
  (one test over the pass table checks every pass).
- ``ensures`` checks the result against the input and raises
  :class:`~mixexport.errors.PostconditionError` (a check failed, exit 1); what it measured (a dict,
  or None) is added to the pass's report.
- Any other exception becomes :class:`~mixexport.errors.PassError`, naming the pass and the passes
  that ran before it.

Options are frozen dataclasses that validate their values at construction (``__post_init__``), so a
misspelled ``--option`` fails before anything is exported.

This module stays light (no torch): the pass modules import their contract types from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from mixexport.bundle import Bundle


@dataclass(frozen=True)
class PassResult:
    bundle: Bundle
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassInfo:
    name: str                                  # kebab case, as the CLI spells it
    stage: str                                 # "program" (torch.export graph) or "onnx"
    run: Callable[[Bundle, Any], PassResult]
    options: type                              # frozen dataclass of documented options
    requires: Callable[[Bundle], None] | None = None
    #: (input bundle, result bundle, options) → measurements for the report, or None; raises
    #: PostconditionError when the result is wrong
    ensures: Callable[[Bundle, Bundle, Any], dict[str, Any] | None] | None = None

    @property
    def doc(self) -> str:
        return (self.run.__doc__ or "").strip()
