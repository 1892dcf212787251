"""The pass pipeline: one ordered list, filtered per target, phase and quantization.

Registering a pass is one line in `PIPELINE`: `Stage(pass_object)` runs everywhere; `phases=`, `targets=` and
`when=` narrow it. The order is the order passes run in. Shape of the list:

    clean-up      simplify, cse                        (the traced graph, tidied)
    raise         fuse-rmsnorm/rope/softmax/attention  (recognised chains -> named kernel ops)
    MLA / MoE     absorb-mla, lower-moe                (rewrites of attention / MOE)
    weights       fold-weights, quantize               (no weight transposes at run time; storage formats)
    fuse          fuse-swiglu, simplify-late, fuse-elementwise, dce
    final         select-layout, memory-plan           (memory-plan must stay last: it records nodes)

`dzc ir --list-passes` prints this list with each pass's description.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from dzc.errors import InputError
from dzc.model.deepseek_v3 import PHASES   # the programs the model traces; stages may name a subset
from dzc.passes.base import Pass
from dzc.passes.absorb_mla import AbsorbMLA
from dzc.passes.cse import CSE
from dzc.passes.dce import DCE
from dzc.passes.fold_weights import FoldWeights
from dzc.passes.fuse_elementwise import FuseElementwise
from dzc.passes.fuse_norm import FuseRMSNorm
from dzc.passes.fuse_rope import FuseRope
from dzc.passes.fuse_softmax_attention import FuseAttention, FuseSoftmax
from dzc.passes.fuse_swiglu import FuseSwiGLU
from dzc.passes.layout import SelectLayout
from dzc.passes.lower_moe import LowerMoE
from dzc.passes.memory_plan import MemoryPlanPass
from dzc.passes.quantize import Quantize
from dzc.passes.simplify import Simplify, SimplifyLate

TARGETS = ("interp", "cpu", "opencl", "metal", "cuda")
NATIVE = tuple(t for t in TARGETS if t != "interp")


@dataclass(frozen=True)
class Stage:
    """A pass and where it runs. None means every phase / every target; `when(target, phase, quant)` refines."""

    pass_: Pass
    phases: Optional[tuple[str, ...]] = None
    targets: Optional[tuple[str, ...]] = None
    when: Optional[Callable[[str, str, Optional[str]], bool]] = None

    def applies(self, target: str, phase: str, quant: Optional[str]) -> bool:
        return ((self.phases is None or phase in self.phases) and (self.targets is None or target in self.targets)
                and (self.when is None or self.when(target, phase, quant)))


PIPELINE: list[Stage] = [
    Stage(Simplify()),
    Stage(CSE()),
    Stage(FuseRMSNorm()),
    Stage(FuseRope()),
    Stage(FuseSoftmax()),
    Stage(FuseAttention()),
    # absorb-mla / lower-moe: after fuse-attention (absorb-mla also matches the ATTENTION op), before
    # fold-weights (which folds whatever weight slices they leave) and before quantize.
    Stage(AbsorbMLA()),
    Stage(LowerMoE()),
    Stage(FoldWeights()),
    # quantize: after every pass that derives weights.
    Stage(Quantize()),
    Stage(FuseSwiGLU()),
    Stage(SimplifyLate()),      # after every pass that matches the model's permutes
    Stage(FuseElementwise()),
    Stage(DCE()),
    Stage(SelectLayout()),
    Stage(MemoryPlanPass(), targets=NATIVE),   # keep last: the plan refers to the final program's nodes
]


def build_pipeline(target: str = "interp", phase: str = "decode", quant: Optional[str] = None) -> list[Pass]:
    """The passes that compile `phase` for `target`, in order."""
    if target not in TARGETS:
        raise InputError(f"unknown target '{target}'; choose one of {', '.join(TARGETS)}")
    if phase not in PHASES:
        raise InputError(f"unknown phase '{phase}'; choose one of {', '.join(PHASES)}")
    return [s.pass_ for s in PIPELINE if s.applies(target, phase, quant)]


def all_passes() -> list[Pass]:
    """Every distinct pass of the pipeline (first occurrence), for --list-passes and name checks."""
    seen: dict[str, Pass] = {}
    for s in PIPELINE:
        seen.setdefault(s.pass_.name, s.pass_)
    return list(seen.values())
