"""Bad kernel inputs raise KernelInputError naming argument and shapes; documented casts and defaults hold."""

import pytest
import torch
from kernel_cases import CPU_BACKENDS, random_case
from tikmix_kernels import project_grads, segment_target_scores

from tikmix_loader.errors import KernelInputError


@pytest.fixture
def case():
    return random_case(n=12, d_in=6, d_out=5, k_in=3, k_out=2, num_segments=3)


def _with(case, **changes):
    return {**case, **changes}


BAD_INPUTS = {
    "x-g-dtype-mismatch": (lambda c: _with(c, g=c["g"].double()), r"`g` has dtype torch.float64"),
    "x-bf16-g-fp32": (
        lambda c: _with(c, x=c["x"].bfloat16()),
        r"`x` is torch.bfloat16 .*\(12, 6\).* `g` is torch.float32",
    ),
    "integer-x": (lambda c: _with(c, x=c["x"].long()), r"`x` has dtype torch.int64 \(shape \(12, 6\)\)"),
    "one-dim-x": (lambda c: _with(c, x=c["x"][:, 0]), r"`x` has shape \(12,\) and `g` has shape \(12, 5\)"),
    "leading-dims-differ": (
        lambda c: _with(c, g=c["g"][:10]),
        r"`x` has shape \(12, 6\) and `g` has shape \(10, 5\)",
    ),
    "p-in-rows": (
        lambda c: _with(c, p_in=torch.zeros(7, 3)),
        r"`p_in` has shape \(7, 3\); expected \[d_in=6, k\]",
    ),
    "p-out-zero-k": (lambda c: _with(c, p_out=torch.zeros(5, 0)), r"`p_out` has shape \(5, 0\)"),
    "integer-p": (
        lambda c: _with(c, p_in=torch.zeros(6, 3, dtype=torch.int32)),
        r"`p_in` has dtype torch.int32",
    ),
    "float-segment-ids": (
        lambda c: _with(c, segment_ids=c["segment_ids"].float()),
        r"`segment_ids` has dtype torch.float32 \(shape \(12,\)\); expected an integer tensor",
    ),
    "segment-ids-shape": (
        lambda c: _with(c, segment_ids=c["segment_ids"][:11]),
        r"`segment_ids` has shape \(11,\) but `x` has shape \(12, 6\)",
    ),
    "id-below-minus-one": (
        lambda c: _with(c, segment_ids=torch.full((12,), -2)),
        r"holds ids in \[-2, -2\] but they must lie in \[-1, 2\] \(num_segments=3\)",
    ),
    "id-too-large": (
        lambda c: _with(c, segment_ids=torch.arange(12)),
        r"`segment_ids` \(shape \(12,\)\) holds ids in \[0, 11\] but they must lie in \[-1, 2\]",
    ),
    "negative-num-segments": (
        lambda c: _with(c, num_segments=-1),
        r"`num_segments` must be a non-negative int",
    ),
    "bool-num-segments": (
        lambda c: _with(c, num_segments=True),
        r"`num_segments` must be a non-negative int",
    ),
    "default-segments-too-few": (
        lambda c: _with(c, x=c["x"].view(3, 4, 6), g=c["g"].view(3, 4, 5), segment_ids=None, num_segments=2),
        r"ids in \[0, 2\] but they must lie in \[-1, 1\]",
    ),
    "device-mismatch": (
        lambda c: _with(c, p_out=c["p_out"].to("meta")),
        r"`p_out` \(shape \(5, 2\)\) is on meta but `x` is on cpu",
    ),
    "not-a-tensor": (lambda c: _with(c, x=c["x"].tolist()), r"`x` must be a torch.Tensor, got list"),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(("make_bad", "match"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_raise_kernel_input_error(case, make_bad, match, backend):
    with pytest.raises(KernelInputError, match=r"project_grads: .*" + match):
        project_grads(**make_bad(case), backend=backend)
    with pytest.raises(KernelInputError, match=r"segment_target_scores: .*" + match):
        segment_target_scores(**make_bad(case), q=torch.zeros(1, 2, 3), backend=backend)


def test_bad_target_matrices_raise(case):
    with pytest.raises(
        KernelInputError, match=r"`q` has shape \(2, 3, 2\); expected \[n_targets, k_out=2, k_in=3\]"
    ):
        segment_target_scores(**case, q=torch.zeros(2, 3, 2))
    with pytest.raises(KernelInputError, match=r"`q` has dtype torch.int64"):
        segment_target_scores(**case, q=torch.zeros(2, 2, 3, dtype=torch.long))
    with pytest.raises(KernelInputError, match=r"`q` \(shape \(1, 2, 3\)\) is on meta"):
        segment_target_scores(**case, q=torch.zeros(1, 2, 3, device="meta"))


def test_kernel_input_error_is_a_value_error(case):
    with pytest.raises(ValueError):
        project_grads(**_with(case, num_segments=1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_projections_cast_to_x_dtype_and_int32_ids_work(case, backend):
    expected = project_grads(**case, backend=backend)
    as_fp64 = _with(case, p_in=case["p_in"].double(), p_out=case["p_out"].double())
    torch.testing.assert_close(project_grads(**as_fp64, backend=backend), expected)
    as_int32 = _with(case, segment_ids=case["segment_ids"].int())
    torch.testing.assert_close(project_grads(**as_int32, backend=backend), expected)
    # bf16 x: the fp32 projections are rounded to bf16 first, exactly as passing bf16 projections.
    bf16 = _with(case, x=case["x"].bfloat16(), g=case["g"].bfloat16())
    rounded_p = _with(bf16, p_in=case["p_in"].bfloat16(), p_out=case["p_out"].bfloat16())
    torch.testing.assert_close(
        project_grads(**bf16, backend=backend), project_grads(**rounded_p, backend=backend)
    )


def test_num_segments_defaults_to_max_id_plus_one(case):
    ids = torch.tensor([0, 4, -1, 4, 1, 0, 0, -1, 2, 2, 4, 1])
    phi = project_grads(**_with(case, segment_ids=ids, num_segments=None))
    assert phi.shape == (5, 2, 3) and not phi[3].any() and phi[4].any()
