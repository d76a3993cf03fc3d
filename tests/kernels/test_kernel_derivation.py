"""Every backend against the independent derivation: per-example autograd grads, explicit Kronecker."""

import pytest
import torch
from kernel_cases import device_backend_params
from kernel_derivation import (
    ACCUMULATION_TOLERANCE,
    INPUT_ROUNDING_TOLERANCE,
    TinyGPT,
    assert_close,
    explicit_phi,
    kron_project,
    linear_inputs_and_output_grads,
    linear_layer_case,
    linear_names,
    outer_product_grads,
    per_example_weight_grads,
    segment_sum,
)
from tikmix_kernels import project_grads, projection

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def gpt_case():
    """A float64 TinyGPT batch: per-example weight grads (torch.func) and hooked x, g for every Linear."""
    torch.manual_seed(0)
    model = TinyGPT().double()
    tokens = torch.randint(0, 13, (4, 6))
    return (
        per_example_weight_grads(model, tokens),
        linear_inputs_and_output_grads(model, tokens),
        tokens.shape,
    )


def test_hooked_inputs_reproduce_per_example_weight_grads(gpt_case):
    # The derivation's two halves agree: sum_t g_t x_t^T over an example's tokens is its autograd W_e.
    weight_grads, io, (batch, seq) = gpt_case
    assert len(io) == 13, sorted(io)
    for name, (x, g) in io.items():
        per_token = outer_product_grads(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
        summed = per_token.view(batch, seq, *per_token.shape[1:]).sum(1)
        torch.testing.assert_close(summed, weight_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_random_linear_matches_per_example_autograd(bias, device, backend):
    x, g, weight_grads = linear_layer_case(bias=bias)
    p_in = projection(7, 3, seed=1, name="linear/in", dtype=torch.float64)
    p_out = projection(5, 2, seed=1, name="linear/out", dtype=torch.float64)
    per_example = kron_project(weight_grads, p_out, p_in)

    # Default segments of a [B, T, d] batch: one per example.
    out = project_grads(
        x.float().to(device), g.float().to(device), p_in.to(device), p_out.to(device), backend=backend
    )
    rtol, atol = ACCUMULATION_TOLERANCE[torch.float32]
    assert_close(out, per_example, rtol=rtol, atol=atol, what=f"{backend} per-example Phi")

    # Examples grouped into segments, one example ignored, one segment left empty.
    example_segments = torch.tensor([2, -1, 2])
    ids = example_segments[:, None].expand(x.shape[:2]).contiguous()
    out = project_grads(
        x.float().to(device),
        g.float().to(device),
        p_in.to(device),
        p_out.to(device),
        ids.to(device),
        4,
        backend=backend,
    )
    expected = segment_sum(per_example, example_segments, 4)
    assert_close(out, expected, rtol=rtol, atol=atol, what=f"{backend} grouped Phi")
    assert torch.count_nonzero(out[[0, 1, 3]]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_every_gpt_linear_matches_per_example_autograd(gpt_case, dtype, device, backend):
    weight_grads, io, (batch, seq) = gpt_case
    example_segments = torch.tensor([2, 0, -1, 0])  # segment 1 stays empty, example 2 is ignored
    ids = example_segments[:, None].expand(batch, seq).contiguous()
    ids[:, -1] = -1  # the last position predicts nothing, so its g is zero: ignoring it changes nothing
    for name in linear_names(TinyGPT()):
        x, g = io[name]
        p_in = projection(x.shape[-1], 5, seed=3, name=f"{name}/in", dtype=torch.float64)
        p_out = projection(g.shape[-1], 3, seed=3, name=f"{name}/out", dtype=torch.float64)
        truth = segment_sum(kron_project(weight_grads[name], p_out, p_in), example_segments, 3)
        x_in, g_in = x.to(dtype), g.to(dtype)
        out = project_grads(
            x_in.to(device),
            g_in.to(device),
            p_in.to(device),
            p_out.to(device),
            ids.to(device),
            3,
            backend=backend,
        )
        rtol, atol = INPUT_ROUNDING_TOLERANCE[dtype]
        assert_close(out, truth, rtol=rtol, atol=atol, what=f"{name} {dtype} vs fp64 autograd")
        # Against fp64 arithmetic on the same rounded inputs, only the fp32 accumulation differs.
        rounded = explicit_phi(
            x_in.reshape(-1, x.shape[-1]),
            g_in.reshape(-1, g.shape[-1]),
            p_in.to(dtype),
            p_out.to(dtype),
            ids.reshape(-1),
            3,
        )
        rtol, atol = ACCUMULATION_TOLERANCE[dtype]
        assert_close(out, rounded, rtol=rtol, atol=atol, what=f"{name} {dtype} vs fp64 of rounded inputs")
