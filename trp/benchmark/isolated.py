"""One model provider of one case, checked and timed in a process of its own.

The suite's model rows are measured so by default (``python -m trp bench``; see
:func:`trp.benchmark.runner.model_case_rows`): a user runs one model in a process, and what
ran earlier in the same process can change the next model's time even when its thread pool
has gone idle. Measured on the 2-core AMD EPYC (benches/results/timing-method/isolation.txt):
trp.compile's ResNet-50 at batch 8 ran 71-77 ms in each of 5 processes where ONNX Runtime
had run the dense model first, and 50-74 ms alone (the time is bimodal from one process to
the next); in the suite's one-process method, with ONNX Runtime and OpenVINO in the process,
82-95 ms against 56 ms without them.

    python -m trp.benchmark.isolated < spec.json

The spec (:func:`spec`) names the case, the provider, the error tolerance, the seed of the
case's bundle (so that every process builds the same model, input and reference), the
time budget and the thread count. The process prints one line, ``RESULT_MARK`` + JSON of
``{"row": ..., "times_ms": [...]}``, last on stdout; anything else it prints is the
provider's own chatter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import torch

RESULT_MARK = "trp-isolated-result "


def spec(case, provider: str, budget_s: float, tol: Optional[float], seed: int, threads: int) -> dict:
    """What a process needs to rebuild ``case`` (a :class:`~trp.benchmark.cases.ModelCase`) and
    time ``provider`` on it, as JSON-able values."""
    fields = dataclasses.asdict(case)
    fields["dtype"] = str(case.dtype).removeprefix("torch.")
    if isinstance(fields["scheme"], tuple):
        fields["scheme"] = list(fields["scheme"])
    return {"case": fields, "provider": provider, "budget_s": budget_s, "tol": tol, "seed": seed,
            "threads": threads}


def fingerprint(bundle: dict) -> float:
    """A number that tells two builds of a case's bundle apart (the float64 reference output's
    absolute sum): the row records it, so that a process's case can be checked to be the
    one meant."""
    return float(bundle["ref"].abs().sum())


def run_spec(s: dict) -> dict:
    """Build the case's bundle, check the provider's output, time it alone: ``{"row", "times_ms"}``."""
    from trp.benchmark import cases as C
    from trp.benchmark import providers as P
    from trp.benchmark import runner

    torch.set_num_threads(s["threads"])
    fields = dict(s["case"], dtype=getattr(torch, s["case"]["dtype"]))
    if isinstance(fields["scheme"], list):
        fields["scheme"] = tuple(fields["scheme"])
    case = C.ModelCase(**fields)
    provider = s["provider"]
    bundle = P.seeded_bundle(case, s["seed"])
    row = runner.model_row(case, provider, bundle)
    row.update(pid=os.getpid(), fingerprint=fingerprint(bundle))
    fn = runner.prepare_checked(row, lambda: P.prepare_model(provider, case, bundle), bundle["ref"], s["tol"])
    times = []
    if fn is not None:
        runner._time_side_by_side([row], {provider: fn}, s["budget_s"], case.device, raw=True)
        times = row.pop("times_ms")
    return {"row": row, "times_ms": times}


def main() -> None:
    result = run_spec(json.loads(sys.stdin.read()))
    sys.stdout.flush()
    print(RESULT_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
