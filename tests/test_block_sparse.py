"""Block-sparse attention: the torch reference against the official fixture and a brute-force version, and our
Triton kernel against the reference (Triton's CPU interpreter here, bf16 on CUDA under the `gpu` marker)."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longcat_tuner.errors import ShapeError
from longcat_tuner.model.block_sparse import (
    block_layout,
    block_sparse_attention,
    block_sparse_supported,
    num_selected_blocks,
    pool_blocks,
    select_key_blocks,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BSA_CASE = SHARED / "reference" / "parity" / "bsa_case.safetensors"
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


def _interpreter_usable() -> bool:
    """Older Triton interpreters (3.6 seen on the GPU image) call int() on 1-element arrays for loop
    bounds, which numpy >= 2.5 refuses; Triton 3.9 squeezes them first."""
    if not HAS_TRITON:
        return False
    import numpy
    import triton

    try:
        int(numpy.ones(1))
    except TypeError:
        return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 9)
    return True


needs_interpreter = pytest.mark.skipif(
    not _interpreter_usable(), reason="Triton's CPU interpreter is missing or too old for this numpy (need triton>=3.9)"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def brute_force_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_grid: tuple[int, int, int],
    k_grid: tuple[int, int, int],
    sparsity: float,
    chunk: tuple[int, int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight from the definition: per-token block coordinates, pooling matrices, per-query token masks."""

    def pooling(grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        coords = [tuple(c // s for c, s in zip(co, chunk)) for co in itertools.product(*map(range, grid))]
        blocks = sorted(set(coords))  # tuple order is row-major block order
        token_block = torch.tensor([blocks.index(c) for c in coords])
        one_hot = F.one_hot(token_block, len(blocks)).T.to(q.dtype)
        return token_block, one_hot / one_hot.sum(1, keepdim=True)

    q_block, q_pool = pooling(q_grid)
    k_block, k_pool = pooling(k_grid)
    scores = (q_pool @ q) @ (k_pool @ k).transpose(-1, -2)
    topk = max(1, int((1 - sparsity) * k_pool.shape[0]))
    selected = torch.topk(scores, topk, dim=-1).indices
    block_mask = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, selected, True)
    token_mask = block_mask[..., q_block, :][..., k_block]
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = torch.softmax(logits.masked_fill(~token_mask, float("-inf")), dim=-1) @ v
    return out, selected


def random_qkv(q_grid, k_grid, *, batch=1, heads=2, head_dim=16, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    nq, nk = math.prod(q_grid), math.prod(k_grid)
    q = torch.randn(batch, heads, nq, head_dim, generator=gen, dtype=torch.float32)
    k = torch.randn(batch, heads, nk, head_dim, generator=gen, dtype=torch.float32)
    v = torch.randn(batch, heads, nk, head_dim, generator=gen, dtype=torch.float32)
    # A shared low-frequency component makes block scores differ clearly, so top-k has no near-ties.
    q = q + 2 * torch.randn(batch, heads, 1, head_dim, generator=gen) * torch.linspace(-1, 1, nq)[:, None]
    k = k + 2 * torch.randn(batch, heads, 1, head_dim, generator=gen) * torch.linspace(-1, 1, nk)[:, None]
    return [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (q, k, v)]


def grads_of(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return list(torch.autograd.grad(out, inputs, grad_out))


# --- layout and selection ------------------------------------------------------------------------------------


def test_block_layout_order_and_ragged_pooling():
    layout = block_layout((4, 8, 8), (4, 4, 4))
    # Token (0, 0, 4) is the first of block 1 (t 0-3, h 0-3, w 4-7); token (0, 4, 0) the first of block 2.
    assert layout.token_block[[0, 4, 32]].tolist() == [0, 1, 2]
    assert layout.block_count.tolist() == [64] * 4

    ragged = block_layout((1, 5, 6), (4, 4, 4))
    assert ragged.blocks_per_axis == (1, 2, 2)
    assert ragged.block_count.tolist() == [16, 8, 4, 2]
    x = torch.randn(1, 2, 30, 3)
    expected = torch.stack([x[:, :, ragged.token_block == b].mean(2) for b in range(4)], dim=2)
    torch.testing.assert_close(pool_blocks(x, ragged), expected)


@pytest.mark.parametrize("grid", [(4, 8, 8), (5, 10, 14), (1, 3, 7), (23, 30, 52)])
@pytest.mark.parametrize("chunk", [(4, 4, 4), (4, 4, 8), (2, 3, 5)])
def test_block_counts_are_the_tokens_of_each_block(grid, chunk):
    layout = block_layout(grid, chunk)
    assert torch.equal(layout.block_count, torch.bincount(layout.token_block, minlength=layout.num_blocks))


def test_block_sparse_attention_is_one_graph_under_torch_compile():
    """Compiled training blocks trace attention: the layout must not break the graph at every call (a bincount
    did, twice per call) nor make dynamo skip a cache."""
    import warnings

    import torch._dynamo

    grid = (5, 10, 14)
    q, k, v = random_qkv(grid, grid, heads=2, head_dim=16, seed=4)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, grid, grid, sparsity=0.5, chunk=(4, 4, 4), impl="reference")

    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        explained = torch._dynamo.explain(attend)(q, k, v)
    assert explained.graph_break_count == 0, [reason.reason for reason in explained.break_reasons]
    assert explained.graph_count == 1
    torch.testing.assert_close(torch.compile(attend, backend="eager")(q, k, v), attend(q, k, v))


def test_num_selected_blocks_keeps_at_least_one():
    assert num_selected_blocks(2640, 0.9375) == 165
    assert num_selected_blocks(16, 0.9375) == 1
    assert num_selected_blocks(8, 0.9375) == 1  # int(0.5) == 0 in the official formula: we keep one block
    assert num_selected_blocks(8, 0.0) == 8
    with pytest.raises(ShapeError):
        num_selected_blocks(8, 1.0)


def test_supported_and_shape_errors():
    assert block_sparse_supported((8, 8, 16), (8, 8, 16)) == (True, "")
    ok, reason = block_sparse_supported((23, 32, 52), (24, 32, 52))
    assert not ok and "(23, 32, 52)" in reason and "block_sparse" in reason
    ok, reason = block_sparse_supported((4, 4, 4), (4, 4, 4), device="cpu")
    assert not ok and "CUDA" in reason
    q, k, v = random_qkv((4, 4, 4), (4, 4, 4))
    with pytest.raises(ShapeError, match="grid"):
        block_sparse_attention(q, k, v, (4, 4, 5), (4, 4, 4))
    with pytest.raises(ShapeError, match="impl"):
        block_sparse_attention(q, k, v, (4, 4, 4), (4, 4, 4), impl="flash")


# --- reference ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not BSA_CASE.exists(), reason=f"parity fixture {BSA_CASE} is absent (needs ../shared)")
def test_reference_matches_official_fixture():
    from safetensors.torch import load_file

    case = load_file(str(BSA_CASE))
    grid = tuple(case["latent_shape"].tolist())
    indices = select_key_blocks(case["q"], case["k"], grid, grid, sparsity=0.9375, chunk=(4, 4, 4))
    assert torch.equal(indices, case["block_indices"])
    out = block_sparse_attention(case["q"], case["k"], case["v"], grid, grid, impl="reference")
    torch.testing.assert_close(out, case["out"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_grid,k_grid", [((4, 8, 8), (4, 8, 8)), ((4, 4, 8), (8, 4, 8)), ((3, 5, 6), (4, 5, 6))])
def test_sparsity_zero_is_dense_attention(q_grid, k_grid):
    q, k, v = random_qkv(q_grid, k_grid)
    out = block_sparse_attention(q, k, v, q_grid, k_grid, sparsity=0.0, impl="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


# Ragged cases are LongCat's image-to-video calls shrunk: a 1-frame condition grid, the (T-1)-frame noisy
# queries against the full key grid (KV-cache call), H and W not multiples of 4; plus separate divisible grids.
RAGGED_CASES = [
    ((1, 6, 10), (1, 6, 10), 0.5),
    ((3, 6, 10), (4, 6, 10), 0.75),
    ((5, 5, 7), (5, 5, 7), 0.9375),
    ((4, 8, 8), (8, 8, 8), 0.8),
]


@pytest.mark.parametrize("q_grid,k_grid,sparsity", RAGGED_CASES)
def test_reference_matches_brute_force_with_grads(q_grid, k_grid, sparsity):
    chunk = (4, 4, 4)
    q, k, v = random_qkv(q_grid, k_grid, seed=3)
    expected, expected_idx = brute_force_attention(q, k, v, q_grid, k_grid, sparsity, chunk)
    assert torch.equal(select_key_blocks(q, k, q_grid, k_grid, sparsity=sparsity, chunk=chunk), expected_idx)
    out = block_sparse_attention(q, k, v, q_grid, k_grid, sparsity=sparsity, chunk=chunk, impl="reference")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_of(out, [q, k, v]), grads_of(expected, [q, k, v])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_auto_is_reference_on_cpu():
    q, k, v = random_qkv((4, 4, 8), (4, 4, 8))
    auto = block_sparse_attention(q, k, v, (4, 4, 8), (4, 4, 8), sparsity=0.5)
    torch.testing.assert_close(auto, block_sparse_attention(q, k, v, (4, 4, 8), (4, 4, 8), sparsity=0.5, impl="reference"))


# --- Triton kernel through the CPU interpreter ---------------------------------------------------------------


def _check_triton_against_reference(
    q_grid, k_grid, sparsity, chunk, dtype, head_dim, tol, device="cpu", heads=2, token_major=False
):
    """Triton output and grads vs the float32 reference: |error| <= tol * (max |reference| + |reference|).

    token_major: feed q, k, v as [B, heads, N, D] views of [B, N, heads, D] storage (the model's layout).
    """
    q, k, v = random_qkv(q_grid, k_grid, heads=heads, head_dim=head_dim, dtype=dtype, device=device, seed=5)
    if token_major:
        q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for t in (q, k, v))
    out = block_sparse_attention(q, k, v, q_grid, k_grid, sparsity=sparsity, chunk=chunk, impl="triton")
    if token_major:
        assert out.stride() == q.stride()
    grads = grads_of(out, [q, k, v])
    # The reference runs in float32 on the same (rounded) inputs.
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = block_sparse_attention(q32, k32, v32, q_grid, k_grid, sparsity=sparsity, chunk=chunk, impl="reference")
    ref_grads = grads_of(ref, [q32, k32, v32])
    assert out.dtype == dtype
    for name, got, want in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref, *ref_grads]):
        assert got.dtype == dtype, name
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, atol=tol * scale, rtol=tol, msg=lambda m: f"{name}: {m}")


@needs_interpreter
@pytest.mark.skipif(not BSA_CASE.exists(), reason=f"parity fixture {BSA_CASE} is absent (needs ../shared)")
def test_triton_interpreter_matches_official_fixture():
    from safetensors.torch import load_file

    case = load_file(str(BSA_CASE))
    grid = tuple(case["latent_shape"].tolist())
    out = block_sparse_attention(case["q"], case["k"], case["v"], grid, grid, impl="triton")
    torch.testing.assert_close(out, case["out"], atol=1e-4, rtol=1e-4)


@needs_interpreter
@pytest.mark.parametrize(
    "q_grid,k_grid,sparsity,chunk,dtype,head_dim,tol",
    [
        ((4, 4, 8), (8, 4, 8), 0.5, (4, 4, 4), torch.float32, 16, 1e-5),  # whole blocks, mask-free kernel
        ((3, 6, 10), (4, 6, 10), 0.5, (4, 4, 4), torch.float32, 16, 1e-5),  # ragged KV-cache call
        ((1, 6, 10), (1, 6, 10), 0.5, (4, 4, 4), torch.float32, 24, 1e-5),  # 1-frame condition, odd head_dim
        ((2, 4, 6), (2, 4, 6), 0.5, (2, 2, 4), torch.float16, 32, 3e-3),  # 16-token chunk, fp16
    ],
)
def test_triton_interpreter_matches_reference(q_grid, k_grid, sparsity, chunk, dtype, head_dim, tol):
    _check_triton_against_reference(q_grid, k_grid, sparsity, chunk, dtype, head_dim, tol)


@needs_interpreter
def test_triton_interpreter_reads_token_major_strides():
    _check_triton_against_reference((3, 4, 5), (4, 4, 5), 0.5, (2, 2, 4), torch.float32, 16, 1e-5, token_major=True)


@needs_interpreter
@pytest.mark.parametrize("min_keys, launches, backend, scope", [
    (64, 1, None, None), (4096, 2, None, None),
    (64, 1, "aot_eager", "checkpointed_block"), (64, 1, "inductor", "checkpointed_block"),
    (4096, 2, "inductor", "checkpointed_block"), (64, 1, "inductor", "block"), (4096, 2, "aot_eager", "block"),
])
def test_keep_attention_checkpointing_keeps_block_sparse_attention(monkeypatch, min_keys, launches, backend, scope):
    """What the planner assumes (planner.Setting.kept_attention_share): the keep_attention policy keeps the
    block-sparse forward's outputs as it keeps SDPA's, so backward does not run the forward kernel again; calls
    with fewer keys than SAVE_MIN_KEYS are recomputed. Gradients equal those of an unchecked run. Under
    torch.compile too, in both compile scopes: `checkpointed_block` compiles the checkpointed forward (as one
    graph), `block` checkpoints the compiled forward."""
    import longcat_tuner.model.block_sparse_triton as kernels
    from longcat_tuner.runtime import selective_checkpoint
    from longcat_tuner.runtime.selective_checkpoint import selective_forward

    forward_launches = []
    launcher = kernels._launcher

    def counting(kernel, device):
        if kernel is kernels._bsa_fwd_kernel:
            forward_launches.append(kernel)
        return launcher(kernel, device)

    monkeypatch.setattr(kernels, "_launcher", counting)
    monkeypatch.setattr(selective_checkpoint, "SAVE_MIN_KEYS", min_keys)
    grid = (4, 8, 8)  # 256 keys
    q, k, v = (t.requires_grad_(True) for t in random_qkv(grid, grid, heads=2, head_dim=16, seed=5))

    def attend(q, k, v):
        return (block_sparse_attention(q, k, v, grid, grid, sparsity=0.5, chunk=(4, 4, 4), impl="triton") * q).sin()

    want = grads_of(attend(q, k, v), [q, k, v])
    forward_launches.clear()
    torch._dynamo.reset()
    if scope == "block":
        checkpointed = selective_forward(torch.compile(attend, backend=backend, fullgraph=True), save_attention=True)
    else:
        checkpointed = selective_forward(attend, save_attention=True)
        if scope == "checkpointed_block":
            checkpointed = torch.compile(checkpointed, backend=backend, fullgraph=True)
    got = grads_of(checkpointed(q, k, v), [q, k, v])
    assert len(forward_launches) == launches  # 1: kept from the forward; 2: run again in backward
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_kernel_helpers_are_named_as_their_functions():
    """torch.compile re-emits a user kernel's jit'd helpers under their function names: a helper reached
    through an alias (e.g. `_max_combine = tl.standard._elementwise_max`) is undefined in the compiled module,
    and compiled training with block-sparse attention fails at its first step (seen on an H100)."""
    import longcat_tuner.model.block_sparse_triton as kernels
    from triton.runtime.jit import JITFunction

    kernel_fns = [value for name, value in vars(kernels).items() if name.startswith("_bsa_") and isinstance(value, JITFunction)]
    assert len(kernel_fns) == 4
    helpers = set()
    for kernel in kernel_fns:
        for name in kernel.fn.__code__.co_names:
            value = vars(kernels).get(name)
            if isinstance(value, JITFunction):
                helpers.add(name)
                assert value.fn.__name__ == name, f"{kernel.fn.__name__} calls {value.fn.__name__} as {name}"
    assert {"_block_rows", "_max_combine", "_sum_combine"} <= helpers


@needs_triton
def test_triton_kernels_as_torch_compile_re_emits_them_resolve_every_name(tmp_path):
    """What inductor does with a user kernel inside torch.compile, on the CPU: its source and the transitive closure
    of its jit'd helpers written out as one module (torch's own function). Every global each emitted function
    loads must be defined there: the kernel once called a helper through an alias, which left `_max_combine`
    undefined and failed compiled block-sparse training at its first step."""
    import builtins
    import dis
    import importlib.util

    import triton
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    import longcat_tuner.model.block_sparse_triton as kernels

    wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")
    emit = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if emit is None:
        pytest.skip("this torch has no user_defined_triton_kernel_transitive_closure_source_code")
    for name in ("_bsa_fwd_kernel", "_bsa_bwd_delta_kernel", "_bsa_bwd_dkdv_kernel", "_bsa_bwd_dq_kernel"):
        # A file, as inductor writes one (Triton reads a jit'd function's source from its file).
        path = tmp_path / f"inductor{name}.py"
        path.write_text("import triton\nimport triton.language as tl\n\n" + emit(getattr(kernels, name)))
        spec = importlib.util.spec_from_file_location(path.stem, path)
        loaded = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(loaded)
        module = vars(loaded)
        emitted = [value for value in module.values() if isinstance(value, JITFunction)]
        assert name in module and emitted
        for function in emitted:
            loads = {i.argval for i in dis.Bytecode(function.fn) if i.opname == "LOAD_GLOBAL"}
            missing = sorted(n for n in loads if n not in module and not hasattr(builtins, n))
            assert not missing, f"{name}: {function.fn.__name__} loads undefined {missing} once re-emitted"


def _hopper_ttir(kernel, scale_type: str, constexprs: dict) -> str:
    """The kernel lowered to Triton IR for an sm_90 target (front end only: no GPU, no ptxas), with its float
    scale arguments typed `scale_type`, the way a launcher declares them."""
    import inspect

    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    cuda_backend = pytest.importorskip("triton.backends.nvidia.compiler")
    pointer_types = {"KV_IDX": "*i32", "T_Q_IDX": "*i32", "T_OFFSETS": "*i64"}
    signature = {}
    for name in inspect.signature(kernel.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper():
            signature[name] = pointer_types.get(name, "*bf16" if name not in ("LSE", "DELTA") else "*fp32")
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = scale_type
        else:
            signature[name] = "i32"
    target = GPUTarget("cuda", 90, 32)
    backend = cuda_backend.CUDABackend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ASTSource(kernel, signature, constexprs)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    return str(module)


@needs_triton
@pytest.mark.parametrize("kernel_name", ["_bsa_fwd_kernel", "_bsa_bwd_dkdv_kernel", "_bsa_bwd_dq_kernel"])
def test_triton_kernels_compute_in_fp32_when_torch_compile_passes_fp64_scales(kernel_name):
    """torch.compile (inductor) declares a user kernel's Python-float arguments fp64 on CUDA, where a plain launch
    declares fp32. The forward then failed to compile (its running max turned fp64 inside the loop: compiled
    block-sparse training died at its first step on an H100) and the backward computed its score tiles in fp64.
    Lowered with fp64 scales, every kernel must build and hold no fp64 tensor."""
    import longcat_tuner.model.block_sparse_triton as kernels

    tiles = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK=128, CT=4, CH=4, CW=8, MASKED=True, IEEE=False)
    kernel = getattr(kernels, kernel_name)
    plain = _hopper_ttir(kernel, "fp32", dict(tiles))
    compiled = _hopper_ttir(kernel, "fp64", dict(tiles))
    assert "xf64>" not in plain and "xf64>" not in compiled, f"{kernel_name} computes a tile in fp64"
    # fp64 appears only where the two scale arguments arrive and are narrowed to fp32.
    f64_ops = [line.strip() for line in compiled.splitlines() if "f64" in line and "tt.func" not in line]
    assert all("_as_fp32" in line or "truncf" in line for line in f64_ops), f64_ops


def test_triton_rejects_large_head_dim():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    q, k, v = random_qkv((1, 4, 4), (1, 4, 4), head_dim=320)
    with pytest.raises(ShapeError, match="head_dim"):
        block_sparse_attention(q, k, v, (1, 4, 4), (1, 4, 4), impl="triton")


# --- Triton kernel on CUDA ------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize(
    "q_grid,k_grid,sparsity,head_dim",
    [
        ((8, 16, 16), (8, 16, 16), 0.9375, 128),  # official shape class: whole 64-token blocks
        ((8, 8, 16), (16, 8, 16), 0.75, 64),  # KV-cache call, whole blocks
        ((5, 10, 14), (6, 10, 14), 0.75, 128),  # ragged noisy call
        ((1, 10, 14), (1, 10, 14), 0.5, 64),  # ragged 1-frame condition call
    ],
)
def test_triton_cuda_bf16_matches_reference(q_grid, k_grid, sparsity, head_dim):
    _check_triton_against_reference(
        q_grid, k_grid, sparsity, (4, 4, 4), torch.bfloat16, head_dim, 2e-2, device="cuda", heads=4, token_major=True
    )


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_triton_cuda_fp32_and_fp16_match_reference():
    _check_triton_against_reference((4, 8, 8), (8, 8, 8), 0.5, (4, 4, 4), torch.float32, 64, 1e-5, device="cuda")
    _check_triton_against_reference((3, 6, 10), (4, 6, 10), 0.5, (4, 4, 4), torch.float16, 128, 5e-3, device="cuda")


@pytest.mark.gpu
@needs_cuda
@needs_triton
def test_triton_cuda_under_torch_compile_matches_eager():
    """Compiled training blocks (compile_blocks) call the kernel inside torch.compile: same output and grads."""
    grid = (5, 10, 14)
    q, k, v = random_qkv(grid, grid, heads=4, head_dim=128, dtype=torch.bfloat16, device="cuda", seed=3)

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, grid, grid, sparsity=0.75, chunk=(4, 4, 4), impl="triton")

    eager = attend(q, k, v)
    eager_grads = grads_of(eager, [q, k, v])
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    compiled = torch.compile(attend)(q2, k2, v2)
    compiled_grads = grads_of(compiled, [q2, k2, v2])
    for got, want in zip([compiled, *compiled_grads], [eager, *eager_grads]):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
