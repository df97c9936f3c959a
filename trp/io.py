"""Save and load compressed models: weights in safetensors, structure in its JSON metadata.

No pickle anywhere: loading a file runs no code from it. The metadata records which layers
are factored (with their constructor arguments), which BatchNorms were folded into which
conv, which layers have a fused epilogue (re-derived on load by the same pass), whether the
model computes in channels_last (:mod:`trp.layout`), the notes on layers left dense, which
state_dict entries share one tensor, a SHA-256 per tensor, and a ``digest``: one SHA-256
over all of that metadata (the per-tensor checksums included) and every tensor's name,
dtype and shape. A flipped bit, a truncated copy or any edit of the file's content,
structure or weights, makes :func:`load` raise :class:`TrpFileError`.

What the checksums cannot do: anyone who can rewrite the file can rewrite them too, so they
detect accidents, not an attacker. To detect tampering, keep the file's own SHA-256 (what
:func:`save` returns, ``sha256sum`` prints, and ``python -m trp verify FILE`` shows)
somewhere the file's writer cannot reach, and pass it to :func:`load` or :func:`verify` as
``expected_sha256``.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import re
import struct
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from trp import epilogue, files, layout, program
from trp.channels import CHANNELS_ATTR, conv_like
from trp.compile import FOLDED_ATTR, NOTE_ATTR, walk
from trp.epilogue import EPILOGUE_ATTR
from trp.modules import CONV_TYPES, LAYER_TYPES, NAME_ATTR, LowRankLinear
from trp_kernels.reference import resolve_padding

FORMAT = "trp-safetensors/2"
_OLD_FORMAT = "trp-safetensors/1"  # no digest over the structure: read, with a warning
_META_KEY = "trp"
_LAYER_TYPES = {cls.__name__: cls for cls in LAYER_TYPES}
_STR_MAPS = ("folded", "notes", "epilogues", "aliases", "sha256")
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TrpFileError(ValueError):
    """A file that is not a valid trp model file, or a model that does not match it."""


def _tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _structure_digest(meta: dict, tensors: dict) -> str:
    """SHA-256 of the canonical JSON of ``meta`` (without its digest) and every tensor's
    name, dtype and shape; the per-tensor checksums in ``meta`` cover the tensors' bytes."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    index = {name: [str(t.dtype), list(t.shape)] for name, t in tensors.items()}
    text = json.dumps({"meta": body, "tensors": index}, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def save(model: nn.Module, path) -> str:
    """Write ``model``'s weights and trp structure to ``path`` (a .safetensors file) and
    return the file's SHA-256 (hex), to keep for ``load(..., expected_sha256=...)``.

    The file is written next to ``path`` and renamed into place, so a crash never leaves a
    half-written file under that name; it gets the mode the umask gives a new file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    path = Path(path)
    layers, folded, notes, epilogues, channels = {}, {}, {}, {}, {}
    for fqn, m, _, _ in walk(model):
        if getattr(m, CHANNELS_ATTR, None):  # channels removed: [built in, built out, in, out]
            channels[fqn] = [*map(int, getattr(m, CHANNELS_ATTR)), m.in_channels, m.out_channels]
        if isinstance(m, LAYER_TYPES):
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
            "aliases": aliases, "channels_last": layout.is_channels_last(model), "channels": channels,
            "sha256": {k: _tensor_digest(v) for k, v in tensors.items()}}
    meta["digest"] = _structure_digest(meta, tensors)
    data = save_bytes(tensors, metadata={_META_KEY: json.dumps(meta)})
    files.atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


# --- reading -------------------------------------------------------------------------

def _read_bytes(path: Path, expected_sha256: Optional[str]) -> bytes:
    if expected_sha256 is not None:
        if not isinstance(expected_sha256, str) or not _HEX64.fullmatch(expected_sha256.strip().lower()):
            raise ValueError(f"expected_sha256 must be a SHA-256 as 64 hex digits, got {expected_sha256!r}")
    if not path.is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    data = path.read_bytes()  # read once: what is checked is what is parsed
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256.strip().lower():
            raise TrpFileError(f"{path}: its SHA-256 is {actual}, expected {expected_sha256.strip().lower()} "
                               "(the file is not the one whose digest was kept)")
    return data


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} does not fit a float")
    return value


def _strict_json(text):
    """json.loads without Python's extensions (NaN, Infinity, numbers that overflow to inf),
    which the canonical form of the digest cannot represent."""
    return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)


def _header_metadata(data: bytes, path: Path) -> dict:
    """The safetensors header's ``__metadata__`` (string to string)."""
    if len(data) < 8:
        raise TrpFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): "
                           f"{len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise TrpFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): its header "
                           f"claims {n} bytes, the file has {len(data) - 8} after the length")
    try:
        header = _strict_json(data[8:8 + n])
    except (ValueError, RecursionError) as e:
        raise TrpFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): bad header "
                           f"({type(e).__name__})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _check_schema(meta, path: Path) -> None:
    """Every field of the trp metadata has the type it must have (names in errors)."""
    if not isinstance(meta, dict):
        raise TrpFileError(f"{path}: trp metadata must be a JSON object, got {type(meta).__name__}")
    found = meta.get("format")
    if found not in (FORMAT, _OLD_FORMAT):
        raise TrpFileError(f"{path}: unsupported format {found!r} (this trp reads {FORMAT!r})")
    required = {"format", "layers", "folded", "notes", "aliases", "sha256"}
    if found == FORMAT:
        required |= {"epilogues", "channels_last", "digest"}
    allowed = required | {"epilogues", "channels_last", "channels"}
    missing, unknown = required - set(meta), set(meta) - allowed
    if missing or unknown:
        raise TrpFileError(f"{path}: trp metadata lacks {sorted(missing)}" if missing else
                           f"{path}: trp metadata has unknown keys {sorted(unknown)}")
    if "digest" in meta and not (isinstance(meta["digest"], str) and _HEX64.fullmatch(meta["digest"])):
        raise TrpFileError(f"{path}: trp metadata's digest must be 64 hex digits")
    if not isinstance(meta.get("channels_last", False), bool):
        raise TrpFileError(f"{path}: trp metadata's channels_last must be true or false, "
                           f"got {meta['channels_last']!r}")
    for key in _STR_MAPS:
        value = meta.get(key, {})
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise TrpFileError(f"{path}: trp metadata's {key!r} must map layer or tensor names to strings")
    entries = meta.get("channels", {})
    if not isinstance(entries, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and len(v) == 4
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 20 for n in v)
            for k, v in entries.items()):
        raise TrpFileError(f"{path}: trp metadata's 'channels' must map layer names to [in, out, in, out] "
                           "channel counts")
    if not isinstance(meta["layers"], dict):
        raise TrpFileError(f"{path}: trp metadata's 'layers' must be an object")
    for fqn, entry in meta["layers"].items():
        if not (isinstance(entry, dict) and set(entry) == {"type", "config"} and isinstance(entry["config"], dict)):
            raise TrpFileError(f"{path}: layer entry {fqn!r} must be {{'type': ..., 'config': {{...}}}}")
        if entry["type"] not in _LAYER_TYPES:
            raise TrpFileError(f"{path}: unknown layer type {entry['type']!r} at {fqn!r}")


def _parse(data: bytes, path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a trp file's bytes, every checksum verified."""
    metadata = _header_metadata(data, path)
    try:
        tensors = load_bytes(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError, OverflowError) as e:
        raise TrpFileError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    if _META_KEY not in metadata:
        raise TrpFileError(f"{path} has no trp metadata: it was not written by trp.save")
    try:
        meta = _strict_json(metadata[_META_KEY])
    except (ValueError, RecursionError) as e:
        raise TrpFileError(f"{path}: trp metadata is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    _check_schema(meta, path)
    if set(meta["sha256"]) != set(tensors):
        raise TrpFileError(f"{path}: the tensors in the file do not match the checksums in its metadata")
    for name, t in tensors.items():
        if _tensor_digest(t) != meta["sha256"][name]:
            raise TrpFileError(f"{path}: tensor {name!r} does not match its checksum (the file was modified)")
    if meta["format"] == _OLD_FORMAT:
        warnings.warn(f"{path} was written by an older trp ({_OLD_FORMAT}): its tensors are checksummed but its "
                      "structure is not; save it again to protect both", RuntimeWarning, stacklevel=3)
    elif _structure_digest(meta, tensors) != meta["digest"]:
        raise TrpFileError(f"{path}: its structure (metadata, tensor names, dtypes or shapes) does not match "
                           "its digest (the file was modified)")
    for alias, name in meta["aliases"].items():
        if name not in tensors or alias in tensors:
            raise TrpFileError(f"{path}: alias {alias!r} -> {name!r} must name a stored tensor from a name "
                               "that is not one")
    return meta, tensors


def verify(path, expected_sha256: Optional[str] = None) -> dict:
    """Check a trp file without a model: its SHA-256 against ``expected_sha256`` (when
    given), every checksum inside it, and the form of its metadata. Returns what it found
    (sha256, format, layers, tensors, bytes); raises :class:`TrpFileError` on any mismatch."""
    path = Path(path)
    data = _read_bytes(path, expected_sha256)
    meta, tensors = _parse(data, path)
    return {"path": str(path), "sha256": hashlib.sha256(data).hexdigest(), "format": meta["format"],
            "layers": len(meta["layers"]), "tensors": len(tensors), "aliases": len(meta["aliases"]),
            "bytes": len(data), "structure_digest": meta["format"] == FORMAT}


# --- applying a file to a model ---------------------------------------------------------

def _ghost(module: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """A copy of ``module``'s tree whose parameters and buffers are on the meta device: the
    load is rehearsed on it, so that a file that does not fit the model fails before the
    model is touched, without copying any weight. Each module is copied shallowly (its
    other attributes are shared, as read-only: a lock or a cached tensor is neither copied
    nor pickled) with its own containers (children, parameters, buffers, hook tables), the
    things the rehearsal changes; a module registered twice has one copy."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    ghost = copy.copy(module)
    memo[id(module)] = ghost
    for name, value in vars(module).items():
        if isinstance(value, (dict, set)):  # OrderedDicts of hooks, the non-persistent buffer names, ...
            setattr(ghost, name, copy.copy(value))
    for name, p in module._parameters.items():
        ghost._parameters[name] = None if p is None else memo.setdefault(
            id(p), nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad))
    for name, b in module._buffers.items():
        ghost._buffers[name] = None if b is None else memo.setdefault(id(b), torch.empty_like(b, device="meta"))
    for name, child in module._modules.items():
        ghost._modules[name] = None if child is None else _ghost(child, memo)
    return ghost


def _config_keys(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "device", "dtype"}


def _geometry(m: nn.Module) -> dict:
    """What a saved layer and the model's layer at its place must agree on."""
    if isinstance(m, (nn.Linear, LowRankLinear)):
        return dict(in_features=m.in_features, out_features=m.out_features)
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=tuple(m.kernel_size),
                stride=tuple(m.stride), dilation=tuple(m.dilation),
                padding=resolve_padding(m.padding, m.kernel_size, m.dilation))


def _apply(meta: dict, tensors: dict, model: nn.Module, path: Path, device=None) -> nn.Module:
    """Rebuild the file's structure on ``model`` and load its tensors (new layers on
    ``device``, default: where the layer they replace is)."""
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

    def replace(fqn: str, new: nn.Module) -> None:
        parent, _, attr = fqn.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)

    state = dict(tensors)
    for alias, name in meta["aliases"].items():
        state[alias] = tensors[name]
    built = {}  # the new layers, built and filled before the model is changed
    cut = meta.get("channels", {})
    for fqn, (n_in, n_out, now_in, now_out) in cut.items():
        old = module_at(fqn)
        if not isinstance(old, nn.Conv2d) or (old.in_channels, old.out_channels) != (n_in, n_out):
            raise TrpFileError(f"model does not match the file: {fqn!r} is {type(old).__name__}"
                               + (f" ({old.in_channels} -> {old.out_channels} channels)" if isinstance(old, nn.Conv2d)
                                  else "") + f", the file has a conv of {n_in} -> {n_out} channels there")
        if fqn in meta["layers"]:
            continue
        ref = tensors.get(f"{fqn}.weight")
        try:
            new = conv_like(old, now_in, now_out, f"{fqn}.bias" in tensors, device or old.weight.device,
                            ref.dtype if ref is not None else None)
            new.load_state_dict({k[len(fqn) + 1:]: v for k, v in state.items() if k.startswith(fqn + ".")},
                                assign=device == "meta")
        except (RuntimeError, ValueError) as e:
            raise TrpFileError(f"model does not match the file {path} at {fqn!r}: {e}") from None
        new.train(old.training)
        setattr(new, CHANNELS_ATTR, (n_in, n_out))
        built[fqn] = new
    for fqn, entry in meta["layers"].items():
        old, cls, cfg = module_at(fqn), _LAYER_TYPES[entry["type"]], dict(entry["config"])
        dense = nn.Linear if cls is LowRankLinear else nn.Conv2d
        if not isinstance(old, (dense, cls)):
            raise TrpFileError(f"model does not match the file: {fqn!r} is {type(old).__name__}, the file has a "
                               f"factored {dense.__name__} there")
        if set(cfg) != _config_keys(cls):
            raise TrpFileError(f"{path}: bad layer config at {fqn!r}: keys {sorted(cfg)}, want "
                               f"{sorted(_config_keys(cls))}")
        if isinstance(cfg.get("padding"), list):
            cfg["padding"] = tuple(cfg["padding"])
        ref = next((t for k, t in tensors.items() if k.startswith(fqn + ".") and t.is_floating_point()), None)
        param = next(old.parameters(), None)
        factory = dict(device=device or (param.device if param is not None else "cpu"),
                       dtype=ref.dtype if ref is not None else (param.dtype if param is not None else None))
        try:
            new = cls(**cfg, **factory)
        except (TypeError, ValueError) as e:
            raise TrpFileError(f"{path}: bad layer config at {fqn!r}: {e}") from None
        want, have = _geometry(new), _geometry(old)
        if fqn in cut:  # channels removed: the model's layer has the counts it was built with
            want["in_channels"], want["out_channels"] = cut[fqn][:2]
            setattr(new, CHANNELS_ATTR, tuple(cut[fqn][:2]))
        if fqn not in meta["folded"] and isinstance(new, CONV_TYPES):
            want["bias"], have["bias"] = new.bias is not None, old.bias is not None
        diff = {k: (have[k], want[k]) for k in want if have[k] != want[k]}
        if diff:
            text = ", ".join(f"{k}={h} in the model but {w} in the file" for k, (h, w) in diff.items())
            raise TrpFileError(f"model does not match the file at {fqn!r}: {text}")
        new.train(old.training)
        setattr(new, NAME_ATTR, fqn)
        own = {k[len(fqn) + 1:]: v for k, v in state.items() if k.startswith(fqn + ".")}
        try:
            new.load_state_dict(own, strict=True, assign=device == "meta")
        except RuntimeError as e:
            raise TrpFileError(f"model does not match the file {path} at {fqn!r}: {e}") from None
        built[fqn] = new
    for fqn, new in built.items():  # from here on the model changes: nothing below depends on the file's validity
        replace(fqn, new)
        modules[fqn] = new
    for fqn, bn_fqn in meta["folded"].items():
        replace(bn_fqn, nn.Identity())
        target = modules[fqn]
        if not isinstance(target, LAYER_TYPES) and target.bias is None:
            target.bias = nn.Parameter(torch.zeros(target.out_channels, device=target.weight.device,
                                                   dtype=target.weight.dtype))
        setattr(target, FOLDED_ATTR, bn_fqn)
    for fqn, note in meta["notes"].items():
        if fqn in modules:
            setattr(modules[fqn], NOTE_ATTR, note)

    try:  # a rehearsal on the meta device assigns (copying into meta tensors would warn)
        model.load_state_dict(state, strict=True, assign=device == "meta")
    except RuntimeError as e:
        raise TrpFileError(f"model does not match the file {path}: {e}") from None
    if meta.get("epilogues"):  # the same pass as trp.compile's, on the same structure
        model, fusions = epilogue.fuse(model)
        found = {f.layer: f.kind for f in fusions}
        if found != meta["epilogues"]:
            raise TrpFileError(f"model does not match the file {path}: its layers' fused epilogues are "
                               f"{meta['epilogues']}, this model's forward gives {found}")
    layout.set_channels_last(model, meta.get("channels_last", False))
    return program.install(model, meta.get("channels_last", False))


def load(path, model: nn.Module, *, expected_sha256: Optional[str] = None) -> nn.Module:
    """Rebuild the compressed model saved at ``path`` on ``model``, a freshly built instance
    of the original (uncompressed) architecture, and return it ready to run (use the
    returned model: if the saved model had a fused epilogue in its root's own forward, the
    root is rebuilt as a GraphModule, as :func:`trp.compile` does).

    ``expected_sha256``: the file's SHA-256 as kept elsewhere (see the module docstring);
    a file with another digest is refused before it is parsed.

    Raises :class:`TrpFileError` (a ValueError) for a truncated, modified or foreign file
    and for a model that does not match it; then ``model`` is left as it was: the load is
    rehearsed on a weightless copy first, and the new layers are built and filled before
    the model is changed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not torch.is_inference_mode_enabled() and any(
            t.is_inference() for t in (*model.parameters(), *model.buffers())):
        raise ValueError("model holds tensors made under torch.inference_mode(), which cannot be written: "
                         "build it outside inference mode (trp.load copies the file's weights into it)")
    path = Path(path)
    data = _read_bytes(path, expected_sha256)
    meta, tensors = _parse(data, path)
    _apply(meta, tensors, _ghost(model), path, device="meta")
    return _apply(meta, tensors, model, path)
