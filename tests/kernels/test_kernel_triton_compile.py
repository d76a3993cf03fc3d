"""The Triton kernels compile ahead of time for an H100 (sm_90) without a GPU, bf16 on tensor cores.

The interpreter checks the kernels' arithmetic but not that they lower to GPU code. ``triton.compile`` with an
explicit ``GPUTarget`` runs the whole compiler (to PTX and, with the bundled ptxas, a cubin) without a GPU.
It runs in a subprocess because this test process has ``TRITON_INTERPRET=1``.
"""

import json
import os
import subprocess
import sys

import pytest

COMPILE_SCRIPT = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tikmix_kernels import triton_ops

POINTER_TYPES = {"x_ptr": "{dtype}", "g_ptr": "{dtype}", "p_in_ptr": "{dtype}", "p_out_ptr": "{dtype}",
                 "seg_ptr": "i64", "order_ptr": "i64"}
report = {}
for kernel, flags in ((triton_ops._project_grads_kernel, {"RETURN_FACTORS": True}),
                      (triton_ops._segment_target_scores_kernel, {})):
    for dtype in ("bf16", "fp32"):
        constexprs = {"HAS_ORDER": True, "UPCAST": False, "BLOCK_N": 64, "BLOCK_D": 64, "BLOCK_KI": 64,
                      "BLOCK_KO": 64, **flags}
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*" + POINTER_TYPES.get(name, "fp32").format(dtype=dtype)
            else:
                signature[name] = "i32"
        source = ASTSource(fn=kernel, signature=signature,
                           constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        report[f"{kernel.__name__}/{dtype}"] = {"wgmma": compiled.asm["ptx"].count("wgmma"),
                                               "cubin_bytes": len(compiled.asm["cubin"])}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90_with_tensor_cores_for_bf16():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report) == 4
    for name, info in report.items():
        assert info["cubin_bytes"] > 0, name
        # bf16 projections run on Hopper tensor cores; fp32 stays on IEEE FMA (exact fp32, by design).
        assert (info["wgmma"] > 0) == name.endswith("bf16"), (name, info)
