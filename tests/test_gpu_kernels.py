"""Every kernel kind of the CPU test suite (tests/test_codegen_kernels.py) on the GPU targets.

The same programs, sizes and interpreter comparisons, with `NativeProgram` swapped for
codegen.gpu_runner.OpenCLProgram: each program is lowered once for the GPU vector width, rendered as OpenCL C and
run on a real OpenCL device (PoCL on CPU machines; skipped when there is no OpenCL platform), both in its
one-thread-per-iteration form and in its cooperative (work group per iteration) form, and the same module is
rendered as Metal (type-checked with libclang against codegen/metal_shim.h) and as PTX for sm_80 and sm_90
(assembled with ptxas; skipped without ptxas).
"""
from __future__ import annotations

import functools
import shutil

import pytest

import test_codegen_kernels as K
from test_codegen_kernels import _per_test_rng  # noqa: F401  (autouse: the same per-test data as the CPU tests)


def _opencl_ok() -> bool:
    try:
        from dzc.runtime.opencl_executor import opencl_devices
        return bool(opencl_devices())
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _opencl_ok(), reason="no OpenCL platform")


@pytest.fixture(autouse=True)
def _on_opencl(monkeypatch, tmp_path_factory, request):
    monkeypatch.setenv("POCL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pocl-cache"))
    from dzc.codegen.gpu_runner import OpenCLProgram
    checks = [t for t, ok in (("metal", _have_libclang()), ("cuda", shutil.which("ptxas") is not None)) if ok]

    class Both:
        """Run the one-thread form and the cooperative form; the test compares the latter's outputs too."""

        def __init__(self, program, store, target=None):     # a CPU target does not apply: GPUs lower their own
            self.program = OpenCLProgram(program, store, checks=checks)

        def run(self, feed, cache_rows=None):
            import numpy as np
            a = self.program.run(feed, cache_rows, coop=False)
            b = self.program.run(feed, cache_rows, coop=True)
            for name in a:
                if a[name].dtype.kind in "biu":
                    np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name}: coop vs single")
                else:
                    scale = max(1.0, float(np.abs(a[name]).max()))
                    np.testing.assert_allclose(a[name], b[name], rtol=0, atol=2e-5 * scale,
                                               err_msg=f"{name}: coop vs single")
            return a

    monkeypatch.setattr(K, "NativeProgram", Both)


@functools.lru_cache(None)
def _have_libclang() -> bool:
    try:
        import clang.cindex  # noqa: F401
        return True
    except ImportError:
        return False


test_elementwise_and_broadcast = K.test_elementwise_and_broadcast
test_reductions_movement_concat = K.test_reductions_movement_concat
test_fused_kernel_body = K.test_fused_kernel_body
test_gather_rows_every_format = K.test_gather_rows_every_format
test_take_topk_ties = K.test_take_topk_ties
test_linear = K.test_linear
test_linear_on_strided_rows = K.test_linear_on_strided_rows
test_matmul_activations_and_weights = K.test_matmul_activations_and_weights
test_matmul_weight_quantized = K.test_matmul_weight_quantized
test_batched_linear = K.test_batched_linear
test_rmsnorm_softmax_swiglu_rope = K.test_rmsnorm_softmax_swiglu_rope
test_attention = K.test_attention
test_mla_attention_over_cache = K.test_mla_attention_over_cache
test_moe = K.test_moe
