"""Training with `sequence_parallel_size: 2` (the `train/parallel.py` strategies over a data x sequence mesh),
launched as two "nodes" on this machine, on the tiny checkpoint.

The two ranks share every clip, so the run trains exactly what one process trains: each step's loss and the
held-out loss of the final validation (which samples through the sequence-parallel DiT on both ranks) must
equal the single-process run's, under DDP launched with `torchrun --nnodes 2 --rdzv_backend c10d` (one rank
per "node", each node with its own cache folder, as on machines without shared storage). Only rank 0 writes the
run's outputs; the second node's first rank builds its own node's caches. (FSDP2's sequence-parallel gradient
averaging is checked in `test_sequence_parallel.py`; a CPU minute is saved by not training it here too.)
`sample` under torchrun must write the single process's video.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from longcat_tuner.train.events import read_events
from test_train_distributed import REPO, TINY, _env, _torchrun, workspace, write_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")

STEPS = 3
SETTINGS = {"max_train_steps": STEPS, "checkpoint_step_interval": None, "validation_step_interval": None,
            "gradient_accumulation_steps": 1, "lr_warmup_steps": 0, "sequence_parallel_size": 2}


def _losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir) if e["event"] == "step"}


def _heldout(run_dir) -> float:
    return next(e["heldout_loss"] for e in read_events(run_dir) if e["event"] == "validation")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def single(workspace):
    config = write_config(workspace, "sp-single", **{**SETTINGS, "sequence_parallel_size": 1})
    done = subprocess.run([sys.executable, "-m", "longcat_tuner.cli", "train", "--config", str(config), "--no-progress"],
                          cwd=workspace, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return workspace / "sp-single"


def test_two_nodes_ddp_sequence_parallel_trains_what_one_process_trains(workspace, single):
    run_dir = workspace / "sp-ddp"
    nodes = [workspace / "node0", workspace / "node1"]
    # Node 1 has its own disk for caches: its data config names other cache folders.
    datasets = json.loads((workspace / "multidatabackend.json").read_text())
    node1_data = workspace / "node1-data.json"
    node1_data.write_text(json.dumps(datasets).replace(str(workspace / "cache"), str(nodes[1] / "cache")))
    configs = [write_config(workspace, name, output_dir=str(run_dir), data_backend_config=data, **SETTINGS)
               for name, data in (("sp-ddp", str(workspace / "multidatabackend.json")), ("sp-ddp-node1", str(node1_data)))]
    port = _free_port()
    launchers = []
    for node, config in zip(nodes, configs):
        node.mkdir()
        launchers.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=sp-test", "-m", "longcat_tuner.cli", "train",
             "--config", str(config), "--no-progress"],
            cwd=node, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [launcher.communicate(timeout=300)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(outputs)

    want, got = _losses(single), _losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), step
    assert _heldout(run_dir) == pytest.approx(_heldout(single), rel=1e-5)
    events = read_events(run_dir)
    assert [e["event"] for e in events].count("start") == 1 and events[0]["world_size"] == 2
    assert (run_dir / "longcat_lora.safetensors").is_file()
    assert not any(nodes[0].iterdir())  # the launch folders: nothing written there
    assert sorted(p.name for p in nodes[1].iterdir()) == ["cache"]  # node 1's own caches, built there
    assert any((nodes[1] / "cache").rglob("*.safetensors"))


def test_sample_under_torchrun_shares_the_clip(workspace, tmp_path):
    """`sample` under torchrun: both ranks run the split DiT (and must agree), rank 0 writes the same video a
    single process writes."""
    import av
    import numpy as np

    from conftest import ASSETS

    common = ["-m", "longcat_tuner.cli", "sample", "--model", str(TINY), "--image", str(ASSETS / "girl.png"),
              "--prompt", "a girl turns her head", "--frames", "9", "--steps", "2", "--resolution", "64x64",
              "--attention", "reference"]
    single = subprocess.run([sys.executable, *common, "--output", str(tmp_path / "one.mp4")], cwd=tmp_path,
                            env=_env(), capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    process = _torchrun(tmp_path, *common, "--output", str(tmp_path / "two.mp4"))
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert output.count("wrote ") == 1  # rank 0 alone writes and reports
    assert "sequence parallel: each clip split over 2 processes" in output

    def frames(path):
        with av.open(str(path)) as container:
            return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(int)

    one, two = frames(tmp_path / "one.mp4"), frames(tmp_path / "two.mp4")
    assert one.shape == two.shape == (9, 64, 64, 3)
    assert np.abs(one - two).max() <= 1  # float rounding may move a pixel by one level
