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
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["trp"])
    meta["layers"]["layer1.0.conv1"]["config"]["rank"] = 7
    header["__metadata__"]["trp"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])
    with pytest.raises(TrpFileError, match="model does not match the file"):
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
    import trp.io as io_mod

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(io_mod, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        trp.save(_compressed(), tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
