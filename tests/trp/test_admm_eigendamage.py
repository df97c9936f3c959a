"""trp.ADMM (tensor train through ADMM) and trp.EigenDamage (pruning in the Kronecker-
factored eigenbasis): each method's defining behaviour on small models, their hand-off to
trp.compile as explicit stage weights, fine-tuning the compiled model, and exact resume."""

import copy

import pytest
import torch
import torch.nn as nn

import trp
from trp import families, models
from trp.plan import LayerChoice, Plan
from tests.trp.test_training import Crash, _loaders, crashing_loss, straight_and_resumed

TUCKER = families.REGISTRY["tucker"]


def _trained(epochs=1, depth=8):
    torch.manual_seed(0)
    model = models.resnet_cifar(depth)
    train, _ = _loaders()
    if epochs:
        trp.fit(model, train, epochs=epochs, progress=False, lr=0.05)
    return model.eval()


def _out(model, x):
    with torch.no_grad():
        return model(x)


# --- ADMM ------------------------------------------------------------------------------

def test_admm_moves_weights_to_the_tensor_train_set_and_z_has_the_ranks():
    """A conv learning a teacher whose kernel is a tensor train at ranks (3, 5), from a
    random start: ADMM's residual ‖W − Z‖ falls epoch by epoch and the weight ends within
    the noise of the TT set; Z has exactly the ranks asked for."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    teacher = TUCKER.compose(TUCKER.factor_tt(torch.randn(16, 8, 3, 3), (3, 5)).weights)
    x = torch.randn(512, 8, 8, 8)
    y = nn.functional.conv2d(x, teacher, padding=1) + 0.05 * torch.randn(512, 16, 8, 8)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False))
    admm = trp.ADMM(model, rank=(3, 5), rho=0.1, filter_fn=lambda m, q: True)
    start = admm.distance()
    history = trp.fit(model, loader, epochs=8, method=admm, progress=False, lr=0.01, loss_fn=nn.functional.mse_loss)
    residual = [h["admm_residual"] for h in history]
    assert all(b <= a + 1e-3 for a, b in zip(residual, residual[1:])), residual  # falls across epochs
    assert residual[-1] < 0.1 * residual[0] and history[-1]["admm_gap"] < 0.1 * start["gap"], (start, history)
    z = admm.z["0"].double()
    assert admm.ranks["0"] == (3, 5)
    assert torch.linalg.matrix_rank(z.reshape(16, -1), rtol=1e-5) == 5  # the output-channel unfolding: r2
    assert torch.linalg.matrix_rank(z.transpose(0, 1).reshape(8, -1), rtol=1e-5) == 3  # the input-channel one: r1
    # the TT unfolding (r2·k²) × c of the core-and-first-stage has rank r1 too
    rest = TUCKER.factor_tt(z, (8, 16)).weights
    assert torch.linalg.matrix_rank(rest[0].reshape(8, 8), rtol=1e-5) == 3


def test_admm_updates_z_and_u_at_each_epoch_start_as_the_splitting_says():
    model = _trained(0)
    admm = trp.ADMM(model, rank=(4, 4), rho=1e-3)
    fqn, (m, _, _) = next(iter(admm.targets.items()))
    torch.testing.assert_close(admm.z[fqn], admm._project(fqn, m.weight.detach()))  # Z = Π(W)
    assert not admm.u[fqn].any()  # U = 0
    admm.epoch_start(0)  # the first epoch starts from there
    assert not admm.u[fqn].any()
    with torch.no_grad():
        m.weight.add_(0.05 * torch.randn_like(m.weight))
    w, u_old = m.weight.detach().clone(), admm.u[fqn].clone()
    admm.epoch_start(1)
    z = admm._project(fqn, w + u_old)
    torch.testing.assert_close(admm.z[fqn], z)
    torch.testing.assert_close(admm.u[fqn], u_old + w - z)
    admm.epoch_start(1)  # once per epoch
    torch.testing.assert_close(admm.u[fqn], u_old + w - z)
    # the extra loss term: ρ/2 Σ ‖W − Z + U‖², whose gradient is ρ (W − Z + U)
    model.zero_grad()
    admm.loss().backward()
    torch.testing.assert_close(m.weight.grad, 1e-3 * (w - admm.z[fqn] + admm.u[fqn]))


def test_tt_svd_is_exact_at_full_rank_and_has_its_ranks():
    w = torch.randn(24, 12, 3, 3, dtype=torch.float64)
    full = TUCKER.factor_tt(w, (12, 24))
    torch.testing.assert_close(TUCKER.compose(full.weights), w)
    low = TUCKER.factor_tt(w, (4, 6))
    assert [tuple(t.shape) for t in low.weights] == [(4, 12, 1, 1), (6, 4, 3, 3), (24, 6, 1, 1)]
    assert low.ranks == (4, 6) and 0 < low.errors[0] < 1


def test_admm_plan_compiles_to_the_projected_weights():
    model = _trained()
    admm = trp.ADMM(model, ratio=0.5)
    x = next(iter(_loaders()[1]))[0][:4]
    projected = copy.deepcopy(model)
    with torch.no_grad():
        for fqn in admm.targets:
            projected.get_submodule(fqn).weight.copy_(admm._project(fqn, model.get_submodule(fqn).weight))
    compiled = trp.compile(copy.deepcopy(model), plan=admm.plan())  # BN folded into the chains' last stage
    assert isinstance(compiled.get_submodule("layer1.0.conv1"), trp.LowRankConv2d)
    want = _out(projected, x)
    torch.testing.assert_close(_out(compiled, x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# --- EigenDamage -----------------------------------------------------------------------

def test_eigendamage_at_ratio_zero_is_exact_and_its_rotations_are_orthogonal():
    model = _trained()
    train, val = _loaders()
    ed = trp.EigenDamage(model, ratio=0.0)
    ed.prune(model, train)
    for fqn, (lam_a, q_a, lam_s, q_s) in ed.bases.items():
        for q in (q_a, q_s):
            torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1], dtype=q.dtype), atol=1e-10, rtol=0)
        assert (lam_a >= 0).all() and (lam_s >= 0).all()
    assert all(r == (m.in_channels, m.out_channels) for r, (m, _, _) in zip(ed.ranks.values(), ed.targets.values()))
    x = next(iter(val))[0][:4]
    compiled = trp.compile(copy.deepcopy(model), plan=ed.plan())
    want = _out(model, x)
    torch.testing.assert_close(_out(compiled, x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


class Dead(nn.Module):
    """conv1 → ReLU → conv2 → pool → fc, with conv1's channel 2 never positive: conv2's input
    direction e_2 carries nothing (A has eigenvalue 0 there)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv1.weight[2].zero_()
            self.conv1.bias[2] = -1.0

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.relu(self.conv3(x)).mean((2, 3)))


def test_eigendamage_prunes_a_planted_dead_direction_first():
    torch.manual_seed(0)
    model = Dead()
    train, _ = _loaders()
    ed = trp.EigenDamage(model, ratio=0.0, filter_fn=lambda m, q: q in ("conv2", "conv3"))
    ed.prune(model, train)
    lam_a, q_a, _, _ = ed.bases["conv2"]
    dead = int(q_a[2].abs().argmax())  # the eigenvector along e_2
    assert q_a[2, dead].abs() > 0.999 and lam_a[dead] == 0
    imp_in = ed.importance["conv2"][0]
    assert imp_in[dead] == 0
    assert (imp_in > 0).sum() == 7 and (ed.importance["conv2"][1] > 0).all()  # every other conv2 direction matters
    zeros = sum(int((i == 0).sum()) for s in ed.importance.values() for i in s)  # (conv3 may have a dead output)
    ed.select(zeros / 32)  # the zero-importance directions of the 32 (2 layers × (8 in + 8 out)) go first
    kept_in, kept_out = ed.keep["conv2"]
    assert dead not in kept_in.tolist() and len(kept_in) == 7 and len(kept_out) == 8
    x = torch.randn(2, 3, 12, 12)
    torch.testing.assert_close(_out(trp.compile(copy.deepcopy(model).eval(), plan=ed.plan(), fuse_epilogue=False), x),
                               _out(model, x), rtol=1e-4, atol=1e-5)  # pruning a dead direction changes nothing


def test_eigendamage_threshold_is_global_capped_and_keeps_the_top_direction():
    model = _trained()
    train, _ = _loaders()
    ed = trp.EigenDamage(model, ratio=0.3)
    ed.prune(model, train)
    total = sum(len(i) for s in ed.importance.values() for i in s)
    pruned_count = sum(len(i) - len(k) for f, s in ed.importance.items() for i, k in zip(s, ed.keep[f]))
    assert pruned_count == int(0.3 * total)
    kept, pruned = [], []
    for fqn, sides in ed.importance.items():
        for imp, keep in zip(sides, ed.keep[fqn]):
            mask = torch.zeros(len(imp), dtype=torch.bool)
            mask[keep] = True
            kept += imp[mask].tolist()
            pruned += imp[~mask].tolist()
    assert max(pruned) <= min(kept)  # nothing hit the cap at 0.3: one threshold
    ed.select(0.99)
    for fqn, sides in ed.importance.items():
        for imp, keep in zip(sides, ed.keep[fqn]):
            assert len(keep) >= max(1, len(imp) - int(0.95 * len(imp)))
            assert int(imp.argmax()) in keep.tolist()


def test_eigendamage_carries_a_conv_bias_exactly():
    torch.manual_seed(0)
    model = Dead().eval()
    train, _ = _loaders()
    ed = trp.EigenDamage(model, ratio=0.2, filter_fn=lambda m, q: q in ("conv2", "conv3"))
    ed.prune(model, train)
    compiled = trp.compile(copy.deepcopy(model), plan=ed.plan(), fuse_epilogue=False)
    for fqn in ("conv2", "conv3"):
        assert torch.equal(compiled.get_submodule(fqn).bias, model.get_submodule(fqn).bias)


def test_eigendamage_state_round_trips_and_errors():
    model = _trained(0)
    train, _ = _loaders()
    ed = trp.EigenDamage(model, ratio=0.4)
    with pytest.raises(RuntimeError, match="call prune"):
        ed.plan()
    ed.prune(model, train)
    other = trp.EigenDamage(model, ratio=0.4)
    other.load_state_dict(ed.state_dict())
    for (f, a), (_, b) in zip(ed.plan().items(), other.plan().items()):
        assert all(torch.equal(x, y) for x, y in zip(a.weights, b.weights)), f
    with pytest.raises(ValueError, match="ratio must be a number in"):
        trp.EigenDamage(model, ratio=1.0)
    with pytest.raises(ValueError, match="does not hold this method's target layers"):
        ed.prune(models.resnet_cifar(8), train)


# --- the hand-off: explicit stage weights ------------------------------------------------

def test_a_plans_explicit_weights_are_checked_and_not_written_as_json():
    model = _trained(0)
    m = model.get_submodule("layer1.0.conv1")
    bad = Plan({"layer1.0.conv1": LayerChoice("tucker", (2, 3), weights=(torch.zeros(2, 16, 1, 1),
                                                                           torch.zeros(3, 2, 3, 3),
                                                                           torch.zeros(16, 4, 1, 1)))})
    with pytest.raises(ValueError, match=r"gives stage weights of shapes .* has \[\(2, 16, 1, 1\), \(3, 2, 3, 3\), "
                                         r"\(16, 3, 1, 1\)\]"):
        trp.compile(copy.deepcopy(model), plan=bad)
    with pytest.raises(ValueError, match="JSON holds families and ranks only"):
        bad.to_json()
    with pytest.raises(TypeError, match="weights must be a tuple of stage weight tensors"):
        LayerChoice("tucker", (2, 3), weights="no")
    # factors at full rank do not cut MACs: the layer stays dense with the weight they compose to
    f = TUCKER.factor(m.weight.detach() * 0.5, trp.RankSpec(rank=(16, 16), rank_multiple=1))
    plan = Plan({"layer1.0.conv1": LayerChoice("tucker", (16, 16), weights=f.weights)})
    compiled = trp.compile(copy.deepcopy(model), plan=plan, fold_bn=False)
    layer = compiled.get_submodule("layer1.0.conv1")
    assert isinstance(layer, nn.Conv2d) and "kept dense with the weight the plan's factors compose to" in layer._trp_note
    torch.testing.assert_close(layer.weight, m.weight * 0.5, rtol=1e-5, atol=1e-6)


# --- fine-tuning the compiled model, and exact resume ---------------------------------------

def _finetune_run(directory, resume, crash_after=None):
    model = _trained()
    train, val = _loaders()
    ed = trp.EigenDamage(model, ratio=0.3)
    ed.prune(model, train)
    compiled = trp.compile(model, plan=ed.plan())
    torch.manual_seed(1)
    try:
        history = trp.fit(compiled, train, val, epochs=3, lr=0.01, checkpoint_dir=directory, resume=resume,
                          progress=False, loss_fn=crashing_loss(crash_after))
    except Crash:
        history = None
    return compiled, history


def test_finetuning_a_compiled_model_trains_its_factors_and_resumes_exactly(tmp_path):
    straight, history = _finetune_run(tmp_path / "a", False)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    start, _ = _finetune_run(tmp_path / "c", False, crash_after=0)
    moved = [n for (n, p), (_, q) in zip(straight.state_dict().items(), start.state_dict().items())
             if not torch.equal(p, q)]
    assert any(".stages." in n or "weight" in n for n in moved) and moved  # the factors trained
    _finetune_run(tmp_path / "b", False, crash_after=2 * (8 + 2) + 3)
    resumed, _ = _finetune_run(tmp_path / "b", True)
    for (n, p), (_, q) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(p, q), n


def test_admm_resume_equals_an_uninterrupted_run(tmp_path):
    (_, a1), (_, a2) = straight_and_resumed(tmp_path, lambda model: trp.ADMM(model, ratio=0.5, rho=0.5))
    assert a1.updated == a2.updated == 2
    for fqn in a1.targets:
        assert torch.equal(a1.z[fqn], a2.z[fqn]) and torch.equal(a1.u[fqn], a2.u[fqn])


def test_a_bn_folds_into_a_low_rank_conv_factored_before():
    """The fine-tuning form: compile with BNs kept, then compile again in eval mode: each BN
    folds into the last stage of the chain before it (a bias made where there was none)."""
    model = _trained()
    x = next(iter(_loaders()[1]))[0][:4]
    tunable = trp.compile(copy.deepcopy(model), ratio=0.5, rank_multiple=1, fold_bn=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in tunable.modules()) == 9
    layer = tunable.get_submodule("layer1.0.conv1")
    assert isinstance(layer, trp.LowRankConv2d) and layer.bias is None
    with torch.no_grad():  # BN statistics of a trained-looking network
        for m in tunable.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    want = _out(tunable.eval(), x)
    folded = trp.compile(tunable)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    layer = folded.get_submodule("layer1.0.conv1")
    assert layer.bias is not None and layer.bias.requires_grad and layer.relu  # folded, then its ReLU fused
    torch.testing.assert_close(_out(folded, x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())


def test_methods_comparison_meets_its_budgets_and_reports_every_method():
    from trp import compare

    result = compare.run(compare.METHODS, budgets=(2.0,), seeds=(0,), epochs=1, finetune_epochs=1, repeats=2,
                         progress=False, log=lambda *a: None)
    rows = result["rows"]
    dense = next(r for r in rows if r["method"] == "dense")
    assert sorted(r["method"] for r in rows) == sorted(("dense",) + compare.METHODS)
    for r in rows:
        if r["method"] == "spp":  # one epoch (12 steps) is too short for SPP's schedule to reach its target
            assert r["layers_done"] < r["layers"] and 1.0 <= dense["conv_macs"] / r["conv_macs"] < 2.0
        elif r["method"] != "dense":
            fewer = dense["conv_macs"] / r["conv_macs"]
            assert 2.0 <= fewer < 2.2, (r["method"], fewer)  # met, and not by much more
        assert r["latency_b1_ms"] > 0 and r["latency_b8_ms"] > 0 and 0 <= r["accuracy_finetuned"] <= 100
    table = compare.table(result["summary"], 1)
    assert all(compare.LABELS[m] in table for m in compare.METHODS)


def test_eigendamage_iterative_round_merges_the_bases_into_the_chain():
    """Round two on round one's compiled (and fine-tuned) model: its targets are the tucker
    chains; at ratio 0 the merged chain computes what the old one did, and pruning more
    thins the chains in place of the old ones, each still one three-stage layer."""
    model = _trained()
    train, val = _loaders()
    x = next(iter(val))[0][:4]
    first = trp.EigenDamage(model, ratio=0.4)
    first.prune(model, train)
    tunable = trp.compile(copy.deepcopy(model), plan=first.plan(), fold_bn=False)
    torch.manual_seed(0)
    trp.fit(tunable, train, epochs=1, lr=0.01, progress=False)
    tunable.eval()
    chains = [f for f in first.targets if isinstance(tunable.get_submodule(f), trp.LowRankConv2d)]
    assert len(chains) >= 4  # (the others' factors would not cut MACs: dense again)
    ranks_before = {f: tunable.get_submodule(f).ranks for f in chains}

    again = trp.EigenDamage(tunable, ratio=0.0)
    assert set(again.targets) == set(first.targets)  # the chains, and the dense 3x3s, found as targets
    again.prune(tunable, train)
    for fqn in chains:
        _, q_a, _, q_s = again.bases[fqn]
        assert q_a.shape[0] == ranks_before[fqn][0] and q_s.shape[0] == ranks_before[fqn][1]  # the core's sizes
    want = _out(tunable, x)
    same = trp.compile(copy.deepcopy(tunable), plan=again.plan(), fold_bn=False)
    torch.testing.assert_close(_out(same, x), want, rtol=1e-4, atol=1e-5 * want.abs().max().item())

    again.select(0.3)
    thinner = trp.compile(copy.deepcopy(tunable), plan=again.plan())  # BNs fold into the new chains
    assert not any(isinstance(m, nn.BatchNorm2d) for m in thinner.modules())
    for fqn in chains:
        layer = thinner.get_submodule(fqn)
        assert isinstance(layer, trp.LowRankConv2d) and layer.scheme == "tucker"
        assert all(r <= b for r, b in zip(layer.ranks, ranks_before[fqn]))
    assert sum(sum(thinner.get_submodule(f).ranks) for f in chains) < sum(map(sum, ranks_before.values()))
    with pytest.raises(ValueError, match="factored again only from stage weights"):
        trp.compile(copy.deepcopy(tunable), plan=Plan({chains[0]: LayerChoice("tucker", (2, 2))}))


def test_a_chain_factored_again_keeps_its_fused_relu():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    f = TUCKER.factor(m[1].weight, trp.RankSpec(rank=(4, 8), rank_multiple=1))
    fast = trp.compile(m, plan=Plan({"1": LayerChoice("tucker", (4, 8), weights=f.weights)}))
    assert fast.get_submodule("1").relu  # the ReLU fused into the chain
    want = _out(fast, x)
    same = [w.detach().clone() for w in fast.get_submodule("1").stage_weights()]
    again = trp.compile(fast, plan=Plan({"1": LayerChoice("tucker", (4, 8), weights=tuple(same))}))
    assert again.get_submodule("1").relu
    torch.testing.assert_close(_out(again, x), want)


class _BnAfterRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)

    def forward(self, x):
        return self.bn(torch.relu(self.conv(self.stem(x))))


def test_a_bn_after_a_fused_relu_is_not_folded_into_the_chain():
    torch.manual_seed(0)
    model = _BnAfterRelu()
    with torch.no_grad():
        model.bn.weight.uniform_(-1, 1)
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    tunable = trp.compile(model, rank=(4, 8), scheme="tucker", rank_multiple=1, fold_bn=False)
    assert tunable.conv.relu
    x = torch.randn(2, 3, 8, 8)
    want = _out(tunable.eval(), x)
    again = trp.compile(tunable)
    assert isinstance(again.bn, nn.BatchNorm2d)  # kept: it reads the ReLU's output
    torch.testing.assert_close(_out(again, x), want, rtol=1e-5, atol=1e-5)


def test_admm_tensor_train_ranks_are_ones_a_tensor_train_can_hold():
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)).eval()
    admm = trp.ADMM(m, rank=(12, 1))
    assert admm.ranks["1"] == (9, 1)  # the second split, (r2·3·3) × c, has rank at most 9
    compiled = trp.compile(copy.deepcopy(m), plan=admm.plan(), fold_bn=False)
    assert compiled.get_submodule("1").ranks == (9, 1)
