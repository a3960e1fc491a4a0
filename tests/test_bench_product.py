"""The full-size product benchmark's reading of a run (bench/bench_product.py): what it reports per cap
comes from the run's own events.jsonl, a killed run's losses are compared with its resumed run's."""
from __future__ import annotations

import sys
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_product  # noqa: E402


def _events(start_time: float, steps: dict[int, float], *, checkpoint_at=(), validation=False) -> list[dict]:
    events = [{"event": "start", "time": start_time},
              {"event": "memory_plan", "time": start_time + 1, "source": "auto", "describe": "keep_attention",
               "predicted_step_s": 12.0, "predicted_peak_gib": 60.0}]
    t = start_time + 2
    for step, loss in steps.items():
        t += 40.0 if step == min(steps) else 12.0
        events.append({"event": "step", "time": t, "step": step, "loss": loss, "s_per_step": 40.0 if step == min(steps) else 12.0 + step / 100,
                       "peak_mem_gib": 50.0 + step, "peak_reserved_gib": 60.0 + step})
        if step in checkpoint_at:
            t += 1.5
            events.append({"event": "checkpoint", "time": t, "step": step})
    if validation:
        t += 30.0
        events.append({"event": "validation", "time": t, "step": max(steps), "items": [{"video": "a.mp4"}]})
        events.append({"event": "end", "time": t + 0.1, "status": "completed"})
    return events


def test_a_killed_and_resumed_run_is_read_from_its_events():
    killed = _events(0.0, {1: 2.5, 2: 2.4, 3: 2.3, 4: 2.2}, checkpoint_at=(2,))
    first = bench_product.summarize_run(killed)
    assert first["steps"] == [1, 2, 3, 4] and first["first_step_s"] == 40.0
    assert first["s_per_step_median"] == 12.03  # steps 2-4: the first (compile) step is left out
    assert first["peak_allocated_gib"] == 54.0 and first["peak_reserved_gib"] == 64.0
    assert first["checkpoint_s"] == [1.5] and first["end"] is None and first["plan"]["predicted_step_s"] == 12.0
    # The resumed process appends to the same file: only the part after its own `start` counts.
    both = killed + _events(1000.0, {3: 2.3, 4: 2.2000001}, checkpoint_at=(4,), validation=True)
    resumed = bench_product.summarize_run(both)
    assert resumed["steps"] == [3, 4] and resumed["validation_s_per_video"] == 30.0
    assert resumed["end"]["status"] == "completed"
    comparison = bench_product.compare_losses(first["losses"], resumed["losses"])
    assert comparison["steps_compared"] == ["3", "4"] and not comparison["equal"] and comparison["within_1e-3"]
    assert bench_product.compare_losses(first["losses"], {"3": 2.3, "4": 2.2})["equal"]


def test_a_plan_revised_after_running_out_of_memory_is_reported_apart():
    events = _events(0.0, {1: 2.5, 2: 2.4})
    assert bench_product.summarize_run(events)["plan_revised"] is None
    events.insert(3, {"event": "memory_plan", "time": 50.0, "source": "auto", "describe": "full", "revised": True,
                      "reason": "...; revised: step 1 ran out of GPU memory"})
    summary = bench_product.summarize_run(events)
    assert summary["plan"]["describe"] == "keep_attention"  # what the run started with
    assert summary["plan_revised"] == {"describe": "full", "reason": "...; revised: step 1 ran out of GPU memory"}


def test_caps_parse_with_the_whole_card():
    assert bench_product.parse_caps("24, 48,whole") == [("24", 24.0), ("48", 48.0), ("whole", None)]


def test_select_sdpa_backend_reaches_the_model_kernel_choice(monkeypatch):
    """The benchmarks' `--sdpa` choice replaces the model's per-call kernel choice (it once set an attribute
    the model no longer read, so it did nothing); masked calls keep the model's own choice."""
    import torch
    from torch.nn.attention import SDPBackend

    import common
    from longcat_tuner.model import attention

    monkeypatch.setattr(attention, "_cuda_sdpa_kernel", attention._cuda_sdpa_kernel)  # restored afterwards
    q = torch.zeros(1, 2, 4, 64, dtype=torch.bfloat16)
    assert attention._cuda_sdpa_kernel(q, None) == [SDPBackend.CUDNN_ATTENTION]
    common.select_sdpa_backend("flash")
    assert attention._cuda_sdpa_kernel(q, None) == [SDPBackend.FLASH_ATTENTION]
    assert attention._cuda_sdpa_kernel(q, torch.zeros(1)) == [SDPBackend.EFFICIENT_ATTENTION]
    common.select_sdpa_backend("cudnn")  # a second choice replaces the first, not wraps it
    assert attention._cuda_sdpa_kernel(q, None) == [SDPBackend.CUDNN_ATTENTION]
    assert attention._cuda_sdpa_kernel.model_default.__name__ == "_cuda_sdpa_kernel"


def test_a_data_resolution_sets_every_dataset_and_keeps_its_clips_and_caches_apart(tmp_path):
    model = tmp_path / "model-tiny"
    plain = bench_product.write_guide_config(tmp_path, model, clips=1, frames=5, height=32, width=48, shrink=False)
    plain_sets = json.loads((plain.parent / "multidatabackend.json").read_text())
    config = bench_product.write_guide_config(tmp_path, model, clips=1, frames=5, height=64, width=96, shrink=False,
                                              resolution="64x96")
    datasets = json.loads((config.parent / "multidatabackend.json").read_text())
    assert {entry["resolution"] for entry in datasets} == {"64x96"}
    assert {entry["resolution"] for entry in plain_sets} != {"64x96"}  # the guide's own value otherwise
    for entry in datasets:
        assert Path(entry["instance_data_dir"]).is_relative_to(tmp_path / "data-64x96")
        assert Path(entry["cache_dir_vae"]).is_relative_to(tmp_path / "cache-64x96")
    assert (tmp_path / "data" / "train").is_dir() and (tmp_path / "data-64x96" / "train").is_dir()


def test_set_keys_become_train_flags_booleans_included():
    import argparse

    from longcat_tuner.config.training import add_config_arguments, config_overrides

    args = argparse.Namespace(steps=4, size="full", height=480, width=832, frames=93, validation_steps=1,
                              set=[("validation_using_datasets", "false"), ("compile_blocks", "true"),
                                   ("attention_implementation", "block_sparse")])
    command = bench_product.train_args(Path("config.json"), Path("run"), args, 24.0)
    flags = command[command.index("train") + 1:]
    assert "--no-validation_using_datasets" in flags and "--compile_blocks" in flags
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("--no-progress", action="store_true")
    add_config_arguments(parser)
    overrides = config_overrides(parser.parse_args(flags))  # what `train` itself reads from them
    assert overrides["validation_using_datasets"] is False and overrides["compile_blocks"] is True
    assert overrides["attention_implementation"] == "block_sparse" and overrides["max_gpu_memory_gib"] == 24.0


def test_the_validation_time_is_broken_down_from_its_progress_events():
    """First denoising step (compile), later steps, the decode and the rest (writes, held-out loss) apart."""
    events = _events(0.0, {1: 2.5, 2: 2.4})  # steps end at t=42 and t=54
    events += [
        {"event": "validation_progress", "time": 84.0, "step": 2, "video": 1, "phase": "denoising", "denoise_step": 1},
        {"event": "validation_progress", "time": 89.0, "step": 2, "video": 1, "phase": "denoising", "denoise_step": 2},
        {"event": "validation_progress", "time": 89.5, "step": 2, "video": 1, "phase": "decoding", "denoise_step": 2},
        {"event": "validation_progress", "time": 109.5, "step": 2, "video": 1, "phase": "done", "denoise_step": 2},
        {"event": "validation", "time": 121.5, "step": 2, "items": [{"video": "a.mp4"}]},
    ]
    summary = bench_product.summarize_run(events)
    assert summary["validation_s_per_video"] == 67.5
    assert summary["validation_breakdown"] == {
        "videos": [{"denoise_step_s": [30.0, 5.0], "decode_s": 20.0}], "after_last_video_s": 12.0}
