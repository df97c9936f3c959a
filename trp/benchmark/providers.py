"""How each provider runs a case. A provider that cannot run a case raises
:class:`Unavailable` with the reason, which the results then list."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
from trp import families, models
from trp.benchmark.cases import RANK_MULTIPLE, LayerCase, ModelCase, lowrank_rank
from trp_kernels import ops, reference

# On CPU the case input is NCHW; "lowrank_torch_cl" runs the two convs on a channels_last
# copy made beforehand, the layout a model compiled by trp.compile runs in (trp/layout.py),
# which is also the layout "lowrank_cpp" is handed.
LAYER_PROVIDERS = ("dense_torch", "lowrank_torch", "lowrank_torch_cl", "lowrank_compile", "lowrank_trp", "lowrank_cpp",
                   "lowrank_ort", "lowrank_openvino",
                   "dense_torch_cudagraph", "lowrank_torch_cudagraph", "lowrank_trp_cudagraph")
# "*_eager_cl": the same model eager in channels_last (model and input converted beforehand),
# what a user who knows PyTorch's fast CPU layout would run.
# "*_compile_frozen": torch.compile with torch._inductor.config.freezing = True (weights
# folded in as constants: much faster on CPU); "*_openvino": OpenVINO computing in float32;
# "*_openvino_default": OpenVINO as it comes, which on a CPU with AVX512-BF16 computes in
# bfloat16 (the row says so and gives its error).
MODEL_PROVIDERS = ("dense_eager", "dense_eager_cl", "dense_compile", "dense_compile_frozen", "dense_ort",
                   "dense_openvino", "dense_openvino_default", "lowrank_eager", "lowrank_eager_cl", "lowrank_compile",
                   "lowrank_compile_frozen", "lowrank_ort", "lowrank_openvino", "lowrank_openvino_default",
                   "trp_eager", "trp_compile", "trp_compile_frozen", "trp_ort", "trp_openvino", "cpp_eager", "cpp_compile", "dense_cudagraph",
                   "lowrank_cudagraph", "trp_cudagraph")
# What each model provider's speed-up is measured against: the dense model in the same runtime.
MODEL_BASELINE = {p: "dense_" + p.split("_", 1)[1] for p in MODEL_PROVIDERS}

# What each name means, for --help and docs/benchmarks.md: a model provider is KIND_RUNTIME.
_MODEL_KINDS = {"dense": "the dense model (BatchNorm folded)",
                "lowrank": "the factored model, each factored conv as two PyTorch convs",
                "trp": "the factored model under trp.compile's defaults (fused kernels, epilogues, channels_last)",
                "cpp": "as trp, with the fused C++ kernel asked for by name"}
_MODEL_RUNTIMES = {"eager": "PyTorch eager, NCHW input", "eager_cl": "PyTorch eager, model and input channels_last",
                   "compile": "torch.compile (Inductor)",
                   "compile_frozen": "torch.compile with torch._inductor.config.freezing = True",
                   "ort": "exported to ONNX, run by ONNX Runtime (CPU)",
                   "openvino": "exported to ONNX, run by OpenVINO in float32",
                   "openvino_default": "exported to ONNX, run by OpenVINO in its default precision (bf16 on CPUs "
                                       "with AVX512-BF16)",
                   "cudagraph": "PyTorch eager captured in a CUDA graph (GPU only)"}
_LAYER_HELP = {
    "dense_torch": "layer: the dense conv, F.conv2d",
    "lowrank_torch": "layer: the factor convs (two; three for tucker), F.conv2d, NCHW",
    "lowrank_torch_cl": "layer: the factor convs, F.conv2d, channels_last",
    "lowrank_compile": "layer: the factor convs under torch.compile",
    "lowrank_trp": "layer: trp's dispatch (auto backend), NCHW input",
    "lowrank_cpp": "layer: the fused C++ kernel, channels_last input",
    "lowrank_ort": "layer: the factor convs exported to ONNX, ONNX Runtime",
    "lowrank_openvino": "layer: the factor convs exported to ONNX, OpenVINO float32",
    **{p: f"layer: {p[:-len('_cudagraph')]} captured in a CUDA graph (GPU only)"
       for p in LAYER_PROVIDERS if p.endswith("_cudagraph")},
}
_MODEL_HELP = {p: f"model: {_MODEL_KINDS[p.split('_', 1)[0]]}; {_MODEL_RUNTIMES[p.split('_', 1)[1]]}"
               for p in MODEL_PROVIDERS}
PROVIDER_HELP = {p: " | ".join(h[p] for h in (_LAYER_HELP, _MODEL_HELP) if p in h)
                 for p in dict.fromkeys((*LAYER_PROVIDERS, *MODEL_PROVIDERS))}

Fn = Callable[[], torch.Tensor]


class Unavailable(Exception):
    """This provider cannot run this case; the message says why."""


def _compile(fn_or_module, device: str):
    # Every case compiles afresh: dynamo's per-function recompile limit would otherwise
    # send later shapes silently back to eager.
    torch._dynamo.reset()
    mode = "max-autotune" if device == "cuda" else None
    return torch.compile(fn_or_module, mode=mode, dynamic=False)


def _ort_session(model_bytes: bytes, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session as the providers run it; with ``profile_prefix``, its
    profiler on, writing there (``session.end_profiling()`` names the file)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise Unavailable(f"onnxruntime is not installed ({e})") from None
    from trp.deploy import ort_session

    # ORT's default, spinning threads, as users run it: its idle threads busy-wait after a
    # run, which is why the runner never times it call by call against another runtime.
    return ort_session(model_bytes, profile_prefix=profile_prefix)


def _openvino_fn(model_bytes: bytes, x: torch.Tensor, f32: bool) -> Fn:
    """OpenVINO on the CPU with the torch providers' thread count; in float32 (``f32``) or
    in its default precision, which the returned callable records as ``.precision``."""
    try:
        import openvino as ov
    except ImportError as e:
        raise Unavailable(f"openvino is not installed ({e})") from None
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(model=model_bytes), "CPU", config)
    request = compiled.create_infer_request()
    feed = {0: x.contiguous().numpy()}

    def fn():
        return torch.from_numpy(request.infer(feed)[0].copy())

    hint = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    fn.precision = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(hint, hint)
    return fn


def _frozen(fn_or_module, example: torch.Tensor, device: str) -> Fn:
    """torch.compile with Inductor's freezing (weights as constants), compiled here on
    ``example`` (freezing acts when the graph is compiled, under no_grad)."""
    compiled = _compile(fn_or_module, device)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled(example)
    return lambda: compiled(example)


def _ort_fn(session, x: torch.Tensor) -> Fn:
    feed = {session.get_inputs()[0].name: x.contiguous().numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def _cudagraph(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Fn:
    """``fn`` on ``x`` captured once into a CUDA graph; each call replays it."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_y = fn(static_x)

    def replay():
        graph.replay()
        return static_y
    return replay


# --- layers --------------------------------------------------------------------------

def layer_tensors(case: LayerCase, generator: torch.Generator) -> dict:
    """Input and exact-rank weights of a case, the stages of its family (channel: k×k c→r,
    1×1 r→n; tucker: 1×1 c→r1, k×k core r1→r2, 1×1 r2→n): the dense weight is their
    composition, so every provider must reproduce the dense conv."""
    s = case.shape
    family = families.get(case.scheme)

    def draw(shape):  # unit-variance outputs: each stage scaled by 1/sqrt(its fan-in)
        fan_in = shape[1] * shape[2] * shape[3]
        return torch.randn(shape, generator=generator, dtype=torch.float64) / fan_in ** 0.5

    weights = [draw(shape) for shape in family.stage_shapes(case.weight_shape, case.ranks)]
    bias = torch.randn(s.c_out, generator=generator, dtype=torch.float64) * 0.1
    x = torch.randn(case.batch, s.c_in, s.hw, s.hw, generator=generator, dtype=torch.float64)
    t = {"x64": x, "dense64": family.compose(weights), "bias64": bias}
    cast = dict(device=case.device, dtype=case.dtype)
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    t.update(x=x.to(**cast).contiguous(memory_format=fmt), weights=[w.to(**cast) for w in weights],
             dense=t["dense64"].to(**cast), bias=bias.to(**cast),
             stages=reference.kernel_stages(case.scheme, (s.stride, s.stride), (1, 1, 1, 1), (1, 1)))
    return t


def layer_reference(case: LayerCase, t: dict) -> torch.Tensor:
    return F.conv2d(t["x64"], t["dense64"], t["bias64"], case.shape.stride, 1)


def _chain_onnx(case: LayerCase, t: dict) -> bytes:
    """The case's stages as ONNX Conv nodes, one per stage, the bias on the last."""
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise Unavailable(f"onnx is not installed ({e})") from None
    names = [f"w{i + 1}" for i in range(len(t["weights"]))]
    inits = [numpy_helper.from_array(w.numpy(), n) for n, w in zip(names, t["weights"])]
    inits.append(numpy_helper.from_array(t["bias"].numpy(), "bias"))
    nodes, src = [], "x"
    for i, (w, (stride, (top, bottom, left, right), dil)) in enumerate(zip(t["weights"],
                                                                         reference.stage_geometry(*t["stages"]))):
        last = i == len(names) - 1
        dst = "y" if last else f"h{i + 1}"
        nodes.append(helper.make_node("Conv", [src, names[i]] + (["bias"] if last else []), [dst],
                                      kernel_shape=list(w.shape[2:]), pads=[top, left, bottom, right],
                                      strides=list(stride), dilations=list(dil)))
        src = dst
    graph = helper.make_graph(
        nodes, "lowrank_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(t["x"].shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def pool(provider: str) -> str:
    """The thread pool a provider runs on: PyTorch's, which all torch providers share, or
    one of its own: every ONNX Runtime session and OpenVINO compiled model has its own
    threads, which spin after a call (two ONNX Runtime sessions interleaved call by call
    slow each other severalfold on 2 cores, as a runtime and PyTorch do)."""
    return provider if provider.endswith("_ort") or "_openvino" in provider else "torch"


def layer_baseline(provider: str) -> str:
    """A layer provider's speed-up is measured against dense PyTorch in the same launch mode."""
    return "dense_torch_cudagraph" if provider.endswith("_cudagraph") else "dense_torch"


def prepare_layer(provider: str, case: LayerCase, t: dict) -> Fn:
    if provider.endswith("_cudagraph") and provider in LAYER_PROVIDERS:
        if case.device != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        fn = prepare_layer(provider[:-len("_cudagraph")], case, t)
        return _cudagraph(lambda _: fn(), t["x"])  # fn reads t["x"], which stays put
    s, x, weights, b, stages = case.shape, t["x"], t["weights"], t["bias"], t["stages"]

    def chain(x):  # the stages as separate PyTorch convs
        return reference.conv_chain(x, weights, *stages, b)

    if provider == "dense_torch":
        return lambda: F.conv2d(x, t["dense"], b, s.stride, 1)
    if provider == "lowrank_torch":
        return lambda: chain(x)
    if provider == "lowrank_torch_cl":
        if case.channels_last:
            raise Unavailable("the case input is channels_last already (lowrank_torch runs it)")
        x_cl = x.contiguous(memory_format=torch.channels_last)
        return lambda: chain(x_cl)
    if provider == "lowrank_compile":
        compiled = _compile(chain, case.device)
        return lambda: compiled(x)
    # trp's providers get the factors in the layout a trp layer keeps them in (the one its
    # kernel reads in place), as a model built by trp.compile holds them.
    if provider == "lowrank_trp":
        laid = [ops.kernel_layout(w) for w in weights]
        return lambda: ops.conv_chain(x, laid, *stages, b)
    if provider == "lowrank_cpp":  # the fused C++ kernel by name (what auto takes on CPU)
        reasons = ops.refusals("cpp", x.device, x.dtype, max(case.ranks))
        if reasons or not ops.is_fused("cpp"):
            raise Unavailable("; ".join(reasons) or "the C++ extension has no fused kernels")
        # channels_last, as in a model compiled by trp.compile (which converts once, on entry)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        laid = [ops.kernel_layout(w, "cpp") for w in weights]
        return lambda: ops.conv_chain(x_cl, laid, *stages, b, backend="cpp")
    if provider == "lowrank_ort":
        if case.device != "cpu":
            raise Unavailable("CPU only (this suite runs ONNX Runtime's CPU execution provider)")
        if case.dtype != torch.float32:
            raise Unavailable(f"float32 only, case is {case.dtype}")
        return _ort_fn(_ort_session(_chain_onnx(case, t)), x)
    if provider == "lowrank_openvino":
        if case.device != "cpu" or case.dtype != torch.float32:
            raise Unavailable("float32 on CPU only (this suite runs OpenVINO's CPU plugin)")
        return _openvino_fn(_chain_onnx(case, t), x, f32=True)
    raise ValueError(f"unknown layer provider {provider!r}; known: {LAYER_PROVIDERS}")


# --- models --------------------------------------------------------------------------

def _build(name: str) -> nn.Module:
    if name == "resnet18":
        return models.resnet18()
    if name == "resnet50":
        return models.resnet50()
    return models.resnet_cifar(int(name[len("resnet"):]))


def seeded_bundle(case: ModelCase, seed: int = 0) -> dict:
    """:func:`model_bundle` built from ``seed`` alone: the global generator too (the
    architectures draw their initial weights from it), so that any process builds the same."""
    torch.manual_seed(seed)
    return model_bundle(case, torch.Generator().manual_seed(seed))


def model_bundle(case: ModelCase, generator: torch.Generator) -> dict:
    """The dense model (BN folded) with exact-rank layers (the channel scheme's 3×3 convs,
    or every layer the case's families take), its low-rank form run by the plain conv
    backend ("lowrank") and by trp's dispatch ("trp"), an input, and the float64
    reference output."""
    model = _build(case.model).eval()
    ratio = case.ratio
    if case.scheme == "channel":
        models.set_conv_spectra(model, lambda full: (torch.arange(full) < lowrank_rank(full, ratio)).double(),
                                generator=generator)
    models.randomize_batchnorm(model, generator)
    if case.scheme != "channel":  # the random weights projected onto the ranks (BN folding keeps them)
        models.plant_ranks(model, case.schemes, ratio, RANK_MULTIPLE)
    dense = trp.compile(model, filter_fn=lambda m, q: False)  # fold BN only: the same for every provider
    x64 = torch.randn(case.batch, 3, case.hw, case.hw, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        ref = copy.deepcopy(dense).double()(x64)
    lowrank = trp.compile(copy.deepcopy(dense), ratio=ratio, rank_multiple=RANK_MULTIPLE, backend="torch",
                          scheme=case.schemes)
    trp_model = trp.compile(copy.deepcopy(lowrank), backend="auto")
    fmt = torch.channels_last if case.channels_last else torch.contiguous_format
    cast = dict(device=case.device, dtype=case.dtype)
    bundle = {"x": x64.to(**cast).contiguous(memory_format=fmt), "ref": ref}
    for key, m in (("dense", dense), ("lowrank", lowrank), ("trp", trp_model)):
        bundle[key] = m.to(**cast).to(memory_format=fmt)
    # The fused C++ kernel asked for by name (what "auto" takes on CPU when the extension is built).
    if case.device == "cpu" and case.dtype == torch.float32 and ops.is_fused("cpp"):
        bundle["cpp"] = trp.compile(copy.deepcopy(lowrank), backend="cpp").to(memory_format=fmt)
    s = trp.summary(lowrank, bundle["x"][:1])
    bundle["macs_dense"], bundle["macs"] = s.macs_dense * case.batch, s.macs * case.batch
    return bundle


def _onnx_bytes(model: nn.Module, *inputs: torch.Tensor) -> bytes:
    """The model as ONNX, exported the way ``trp.deploy`` does (:func:`trp.deploy.onnx_bytes`)."""
    from trp.deploy import DeployError, onnx_bytes

    try:
        return onnx_bytes(model, *inputs)
    except DeployError as e:  # an exporter failure is this provider's reason
        raise Unavailable(str(e)) from None


EAGER_MODEL_PROVIDERS = tuple(p for p in MODEL_PROVIDERS if p.endswith(("_eager", "_eager_cl")))


def eager_model(provider: str, bundle: dict) -> tuple[nn.Module, torch.Tensor]:
    """The module and input an eager provider calls: the bundle's own, or for "*_eager_cl" a
    copy of the model and the input converted to channels_last."""
    if provider not in EAGER_MODEL_PROVIDERS:
        raise ValueError(f"provider must be an eager model provider {EAGER_MODEL_PROVIDERS}, got {provider!r}")
    kind = provider.split("_", 1)[0]
    if kind not in bundle:
        raise Unavailable("the fused C++ kernel runs float32 on CPU, with the extension built")
    model, x = bundle[kind], bundle["x"]
    if provider.endswith("_eager_cl"):
        cl = torch.channels_last
        return copy.deepcopy(model).to(memory_format=cl), x.contiguous(memory_format=cl)
    return model, x


def prepare_model(provider: str, case: ModelCase, bundle: dict) -> Fn:
    kind, runtime = provider.split("_", 1)
    if provider not in MODEL_PROVIDERS:
        raise ValueError(f"unknown model provider {provider!r}; known: {MODEL_PROVIDERS}")
    if kind not in bundle:
        raise Unavailable("the fused C++ kernel runs float32 on CPU, with the extension built")
    model, x = bundle[kind], bundle["x"]
    if runtime in ("eager", "eager_cl"):
        model, x = eager_model(provider, bundle)
        return lambda: model(x)
    if runtime == "compile":
        compiled = _compile(model, case.device)
        return lambda: compiled(x)
    if runtime == "compile_frozen":
        return _frozen(model, x, case.device)
    if runtime == "ort":
        if case.device != "cpu":
            raise Unavailable("CPU only (this suite runs ONNX Runtime's CPU execution provider)")
        return _ort_fn(_ort_session(_onnx_bytes(model, x)), x)
    if runtime in ("openvino", "openvino_default"):
        if case.device != "cpu" or case.dtype != torch.float32:
            raise Unavailable("float32 on CPU only (this suite runs OpenVINO's CPU plugin)")
        return _openvino_fn(_onnx_bytes(model, x), x, f32=runtime == "openvino")
    if runtime == "cudagraph":
        if case.device != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        return _cudagraph(model, x)
    raise ValueError(f"unknown runtime in provider {provider!r}")
