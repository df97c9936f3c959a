"""A compiled model's forward with no Python between its layers where the C++ kernels run
them all: each stretch of such layers is one C++ call (``trp_kernels._C.Program``).

Per module, a compiled layer's Python costs 11-13 µs a call (its checks, the output's
allocation, the kept plan's call): about 0.65 ms of ResNet-50's 8.5 ms at batch 1, and most
of a CIFAR ResNet-20's. :func:`install` (called by ``trp.compile`` and ``trp.load``) puts a
:class:`Runner` in the model's ``forward``. On a call it can take (below), it runs the
model's fx graph (traced with the low-rank layers as leaves) in which every maximal stretch
of steps the C++ side has is one :class:`Segment`:

- a low-rank conv whose call ran a kept C++ plan (``trp_kernels.cpp.Bound``), with its
  residual and ReLU;
- a dense ``nn.Conv2d`` (groups 1, zero padding) that trp's dense kernel runs faster than
  PyTorch on the building call's input (each timed 3 times in turn; within
  :data:`DENSE_MARGIN`), and that PyTorch runs about as fast with its weight in trp's
  layout (:data:`FALLBACK_SLOWDOWN`: the calls that still go layer by layer must not get
  slower), with a ``+ residual`` and a ReLU after it folded into its epilogue. Its weight parameter then takes the kernel's layout (same values and shape,
  permuted strides: PyTorch's conv reads any), so that the kernel reads the parameter's
  own memory and sees every write to it, ``.data`` writes included;
- ``nn.MaxPool2d`` (dilation 1, floor mode), a ReLU before it folded in;
- ``nn.AdaptiveAvgPool2d(1)``;
- ``+`` of two tensors of one shape, a ReLU after it folded in; a ReLU alone;
- ``nn.Identity`` (what BN folding leaves): no step.

The rest (a dense conv PyTorch runs faster, as oneDNN does ResNet's 7×7 stem, the flatten
and the fc layer) runs in PyTorch between the segments, as before. A segment's intermediate
tensors live in buffers its program owns and reuses; only what leaves the segment is a
new tensor.

A program is built on the first call for an input shape (at most :data:`MAX_SHAPES` kept),
from that call, which runs the model once (through ``torch.fx.Interpreter``, each module
called as usual) and records every node's output; each segment is checked on the recorded
values: its outputs must match the model's within :data:`BUILD_RTOL` (of their largest
magnitude), or no program is kept for that shape (``Runner.refused`` says why). A call
takes the program only when it can give exactly what the per-module forward would:

- one positional float32 CPU tensor of a built shape, under ``torch.no_grad`` or
  ``torch.inference_mode``, outside tracing, ``torch.compile``, ONNX export and dispatch
  modes;
- every low-rank layer's parameters the same tensors with the same memory as at build
  (the plans read them in place, so in-place updates are seen), its ``relu`` and backend
  unchanged; the traced modules' training flags unchanged;
- no forward hook, pre-hook or instance ``forward`` on any module a segment runs or the
  flat graph runs through (a ResNet's blocks), and no global module hook (``trp.breakdown``'s instrumentation makes a call fall back);
- no other thread in this model's program (its buffers are one call's).

Otherwise the call runs the model's own forward, layer by layer. :func:`disabled` turns
the programs off for a block of calls.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import operator
import threading
import time
from typing import Optional

import torch
import torch.fx
from torch import nn

from trp.layout import _entry, _to_channels_last
from trp_kernels import cpp

MAX_SHAPES = 4       # input shapes whose programs a model keeps (their buffers stay allocated)
BUILD_RTOL = 1e-4    # a segment's outputs on the building call against the model's, relative to their max

_RELU_FNS = (torch.relu, torch.nn.functional.relu, torch.relu_)
_ADD_FNS = (operator.add, operator.iadd, torch.add)
_DISABLED = threading.local()


@contextlib.contextmanager
def disabled():
    """Calls in this block (this thread) run the models' per-module forward."""
    before = getattr(_DISABLED, "on", False)
    _DISABLED.on = True
    try:
        yield
    finally:
        _DISABLED.on = before


def _plannable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 4 and cpp._plannable(t)


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks
                or getattr(mod, "_global_backward_pre_hooks", None) or getattr(mod, "_global_forward_hooks_always_called", None))


def _untouched(m: nn.Module) -> bool:
    """No hook and no instance forward on ``m`` (but the entry conversion to channels_last,
    which a segment's input checks make moot)."""
    return not (m._forward_hooks or "forward" in m.__dict__
                or any(h is not _entry for h in m._forward_pre_hooks.values()))


class _Step:
    """A node of a stretch: what it does in C++ (``op``), the nodes it reads, its flags;
    ``laid``: a dense conv's weight in the kernel's layout."""

    __slots__ = ("node", "op", "reads", "relu", "module", "laid", "name", "into")

    def __init__(self, node, op, reads, module=None, laid=None):
        self.node, self.op, self.reads, self.relu, self.module, self.laid = node, op, list(reads), False, module, laid
        self.name = node.target if node.op == "call_module" else op  # what profiles call it
        self.into = None  # a "dead" step's node: the node whose step does its work now


DENSE_MARGIN = 0.9  # a dense conv joins a program when trp's kernel takes at most this much of PyTorch's time
RESIDUAL_MARGIN = 1.2  # ... or, when it also takes the add after it, this much of PyTorch's conv alone (_dense_choice)
FALLBACK_SLOWDOWN = 1.1  # ... and PyTorch's own conv with the weight in trp's layout at most this much more
# A contiguous 1x1 conv's weight is also tried as it is (out, in) when its output has at
# most this many pixels: there the weight outweighs the activations and the kernel splits
# the output channels over the threads. ResNet-50 (dense 1x1s): 0.85-0.86x the time at
# batch 1, where layers 3-4 have 196 and 49 pixels; at batch 8 (392 pixels and more) no
# gain showed either way: 0.999-1.083x offered at every size, 0.993-1.018x with this
# limit, depending on which of the two builds came first (benches/results/dense-oi.txt).
AS_IS_MAX_PIXELS = 256
FALLBACK_SLACK_S = 5e-6  # (+ this: on a 9 us conv, 1 us is the timer's noise, and Python's time dwarfs it)


def _conv_geometry(m: nn.Conv2d) -> tuple:
    from trp_kernels.reference import resolve_padding

    return tuple(m.stride), tuple(resolve_padding(m.padding, m.kernel_size, m.dilation)), tuple(m.dilation)


def _residual_after(node: torch.fx.Node, modules: dict, values: dict) -> Optional[torch.Tensor]:
    """The other operand of the add that alone takes ``node``'s value (through nn.Identity),
    when it is a tensor a plan can read, else None: the residual a dense conv's step would
    fold into its epilogue (see _segments)."""
    n = node
    while len(n.users) == 1:
        (u,) = n.users
        if u.op == "call_module" and isinstance(modules.get(u.target), nn.Identity):
            n = u
            continue
        if u.op == "call_function" and u.target in _ADD_FNS and len(u.args) == 2 and not u.kwargs:
            other = u.args[1] if u.args[0] is n else u.args[0]
            if (isinstance(other, torch.fx.Node) and other is not n and _plannable(values.get(other))
                    and values[other].shape == values[node].shape):
                return values[other]
        return None
    return None


def _dense_choice(m: nn.Conv2d, x, y, res: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The weight of a dense conv as the kernel will read it (a contiguous 1x1's own memory,
    or the kernel's layout: the faster of the two that qualifies) when trp's dense kernel runs it on
    ``x`` faster than PyTorch does (each timed 3 times, in turn, trp's as a program step, with
    no Python around it; :data:`DENSE_MARGIN`), else None; with ``res``, the operand of the
    add that follows the conv, trp's kernel adds it in its epilogue and PyTorch's time is
    the conv's and the add's. Only convs the kernel takes: float32, groups 1, zero padding,
    on a plannable input."""
    from trp_kernels import ops

    w = m.weight
    if (m.groups != 1 or m.padding_mode != "zeros" or w.dtype is not torch.float32 or not w.is_cpu
            or not _plannable(y) or max(m.kernel_size) > 64):
        return None
    stride, pad, dil = _conv_geometry(m)
    if ops.backend_kernel("cpp", [w.shape], list(stride), list(pad), list(dil)) is None:
        return None
    with torch.inference_mode(False):  # a normal tensor: it may become the parameter's memory, which autograd uses
        # Two ways for a contiguous 1x1 with few output pixels: its own (out, in) memory as
        # it is (the kernel's "dense_oi" form, nothing to relay) and the kernel's [in][out]
        # panel; the faster one that qualifies is taken.
        layouts = [cpp.kernel_layout(w.detach())]
        if cpp.reads_as_is(w) and y.numel() // y.shape[1] <= AS_IS_MAX_PIXELS:
            layouts.insert(0, w.detach())
    bias = None if m.bias is None else m.bias.detach()
    ins = [x] if res is None else [x, res]
    threads = torch.get_num_threads()
    steps, outs = {}, []
    for i, laid in enumerate(layouts):
        out, bound = cpp.bound_chain(x, [laid], bias, "dense", stride, pad, dil, res)
        if bound is None or not _close(out, y if res is None else y + res):
            continue
        # trp's kernel as a program step runs it: no Python around the call; with the residual
        # add that follows the conv in its epilogue, against PyTorch's conv and add
        step = cpp._require().Program([t.numel() for t in ins] + [out.numel()], len(ins), 1)
        step.add_conv(bound.plan, 0, len(ins) - 1 if res is not None else -1, len(ins))
        ptrs = ([t.data_ptr() for t in ins], [out.data_ptr()])
        outs.append(out)  # the step writes into it: alive while it is timed
        steps[i] = (lambda s, p: lambda: s.run(*p, threads))(step, ptrs)
    if not steps:
        return None
    fns = {**{("ours", i): f for i, f in steps.items()}, "conv": lambda: m._conv_forward(x, w, m.bias)}
    if res is not None:
        fns["conv + add"] = lambda: m._conv_forward(x, w, m.bias).add_(res)
    med = _medians(fns)
    # With the residual: PyTorch's add timed here finds its operands in the cache, in the
    # model it does not (ResNet-50 at batch 8: 16 adds of 25.7 MB operands, 31.6 ms in all
    # in the model, 0.05-0.6 ms each here), so trp's conv with the add in its epilogue is
    # held against PyTorch's conv alone, with RESIDUAL_MARGIN
    bar = DENSE_MARGIN * med["conv"] if res is None else max(DENSE_MARGIN * med["conv + add"],
                                                              RESIDUAL_MARGIN * med["conv"])
    for i in sorted(steps, key=lambda i: med[("ours", i)]):  # the fastest layout that qualifies
        laid = layouts[i]
        if med[("ours", i)] > bar:
            return None
        if laid.data_ptr() == w.data_ptr() and laid.stride() == w.stride():
            return laid  # read as it is: PyTorch's own conv is untouched
        # the weight's new layout must not slow the calls that still run the layer in PyTorch
        # (gradients, hooks): oneDNN reorders some permuted weights on every call (ResNet-50's
        # 512->2048 1x1 at 7x7: 0.434 ms contiguous, 2.190 permuted; 3x3s within 10%:
        # benches/results/dense-layout.txt)
        check = _medians({"conv, laid": lambda: m._conv_forward(x, laid, m.bias),  # the per-module forward after
                          "conv": fns["conv"]})
        if check["conv, laid"] <= FALLBACK_SLOWDOWN * check["conv"] + FALLBACK_SLACK_S:
            return laid
    return None


def _medians(fns: dict, rounds: int = 3) -> dict:
    """Each function's median time (s) over ``rounds`` calls, the functions in turn. Three:
    a program's first call times every dense conv it might take this way (ResNet-50 with
    its dense 1x1 convs at batch 8: a first call of 3.5 s in all, against 0.17 s with
    tucker+pointwise, benches/results/cpu-models-program/first-call.txt)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(t)[len(t) // 2] for k, t in times.items()}


def _classify(node: torch.fx.Node, modules: dict, values: dict, uses: Optional[dict] = None) -> Optional[_Step]:
    """The step ``node`` becomes, or None when the C++ side has none for it."""
    from trp.modules import CONV_TYPES

    def tensor_args(*ns):
        return all(isinstance(n, torch.fx.Node) and _plannable(values.get(n)) for n in ns)

    if node.op == "call_module":
        m = modules[node.target]
        if not _untouched(m):
            return None
        if isinstance(m, nn.Identity) and len(node.args) == 1 and not node.kwargs and tensor_args(node.args[0]):
            return _Step(node, "alias", node.args, m)
        if isinstance(m, CONV_TYPES):
            bound = m._bound[0]
            res = node.kwargs.get("residual")
            if (bound is None or len(node.args) != 1 or set(node.kwargs) - {"residual"} or not tensor_args(node.args[0])
                    or bound.x_shape != values[node.args[0]].shape or bound.residual != (res is not None)
                    or (res is not None and not tensor_args(res)) or not _plannable(values.get(node))):
                return None
            return _Step(node, "conv", [node.args[0]] + ([res] if res is not None else []), m)
        if (type(m) is nn.Conv2d and len(node.args) == 1 and not node.kwargs and tensor_args(node.args[0])
                and (uses or {}).get(id(m), 1) == 1):  # (a conv called twice would need its weight in two layouts)
            laid = _dense_choice(m, values[node.args[0]], values.get(node), _residual_after(node, modules, values))
            return None if laid is None else _Step(node, "dense", node.args, m, laid)
        if isinstance(m, nn.MaxPool2d) and len(node.args) == 1 and not node.kwargs and tensor_args(node.args[0]):
            pair = nn.modules.utils._pair
            if (m.ceil_mode or m.return_indices or pair(m.dilation) != (1, 1)
                    or not _plannable(values.get(node))):
                return None
            return _Step(node, "maxpool", node.args, m)
        if (isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)) and len(node.args) == 1
                and not node.kwargs and tensor_args(node.args[0])):
            return _Step(node, "gap", node.args, m)
        if isinstance(m, nn.ReLU) and len(node.args) == 1 and not node.kwargs and tensor_args(node.args[0]):
            if m.inplace and len(node.args[0].users) > 1:  # others read the input after it is overwritten
                return None
            return _Step(node, "relu", node.args, m)
        return None
    if node.op == "call_function":
        if node.target in _RELU_FNS and len(node.args) == 1 and not node.kwargs and tensor_args(node.args[0]):
            if node.target is torch.relu_ and len(node.args[0].users) > 1:
                return None
            return _Step(node, "relu", node.args)
        if (node.target in _ADD_FNS and len(node.args) == 2 and not node.kwargs and tensor_args(*node.args)
                and values[node.args[0]].shape == values[node.args[1]].shape):
            if node.target is operator.iadd and len(node.args[0].users) > 1:
                return None
            return _Step(node, "add", node.args)
    return None


class Segment(nn.Module):
    """One stretch of steps as one C++ program; ``fallback`` (a GraphModule of the same
    nodes) runs a call whose inputs are not what the program was built for."""

    def __init__(self, program, input_shapes, output_shapes, fallback: torch.fx.GraphModule, step_names=()):
        super().__init__()
        self.program, self.input_shapes, self.output_shapes = program, input_shapes, output_shapes
        self.fallback = fallback
        self.step_names = list(step_names)  # per C++ step: the module's fqn, or the op ("add", "relu")

    def forward(self, *inputs):
        for t, shape in zip(inputs, self.input_shapes):
            if t.shape != shape or not _plannable(t):
                return self.fallback(*inputs)
        cl = torch.channels_last
        outs = tuple(torch.empty(s, dtype=torch.float32, memory_format=cl) for s in self.output_shapes)
        self.program.run([t.data_ptr() for t in inputs], [o.data_ptr() for o in outs], torch.get_num_threads())
        return outs


def _segments(graph: torch.fx.Graph, modules: dict, values: dict) -> list[list[_Step]]:
    """The graph's maximal runs of consecutive nodes that are C++ steps, with ReLUs folded
    into the max pool after them or the add before them."""
    runs, cur = [], []
    uses = collections.Counter(id(modules[n.target]) for n in graph.nodes if n.op == "call_module")
    for node in graph.nodes:
        step = _classify(node, modules, values, uses)
        if step is not None:
            cur.append(step)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    out = []
    for run in runs:
        by_node = {s.node: s for s in run}
        kept = []
        for s in run:
            if s.op == "relu":
                src = by_node.get(s.reads[0])
                users = list(s.node.users)
                if src is not None and src.op == "add" and not src.relu and len(src.node.users) == 1:
                    # add, then ReLU: one step, at the ReLU (whose value the add's users see)
                    s.op, s.reads, s.relu, s.name = "add", src.reads, True, "add"
                    src.op, src.into = "dead", s.node
                elif (prod := _through_aliases(by_node, s.reads[0])) is not None and prod.op == "dense" \
                        and len(prod.reads) == 1 and not prod.relu and _single_use(by_node, prod.node, s.node):
                    # a dense conv, then ReLU: the conv's step with the ReLU in its epilogue, at the ReLU
                    s.op, s.module, s.laid, s.name, s.reads, s.relu = "dense", prod.module, prod.laid, prod.name, \
                        prod.reads, True
                    prod.op, prod.into = "dead", s.node
                elif len(users) == 1 and by_node.get(users[0]) is not None and by_node[users[0]].op == "maxpool":
                    by_node[users[0]].relu = True   # ReLU, then max pool: the pool applies it
                    by_node[users[0]].reads = list(s.reads)
                    s.op, s.into = "dead", users[0]
            kept.append(s)
        for s in kept:  # a dense conv, then + residual (then ReLU): one step, at the add, the plan's epilogue
            if s.op != "add":
                continue
            for k in (0, 1):
                prod, other = _through_aliases(by_node, s.reads[k]), s.reads[1 - k]
                if (prod is not None and prod.op == "dense" and len(prod.reads) == 1 and not prod.relu
                        and _single_use(by_node, prod.node, s.node)):
                    s.op, s.module, s.laid, s.name = "dense", prod.module, prod.laid, prod.name
                    s.reads = [prod.reads[0], other]
                    prod.op, prod.into = "dead", s.node
                    break
        if any(s.op not in ("alias", "dead") for s in kept):
            out.append(kept)
    return out


def _through_aliases(by_node: dict, node) -> Optional[_Step]:
    """The step that computes ``node``'s value, past aliases (nn.Identity) in the stretch."""
    step = by_node.get(node)
    while step is not None and step.op == "alias":
        step = by_node.get(step.reads[0])
    return step


def _single_use(by_node: dict, node, user) -> bool:
    """Whether ``node``'s value reaches nothing but ``user``, through aliases of the stretch
    and steps whose work ``user``'s step does now."""
    for u in node.users:
        step = by_node.get(u)
        if u is user:
            continue
        through = step is not None and (step.op == "alias" or (step.op == "dead" and step.into is user))
        if not through or not _single_use(by_node, u, user):
            return False
    return True


def _build_segment(run: list[_Step], values: dict, graph_out_users: set, modules: dict):
    lib = cpp._require()
    in_run = {s.node for s in run}
    root: dict = {}

    def resolve(n):
        while n in root:
            n = root[n]
        return n

    inputs: list = []
    for s in run:
        if s.op == "alias":
            root[s.node] = s.reads[0]
        for r in s.reads:
            r = resolve(r)
            if r not in in_run and r not in inputs:
                inputs.append(r)
    live = [s for s in run if s.op not in ("alias", "dead")]
    outputs: list = []
    for s in run:
        if s.op == "dead":
            continue
        if any(u not in in_run for u in s.node.users) or s.node in graph_out_users:
            r = resolve(s.node)
            if r not in inputs and r not in outputs:
                outputs.append(r)
    # slots: inputs, outputs, then buffers reused once their last reader is done
    slot = {n: i for i, n in enumerate(inputs)}
    slot.update({n: len(inputs) + i for i, n in enumerate(outputs)})
    sizes = [values[n].numel() for n in inputs] + [values[n].numel() for n in outputs]
    last_read = {}
    for i, s in enumerate(live):
        for r in s.reads:
            last_read[resolve(r)] = i
    free: list[int] = []
    first_buffer = len(inputs) + len(outputs)
    for i, s in enumerate(live):
        n = s.node
        if n not in slot and s.op in ("add", "relu"):
            # elementwise: the output may take the buffer of an input read last here (no fresh
            # buffer to bring into the cache: at batch 8 an add's operands are 25 MB each)
            for r in s.reads:
                r = resolve(r)
                if last_read.get(r) == i and slot[r] >= first_buffer and sizes[slot[r]] >= values[n].numel():
                    slot[n] = slot[r]
                    last_read[r] = -1  # not freed below: the output lives on in it
                    break
        if n not in slot:
            need = values[n].numel()
            if free:
                b = min(free, key=lambda k: (sizes[k] < need, abs(sizes[k] - need)))
                free.remove(b)
                sizes[b] = max(sizes[b], need)
            else:
                b = len(sizes)
                sizes.append(need)
            slot[n] = b
        for r in {resolve(r) for r in s.reads}:
            if last_read.get(r) == i and slot[r] >= first_buffer:
                free.append(slot[r])
    prog = lib.Program(sizes, len(inputs), len(outputs))
    plans, dense = [], []
    for s in live:
        reads = [slot[resolve(r)] for r in s.reads]
        out = slot[s.node]
        if s.op == "conv":
            bound = s.module._bound[0]
            prog.add_conv(bound.plan, reads[0], reads[1] if len(reads) > 1 else -1, out)
            plans.append((s.module, bound))
        elif s.op == "dense":
            m = s.module
            stride, pad, dil = _conv_geometry(m)
            res = values[resolve(s.reads[1])] if len(s.reads) > 1 else None
            bias = None if m.bias is None else m.bias.detach()
            _, bound = cpp.bound_chain(values[resolve(s.reads[0])], [s.laid], bias, "dense", stride, pad, dil,
                                       res, s.relu)
            if bound is None:
                raise ValueError(f"no plan kept for the dense conv {s.node.target}")
            prog.add_conv(bound.plan, reads[0], reads[1] if len(reads) > 1 else -1, out)
            dense.append((m, s.laid))
        elif s.op == "maxpool":
            x, y, m = values[resolve(s.reads[0])], values[s.node], s.module
            pair = nn.modules.utils._pair
            (kh, kw), (sh, sw), (ph, pw) = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
            n_, c, h, w = x.shape
            prog.add_max_pool(reads[0], out, n_, h, w, c, y.shape[2], y.shape[3], kh, kw, sh, sw, ph, pw, s.relu)
        elif s.op == "gap":
            n_, c, h, w = values[resolve(s.reads[0])].shape
            prog.add_global_avg_pool(reads[0], out, n_, h, w, c)
        elif s.op == "add":
            prog.add_add(reads[0], reads[1], out, values[s.node].numel(), s.relu)
        elif s.op == "relu":
            prog.add_add(reads[0], -1, out, values[s.node].numel(), True)
        else:  # pragma: no cover - every op is handled above
            raise AssertionError(s.op)
    # the same nodes as a graph of their own, for inputs the program was not built for
    sub = torch.fx.Graph()
    env = {n: sub.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for s in run:
        env[s.node] = sub.node_copy(s.node, lambda a: env[a])
    sub.output(tuple(env[n] for n in outputs))
    targets = {s.node.target for s in run if s.node.op == "call_module"}
    fallback = torch.fx.GraphModule({t: modules[t] for t in targets}, sub)
    names = [s.name for s in live]
    seg = Segment(prog, [values[n].shape for n in inputs], [values[n].shape for n in outputs], fallback, names)
    return seg, inputs, outputs, root, plans, dense


class Program:
    """A model's forward for one input shape: its fx graph with the C++ stretches as
    :class:`Segment` calls (``module``), and what a call checks first (:meth:`holds`)."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        from trp.compile import _Tracer

        tracer = _Tracer()
        graph = tracer.trace(model)
        modules = dict(model.named_modules())
        self.traced = [m for m in modules.values() if not tracer.is_leaf_module(m, "")]
        inner = [m for m in self.traced if m is not model]  # their hooks would not run in the flat graph
        if not all(map(_untouched, inner)):
            raise ValueError("a module the flat graph runs through has a hook or its own forward")
        self.training = [m.training for m in self.traced]
        values: dict = {}
        gm = torch.fx.GraphModule(model, graph)

        class Recorder(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                # a copy: a later in-place op (ReLU(inplace=True), +=) must not change what
                # this node gave, which the segments are checked against
                values[n] = out.clone() if isinstance(out, torch.Tensor) else out
                return out

        with torch.no_grad():
            self.reference = Recorder(gm).run(x)  # the call's output: the model runs once, as a plain call
        self.failed = None
        try:
            self._build(model, graph, modules, values, inner)
        except Exception as e:  # noqa: BLE001 - anything the program cannot do: the model's own forward
            self.failed = f"{type(e).__name__}: {e}"

    def _build(self, model, graph, modules, values, inner):
        out_node = next(n for n in graph.nodes if n.op == "output")
        graph_out_users = set(out_node.all_input_nodes)
        self.segments, self.plans, self.leaves, self.dense = [], [], [], []
        by_first, members = {}, set()
        for run in _segments(graph, modules, values):
            seg, inputs, outputs, root, plans, dense = _build_segment(run, values, graph_out_users, modules)
            self.dense.extend(dense)
            got = seg(*(values[n] for n in inputs))
            for o, g in zip(outputs, got):
                _check_same(g, values[o])
            self.segments.append(seg)
            self.plans.extend(plans)
            self.leaves.extend(modules[s.node.target] for s in run if s.node.op == "call_module")
            by_first[run[0].node] = (len(self.segments) - 1, inputs, outputs, root, run)
            members.update(s.node for s in run)
        if not self.segments:
            raise ValueError("no stretch of the model runs in C++")
        self.leaves.extend(inner)
        new = torch.fx.Graph()
        env: dict = {}
        for n in graph.nodes:
            if n in by_first:
                k, inputs, outputs, root, run = by_first[n]
                call = new.call_module(f"_trp_segment_{k}", tuple(env[i] for i in inputs))
                for j, o in enumerate(outputs):
                    env[o] = new.call_function(operator.getitem, (call, j))
                for s in run:
                    r = s.node
                    while r in root:
                        r = root[r]
                    if r in env and s.node not in env:
                        env[s.node] = env[r]
            elif n not in members:
                env[n] = new.node_copy(n, lambda a: env[a])
        targets = {n.target for n in new.nodes if n.op == "call_module"}
        owners = {t: modules[t] for t in targets if t in modules}
        owners.update({f"_trp_segment_{k}": seg for k, seg in enumerate(self.segments)})
        for n in new.nodes:
            if n.op == "get_attr":
                owners[n.target] = _attr(model, n.target)
        self.module = torch.fx.GraphModule(owners, new)
        # what every call checks (holds): each plan's parameters, the same objects with the same
        # memory (their dicts, names, objects, addresses), its relu and backend (the layer's
        # __dict__ entries), the traced modules' training flags, no hook on what is bypassed
        self._dicts, self._names, self._objects = [], [], []
        for m in [m for m, _ in self.plans] + [m for m, _ in self.dense]:
            for entries in (m._parameters, m._buffers):  # (a tap-sparse conv's kept columns are a buffer)
                for name, p in entries.items():
                    if p is not None:
                        self._dicts.append(entries)
                        self._names.append(name)
                        self._objects.append(p)
        self._tensors = [t for _, bound in self.plans for t, *_ in bound.params if t is not None]
        self._ptrs = [tag[0] for _, bound in self.plans for t, *tag in bound.params if t is not None]
        # A dense conv that joins the program reads its weight in the kernel's layout: the
        # parameter takes that layout now (same values; PyTorch's conv reads any strides), so
        # that the plan reads the parameter's own memory and sees every later write to it.
        with torch.no_grad():
            for m, laid in self.dense:
                if m.weight.data_ptr() != laid.data_ptr():
                    m.weight.data = laid
                self._tensors += [t for t in (m.weight, m.bias) if t is not None]
                self._ptrs += [t.data_ptr() for t in (m.weight, m.bias) if t is not None]
        self._layer_dicts = [m.__dict__ for m, _ in self.plans]
        self._layer_state = [(m.relu, m._backend) for m, _ in self.plans]
        self._hooks = [d for m in self.leaves for d in (m._forward_hooks, m._forward_pre_hooks)]
        self._hook_keys = list(map(tuple, self._hooks))
        self._leaf_dicts = [m.__dict__ for m in self.leaves]

    def holds(self) -> bool:
        """Whether a call now gets from the program what the per-module forward gives."""
        return (all(map(operator.is_, map(dict.get, self._dicts, self._names), self._objects))
                and list(map(torch.Tensor.data_ptr, self._tensors)) == self._ptrs
                and [(d.get("relu", False), d["_backend"]) for d in self._layer_dicts] == self._layer_state
                and list(map(_training, self.traced)) == self.training
                and list(map(tuple, self._hooks)) == self._hook_keys
                and not any(map(operator.contains, self._leaf_dicts, itertools.repeat("forward"))))


_training = operator.attrgetter("training")


def _attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """``got`` within :data:`BUILD_RTOL` of ``want``'s largest magnitude (same shape)."""
    if got.shape != want.shape:
        return False
    return not want.numel() or float((got - want).abs().max()) <= BUILD_RTOL * max(float(want.abs().max()), 1e-30)


def _check_same(got, want) -> None:
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise ValueError("the program's output does not have the model's shape")
        if not _close(got, want):
            raise ValueError(f"the program's output differs from the model's by {float((got - want).abs().max()):.3g} "
                             f"(max |y| {float(want.abs().max()):.3g})")
        return
    if isinstance(want, (tuple, list)) and isinstance(got, (tuple, list)) and len(got) == len(want):
        for g, w in zip(got, want):
            _check_same(g, w)
        return
    if isinstance(want, dict) and isinstance(got, dict) and got.keys() == want.keys():
        for k in want:
            _check_same(got[k], want[k])
        return
    if got is not want and got != want:
        raise ValueError("the program's output does not match the model's")


class Runner:
    """A model's ``forward``: the model's :class:`Program` for the call's input shape when
    the call can take it (see the module doc), else the model's own forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.programs: dict = {}
        self.refused: dict = {}   # input shape -> why no program was built
        self.calls = 0            # calls that ran a program
        self.lock = threading.Lock()

    def __getstate__(self):
        return {"model": self.model}

    def __setstate__(self, state):
        self.__init__(state["model"])

    def _forward(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    @property
    def __signature__(self):  # what inspect.signature(model.forward) reads (torch.onnx.export)
        return inspect.signature(self._forward)

    @property
    def __code__(self):  # what torch.export reads of model.forward
        return type(self.model).forward.__code__

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or len(args) != 1 or kwargs:
            return self._forward(*args, **kwargs)
        x = args[0]
        if (type(x) is not torch.Tensor or x.dtype is not torch.float32 or not x.is_cpu or torch.is_grad_enabled()
                or getattr(_DISABLED, "on", False) or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch._C._len_torch_dispatch_stack() > 0 or _global_hooks()):
            return self._forward(x)
        # the model's entry conversion (trp.layout) done here, so that the program's first
        # step (the stem) can take the input as it is; the entry hook then has nothing to do
        x = _to_channels_last(x)
        if not self.lock.acquire(blocking=False):
            return self._forward(x)
        try:
            prog = self.programs.get(x.shape)
            if prog is None:
                if x.shape in self.refused:
                    return self._forward(x)
                return self._build(x)
            if not prog.holds():
                del self.programs[x.shape]  # built again on the next call that can take one
                return self._forward(x)
            out = prog.module(x)
            self.calls += 1
            return out
        finally:
            self.lock.release()

    def _build(self, x):
        try:
            prog = Program(self.model, x)
        except Exception as e:  # noqa: BLE001 - refused before the model ran: the model's own forward
            self.refused[x.shape] = f"{type(e).__name__}: {e}"
            return self._forward(x)
        if prog.failed is not None:
            self.refused[x.shape] = prog.failed
            return prog.reference
        if len(self.programs) >= MAX_SHAPES:
            self.programs.pop(next(iter(self.programs)))
        self.programs[x.shape] = prog
        return prog.reference


def install(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Give ``model`` a :class:`Runner` as its ``forward`` (``enabled``), or take it away.
    Models without a low-rank conv are left as they are."""
    from trp.modules import CONV_TYPES

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    runner = model.__dict__.get("forward")
    if isinstance(runner, Runner):
        del model.forward
    if enabled and any(isinstance(m, CONV_TYPES) for m in model.modules()):
        model.forward = Runner(model)
    return model


def runner(model: nn.Module) -> Optional[Runner]:
    """The model's :class:`Runner`, if it has one."""
    r = model.__dict__.get("forward")
    return r if isinstance(r, Runner) else None
