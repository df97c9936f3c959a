"""TRP controller: projection, nuclear-norm sub-gradient, targets, state; fit with resume."""

import pytest
import torch
import torch.nn as nn

import trp
from trp import decompose, families, models
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
    family = families.get(scheme)
    before = {fqn: family.spectra(m.weight)[0] for fqn, (m, _, _) in controller.targets.items()}
    controller.project()
    for fqn, (m, _, _) in controller.targets.items():
        r = controller.ranks[fqn]
        assert r == decompose.select_rank(before[fqn], decompose.RankSpec(energy=0.8, rank_multiple=1))
        s = family.spectra(m.weight)[0]
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


def crashing_loss(crash_after=None):
    """Cross entropy that raises Crash on its call after ``crash_after`` calls (a run killed
    part-way; None: never)."""
    calls = [0]

    def loss_fn(out, y, **kw):
        calls[0] += 1
        if crash_after is not None and calls[0] > crash_after:
            raise Crash
        return nn.functional.cross_entropy(out, y, **kw)
    return loss_fn


def straight_and_resumed(tmp_path, make_method):
    """Train resnet_cifar(8) with ``make_method(model)`` for 3 epochs straight (in
    tmp_path/a), and again killed part-way through epoch 3 and resumed (in tmp_path/b):
    ((model, method) straight, (model, method) resumed), asserting the same weights."""
    def run(directory, resume, crash_after=None):
        torch.manual_seed(0)
        model = models.resnet_cifar(8)
        train, val = _loaders()
        method = make_method(model)
        try:
            trp.fit(model, train, val, epochs=3, method=method, checkpoint_dir=directory, resume=resume,
                    progress=False, lr=0.05, loss_fn=crashing_loss(crash_after))
        except Crash:
            pass
        return model, method

    straight = run(tmp_path / "a", False)
    run(tmp_path / "b", False, crash_after=2 * (8 + 2) + 3)  # 8 train batches + 2 val batches per epoch
    resumed = run(tmp_path / "b", True)
    for (n, p), (_, q) in zip(straight[0].state_dict().items(), resumed[0].state_dict().items()):
        assert torch.equal(p, q), n
    return straight, resumed


def test_resume_after_a_crash_ends_with_the_same_weights(tmp_path):
    (_, c1), (_, c2) = straight_and_resumed(tmp_path, lambda model: TRP(model, period=2))
    assert c1.step_count == c2.step_count == 3 * 8
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["last.pt", "previous.pt"]


def test_fit_learns_digits_and_reports_history():
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    train, val = _loaders()
    history = trp.fit(model, train, val, epochs=6, progress=False, lr=0.05, method=TRP(model))
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
    with pytest.raises(TypeError, match=r"method must be a trp.methods.Method \(e.g. trp.TRP\(model\)\) or None, got str"):
        trp.fit(model, train, epochs=1, method="yes")


def _train(directory, resume=False, crash_in_epoch=None):
    """A 3-epoch run (8 train + 2 validation batches an epoch), killed early in epoch
    ``crash_in_epoch`` when given."""
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    train, val = _loaders()
    calls = [0]

    def loss_fn(out, y, **kw):
        calls[0] += 1
        if crash_in_epoch is not None and calls[0] > (crash_in_epoch - 1) * (8 + 2) + 3:
            raise Crash
        return nn.functional.cross_entropy(out, y, **kw)

    try:
        trp.fit(model, train, val, epochs=3, method=TRP(model, period=2), checkpoint_dir=directory, resume=resume,
                progress=False, lr=0.05, loss_fn=loss_fn)
    except Crash:
        pass
    return model


def _flip_a_weight_byte(path):
    """Flip one byte inside a weight tensor's data of a torch.save zip (a stored record)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path):
    """The issue's case: one flipped byte in a weight tensor of last.pt resumed silently and
    ended with different weights. Now: last.pt fails its checksum, previous.pt (one epoch
    back) is resumed with a warning, and the run ends with the uninterrupted run's weights."""
    from trp.checkpoint import CheckpointError, read

    straight = _train(tmp_path / "a")
    _train(tmp_path / "b", crash_in_epoch=3)  # last.pt = epoch 2, previous.pt = epoch 1
    _flip_a_weight_byte(tmp_path / "b" / "last.pt")
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        read(tmp_path / "b" / "last.pt")
    with pytest.warns(RuntimeWarning, match="resuming from .*previous.pt, one epoch back: .*does not match its checksum"):
        resumed = _train(tmp_path / "b", resume=True)
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("damage, match", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read \\(truncated or corrupt\\?\\)"),
    (_flip_a_weight_byte, "does not match its checksum"),
])
def test_no_usable_checkpoint_is_a_clear_error(tmp_path, damage, match):
    from trp.checkpoint import CheckpointError

    _train(tmp_path, crash_in_epoch=2)
    assert not (tmp_path / "previous.pt").exists()
    damage(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="no checkpoint to resume from: .*" + match):
        _train(tmp_path, resume=True)


def test_a_checkpoint_for_another_model_says_so(tmp_path):
    from trp.checkpoint import CheckpointError

    _train(tmp_path, crash_in_epoch=2)
    torch.manual_seed(0)
    other = models.resnet_cifar(14)
    train, _ = _loaders()
    with pytest.raises(CheckpointError, match="does not match this model"):
        trp.fit(other, train, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_fit_checks_its_arguments_before_training(tmp_path):
    model = models.resnet_cifar(8)
    train, _ = _loaders()
    for kw, match in ((dict(lr=float("nan")), "lr must be a finite number > 0"), (dict(lr=0), "lr must be"),
                      (dict(momentum=-1), "momentum must be a finite number >= 0"),
                      (dict(weight_decay=float("inf")), "weight_decay must be")):
        with pytest.raises(ValueError, match=match):
            trp.fit(model, train, epochs=1, progress=False, **kw)
    with pytest.raises(ValueError, match="model has no parameters to train"):
        trp.fit(nn.Sequential(nn.ReLU()), train, epochs=1, progress=False)
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir .* is not a writable directory"):
        trp.fit(model, train, epochs=1, checkpoint_dir=blocked / "sub", progress=False)
    import os

    if os.path.isdir("/sys/kernel") and not os.access("/sys/kernel", os.W_OK | os.X_OK) or os.geteuid() == 0:
        calls = []
        with pytest.raises(ValueError, match="checkpoint_dir '/sys/kernel' is not a writable directory"):
            trp.fit(model, train, epochs=1, checkpoint_dir="/sys/kernel", progress=False,
                    loss_fn=lambda *a, **k: calls.append(1))
        assert not calls  # refused before the first batch


def test_checkpoints_get_the_mode_the_umask_gives(tmp_path):
    import os

    old = os.umask(0o027)
    try:
        _train(tmp_path, crash_in_epoch=3)
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"last.pt": 0o640,
                                                                              "previous.pt": 0o640}


def test_resumed_optimizer_state_takes_its_parameters_layout():
    """State saved from a parameter in one memory layout, loaded for the same parameter in
    another: a fused optimizer would mix up elements unless the state is re-laid."""
    from trp.training import _match_state_layout

    w = torch.randn(8, 4, 3, 3)
    a = nn.Parameter(w.clone())
    b = nn.Parameter(w.clone().to(memory_format=torch.channels_last))
    opt_a, opt_b = torch.optim.Adam([a], lr=0.1, fused=True), torch.optim.Adam([b], lr=0.1, fused=True)
    target = torch.randn(8, 4, 3, 3)
    for p, opt in ((a, opt_a), (b, opt_b)):
        (p - target).square().sum().backward()
        opt.step()
    import copy

    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))  # a's contiguous state, as from a checkpoint
    assert opt_b.state[b]["exp_avg"].stride() != b.stride()
    _match_state_layout(opt_b)
    assert opt_b.state[b]["exp_avg"].stride() == b.stride()
    for p, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        (p - target).square().sum().backward()
        opt.step()
    assert torch.allclose(a, b)


def test_a_damaged_digest_key_is_not_taken_for_an_old_checkpoint(tmp_path):
    """Flipping one bit of the key name 'digest' must not make the checkpoint pass as one
    from an older trp (which is resumed unverified)."""
    from trp.checkpoint import CheckpointError, read

    _train(tmp_path, crash_in_epoch=2)
    path = tmp_path / "last.pt"
    data = path.read_bytes()
    assert data.count(b"digest") >= 1
    path.write_bytes(data.replace(b"digest", b"digesu"))
    with pytest.raises(CheckpointError, match="no checksum where this format keeps one"):
        read(path)


def test_after_a_fallback_the_damaged_file_is_set_aside(tmp_path):
    """Resumed from previous.pt because last.pt was damaged: last.pt is kept as
    last.pt.damaged, so the next save does not rotate it over the good previous.pt."""
    _train(tmp_path, crash_in_epoch=3)
    _flip_a_weight_byte(tmp_path / "last.pt")
    with pytest.warns(RuntimeWarning, match="kept as last.pt.damaged"):
        _train(tmp_path, resume=True)  # from epoch 1's checkpoint: trains epochs 2 and 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "last.pt.damaged", "previous.pt"]
    from trp.checkpoint import read

    assert read(tmp_path / "last.pt")["epoch"] == 3 and read(tmp_path / "previous.pt")["epoch"] == 2


def test_a_checkpoint_for_another_optimizer_changes_nothing(tmp_path):
    from trp.checkpoint import CheckpointError

    _train(tmp_path, crash_in_epoch=2)
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    controller = TRP(model, period=2)
    train, _ = _loaders()
    with pytest.raises(CheckpointError, match="does not match this optimizer"):
        trp.fit(model, train, epochs=3, method=controller, checkpoint_dir=tmp_path, resume=True, progress=False,
                optimizer=torch.optim.Adam([next(model.parameters())]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and controller.step_count == 0
