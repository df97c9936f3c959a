"""trp.fit with each method under DistributedDataParallel: 2 gloo processes on CPU. TRP
and ADMM train with fit; EigenDamage prunes a trained model (statistics summed over the
ranks, rank 0 deciding) and fit fine-tunes the compiled chain."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import trp
from trp import models
from trp.data import digits_tensors

GLOBAL_BATCH, SAMPLES, EPOCHS = 32, 256, 3


def _data():
    x, y, _, _ = digits_tensors(size=16)
    return TensorDataset(x[:SAMPLES], y[:SAMPLES])


def _train(world: int, rank: int):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = models.resnet_cifar(8)
    data = _data()
    sampler = DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, shuffle=False)
    controller = trp.TRP(model, period=2)
    history = trp.fit(model, loader, epochs=EPOCHS, method=controller, progress=False, lr=0.05)
    return model, controller, history


def _loader(world: int, rank: int):
    data = _data()
    sampler = DistributedSampler(data, world, rank, shuffle=False) if world > 1 else None
    return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler, shuffle=False)


def _admm(world: int, rank: int):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = models.resnet_cifar(8)
    method = trp.ADMM(model, ratio=0.5, rho=0.1)
    history = trp.fit(model, _loader(world, rank), epochs=EPOCHS, method=method, progress=False, lr=0.05)
    return model, method, history


def _eigendamage(world: int, rank: int):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = models.resnet_cifar(8)
    loader = _loader(world, rank)
    trp.fit(model, loader, epochs=1, progress=False, lr=0.05)
    method = trp.EigenDamage(model.eval(), ratio=0.3)
    method.prune(model, loader)
    compiled = trp.compile(model, plan=method.plan())
    history = trp.fit(compiled, loader, epochs=1, progress=False, lr=0.01)
    return compiled, method, history


class _RecordingSPP(trp.SPP):
    """SPP that keeps every step's masks."""

    def before_forward(self):
        super().before_forward()
        self.masks = getattr(self, "masks", []) + [torch.cat([self._held[f][0] for f in self.targets])]


def _spp(world: int, rank: int):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = models.resnet_cifar(8)
    method = _RecordingSPP(model, target=0.3)
    history = trp.fit(model, _loader(world, rank), epochs=EPOCHS, method=method, progress=False, lr=0.05)
    method.ranks = torch.stack(method.masks)  # every step's masks, compared across the processes
    return model, method, history


def _worker_for(name):
    return {"trp": _train, "admm": _admm, "eigendamage": _eigendamage, "spp": _spp}[name]


def _method_worker(rank: int, world: int, port: int, out_dir: str, name: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, method, history = _worker_for(name)(world, rank)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        state = method.state_dict()
        torch.save({"equal": all(torch.equal(gathered[0], g) for g in gathered),
                    "losses": [h["train_loss"] for h in history], "ranks": method.ranks,
                    "extra": {k: v for k, v in state.items() if k in ("z", "u", "bases", "keep", "q", "pruned")}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _worker(rank: int, world: int, port: int, out_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, controller, history = _train(world, rank)
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        torch.save({"equal": all(torch.equal(gathered[0], g) for g in gathered),
                    "losses": [h["train_loss"] for h in history], "ranks": controller.ranks},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["equal"] for r in results)  # bit-identical parameters after 24 projection steps
    assert results[0]["losses"] == results[1]["losses"] and results[0]["ranks"] == results[1]["ranks"]
    _, _, single = _train(1, 0)
    one = [h["train_loss"] for h in single]
    two = results[0]["losses"]
    # Same samples per global step; only BatchNorm sees half-batches per process.
    for a, b in zip(one, two):
        assert abs(a - b) <= 0.1 * a, (one, two)
    assert two[-1] < two[0]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("name", ["admm", "eigendamage", "spp"])
def test_two_processes_hold_identical_weights_with_each_method(tmp_path, name):
    mp.spawn(_method_worker, args=(2, _free_port(), str(tmp_path), name), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["equal"] for r in results)  # bit-identical parameters on both ranks
    assert results[0]["losses"] == results[1]["losses"] and _same(results[0]["ranks"], results[1]["ranks"])
    # Z and U; bases and kept directions; keep probabilities and pruned columns
    assert results[0]["extra"] and _same(results[0]["extra"], results[1]["extra"])
