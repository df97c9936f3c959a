"""The Triton kernels compiled natively for sm_80 and sm_90 on this CPU-only machine
(``trp_kernels.triton.native``), from the arguments a real launch passes (so with the JIT's
specialisation). The kernels autotune only over the configs the committed table
(``trp_kernels/triton/clean_configs.json``, built from the full sweep in
``benches/results/triton-native/``) marks clean; here a representative subset of those is
compiled again: every one must compile with no register spill and within the
architecture's shared memory, and match the sweep's numbers, so a kernel edit that the
table has not been rebuilt for fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from trp_kernels.triton import _common, conv_channel, conv_spatial, native  # noqa: E402 - after the skips

SWEEP = os.path.join(os.path.dirname(__file__), "..", "..", "benches", "results", "triton-native", "full.json")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "subset.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "trp_kernels.triton.native", "--json", str(out), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.exists(), run.stderr[-3000:]
    return run, json.loads(out.read_text())


@pytest.fixture(scope="module")
def sweep():
    with open(SWEEP) as f:
        return json.load(f)


@pytest.fixture
def same_triton():
    """The sweep's numbers hold for the Triton that compiled them (another version's compiler
    allocates registers differently, and hashes kernels differently)."""
    import triton

    built = _common.clean_table().get("triton")
    if built != triton.__version__:
        pytest.skip(f"the table was built with Triton {built}, this is {triton.__version__}")


def _key(row):
    return (row["family"], row["arch"], row["pclass"], row["rank"], tuple(row["epilogue"]), row["seg"],
            row["candidate"])


def test_the_table_was_built_for_these_kernels_and_this_space(subset, same_triton):
    table = _common.clean_table()
    assert table, "clean_configs.json is missing or was built for another SPACE: rebuild it with " \
                  "python -m trp_kernels.triton.native --full --table"
    assert table["kernels"] == subset[1]["environment"]["kernels"], \
        "a kernel changed since the table was built: rerun the full sweep with --table"


def test_every_config_of_the_subset_compiles_clean_for_sm80_and_sm90(subset, same_triton):
    run, payload = subset
    rows = payload["rows"]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert len(rows) == len(native.jobs(full=False)) > 0
    assert {(r["family"], r["arch"]) for r in rows} == {(f, a) for f in native.FAMILIES for a in native.ARCHS}
    found = native.problems(rows)
    assert not any(found.values()), {k: [_key(r) for r in v] for k, v in found.items()}
    for r in rows:
        assert 0 < r["registers"] <= 255 and r["shared"] > 0
    assert "configs; 0 failed to compile, 0 spill registers, 0 need more shared memory" in run.stdout


def test_the_subset_matches_the_committed_sweep(subset, sweep, same_triton):
    """Same registers, spills and shared memory as the full sweep the table came from."""
    committed = {_key(r): r for r in sweep["rows"]}
    for r in subset[1]["rows"]:
        ref = committed[_key(r)]
        assert (r["registers"], r["spill_stores"], r["spill_loads"], r["shared"]) == \
            (ref["registers"], ref["spill_stores"], ref["spill_loads"], ref["shared"]), _key(r)


def test_the_sweep_covers_every_case_and_each_has_a_clean_config(sweep):
    rows = sweep["rows"]
    assert sweep["environment"]["full"] and len(rows) == len(native.jobs(full=True))
    assert not native.problems(rows)["error"]
    for family in native.FAMILIES:
        for arch in native.ARCHS:
            for pclass in native.PCLASSES:
                for rank in native.RANKS:
                    keep = _common.clean_indices(family, arch, pclass, _common.rank_pad(rank))
                    assert keep, (family, arch, pclass, rank)
                    mine = [r for r in rows if (r["family"], r["arch"], r["pclass"], r["rank"]) ==
                            (family, arch, pclass, rank) and r["candidate"] in keep]
                    assert mine and all(native.clean(r) for r in mine), (family, arch, pclass, rank)


def test_the_table_is_what_the_sweep_gives(sweep):
    assert native.table(sweep)["clean"] == _common.clean_table()["clean"]


def test_configs_are_the_clean_candidates():
    table = _common.clean_table()["clean"]
    for family, seg in (("conv_channel", 16), ("conv_spatial", 64), ("linear", 16)):
        for r_pad in (16, 512):
            keep = table[f"{family}/90/fp16/{r_pad}"]
            got = _common.configs(family, r_pad, "fp16", 90, min_block_m=seg)
            want = [cfg for i, cfg in _common.candidates(seg) if i in keep]
            assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_N"],
                     c.num_warps, c.num_stages) for c in got] == want
            assert all(c.kwargs["BLOCK_M"] >= seg for c in got)
    # a padded rank between two swept ones: clean at both
    assert _common.clean_indices("linear", 80, "fp32", 128) == sorted(
        set(table["linear/80/fp32/64"]) & set(table["linear/80/fp32/256"]))


def test_without_a_table_every_candidate(monkeypatch):
    monkeypatch.setattr(_common, "clean_table", lambda: {})
    assert _common.clean_indices("conv_channel", 90, "fp16", 16) is None
    assert len(_common.configs.__wrapped__("conv_channel", 16, "fp16", 90)) == len(_common.SPACE)
    assert [_common.table_arch(c) for c in ((8, 0), (8, 9), (9, 0), (10, 0))] == [80, 80, 90, 90]


def test_report_and_problems_on_synthetic_rows():
    job = native.Job("conv_channel", 90, "fp16", 16, (True, True, True), None, 0,
                     dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, SPLIT_N=1), 4, 3)
    base = asdict(job) | dict(dtype="fp16", registers=168, spill_stores=0, spill_loads=0, shared=5120,
                              shared_limit=232_448, seconds=2.0, error=None)
    rows = [base, base | {"spill_stores": 8, "spill_loads": 16}, base | {"shared": 300_000},
            base | {"error": "CompilationError: boom", "registers": None, "shared": None}]
    found = native.problems(rows)
    assert [len(found[k]) for k in ("error", "spills", "shared")] == [1, 1, 1]
    assert [native.clean(r) for r in rows] == [True, False, False, False]
    text = native.markdown({"environment": {"triton": "3.9.0", "torch": "2.13.0", "date": "d", "full": False},
                            "rows": rows})
    assert "4 configs; 1 failed to compile, 1 spill registers, 1 need more shared memory" in text
    assert "| conv_channel | 16 | 1/4 | – | – | – |" in text
    assert "| 300000 (over) |" in text and "error: CompilationError: boom" in text
    with pytest.raises(ValueError, match="full sweep"):
        native.table({"environment": {"full": False}, "rows": rows})


_SPECIALISATION = """
import json
from trp_kernels.triton import conv_channel, conv_spatial, native
job = native.Job("conv_channel", 90, "tf32", 64, (True, True, True), None, 0,
                 dict(BLOCK_M=32, BLOCK_K=32, BLOCK_N=64, SPLIT_N=1), 4, 3)
src, names = native.source(job), conv_channel._conv_channel_kernel.arg_names
spatial = native.Job("conv_spatial", 80, "bf16", 512, (False, False, False), 64, 9,
                     dict(BLOCK_M=64, BLOCK_K=16, BLOCK_N=32, SPLIT_N=4), 8, 1)
s_src, s_names = native.source(spatial), conv_spatial._conv_spatial_kernel.arg_names
print(json.dumps(dict(
    sxc=[src.signature["sxc"], src.constants.get((names.index("sxc"),))],
    precision=src.constants[(names.index("PRECISION"),)],
    x=[src.signature["x_ptr"], src.attrs.get((names.index("x_ptr"),))],
    c=[src.signature["C"], src.attrs.get((names.index("C"),))],
    hw=[src.signature["H"], src.attrs.get((names.index("H"),))],
    seg=s_src.constants[(s_names.index("SEG"),)], r_chunk=s_src.constants[(s_names.index("R_CHUNK"),)],
    chunk=conv_spatial.RANK_CHUNK)))
"""


def test_launch_arguments_are_a_real_launchs():
    """The compile sees the JIT's specialisation of the layer's launch: channels_last x has
    channel stride 1 (a constant), 16-divisible sizes and pointers are marked, others not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SPECIALISATION], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["sxc"] == ["constexpr", 1] and got["precision"] == "tf32"
    assert got["x"] == ["*fp32", [["tt.divisibility", 16]]] and got["c"] == ["i32", [["tt.divisibility", 16]]]
    assert got["hw"] == ["i32", None]  # 14: not 16-divisible
    assert got["seg"] == 64 and got["r_chunk"] == got["chunk"]


def test_refuses_to_run_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET unset"):
        native.run()
    with pytest.raises(SystemExit):
        native.main(["--table"])  # --table without --full


@pytest.mark.parametrize("arch", native.ARCHS)
def test_the_tucker_kernel_compiles_for_sm80_and_sm90(arch):
    """The three-stage kernel (not in the clean-config table yet) at its largest rank, with
    the full epilogue, in the fallback config: compiles, no spill, within shared memory."""
    from trp_kernels.triton import conv_tucker

    bm, bk, bn, split, warps, stages = _common.SPACE[_common.FALLBACK]
    job = native.Job("conv_tucker", arch, "tf32", conv_tucker.MAX_RANK, (True, True, True), None, _common.FALLBACK,
                     dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, SPLIT_N=split), warps, stages)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys, tempfile\n"
            "from trp_kernels.triton import native\n"
            "native._worker_env(tempfile.mkdtemp())\n"
            f"print(json.dumps(native.compile_one(native.Job(**{asdict(job)!r}))))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    row = json.loads(run.stdout.strip().splitlines()[-1])
    assert native.clean(row), row
    assert 0 < row["registers"] <= 255 and 0 < row["shared"] <= native.SHARED_LIMIT[arch]
