"""Text form of kernels: one statement per line, deterministic, for dumps (`DZC_DEBUG=kernels`) and deduplication."""
from __future__ import annotations

from dzc.codegen.kir import E, If, Kernel, Let, Local, Loop, Module, Prefetch, Store, Var, Assign

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "mod": "%", "and": "&", "or": "|", "xor": "^",
          "shl": "<<", "shr": ">>", "lt": "<", "le": "<=", "eq": "==", "ne": "!="}


def expr_text(e: E, memo: dict | None = None) -> str:
    memo = {} if memo is None else memo
    hit = memo.get(id(e))
    if hit is not None:
        return hit
    if e.op == "const":
        out = repr(e.arg) if e.dtype.name != "f32" else f"{e.arg!r}f"
    elif e.op == "var":
        out = e.arg
    elif e.op == "load":
        out = f"{e.arg.name}[{expr_text(e.src[0], memo)}{'' if e.dtype.count == 1 else f' +: {e.dtype.count}'}]"
    elif e.op in _INFIX:
        out = f"({expr_text(e.src[0], memo)} {_INFIX[e.op]} {expr_text(e.src[1], memo)})"
    elif e.op in ("cast", "bitcast", "bcast"):
        out = f"{e.op}<{e.dtype}>({expr_text(e.src[0], memo)})"
    elif e.op == "gep":
        out = f"{expr_text(e.src[0], memo)}.{e.arg}"
    else:
        out = f"{e.op}(" + ", ".join(expr_text(s, memo) for s in e.src) + ")"
    memo[id(e)] = out
    return out


def _stmts(body: list, indent: int, lines: list[str], memo: dict) -> None:
    pad = "  " * indent
    for s in body:
        if isinstance(s, Loop):
            extra = f" step {s.step}" if s.step != 1 else ""
            par = f" parallel(grain={s.grain})" if s.parallel else ""
            lines.append(f"{pad}for {s.var} in [{expr_text(s.start, memo)}, {expr_text(s.stop, memo)}){extra}{par}:")
            _stmts(s.body, indent + 1, lines, memo)
        elif isinstance(s, Store):
            lanes = "" if s.value.dtype.count == 1 else f" +: {s.value.dtype.count}"
            lines.append(f"{pad}{s.buf.name}[{expr_text(s.index, memo)}{lanes}] = {expr_text(s.value, memo)}")
        elif isinstance(s, Let):
            lines.append(f"{pad}let {s.name}: {s.value.dtype} = {expr_text(s.value, memo)}")
        elif isinstance(s, Var):
            lines.append(f"{pad}var {s.name}: {s.init.dtype} = {expr_text(s.init, memo)}")
        elif isinstance(s, Assign):
            lines.append(f"{pad}{s.name} = {expr_text(s.value, memo)}")
        elif isinstance(s, If):
            lines.append(f"{pad}if {expr_text(s.cond, memo)}:")
            _stmts(s.then, indent + 1, lines, memo)
            if s.orelse:
                lines.append(f"{pad}else:")
                _stmts(s.orelse, indent + 1, lines, memo)
        elif isinstance(s, Prefetch):
            lines.append(f"{pad}prefetch {s.buf.name}[{expr_text(s.index, memo)}]")
        elif isinstance(s, Local):
            lines.append(f"{pad}local {s.buf.name}: {s.buf.dtype}[{s.size}]")
        else:
            raise TypeError(s)


def kernel_text(k: Kernel, name: bool = True) -> str:
    params = ", ".join(f"{p.name}: {p.buf.dtype}*" if p.buf else f"{p.name}: i64" for p in k.params)
    lines = [f"kernel {k.name if name else ''}({params}) {{  # {k.kind}"]
    _stmts(k.body, 1, lines, {})
    lines.append("}")
    return "\n".join(lines) + "\n"


def module_text(m: Module) -> str:
    out = [kernel_text(k) for k in m.kernels.values()]
    for prog, calls in m.entries.items():
        out.append(f"entry dzc_{prog}(buffers, T, P) {{")
        out.extend(f"  {c.kernel}({', '.join(f'buf[{s}]' for s in c.slots)}, T, P)" for c in calls)
        out.append("}\n")
    return "\n".join(out)
