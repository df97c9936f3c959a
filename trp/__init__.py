"""trp: Trained Rank Pruning for CNNs that are faster in wall-clock time, not just on paper.

    model = trp.compile(model)        # fold BN, factor k×k convs, swap in low-rank modules
    print(trp.summary(model, x))      # MACs and params per layer, before and after
    trp.save(model, "m.safetensors"); trp.load("m.safetensors", fresh_model)
    trp.deploy(model, x, "m.onnx")    # ONNX of standard operators, checked in ONNX Runtime
"""

from trp.admm import ADMM
from trp.breakdown import Breakdown, breakdown
from trp.compile import CompileConfig, compile, default_filter
from trp.decompose import RankSpec, select_rank
from trp.deploy import Deployed, DeployError, deploy
from trp.eigendamage import EigenDamage
from trp.io import load, save
from trp.methods import Method
from trp.modules import LowRankConv2d, LowRankLinear, TapSparseConv2d
from trp.plan import LayerChoice, Plan, TapChoice
from trp.spp import SPP
from trp.summary import Summary, summary
from trp.training import TRP, evaluate, fit
from trp_kernels.ops import BackendError

__version__ = "0.1.0"

__all__ = ["compile", "CompileConfig", "default_filter", "RankSpec", "select_rank", "save", "load",
           "LowRankConv2d", "LowRankLinear", "TapSparseConv2d", "summary", "Summary", "BackendError", "TRP", "fit", "evaluate",
           "breakdown", "Breakdown", "deploy", "Deployed", "DeployError", "Method", "Plan", "LayerChoice", "TapChoice",
           "ADMM", "EigenDamage", "SPP",
           "__version__"]
