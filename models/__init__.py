"""Reference model families and mixexport checkpoints.

A family is one module in this package with: ``FAMILY`` (its name), ``Config`` (a frozen
dataclass whose ``schema`` field is a :class:`FeatureSchema`), ``Model`` (a
:class:`RankingModel`), ``tiny()`` / ``base()`` configs and ``DEFAULT_PASSES`` (a family whose defaults depend on the
config also defines ``default_passes(config)``, see :func:`default_passes`). Adding a family
means adding its file and one entry in :data:`FAMILIES`.

What each family computes, the choices where its paper is silent and the structure each pass relies
on: ``docs/models.md``.

A checkpoint is a ``torch.save`` dict ``{format, family, config, state_dict, metadata}``, loaded
with ``torch.load(weights_only=True)``: loading never unpickles code.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mixexport.errors import BadInputError

from . import hyformer, longer, mixformer, msn, pyramid_mixer, rankmixer, rankmixer_moe, tokenmixer_large, ugsep
from .common import FeatureSchema, RankingModel, config_from_dict, config_to_dict, random_feeds

CHECKPOINT_FORMAT = "mixexport.ckpt/1"
#: checkpoints at least this large are memory-mapped (``torch.load(mmap=True)``) and the model is
#: built on the meta device, its weights assigned from the mapping: a table of many GB is never
#: whole in RAM (externalize-embeddings then writes it out chunk by chunk; docs/tables.md)
MMAP_BYTES = 1 << 30
FAMILIES: dict[str, ModuleType] = {m.FAMILY: m for m in (rankmixer, ugsep, longer, rankmixer_moe, tokenmixer_large,
                                                            mixformer, pyramid_mixer, msn, hyformer)}

__all__ = ["CHECKPOINT_FORMAT", "FAMILIES", "Checkpoint", "FeatureSchema", "RankingModel",
           "create_model", "default_passes", "family_module", "load_checkpoint", "random_feeds", "save_checkpoint"]


def family_module(name: str) -> ModuleType:
    try:
        return FAMILIES[name]
    except KeyError:
        raise BadInputError(f"unknown model family {name!r}; known families: {', '.join(FAMILIES)}",
                            "train a model of a known family, or export your own with "
                            "torch.export.save and build the .pt2") from None


def default_passes(family: str, config: Any) -> tuple[str, ...]:
    """The passes ``build`` runs for a model of ``family`` when ``--passes`` is not given: the
    family's ``default_passes(config)`` where it has one (mixformer: ``split-user-item`` only for
    UI-MixFormer), else its ``DEFAULT_PASSES``."""
    mod = family_module(family)
    pick = getattr(mod, "default_passes", None)
    return tuple(pick(config) if pick is not None else mod.DEFAULT_PASSES)


def create_model(family: str, config: Any | None = None) -> RankingModel:
    """A fresh model of ``family``; ``config`` is a Config, a dict, or None for ``tiny()``."""
    mod = family_module(family)
    if config is None:
        config = mod.tiny()
    elif not isinstance(config, mod.Config):
        config = config_from_dict(mod.Config, config)
    return mod.Model(config)


@dataclass(frozen=True)
class Checkpoint:
    model: RankingModel
    family: str
    config: dict[str, Any]
    metadata: dict[str, Any]


def save_checkpoint(model: RankingModel, path: str | os.PathLike[str],
                    metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a mixexport checkpoint (atomically: temp file then rename)."""
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "family": model.family,
               "config": config_to_dict(model.config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "metadata": dict(metadata or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load a mixexport checkpoint safely; every problem is a one-line :class:`BadInputError`."""
    path = Path(path)
    big = path.is_file() and path.stat().st_size >= MMAP_BYTES
    payload = _read_payload(path, mmap=big)
    fmt = payload.get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise BadInputError(f"{path}: expected checkpoint format {CHECKPOINT_FORMAT!r}, found {fmt!r}",
                            "save it with mixexport.models.save_checkpoint (or build a "
                            "torch.export .pt2 of your own model)")
    missing = [k for k in ("family", "config", "state_dict") if k not in payload]
    if missing:
        raise BadInputError(f"{path}: checkpoint is missing keys {missing}",
                            "save it with mixexport.models.save_checkpoint")
    family = payload["family"]
    mod = family_module(family) if isinstance(family, str) else family_module(repr(family))
    try:
        config = config_from_dict(mod.Config, payload["config"])
    except (ValueError, TypeError) as e:
        raise BadInputError(f"{path}: invalid {family} config: {e}",
                            f"compare with {family}.tiny() in mixexport.models") from None
    with torch.device("meta" if big else "cpu"):
        model = mod.Model(config)
    state = payload["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInputError(f"{path}: state_dict must map names to tensors",
                            "save it with mixexport.models.save_checkpoint")
    state = _check_state(path, model, state)
    model.load_state_dict(state, strict=True, assign=big)
    if big and any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = mod.Model(config)  # a tensor the checkpoint does not hold was built on meta: build it for real
        model.load_state_dict(state, strict=True)
    model.eval()
    metadata = payload.get("metadata") or {}
    return Checkpoint(model=model, family=family, config=config_to_dict(config), metadata=dict(metadata))


def _read_payload(path: Path, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise BadInputError(f"checkpoint {path} does not exist or is not a file",
                            "check the path")
    if path.stat().st_size == 0:
        raise BadInputError(f"checkpoint {path} is empty (0 bytes)", "re-save the checkpoint")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save's zip archive; anything else is not ours
            raise BadInputError(f"{path}: not a readable torch checkpoint (expected a torch.save zip "
                                "archive)", "save it with mixexport.models.save_checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe content"
        raise BadInputError(f"{path}: refused to load: it holds objects other than tensors and "
                            f"plain data ({first[:160]})",
                            "mixexport never unpickles code; re-save with "
                            "mixexport.models.save_checkpoint") from None
    except Exception as e:  # noqa: BLE001 - a corrupt archive raises RuntimeError, TypeError (a negative
        # storage size), EOFError, BadZipFile, ...: every one is bad input, none a bug of ours
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
                            f"{first[:160]}", "re-save the checkpoint") from None
    if not isinstance(payload, dict):
        raise BadInputError(f"{path}: expected a checkpoint dict, found {type(payload).__name__}",
                            "save it with mixexport.models.save_checkpoint")
    return payload


def _check_state(path: Path, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` checked against the model's names, shapes and dtypes, with the lossless widenings
    done here (so that ``load_state_dict(assign=True)`` gets them too); other tensors untouched."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        raise BadInputError(f"{path}: state_dict keys do not match the config: {'; '.join(parts)}",
                            "the checkpoint's config and weights come from different models")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise BadInputError(f"{path}: weight {name!r} has shape {tuple(state[name].shape)}, the "
                                f"config expects {tuple(tensor.shape)}",
                                "the checkpoint's config and weights come from different models")
        found, want = state[name].dtype, tensor.dtype
        if found != want and want not in _LOSSLESS_TO.get(found, ()):
            # load_state_dict would cast in silence: float64 rounds, complex drops its imaginary part
            raise BadInputError(f"{path}: weight {name!r} has dtype {str(found).replace('torch.', '')}, the "
                                f"{type(model).__module__.rsplit('.', 1)[-1]} family declares "
                                f"{str(want).replace('torch.', '')}; mixexport casts only losslessly "
                                "(float16/bfloat16 to float32, narrower ints to int64)",
                                f"cast the weights to {str(want).replace('torch.', '')} before saving "
                                "(model.float()), after checking that nothing is lost")
        if state[name].layout != torch.strided:
            raise BadInputError(f"{path}: weight {name!r} is a {state[name].layout} tensor, expected a dense one",
                                "save dense weights (tensor.to_dense())")
    return {k: v if v.dtype == expected[k].dtype else v.to(expected[k].dtype) for k, v in state.items()}


# dtype -> the dtypes it widens to without losing a value (float16/bfloat16 fit in float32 exactly)
_LOSSLESS_TO: dict[torch.dtype, tuple[torch.dtype, ...]] = {
    torch.float16: (torch.float32, torch.float64),
    torch.bfloat16: (torch.float32, torch.float64),
    torch.float32: (torch.float64,),
    torch.int8: (torch.int16, torch.int32, torch.int64),
    torch.uint8: (torch.int16, torch.int32, torch.int64),
    torch.int16: (torch.int32, torch.int64),
    torch.int32: (torch.int64,),
}
