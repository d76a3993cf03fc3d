"""segment_target_scores against explicit <Q[b], Phi[s]> products, and bf16-vs-fp32 influence correlation."""

import pytest
import torch
from kernel_cases import device_backend_params, random_case, to_device
from kernel_derivation import (
    ACCUMULATION_TOLERANCE,
    TinyGPT,
    assert_close,
    explicit_phi,
    explicit_scores,
    linear_inputs_and_output_grads,
    linear_names,
)
from tikmix_kernels import project_grads, projection, segment_target_scores

FP32 = ACCUMULATION_TOLERANCE[torch.float32]
SHAPES = {
    # name: (n, d_in, d_out, k_in, k_out, num_segments, n_targets)
    "one-token-k1": (1, 4, 3, 1, 1, 1, 1),
    "odd-dims": (45, 19, 13, 3, 5, 4, 3),
    "many-blocks-k20": (200, 12, 9, 20, 6, 3, 2),
}


def _targets(n_targets, k_out, k_in, seed=0):
    return torch.randn(n_targets, k_out, k_in, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_scores_match_explicit_products(shape, device, backend):
    n, d_in, d_out, k_in, k_out, segments, n_targets = shape
    case = random_case(n=n, d_in=d_in, d_out=d_out, k_in=k_in, k_out=k_out, num_segments=segments)
    q = _targets(n_targets, k_out, k_in)
    scores = segment_target_scores(**to_device(case, device), q=q.to(device), backend=backend)
    assert scores.shape == (segments, n_targets) and scores.dtype == torch.float32
    phi = explicit_phi(case["x"], case["g"], case["p_in"], case["p_out"], case["segment_ids"], segments)
    assert_close(scores, explicit_scores(phi, q), rtol=FP32[0], atol=FP32[1], what="scores")
    # The same number as contracting the backend's own Phi with Q.
    own_phi = project_grads(**to_device(case, device), backend=backend)
    assert_close(
        scores, explicit_scores(own_phi.cpu(), q), rtol=FP32[0], atol=FP32[1], what="scores vs own Phi"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_half_scores_accumulate_in_fp32(dtype, device, backend):
    case = random_case(n=80, d_in=30, d_out=21, k_in=4, k_out=6, num_segments=3)
    q = _targets(2, 6, 4)
    scores = segment_target_scores(**to_device(case, device, dtype), q=q.to(device), backend=backend)
    rounded = [case["x"].to(dtype), case["g"].to(dtype), case["p_in"].to(dtype), case["p_out"].to(dtype)]
    phi = explicit_phi(*rounded, case["segment_ids"], 3)
    rtol, atol = ACCUMULATION_TOLERANCE[dtype]
    assert_close(scores, explicit_scores(phi, q), rtol=rtol, atol=atol, what="scores")


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_scores_of_ignored_tokens_empty_segments_and_no_targets(device, backend):
    case = random_case(n=30, d_in=7, d_out=5, k_in=2, k_out=3, num_segments=4, ignored=0.0)
    case["segment_ids"] = torch.where(case["segment_ids"] == 1, -1, case["segment_ids"])  # segment 1 empty
    scores = segment_target_scores(**to_device(case, device), q=_targets(3, 3, 2).to(device), backend=backend)
    assert not scores[1].any() and scores[0].any()
    case["segment_ids"] = torch.full((30,), -1)
    assert not segment_target_scores(
        **to_device(case, device), q=_targets(3, 3, 2).to(device), backend=backend
    ).any()
    no_targets = segment_target_scores(
        **to_device(case, device), q=torch.zeros(0, 3, 2, device=device), backend=backend
    )
    assert no_targets.shape == (4, 0)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1].item()


@pytest.mark.parametrize(("device", "backend"), device_backend_params())
def test_bf16_influence_scores_correlate_with_fp32(device, backend):
    # TracIn-style influence of 8 training examples on 3 target examples, summed over every Linear of a
    # TinyGPT (fp32 model): scores from bf16 activations/gradients vs fp32 ones. Kronfluence's bar is 0.96.
    torch.manual_seed(1)
    model = TinyGPT(d_model=32, d_mlp=48)
    train_io = linear_inputs_and_output_grads(model, torch.randint(0, 13, (8, 10)))
    target_io = linear_inputs_and_output_grads(model, torch.randint(0, 13, (3, 10)))
    fp32_scores, bf16_scores = torch.zeros(8, 3), torch.zeros(8, 3)
    for name in linear_names(model):
        x, g = train_io[name]
        p_in = projection(x.shape[-1], 8, seed=0, name=f"{name}/in", device=device)
        p_out = projection(g.shape[-1], 8, seed=0, name=f"{name}/out", device=device)
        target_x, target_g = target_io[name]
        q = project_grads(target_x.to(device), target_g.to(device), p_in, p_out, backend=backend)
        for dtype, total in ((torch.float32, fp32_scores), (torch.bfloat16, bf16_scores)):
            x_in, g_in = x.to(device, dtype), g.to(device, dtype)
            total += segment_target_scores(x_in, g_in, p_in, p_out, q, None, None, backend=backend).cpu()
    correlation = _pearson(fp32_scores, bf16_scores)
    print(f"bf16-vs-fp32 influence score correlation ({backend}): {correlation:.5f}")
    assert correlation >= 0.96
