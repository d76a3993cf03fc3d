"""projection(): deterministic per key, variance 1/k, distinct per name, the same on every device/dtype."""

import math

import pytest
import torch
from kernel_cases import GPU
from tikmix_kernels import projection
from tikmix_kernels.projection import projection_seed

from tikmix_loader.errors import ConfigError

# Pinned values: a change of hash, key layout or generator would silently change every stored projection.
GOLDEN = {
    "gaussian": [-0.7448762655258179, 0.35391223430633545, -0.8578121662139893, -0.14259624481201172],
    "rademacher": [-0.5773502588272095, -0.5773502588272095, 0.5773502588272095, -0.5773502588272095],
}


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_same_key_same_matrix_and_pinned_values(kind):
    first = projection(5, 3, seed=0, name="golden", kind=kind)
    assert torch.equal(first, projection(5, 3, seed=0, name="golden", kind=kind))
    torch.testing.assert_close(first.flatten()[:4], torch.tensor(GOLDEN[kind]), rtol=0, atol=1e-7)
    assert projection_seed(0, "golden", 5, 3, kind) == projection_seed(0, "golden", 5, 3, kind)


def test_every_key_field_changes_the_matrix():
    base = projection(64, 8, seed=1, name="layer/in")
    assert not torch.equal(base, projection(64, 8, seed=2, name="layer/in"))
    assert not torch.equal(base, projection(64, 8, seed=1, name="layer/out"))
    assert not torch.equal(base[:63], projection(63, 8, seed=1, name="layer/in"))
    assert not torch.equal(base[:, :7], projection(64, 7, seed=1, name="layer/in"))
    assert not torch.equal(base.abs(), projection(64, 8, seed=1, name="layer/in", kind="rademacher").abs())


@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_entries_have_mean_zero_and_variance_one_over_k(kind):
    k = 50
    p = projection(4000, k, seed=0, name="stats", kind=kind).double()
    assert abs(p.mean().item()) < 4 / math.sqrt(p.numel() * k)  # 4 standard errors
    assert p.var().item() == pytest.approx(1 / k, rel=0.03)
    if kind == "rademacher":
        torch.testing.assert_close(p.abs(), torch.full_like(p, 1 / math.sqrt(k)), rtol=1e-6, atol=0)
    # A JL map keeps squared norms on average.
    v = torch.randn(200, 4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratio = ((v @ p).pow(2).sum(1) / v.pow(2).sum(1)).mean().item()
    assert ratio == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_is_a_cast_of_the_fp32_draw(dtype):
    p = projection(33, 7, seed=4, name="cast", dtype=dtype)
    assert p.dtype == dtype and p.shape == (33, 7)
    assert torch.equal(p, projection(33, 7, seed=4, name="cast").to(dtype))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_values_do_not_depend_on_the_device(device):
    on_device = projection(17, 5, seed=9, name="device", device=device)
    assert on_device.device.type == device
    assert torch.equal(on_device.cpu(), projection(17, 5, seed=9, name="device"))
    assert projection(17, 5, seed=9, name="device", device="meta").is_meta


BAD_ARGUMENTS = {
    "zero-d": ({"d": 0}, r"`d` must be a positive int, got 0"),
    "float-k": ({"k": 2.0}, r"`k` must be a positive int, got 2.0"),
    "str-seed": ({"seed": "1"}, r"`seed` must be an int, got '1'"),
    "empty-name": ({"name": ""}, r"`name` must be a non-empty string"),
    "unknown-kind": ({"kind": "uniform"}, r"unknown `kind` 'uniform'; choose one of gaussian, rademacher"),
    "integer-dtype": ({"dtype": torch.int64}, r"`dtype` must be a floating torch dtype, got torch.int64"),
}


@pytest.mark.parametrize(("changes", "match"), BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_config_error(changes, match):
    arguments = {"d": 4, "k": 2, "seed": 0, "name": "bad"} | changes
    with pytest.raises(ConfigError, match=r"projection: " + match):
        projection(arguments.pop("d"), arguments.pop("k"), **arguments)
