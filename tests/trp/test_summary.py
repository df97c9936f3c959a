"""trp.summary: MAC and parameter counts checked by hand."""

import pytest
import torch
import torch.nn as nn

import trp
from trp.summary import COLUMNS


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.body = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.spatial = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.spatial(self.body(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_counts_by_hand():
    model = Tiny().eval()
    x = torch.randn(4, 3, 16, 16)
    dense = trp.summary(model, x)
    assert [r["name"] for r in dense.rows] == ["stem", "body", "spatial", "fc"]
    stem, body, spatial, fc = dense.rows
    assert stem["macs"] == 16 * 3 * 9 * 16 * 16 and stem["params"] == 16 * 3 * 9
    assert body["macs"] == 32 * 16 * 9 * 8 * 8 and body["note"] == "not compiled"
    assert fc["macs"] == 32 * 10 and fc["params"] == 330

    trp.compile(model, rank=4, overrides={"spatial": {"rank": 4, "scheme": "spatial"}},
                filter_fn=lambda m, q: q != "stem", backend="torch")
    s = trp.summary(model, x)
    stem, body, spatial, fc = s.rows
    assert set(body) >= set(COLUMNS)
    assert body["rank"] == 4 and body["full_rank"] == 32 and body["scheme"] == "channel"
    assert body["macs_dense"] == 32 * 16 * 9 * 8 * 8
    assert body["macs"] == (4 * 16 * 9 + 32 * 4) * 8 * 8
    assert body["params"] == 4 * 16 * 9 + 32 * 4 + 32 and body["params_dense"] == 32 * 16 * 9 + 32
    # spatial: the 3x1 factor (stride 2 vertically) runs on the 8-wide input: 4 x 8 positions
    assert spatial["scheme"] == "spatial" and spatial["full_rank"] == 96
    assert spatial["macs"] == 4 * 32 * 3 * (4 * 8) + 32 * 4 * 3 * (4 * 4)
    assert fc["rank"] == 4 and fc["macs"] == 4 * (32 + 10) and fc["macs_dense"] == 320
    assert body["backend"] == "torch"
    assert s.macs == sum(r["macs"] for r in s.rows) < s.macs_dense
    assert s.params < s.params_dense


def test_str_renders_every_layer_and_the_totals():
    model = Tiny().eval()
    trp.compile(model, rank=4)
    text = str(trp.summary(model, torch.randn(1, 3, 16, 16)))
    for name in ("stem", "body", "spatial", "fc", "total", "MACs dense"):
        assert name in text
    assert "2 of 4 conv/linear layers factored" in text
    assert "stem (the first conv the input meets)" in text


def test_layers_the_input_never_reaches():
    model = Tiny().eval()
    model.unused = nn.Conv2d(3, 3, 3)
    rows = {r["name"]: r for r in trp.summary(model, torch.randn(1, 3, 8, 8)).rows}
    assert rows["unused"]["macs"] == 0 and rows["unused"]["note"] == "not called by the example input"


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        trp.summary("resnet", torch.randn(1))
    with pytest.raises(TypeError, match="example_input must be a tensor or a tuple of tensors"):
        trp.summary(Tiny(), [1, 2, 3])


def test_summary_changes_nothing_in_a_training_model():
    from trp import models

    model = models.resnet_cifar(20).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trp.summary(model, torch.randn(2, 3, 32, 32))
    assert model.training and model.layer1[0].bn1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
