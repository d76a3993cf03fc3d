"""Backend selection: what is available, what ``auto`` picks, unavailable explicit backends failing."""

import sys

import pytest
import torch
from kernel_cases import HAS_CUDA, random_case, to_device
from tikmix_kernels import available_backends, project_grads, segment_target_scores, triton_ops
from tikmix_kernels.dispatch import AUTO_ORDER, resolve_backend, unavailable_reason

import tikmix_loader.ops
from tikmix_loader.errors import BackendUnavailableError, ConfigError, KernelInputError


def test_cpu_native_backend_is_built():
    # A missing C++ build is a failure here, never a skip (issue 4: `make test` must build and test it).
    assert "cpu" in available_backends("cpu"), unavailable_reason("cpu", "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU the Triton kernels are compiled, not interpreted")
def test_triton_runs_on_cpu_under_the_interpreter():
    # conftest sets TRITON_INTERPRET=1; if something imported triton_ops earlier, the triton CPU tests would
    # silently drop out of the backend lists, so fail instead.
    assert triton_ops.INTERPRETED
    assert "triton" in available_backends("cpu")


def test_auto_picks_the_first_available_backend_in_documented_order():
    available = available_backends("cpu")
    expected = next(name for name in AUTO_ORDER["cpu"] if name in available)
    assert resolve_backend("auto", "cpu") == expected
    assert available[: len([n for n in AUTO_ORDER["cpu"] if n in available])] == [
        n for n in AUTO_ORDER["cpu"] if n in available
    ]
    assert available_backends(torch.device("meta")) == ["torch"]
    assert resolve_backend("auto", "meta") == "torch"


def test_auto_result_equals_the_resolved_backend():
    case = random_case(n=40, d_in=9, d_out=7, k_in=3, k_out=4, num_segments=2)
    torch.testing.assert_close(
        project_grads(**case), project_grads(**case, backend=resolve_backend("auto", "cpu"))
    )


def test_explicit_unavailable_backend_raises_instead_of_falling_back():
    case = random_case(n=8, d_in=4, d_out=3, k_in=2, k_out=2, num_segments=1)
    with pytest.raises(
        BackendUnavailableError, match=r"backend 'cuda' is unavailable for cpu tensors: .*CUDA"
    ):
        project_grads(**case, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"backend 'cpu' is unavailable for meta tensors"):
        resolve_backend("cpu", "meta")
    with pytest.raises(RuntimeError):
        segment_target_scores(**case, q=torch.zeros(1, 2, 2), backend="cuda")


def test_triton_without_interpreter_or_gpu_is_unavailable(monkeypatch):
    monkeypatch.setattr(triton_ops, "INTERPRETED", False)
    case = random_case(n=8, d_in=4, d_out=3, k_in=2, k_out=2, num_segments=1)
    with pytest.raises(
        BackendUnavailableError, match=r"'triton' is unavailable for cpu tensors: .*TRITON_INTERPRET=1"
    ):
        project_grads(**case, backend="triton")
    assert "triton" not in available_backends("cpu")


def test_missing_native_loader_makes_native_backends_unavailable(monkeypatch):
    # A None entry in sys.modules makes `from tikmix_kernels import _native` raise ImportError.
    monkeypatch.setitem(sys.modules, "tikmix_kernels._native", None)
    monkeypatch.delattr("tikmix_kernels._native", raising=False)
    assert "cpu" not in available_backends("cpu")
    assert resolve_backend("auto", "cpu") == "torch"
    case = random_case(n=8, d_in=4, d_out=3, k_in=2, k_out=2, num_segments=1)
    with pytest.raises(BackendUnavailableError, match=r"'cpu' is unavailable .*_native cannot be imported"):
        project_grads(**case, backend="cpu")


def test_unknown_backend_lists_the_valid_names():
    with pytest.raises(
        ConfigError, match=r"unknown kernel backend 'cudnn'; choose 'auto' or one of triton, cuda, cpu"
    ):
        project_grads(**random_case(n=4, d_in=3, d_out=3, k_in=1, k_out=1, num_segments=1), backend="cudnn")


def test_triton_rejects_projection_widths_beyond_its_tiles():
    case = random_case(n=4, d_in=3, d_out=3, k_in=triton_ops.MAX_K + 1, k_out=1, num_segments=1)
    case = to_device(case, "cuda" if HAS_CUDA else "cpu")
    with pytest.raises(
        KernelInputError, match=r"triton backend: k_in=257, k_out=1 .* exceed the largest supported k=256"
    ):
        project_grads(**case, backend="triton")


def test_loader_ops_reexport_the_kernel_api():
    import tikmix_kernels

    for name in tikmix_loader.ops.__all__:
        assert getattr(tikmix_loader.ops, name) is getattr(tikmix_kernels, name)
