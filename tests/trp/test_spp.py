"""trp.SPP, Structured Probabilistic Pruning of im2col columns: the Δ schedule, the keep
probabilities, the masks, pruned columns staying zero through training, the stop at the
target, exact resume."""

import math

import pytest
import torch
import torch.nn as nn

import trp
from trp import models, spp
from tests.trp.test_training import _loaders, straight_and_resumed


def test_delta_schedule_values():
    remaining = 72
    alpha = math.log(2 / spp.U) / remaining
    n1 = -math.log(spp.U) / alpha
    at = lambda r: float(spp.delta(torch.tensor([r], dtype=torch.float64), remaining))  # noqa: E731
    assert at(0) == pytest.approx(spp.A)                     # the least important column drops most
    assert at(n1) == pytest.approx(spp.U * spp.A)            # where the two branches meet
    assert at(n1 - 1e-9) == pytest.approx(at(n1 + 1e-9))     # continuously
    assert at(remaining) == pytest.approx(0, abs=1e-15)      # the last column still to prune: no change
    assert at(remaining + 5) < 0                             # above R': recovers
    values = spp.delta(torch.arange(0, 100), remaining)
    assert bool((values[1:] < values[:-1]).all())            # falls with the rank
    with pytest.raises(ValueError, match="remaining must be >= 1"):
        spp.delta(torch.arange(3), 0)


def test_a_column_at_q_09_is_kept_about_90_percent_of_the_time():
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.9, 0.0, 1.0, 0.5], dtype=torch.float64)
    kept = torch.stack([spp.draw(q, g) for _ in range(20000)]).double().mean(0)
    assert abs(float(kept[0]) - 0.9) < 0.01 and kept[1] == 0 and kept[2] == 1 and abs(float(kept[3]) - 0.5) < 0.015


def _conv(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(4, 6, 3, padding=1))


def test_keep_probabilities_move_monotonically_for_a_fixed_ranking():
    model = _conv()
    with torch.no_grad():  # column j scores j + 1: the ranking is fixed while nothing is pruned
        model[0].weight.copy_(torch.arange(1, 37, dtype=torch.float32).view(1, 4, 3, 3).expand(6, 4, 3, 3) / 36)
    method = trp.SPP(model, target=0.5, filter_fn=lambda m, q: True)
    history = []
    for _ in range(15):  # before any column reaches 0 (Δ ≤ A = 0.05 per update)
        method.before_forward()
        method.after_step()
        history.append(method.q["0"].clone())
    history = torch.stack(history)
    assert not method.pruned["0"].any()
    steps = history[1:] - history[:-1]
    below, above = slice(0, 18), slice(19, 36)   # R' = 18: ranks 0..17 fall, those above 18 recover (q stays 1)
    assert bool((steps[:, below] < 0).all()) and bool((history[:, above] == 1).all())
    assert bool((history[-1, :17] < history[-1, 1:18]).all())  # the less important, the lower


def test_pruned_columns_stay_zero_through_training_and_the_layer_stops_at_its_target():
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    train, _ = _loaders(batch=16)  # 32 steps an epoch
    method = trp.SPP(model, target=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for epoch in range(6):
        method.epoch_start(epoch)
        for x, y in train:
            method.before_forward()
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            method.after_backward()
            for fqn, (m, _, _) in method.targets.items():  # a masked column gets no gradient
                mask = method._held[fqn][0].view(m.weight.shape[1:])
                assert not m.weight.grad[:, ~mask].any()
            before = {f: m.weight.detach().clone() for f, (m, _, _) in method.targets.items()}
            held = {f: method._held[f] for f in method.targets}
            optimizer.step()
            method.after_step()
            for fqn, (m, _, _) in method.targets.items():
                pruned = method.pruned[fqn].view(m.weight.shape[1:])
                assert not m.weight[:, pruned].any()  # pruned columns stay zero
                out = ~held[fqn][0].view(m.weight.shape[1:])  # the columns masked out of this step
                assert not before[fqn][:, out].any()  # zero in the forward pass and the step
                expect = held[fqn][1].clone()
                expect[:, pruned[out]] = 0
                assert torch.equal(m.weight[:, out], expect)  # back as they were (or pruned now)
        method.epoch_end(epoch)
    assert all(method.done.values()), method.kept()
    for fqn, pruned in method.pruned.items():
        assert int(pruned.sum()) == method.quota(fqn)  # exactly the target, and then stopped
        assert bool((method.q[fqn][~pruned] == 1).all())


def test_spp_resume_equals_an_uninterrupted_run(tmp_path):
    (_, a), (_, b) = straight_and_resumed(tmp_path, lambda model: trp.SPP(model, target=0.5))
    assert a.step_count == b.step_count == 24
    for fqn in a.targets:
        assert torch.equal(a.q[fqn], b.q[fqn]) and torch.equal(a.pruned[fqn], b.pruned[fqn])
    assert torch.equal(a.generator.get_state(), b.generator.get_state())


def test_spp_arguments_and_plan():
    model = models.resnet_cifar(8)
    with pytest.raises(ValueError, match="target must be a fraction"):
        trp.SPP(model, target=1.0)
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        trp.SPP(model, interval=0)
    assert trp.SPP(model).plan() == {}  # nothing pruned yet: every target stays dense
