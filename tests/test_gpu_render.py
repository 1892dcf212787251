"""The GPU renderers on hand-written kernels: launches and grid sizes, vector legalisation, half-precision storage
through vload_half/vstore_half, boolean vectors, cooperative plans; each kernel is executed on OpenCL (PoCL here)
against numpy, type-checked as Metal and assembled as PTX for sm_80 and sm_90.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from dzc.codegen import kir
from dzc.codegen.builder import KernelBuilder
from dzc.codegen.c_style import coop_plan
from dzc.codegen.gpu import eval_host, host_expr, legalize_lanes, split_launches
from dzc.codegen.kir import BOOL, F16, F32, I64, U8, U16, U32, Module, bitcast, cast, const, fma, load
from dzc.codegen.opencl import OpenCLRenderer
from dzc.errors import CompileError


def _opencl():
    try:
        from dzc.runtime.opencl_executor import opencl_devices
        return bool(opencl_devices())
    except Exception:
        return False


needs_opencl = pytest.mark.skipif(not _opencl(), reason="no OpenCL platform")
needs_ptxas = pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas not on PATH")


@pytest.fixture(autouse=True)
def _pocl_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("POCL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pocl-cache"))


def run_opencl(kernel: kir.Kernel, arrays: dict, T: int = 1, P: int = 0, coop: bool = False,
               max_lanes: int = OpenCLRenderer.max_lanes) -> dict:
    """Render one kernel for OpenCL, run all its launches on `arrays` (by buffer name), return the arrays."""
    import pyopencl as cl
    from dzc.runtime.opencl_executor import pick_device
    mod = Module()
    mod.add(kernel)

    class R(OpenCLRenderer):
        pass
    R.max_lanes = max_lanes
    src = R(coop=coop).render(mod)
    dev = pick_device()
    ctx = cl.Context([dev])
    q = cl.CommandQueue(ctx)
    prg = cl.Program(ctx, src.source).build(options=["-cl-std=CL1.2"])
    bufs = {}
    for p in kernel.params:
        if p.buf is not None:
            a = np.ascontiguousarray(arrays[p.buf.name])
            b = cl.Buffer(ctx, cl.mem_flags.READ_WRITE, size=max(64, a.nbytes))
            cl.enqueue_copy(q, b, a)
            bufs[p.buf.name] = (b, a)
    for launch in src.manifest()["launches"][kernel.name]:
        if coop and "coop" in launch:
            launch = launch["coop"]
        n = eval_host(launch["iterations"], T, P)
        if n <= 0:
            continue
        k = cl.Kernel(prg, launch["name"])
        args = []
        for p in kernel.params:
            if p.buf is not None:
                args += [bufs[p.buf.name][0], np.int64(0)]
        k.set_args(*args, np.int64(T), np.int64(P))
        g = launch["group"]
        cl.enqueue_nd_range_kernel(q, k, (n * g,), (g,) if g > 1 else None)
    out = {}
    for name, (b, a) in bufs.items():
        r = np.empty_like(a)
        cl.enqueue_copy(q, r, b)
        out[name] = r
    return out


def check_other_targets(kernel: kir.Kernel) -> None:
    from dzc.codegen.gpu_runner import check_targets
    mod = Module()
    mod.add(kernel)
    checks = []
    try:
        import clang.cindex  # noqa: F401
        checks.append("metal")
    except ImportError:
        pass
    if shutil.which("ptxas"):
        checks.append("cuda")
    check_targets(mod, checks)


# ---- host expressions and launches ---------------------------------------------------------------------------------
def test_host_expressions_use_c_division():
    T, P = kir.var("T"), kir.var("P")
    e = ((T * 4 + P) - 7) // 3 % 5
    j = host_expr(e)
    for t, p in [(1, 0), (5, 2), (0, 0), (3, 100)]:
        v = t * 4 + p - 7
        q = int(v / 3)                       # C truncation, also for negatives
        assert eval_host(j, t, p) == q - int(q / 5) * 5
    with pytest.raises(CompileError):
        host_expr(load(kir.Buf("x", I64), 0))


def test_split_launches_prelude_serial_parallel():
    kb = KernelBuilder("mix", "test")
    x, y = kb.buf("x", F32), kb.buf("y", F32)
    n = kb.let(kb.T * 2, "n")
    kb.store(y, 0, const(1.0, F32))
    with kb.loop(0, n, parallel=True) as i:
        kb.store(x, i, load(x, i) * 2.0)
    kb.store(y, 1, load(x, 0) + load(y, 0))
    k = kb.build()
    ls = split_launches(k)
    assert [l.name for l in ls] == ["dzc_mix_0", "dzc_mix_1", "dzc_mix_2"]
    assert [l.loop is not None for l in ls] == [False, True, False]
    assert eval_host(ls[1].iterations, 3, 0) == 6
    if _opencl():
        out = run_opencl(k, {"x": np.arange(8, dtype=np.float32), "y": np.zeros(2, np.float32)}, T=3)
        np.testing.assert_array_equal(out["x"], [0, 2, 4, 6, 8, 10, 6, 7])
        np.testing.assert_array_equal(out["y"], [1, 1])
    check_other_targets(k)


def test_serial_registers_cannot_cross_a_parallel_loop():
    kb = KernelBuilder("bad", "test")
    x = kb.buf("x", F32)
    acc = kb.reg(load(x, 0), "acc")
    with kb.loop(0, kb.T, parallel=True) as i:
        kb.store(x, i + 1, load(x, i + 1))
    kb.store(x, 0, acc.v)
    with pytest.raises(CompileError, match="cross a parallel loop"):
        split_launches(kb.build())


# ---- vectors, half precision, booleans ----------------------------------------------------------------------------------
def _dot16_kernel() -> kir.Kernel:
    """Rows of 40: 16-lane fma chunks with a vector accumulator and a scalar tail, plus a bf16-style bit decode."""
    kb = KernelBuilder("dot16", "test")
    x, w, b, y = kb.buf("x", F32), kb.buf("w", F32), kb.buf("b", U16), kb.buf("y", F32)
    with kb.loop(0, kb.T, parallel=True) as r:
        acc = kb.reg(const(0.0, F32.vec(16)), "acc")
        with kb.loop(0, 32, step=16) as k:
            wb = bitcast(cast(load(b, r * 40 + k, 16), U32.vec(16)) << const(16, U32), F32.vec(16))
            kb.set(acc, fma(load(x, k, 16), load(w, r * 40 + k, 16) + wb, acc.v))
        tail = kb.reg(const(0.0, F32), "t")
        with kb.loop(32, 40) as k:
            kb.set(tail, fma(load(x, k), load(w, r * 40 + k), tail.v))
        kb.store(y, r, kir.reduce_add(acc.v) + tail.v)
    return kb.build()


@pytest.mark.parametrize("max_lanes", [8, 4])
def test_vectors_and_legalisation(max_lanes):
    k = _dot16_kernel()
    leg = legalize_lanes(k, 4)
    widest = max(x.dtype.count for st in kir.walk_stmts(leg.body) for e in kir.stmt_exprs(st)
                 for x in kir.walk_expr(e))
    assert widest == 4
    rng = np.random.default_rng(0)
    rows = 5
    x = rng.standard_normal(40).astype(np.float32)
    w = rng.standard_normal(rows * 40).astype(np.float32)
    bv = (rng.standard_normal(rows * 40).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    wb = (bv.astype(np.uint32) << 16).view(np.float32)
    wb[np.arange(rows * 40) % 40 >= 32] = 0
    want = ((w + wb).reshape(rows, 40) * x).sum(1)
    if _opencl():
        for coop in (False, True):
            got = run_opencl(k, {"x": x, "w": w, "b": bv, "y": np.zeros(rows, np.float32)}, T=rows, coop=coop,
                             max_lanes=max_lanes)["y"]
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    check_other_targets(k)


@needs_opencl
@pytest.mark.parametrize("lanes", [1, 4, 8])
def test_half_storage_through_vload_half(lanes):
    """f16 loads (vload_half[N]), f16 stores (vstore_half[N]_rte: round to nearest even), f32 -> f16 casts and
    u16 bits -> f16 (the fp8 decode path), all without cl_khr_fp16."""
    kb = KernelBuilder("half", "test")
    h, o, bits, r, f = kb.buf("h", F16), kb.buf("o", F16), kb.buf("bits", U16), kb.buf("r", F32), kb.buf("f", F32)
    with kb.loop(0, kb.T, step=lanes, parallel=True) as i:
        v = cast(load(h, i, lanes), F32.vec(lanes))
        kb.store(o, i, cast(v * 3.0 + load(f, i, lanes), F16.vec(lanes)))
        dec = cast(bitcast(load(bits, i, lanes), F16.vec(lanes)), F32.vec(lanes))
        rounded = cast(cast(load(f, i, lanes), F16.vec(lanes)), F32.vec(lanes))
        kb.store(r, i, dec + rounded * 1024.0)
    k = kb.build()
    n = 16
    rng = np.random.default_rng(1)
    hv = rng.standard_normal(n).astype(np.float16)
    fv = (rng.standard_normal(n) * 3).astype(np.float32)
    bv = rng.standard_normal(n).astype(np.float16).view(np.uint16)
    out = run_opencl(k, {"h": hv, "o": np.zeros(n, np.float16), "bits": bv, "r": np.zeros(n, np.float32),
                         "f": fv}, T=n)
    np.testing.assert_array_equal(out["o"], (hv.astype(np.float32) * 3 + fv).astype(np.float16))
    want = bv.view(np.float16).astype(np.float32) + fv.astype(np.float16).astype(np.float32) * 1024
    np.testing.assert_array_equal(out["r"], want)
    assert "vload_half" in OpenCLRenderer().render(_module(k)).source
    check_other_targets(k)


def _module(k):
    m = Module()
    m.add(k)
    return m


@needs_opencl
def test_boolean_vectors_and_selects():
    kb = KernelBuilder("bools", "test")
    a, b, m, y = kb.buf("a", F32), kb.buf("b", U8), kb.buf("m", BOOL), kb.buf("y", F32)
    with kb.loop(0, kb.T, step=4, parallel=True) as i:
        va, vb = load(a, i, 4), load(b, i, 4)
        c = (va < 0.0) | kir.alu("eq", vb, const(3, U8).cast(U8))
        kb.store(m, i, c)
        kb.store(y, i, kir.where(load(m, i, 4), -va, cast(vb, F32.vec(4))))
    k = kb.build()
    av = np.array([-1, 2, -3, 4, 5, -6, 7, 8], np.float32)
    bv = np.array([3, 1, 3, 3, 0, 9, 3, 2], np.uint8)
    out = run_opencl(k, {"a": av, "b": bv, "m": np.zeros(8, np.uint8), "y": np.zeros(8, np.float32)}, T=8)
    mask = (av < 0) | (bv == 3)
    np.testing.assert_array_equal(out["m"], mask.astype(np.uint8))
    np.testing.assert_array_equal(out["y"], np.where(mask, -av, bv.astype(np.float32)))
    check_other_targets(k)


# ---- cooperative plans --------------------------------------------------------------------------------------------------
def _norm_kernel(in_place: bool) -> kir.Kernel:
    """rows of D: sum of squares (reduction loop), then scale every element (map loop); in place or not; then a
    running sum (a loop that must not be split) stored at the row's end."""
    D = 50
    kb = KernelBuilder("norm", "test")
    x, y, s = kb.buf("x", F32), kb.buf("y", F32), kb.buf("s", F32)
    with kb.loop(0, kb.T, parallel=True) as r:
        ss = kb.reg(const(1.0, F32), "ss")           # a non-zero initial value: counted once, not per lane
        with kb.loop(0, D) as k:
            v = kb.let(load(x, r * D + k), "v")
            kb.set(ss, ss.v + v * v)
        inv = kb.let(const(1.0, F32) / kir.sqrt(ss.v), "inv")
        dst = x if in_place else y
        with kb.loop(0, D) as k:
            kb.store(dst, r * D + k, load(x, r * D + k) * inv)
        run = kb.reg(const(0.0, F32), "run")
        with kb.loop(0, D) as k:
            kb.set(run, run.v * 0.5 + load(dst, r * D + k))
        kb.store(s, r, run.v)
    return kb.build()


def test_coop_plan_modes():
    plan = coop_plan(_norm_kernel(False).body[0])
    assert plan.modes == ["all", "reduce", "all", "map", "all", "all", "lane0"]
    assert plan.reductions[1] == {"ss2": "add"}
    assert 3 in plan.barrier_after          # the scaled rows are read again by the running sum


@needs_opencl
@pytest.mark.parametrize("in_place", [False, True])
def test_coop_equals_single_thread(in_place):
    k = _norm_kernel(in_place)
    rows, D = 3, 50
    x = np.random.default_rng(2).standard_normal(rows * D).astype(np.float32)
    feed = {"x": x, "y": np.zeros(rows * D, np.float32), "s": np.zeros(rows, np.float32)}
    single = run_opencl(k, feed, T=rows, coop=False)
    both = run_opencl(k, feed, T=rows, coop=True)
    for name in ("x", "y", "s"):
        np.testing.assert_allclose(both[name], single[name], rtol=1e-5, atol=1e-6)
    xs = x[: rows * D].reshape(rows, D)
    scaled = xs / np.sqrt(1 + (xs * xs).sum(1, keepdims=True))
    got = (single["x"] if in_place else single["y"]).reshape(rows, D)
    np.testing.assert_allclose(got, scaled, rtol=1e-5, atol=1e-6)
    run = np.zeros(rows, np.float32)
    for k_ in range(D):
        run = run * 0.5 + scaled[:, k_]
    np.testing.assert_allclose(single["s"], run, rtol=1e-5, atol=1e-6)
    check_other_targets(k)
