"""The automatic memory plan (`runtime.auto`) and the one runtime code path (`runtime.apply`).

Plan choice is pure (no GPU): the planner's predictions for the 13.6B DiT decide, per memory cap, the
fastest settings that fit; keys the user set are pinned; an impossible pin fails before anything loads.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from longcat_tuner.config.training import TrainConfig
from longcat_tuner.errors import ConfigError
from longcat_tuner.runtime import MemorySettings, planner
from longcat_tuner.runtime.auto import ClipShape, choose_plan
from longcat_tuner.runtime.settings import MEMORY_CONFIG_KEYS

GUIDE_SHAPE = ClipShape(frames=93, height=480, width=832)
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **keys) -> TrainConfig:
    """A config as read from a file holding the guide's keys plus `keys` (so `model_fields_set` is theirs)."""
    path = tmp_path / "config.json"
    data = {
        "pretrained_model_name_or_path": str(tmp_path / "model"), "data_backend_config": str(tmp_path / "data.json"),
        "output_dir": str(tmp_path / "out"), "model_type": "lora", "lora_rank": 32, "max_train_steps": 10,
        "gradient_checkpointing": True, **keys,
    }
    path.write_text(json.dumps(data))
    return TrainConfig.from_file(path)


def _plan(config: TrainConfig, card_gib: float = 139.8, shape: ClipShape = GUIDE_SHAPE, **kwargs):
    return choose_plan(config, explicit=config.model_fields_set & set(MEMORY_CONFIG_KEYS), shape=shape, cuda=True,
                       card_gib=card_gib, **kwargs)


def _fits(plan) -> bool:
    estimate = planner.estimate(planner.Setting.from_memory(plan.settings, height=480, width=832, frames=93, lora_rank=32))
    return planner.fits(estimate, plan.budget_gib)


@pytest.mark.parametrize("cap", [24, 48, 80, None])
def test_plan_fits_each_cap_and_is_the_fastest_that_does(tmp_path, cap):
    config = _config(tmp_path, **({"max_gpu_memory_gib": cap} if cap else {}))
    plan = _plan(config)
    assert plan.source == "auto" and _fits(plan)
    assert plan.budget_gib == pytest.approx((cap or 139.8) - planner.CONTEXT_GIB)  # the cap is the process's
    assert set(plan.chosen_by.values()) == {"auto"}
    # No other setting the plan could choose is predicted faster within the same budget.
    for mode in ("none", "full", "keep_attention", "offload_inputs"):
        for compiled in (False, True):
            for swap in range(0, 49):
                other = MemorySettings(checkpointing=mode, compile_blocks=compiled, blocks_to_swap=swap)
                estimate = planner.estimate(planner.Setting.from_memory(other, height=480, width=832, frames=93, lora_rank=32))
                if planner.fits(estimate, plan.budget_gib):
                    assert estimate.step_s >= plan.predicted_step_s - 1e-9, (other, estimate.step_s, plan)
                    break


def test_smaller_caps_trade_speed_for_memory(tmp_path):
    plans = {cap: _plan(_config(tmp_path, max_gpu_memory_gib=cap)) for cap in (24, 48, 80, 139)}
    steps = [plans[cap].predicted_step_s for cap in (24, 48, 80, 139)]
    assert steps == sorted(steps, reverse=True)
    assert plans[139].settings.blocks_to_swap == 0 and not plans[139].settings.quantized
    assert plans[24].settings.blocks_to_swap > plans[80].settings.blocks_to_swap
    assert plans[24].predicted_peak_gib < plans[80].predicted_peak_gib


def test_eight_bit_weights_only_when_nothing_in_bf16_fits(tmp_path):
    for cap in (24, 48, 80):  # swapping blocks always beats 8-bit weights on the whole range
        assert not _plan(_config(tmp_path, max_gpu_memory_gib=cap)).settings.quantized
    # With the swap count pinned, 8-bit weights are what lets 16 swapped blocks fit 32 GiB, and not 48.
    assert not _plan(_config(tmp_path, max_gpu_memory_gib=48, musubi_blocks_to_swap=16)).settings.quantized
    pinned = _plan(_config(tmp_path, max_gpu_memory_gib=32, musubi_blocks_to_swap=16))
    assert pinned.settings.base_precision == "fp8-torchao" and "nothing in bf16 fits" in pinned.reason
    with pytest.raises(ConfigError, match="musubi_blocks_to_swap=16"):
        _plan(_config(tmp_path, max_gpu_memory_gib=32, musubi_blocks_to_swap=16), fp8_ok=False)
    with pytest.raises(ConfigError, match="no memory setting fits"):
        _plan(_config(tmp_path, max_gpu_memory_gib=12))


def test_keys_the_user_set_win(tmp_path):
    config = _config(tmp_path, musubi_blocks_to_swap=10, gradient_checkpointing_mode="offload_inputs")
    plan = _plan(config)
    assert plan.settings.blocks_to_swap == 10 and plan.settings.checkpointing == "offload_inputs"
    assert plan.chosen_by["blocks_to_swap"] == "config" and plan.chosen_by["checkpointing"] == "config"
    assert plan.chosen_by["compile_blocks"] == "auto"
    assert "set by you" in plan.reason
    # compile_blocks: false, written out, is honoured too (a key equal to its default still pins it).
    assert not _plan(_config(tmp_path, compile_blocks=False)).settings.compile_blocks


def test_a_pinned_setting_that_cannot_fit_names_the_keys_and_what_would(tmp_path):
    config = _config(tmp_path, max_gpu_memory_gib=24, gradient_checkpointing=False, musubi_blocks_to_swap=0)
    with pytest.raises(ConfigError) as err:
        _plan(config)
    message = str(err.value)
    assert "gradient_checkpointing=False" in message and "musubi_blocks_to_swap=0" in message
    assert "within 23.2 GiB" in message and "settings that would fit:" in message  # 24 less the CUDA context
    assert "musubi_blocks_to_swap" in message.split("would fit:")[1]


def test_plan_is_a_no_op_where_the_planner_does_not_apply(tmp_path):
    config = _config(tmp_path, max_gpu_memory_gib=24)
    given = MemorySettings.from_config(config)
    for plan in (
        choose_plan(config, explicit=set(), shape=GUIDE_SHAPE, cuda=False),
        _plan(config, calibrated_model=False),
        _plan(config, distributed_strategy="fsdp"),
        _plan(_config(tmp_path, model_type="full")),
    ):
        assert plan.source == "config"
        assert plan.settings in (given, MemorySettings.from_config(_config(tmp_path, model_type="full")))


def test_resolved_plan_round_trips_through_the_config(tmp_path):
    plan = _plan(_config(tmp_path, max_gpu_memory_gib=48))
    resolved = TrainConfig.model_validate({**_config(tmp_path).model_dump(), **plan.settings.config_values()})
    assert MemorySettings.from_config(resolved) == plan.settings
    event = plan.to_event()
    assert json.loads(json.dumps(event))["settings"] == plan.settings.config_values()
    assert "predicted" in plan.summary() and "why:" in plan.summary()


def test_max_gpu_memory_gib_is_bounded(tmp_path):
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="max_gpu_memory_gib"):
            _config(tmp_path, max_gpu_memory_gib=bad)


# --- the trainer's use of the plan ----------------------------------------------------------------------


def test_trainer_plans_from_the_largest_bucket_and_enforces_the_cap(tmp_path, monkeypatch):
    """`plan_memory` (what `train` calls before loading the DiT) on a pretend 141 GiB card."""
    from longcat_tuner.runtime import auto
    from longcat_tuner.train import trainer
    from longcat_tuner.train.parallel import SingleProcess

    tiny = ROOT.parent / "shared" / "reference" / "longcat-tiny"
    if not tiny.is_dir():
        pytest.skip("needs ../shared/reference/longcat-tiny")
    config = _config(tmp_path, max_gpu_memory_gib=48, pretrained_model_name_or_path=str(tiny))
    fractions = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(total_memory=144 * 2**30))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def set_fraction(fraction, device=None):  # the real one refuses a device without an index ("cuda")
        assert isinstance(device, torch.device) and device.index == 0, device
        fractions.append(fraction)

    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", set_fraction)
    # 100 GiB free: another process holds 44 GiB minus this one's context (`gpu_budget` counts it as theirs).
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 144 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(auto, "is_calibrated", lambda dit_config: True)  # the tiny DiT stands in for the 13.6B one
    keys = [(33, 320, 320, True), (93, 480, 832, True), (93, 480, 832, False), (61, 480, 480, True)]
    start = torch.zeros(3, 480, 832)
    items = [types.SimpleNamespace(start_frame=torch.zeros(3, 320, 320), size=None),
             types.SimpleNamespace(start_frame=start, size=None)]
    data = types.SimpleNamespace(dataset=types.SimpleNamespace(group_keys=lambda: keys), validation_items=items)
    precision = trainer.Precision(device=torch.device("cuda"), base_dtype=torch.bfloat16, autocast_dtype=torch.bfloat16)
    plan = trainer.plan_memory(config, data, precision, SingleProcess())
    assert fractions == [pytest.approx((48 - planner.CONTEXT_GIB) / 144)]  # the context lives outside the allocator
    assert plan.shape == ClipShape(frames=93, height=480, width=832, batch=1, has_start_frame=True)
    assert plan.source == "auto" and plan.budget_gib == pytest.approx(48 - planner.CONTEXT_GIB)
    # The eval clip's start frame sets the validation shape, which must fit too (batch 2: CFG).
    assert plan.predicted_validation_peak_gib is not None
    assert plan.settings == _plan(config, card_gib=144, validation=ClipShape(frames=config.validation_num_video_frames,
                                  height=480, width=832, batch=2), expandable_segments=plan.expandable_segments).settings
    # With the cap lifted, the plan fits what the other process left (144 - 44 + the context allowance).
    uncapped = trainer.plan_memory(config.model_copy(update={"max_gpu_memory_gib": None}), data, precision,
                                   SingleProcess())
    # (144 - 100 - 0 reserved - context = 44 - 0.8 held by others; budget 144 - 43.2 - context = 100)
    assert uncapped.budget_gib == pytest.approx(100) and "held by other processes" in uncapped.reason


def test_cpu_training_records_its_plan(tmp_path):
    """On the CPU the plan is the config's own settings, printed and written to events.jsonl."""
    pytest.importorskip("av")
    from longcat_tuner.commands.demo import write_demo
    from longcat_tuner.train.trainer import train

    config_path = write_demo(tmp_path / "demo", steps=1, frames=5, height=32, width=32, train_clips=2, eval_clips=1)
    config = TrainConfig.from_file(config_path, overrides={"validation_step_interval": None})
    result = train(config, progress=False)
    events = [json.loads(line) for line in (result.run_dir / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.index("memory_plan") == kinds.index("start") + 1
    plan = events[kinds.index("memory_plan")]
    assert plan["source"] == "config" and "no CUDA" in plan["reason"]
    assert plan["settings"] == MemorySettings.from_config(config).config_values()


# --- one code path: the trainer, `sample` and the benchmark all call runtime.apply_runtime ----------------


@pytest.fixture
def runtime_calls(monkeypatch):
    from longcat_tuner.runtime import apply

    calls = []
    real = apply.apply_runtime

    def spy(dit, settings, device, **kwargs):
        calls.append(settings)
        return real(dit, settings, device, **kwargs)

    monkeypatch.setattr(apply, "apply_runtime", spy)
    return calls


def test_trainer_and_sample_and_benchmark_apply_the_same_runtime(tiny_checkpoint, tmp_path, runtime_calls):
    import argparse

    from longcat_tuner.commands.sample import load_dit_for_sampling
    from longcat_tuner.model import load_dit
    from longcat_tuner.model.lora import inject_lora
    from longcat_tuner.train import trainer

    config = _config(tmp_path, pretrained_model_name_or_path=str(tiny_checkpoint), gradient_checkpointing_mode="keep_attention")
    precision = trainer.choose_precision(config, torch.device("cpu"))
    trainer.build_model(config, precision)
    assert runtime_calls[-1] == MemorySettings.from_config(config)

    args = argparse.Namespace(model=str(tiny_checkpoint), lora=[], lora_multiplier=[], attention=None, blocks_to_swap=0,
                              base_precision="no_change", compile="auto", steps=50, guidance=4.0)
    load_dit_for_sampling(args, dtype=torch.float32, device=torch.device("cpu"))
    assert runtime_calls[-1] == MemorySettings(checkpointing="none")  # --compile auto: eager on the CPU

    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "bench_train_step.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_train_step", bench)
    spec.loader.exec_module(bench)
    run = bench.parse_run("ckpt=attn,keep=2,compile=")
    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=4)
    applied = bench.apply_run(dit, run, "cpu")
    assert runtime_calls[-1] == MemorySettings(checkpointing="keep_attention", keep_attention_blocks=2)
    assert applied.recomputed == frozenset(range(len(dit.blocks)))
    applied.remove()
    assert all("forward" not in block.__dict__ for block in dit.blocks)


# --- sampling: the fewest swapped blocks that fit ------------------------------------------------------


def test_sampling_swaps_the_fewest_blocks_that_fit():
    from longcat_tuner.runtime.auto import choose_sampling_swap, sampling_peak_gib

    cfg = ClipShape(frames=93, height=480, width=832, batch=2)
    whole, _ = choose_sampling_swap(cfg, 139.8)
    assert whole == 0
    swaps = [choose_sampling_swap(cfg, budget)[0] for budget in (80, 48, 32, 24)]
    assert swaps == sorted(swaps) and swaps[-1] > 0
    swap, peak = choose_sampling_swap(cfg, 24)
    assert peak * planner.CALIBRATION["reserved_factor"] + planner.CALIBRATION["headroom_gib"] <= 24
    assert sampling_peak_gib(cfg, swap - 1, "no_change") * planner.CALIBRATION["reserved_factor"] \
        + planner.CALIBRATION["headroom_gib"] > 24  # one block fewer would not fit
    assert choose_sampling_swap(cfg, 24, base_precision="fp8-torchao")[0] < swap
    with pytest.raises(ConfigError, match="--guidance 1"):
        choose_sampling_swap(cfg, 6)
    # Un-merged LoRA adapters stay on the GPU whatever is swapped: the official distilled LoRA (rank 128) takes
    # 1.17 GiB in bf16, which costs more swapped blocks at 24 GiB and is named when nothing fits.
    with_lora, lora_peak = choose_sampling_swap(cfg, 24, lora_gib=1.17)
    assert with_lora > swap and lora_peak == pytest.approx(sampling_peak_gib(cfg, with_lora, "no_change") + 1.17, abs=0.01)
    with pytest.raises(ConfigError, match="un-merged LoRA adapters.*--merge-loras on"):
        choose_sampling_swap(cfg, 6, lora_gib=1.17)


def test_resident_lora_gib_counts_the_adapters_of_each_file(tiny_checkpoint):
    from longcat_tuner.commands.sample import resident_lora_gib
    from longcat_tuner.model.lora_formats import read_lora_file

    path = tiny_checkpoint / "lora" / "tiny_lora.safetensors"
    adapters = read_lora_file(path)[0]
    params = sum(a.down.numel() + sum(u.numel() for u in a.ups) for a in adapters.values())
    assert params > 0
    assert resident_lora_gib([(str(path), adapters, 1.0)], torch.bfloat16) == params * 2 / 2**30
    assert resident_lora_gib([(str(path), adapters, 1.0)] * 2, torch.float32) == params * 8 / 2**30
    assert resident_lora_gib([], torch.bfloat16) == 0


def test_sample_flags_refuse_cuda_only_options_on_the_cpu(tiny_checkpoint):
    import argparse

    from longcat_tuner.commands.sample import sampling_swap

    args = argparse.Namespace(model=str(tiny_checkpoint), blocks_to_swap=None, max_gpu_memory_gib=24.0, frames=5,
                              guidance=4.0, image=None, base_precision="no_change")
    with pytest.raises(ConfigError, match="--max-gpu-memory-gib"):
        sampling_swap(args, height=32, width=32, device=torch.device("cpu"))
    args.max_gpu_memory_gib = None
    assert sampling_swap(args, height=32, width=32, device=torch.device("cpu")) == 0


def test_block_swap_device_other_than_cpu_is_refused_by_the_schema(tmp_path):
    with pytest.raises(ConfigError, match="musubi_block_swap_device"):
        _config(tmp_path, musubi_block_swap_device="cuda:1")


@pytest.mark.parametrize("keys,match", [({"base_model_precision": "fp8-torchao"}, "8 bits"),
                                        ({"musubi_blocks_to_swap": 2}, "streams frozen weights")])
def test_full_fine_tune_refuses_frozen_only_settings_before_loading(tmp_path, tiny_checkpoint, monkeypatch, keys, match):
    import longcat_tuner.model as model_package
    from longcat_tuner.runtime import apply
    from longcat_tuner.train import trainer

    def no_load(*args, **kwargs):
        raise AssertionError("the DiT was loaded before the refusal")

    monkeypatch.setattr(model_package, "load_dit", no_load)
    config = _config(tmp_path, pretrained_model_name_or_path=str(tiny_checkpoint), model_type="full", **keys)
    with pytest.raises(ConfigError, match=match):
        trainer.build_model(config, trainer.choose_precision(config, torch.device("cpu")))
    # The runtime itself refuses the same for a model whose base weights are trainable.
    from longcat_tuner.model import loading

    dit = loading.load_dit(tiny_checkpoint).requires_grad_(True)
    with pytest.raises(ConfigError, match=match):
        apply.refuse_trained_base(MemorySettings(**({"base_precision": keys["base_model_precision"]}
                                                    if "base_model_precision" in keys else {"blocks_to_swap": 2})))
    if "base_model_precision" in keys:
        with pytest.raises(ConfigError, match=match):
            apply.prepare_base_weights(dit, MemorySettings(base_precision=keys["base_model_precision"]))


def test_room_left_on_the_card_goes_to_uncheckpointed_blocks(tmp_path):
    """On the whole card the plan leaves blocks out of checkpointing (as many as fit); under a cap that
    needs block swap it never swaps blocks to make room for them; a pinned count wins."""
    whole = _plan(_config(tmp_path))
    assert whole.settings.uncheckpointed_blocks > 0 and whole.settings.blocks_to_swap == 0 and _fits(whole)
    more = dataclasses.replace(whole.settings, uncheckpointed_blocks=whole.settings.uncheckpointed_blocks + 1)
    estimate = planner.estimate(planner.Setting.from_memory(more, height=480, width=832, frames=93, lora_rank=32))
    assert not planner.fits(estimate, whole.budget_gib)  # the most that fit
    capped = _plan(_config(tmp_path, max_gpu_memory_gib=48))
    assert capped.settings.blocks_to_swap > 0 and capped.settings.uncheckpointed_blocks == 0
    pinned = _plan(_config(tmp_path, gradient_checkpointing_uncheckpointed_blocks=2))
    assert pinned.settings.uncheckpointed_blocks == 2 and pinned.chosen_by["uncheckpointed_blocks"] == "config"


def test_memory_held_by_other_processes_shrinks_the_budget(tmp_path):
    alone = _plan(_config(tmp_path), card_gib=79.2)
    shared = _plan(_config(tmp_path), card_gib=79.2, others_gib=7.0)
    assert shared.budget_gib == pytest.approx(72.2 - planner.CONTEXT_GIB) and "7.0 GiB of it held by other processes" in shared.reason
    assert shared.predicted_peak_gib < alone.predicted_peak_gib


def test_validation_must_fit_beside_training_or_the_plan_says_it_may_not(tmp_path):
    """Validation runs with the training state resident: a plan that fits training alone but not a batch-2
    validation video swaps more blocks; when no plan fits both, training still runs and the reason warns."""
    from longcat_tuner.runtime.auto import Workload, validation_peak_gib

    config = _config(tmp_path, max_gpu_memory_gib=24)
    alone = _plan(config)
    big = ClipShape(frames=93, height=704, width=1280, batch=2)
    with_validation = _plan(config, validation=big)
    assert with_validation.settings.blocks_to_swap > alone.settings.blocks_to_swap
    assert with_validation.predicted_validation_peak_gib == validation_peak_gib(
        with_validation.settings, Workload(GUIDE_SHAPE, lora_rank=32, validation=big))
    assert planner.fits_gib(with_validation.predicted_validation_peak_gib, with_validation.budget_gib)
    assert not planner.fits_gib(validation_peak_gib(alone.settings, Workload(GUIDE_SHAPE, lora_rank=32, validation=big)),
                                alone.budget_gib)
    assert "may run out of memory" not in with_validation.reason
    huge = _plan(config, validation=ClipShape(frames=93, height=960, width=1600, batch=2))
    assert huge.settings == alone.settings  # training is not given up for the validation
    assert "validation at 960x1600x93 (batch 2) does not fit beside training" in huge.reason
    assert "validation_resolution" in huge.reason
    assert huge.to_event()["predicted_validation_peak_gib"] > huge.budget_gib


def test_expandable_segments_let_the_plan_use_the_reserve_the_default_allocator_wastes(tmp_path):
    """The default allocator reserves up to 1.25x the allocation with the compiled checkpointed block; with
    expandable segments (what train uses unless told otherwise) that slack goes to fewer swapped blocks."""
    config = _config(tmp_path)
    default = _plan(config, card_gib=79.2)
    expandable = _plan(config, card_gib=79.2, expandable_segments=True)
    assert expandable.settings.blocks_to_swap < default.settings.blocks_to_swap
    assert expandable.predicted_step_s <= default.predicted_step_s
    estimate = planner.estimate(planner.Setting.from_memory(expandable.settings, height=480, width=832, frames=93,
                                                            lora_rank=32, expandable_segments=True))
    assert estimate.reserved_factor == planner.CALIBRATION["reserved_factor_expandable"]
    assert planner.fits(estimate, expandable.budget_gib)
    assert expandable.to_event()["expandable_segments"] is True and "expandable segments" in expandable.summary()


def test_validation_shape_comes_from_the_largest_eval_video(tmp_path):
    """`trainer.largest_validation`: the eval start frames' size (or a text-to-video size), CFG's batch of 2,
    sized on the token grid; no videos, no validation term."""
    from longcat_tuner.train import trainer

    config = _config(tmp_path, validation_num_video_frames=49)
    items = [types.SimpleNamespace(start_frame=torch.zeros(3, 320, 320), size=None),
             types.SimpleNamespace(start_frame=None, size=(470, 830))]
    shape = trainer.largest_validation(types.SimpleNamespace(validation_items=items), config)
    assert shape == ClipShape(frames=49, height=480, width=832, batch=2, has_start_frame=False)
    one_pass = config.model_copy(update={"validation_guidance": 1.0})
    assert trainer.largest_validation(types.SimpleNamespace(validation_items=items[:1]), one_pass) == \
        ClipShape(frames=49, height=320, width=320, batch=1, has_start_frame=True)
    assert trainer.largest_validation(types.SimpleNamespace(validation_items=[]), config) is None


def test_block_sparse_attention_is_planned_as_the_attention_policy_runs_it():
    from longcat_tuner.runtime.auto import uses_block_sparse

    whole_chunks = ClipShape(frames=93, height=512, width=832)  # token grid 24x32x52: multiples of 4x4x4
    assert uses_block_sparse("block_sparse", GUIDE_SHAPE, enable_bsa=False)  # forced: ragged grids too
    assert uses_block_sparse("auto", whole_chunks, enable_bsa=True)
    assert not uses_block_sparse("auto", GUIDE_SHAPE, enable_bsa=True)  # 24x30x52: auto keeps the official rule
    assert not uses_block_sparse("auto", whole_chunks, enable_bsa=False)  # the checkpoint does not enable it
    assert not uses_block_sparse("auto", whole_chunks, enable_bsa=True, triton=False)
    assert not uses_block_sparse("auto", ClipShape(frames=1, height=512, width=832), enable_bsa=True)  # one frame
    assert not uses_block_sparse("sdpa", whole_chunks, enable_bsa=True)


def test_a_block_sparse_run_is_planned_with_its_cheaper_attention(tmp_path):
    config = _config(tmp_path, attention_implementation="block_sparse")
    shape = ClipShape(frames=93, height=704, width=1280)
    dense = _plan(config, card_gib=79.2, shape=shape)
    sparse = _plan(config, card_gib=79.2, shape=shape, block_sparse=True)
    assert sparse.predicted_step_s < 0.5 * dense.predicted_step_s  # attention is most of the dense step here
    assert "block-sparse attention (sparsity 0.9375)" in sparse.reason and "block-sparse" not in dense.reason
    # memory is the dense run's: the same settings fit
    assert sparse.predicted_peak_gib <= sparse.budget_gib


def test_block_sparse_plans_keep_attention_where_it_fits(tmp_path):
    """keep_attention keeps block-sparse attention's outputs (its forward is an operator the policy names), so a
    block-sparse plan takes it where it fits and is faster than full checkpointing; the why line has no caveat."""
    shape = ClipShape(frames=93, height=704, width=1280)
    config = _config(tmp_path, attention_implementation="block_sparse", lora_rank=8)
    roomy = _plan(config, card_gib=139.8, shape=shape, block_sparse=True)
    assert roomy.settings.checkpointing in ("keep_attention", "none"), roomy.settings.describe()
    pinned_full = _plan(_config(tmp_path, attention_implementation="block_sparse", lora_rank=8,
                                gradient_checkpointing_mode="full"), card_gib=139.8, shape=shape, block_sparse=True)
    assert roomy.predicted_step_s < pinned_full.predicted_step_s
    pinned = _config(tmp_path, attention_implementation="block_sparse", gradient_checkpointing_mode="keep_attention")
    plan = _plan(pinned, card_gib=79.2, shape=shape, block_sparse=True)
    assert plan.settings.checkpointing == "keep_attention" and plan.chosen_by["checkpointing"] == "config"
    assert "recomputes attention" not in plan.reason
