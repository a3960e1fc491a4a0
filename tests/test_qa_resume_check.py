"""QA pass on resume and on what `check` and `train` refuse before minutes of caching and loading:

1. a resume followed by an immediate stop rewrote the checkpoint it had just loaded (two renames: a kill between
   them left it only as `.old-`/`.tmp-` folders, which the next start deleted);
2. a resume with another train_batch_size / gradient_accumulation_steps (or items in other buckets) restored a data
   position that pointed at other batches;
3. an `init_lora` of a rank above `lora_rank` was refused only after the model loaded;
4. `check` refused a lora_rank above the narrowest adapted layer and `train` trained anyway (and `check` skipped
   top-level and block-specific targets);
5. a `validation_resolution` the DiT's patch cannot take (48x80 with patch (1, 4, 4)) passed `check`, then failed
   every validation as a warning.

Training runs are one or two steps of the tiny reference checkpoint on the CPU, sharing one cached workspace.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import types
from pathlib import Path

import pytest
import torch

from conftest import TINY, write_paired_workspace
from longcat_tuner.errors import CheckpointError, ConfigError, DataError
from longcat_tuner.train import checkpoint as ckpt

FRAMES, SIZE = 9, 64
needs_tiny = pytest.mark.skipif(not TINY.is_dir(), reason=f"tiny reference checkpoint not found at {TINY}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return write_paired_workspace(tmp_path_factory.mktemp("qa-resume"), train_clips=2, eval_clips=1, frames=FRAMES,
                                  size=SIZE)


def config_file(workspace: Path, name: str, **keys) -> Path:
    base = {
        "pretrained_model_name_or_path": str(TINY), "output_dir": name, "data_backend_config": "multidatabackend.json",
        "lora_rank": 4, "learning_rate": 1e-3, "lr_warmup_steps": 0, "max_train_steps": 1,
        "checkpoint_step_interval": 1, "validation_step_interval": None,
        "validation_resolution": f"{SIZE}x{SIZE}", "validation_num_video_frames": FRAMES,
        "validation_num_inference_steps": 1, "validation_max_samples": 1, "eval_dataset_id": "val", "seed": 7, **keys,
    }
    path = workspace / f"{name}-{abs(hash(json.dumps(keys, sort_keys=True)))}.json"
    path.write_text(json.dumps(base))
    return path


def make_config(workspace: Path, name: str, **keys):
    from longcat_tuner.config import TrainConfig

    return TrainConfig.from_file(config_file(workspace, name, **keys))


@pytest.fixture(scope="module")
def trained(workspace) -> Path:
    """A one-step run (train_batch_size 1, no accumulation): its checkpoint-000001 and LoRA."""
    from longcat_tuner.train.trainer import train

    train(make_config(workspace, "base"), progress=False)
    return workspace / "base" / "checkpoints" / "checkpoint-000001"


@pytest.fixture
def no_caching(monkeypatch):
    """`train` stops with AssertionError if it reaches the cache stage: what it refuses must come before."""
    from longcat_tuner.train import trainer

    def prepare_data(*args, **kwargs):
        raise AssertionError("reached the cache stage")

    monkeypatch.setattr(trainer, "prepare_data", prepare_data)


def _save(root: Path, step: int) -> Path:
    return ckpt.save_checkpoint(
        root, step=step, weights={"w": torch.full((2,), float(step))}, optimizer_state={"state": {}, "param_groups": []},
        scheduler_state={"last_epoch": step}, trainer_state={"sampler": {"epoch": 0, "position": step}},
        rng_state=ckpt.capture_rng_state({}),
    )


# --- 1. a loaded checkpoint counts as saved; the start-up cleanup never deletes the only copy -------------------
def test_cleanup_puts_back_a_checkpoint_left_only_as_an_old_folder(tmp_path):
    """Before: `.old-checkpoint-X-<pid>` (and the complete `.tmp-`) of a save killed between its two renames were
    deleted at the next start, and with them the only copies of checkpoint-X."""
    kept = _save(tmp_path, 1)
    weights = (kept / ckpt.WEIGHTS_FILE).read_bytes()
    kept.rename(tmp_path / ".old-checkpoint-000001-4242")  # the first rename of a re-save of step 1 ...
    newer = _save(tmp_path / "other", 1)
    (newer / "from-the-temporary").write_text("")  # the same step's bytes: this tells the two copies apart
    newer.rename(tmp_path / ".tmp-checkpoint-000001-4242")  # ... its complete temporary, not yet renamed
    (tmp_path / ".tmp-checkpoint-000002-4242").mkdir()  # an unfinished save of another step: no COMPLETE
    _save(tmp_path, 3).rename(tmp_path / ".old-checkpoint-000003-17")  # a stale copy beside its checkpoint
    _save(tmp_path, 3)

    restored = ckpt.remove_stale_temporaries(tmp_path)

    assert restored == [tmp_path / "checkpoint-000001"]
    assert (tmp_path / "checkpoint-000001" / ckpt.WEIGHTS_FILE).read_bytes() == weights  # the committed copy
    assert not (tmp_path / "checkpoint-000001" / "from-the-temporary").exists()  # .old- first, not the .tmp-
    assert [step for step, _ in ckpt.list_checkpoints(tmp_path)] == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # the rest is cleaned up


@needs_tiny
def test_a_stop_right_after_a_resume_does_not_rewrite_the_loaded_checkpoint(workspace, trained, monkeypatch):
    """Before: the resumed run did not count checkpoint-000001 as saved at step 1, so a SIGTERM before the first
    new step saved it again over itself (rename aside, rename the new one in)."""
    from longcat_tuner.train import trainer

    saves = []
    real_save = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda *a, **k: saves.append(k["step"]) or real_save(*a, **k))
    monkeypatch.setattr(trainer.StopRequest, "requested", property(lambda self: True))  # a signal at once
    run_dir = workspace / "resumed"
    shutil.copytree(workspace / "base" / "checkpoints", run_dir / "checkpoints")
    loaded = run_dir / "checkpoints" / "checkpoint-000001"
    inode = (loaded / ckpt.COMPLETE_MARKER).stat().st_ino

    result = trainer.train(make_config(workspace, "resumed", max_train_steps=3, resume_from_checkpoint="latest"),
                           progress=False)

    assert result.status == "interrupted" and result.step == 1
    assert saves == []  # nothing new to save: the checkpoint it loaded is this step's
    assert result.checkpoint_path == loaded
    assert (loaded / ckpt.COMPLETE_MARKER).stat().st_ino == inode  # the very files it loaded, never replaced


@needs_tiny
def test_a_new_run_is_refused_when_the_cleanup_puts_back_an_earlier_runs_checkpoint(workspace, no_caching):
    """Before: the earlier-run check ran before the cleanup, so an output_dir whose only checkpoint was left as
    `.old-checkpoint-X-<pid>` passed as empty; the cleanup then put checkpoint-X back and the new run from step 0
    trained beside it (its own step X saved over it, `checkpoints_total_limit` pruning it)."""
    from longcat_tuner.train.trainer import train

    checkpoints = workspace / "only-old" / "checkpoints"
    _save(checkpoints, 1).rename(checkpoints / ".old-checkpoint-000001-4242")
    with pytest.raises(ConfigError, match=r"already holds an earlier run \(1 checkpoint\(s\), the newest checkpoint-000001"):
        train(make_config(workspace, "only-old"), progress=False)
    assert [step for step, _ in ckpt.list_checkpoints(checkpoints)] == [1]  # put back, and kept


# --- 2. what forms a step must not change across a resume ---------------------------------------------------
@needs_tiny
@pytest.mark.parametrize("key,value", [("train_batch_size", 2), ("gradient_accumulation_steps", 2)])
def test_a_resume_with_another_step_composition_is_refused_naming_the_key(workspace, trained, no_caching, capsys,
                                                                          key, value):
    """Before: only a change in the item count was checked; a resume with train_batch_size 2 restored a position
    counted in batches of 1 and trained on other batches than the run it continued, without a word."""
    from longcat_tuner.cli import main as cli_main
    from longcat_tuner.train.trainer import train

    assert json.loads((trained / ckpt.STATE_FILE).read_text())[key] == 1  # recorded by the run
    keys = {key: value, "max_train_steps": 3, "resume_from_checkpoint": "latest"}
    with pytest.raises(ConfigError) as caught:
        train(make_config(workspace, "base", **keys), progress=False)
    message = str(caught.value)
    assert f"this config sets {key} {value} (the checkpoint's run used 1)" in message
    assert f"Set {key}: 1 again to resume it" in message
    assert f"init_lora: {trained / 'longcat_lora.safetensors'} in a fresh output_dir" in message
    # `check` says the same, before anything runs.
    code = cli_main(["check", "--config", str(config_file(workspace, "base", **keys)), "--json"])
    blocking = json.loads(capsys.readouterr().out)["blocking"]
    assert code == 1 and any(p.startswith(f"resume_from_checkpoint {trained}: this config sets {key}") for p in blocking)
    # The same settings as the run resume as before.
    code = cli_main(["check", "--config", str(config_file(workspace, "base", max_train_steps=3,
                                                          resume_from_checkpoint="latest")), "--json"])
    assert code == 0, json.loads(capsys.readouterr().out)["blocking"]


def test_the_sampler_refuses_a_position_counted_in_other_batches():
    """The sampler's own guard (also for a run whose config check was bypassed): its state says what it counts."""
    from longcat_tuner.data.buckets import BucketBatchSampler

    keys = [(5, 32, 32, True)] * 4 + [(5, 32, 64, True)] * 4
    sampler = BucketBatchSampler(keys, batch_size=2, seed=3)
    next(iter(sampler))
    state = sampler.state_dict()
    BucketBatchSampler(keys, batch_size=2, seed=3).load_state_dict(state)  # the same data: restored
    with pytest.raises(DataError, match="train_batch_size is 1, the checkpoint's data position counts batches of 2"):
        BucketBatchSampler(keys, batch_size=1, seed=3).load_state_dict(state)
    moved = keys[:3] + [(5, 32, 64, True)] * 5  # as many items, one in another bucket
    with pytest.raises(DataError, match="fall into other buckets or repeat other counts"):
        BucketBatchSampler(moved, batch_size=2, seed=3).load_state_dict(state)
    with pytest.raises(DataError, match="fall into other buckets or repeat other counts"):
        BucketBatchSampler(keys, batch_size=2, seed=3, repeats=[1] + [0] * 7).load_state_dict(state)
    old = {key: state[key] for key in ("epoch", "position", "seed", "num_items")}  # written before this check
    BucketBatchSampler(keys, batch_size=1, seed=3).load_state_dict(old)


# --- 3. init_lora rank, before the model loads ----------------------------------------------------------------
@needs_tiny
def test_an_init_lora_above_lora_rank_is_refused_before_caching_and_by_check(workspace, trained, no_caching):
    """Before: `check` passed it and `train` built the caches and loaded the model, then refused it."""
    from longcat_tuner.commands.check import init_lora_problem
    from longcat_tuner.train.trainer import train

    lora = trained / "longcat_lora.safetensors"  # rank 4
    with pytest.raises(CheckpointError, match=r"has rank 4, above lora_rank 2; set lora_rank >= 4"):
        train(make_config(workspace, "init-rank", lora_rank=2, init_lora=str(lora)), progress=False)
    problem = init_lora_problem(lora, ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                                       "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3"], TINY, 2)
    assert problem and problem.startswith("init_lora: ") and "above lora_rank 2" in problem
    assert init_lora_problem(lora, ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
                                    "cross_attn.proj", "ffn.w1", "ffn.w2", "ffn.w3"], TINY, 8) is None


# --- 4. lora_rank against the adapted layers: one rule for check and train ----------------------------------------
@pytest.mark.parametrize("targets,rank,narrowest", [
    (["final_layer.linear"], 128, "final_layer.linear: 256 in, 64 out"),  # top level: skipped by check before
    (["blocks.1.attn.qkv"], 300, "blocks.1.attn.qkv: 256 in, 768 out"),  # one block's layer: skipped before
    (["attn.qkv", "adaLN_modulation.1"], 100, "adaLN_modulation.1: 64 in, 1536 out"),
])
@needs_tiny
def test_check_names_a_rank_wider_than_any_adapted_layer_form(targets, rank, narrowest):
    from longcat_tuner.model.inspect import inspect_model

    problems = inspect_model(TINY, lora_rank=rank, lora_targets=targets).problems
    assert any(f"lora_rank {rank} is larger than the narrowest adapted layer ({narrowest})" in p for p in problems)
    assert not inspect_model(TINY, lora_rank=16, lora_targets=targets).problems


@needs_tiny
def test_train_refuses_the_rank_check_refuses_before_caching(workspace, no_caching):
    """Before: `train` injected rank-128 adapters on final_layer.linear (64 outputs) and trained."""
    from longcat_tuner.train.trainer import train

    with pytest.raises(ConfigError, match=r"lora_rank 128 is larger than the narrowest adapted layer "
                                          r"\(final_layer.linear: 256 in, 64 out\).*at most 64"):
        train(make_config(workspace, "wide", lora_rank=128, lora_targets=["final_layer.linear"]), progress=False)


# --- 5. validation sizes against the DiT's patch ------------------------------------------------------------------
def _model_with_patch(folder: Path, patch: tuple[int, int, int]) -> Path:
    from longcat_tuner.model.config import DiTConfig

    (folder / "dit").mkdir(parents=True, exist_ok=True)
    config = DiTConfig(depth=1, hidden_size=64, num_heads=2, patch_size=patch)
    (folder / "dit" / "config.json").write_text(json.dumps(config.to_dict()))
    return folder


def _validation(**keys):
    values = {"validation_resolution": "48x80", "validation_using_datasets": True, "validation_prompt": None,
              "validation_max_samples": 4, "aspect_bucket_alignment": 16}
    return types.SimpleNamespace(**{**values, **keys})


def test_check_tests_validation_sizes_against_the_patch(tmp_path):
    """Before: 48x80 (a multiple of 16) passed `check` with a (1, 4, 4) patch; every validation then failed."""
    from longcat_tuner.commands.check import validation_patch_problem
    from longcat_tuner.config.datasets import load_datasets
    from longcat_tuner.data.backends import plan_data

    workspace = write_paired_workspace(tmp_path / "data", train_clips=1, eval_clips=1, frames=5, size=48)
    plan = plan_data(load_datasets(workspace / "multidatabackend.json"), eval_dataset_id="val", alignment=16, seed=0)
    wide, release = _model_with_patch(tmp_path / "p4", (1, 4, 4)), _model_with_patch(tmp_path / "p2", (1, 2, 2))
    problem = validation_patch_problem(_validation(), plan, wide)
    assert problem == ("validation_resolution 48x80: 48x80 is not a multiple of 32x32 (height x width), which this "
                       "checkpoint's patch_size (1, 4, 4) needs (the VAE's 8 x the patch), so every validation would "
                       "fail; set it to multiples of 32x32 (e.g. 64x96)")
    assert validation_patch_problem(_validation(), plan, release) is None
    assert validation_patch_problem(_validation(validation_resolution="64x96"), plan, wide) is None
    # A class follows each start frame (48x48 here) onto the 16 px grid: 48 high, which the 4x4 patch cannot take.
    problem = validation_patch_problem(_validation(validation_resolution="48p"), plan, wide)
    assert problem and "validation_resolution 48p: the validation video of eval sample" in problem
    assert "or aspect_bucket_alignment to a multiple of 32" in problem
    # Text-to-video validation is sized by the setting alone; no validation at all checks nothing.
    assert "48x80 is not a multiple" in validation_patch_problem(
        _validation(validation_using_datasets=False, validation_prompt="a cat"), plan, wide)
    assert validation_patch_problem(_validation(validation_using_datasets=False), plan, wide) is None


@needs_tiny
def test_train_refuses_a_validation_size_the_patch_cannot_take_before_caching(workspace, no_caching, monkeypatch):
    from longcat_tuner.model.config import DiTConfig
    from longcat_tuner.train import trainer

    real = DiTConfig.from_file(TINY / "dit" / "config.json")
    monkeypatch.setattr(trainer, "_dit_config", lambda config: dataclasses.replace(real, patch_size=(1, 4, 4)),
                        raising=False)
    with pytest.raises(ConfigError, match=r"validation_resolution 48x80: 48x80 is not a multiple of 32x32"):
        trainer.train(make_config(workspace, "patch", validation_resolution="48x80"), progress=False)
    with pytest.raises(AssertionError, match="reached the cache stage"):  # 64x64 fits: on to the caches
        trainer.train(make_config(workspace, "patch", validation_resolution="64x64"), progress=False)

