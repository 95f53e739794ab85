"""Reading untrusted ``torch.export`` archives (``.pt2``): ``archive`` (read once, check the zip,
rebuild it from checked members), ``pickles`` (weights-only unpickling of every pickle stream),
``exprs`` (the symbolic-shape strings torch would ``eval``)."""

from __future__ import annotations

from mixexport.pt2.archive import LoadedProgram, check_archive, is_pt2, load_program

__all__ = ["LoadedProgram", "check_archive", "is_pt2", "load_program"]
