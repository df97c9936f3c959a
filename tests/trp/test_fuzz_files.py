"""Fuzzing the two kinds of file trp reads back: saved models (``trp.load``) and training
checkpoints (``fit(resume=True)``).

Randomly damaged copies (bit flips in the header and in the tensor data, truncation, edits
of the JSON metadata, edits of the safetensors header) must each either load exactly the
original (same layers, bit-identical weights) or raise a trp error; none may load other
weights or fail with another exception. A second group edits the metadata's structure and
recomputes its digest, as a buggy writer would: those may load, but must never raise
anything but a trp error. Seeded, so a failure names a reproducible case.
"""

from __future__ import annotations

import copy
import json
import random
import struct

import pytest
import torch
import torch.nn as nn

import trp
from trp import checkpoint, models
from trp.io import TrpFileError, _structure_digest

SEED = 20261202


def _model():
    """A small model with every kind of thing a file records: factored convs of both
    schemes, a factored linear layer, folded BNs, fused epilogues, channels_last, notes."""
    torch.manual_seed(0)
    m = models.resnet_cifar(8).eval()
    models.randomize_batchnorm(m)
    return trp.compile(m, rank=3, overrides={r"layer2\.0\.conv2": {"rank": 2, "scheme": "spatial"}, "fc": 4},
                       filter_fn=lambda mod, q: isinstance(mod, nn.Linear) or trp.default_filter(m)(mod, q))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = _model()
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    trp.save(model, path)
    return model, path.read_bytes()


def _split(data: bytes):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _leaves(obj, path=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))
    yield path


def _mutate(rng: random.Random, obj) -> str:
    """Change one randomly chosen node of a JSON tree in place; return what was done."""
    paths = [p for p in _leaves(obj) if p]
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    key, value = path[-1], parent[path[-1]]
    choice = rng.randrange(4)
    if choice == 0 and isinstance(parent, dict):
        del parent[key]
        return f"deleted {path}"
    if choice == 1:
        parent[key] = rng.choice([None, [], {}, "x", -1, 0, 10 ** 9, True, 1.5, [1, 2], {"a": 1}])
        return f"replaced {path}"
    if isinstance(value, bool):
        parent[key] = not value
    elif isinstance(value, int):
        parent[key] = value + rng.choice([-1, 1, 7])
    elif isinstance(value, str):
        parent[key] = value[:-1] if value and rng.random() < 0.5 else value + "x"
    elif isinstance(value, list) and value:
        value.pop(rng.randrange(len(value)))
    elif isinstance(value, dict) and value:
        value.pop(rng.choice(list(value)))
    else:
        parent[key] = "z"
    return f"changed {path}"


def _damaged_files(data: bytes, rng: random.Random):
    """(description, bytes) of damaged copies of a saved model file."""
    n, header, body = _split(data)
    for i in range(70):  # bit flips: half in the header, half in the tensor data
        buf = bytearray(data)
        lo, hi = (0, 8 + n) if i % 2 == 0 else (8 + n, len(data))
        for _ in range(rng.choice([1, 1, 2, 3])):
            pos = rng.randrange(lo, hi)
            buf[pos] ^= 1 << rng.randrange(8)
        yield f"flip #{i}", bytes(buf)
    for i in range(15):
        yield f"truncate #{i}", data[:rng.randrange(len(data))]
    for i in range(40):  # edits of the trp metadata, digest left as it was
        h = copy.deepcopy(header)
        meta = json.loads(h["__metadata__"]["trp"])
        what = _mutate(rng, meta)
        h["__metadata__"]["trp"] = json.dumps(meta)
        yield f"metadata edit #{i}: {what}", _join(h, body)
    for i in range(20):  # edits of the safetensors header (dtypes, shapes, offsets)
        h = copy.deepcopy(header)
        tensors = {k: v for k, v in h.items() if k != "__metadata__"}
        name = rng.choice(sorted(tensors))
        field = rng.choice(["dtype", "shape", "data_offsets"])
        if field == "dtype":
            h[name]["dtype"] = rng.choice(["F16", "BF16", "I32", "F64", "U8"])
        elif field == "shape":
            h[name]["shape"] = list(reversed(h[name]["shape"])) + ([1] if rng.random() < 0.5 else [])
        else:
            other = rng.choice(sorted(tensors))
            h[name]["data_offsets"], h[other]["data_offsets"] = h[other]["data_offsets"], h[name]["data_offsets"]
        yield f"header edit #{i}: {name} {field}", _join(h, body)


def _structure(model: nn.Module) -> list:
    # By class name: a block whose forward the epilogue pass rewrote is a GraphModule of a
    # class fx makes anew each time, named like the original.
    return [(fqn, type(m).__name__, m.config() if hasattr(m, "config") else None)
            for fqn, m in model.named_modules()]


def _same(loaded: nn.Module, model: nn.Module) -> bool:
    if _structure(loaded) != _structure(model):
        return False
    a, b = loaded.state_dict(), model.state_dict()
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_damaged_model_files_load_exactly_or_raise(saved, tmp_path):
    model, data = saved
    rng = random.Random(SEED)
    outcomes = {"refused": 0, "exact": 0}
    path = tmp_path / "damaged.safetensors"
    for what, damaged in _damaged_files(data, rng):
        path.write_bytes(damaged)
        fresh = models.resnet_cifar(8)
        try:
            loaded = trp.load(path, fresh)
        except TrpFileError:
            outcomes["refused"] += 1
            continue
        assert _same(loaded, model), f"{what}: loaded other weights or structure"
        outcomes["exact"] += 1
    assert outcomes["refused"] >= 120, outcomes  # nearly every damage is caught, not silently survived


def test_metadata_edited_with_a_new_digest_never_raises_anything_else(saved, tmp_path):
    _, data = saved
    n, header, body = _split(data)
    from safetensors.torch import load as load_bytes

    tensors = load_bytes(data)
    rng = random.Random(SEED + 1)
    path = tmp_path / "edited.safetensors"
    loaded = refused = 0
    for i in range(80):
        h = copy.deepcopy(header)
        meta = json.loads(h["__metadata__"]["trp"])
        what = _mutate(rng, meta)
        if isinstance(meta, dict) and "digest" in meta:
            try:
                meta["digest"] = _structure_digest(meta, tensors)
            except (TypeError, ValueError):  # the edit made the metadata unhashable as JSON
                pass
        h["__metadata__"]["trp"] = json.dumps(meta)
        path.write_bytes(_join(h, body))
        try:
            trp.load(path, models.resnet_cifar(8))
            loaded += 1
        except TrpFileError:
            refused += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"edit #{i} ({what}) raised {type(e).__name__}: {e}")
    assert refused > 40, (loaded, refused)


# --- checkpoints ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    from torch.utils.data import DataLoader, TensorDataset

    from trp.data import digits_tensors

    directory = tmp_path_factory.mktemp("ckpt")
    xtr, ytr, _, _ = digits_tensors(size=16)
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    loader = DataLoader(TensorDataset(xtr[:128], ytr[:128]), batch_size=64, shuffle=True)
    trp.fit(model, loader, epochs=1, method=trp.TRP(model), checkpoint_dir=directory, progress=False, lr=0.05)
    data = (directory / checkpoint.LAST).read_bytes()
    return checkpoint.read(directory / checkpoint.LAST), data


def test_damaged_checkpoints_resume_exactly_or_raise(one_checkpoint, tmp_path):
    original, data = one_checkpoint
    rng = random.Random(SEED + 2)
    refused = exact = 0
    for i in range(90):
        directory = tmp_path / f"c{i}"
        directory.mkdir()
        if i < 75:
            buf = bytearray(data)
            for _ in range(rng.choice([1, 1, 2])):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            damaged, what = bytes(buf), f"flip #{i}"
        else:
            damaged, what = data[:rng.randrange(len(data))], f"truncate #{i}"
        (directory / checkpoint.LAST).write_bytes(damaged)
        try:
            state = checkpoint.load_latest(directory)
        except checkpoint.CheckpointError:
            refused += 1
            continue
        assert state["digest"] == original["digest"], what
        for k, v in original["model"].items():
            assert torch.equal(state["model"][k], v), f"{what}: resumed other weights ({k})"
        exact += 1
    assert refused >= 60, (refused, exact)


def test_fit_resume_refuses_a_damaged_checkpoint(one_checkpoint, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    _, data = one_checkpoint
    buf = bytearray(data)
    buf[len(buf) // 2] ^= 0xFF
    (tmp_path / checkpoint.LAST).write_bytes(bytes(buf))
    model = models.resnet_cifar(8)
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 16, 16), torch.zeros(8, dtype=torch.long)), batch_size=8)
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint to resume from"):
        trp.fit(model, loader, epochs=2, method=trp.TRP(model), checkpoint_dir=tmp_path, resume=True, progress=False)
