"""The block-sparse forward probe (bench/bench_bsa_probe.py): its baseline loop and its TMA loop compute the
product kernel's attention, so the times it reports for them are times of the same work. Run through Triton's
interpreter in a child process (the probe's kernels call tl.max / tl.sum, which the interpreter runs only when
TRITON_INTERPRET is set before triton is imported)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_block_sparse import needs_interpreter

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import importlib.util, math, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    spec = importlib.util.spec_from_file_location("probe", sys.argv[1] + "/bench/bench_bsa_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    from triton.tools.tensor_descriptor import TensorDescriptor
    import longcat_tuner.model.block_sparse_triton as K
    from longcat_tuner.model.block_sparse import select_key_blocks

    grid, heads, d = (8, 8, 4), 2, 16
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(3))
    idx = select_key_blocks(q, k, grid, grid, sparsity=0.5)
    kv_idx = idx.to(torch.int32).reshape(heads, idx.shape[2], idx.shape[3]).contiguous()
    nqb, nsel = kv_idx.shape[1:]
    ref = K.block_sparse_forward(q, k, v, kv_idx, list(grid), list(grid), [4, 4, 4])[0]
    geom = K._geometry(grid, (4, 4, 4))
    scale = K.LOG2E / math.sqrt(d)
    for mode in (0, 1):
        out = torch.zeros_like(q)
        probe.probe_fwd[(nqb, heads)](q, k, v, out, kv_idx, q.stride(1), q.stride(2), k.stride(1), k.stride(2), *geom,
                                      nqb, nsel, scale, BLOCK_D=d, BLOCK=64, CT=4, CH=4, CW=4, MODE=mode, WS=False,
                                      STAGES=2)
        print("mode", mode, (out - ref).abs().max().item())
    T, H, W = grid
    descs = [TensorDescriptor(x, [heads, T, H, W, d], [n * d, H * W * d, W * d, d, 1], [1, 4, 4, 4, d]) for x in (k, v)]
    out = torch.zeros_like(q)
    probe.probe_tma[(nqb, heads)](q, descs[0], descs[1], out, kv_idx, q.stride(1), q.stride(2), *geom, nqb, nsel, scale,
                                  BLOCK_D=d, BLOCK=64, CT=4, CH=4, CW=4, STAGES=2)
    print("tma", (out - ref).abs().max().item())
""")


@needs_interpreter
def test_probe_baseline_and_tma_loops_compute_the_product_attention():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(REPO)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    errors = {" ".join(line.split()[:-1]): float(line.split()[-1]) for line in done.stdout.splitlines()}
    assert set(errors) == {"mode 0", "mode 1", "tma"}
    assert errors["mode 0"] < 1e-5 and errors["tma"] < 1e-5
    # Mode 1 drops the softmax: a different result, so the comparison can tell the loops apart.
    assert errors["mode 1"] > 1e-2
