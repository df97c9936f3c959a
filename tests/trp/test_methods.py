"""The method interface (trp.methods.Method) that trp.fit drives, and the plan it hands to
trp.compile (trp.plan): hooks in order, an extra loss term, history records, exact resume,
compile's layers and ranks taken from the plan."""

import re

import pytest
import torch
import torch.nn as nn

import trp
from trp import checkpoint, models
from trp.methods import Method, decide_on_rank0
from trp.plan import LayerChoice, Plan
from trp.training import TRP
from tests.trp.test_training import _loaders


class Decay(Method):
    """A user's own method: an L2 pull of each target weight toward zero as an extra loss
    term, a count of every hook call, and a plan at a fixed rank."""

    name = "decay"

    def __init__(self, model, strength=0.1, rank=2):
        super().__init__(model)
        self.strength, self.rank, self.calls, self.epochs = strength, rank, [], 0

    def epoch_start(self, epoch):
        self.calls.append(("epoch_start", epoch))

    def before_forward(self):
        self.calls.append("before_forward")

    def loss(self):
        self.calls.append("loss")
        return self.strength * sum((m.weight ** 2).sum() for m, _, _ in self.targets.values())

    def after_backward(self):
        self.calls.append("after_backward")

    def after_step(self):
        self.calls.append("after_step")

    def epoch_end(self, epoch):
        self.calls.append(("epoch_end", epoch))
        self.epochs += 1

    def record(self):
        return {"epochs_seen": self.epochs}

    def state_dict(self):
        return {**super().state_dict(), "epochs": self.epochs}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.epochs = state["epochs"]

    def plan(self):
        return Plan({fqn: LayerChoice(family.name, self.rank) for fqn, (_, _, family) in self.targets.items()})


def test_fit_calls_a_methods_hooks_in_order_and_records_it():
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    train, val = _loaders()
    method = Decay(model)
    history = trp.fit(model, train, val, epochs=2, method=method, progress=False, lr=0.05)
    steps = len(train)
    epoch = [("epoch_start", 0)] + ["before_forward", "loss", "after_backward", "after_step"] * steps + [("epoch_end", 0)]
    assert method.calls == epoch + [("epoch_start", 1)] + epoch[1:-1] + [("epoch_end", 1)]
    assert [h["epochs_seen"] for h in history] == [1, 2]


def test_the_extra_loss_term_reaches_the_gradients():
    """One step of fit with the method's L2 term moves each target weight by the term's
    gradient more than a plain step does: w' = w - lr * (g + 2 * strength * w)."""
    lr, strength = 0.05, 0.5
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    loader = [(x, y)]

    def one_step(method_strength):
        torch.manual_seed(0)
        model = models.resnet_cifar(8)
        method = Decay(model, strength=method_strength) if method_strength else None
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        trp.fit(model, loader, epochs=1, method=method, optimizer=opt, progress=False)
        return model

    plain, pulled = one_step(0), one_step(strength)
    torch.manual_seed(0)
    start = models.resnet_cifar(8)
    for fqn in Decay(start).targets:
        w0 = start.get_submodule(fqn).weight
        moved = pulled.get_submodule(fqn).weight - plain.get_submodule(fqn).weight
        torch.testing.assert_close(moved, -lr * 2 * strength * w0, rtol=1e-4, atol=1e-6)


def test_resume_restores_a_methods_state_exactly(tmp_path):
    def run(epochs, resume):
        torch.manual_seed(0)
        model = models.resnet_cifar(8)
        train, _ = _loaders()
        method = Decay(model)
        trp.fit(model, train, epochs=epochs, method=method, checkpoint_dir=tmp_path / ("b" if resume or epochs == 1
                                                                                      else "a"),
                resume=resume, progress=False, lr=0.05)
        return model, method

    straight, m1 = run(2, False)
    run(1, False)
    resumed, m2 = run(2, True)
    assert m1.epochs == m2.epochs == 2
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


def test_resume_refuses_another_method_or_none(tmp_path):
    model = models.resnet_cifar(8)
    train, _ = _loaders()
    trp.fit(model, train, epochs=1, method=Decay(model), checkpoint_dir=tmp_path, progress=False, lr=0.05)
    with pytest.raises(checkpoint.CheckpointError, match=r"does not match this method \(trp\).*'decay'"):
        trp.fit(model, train, epochs=2, method=TRP(model), checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(checkpoint.CheckpointError, match="written with method 'decay'; resume it with that method"):
        trp.fit(model, train, epochs=2, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_a_checkpoint_from_before_the_method_interface_resumes(tmp_path):
    """Checkpoints written before methods had one interface keep TRP's state under "trp"."""
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    train, _ = _loaders()
    controller = TRP(model, period=2)
    trp.fit(model, train, epochs=1, method=controller, checkpoint_dir=tmp_path, progress=False, lr=0.05)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    old = dict(state)
    old["trp"] = {k: v for k, v in old.pop("method").items() if k != "method"}
    checkpoint.save(tmp_path, old)
    again = TRP(model, period=2)
    trp.fit(model, train, epochs=2, method=again, checkpoint_dir=tmp_path, resume=True, progress=False, lr=0.05)
    assert again.step_count == 2 * len(train)


def test_compile_factors_exactly_the_plan():
    model = models.resnet_cifar(8).eval()
    plan = Plan({"layer1.0.conv1": LayerChoice("channel", 3), "layer2.0.conv2": LayerChoice("spatial", 5),
                 "layer3.0.conv1": LayerChoice("tucker", (4, 6))})
    compiled = trp.compile(model, plan=plan, inplace=False)
    low = {n: m for n, m in compiled.named_modules() if isinstance(m, trp.LowRankConv2d)}
    assert set(low) == set(plan)
    assert (low["layer1.0.conv1"].scheme, low["layer1.0.conv1"].rank) == ("channel", 3)
    assert (low["layer2.0.conv2"].scheme, low["layer2.0.conv2"].rank) == ("spatial", 5)
    assert (low["layer3.0.conv1"].scheme, low["layer3.0.conv1"].ranks) == ("tucker", (4, 6))
    notes = trp.summary(compiled, torch.randn(1, 3, 16, 16)).rows
    assert any("not in the plan" in (r.get("note") or "") for r in notes)


def test_a_trp_plan_compiles_as_the_regex_overrides_did():
    """The plan carries TRP's family and ranks as they are: the same factors as the
    escaped-regex overrides at rank_multiple=1 that it replaces."""
    torch.manual_seed(0)
    model = models.resnet_cifar(8)
    controller = TRP(model, energy=0.8, period=1)
    controller.project()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    by_plan = trp.compile(model, plan=controller.plan(), inplace=False)
    by_regex = trp.compile(model, overrides={re.escape(f): r for f, r in controller.ranks.items()}, rank_multiple=1,
                           inplace=False)
    with torch.no_grad():
        assert torch.equal(by_plan(x), by_regex(x))
    assert {n: m.rank for n, m in by_plan.named_modules() if isinstance(m, trp.LowRankConv2d)} == controller.ranks


def test_compile_with_a_plan_checks_it():
    model = models.resnet_cifar(8).eval()
    plan = Plan({"layer1.0.conv1": LayerChoice("channel", 3)})
    with pytest.raises(ValueError, match="plan carries each layer's family and ranks; do not also pass energy, scheme"):
        trp.compile(model, plan=plan, energy=0.5, scheme="spatial", inplace=False)
    with pytest.raises(ValueError, match=r"plan names \['layer9.conv'\], which are not conv or linear layers"):
        trp.compile(model, plan=Plan({"layer9.conv": LayerChoice("channel", 3)}), inplace=False)
    with pytest.raises(ValueError, match=r"plan\['layer1.0.conv1'\] asks for family 'pointwise', which cannot factor it"):
        trp.compile(model, plan=Plan({"layer1.0.conv1": LayerChoice("pointwise", 3)}), inplace=False)
    with pytest.raises(TypeError, match=r"plan must be a trp.plan.Plan \(a method's plan\(\)\), got dict"):
        trp.compile(model, plan={"layer1.0.conv1": 3}, inplace=False)


def test_plan_values_are_checked():
    with pytest.raises(ValueError, match="family must be one of"):
        LayerChoice("svd", 3)
    with pytest.raises(ValueError, match=r"ranks must be an int >= 1 or a tuple of them, got 0"):
        LayerChoice("channel", 0)
    with pytest.raises(TypeError, match=r"plan\['a'\] must be a trp.plan.LayerChoice or TapChoice, got int"):
        Plan({"a": 3})
    plan = Plan({"a": LayerChoice("tucker", [3, 4]), "b": LayerChoice("channel", (5,))})
    assert plan["a"].ranks == (3, 4) and plan["b"].ranks == 5
    assert Plan.from_json(plan.to_json()) == plan


def test_a_method_without_targets_or_plan_says_so():
    with pytest.raises(ValueError, match="Method found no target layer"):
        Method(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(NotImplementedError, match="Method must implement plan"):
        Method(models.resnet_cifar(8)).plan()
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        Method("model")


def test_decide_on_rank0_without_a_process_group_is_the_computation():
    t = torch.randn(3)
    assert decide_on_rank0(lambda: [t], [torch.empty(3)])[0] is t
