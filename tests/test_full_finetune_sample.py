"""A full fine-tune (`model_type: full`) samples: `train` writes only `output_dir/dit/`, and records the base model
in `output_dir/base_model.json`, so `sample --model output_dir` (or `--model BASE --dit output_dir/dit`) takes the
text encoder, tokenizer and VAE from the base. Before, `sample --model output_dir` listed the missing
text_encoder/ vae/ tokenizer/ as a damaged download, and the user had to assemble a model folder by hand.

End to end on the CPU with the demo's tiny random model: a few full fine-tune steps, then sampling through the CLI
must differ from the base model's video and equal loading the fine-tuned weights by hand."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from longcat_tuner.cli import main as cli_main

SAMPLE_ARGS = ["--prompt", "a red square moves right", "--frames", "5", "--resolution", "32x32", "--steps", "2",
               "--guidance", "3.0", "--seed", "7"]


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """(workspace, base model folder, output_dir) of a 2-step full fine-tune of the demo's tiny model."""
    from longcat_tuner.commands.demo import write_demo
    from longcat_tuner.config.training import TrainConfig
    from longcat_tuner.train.trainer import train

    root = tmp_path_factory.mktemp("full")
    config = write_demo(root, steps=2, frames=5, height=32, width=32, train_clips=2, eval_clips=1, extra_config={
        "model_type": "full", "learning_rate": 1e-2, "lr_warmup_steps": 0, "validation_step_interval": None,
        "checkpoint_step_interval": None, "validation_num_inference_steps": 1, "validation_max_samples": 1})
    result = train(TrainConfig.from_file(config), progress=False)
    assert result.status == "completed"
    return root, root / "model", Path(result.run_dir)


@pytest.fixture()
def captured(monkeypatch):
    """The decoded videos (float tensors, before the mp4's rounding) of each `sample` run, in order."""
    import longcat_tuner.generate as generation

    videos = []
    real = generation.generate

    def recording(*args, **kwargs):
        result = real(*args, **kwargs)
        videos.append(result.video.clone())
        return result

    monkeypatch.setattr(generation, "generate", recording)
    return videos


def sample(*args: str, output: Path) -> int:
    return cli_main(["sample", *args, *SAMPLE_ARGS, "--output", str(output)])


def test_train_records_the_base_model_beside_the_dit(finetune):
    _, base, out = finetune
    assert sorted(p.name for p in (out / "dit").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    pointer = json.loads((out / "base_model.json").read_text())
    assert pointer["base_model"] == str(base.resolve()) and pointer["dit"] == "dit" and pointer["step"] == 2
    assert pointer["attention_implementation"] == "auto"
    assert not (out / "text_encoder").exists() and not (out / "vae").exists()  # nothing copied


def test_sampling_a_full_fine_tune_uses_its_weights_and_the_bases_encoders(finetune, captured, tmp_path, capsys):
    from safetensors.torch import load_file

    from longcat_tuner import TextEncoder, VideoVAE, load_dit
    from longcat_tuner.generate import generate

    root, base, out = finetune
    image = root / "data" / "val" / "start-frames" / "clip_000.png"
    assert sample("--model", str(out), "--image", str(image), output=tmp_path / "pointer.mp4") == 0
    err = capsys.readouterr().err
    assert f"model: DiT from {out / 'dit'}; text encoder, tokenizer and VAE from the base model {base.resolve()}" in err
    assert sample("--model", str(base), "--dit", str(out / "dit"), "--image", str(image), output=tmp_path / "dit.mp4") == 0
    assert sample("--model", str(out / "dit"), "--image", str(image), output=tmp_path / "dit-as-model.mp4") == 0
    assert sample("--model", str(base), "--image", str(image), output=tmp_path / "base.mp4") == 0
    pointer, explicit, dit_as_model, base_video = captured
    assert all((tmp_path / name).is_file() for name in ("pointer.mp4", "dit.mp4", "dit-as-model.mp4", "base.mp4"))
    assert torch.equal(pointer, explicit) and torch.equal(pointer, dit_as_model)
    assert (pointer - base_video).abs().max() > 1e-3  # the fine-tuned weights are what sampled

    # By hand: the base DiT with the fine-tune's state dict loaded over it, the base's encoders, the same call.
    from longcat_tuner.data.images import prepare_start_frame, read_image
    from longcat_tuner.media import image_to_tensor

    dit = load_dit(base)
    tuned = load_file(str(out / "dit" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(tuned[k], v) for k, v in dit.state_dict().items())
    dit.load_state_dict(tuned)
    encoder = TextEncoder.from_pretrained(base)
    embeds, mask = encoder.encode([SAMPLE_ARGS[1]])
    negative, negative_mask = encoder.encode([""])
    start = image_to_tensor(prepare_start_frame(read_image(image), 32, 32))
    by_hand = generate(dit, VideoVAE.from_pretrained(base), text_embeds=embeds, text_mask=mask, negative_embeds=negative,
                       negative_mask=negative_mask, height=32, width=32, frames=5, start_frame=start, steps=2,
                       guidance=3.0, seed=7)
    assert torch.equal(by_hand.video, pointer)


def test_a_dit_folder_under_another_name_samples_as_dit(finetune, captured, tmp_path):
    """`--dit` takes any folder whose config.json declares the DiT (a renamed copy, an export), not only `dit/`."""
    _, base, out = finetune
    renamed = tmp_path / "my-finetune-step2"
    shutil.copytree(out / "dit", renamed)
    assert sample("--model", str(base), "--dit", str(renamed), output=tmp_path / "a.mp4") == 0
    assert sample("--model", str(out), output=tmp_path / "b.mp4") == 0
    assert torch.equal(captured[0], captured[1])


def error_of(capsys, *args: str, tmp_path: Path) -> str:
    assert sample(*args, output=tmp_path / "never.mp4") == 2
    assert not (tmp_path / "never.mp4").exists()
    return capsys.readouterr().err


def test_a_dit_of_another_size_or_base_is_refused_naming_both(finetune, tmp_path, capsys):
    from longcat_tuner.model.random_checkpoint import write_random_checkpoint

    _, base, out = finetune
    other = tmp_path / "small"
    write_random_checkpoint(other, size="small")
    err = error_of(capsys, "--model", str(other), "--dit", str(out / "dit"), tmp_path=tmp_path)
    assert f"the DiT in {out / 'dit'} does not belong to the base model {other}: hidden_size 128 (base 256)" in err
    assert f"{out / 'base_model.json'} records that it was trained from {base.resolve()}" in err
    assert "give that folder as --model" in err
    # Another base of the same size (a copy, another variant): it runs, with a warning naming the recorded base.
    from longcat_tuner.model.sources import resolve_model

    twin = tmp_path / "twin"
    shutil.copytree(base, twin)
    sources = resolve_model(twin, out / "dit")
    assert sources.root == twin and sources.dit == out / "dit" and sources.fine_tuned
    assert sources.warning.startswith(f"warning: {out / 'base_model.json'} records that this DiT was trained from "
                                      f"{base.resolve()}, but the text encoder, tokenizer and VAE come from {twin}")
    assert resolve_model(base, out / "dit").warning is None
    # The fine-tune's own output_dir with a DiT of another size given as --dit
    err = error_of(capsys, "--model", str(out), "--dit", str(other / "dit"), tmp_path=tmp_path)
    assert f"the DiT in {other / 'dit'} does not belong to the base model {base.resolve()}" in err


def test_an_incomplete_or_wrong_dit_folder_is_named_with_the_fix(finetune, tmp_path, capsys):
    _, base, out = finetune
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(out / "dit" / "diffusion_pytorch_model.safetensors", cut)  # the save stopped before config.json
    err = error_of(capsys, "--model", str(base), "--dit", str(cut), tmp_path=tmp_path)
    assert f"--dit {cut} has no config.json: the DiT was not completely written" in err
    assert "--resume_from_checkpoint latest" in err

    truncated = tmp_path / "truncated"
    shutil.copytree(out / "dit", truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    err = error_of(capsys, "--model", str(base), "--dit", str(truncated), tmp_path=tmp_path)
    assert f"{weights} is truncated" in err

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(out / "dit" / "config.json", no_weights)
    err = error_of(capsys, "--model", str(base), "--dit", str(no_weights), tmp_path=tmp_path)
    assert f"--dit {no_weights} has config.json but no diffusion_pytorch_model.safetensors" in err

    err = error_of(capsys, "--model", str(base), "--dit", str(base / "vae"), tmp_path=tmp_path)
    assert f"--dit {base / 'vae'}: its config.json configures AutoencoderKLWan, not the LongCat-Video DiT" in err
    err = error_of(capsys, "--model", str(base), "--dit", str(tmp_path / "nowhere"), tmp_path=tmp_path)
    assert f"--dit {tmp_path / 'nowhere'} does not exist; give a full fine-tune's DiT folder (output_dir/dit)" in err

    checkpoint = out / "checkpoints" / "checkpoint-000002"
    err = error_of(capsys, "--model", str(base), "--dit", str(checkpoint), tmp_path=tmp_path)
    assert f"--dit {checkpoint} is a training checkpoint" in err and f"into {out / 'dit'}" in err


def test_a_dit_without_its_pointer_or_with_a_moved_base_names_the_dit_form(finetune, tmp_path, capsys):
    _, base, out = finetune
    bare = tmp_path / "copied-run"
    shutil.copytree(out / "dit", bare / "dit")  # an output_dir from before base_model.json, or copied without it
    err = error_of(capsys, "--model", str(bare), tmp_path=tmp_path)
    assert f"--model {bare} holds a DiT but no text_encoder/, tokenizer/, vae/" in err
    assert f"--model /path/to/LongCat-Video --dit {bare / 'dit'}" in err
    err = error_of(capsys, "--model", str(bare), "--dit", str(out / "dit"), tmp_path=tmp_path)
    assert f"--model {bare} holds a DiT but no text_encoder/" in err and "must be the base model" in err

    (bare / "base_model.json").write_text(json.dumps({"base_model": str(tmp_path / "moved-away"), "dit": "dit"}))
    err = error_of(capsys, "--model", str(bare), tmp_path=tmp_path)
    assert f"{bare / 'base_model.json'} records the base model {tmp_path / 'moved-away'}, which does not exist" in err
    assert f"--dit {bare / 'dit'}" in err and "write its folder into" in err
    (bare / "base_model.json").write_text("{not json")
    err = error_of(capsys, "--model", str(bare), tmp_path=tmp_path)
    assert f"{bare / 'base_model.json'} cannot be read" in err and f"--dit {bare / 'dit'}" in err

    # a relative base_model is read against the pointer's folder; a wrong size there is still refused
    (bare / "base_model.json").write_text(json.dumps({"base_model": str(Path("..") / "nothing-here")}))
    err = error_of(capsys, "--model", str(bare), tmp_path=tmp_path)
    assert f"records the base model {bare / '..' / 'nothing-here'}, which does not exist" in err


def test_a_new_run_sets_the_pointer_aside_with_the_dit(tmp_path):
    from longcat_tuner.train.outputs import earlier_outputs, set_aside_earlier_run

    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text("{}")
    (tmp_path / "base_model.json").write_text("{}")
    assert earlier_outputs(tmp_path) == ["dit/ (a full fine-tune)"]
    aside = set_aside_earlier_run(tmp_path)
    assert (aside / "base_model.json").is_file() and (aside / "dit" / "config.json").is_file()
    assert not (tmp_path / "base_model.json").exists()


def test_the_recorded_attention_is_the_default(finetune, tmp_path):
    from longcat_tuner.commands.sample import fine_tune_attention
    from longcat_tuner.model.sources import resolve_model

    _, base, out = finetune
    assert fine_tune_attention(resolve_model(out)) == "auto"
    pointer = json.loads((out / "base_model.json").read_text())
    run = tmp_path / "run"
    shutil.copytree(out / "dit", run / "dit")
    (run / "base_model.json").write_text(json.dumps({**pointer, "attention_implementation": "sdpa"}))
    assert fine_tune_attention(resolve_model(run)) == "sdpa"
    assert fine_tune_attention(resolve_model(base)) is None  # not a fine-tune


# --- the web UI's preview ------------------------------------------------------------------------------------
def test_the_preview_lists_and_samples_a_full_fine_tune(finetune, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("multipart", reason="python-multipart (the server extra) is needed for uploads")
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from PIL import Image

    from longcat_tuner.server.deps import ServerState, get_state
    from longcat_tuner.server.guard import add_error_handlers
    from longcat_tuner.server.routes import previews
    from longcat_tuner.server.settings import ServerSettings

    root, base, out = finetune
    settings = ServerSettings(token="unused", data_dir=tmp_path / "data", allowed_roots=(root,), cwd=root,
                              cli=(sys.executable, "-c", "print('sampled')"))
    state = ServerState.create(settings)
    app = FastAPI()
    add_error_handlers(app)
    app.include_router(previews.router)
    app.dependency_overrides[get_state] = lambda: state
    client = TestClient(app)

    listed = client.get("/api/models").json()
    assert [(m["path"], m["kind"], m["base_model"], m["step"]) for m in listed] == [
        (str(out), "full", str(base.resolve()), 2)]

    Image.new("RGB", (32, 32)).save(state.uploads / ("a" * 32 + ".png"))
    body = {"upload": "a" * 32, "prompt": "x", "model": str(out), "frames": 5, "steps": 1, "resolution": "32x32"}
    started = client.post("/api/previews", json=body)
    assert started.status_code == 200, started.text
    argv = state.store.get("preview", started.json()["id"]).argv
    assert argv[argv.index("--model") + 1] == str(out) and "--dit" not in argv
    with_dit = client.post("/api/previews", json={**body, "model": str(base), "dit": str(out / "dit")})
    argv = state.store.get("preview", with_dit.json()["id"]).argv
    assert argv[argv.index("--dit") + 1] == str(out / "dit")

    # the fast preview's distilled LoRA is the base model's
    missing = client.post("/api/previews", json={**body, "fast": True})
    assert missing.status_code == 404 and str(base.resolve() / "lora" / "cfg_step_lora.safetensors") in missing.text

    other = root / "other-model"
    shutil.copytree(base, other)
    (other / "dit" / "config.json").write_text(
        json.dumps({**json.loads((base / "dit" / "config.json").read_text()), "depth": 3}))
    wrong = client.post("/api/previews", json={**body, "model": str(other), "dit": str(out / "dit")})
    assert wrong.status_code == 422 and "does not belong to the base model" in wrong.text

    outside = tmp_path / "outside-run"  # a pointer naming a base outside the allowed folders
    inside = root / "pointing-out"
    shutil.copytree(out / "dit", inside / "dit")
    shutil.copytree(base, outside)
    (inside / "base_model.json").write_text(json.dumps({"base_model": str(outside), "dit": "dit"}))
    refused = client.post("/api/previews", json={**body, "model": str(inside)})
    assert refused.status_code == 403 and "base model" in refused.text

    # The DiT of a run folder inside is a symlink to a DiT outside the allowed folders: refused as the base is.
    linked = root / "linked-out"
    linked.mkdir()
    (linked / "dit").symlink_to(outside / "dit", target_is_directory=True)
    (linked / "base_model.json").write_text(json.dumps({"base_model": str(base), "dit": "dit"}))
    refused = client.post("/api/previews", json={**body, "model": str(linked)})
    assert refused.status_code == 403 and "dit" in refused.text and str(outside / "dit") in refused.text
    # An over-long recorded base (or DiT name) is a 422 naming the file, not a 500 from the file system.
    for pointer in ({"base_model": "/" + "x" * 300, "dit": "dit"}, {"base_model": str(base), "dit": "d" * 300}):
        (inside / "base_model.json").write_text(json.dumps(pointer))
        too_long = client.post("/api/previews", json={**body, "model": str(inside)})
        assert too_long.status_code == 422 and "too long" in too_long.text and "base_model.json" in too_long.text
