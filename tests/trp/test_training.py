"""TRP controller: projection, nuclear-norm sub-gradient, targets, state; fit with resume."""

import pytest
import torch
import torch.nn as nn

import trp
from trp import decompose, models
from trp.data import digits_tensors
from trp.training import TRP


def _step(model, controller, opt, x, y):
    controller.project()
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    controller.regularize()
    opt.step()
    return loss.item()


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_projection_leaves_weights_at_the_energy_rank(scheme):
    model = models.resnet_cifar(8)
    controller = TRP(model, energy=0.8, scheme=scheme, nuclear_weight=0.0)
    before = {fqn: decompose.conv_singular_values(m.weight, scheme) for fqn, (m, _, _) in controller.targets.items()}
    controller.project()
    for fqn, (m, _, _) in controller.targets.items():
        r = controller.ranks[fqn]
        assert r == decompose.select_rank(before[fqn], decompose.RankSpec(energy=0.8, rank_multiple=1))
        s = decompose.conv_singular_values(m.weight, scheme)
        assert s[r:].max() < 1e-5 * s[0]  # exactly rank r (up to fp32 rounding)
        assert torch.allclose(s[:r], before[fqn][:r], rtol=1e-5)  # the kept spectrum is untouched


def test_targets_are_what_compile_factors():
    model = models.resnet_cifar(20).eval()
    controller = TRP(model, overrides={r"layer1\.0\.conv1": None})
    compiled = trp.compile(model, rank=2, overrides={r"layer1\.0\.conv1": None}, inplace=False)
    factored = {n for n, m in compiled.named_modules() if isinstance(m, trp.LowRankConv2d)}
    assert set(controller.targets) == factored
    assert "conv1" not in controller.targets  # the stem


def test_nuclear_subgradient_is_added_on_projection_steps():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    controller = TRP(conv, energy=1.0, nuclear_weight=0.5, period=2)
    w = conv[1].weight
    x = torch.randn(2, 3, 9, 9)
    for step in range(3):
        controller.project()
        conv.zero_grad()
        conv(x).sum().backward()
        plain = w.grad.clone()
        u, s, vh = torch.linalg.svd(w.detach().double().reshape(8, -1), full_matrices=False)
        controller.regularize()
        expected = 0.5 * (u @ vh).reshape(w.shape).float() if step % 2 == 0 else torch.zeros_like(w)
        assert torch.allclose(w.grad - plain, expected, atol=1e-5), step


def test_nuclear_every_step_and_period():
    model = models.resnet_cifar(8)
    controller = TRP(model, period=3, nuclear_every_step=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    m = controller.targets["layer1.0.conv1"][0]
    projected = []
    for _ in range(4):
        before = m.weight.detach().clone()
        controller.project()
        projected.append(not torch.equal(before, m.weight))
        _step(model, controller, opt, x, y)
    assert projected == [True, False, False, True]
    assert controller.step_count == 4


def test_state_dict_round_trip_and_mismatch():
    model = models.resnet_cifar(8)
    a = TRP(model, period=3)
    a.step_count = 7
    b = TRP(model, period=3)
    b.load_state_dict(a.state_dict())
    assert b.step_count == 7
    with pytest.raises(ValueError, match="period=3, this controller 2"):
        TRP(model, period=2).load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs,match", [
    (dict(energy=0), "energy must be"),
    (dict(nuclear_weight=-1), "nuclear_weight must be a number >= 0"),
    (dict(period=0), "period must be an int >= 1"),
    (dict(scheme="tt"), "scheme must be one of"),
    (dict(filter_fn=lambda m, q: False), "found no target layer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TRP(models.resnet_cifar(8), **kwargs)


def _loaders(batch=64):
    from torch.utils.data import DataLoader, TensorDataset

    xtr, ytr, xte, yte = digits_tensors(size=16)
    return (DataLoader(TensorDataset(xtr[:512], ytr[:512]), batch_size=batch, shuffle=True),
            DataLoader(TensorDataset(xte, yte), batch_size=256))


class Crash(Exception):
    pass


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path):
    def run(directory, resume, crash_after=None):
        torch.manual_seed(0)
        model = models.resnet_cifar(8)
        train, val = _loaders()
        controller = TRP(model, period=2)
        calls = [0]

        def loss_fn(out, y, **kw):
            calls[0] += 1
            if crash_after is not None and calls[0] > crash_after:
                raise Crash  # killed part-way through epoch 3
            return nn.functional.cross_entropy(out, y, **kw)

        try:
            trp.fit(model, train, val, epochs=3, trp=controller, checkpoint_dir=directory, resume=resume,
                    progress=False, lr=0.05, loss_fn=loss_fn)
        except Crash:
            pass
        return model, controller

    straight, c1 = run(tmp_path / "a", False)
    run(tmp_path / "b", False, crash_after=2 * (8 + 2) + 3)  # 8 train batches + 2 val batches per epoch
    resumed, c2 = run(tmp_path / "b", True)
    assert c1.step_count == c2.step_count == 3 * 8
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["last.pt"]


def test_fit_learns_digits_and_reports_history():
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    train, val = _loaders()
    history = trp.fit(model, train, val, epochs=6, progress=False, lr=0.05, trp=TRP(model))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 60  # chance is 10%; this run reached 81% when written
    assert set(history[-1]["ranks"]) == {n for n, m in model.named_modules()
                                         if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)} - {"conv1"}


def test_fit_bad_arguments(tmp_path):
    model = models.resnet_cifar(8)
    train, _ = _loaders()
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        trp.fit(model, train, epochs=0)
    with pytest.raises(ValueError, match="resume=True needs checkpoint_dir"):
        trp.fit(model, train, epochs=1, resume=True)
    with pytest.raises(TypeError, match="trp must be a trp.TRP controller"):
        trp.fit(model, train, epochs=1, trp="yes")
