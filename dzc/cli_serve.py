"""`dzc serve OUT`: the command-line face of dzc.runtime.server.

dzc/cli.py wires it in with one line, `add_serve_parser(sub)`: the parser's default `func` is `run_serve`,
which opens OUT with `dzc.driver.open_model` (a compiled artifact, or a checkpoint on the interpreter) and
serves it. `run_serve(args, load_model)` takes another loader (`path -> ServedModel`), as the tests do.
`python -m dzc.cli_serve OUT [options]` runs the same command on its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from dzc.errors import DzcError, TokenizerError

if TYPE_CHECKING:
    from dzc.runtime.server import ServedModel

API_KEY_ENV = "DZC_API_KEY"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve OUT (a compiled artifact folder or a checkpoint folder) over an OpenAI-compatible API: "
                    "POST /v1/chat/completions and /v1/completions (streaming with stream: true), GET /v1/models, "
                    "GET /health, and a WebSocket at /ws. Requests beyond --max-concurrency wait in a FIFO queue "
                    "(response header x-dzc-queue-position).",
    )
    p.add_argument("out", metavar="OUT", help="compiled artifact folder or checkpoint folder")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080; 0 picks a free one)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health "
                        f"(default: ${API_KEY_ENV} if set, else no key)")
    p.add_argument("--rate-limit", type=_rate_limit, default=None, metavar="N/min",
                   help="at most N requests per minute per API key (per client address without a key); "
                        "over it: 429 with Retry-After. N/s and N/h work too")
    p.add_argument("--max-concurrency", type=_positive, default=1, metavar="N",
                   help="requests generating at once, each with its own executor and KV cache (default 1); "
                        "the rest wait in a FIFO queue")
    p.add_argument("--max-queue", type=_non_negative, default=64, metavar="N",
                   help="requests that may wait for a slot (default 64); beyond it the server answers 503")
    p.add_argument("--model-name", default=None, metavar="NAME",
                   help="model id clients send and /v1/models lists (default: OUT's folder name)")
    p.add_argument("--target", default=None,
                   help="interp for a checkpoint (default); artifacts run on their own target")
    p.add_argument("--max-context", type=int, default=None, help="KV cache capacity in tokens, per concurrent request")
    p.add_argument("--threads", type=int, default=None, help="threads for native code")
    from dzc.cli import add_verify_arg
    add_verify_arg(p)
    p.set_defaults(func=run_serve)
    return p


def run_serve(args: argparse.Namespace, load_model: Optional[Callable[[str], "ServedModel"]] = None) -> int:
    """Check the options, load the model, serve until interrupted. Errors are DzcErrors (ServeError etc.).
    Without `load_model`, OUT is opened with dzc.driver.open_model and the serve options."""
    from dzc.runtime.server import ServedModel, ServeError, ServerConfig, serve

    if load_model is None:
        load_model = lambda path: _open(path, args)  # noqa: E731

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    config = ServerConfig(host=args.host, port=args.port, api_key=api_key, rate_limit=args.rate_limit,
                          max_concurrency=args.max_concurrency, max_queue=args.max_queue)
    config.check()  # before the (possibly slow) model load
    model = load_model(args.out)
    if not isinstance(model, ServedModel):
        raise ServeError(f"the loader returned {type(model).__name__}, not a ServedModel (a dzc bug)")
    name = args.model_name or default_model_name(args.out)
    if not name.strip():
        raise ServeError("--model-name must not be empty")
    serve(dataclasses.replace(model, name=name), config)
    return 0


def _open(path: str, args: argparse.Namespace) -> "ServedModel":
    from dzc.driver import open_model

    return served_model(open_model(path, target=getattr(args, "target", None),
                                   max_context=getattr(args, "max_context", None),
                                   threads=getattr(args, "threads", None), verify=getattr(args, "verify", "auto")))


def served_model(loaded: Any) -> "ServedModel":
    """A ServedModel from dzc.driver's LoadedModel (name, tokenizer, eos_ids, max_context, make_executor(n))."""
    from dzc.runtime.server import ServedModel

    if loaded.tokenizer is None:
        raise TokenizerError(f"{loaded.name} has no tokenizer.json; dzc serve needs one to read prompts and "
                             "write text")
    capacity = loaded.max_context
    return ServedModel(name=loaded.name, make_executor=lambda: loaded.make_executor(capacity),
                       tokenizer=loaded.tokenizer, eos_ids=tuple(loaded.eos_ids), max_context=capacity)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m dzc.cli_serve OUT [options]`: `dzc serve` on its own."""
    parser = argparse.ArgumentParser(prog="dzc")
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_serve(args)
    except DzcError as exc:
        print(f"dzc: error: {exc}", file=sys.stderr)
        return exc.exit_code


def default_model_name(out: str) -> str:
    """The artifact (or checkpoint) folder's name: what clients put in "model"."""
    return Path(out).resolve().name or str(out)


def _rate_limit(text: str):
    from dzc.runtime.server_auth import RateLimit

    try:
        return RateLimit.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 1")
    return value


def _non_negative(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer >= 0")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


if __name__ == "__main__":
    sys.exit(main())
