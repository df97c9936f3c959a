"""The benchmark's timing method: every function timed in blocks of its own (timed call by
call against another model, a call finds the caches full of the other's data), and a block
that follows another thread pool's block starts after that pool has gone idle (a pool left
spinning after its call slows the next one on the same cores). ``interleave=True``: the
functions of one pool interleaved call by call, so drift hits them alike."""

from __future__ import annotations

import itertools
import statistics
import time

import pytest
import torch

from trp.timing import compare


def _recorder(calls, name):
    def fn():
        calls.append((name, time.perf_counter()))
        time.sleep(0.0005)
    return fn


def test_every_function_runs_in_blocks_of_its_own():
    calls = []
    fns = {n: _recorder(calls, n) for n in ("a1", "a2", "b")}
    pools = {"a1": "torch", "a2": "torch", "b": "onnxruntime"}
    stats = compare(fns, warmup=1, repeats=12, pools=pools, blocks=3, idle_s=0.02)
    assert {n: s["repeats"] for n, s in stats.items()} == {"a1": 12, "a2": 12, "b": 12}
    timed = calls[3:]  # after one warm-up call each
    runs = [(name, list(group)) for name, group in itertools.groupby(timed, key=lambda c: c[0])]
    assert [name for name, _ in runs] == ["a1", "a2", "b"] * 3
    for (before, calls_before), (name, block) in zip(runs, runs[1:]):
        gap = block[0][1] - calls_before[-1][1]
        if pools[before] != pools[name]:  # the pause only where the pool changes
            assert gap >= 0.02
        else:
            assert gap < 0.02
    assert sum(len(block) for name, block in runs if name == "a1") >= 12 + 3  # + each block's untimed calls


def test_interleave_one_pool_in_blocks_per_pool():
    calls = []
    fns = {n: _recorder(calls, n) for n in ("a1", "a2", "b")}
    pools = {"a1": "torch", "a2": "torch", "b": "onnxruntime"}
    compare(fns, warmup=1, repeats=12, pools=pools, blocks=3, idle_s=0.02, interleave=True)
    timed = calls[3:]
    runs = [(pool, list(group)) for pool, group in itertools.groupby(timed, key=lambda c: pools[c[0]])]
    assert [pool for pool, _ in runs] == ["torch", "onnxruntime"] * 3
    for (_, before), (_, block) in zip(runs, runs[1:]):  # each block starts after the idle pause
        assert block[0][1] - before[-1][1] >= 0.02
    for pool, block in runs:  # inside a block, one call of each of the pool's functions per round
        names = [n for n, _ in block]
        if pool == "torch":
            assert len(names) % 2 == 0 and all({*names[i:i + 2]} == {"a1", "a2"} for i in range(0, len(names), 2))


def test_one_pool_interleaved_round_by_round():
    calls = []
    fns = {n: _recorder(calls, n) for n in ("x", "y", "z")}
    compare(fns, warmup=0, repeats=4, interleave=True)
    names = [n for n, _ in calls]
    assert [sorted(names[i:i + 3]) for i in range(0, 12, 3)] == [["x", "y", "z"]] * 4
    assert names[:3] != names[3:6]  # the order rotates


def test_bad_arguments():
    with pytest.raises(ValueError, match="pools names functions that are not timed"):
        compare({"a": lambda: None}, pools={"b": "torch"})
    with pytest.raises(ValueError, match="blocks >= 1"):
        compare({"a": lambda: None}, blocks=0)


def test_a_providers_time_does_not_change_when_another_runtime_or_model_joins_the_run():
    """The benchmark's own providers: CIFAR ResNet-20 at batch 1 run by ONNX Runtime, by
    trp.compile, and the dense model by PyTorch. Timed together by the suite's method, each
    takes what it takes alone (interleaved call by call, ONNX Runtime took 1.22-1.83x as long
    in six runs of this measurement when it was written, and trp.compile's model 1.07x with
    other PyTorch models; timed as the suite does, 0.99-1.21x)."""
    pytest.importorskip("onnxruntime")
    from trp.benchmark import cases as C
    from trp.benchmark import providers as P

    case = C.ModelCase("resnet20", 32, 1, "cpu", torch.float32)
    bundle = P.model_bundle(case, torch.Generator().manual_seed(0))
    fns = {p: P.prepare_model(p, case, bundle) for p in ("lowrank_ort", "trp_eager", "dense_eager_cl")}
    pools = {p: P.pool(p) for p in fns}
    assert pools == {"lowrank_ort": "lowrank_ort", "trp_eager": "torch", "dense_eager_cl": "torch"}

    def ratios():
        alone, together = {p: [] for p in fns}, {p: [] for p in fns}
        for _ in range(5):  # alternating, so that the shared machine's drift hits both alike
            for p, fn in fns.items():
                alone[p].append(compare({p: fn}, warmup=5, repeats=100)[p]["median_ms"])
            for p, stats in compare(fns, warmup=5, repeats=100, pools=pools).items():
                together[p].append(stats["median_ms"])
        return {p: round(statistics.median(together[p]) / statistics.median(alone[p]), 3) for p in fns}

    attempts = []
    with torch.inference_mode():
        while len(attempts) < 3 and (not attempts or max(attempts[-1].values()) >= 1.3):
            attempts.append(ratios())  # again, in case a neighbour on the shared machine was busy
    assert min(max(r.values()) for r in attempts) < 1.3, f"timed together / alone: {attempts}"
