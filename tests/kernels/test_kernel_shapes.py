"""project_grads and its curvature factors on awkward shapes, strides, dtypes and splits, per backend."""

import pytest
import torch
from kernel_cases import device_backend_params, random_case, to_device
from kernel_derivation import ACCUMULATION_TOLERANCE, assert_close, explicit_factors, explicit_phi
from tikmix_kernels import project_grads
from tikmix_kernels._inputs import check_inputs
from tikmix_kernels.reference import project_grads_naive, project_grads_torch, project_grads_unfused

SHAPES = {
    # name: (n, d_in, d_out, k_in, k_out, num_segments, sorted ids)
    "one-token-k1": (1, 5, 3, 1, 1, 1, False),
    "odd-dims-k1": (37, 33, 17, 1, 7, 3, False),
    "unsorted-many-blocks": (150, 24, 40, 16, 8, 5, False),
    "sorted-k20": (130, 9, 11, 20, 3, 6, True),
    "wide-k": (40, 70, 9, 33, 65, 2, True),
}
FP32 = ACCUMULATION_TOLERANCE[torch.float32]


def _run(case, device, backend, dtype=torch.float32, **kwargs):
    return project_grads(**to_device(case, device, dtype), backend=backend, **kwargs)


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_phi_and_factors_match_explicit_fp64(shape, device, backend):
    n, d_in, d_out, k_in, k_out, segments, sort = shape
    case = random_case(n=n, d_in=d_in, d_out=d_out, k_in=k_in, k_out=k_out, num_segments=segments, sort=sort)
    phi, a, b = _run(case, device, backend, return_factors=True)
    assert phi.dtype == a.dtype == b.dtype == torch.float32
    assert (a.shape, b.shape) == ((k_in, k_in), (k_out, k_out))
    ids = case["segment_ids"]
    expected = explicit_phi(case["x"], case["g"], case["p_in"], case["p_out"], ids, segments)
    assert_close(phi, expected, rtol=FP32[0], atol=FP32[1], what="Phi")
    expected_a, expected_b = explicit_factors(case["x"], case["g"], case["p_in"], case["p_out"], ids)
    assert_close(a, expected_a, rtol=FP32[0], atol=FP32[1], what="A")
    assert_close(b, expected_b, rtol=FP32[0], atol=FP32[1], what="B")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_half_inputs_accumulate_in_fp32(dtype, device, backend):
    case = random_case(n=90, d_in=40, d_out=24, k_in=6, k_out=9, num_segments=4)
    phi, a, b = _run(case, device, backend, dtype, return_factors=True)
    # fp64 arithmetic on the same rounded inputs (p_in/p_out are cast to x's dtype by contract).
    rounded = [case["x"].to(dtype), case["g"].to(dtype), case["p_in"].to(dtype), case["p_out"].to(dtype)]
    rtol, atol = ACCUMULATION_TOLERANCE[dtype]
    assert_close(phi, explicit_phi(*rounded, case["segment_ids"], 4), rtol=rtol, atol=atol, what="Phi")
    expected_a, expected_b = explicit_factors(*rounded, case["segment_ids"])
    assert_close(a, expected_a, rtol=rtol, atol=atol, what="A")
    assert_close(b, expected_b, rtol=rtol, atol=atol, what="B")


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_all_ignored_and_empty_inputs_give_zeros(device, backend):
    case = random_case(n=20, d_in=6, d_out=5, k_in=3, k_out=2, num_segments=3)
    case["segment_ids"] = torch.full((20,), -1)
    phi, a, b = _run(case, device, backend, return_factors=True)
    assert phi.shape == (3, 2, 3) and not phi.any() and not a.any() and not b.any()
    case["num_segments"] = None  # max id + 1 = 0 segments
    assert _run(case, device, backend).shape == (0, 2, 3)

    empty = random_case(n=0, d_in=6, d_out=5, k_in=3, k_out=2, num_segments=2)
    phi, a, b = _run(empty, device, backend, return_factors=True)
    assert phi.shape == (2, 2, 3) and not phi.any() and not a.any() and not b.any()


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_empty_segments_stay_exactly_zero(device, backend):
    case = random_case(n=64, d_in=10, d_out=12, k_in=4, k_out=4, num_segments=2, ignored=0.0)
    case["segment_ids"] = case["segment_ids"] * 3  # ids 0 and 3 only
    case["num_segments"] = 5
    phi = _run(case, device, backend)
    assert not phi[[1, 2, 4]].any()
    expected = explicit_phi(case["x"], case["g"], case["p_in"], case["p_out"], case["segment_ids"], 5)
    assert_close(phi, expected, rtol=FP32[0], atol=FP32[1], what="Phi")


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_non_contiguous_inputs_match_contiguous_copies(device, backend):
    # Views are made on the device itself: moving a view with gaps between devices would make it contiguous.
    case = to_device(random_case(n=48, d_in=20, d_out=14, k_in=5, k_out=3, num_segments=3, seed=5), device)
    expected = _run(case, device, backend)
    strided = dict(case)
    strided["x"] = case["x"].t().contiguous().t()  # column-major [N, d_in]
    wide = torch.zeros(48, 28, device=device)
    wide[:, ::2] = case["g"]
    strided["g"] = wide[:, ::2]  # row stride 28, column stride 2
    strided["p_in"] = case["p_in"].t().contiguous().t()
    assert strided["g"].stride() == (28, 2) and strided["x"].stride() == (1, 48)
    torch.testing.assert_close(_run(strided, device, backend), expected, rtol=1e-5, atol=1e-5)

    # A [B, T, d] batch permuted from [T, B, d], with ids from a transposed [T, B] tensor.
    batched = dict(case)
    batched["x"] = case["x"].view(6, 8, 20).transpose(0, 1).contiguous().transpose(0, 1)
    batched["g"] = case["g"].view(6, 8, 14).transpose(0, 1).contiguous().transpose(0, 1)
    batched["segment_ids"] = case["segment_ids"].view(6, 8).t().contiguous().t()
    assert not batched["x"].is_contiguous()
    torch.testing.assert_close(_run(batched, device, backend), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_default_segments_per_example_and_whole_batch(device, backend):
    case = random_case(n=24, d_in=8, d_out=6, k_in=3, k_out=2, num_segments=1, ignored=0.0)
    batched = dict(case, segment_ids=None, num_segments=None)
    batched["x"], batched["g"] = case["x"].view(4, 6, 8), case["g"].view(4, 6, 6)
    per_example = explicit_phi(
        case["x"], case["g"], case["p_in"], case["p_out"], torch.arange(4).repeat_interleave(6), 4
    )
    assert_close(_run(batched, device, backend), per_example, rtol=FP32[0], atol=FP32[1], what="3-D default")
    flat = dict(case, segment_ids=None, num_segments=None)
    assert_close(
        _run(flat, device, backend), per_example.sum(0, keepdim=True), rtol=FP32[0], atol=FP32[1], what="2-D"
    )


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_splitting_tokens_into_calls_changes_only_rounding(device, backend):
    # Many blocks per segment and unsorted ids; three calls summed must equal one call up to fp32 noise.
    case = random_case(n=700, d_in=20, d_out=12, k_in=4, k_out=6, num_segments=3, seed=7)
    whole, a, b = _run(case, device, backend, return_factors=True)
    parts = [slice(0, 123), slice(123, 500), slice(500, 700)]
    pieces = [
        _run(
            dict(case, x=case["x"][p], g=case["g"][p], segment_ids=case["segment_ids"][p]),
            device,
            backend,
            return_factors=True,
        )
        for p in parts
    ]
    for total, index in ((whole, 0), (a, 1), (b, 2)):
        torch.testing.assert_close(sum(piece[index] for piece in pieces), total, rtol=1e-5, atol=1e-4)
    again = _run(case, device, backend)
    torch.testing.assert_close(again, whole, rtol=1e-5, atol=1e-4)
    expected = explicit_phi(case["x"], case["g"], case["p_in"], case["p_out"], case["segment_ids"], 3)
    assert_close(whole, expected, rtol=FP32[0], atol=FP32[1], what="Phi")


def test_torch_reference_chunking_matches_one_chunk():
    case = random_case(n=300, d_in=16, d_out=12, k_in=4, k_out=3, num_segments=4)
    inputs = check_inputs("test", **case)
    one = project_grads_torch(inputs, return_factors=True, chunk_elements=1 << 30)
    # 64 elements per temporary -> 4 tokens per chunk -> 75 chunks.
    many = project_grads_torch(inputs, return_factors=True, chunk_elements=64)
    for expected, actual in zip(one, many, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("baseline", [project_grads_naive, project_grads_unfused], ids=["naive", "unfused"])
def test_benchmark_baselines_compute_the_same_phi(baseline):
    case = random_case(n=60, d_in=18, d_out=10, k_in=4, k_out=5, num_segments=3)
    expected = explicit_phi(case["x"], case["g"], case["p_in"], case["p_out"], case["segment_ids"], 3)
    assert_close(baseline(**case), expected, rtol=FP32[0], atol=FP32[1], what=baseline.__name__)
