"""Pages of a memory-mapped checkpoint go back to the kernel; anonymous memory is never touched."""

from __future__ import annotations

from pathlib import Path

import torch

from mixexport.pages import MappedWeights, mapped_tensors, page_out


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 1e6


def test_only_views_of_the_file_are_found(tmp_path: Path) -> None:
    torch.save({"w": torch.randn(70_000, 64), "b": torch.randn(8)}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", mmap=True, weights_only=True)
    in_ram = torch.randn(70_000, 64)
    found = mapped_tensors([loaded["w"], loaded["b"], in_ram], tmp_path / "m.pt", min_bytes=1024)
    assert [t.data_ptr() for t in found] == [loaded["w"].data_ptr()]  # "b" is below min_bytes, in_ram anonymous
    module = torch.nn.Linear(64, 70_000, bias=False)
    module.weight = torch.nn.Parameter(loaded["w"], requires_grad=False)
    assert len(MappedWeights(module, tmp_path / "m.pt").tensors) == 1
    assert MappedWeights(module, tmp_path / "other.pt").tensors == []


def test_page_out_releases_touched_pages_and_keeps_the_data(tmp_path: Path) -> None:
    rows = torch.randn(400_000, 64)  # 102 MB
    torch.save({"w": rows}, tmp_path / "m.pt")
    w = torch.load(tmp_path / "m.pt", mmap=True, weights_only=True)["w"]
    total = float(w.double().sum())
    touched = _resident_mb()
    page_out(w)
    assert touched - _resident_mb() > 50  # most of the 102 MB left the process
    assert float(w.double().sum()) == total and torch.equal(w[123], rows[123])  # re-read from the file
