"""Run the fused C++ kernels, built with AddressSanitizer, over small awkward shapes.

Not a test module: test_cpp_asan.py runs it in a subprocess with the ASan runtime
preloaded, as ``python asan_kernels.py PATH_TO_ASAN_C.so``. The instrumented module must
be loaded under the name trp_kernels._C before anything imports the regular build (a
second copy of a module of the same name would silently be the first one).
"""
import importlib.util, sys
import trp_kernels  # the package alone: its __init__ imports nothing
spec = importlib.util.spec_from_file_location("trp_kernels._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
sys.modules["trp_kernels._C"] = trp_kernels._C = mod  # before anything imports the regular build
import torch
from trp_kernels import cpp, reference
assert cpp._C is mod
mod.set_stream_bytes(1)  # every output whose rows are whole vectors is stored past the caches
n = 0
for isa in ("avx512", "avx2", "generic"):
    if not mod.set_isa(isa): continue
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for scheme in ("channel", "spatial"):
            # (batch, c_in, c_out, (h, w), rank, stride, dilation, padding (t, b, l, r))
            for (b, c, no, hw, r, st, dil, pad) in [(1,5,7,(9,7),1,(1,1),(1,1),(1,1,1,1)), (3,20,18,(11,9),17,(2,2),(1,1),(1,1,1,1)), (2,6,9,(5,6),40,(1,2),(2,1),(0,1,2,1)), (1,3,5,(2,70),3,(1,1),(1,2),(1,1,2,2)), (2,6,32,(5,9),4,(1,1),(1,1),(1,1,1,1))]:
                # channels_last, so that the second call runs the plan the first one kept
                x = torch.randn(b, c, *hw).contiguous(memory_format=torch.channels_last)
                w1 = torch.randn(r, c, 3, 3 if scheme == "channel" else 1)
                w2 = torch.randn(no, r, 1, 1 if scheme == "channel" else 3); bias = torch.randn(no)
                ref = reference.lowrank_conv2d(x, w1, w2, bias, st, pad, dil, scheme)
                res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
                exp = reference.lowrank_conv2d(x, w1, w2, bias, st, pad, dil, scheme, res, True)
                # the factors as given (copied into panels on each call), then in the kernels'
                # layout (read in place: the checked call, then the kept plan)
                for k1, k2 in ((w1, w2), (cpp.kernel_layout(w1), cpp.kernel_layout(w2))):
                    for _ in range(2):
                        out = cpp.lowrank_conv2d(x, k1, k2, bias, st, pad, dil, scheme, res, True)
                        assert (out - exp).abs().max() <= 1e-4 * exp.abs().max(), (isa, scheme, b, c)
                n += 1
        for kind in ("tucker", "dense"):  # the three-stage and one-stage kernels
            for (b, c, no, hw, r, st, dil, pad) in [(1,5,7,(9,7),1,(1,1),(1,1),(1,1,1,1)), (3,20,18,(11,9),17,(2,2),(1,1),(1,1,1,1)), (2,6,9,(5,6),40,(1,2),(2,1),(0,1,2,1)), (1,3,5,(2,70),3,(1,1),(1,2),(1,1,2,2)), (2,6,32,(5,9),4,(1,1),(1,1),(1,1,1,1))]:
                x = torch.randn(b, c, *hw).contiguous(memory_format=torch.channels_last)
                ws = ([torch.randn(r, c, 1, 1), torch.randn(r + 5, r, 3, 3), torch.randn(no, r + 5, 1, 1)]
                      if kind == "tucker" else [torch.randn(no, c, 3, 3)])
                bias, stages = torch.randn(no), reference.kernel_stages(kind, st, pad, dil)
                ref = reference.conv_chain(x, ws, *stages, bias)
                res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
                exp = reference.conv_chain(x, ws, *stages, bias, res, True)
                for k in (ws, [cpp.kernel_layout(w) for w in ws]):
                    for _ in range(2):
                        out = cpp.fused_chain(x, k, bias, kind, st, pad, dil, res, True)
                        assert (out - exp).abs().max() <= 1e-4 * exp.abs().max(), (isa, kind, b, c)
                n += 1
        # The stride-1 Tucker kernel (tucker_flat): every first-rank width it is built for
        # (1-4 vectors), cores of 1-3 vectors, a kernel row at a time, tap by tap, one-sided
        # padding; its reads reach the band buffer's last pixel.
        vl = mod.vector_width()
        for r1, r2 in [(vl * ldv - ldv % 2, r2) for ldv in (1, 2, 3, 4) for r2 in (vl - 3, 2 * vl, 3 * vl - 1)]:
            for kernel, dil, pad in [((3, 3), (1, 1), (1, 1, 1, 1)), ((5, 3), (1, 1), (0, 1, 2, 1)), ((3, 5), (1, 2), (1, 1, 4, 4))]:
                x = torch.randn(2, 5, 7, 17).contiguous(memory_format=torch.channels_last)
                ws = [torch.randn(r1, 5, 1, 1), torch.randn(r2, r1, *kernel), torch.randn(6, r2, 1, 1)]
                bias, stages = torch.randn(6), reference.kernel_stages("tucker", (1, 1), pad, dil)
                ref = reference.conv_chain(x, ws, *stages, bias)
                res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
                exp = reference.conv_chain(x, ws, *stages, bias, res, True)
                before = mod.flat_tucker_calls()
                out = cpp.fused_chain(x, [cpp.kernel_layout(w) for w in ws], bias, "tucker", (1, 1), pad, dil, res, True)
                assert (out - exp).abs().max() <= 1e-4 * exp.abs().max(), (isa, r1, r2, kernel)
                assert mod.flat_tucker_calls() == before + 1
                n += 1
        # Winograd F(2x2, 3x3) first stages (channel scheme, dense): odd and even sizes, a
        # tile half past the output's edge, in_c past whole vectors, one-sided padding.
        mod.winograd("always")
        for kind in ("channel", "dense"):
            for (b, c, no, hw, r, pad) in [(1,5,7,(9,7),1,(1,1,1,1)), (3,20,18,(11,10),17,(0,1,2,1)), (2,17,33,(30,29),16,(1,1,1,1))]:
                x = torch.randn(b, c, *hw).contiguous(memory_format=torch.channels_last)
                ws = [torch.randn(r, c, 3, 3), torch.randn(no, r, 1, 1)] if kind == "channel" else [torch.randn(no, c, 3, 3)]
                bias, stages = torch.randn(no), reference.kernel_stages(kind, (1, 1), pad, (1, 1))
                ref = reference.conv_chain(x, ws, *stages, bias)
                res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
                exp = reference.conv_chain(x, ws, *stages, bias, res, True)
                before = mod.winograd_calls()
                out = cpp.fused_chain(x, [cpp.kernel_layout(w) for w in ws], bias, kind, (1, 1), pad, (1, 1), res, True)
                assert (out - exp).abs().max() <= 1e-4 * exp.abs().max(), (isa, kind, b, c)
                assert mod.winograd_calls() == before + 1
                n += 1
        mod.winograd("auto")
        # Dense 1x1 convs read as PyTorch keeps the weight, (out, in): pixel blocks split over
        # the threads, or (few pixels) the output channels; strided, padded, partial blocks.
        for (b, c, no, hw, st, p) in [(1,5,7,(9,7),1,0), (3,20,18,(11,9),2,1), (2,33,70,(17,19),1,0), (1,300,260,(3,4),1,0)]:
            x = torch.randn(b, c, *hw).contiguous(memory_format=torch.channels_last)
            w, bias = torch.randn(no, c, 1, 1), torch.randn(no)
            stages = reference.kernel_stages("dense", (st, st), (p, p, p, p), (1, 1))
            ref = reference.conv_chain(x, [w], *stages, bias)
            res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
            exp = reference.conv_chain(x, [w], *stages, bias, res, True)
            assert cpp.reads_as_is(w)
            for _ in range(2):  # the checked call, then the plan it kept over w's own memory
                out = cpp.fused_chain(x, [w], bias, "dense", (st, st), (p, p, p, p), (1, 1), res, True)
                assert (out - exp).abs().max() <= 1e-4 * exp.abs().max(), (isa, "dense_oi", b, c)
            n += 1
        # The tap-sparse conv (SPP): the kept im2col columns only, gathered per tile; none, some
        # and all kept, strided, dilated, partial blocks.
        for (b, c, no, hw, st, dil, frac) in [(1,5,7,(9,7),1,1,0.5), (3,20,18,(11,9),2,1,0.3), (2,6,33,(5,6),1,2,1.0), (1,3,5,(4,70),1,1,0.0)]:
            x = torch.randn(b, c, *hw).contiguous(memory_format=torch.channels_last)
            w, bias, keep = torch.randn(no, c, 3, 3), torch.randn(no), torch.rand(c, 3, 3) < frac
            ref = torch.nn.functional.conv2d(x, w * keep, bias, st, dil, dil)
            res = torch.randn_like(ref).contiguous(memory_format=torch.channels_last)
            exp = torch.relu(ref + res)
            packed, cols = reference.pack_taps(w, keep)
            out = cpp.conv_taps(x, packed, cols, bias, (3, 3), (st, st), (dil,) * 4, (dil, dil), res, True)
            assert (out - exp).abs().max() <= 1e-4 * exp.abs().max(), (isa, "taps", b, c)
            n += 1
        # The whole-model program's own steps (trp.program): max pool with ReLU, global average
        # pool, add; each slot exactly the size its step reads or writes.
        for (b, c, h, w, k, st, p) in [(2, 19, 9, 11, 3, 2, 1), (1, 3, 5, 4, 2, 1, 0), (1, 33, 3, 3, 3, 1, 1)]:
            x = torch.randn(b, c, h, w).contiguous(memory_format=torch.channels_last)
            ref = torch.nn.functional.max_pool2d(torch.relu(x), k, st, p)
            out = torch.empty_like(ref).contiguous(memory_format=torch.channels_last)
            gap = torch.empty(b, c, 1, 1)
            prog = mod.Program([x.numel(), ref.numel(), b * c, x.numel()], 1, 2)
            prog.add_max_pool(0, 1, b, h, w, c, ref.shape[2], ref.shape[3], k, k, st, st, p, p, True)
            prog.add_add(0, 0, 3, x.numel(), False)
            prog.add_global_avg_pool(3, 2, b, h, w, c)
            prog.run([x.data_ptr()], [out.data_ptr(), gap.data_ptr()], threads)
            assert torch.equal(out, ref), (isa, b, c)
            assert (gap - 2 * x.mean((2, 3), keepdim=True)).abs().max() <= 1e-5, (isa, b, c)
            n += 1
print("ok", n)
