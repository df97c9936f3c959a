"""Deployment without Python: a compiled model as an ONNX file of standard operators.

    report = trp.deploy(model, example_input, "model.onnx")   # writes, then checks in ONNX Runtime
    print(report)                                             # path, size, operators, error, timing

The compiled model's low-rank layers export as their factor convolutions (plain ``Conv``
nodes: :func:`trp_kernels.ops.conv_chain` computes the reference chain when it is being
exported), its fused epilogues as ``Add``/``Relu``; BatchNorm is already folded. ONNX
Runtime and OpenVINO then run the file with no Python and no trp: both fuse each conv with
its bias, residual add and ReLU themselves. On this project's 2-core CPU they run the
same factors faster than ``trp.compile``'s own forward today (``benches/results``), so this
is the path for a deployment that cannot ship PyTorch, or that wants those engines.

The file is checked before :func:`deploy` returns (``check``): it must hold only operators
of the standard ONNX domain, and ONNX Runtime's output on the example must match the
model's within ``rtol`` of the output's largest magnitude. ``python -m trp deploy`` does
the same from the command line. Needs ``onnx``, ``onnxscript`` (the exporter) and, to
check, ``onnxruntime``: ``pip install -e ".[deploy]"``.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

STANDARD_DOMAINS = ("", "ai.onnx")


class DeployError(RuntimeError):
    """The model could not be exported, or the file failed its check."""


@dataclass
class Deployed:
    """What :func:`deploy` wrote and how it checked."""

    path: str
    bytes: int
    operators: dict          # ONNX op type -> count
    checked_with: Optional[str]   # "onnxruntime X.Y.Z", or None when not checked
    rel_err: Optional[float]      # max |ORT - model| / max |model| on the example
    ort_ms: Optional[float] = None    # median ms of ONNX Runtime's run on the example (time_it)
    model_ms: Optional[float] = None  # the same for the model itself (trp.timing.compare, blocks of its own)

    def __str__(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.operators.items(), key=lambda kv: -kv[1]))
        lines = [f"wrote {self.path} ({self.bytes:,} bytes): {ops}"]
        if self.checked_with is None:
            lines.append("not checked (onnxruntime is not installed, or check=False)")
        else:
            lines.append(f"checked with {self.checked_with}: relative error {self.rel_err:.3g} on the example")
            if self.ort_ms is not None and self.model_ms is not None:
                lines.append(f"on the example: ONNX Runtime {self.ort_ms:.3f} ms, the model in PyTorch "
                             f"{self.model_ms:.3f} ms (medians of 20 calls, {torch.get_num_threads()} threads; each "
                             "in blocks of its own, the other's threads idle; a quick reading: the benchmark suite, "
                             "each runtime in its own process, is the measurement)")
        return "\n".join(lines)


def onnx_bytes(model: nn.Module, *inputs: torch.Tensor) -> bytes:
    """``model`` exported to ONNX (``torch.onnx.export``, the dynamo exporter) on ``inputs``:
    the file's bytes. Raises :class:`DeployError` with the exporter's message on failure."""
    buf = io.BytesIO()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)  # the exporter logs a line per missing torchvision op
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
        exported.save(buf)
    except ImportError as e:
        raise DeployError(f"the ONNX exporter needs onnx and onnxscript ({e}): pip install -e \".[deploy]\"") from None
    except Exception as e:  # noqa: BLE001 - whatever the exporter raises, said as the export's failure
        raise DeployError(f"torch.onnx.export failed: {type(e).__name__}: {e}") from None
    finally:
        quiet.setLevel(level)
    return buf.getvalue()


def ort_session(data: Union[bytes, str], threads: Optional[int] = None, profile_prefix: Optional[str] = None):
    """An ONNX Runtime CPU session on the file (bytes or path), with ``threads`` intra-op
    threads (default: PyTorch's), one inter-op thread, every graph optimisation; with
    ``profile_prefix``, its profiler on, writing there (``session.end_profiling()`` names
    the file). The benchmark suite's ONNX Runtime providers run the same session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def deploy(model: nn.Module, example: torch.Tensor, path: Union[str, os.PathLike], *, check: Union[bool, str] = "auto",
           rtol: float = 1e-4, time_it: bool = False) -> Deployed:
    """Write ``model`` (usually ``trp.compile``'s output) to ``path`` as ONNX of standard
    operators, traced on ``example`` (its shape is the file's input shape), and check it.

    - ``check``: "auto" (default) checks with ONNX Runtime when it is installed; True
      requires it; False skips the run (the operator check is always made).
    - ``rtol``: the largest error allowed, relative to the output's largest magnitude.
    - ``time_it``: also time the model and the ONNX Runtime session on the example (each in
      blocks of its own with the other's thread pool idle, :func:`trp.timing.compare`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"example must be a torch.Tensor (the input to trace with), got {type(example).__name__}")
    if check not in (True, False, "auto"):
        raise ValueError(f"check must be True, False or 'auto', got {check!r}")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"rtol must be a number > 0, got {rtol!r}")
    path = os.fspath(path)
    if not path.endswith(".onnx"):
        raise ValueError(f"path must name a .onnx file, got {path!r}")
    example = example.detach().to("cpu") if example.device.type != "cpu" else example.detach()
    data = onnx_bytes(model, example)
    try:
        import onnx
    except ImportError as e:
        raise DeployError(f"checking the file needs onnx ({e}): pip install -e \".[deploy]\"") from None
    graph = onnx.load_from_string(data).graph
    operators: dict = {}
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise DeployError(f"the exported graph has a node of domain {node.domain!r} ({node.op_type}): "
                              "ONNX Runtime and OpenVINO may not run it")
        operators[node.op_type] = operators.get(node.op_type, 0) + 1
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # whole or not at all: a crash leaves no truncated model.onnx
        f.write(data)
    os.replace(tmp, path)
    report = Deployed(path, len(data), operators, None, None)
    if check is False:
        return report
    try:
        import onnxruntime as ort
    except ImportError as e:
        if check is True:
            raise DeployError(f"check=True needs onnxruntime ({e}): pip install -e \".[deploy]\"") from None
        return report
    with torch.no_grad():
        want = model(example)
    if not isinstance(want, torch.Tensor):
        raise DeployError(f"deploy checks models with one tensor output, got {type(want).__name__}")
    session = ort_session(data)
    feed = {session.get_inputs()[0].name: example.numpy()}
    (got,) = session.run(None, feed)
    got = torch.from_numpy(got)
    scale = float(want.abs().max()) if want.numel() else 0.0
    err = float((got - want).abs().max()) / max(scale, 1e-30) if want.numel() else 0.0
    report.checked_with, report.rel_err = f"onnxruntime {ort.__version__}", err
    if time_it:  # each in blocks of its own, the other's thread pool idle (trp.timing.compare)
        from trp.timing import compare

        def run_model():
            with torch.no_grad():
                return model(example)

        stats = compare({"model": run_model, "onnxruntime": lambda: session.run(None, feed)}, warmup=3, repeats=20,
                        pools={"model": "torch", "onnxruntime": "onnxruntime"})
        report.model_ms, report.ort_ms = stats["model"]["median_ms"], stats["onnxruntime"]["median_ms"]
    if got.shape != want.shape or not err <= rtol:
        raise DeployError(f"ONNX Runtime's output on the example differs from the model's: shape {tuple(got.shape)} "
                          f"against {tuple(want.shape)}, relative error {err:.3g} (rtol {rtol:g}); {path} was written")
    return report
