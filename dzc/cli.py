"""The `dzc` command line: compile, run, ir, serve, perplexity.

Every subcommand reports user errors (`DzcError`) as one line on stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import numpy as np

from dzc import __version__
from dzc.errors import DzcError, InputError, TokenizerError


def add_verify_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", choices=("auto", "full"), default="auto",
                   help="artifact check: auto = sha256 of files up to 64 MiB, a sampled fingerprint of bigger ones "
                        "(fast start); full = sha256 of every byte")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults as llama.cpp; --temperature 0 is greedy)")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=40, help="0 disables")
    g.add_argument("--top-p", type=float, default=0.95, help="1 disables")
    g.add_argument("--min-p", type=float, default=0.05, help="0 disables")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")


def _sampling_params(args: argparse.Namespace):
    from dzc.runtime.sampling import SamplingParams
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty, seed=args.seed, stop=list(args.stop), ignore_eos=args.ignore_eos)
    params.validate()
    return params


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got '{text}'") from None


def _prompt_ids(args: argparse.Namespace, model) -> tuple[list[int], str]:
    """The prompt as token ids, and the text to echo before the continuation."""
    if args.prompt_ids is not None:
        return _parse_ids(args.prompt_ids), ""
    if model.tokenizer is None:
        raise TokenizerError(f"{args.model} has no tokenizer.json; pass token ids with --prompt-ids instead")
    if args.chat is not None:
        text = model.tokenizer.apply_chat_template([{"role": "user", "content": args.chat}])
        return model.tokenizer.encode(text, add_special_tokens=False), ""
    return model.tokenizer.encode(args.prompt, add_special_tokens=True), args.prompt


def cmd_run(args: argparse.Namespace) -> int:
    from dzc.driver import open_model
    from dzc.runtime.generate import generate, generate_all

    model = open_model(args.model, target=args.target, max_context=args.max_context, threads=args.threads,
                       verify=args.verify)
    params = _sampling_params(args)
    ids, echo = _prompt_ids(args, model)
    executor = model.make_executor(model.max_context)
    capture = args.dump_logits is not None
    if args.json:
        result = generate_all(executor, ids, params, model.tokenizer, model.eos_ids, capture_logits=capture)
        token_ids, text, finish, stats, logits = (result.token_ids, result.text, result.finish_reason,
                                                  result.stats, result.logits)
        print(json.dumps({"token_ids": token_ids, "text": text, "finish_reason": finish, "stats": vars(stats)}))
    else:
        out = sys.stdout
        out.write(echo)
        out.flush()
        rows, finish, stats = [], None, None
        for event in generate(executor, ids, params, model.tokenizer, model.eos_ids, capture_logits=capture):
            out.write(event.text if model.tokenizer is not None else f"{event.token_id} ")
            out.flush()
            if capture:
                rows.append(event.logits)
            finish, stats = event.finish_reason or finish, event.stats or stats
        out.write("\n")
        out.flush()
        logits = np.stack(rows) if rows else np.zeros((0, model.config.vocab_size), np.float32)
        if stats is not None:
            print(f"[{finish}] prompt {stats.prompt_tokens} tok, {stats.prefill_tokens_per_s:.1f} tok/s | "
                  f"generated {stats.generated_tokens} tok, {stats.decode_tokens_per_s:.1f} tok/s | "
                  f"kv cache {stats.kv_cache_bytes_per_token} B/token", file=sys.stderr)
    if capture:
        np.save(args.dump_logits, np.asarray(logits, dtype=np.float32))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dzc.driver import open_model
    from dzc.perplexity import perplexity

    model = open_model(args.model, target=args.target, max_context=args.context, threads=args.threads)
    if model.tokenizer is None:
        raise TokenizerError(f"{args.model} has no tokenizer.json; perplexity needs one to tokenize {args.file}")
    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} as UTF-8 text: {exc}") from None
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    context = args.context or min(512, model.max_context)
    print(f"perplexity: {len(ids)} tokens, {len(ids) // context} chunks of {context}", file=sys.stderr)
    result = perplexity(model.make_executor(context), ids, context,
                        on_chunk=lambda i, ppl: print(f"[{i}]{ppl:.4f},", end="", flush=True, file=sys.stderr))
    print(file=sys.stderr)
    print(f"Final estimate: PPL = {result.perplexity:.4f} +/- {result.stderr:.4f} "
          f"({result.scored_tokens} tokens scored)")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from dzc.cli_ir import pass_print_options
    from dzc.driver import compile_checkpoint
    from dzc.passes.manager import RunOptions
    from dzc.progress import ProgressBar

    print_before, print_after, dump_dir = pass_print_options(args)
    options = RunOptions(print_before=print_before, print_after=print_after, dump_dir=dump_dir)
    out = compile_checkpoint(args.model, args.output, target=args.target, quant=args.quant, cpu=args.cpu,
                             triple=args.triple, threads=args.threads, progress=ProgressBar(), options=options)
    print(f"compiled {args.model} for {args.target} -> {out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dzc.cli_ir import add_ir_parser, add_pass_print_args
    from dzc.cli_serve import add_serve_parser
    parser = argparse.ArgumentParser(prog="dzc", description="Compile and run DeepSeek-V3-family models.")
    parser.add_argument("--version", action="version", version=f"dzc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    comp = sub.add_parser("compile", help="compile a checkpoint into a self-contained artifact folder")
    comp.add_argument("model", metavar="MODEL", help="checkpoint folder or .safetensors file")
    comp.add_argument("--target", default="cpu", choices=["cpu", "opencl", "metal", "cuda"])
    comp.add_argument("-o", "--output", required=True, metavar="OUT", help="artifact folder to write")
    comp.add_argument("--quant", default=None, choices=["f32", "bf16", "int8", "int4"],
                      help="requantize weights (default: keep the checkpoint's formats, FP8 included)")
    comp.add_argument("--cpu", default=None, help="CPU to compile for (default: this machine's), e.g. x86-64-v3, apple-m1")
    comp.add_argument("--triple", default=None, help="target triple, e.g. aarch64-unknown-linux-gnu")
    comp.add_argument("--threads", type=int, default=None, help="default thread count stored in the artifact")
    add_pass_print_args(comp)
    comp.set_defaults(func=cmd_compile)

    run = sub.add_parser("run", help="generate text from a checkpoint (interpreted) or a compiled artifact")
    run.add_argument("model", metavar="MODEL_OR_ARTIFACT")
    run.add_argument("--target", default=None, help="interp for a checkpoint (default); artifacts run on their own target")
    src = run.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="text to continue")
    src.add_argument("--chat", default=None, help="a user message, rendered with the model's chat template")
    src.add_argument("--prompt-ids", default=None, help="comma-separated token ids (needs no tokenizer)")
    _add_sampling_args(run)
    run.add_argument("--max-context", type=int, default=None, help="KV cache capacity in tokens")
    run.add_argument("--threads", type=int, default=None, help="threads for native code")
    add_verify_arg(run)
    run.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    run.add_argument("--dump-logits", default=None, metavar="FILE.npy",
                     help="save float32 [generated, vocab]: row i holds the logits that chose token i")
    run.set_defaults(func=cmd_run)

    add_ir_parser(sub)
    add_serve_parser(sub)

    ppl = sub.add_parser("perplexity", help="perplexity of a text file, scored like llama-perplexity")
    ppl.add_argument("model", metavar="MODEL_OR_ARTIFACT")
    ppl.add_argument("--file", required=True, help="UTF-8 text to score")
    ppl.add_argument("--context", type=int, default=None, help="chunk length in tokens (default 512)")
    ppl.add_argument("--target", default=None)
    ppl.add_argument("--threads", type=int, default=None)
    ppl.set_defaults(func=cmd_perplexity)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DzcError as exc:
        print(f"dzc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dzc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
