"""trp.save / trp.load: round trip, and clear errors for bad files and mismatched models."""

import json
import os
import struct

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import trp
from trp import models
from trp.compile import FOLDED_ATTR
from trp.io import TrpFileError


def _compressed(seed=0):
    torch.manual_seed(seed)
    model = models.resnet_cifar(20).eval()
    models.randomize_batchnorm(model)
    trp.compile(model, rank=4, overrides={r"layer3\.2\.conv2": {"rank": 5, "scheme": "spatial"}, "fc": 4},
                filter_fn=lambda m, q: isinstance(m, nn.Linear) or trp.default_filter(model)(m, q))
    return model


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _compressed()
    path = tmp_path / "m.safetensors"
    trp.save(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left
    fresh = models.resnet_cifar(20).eval()
    loaded = trp.load(path, fresh)
    assert loaded is fresh
    assert isinstance(loaded.fc, trp.LowRankLinear)
    assert loaded.layer3[2].conv2.scheme == "spatial" and loaded.layer3[2].conv2.rank == 5
    assert isinstance(loaded.layer1[0].bn1, nn.Identity)
    assert getattr(loaded.layer1[0].conv1, FOLDED_ATTR) == "layer1.0.bn1"
    assert loaded.conv1.bias is not None  # the stem stayed dense but got its BN folded
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert [r["note"] for r in trp.summary(loaded, x).rows] == [r["note"] for r in trp.summary(model, x).rows]


def test_shared_tensors_are_saved_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    trp.save(model, tmp_path / "t.safetensors")
    fresh = trp.load(tmp_path / "t.safetensors", Tied())
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x), model(x))


def test_truncated_file(tmp_path):
    path = tmp_path / "m.safetensors"
    trp.save(_compressed(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrpFileError, match="not a readable safetensors file"):
        trp.load(path, models.resnet_cifar(20))


def test_modified_weights_are_caught(tmp_path):
    path = tmp_path / "m.safetensors"
    trp.save(_compressed(), path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a byte of the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(TrpFileError, match="does not match its checksum"):
        trp.load(path, models.resnet_cifar(20))


def test_modified_metadata_is_caught(tmp_path):
    path = tmp_path / "m.safetensors"
    trp.save(_compressed(), path)
    _rewrite(path, lambda m: m["layers"]["layer1.0.conv1"]["config"].update(rank=7))
    with pytest.raises(TrpFileError, match="its structure .* does not match its digest"):
        trp.load(path, models.resnet_cifar(20))


def test_wrong_architecture(tmp_path):
    path = tmp_path / "m.safetensors"
    trp.save(_compressed(), path)
    with pytest.raises(TrpFileError, match=r"at 'layer1.0.conv1': in_channels=32 in the model but 16"):
        trp.load(path, models.resnet_cifar(20, width=32))
    with pytest.raises(TrpFileError, match="it has no layer 'layer1.2.bn1'"):
        trp.load(path, models.resnet_cifar(14))
    with pytest.raises(TrpFileError, match="'layer1.0.conv1' is Linear"):
        odd = models.resnet_cifar(20)
        odd.layer1[0].conv1 = nn.Linear(3, 3)
        trp.load(path, odd)


def test_not_a_trp_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(TrpFileError, match="has no trp metadata"):
        trp.load(plain, models.resnet_cifar(20))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(100))
    with pytest.raises(TrpFileError, match="not a readable safetensors file"):
        trp.load(garbage, models.resnet_cifar(20))
    with pytest.raises(FileNotFoundError, match="no such file"):
        trp.load(tmp_path / "missing.safetensors", models.resnet_cifar(20))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        trp.load(plain, None)


def test_failed_save_leaves_no_file(tmp_path, monkeypatch):
    import trp.files

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(trp.files.os, "fsync", boom)  # the bytes are written, then flushing fails
    with pytest.raises(OSError, match="disk full"):
        trp.save(_compressed(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- integrity of the whole file ------------------------------------------------------

def _rewrite(path, edit_meta=None, edit_header=None, redigest=False):
    """Rewrite a trp file's header: ``edit_meta(meta)`` on the trp metadata and/or
    ``edit_header(header)`` on the safetensors header, then (``redigest``) recompute the
    structure digest, as a writer who knows the format could."""
    from trp.io import _structure_digest

    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if edit_header:
        edit_header(header)
    if edit_meta or redigest:
        meta = json.loads(header["__metadata__"]["trp"])
        if edit_meta:
            edit_meta(meta)
        if redigest:
            from safetensors.torch import load as load_bytes
            meta["digest"] = _structure_digest(meta, load_bytes(data))
        header["__metadata__"]["trp"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def _saved(tmp_path):
    path = tmp_path / "m.safetensors"
    model = _compressed()
    digest = trp.save(model, path)
    return model, path, digest


def test_save_returns_the_files_sha256_and_verify_checks_it(tmp_path):
    import hashlib

    from trp.io import verify

    _, path, digest = _saved(tmp_path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    info = verify(path, expected_sha256=digest.upper())
    assert info["sha256"] == digest and info["structure_digest"] and info["layers"] > 0
    trp.load(path, models.resnet_cifar(20), expected_sha256=digest)
    with pytest.raises(TrpFileError, match="its SHA-256 is .*, expected 0{64}"):
        trp.load(path, models.resnet_cifar(20), expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="expected_sha256 must be a SHA-256 as 64 hex digits"):
        verify(path, expected_sha256="abc")


def test_edited_aliases_are_caught(tmp_path):
    """The issue's attack: rewiring which tensor loads into which layer through 'aliases'."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.c.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    path = tmp_path / "t.safetensors"
    trp.save(Tied(), path)
    _rewrite(path, lambda m: m["aliases"].update({"c.weight": "b.weight"}))
    with pytest.raises(TrpFileError, match="does not match its digest"):
        trp.load(path, Tied())


def test_swapped_tensor_offsets_and_checksums_are_caught(tmp_path):
    _, path, _ = _saved(tmp_path)

    def swap(header):
        a, b = "layer1.0.conv1.weight1", "layer1.1.conv1.weight1"
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
        meta = json.loads(header["__metadata__"]["trp"])
        meta["sha256"][a], meta["sha256"][b] = meta["sha256"][b], meta["sha256"][a]
        header["__metadata__"]["trp"] = json.dumps(meta)

    _rewrite(path, edit_header=swap)
    with pytest.raises(TrpFileError, match="does not match its digest"):
        trp.load(path, models.resnet_cifar(20))


def test_a_rewritten_digest_is_caught_only_by_a_digest_kept_elsewhere(tmp_path):
    """What the docstring promises and no more: a writer who recomputes the digest gets
    an edited file loaded, unless the caller checks the SHA-256 kept from trp.save."""
    _, path, digest = _saved(tmp_path)
    _rewrite(path, lambda m: m["notes"].update({"fc": "edited"}), redigest=True)
    trp.load(path, models.resnet_cifar(20))
    with pytest.raises(TrpFileError, match="its SHA-256 is"):
        trp.load(path, models.resnet_cifar(20), expected_sha256=digest)


def _drop(key):
    return lambda m: m["layers"]["layer1.0.conv1"]["config"].pop(key)


def _set(key, value):
    return lambda m: m["layers"]["layer1.0.conv1"]["config"].__setitem__(key, value)


@pytest.mark.parametrize("edit, match", [
    (_drop("stride"), "bad layer config at 'layer1.0.conv1': keys"),
    (_set("padding", None), "bad layer config at 'layer1.0.conv1': padding"),
    (_set("kernel_size", 3), None),  # an int kernel size is what Conv2d takes too: it loads
    (_set("rank", 10 ** 9), "bad layer config at 'layer1.0.conv1': rank must be <="),
    (_set("in_channels", "16"), "bad layer config"),
    (lambda m: m["aliases"].update({"fc.bias": "nowhere"}), "alias 'fc.bias' -> 'nowhere'"),
    (lambda m: m.update({"channels_last": "false"}), "channels_last must be true or false"),
    (lambda m: m["layers"].update({"x": []}), "layer entry 'x' must be"),
    (lambda m: m["folded"].update({"layer1.0.conv1": ["layer1.0.bn1"]}), "'folded' must map"),
    (lambda m: m.update({"extra": 1}), "unknown keys"),
    (lambda m: m["layers"]["layer1.0.conv1"].update({"type": "Conv3d"}), "unknown layer type"),
])
def test_malformed_metadata_raises_a_trp_error(tmp_path, edit, match):
    """Even with a valid digest (a buggy writer), bad metadata is a TrpFileError naming the
    field, never a KeyError, TypeError or RecursionError."""
    _, path, _ = _saved(tmp_path)
    _rewrite(path, edit, redigest=True)
    if match is None:
        trp.load(path, models.resnet_cifar(20))
        return
    with pytest.raises(TrpFileError, match=match):
        trp.load(path, models.resnet_cifar(20))


def test_deeply_nested_metadata(tmp_path):
    _, path, _ = _saved(tmp_path)
    _rewrite(path, edit_header=lambda h: h["__metadata__"].update(trp="[" * 200_000 + "]" * 200_000))
    with pytest.raises(TrpFileError, match="trp metadata is not valid JSON"):
        trp.load(path, models.resnet_cifar(20))


def test_a_failed_load_leaves_the_model_as_it_was(tmp_path):
    _, path, _ = _saved(tmp_path)
    fresh = models.resnet_cifar(20)
    fresh.fc = nn.Linear(64, 11)  # fails only when the tensors are loaded, after the layers are swapped
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    kinds = [type(m) for m in fresh.modules()]
    with pytest.raises(TrpFileError, match="model does not match the file"):
        trp.load(path, fresh)
    assert [type(m) for m in fresh.modules()] == kinds
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_files_get_the_mode_the_umask_gives(tmp_path):
    model = _compressed()
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            trp.save(model, tmp_path / f"m{umask}.safetensors")
        finally:
            os.umask(old)
        assert (tmp_path / f"m{umask}.safetensors").stat().st_mode & 0o777 == mode


def test_old_format_loads_with_a_warning(tmp_path):
    model, path, _ = _saved(tmp_path)

    def to_v1(m):
        m["format"] = "trp-safetensors/1"
        del m["digest"]

    _rewrite(path, to_v1)
    with pytest.warns(RuntimeWarning, match="written by an older trp"):
        loaded = trp.load(path, models.resnet_cifar(20))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_json_extensions_are_refused(tmp_path):
    """NaN, Infinity and overflowing numbers are Python's JSON extensions: a TrpFileError,
    not the ValueError the canonical digest would raise."""
    for text in ("NaN", "Infinity", "-Infinity", "1e999"):
        _, path, _ = _saved(tmp_path)
        _rewrite(path, edit_header=lambda h, t=text: h["__metadata__"].update(
            trp=h["__metadata__"]["trp"].replace('"rank": 4', f'"rank": {t}', 1)))
        assert text in json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])[
            "__metadata__"]["trp"]
        with pytest.raises(TrpFileError, match="trp metadata is not valid JSON"):
            trp.load(path, models.resnet_cifar(20))


def test_models_with_uncopyable_attributes_load(tmp_path):
    """The rehearsal copies no attribute but the module tree: a lock or a cached tensor
    stays shared, as in the model."""
    import threading

    model, path, _ = _saved(tmp_path)
    fresh = models.resnet_cifar(20)
    fresh.lock = threading.Lock()
    fresh.cache = torch.zeros(1000)
    loaded = trp.load(path, fresh)
    assert loaded.lock is fresh.lock
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_model_built_in_inference_mode_is_refused_untouched(tmp_path):
    _, path, _ = _saved(tmp_path)
    with torch.inference_mode():
        fresh = models.resnet_cifar(20)
    kinds = [type(m) for m in fresh.modules()]
    with pytest.raises(ValueError, match="made under torch.inference_mode"):
        trp.load(path, fresh)
    assert [type(m) for m in fresh.modules()] == kinds
