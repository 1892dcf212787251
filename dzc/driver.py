"""From a path on disk to something that runs: open a checkpoint (interpreted) or a compiled artifact (native).

This is the one place the CLI, the server and the perplexity tool get a model from, so they all accept the
same inputs and fail with the same messages.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from dzc.checkpoint.config import ModelConfig
from dzc.checkpoint.loader import Checkpoint
from dzc.errors import InputError
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightFormat
from dzc.ir.program import Program
from dzc.ir.weights import WeightStore
from dzc.model import deepseek_v3
from dzc.passes.base import PassContext
from dzc.passes.manager import RunOptions, run_pipeline
from dzc.passes.pipeline import build_pipeline
from dzc.runtime.executor import ModelExecutor
from dzc.runtime.interp_executor import InterpreterExecutor
from dzc.runtime.tokenizer import Tokenizer

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, detail)
DEFAULT_MAX_CONTEXT = 4096
_STORAGE_FORMATS = {
    "F32": WeightFormat(DType.F32), "BF16": WeightFormat(DType.BF16), "F16": WeightFormat(DType.F16),
    "F8_E4M3": WeightFormat(DType.FP8E4M3, (128, 128)),
}


@dataclass
class LoadedModel:
    """What every front end needs: a way to make executors, plus tokenizer and stop ids."""

    name: str
    config: ModelConfig
    tokenizer: Optional[Tokenizer]
    eos_ids: tuple[int, ...]
    max_context: int
    make_executor: Callable[[int], ModelExecutor]  # capacity in tokens -> a fresh executor with its own cache


def checkpoint_weights(checkpoint: Checkpoint) -> tuple[WeightStore, Callable[[str], WeightFormat]]:
    """The weight store (lazy, exact f32) and the storage format of every weight the model names."""
    consts = deepseek_v3.constants(checkpoint.config)
    store = WeightStore(lambda name: consts[name] if name in consts else checkpoint.f32(name))

    def format_of(name: str) -> WeightFormat:
        if name in consts:
            return WeightFormat(DType.F32)
        fmt = _STORAGE_FORMATS[checkpoint.raw(name)[1]]
        if fmt.block:  # FP8 blocks come from the checkpoint's quantization_config
            fmt = WeightFormat(fmt.dtype, tuple(checkpoint.config.quantization.block))
        return fmt

    return store, format_of


def trace_checkpoint(checkpoint: Checkpoint, phases: Sequence[str] = deepseek_v3.PHASES
                     ) -> tuple[dict[str, Program], WeightStore]:
    store, format_of = checkpoint_weights(checkpoint)
    programs = {phase: deepseek_v3.trace(checkpoint.config, format_of, phase) for phase in phases}
    return programs, store


def run_passes(programs: Mapping[str, Program], store: WeightStore, config: ModelConfig, target: str,
               quant: Optional[str] = None, progress: Optional[Progress] = None,
               facts: Optional[dict] = None, options: Optional[RunOptions] = None) -> dict[str, Program]:
    """The pass pipeline for `target`, per phase, with one shared context (so derived weights are made once).
    `options` carries --print-before/--print-after/--dump-dir; dumps go to one subfolder per phase."""
    ctx = PassContext(weights=store, config=config, target=target, quant=quant, facts=dict(facts or {}))
    out = {}
    for i, (phase, program) in enumerate(programs.items()):
        if progress is not None:
            progress("passes", i, len(programs), phase)
        phase_options = options
        if options is not None and options.dump_dir is not None:
            phase_options = replace(options, dump_dir=options.dump_dir / phase)
        out[phase] = run_pipeline(program, build_pipeline(target, phase, quant), ctx, phase_options).program
    if progress is not None:
        progress("passes", len(programs), len(programs), "")
    return out


def compile_checkpoint(checkpoint: str | Path, out_dir: str | Path, *, target: str = "cpu",
                       quant: Optional[str] = None, cpu: Optional[str] = None, triple: Optional[str] = None,
                       threads: Optional[int] = None, progress: Optional[Progress] = None,
                       options: Optional[RunOptions] = None) -> Path:
    """`dzc compile`: checkpoint -> traced prefill/decode -> the target's pass pipeline -> artifact folder."""
    from dzc.codegen.compile import compile_model
    ck = Checkpoint.open(checkpoint)
    ck.validate()
    if progress is not None:
        progress("trace", 0, 1, str(checkpoint))
    traced, store = trace_checkpoint(ck)
    if progress is not None:
        progress("trace", 1, 1, "")
    programs = run_passes(traced, store, ck.config, target, quant, progress, options=options)
    return compile_model(programs, store, ck.config, out_dir, target=target, quant=quant, cpu=cpu, triple=triple,
                         threads=threads, progress=progress, tokenizer_dir=ck.tokenizer_dir,
                         vocab_size=ck.config.vocab_size)


def is_artifact(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def _tokenizer(folder: Optional[Path]) -> Optional[Tokenizer]:
    return Tokenizer.from_dir(folder) if folder is not None else None


def open_model(path: str | Path, target: Optional[str] = None, max_context: Optional[int] = None,
               threads: Optional[int] = None, verify: str = "auto") -> LoadedModel:
    """A checkpoint runs on the interpreter; a compiled artifact folder on the target it was compiled for
    (`verify`: how its files are checked, see runtime.artifact.load_artifact)."""
    path = Path(path)
    if path.is_dir() and is_artifact(path):
        from dzc.runtime.artifact import open_artifact_model
        return open_artifact_model(path, max_context=max_context, threads=threads, verify=verify)
    if target not in (None, "interp"):
        raise InputError(f"{path} is a checkpoint, which runs with --target interp; "
                         f"compile it first: dzc compile {path} --target {target} -o OUT, then dzc run OUT")
    checkpoint = Checkpoint.open(path)
    checkpoint.validate()
    traced, store = trace_checkpoint(checkpoint, ("prefill", "decode"))   # the interpreter slices logits itself
    cfg = checkpoint.config
    programs = run_passes(traced, store, cfg, "interp")
    capacity = _capacity(cfg, max_context)
    return LoadedModel(
        name=path.name, config=cfg, tokenizer=_tokenizer(checkpoint.tokenizer_dir), eos_ids=cfg.eos_token_ids,
        max_context=capacity,
        make_executor=lambda n: InterpreterExecutor(programs["prefill"], programs["decode"], store,
                                                    cfg.vocab_size, n))


def _capacity(config: ModelConfig, max_context: Optional[int]) -> int:
    limit = config.max_position_embeddings
    if max_context is None:
        return min(limit, DEFAULT_MAX_CONTEXT)
    if max_context < 1:
        raise InputError(f"--max-context must be at least 1, got {max_context}")
    return max_context
