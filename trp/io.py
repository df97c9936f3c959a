"""Save and load compressed models: weights in safetensors, structure in its JSON metadata.

No pickle anywhere. The metadata records which layers are factored (with their
constructor arguments), which BatchNorms were folded into which conv, which layers have a
fused epilogue (re-derived on load by the same pass), whether the model computes in
channels_last (:mod:`trp.layout`), the notes on layers left dense, and a SHA-256 per tensor so that a modified file is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trp import epilogue, layout
from trp.compile import FOLDED_ATTR, NOTE_ATTR, walk
from trp.epilogue import EPILOGUE_ATTR
from trp.modules import LOWRANK_TYPES, LowRankConv2d, LowRankLinear
from trp_kernels.reference import resolve_padding

FORMAT = "trp-safetensors/1"
_META_KEY = "trp"


class TrpFileError(ValueError):
    """A file that is not a valid trp model file, or a model that does not match it."""


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def save(model: nn.Module, path) -> None:
    """Write ``model``'s weights and trp structure to ``path`` (a .safetensors file).

    The file is written next to ``path`` and renamed into place, so a crash never leaves
    a half-written file under that name.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    layers, folded, notes, epilogues = {}, {}, {}, {}
    for fqn, m, _, _ in walk(model):
        if isinstance(m, LOWRANK_TYPES):
            layers[fqn] = {"type": type(m).__name__, "config": m.config()}
            if getattr(m, EPILOGUE_ATTR, None):
                epilogues[fqn] = getattr(m, EPILOGUE_ATTR)
        if getattr(m, FOLDED_ATTR, None):
            folded[fqn] = getattr(m, FOLDED_ATTR)
        if getattr(m, NOTE_ATTR, None):
            notes[fqn] = getattr(m, NOTE_ATTR)

    tensors, aliases, seen, storages = {}, {}, {}, set()
    for name, t in model.state_dict().items():
        t = t.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        ptr = t.untyped_storage().data_ptr()
        t = t.to("cpu")
        t = t.clone() if ptr in storages else t.contiguous()
        storages.add(ptr)
        tensors[name] = t
    meta = {"format": FORMAT, "layers": layers, "folded": folded, "notes": notes, "epilogues": epilogues,
            "aliases": aliases, "channels_last": layout.is_channels_last(model),
            "sha256": {k: _digest(v) for k, v in tensors.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TrpFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if _META_KEY not in metadata:
        raise TrpFileError(f"{path} has no trp metadata: it was not written by trp.save")
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as e:
        raise TrpFileError(f"{path}: trp metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise TrpFileError(f"{path}: unsupported format {found!r} (this trp reads {FORMAT!r})")
    for key in ("layers", "folded", "notes", "aliases", "sha256"):
        if not isinstance(meta.get(key), dict):
            raise TrpFileError(f"{path}: trp metadata lacks {key!r}")
    if set(meta["sha256"]) != set(tensors):
        raise TrpFileError(f"{path}: the tensors in the file do not match the checksums in its metadata")
    for name, t in tensors.items():
        if _digest(t) != meta["sha256"][name]:
            raise TrpFileError(f"{path}: tensor {name!r} does not match its checksum (the file was modified)")
    return meta, tensors


def _check_conv(fqn: str, m: nn.Module, cfg: dict, folded: bool) -> None:
    if not isinstance(m, (nn.Conv2d, LowRankConv2d)):
        raise TrpFileError(f"model does not match the file: {fqn!r} is {type(m).__name__}, the file has a "
                           f"factored Conv2d there")
    want = dict(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                kernel_size=tuple(cfg["kernel_size"]), stride=tuple(cfg["stride"]),
                dilation=tuple(cfg["dilation"]))
    have = dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
                stride=tuple(m.stride), dilation=tuple(m.dilation))
    pad = cfg["padding"] if isinstance(cfg["padding"], (str, int)) else tuple(cfg["padding"])
    want["padding"] = resolve_padding(pad, want["kernel_size"], want["dilation"])
    have["padding"] = resolve_padding(m.padding, have["kernel_size"], have["dilation"])
    if not folded:
        want["bias"], have["bias"] = cfg["bias"], m.bias is not None
    diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
    if diff:
        text = ", ".join(f"{k}={h} in the model but {w} in the file" for k, (h, w) in diff.items())
        raise TrpFileError(f"model does not match the file at {fqn!r}: {text}")


def _check_linear(fqn: str, m: nn.Module, cfg: dict) -> None:
    if not isinstance(m, (nn.Linear, LowRankLinear)):
        raise TrpFileError(f"model does not match the file: {fqn!r} is {type(m).__name__}, the file has a "
                           f"factored Linear there")
    if (m.in_features, m.out_features) != (cfg["in_features"], cfg["out_features"]):
        raise TrpFileError(f"model does not match the file at {fqn!r}: Linear({m.in_features}, "
                           f"{m.out_features}) in the model, ({cfg['in_features']}, {cfg['out_features']}) in the file")


def load(path, model: nn.Module) -> nn.Module:
    """Rebuild the compressed model saved at ``path`` on ``model``, a freshly built instance
    of the original (uncompressed) architecture, and return it ready to run (use the
    returned model: if the saved model had a fused epilogue in its root's own forward, the
    root is rebuilt as a GraphModule, as :func:`trp.compile` does).

    Raises :class:`TrpFileError` (a ValueError) for a truncated, modified or foreign file
    and for a model that does not match it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    meta, tensors = _read(path)
    modules = dict(model.named_modules())

    def module_at(fqn: str) -> nn.Module:
        if fqn not in modules:
            raise TrpFileError(f"model does not match the file: it has no layer {fqn!r}")
        return modules[fqn]

    for fqn, bn_fqn in meta["folded"].items():
        if fqn not in meta["layers"] and not isinstance(module_at(fqn), nn.Conv2d):
            raise TrpFileError(f"model does not match the file: {fqn!r} is {type(modules[fqn]).__name__}, "
                               f"the file folded a BatchNorm into a Conv2d there")
        bn = module_at(bn_fqn)
        if not isinstance(bn, (nn.BatchNorm2d, nn.Identity)):
            raise TrpFileError(f"model does not match the file: {bn_fqn!r} is {type(bn).__name__}, the file "
                               f"folded a BatchNorm2d there")
    for fqn, entry in meta["layers"].items():
        m, cfg = module_at(fqn), entry["config"]
        if entry["type"] == "LowRankConv2d":
            _check_conv(fqn, m, cfg, fqn in meta["folded"])
        elif entry["type"] == "LowRankLinear":
            _check_linear(fqn, m, cfg)
        else:
            raise TrpFileError(f"{path}: unknown layer type {entry['type']!r} at {fqn!r}")

    # Checked: now change the model.
    def replace(fqn: str, new: nn.Module) -> None:
        parent, _, attr = fqn.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)

    for fqn, entry in meta["layers"].items():
        old, cfg = modules[fqn], dict(entry["config"])
        ref = tensors.get(f"{fqn}.weight1")
        factory = dict(device=next(old.parameters()).device,
                       dtype=ref.dtype if ref is not None else next(old.parameters()).dtype)
        cls = LowRankConv2d if entry["type"] == "LowRankConv2d" else LowRankLinear
        if cls is LowRankConv2d:
            cfg["padding"] = cfg["padding"] if isinstance(cfg["padding"], (str, int)) else tuple(cfg["padding"])
        try:
            new = cls(**cfg, **factory)
        except (TypeError, ValueError) as e:
            raise TrpFileError(f"{path}: bad layer config at {fqn!r}: {e}") from None
        new.train(old.training)
        replace(fqn, new)
        modules[fqn] = new
    for fqn, bn_fqn in meta["folded"].items():
        replace(bn_fqn, nn.Identity())
        target = modules[fqn]
        if not isinstance(target, LOWRANK_TYPES) and target.bias is None:
            target.bias = nn.Parameter(torch.zeros(target.out_channels, device=target.weight.device,
                                                   dtype=target.weight.dtype))
        setattr(target, FOLDED_ATTR, bn_fqn)
    for fqn, note in meta["notes"].items():
        if fqn in modules:
            setattr(modules[fqn], NOTE_ATTR, note)

    state = dict(tensors)
    for alias, name in meta["aliases"].items():
        state[alias] = tensors[name]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise TrpFileError(f"model does not match the file {path}: {e}") from None
    if meta.get("epilogues"):  # the same pass as trp.compile's, on the same structure
        model, fusions = epilogue.fuse(model)
        found = {f.layer: f.kind for f in fusions}
        if found != meta["epilogues"]:
            raise TrpFileError(f"model does not match the file {path}: its layers' fused epilogues are "
                               f"{meta['epilogues']}, this model's forward gives {found}")
    return layout.set_channels_last(model, bool(meta.get("channels_last", False)))
