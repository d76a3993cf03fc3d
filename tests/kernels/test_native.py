"""Tests of the native tikmix:: ops (C++/OpenMP, CUDA): explicit references, opcheck, errors, build cache."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from tikmix_kernels import _native

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
# A backend here is a device plus, on the CPU, the TIKMIX_CPU_KERNELS kernel set.
BACKENDS = ["cpu-auto", "cpu-portable", pytest.param("cuda", marks=GPU)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The ops upcast bf16/fp16 inputs exactly and accumulate in fp32, so every dtype is held to the same
# fp32-rounding tolerance against an fp64 reference computed from the same (already rounded) inputs.
RTOL = 2e-5


@pytest.fixture(autouse=True, scope="module")
def _cpu_ops_loaded():
    """Load the CPU library before any test calls ``torch.ops.tikmix``; a failed build fails every test."""
    assert _native.available("cpu"), _native.unavailable_reason("cpu")


def use_backend(backend: str, monkeypatch) -> str:
    """Select ``backend`` and return its device type; the native ops must be built for it."""
    device, _, kernels = backend.partition("-")
    if kernels:
        monkeypatch.setenv("TIKMIX_CPU_KERNELS", kernels)
    assert _native.available(device), _native.unavailable_reason(device)
    return device


def make_case(n, d_in, d_out, k_in, k_out, num_segments, ids, *, seed=0, dtype=torch.float32, device="cpu"):
    """Random x, g, p_in, p_out of ``dtype`` on ``device`` with the given segment ids."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=generator)
    g = torch.randn(n, d_out, generator=generator)
    p_in = torch.randn(d_in, k_in, generator=generator) / max(k_in, 1) ** 0.5
    p_out = torch.randn(d_out, k_out, generator=generator) / max(k_out, 1) ** 0.5
    tensors = [t.to(dtype).to(device) for t in (x, g, p_in, p_out)]
    return (*tensors, torch.as_tensor(ids, dtype=torch.int64).to(device), num_segments)


def explicit_reference(x, g, p_in, p_out, segment_ids, num_segments, q=None):
    """Token-by-token float64 sums: Phi, A, B and (with ``q``) the target scores."""
    x, g, p_in, p_out = (t.detach().cpu().double() for t in (x, g, p_in, p_out))
    k_in, k_out = p_in.shape[1], p_out.shape[1]
    phi = torch.zeros(num_segments, k_out, k_in, dtype=torch.float64)
    a = torch.zeros(k_in, k_in, dtype=torch.float64)
    b = torch.zeros(k_out, k_out, dtype=torch.float64)
    q64 = None if q is None else q.detach().cpu().double()
    scores = torch.zeros(num_segments, 0 if q is None else q.shape[0], dtype=torch.float64)
    for t, s in enumerate(segment_ids.tolist()):
        if s < 0:
            continue
        xt, gt = x[t] @ p_in, g[t] @ p_out
        phi[s] += torch.outer(gt, xt)
        a += torch.outer(xt, xt)
        b += torch.outer(gt, gt)
        if q64 is not None:
            scores[s] += torch.einsum("o,boi,i->b", gt, q64, xt)
    return phi, a, b, scores


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float32 ``actual`` equals float64 ``expected`` to fp32 accumulation noise, relative to its scale."""
    assert actual.dtype == torch.float32
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected, rtol=RTOL, atol=RTOL * scale)


def _blocks_ids(n: int = 1300) -> list[int]:
    # Runs crossing the CPU op's 512-token blocks, ignored padding inside and at block edges, and a block
    # (tokens 512..1023) with no valid token at all.
    ids = [(t // 170) % 4 for t in range(n)]
    for t in [*range(0, 7), *range(505, 1030), *range(1290, n)]:
        ids[t] = -1
    return ids


_SHUFFLED_IDS = torch.randint(-1, 7, (257,), generator=torch.Generator().manual_seed(1))
# name: (n, d_in, d_out, k_in, k_out, num_segments, segment ids)
CASES = {
    "runs": (300, 40, 24, 16, 12, 5, [min(t // 55, 4) if t % 37 else -1 for t in range(300)]),
    "shuffled": (257, 33, 65, 20, 7, 7, _SHUFFLED_IDS),
    "blocks": (1300, 20, 18, 33, 40, 4, _blocks_ids()),
    "one_token": (1, 5, 3, 1, 1, 2, [1]),
    "k1": (50, 7, 9, 1, 1, 3, [t % 3 for t in range(50)]),
    "empty_segments": (64, 12, 10, 6, 5, 10, [2 if t < 30 else 7 for t in range(64)]),
    "all_ignored": (40, 8, 6, 4, 3, 3, [-1] * 40),
    "wide_k": (90, 31, 17, 70, 5, 2, [t % 2 for t in range(90)]),
    "no_segments": (10, 4, 4, 2, 2, 0, [-1] * 10),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_project_grads_matches_explicit_reference(name, dtype, backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    args = make_case(*CASES[name], dtype=dtype, device=device)
    phi, a, b = torch.ops.tikmix.project_grads(*args, True)
    expected_phi, expected_a, expected_b, _ = explicit_reference(*args)
    assert phi.shape == expected_phi.shape and phi.device.type == device
    assert_matches(phi, expected_phi)
    assert_matches(a, expected_a)
    assert_matches(b, expected_b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["runs", "shuffled", "blocks", "one_token", "k1", "all_ignored", "wide_k"])
def test_segment_target_scores_matches_explicit_reference(name, dtype, backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    args = make_case(*CASES[name], dtype=dtype, device=device)
    k_in, k_out = args[2].shape[1], args[3].shape[1]
    q = torch.randn(3, k_out, k_in, generator=torch.Generator().manual_seed(5)).to(device)
    scores = torch.ops.tikmix.segment_target_scores(*args[:4], q, *args[4:])
    assert scores.shape == (args[5], 3)
    assert_matches(scores, explicit_reference(*args, q=q)[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_targets_are_chunked_without_changing_scores(backend, monkeypatch):
    # 1100 targets x k_out 8 x 512 tokens is more than the CPU op's 4M-float buffer: two target chunks.
    device = use_backend(backend, monkeypatch)
    args = make_case(700, 9, 11, 6, 8, 3, [t % 3 for t in range(700)], device=device)
    q = torch.randn(1100, 8, 6, generator=torch.Generator().manual_seed(2)).to(device)
    scores = torch.ops.tikmix.segment_target_scores(*args[:4], q, *args[4:])
    assert_matches(scores, explicit_reference(*args, q=q)[3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, backend, monkeypatch):
    device = use_backend(backend, monkeypatch)
    x, g, p_in, p_out, ids, s = make_case(*CASES["shuffled"], dtype=dtype, device=device)
    strided = (
        torch.stack([x, x], dim=2)[:, :, 0],  # column stride 2
        g.t().contiguous().t(),  # column-major
        p_in.t().contiguous().t(),
        torch.stack([p_out, p_out], dim=1)[:, 0],
        torch.stack([ids, ids], dim=1).to(torch.int32)[:, 1],  # int32 with stride 2
    )
    assert not any(t.is_contiguous() for t in strided)
    phi, a, b = torch.ops.tikmix.project_grads(*strided, s, True)
    expected_phi, expected_a, expected_b, _ = explicit_reference(x, g, p_in, p_out, ids, s)
    assert_matches(phi, expected_phi)
    assert_matches(a, expected_a)
    assert_matches(b, expected_b)
    q = torch.randn(2, p_out.shape[1], p_in.shape[1], dtype=torch.float64).to(device).transpose(1, 2)
    q = q.contiguous().transpose(1, 2).to(dtype)  # non-contiguous low-precision targets
    scores = torch.ops.tikmix.segment_target_scores(*strided[:4], q, strided[4], s)
    assert_matches(scores, explicit_reference(x, g, p_in, p_out, ids, s, q=q)[3])


def test_factors_are_empty_unless_requested():
    args = make_case(*CASES["runs"])
    phi, a, b = torch.ops.tikmix.project_grads(*args, False)
    assert phi.shape == (5, 12, 16) and a.shape == (0,) and b.shape == (0,)
    assert a.dtype == b.dtype == torch.float32


@pytest.mark.parametrize("kernels", ["auto", "portable"])
def test_results_do_not_depend_on_thread_count_or_call_split(kernels, monkeypatch):
    monkeypatch.setenv("TIKMIX_CPU_KERNELS", kernels)
    args = make_case(*CASES["blocks"])
    torch.set_num_threads(1)
    single = torch.ops.tikmix.project_grads(*args, True)
    torch.set_num_threads(2)
    multi = torch.ops.tikmix.project_grads(*args, True)
    # The AVX-512 kernels sum every output element in one fixed order; BLAS may block by thread count.
    exact = kernels == "auto" and torch.backends.cpu.get_cpu_capability() == "AVX512"
    for one, many in zip(single, multi, strict=True):
        torch.testing.assert_close(one, many, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-5)
    x, g, p_in, p_out, ids, s = args
    halves = [
        torch.ops.tikmix.project_grads(x[h], g[h], p_in, p_out, ids[h], s, True)
        for h in (slice(0, 611), slice(611, None))
    ]
    for whole, first, second in zip(multi, *halves, strict=True):
        torch.testing.assert_close(first + second, whole, rtol=1e-5, atol=1e-4)


def test_cpu_op_is_built_here():
    # `make test` must build and run the CPU op; a failed build is a failure here, never a skip.
    assert _native.available("cpu"), _native.unavailable_reason("cpu")
    assert _native.unavailable_reason("cpu") == ""
    library = _native.extension_dir() / "tikmix_cpu_ops" / "tikmix_cpu_ops.so"
    assert library.is_file()


def test_unknown_device_type_is_unavailable_without_raising():
    assert not _native.available("mps")
    assert "no native op for device type 'mps'" in _native.unavailable_reason("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_cuda_is_unavailable_without_a_gpu():
    assert not _native.available("cuda")
    assert "torch.cuda.is_available() is False" in _native.unavailable_reason("cuda")


# --- errors -------------------------------------------------------------------------------------------


def _bad(**changes):
    x, g, p_in, p_out, ids, s = make_case(5, 8, 6, 3, 4, 2, [0, 1, -1, 1, 0])
    args = {"x": x, "g": g, "p_in": p_in, "p_out": p_out, "segment_ids": ids, "num_segments": s}
    args.update(changes)
    return args


ERRORS = {
    "x_3d": (
        _bad(x=torch.randn(2, 3, 4)),
        r"project_grads_cpu: expected x to be 2-D \[N, d_in\], got shape \[2, 3, 4\]",
    ),
    "g_rows": (
        _bad(g=torch.randn(4, 6)),
        r"expected g to have N=5 rows like x \(shape \[5, 8\]\), got shape \[4, 6\]",
    ),
    "ids_length": (
        _bad(segment_ids=torch.zeros(4, dtype=torch.int64)),
        r"expected segment_ids of shape \[5\]",
    ),
    "p_in_rows": (
        _bad(p_in=torch.randn(7, 3)),
        r"expected p_in of shape \[8, k_in\] \(d_in of x\), got shape \[7, 3\]",
    ),
    "p_out_rows": (_bad(p_out=torch.randn(5, 4)), r"expected p_out of shape \[6, k_out\]"),
    "x_double": (
        _bad(x=torch.randn(5, 8, dtype=torch.float64)),
        r"expected x of dtype float32, bfloat16 or float16, got Double",
    ),
    "g_dtype": (_bad(g=torch.randn(5, 6).half()), r"expected g of dtype Float \(the dtype of x\), got Half"),
    "p_dtype": (_bad(p_in=torch.randn(8, 3).bfloat16()), r"expected p_in of dtype Float .*got BFloat16"),
    "float_ids": (
        _bad(segment_ids=torch.zeros(5)),
        r"expected segment_ids of dtype int64 or int32, got Float",
    ),
    "id_too_large": (
        _bad(segment_ids=torch.tensor([0, 1, -1, 2, 0])),
        r"expected segment_ids in \[-1, 2\) \(-1 = ignore\), got segment_ids\[3\] = 2",
    ),
    "id_below_minus_one": (_bad(segment_ids=torch.tensor([-2, 0, 0, 0, 0])), r"got segment_ids\[0\] = -2"),
    "negative_segments": (_bad(num_segments=-1), r"expected num_segments >= 0, got -1"),
}


@pytest.mark.parametrize("name", list(ERRORS))
def test_project_grads_rejects_bad_input(name):
    args, message = ERRORS[name]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.tikmix.project_grads(*args.values(), True)


def test_segment_target_scores_rejects_bad_targets():
    args = list(_bad().values())
    wrong_shape = r"segment_target_scores_cpu: expected q of shape \[n_targets, 4, 3\]"
    with pytest.raises(RuntimeError, match=wrong_shape):
        torch.ops.tikmix.segment_target_scores(*args[:4], torch.randn(2, 3, 4), *args[4:])
    with pytest.raises(RuntimeError, match=r"expected q to be 3-D"):
        torch.ops.tikmix.segment_target_scores(*args[:4], torch.randn(4, 3), *args[4:])
    with pytest.raises(RuntimeError, match=r"expected q of dtype float32, bfloat16 or float16, got Long"):
        torch.ops.tikmix.segment_target_scores(*args[:4], torch.zeros(2, 4, 3, dtype=torch.int64), *args[4:])
    with pytest.raises(RuntimeError, match=r"segment_target_scores_cpu: .*got segment_ids\[1\] = 9"):
        torch.ops.tikmix.segment_target_scores(
            *args[:4], torch.randn(2, 4, 3), torch.tensor([0, 9, 0, 0, 0]), 2
        )


def test_bad_kernel_set_name_is_rejected(monkeypatch):
    monkeypatch.setenv("TIKMIX_CPU_KERNELS", "fast")
    with pytest.raises(RuntimeError, match=r"TIKMIX_CPU_KERNELS to be 'auto' or 'portable', got 'fast'"):
        torch.ops.tikmix.project_grads(*_bad().values(), False)


# --- torch.library integration --------------------------------------------------------------------------

OPCHECK_CASES = {
    "runs-fp32": ("runs", torch.float32, True),
    "shuffled-bf16": ("shuffled", torch.bfloat16, False),
    "k1-fp16": ("k1", torch.float16, True),
    "all_ignored-fp32": ("all_ignored", torch.float32, True),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case, device):
    assert _native.available(device), _native.unavailable_reason(device)
    name, dtype, return_factors = OPCHECK_CASES[case]
    args = make_case(*CASES[name], dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.tikmix.project_grads.default, (*args, return_factors))
    k_in, k_out = args[2].shape[1], args[3].shape[1]
    q = torch.randn(2, k_out, k_in, device=device)
    torch.library.opcheck(torch.ops.tikmix.segment_target_scores.default, (*args[:4], q, *args[4:]))


def test_ops_trace_under_torch_compile():
    args = make_case(*CASES["runs"])
    q = torch.randn(2, 12, 16)

    def both(x, g, p_in, p_out, q, ids):
        phi, a, _ = torch.ops.tikmix.project_grads(x, g, p_in, p_out, ids, 5, True)
        return phi.sum(0) * 2, a, torch.ops.tikmix.segment_target_scores(x, g, p_in, p_out, q, ids, 5)

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    x, g, p_in, p_out, ids, _ = args
    for got, want in zip(compiled(x, g, p_in, p_out, q, ids), both(x, g, p_in, p_out, q, ids), strict=True):
        torch.testing.assert_close(got, want)


# --- build and cache ------------------------------------------------------------------------------------


def test_extension_dir_is_per_torch_version(monkeypatch, tmp_path):
    monkeypatch.setenv(_native.EXTENSIONS_DIR_ENV, str(tmp_path))
    here = _native.extension_dir()
    assert here.parent == tmp_path
    assert here.name == f"torch-{torch.__version__}-{_native.source_hash()}"
    monkeypatch.setattr(torch, "__version__", "2.6.0+cpu")
    other = _native.extension_dir()
    assert other.name.startswith("torch-2.6.0+cpu-") and other != here


def test_extension_dir_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(_native.EXTENSIONS_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _native.extension_dir().parent == tmp_path / ".cache" / "tikmix" / "extensions"


def test_source_hash_follows_the_sources(monkeypatch, tmp_path):
    copy = tmp_path / "csrc"
    shutil.copytree(_native.csrc_dir(), copy)
    monkeypatch.setattr(_native, "csrc_dir", lambda: copy)
    before = _native.source_hash()
    assert before == _native.source_hash() and re.fullmatch(r"[0-9a-f]{16}", before)
    with (copy / "project_grads" / "project_grads_cpu.cpp").open("a") as source:
        source.write("// changed\n")
    assert _native.source_hash() != before


def test_source_hash_ignores_the_data_path_sources(monkeypatch, tmp_path):
    # The loader's compiled helpers (csrc/data_path) have their own build folder: editing them must not
    # rebuild the ops.
    copy = tmp_path / "csrc"
    shutil.copytree(_native.csrc_dir(), copy)
    monkeypatch.setattr(_native, "csrc_dir", lambda: copy)
    before = _native.source_hash()
    with (copy / "data_path" / "module.cpp").open("a") as source:
        source.write("// changed\n")
    assert _native.source_hash() == before


def test_without_a_compiler_ops_are_unavailable_with_exactly_one_warning(tmp_path):
    script = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from tikmix_kernels import _native
            results = [_native.available("cpu"), _native.available("cpu"), _native.available("cuda")]
            reason = _native.unavailable_reason("cpu")
        tikmix = [w for w in caught if "tikmix_kernels" in str(w.message)]
        print(results, len(tikmix))
        print(reason)
        print(tikmix[0].category.__name__ if tikmix else "")
        """
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CXX": str(tmp_path / "no-such-c++"),
        _native.EXTENSIONS_DIR_ENV: str(tmp_path / "ext"),
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[False, False, False] 1"
    assert "no C++ compiler found" in lines[1] and "no-such-c++" in lines[1]
    assert lines[2] == "RuntimeWarning"


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    from torch.utils.cpp_extension import CUDA_HOME

    return None if CUDA_HOME is None else shutil.which("nvcc", path=f"{CUDA_HOME}/bin")


@pytest.mark.slow
def test_cuda_source_compiles_with_nvcc(tmp_path):
    # No GPU is needed to catch compile errors in the CUDA op; with nvcc present, a failure is a failure.
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    from torch.utils import cpp_extension

    standard = re.search(r"C\+\+ Version: (\d{4})", torch.__config__.show())
    cxx = "c++20" if standard is not None and int(standard.group(1)) >= 2020 else "c++17"
    source = _native.csrc_dir() / "project_grads" / "project_grads_cuda.cu"
    target = tmp_path / "project_grads_cuda.o"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    command = [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(target),
        f"-std={cxx}",
        "-arch=sm_80",
        "-Xcompiler",
        "-fPIC",
    ]
    command += [*cpp_extension.COMMON_NVCC_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    for include in cpp_extension.include_paths(device_type="cuda"):
        command += ["-isystem", include]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"nvcc failed after {time.monotonic() - started:.0f}s:\n{result.stderr[-6000:]}"
    )
    assert target.stat().st_size > 0
