"""Dense 1x1 convs of ResNet-50 at batch 1: trp's dense kernel (weights in its layout) against
F.conv2d in channels_last (weights as PyTorch keeps them), hot (medians of 40 calls) and after a
64 MB write that evicts the caches (medians of 15); last, trp's dense kernel reading the weight
as PyTorch keeps it, (out, in) (its "dense_oi" form), hot and cold.

    python benches/dense_1x1.py     (results: benches/results/dense-1x1-balance.txt)
"""
import time, statistics, torch, torch.nn.functional as F
from trp_kernels import cpp
torch.set_num_threads(2)
shapes = [(256,64,56,1),(64,256,56,1),(512,128,28,1),(128,512,28,1),(1024,256,14,1),(256,1024,14,1),(2048,512,7,1),(512,2048,7,1),(256,512,56,2),(512,1024,28,2),(1024,2048,14,2)]
def med(f, n=40):
    for _ in range(5): f()
    t=[]
    for _ in range(n):
        t0=time.perf_counter(); f(); t.append(time.perf_counter()-t0)
    return statistics.median(t)*1e3
print("cin cout hw s | torch_cl(contig w) | trp dense(kernel layout) | flush-cold trp | flush-cold torch | (out, in): hot cold")
buf = torch.empty(64*1024*1024//4)
for cin,cout,hw,s in shapes:
    x = torch.randn(1,cin,hw,hw).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout,cin,1,1)/cin**0.5
    b = torch.randn(cout)
    wk = cpp.kernel_layout(w)
    ft = lambda: F.conv2d(x, w, b, s)
    fk = lambda: cpp.fused_chain(x, [wk], b, "dense", (s,s), (0,0,0,0), (1,1), None, False)
    fo = lambda: cpp.fused_chain(x, [w], b, "dense", (s,s), (0,0,0,0), (1,1), None, False)
    def cold(f):
        def g():
            buf.add_(1.0)
            t0=time.perf_counter(); f(); return time.perf_counter()-t0
        ts=[g() for _ in range(15)]
        return statistics.median(ts)*1e3
    print(cin,cout,hw,s, f"{med(ft):.3f} {med(fk):.3f} | cold {cold(fk):.3f} {cold(ft):.3f} | {med(fo):.3f} {cold(fo):.3f}")
