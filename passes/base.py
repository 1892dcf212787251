"""What a pass is: a named rewrite of one program, with the context it may read and extend."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from dzc.ir.program import Program
from dzc.ir.weights import WeightStore


@dataclass
class PassContext:
    """Shared by every pass of one compilation.

    `weights` lets passes define derived weights (folded transposes, absorbed MLA matrices, requantized data);
    `config` is the model's ModelConfig; `target` names the code generator ("interp", "cpu", "opencl", ...);
    `quant` is the requested weight format (None keeps the checkpoint's); `facts` carries results later
    stages need (e.g. the memory plan), keyed by the pass that produced them.
    """

    weights: WeightStore
    config: Any
    target: str = "interp"
    quant: Optional[str] = None
    facts: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    name: str         # stable, kebab-case: what --print-after takes
    description: str  # one line, shown by `dzc ir --list-passes`

    def run(self, program: Program, ctx: PassContext) -> Program: ...
