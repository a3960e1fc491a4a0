"""Hostile LoRA files, config files and output paths: each is refused with a message naming the file and the
fix (never a traceback, never a pickle unpickled, never a silent load of a broken LoRA, nothing overwritten)."""
from __future__ import annotations

import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from longcat_tuner import load_dit, load_lora
from longcat_tuner.cli import main
from longcat_tuner.config.training import TrainConfig
from longcat_tuner.errors import CheckpointError, ConfigError
from longcat_tuner.model import lora_formats as lf
from longcat_tuner.model.lora import init_lora_from_file, inject_lora, lora_modules, remove_lora

RANK = 4


@pytest.fixture(scope="module")
def dit(tiny_checkpoint):
    return load_dit(tiny_checkpoint)


def _comfy(dit, paths=("blocks.0.attn.proj", "blocks.0.ffn.w1"), dtype=torch.float32, alpha=None):
    """A kohya/wan2gp-style LoRA on `paths` of the tiny DiT (random weights), with `.alpha` when given."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for path in paths:
        linear = dit.get_submodule(path)
        base = f"diffusion_model.{path}"
        tensors[f"{base}.lora_down.weight"] = torch.randn(RANK, linear.in_features, generator=gen).to(dtype)
        tensors[f"{base}.lora_up.weight"] = torch.randn(linear.out_features, RANK, generator=gen).to(dtype)
        if alpha is not None:
            tensors[f"{base}.alpha"] = alpha.clone()
    return tensors


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _unreadable(tmp_path, tiny_checkpoint, kind):
    path = tmp_path / f"{kind}.safetensors"
    good = (tiny_checkpoint / "lora" / "tiny_lora.safetensors").read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "huge_header":
        path.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif kind == "header_not_json":
        path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    elif kind == "torch_save":
        torch.save({"lora_down.weight": torch.zeros(2, 2)}, str(path))
    elif kind == "raw_pickle":
        path.write_bytes(pickle.dumps({"x": _RunsCode(tmp_path / "unpickled")}))
    elif kind == "folder":
        path.mkdir()
        (path / "inner.safetensors").write_bytes(good)
    return path


UNREADABLE = {
    "empty": "0 bytes",
    "truncated": "is truncated",
    "huge_header": "header length is 1099511627776 bytes",
    "header_not_json": "damaged safetensors header",
    "torch_save": "PyTorch pickle",
    "raw_pickle": "never unpickles",
    "folder": "is a folder, not a file.*inner.safetensors",
    "missing": "does not exist",
}


@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_lora_files_are_named_with_the_cause(dit, tiny_checkpoint, tmp_path, kind, capsys):
    path = _unreadable(tmp_path, tiny_checkpoint, kind)
    with pytest.raises(CheckpointError, match=UNREADABLE[kind]) as err:
        load_lora(dit, path)
    assert str(path) in str(err.value)
    inject_lora(dit, rank=RANK, name="default")
    try:
        with pytest.raises(CheckpointError, match=UNREADABLE[kind]):
            init_lora_from_file(dit, path)
    finally:
        remove_lora(dit)
    assert main(["export-lora", str(path), str(tmp_path / "out.safetensors")]) == 2
    assert UNREADABLE[kind].split(".*")[0] in capsys.readouterr().err
    assert not (tmp_path / "unpickled").exists()  # the pickle was never loaded
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case,message", [
    ("nan_up", r"NaN or Inf values \(diffusion_model.blocks.0.attn.proj.lora_up.weight\)"),
    ("inf_down", r"NaN or Inf values \(diffusion_model.blocks.0.ffn.w1.lora_down.weight\)"),
    ("nan_alpha", r"NaN or Inf values \(diffusion_model.blocks.0.attn.proj.alpha"),
    ("zero_alpha", "alpha 0, so the LoRA would change nothing"),
    ("int8", "hold int8 values, not floats"),
    ("rank0", "has rank 0"),
    ("scalar_down", r"LoRA weights are not matrices \(down \(\), "),
])
def test_broken_lora_values_are_refused(dit, tmp_path, case, message):
    tensors = _comfy(dit, alpha=torch.tensor(float(RANK)))
    if case == "nan_up":
        tensors["diffusion_model.blocks.0.attn.proj.lora_up.weight"][3, 1] = float("nan")
    elif case == "inf_down":
        tensors["diffusion_model.blocks.0.ffn.w1.lora_down.weight"][0, 0] = float("-inf")
    elif case == "nan_alpha":
        tensors["diffusion_model.blocks.0.attn.proj.alpha"] = torch.tensor(float("nan"))
    elif case == "zero_alpha":
        tensors["diffusion_model.blocks.0.attn.proj.alpha"] = torch.tensor(0.0)
    elif case == "int8":
        tensors = {k: (v * 10).to(torch.int8) if k.endswith(".weight") else v for k, v in tensors.items()}
    elif case == "rank0":
        tensors["diffusion_model.blocks.0.attn.proj.lora_down.weight"] = torch.zeros(0, 256)
        tensors["diffusion_model.blocks.0.attn.proj.lora_up.weight"] = torch.zeros(256, 0)
    elif case == "scalar_down":  # before: an IndexError traceback
        tensors["diffusion_model.blocks.0.attn.proj.lora_down.weight"] = torch.tensor(1.0)
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=message):
        load_lora(dit, path)
    assert not lora_modules(dit)  # nothing was attached


def test_low_precision_and_alpha_shapes_load_at_the_same_strength(dit, tmp_path):
    """fp8 / bf16 weights and alpha as a 0-d or a 1-element tensor (int alpha too) load as float32 would."""
    want = {p: a.delta() for p, a in lf.parse_lora(_comfy(dit, alpha=torch.tensor(2.0))).items()}
    for name, dtype, alpha in [("bf16", torch.bfloat16, torch.tensor(2.0)), ("fp8", torch.float8_e4m3fn, torch.tensor([2.0])),
                               ("int_alpha", torch.float32, torch.tensor(2))]:
        tensors = _comfy(dit, dtype=dtype, alpha=alpha)
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        adapters, _ = lf.read_lora_file(tmp_path / f"{name}.safetensors")
        exact = {k: v.float() for k, v in tensors.items()}
        reference = {p: a.delta() for p, a in lf.parse_lora(exact).items()}
        for path, adapter in adapters.items():
            assert adapter.scale == pytest.approx(2.0 / RANK)
            torch.testing.assert_close(adapter.delta(), reference[path])
            if dtype == torch.float32:
                torch.testing.assert_close(adapter.delta(), want[path])


def test_init_lora_refuses_shapes_that_do_not_fit_the_layer(dit, tmp_path):
    """Before: a down matrix [r, 1] was broadcast into [r, in] silently; [r, in + 3] was a RuntimeError."""
    for name, width in (("broadcastable", 1), ("wider", 259)):
        path = tmp_path / f"{name}.safetensors"
        save_file({"diffusion_model.blocks.0.attn.proj.lora_down.weight": torch.ones(RANK, width),
                   "diffusion_model.blocks.0.attn.proj.lora_up.weight": torch.ones(256, RANK)}, str(path))
        inject_lora(dit, rank=8, name="default")
        try:
            with pytest.raises(CheckpointError, match=r"blocks.0.attn.proj.*do not fit the layer \[256, 256\]"):
                init_lora_from_file(dit, path)
        finally:
            remove_lora(dit)


def test_sample_reads_lora_files_before_loading_models(tiny_checkpoint, tmp_path, capsys):
    bad = _unreadable(tmp_path, tiny_checkpoint, "torch_save")
    # The model folder does not exist: the LoRA error comes first, so no model was loaded before it.
    argv = ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--output", str(tmp_path / "o.mp4")]
    assert main(argv + ["--lora", str(bad)]) == 2
    assert "PyTorch pickle" in capsys.readouterr().err
    good = str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")
    assert main(argv + ["--lora", good, "--lora-multiplier", "1", "--lora-multiplier", "2"]) == 2
    assert "2 --lora-multiplier values for 1 --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv + ["--lora", good, "--lora-multiplier", "nan"])
    assert "finite number" in capsys.readouterr().err


def test_export_lora_never_replaces_a_file_unless_told(tiny_checkpoint, tmp_path, capsys):
    source = tmp_path / "mine.safetensors"
    source.write_bytes((tiny_checkpoint / "lora" / "tiny_lora.safetensors").read_bytes())
    kept = tmp_path / "kept.safetensors"
    kept.write_text("keep me")
    assert main(["export-lora", str(source), str(kept)]) == 2
    assert "already exists" in capsys.readouterr().err and kept.read_text() == "keep me"
    before = source.read_bytes()
    assert main(["export-lora", str(source), str(source), "--format", "wan2gp"]) == 2
    assert "is the input file" in capsys.readouterr().err and source.read_bytes() == before
    assert main(["export-lora", str(source), str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["export-lora", str(source), str(kept), "--overwrite"]) == 0
    assert set(lf.read_lora_file(kept)[0]) == set(lf.read_lora_file(source)[0])


def test_export_lora_refuses_its_input_as_output_even_with_overwrite(tiny_checkpoint, tmp_path, capsys):
    # Before: `export-lora IN IN --overwrite` replaced the input with another layout under the same name.
    source = tmp_path / "mine.safetensors"
    source.write_bytes((tiny_checkpoint / "lora" / "tiny_lora.safetensors").read_bytes())
    (tmp_path / "link.safetensors").symlink_to(source)
    before = source.read_bytes()
    for same in (str(source), str(tmp_path / "." / "mine.safetensors"), str(tmp_path / "link.safetensors")):
        assert main(["export-lora", str(source), same, "--format", "wan2gp", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "is the input file" in err and "give another OUTPUT" in err
    assert source.read_bytes() == before


def test_export_lora_writes_only_a_safetensors_name(tiny_checkpoint, tmp_path, capsys):
    source = str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")
    for name in ("a.txt", "a", "a.safetensors.bak"):
        assert main(["export-lora", source, str(tmp_path / name)]) == 2
        assert "must end in .safetensors" in capsys.readouterr().err
        assert not (tmp_path / name).exists()
    assert main(["export-lora", source, str(tmp_path / "a.SafeTensors")]) == 0  # the case of the suffix is free


@pytest.mark.parametrize("which", ["export-lora INPUT", "export-lora OUTPUT", "plan --config"])
def test_export_lora_and_plan_name_an_over_long_path(tiny_checkpoint, tmp_path, capsys, which):
    long = str(tmp_path / ("x" * 300))
    lora = str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")
    argv = {"export-lora INPUT": ["export-lora", long + ".safetensors", str(tmp_path / "out.safetensors")],
            "export-lora OUTPUT": ["export-lora", lora, long + ".safetensors"],
            "plan --config": ["plan", "--config", long + ".json"]}[which]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {which.split()[1]} ") and "too long for the file system" in err
    assert len(err.strip().splitlines()) == 1


def _config(tmp_path, **extra):
    return {"pretrained_model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "run"),
            "data_backend_config": str(tmp_path / "datasets.json"), **extra}


def test_config_file_encodings_and_shapes(tmp_path):
    text = json.dumps(_config(tmp_path, lora_rank=16))
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert TrainConfig.from_file(bom).lora_rank == 16  # Windows editors write a byte-order mark
    cases = {
        "utf16.json": (text.encode("utf-16"), "not UTF-8 text"),
        "empty.json": (b" \n", "is empty"),
        "twice.json": (b'{"lora_rank": 4, "lora_rank": 8}', "key 'lora_rank' is given twice"),
        "comma.json": (text[:-1].encode() + b",\n}", "trailing comma"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=message) as err:
            TrainConfig.from_file(tmp_path / name)
        assert name in str(err.value)
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a JSON file"):
        TrainConfig.from_file(tmp_path / "folder.json")


def test_a_settings_path_that_is_a_pipe_a_device_or_huge_is_refused_unread(tmp_path):
    """Before: `--config` naming a FIFO waited forever, /dev/zero filled the memory (MemoryError traceback), and a
    video given by mistake was read whole before its first byte was refused."""
    from longcat_tuner.config.datasets import load_datasets

    # /dev/null stands for every non-regular file (a pipe would hang this test were the fix undone).
    with pytest.raises(ConfigError, match="/dev/null is not a regular file"):
        TrainConfig.from_file("/dev/null")
    big = tmp_path / "clip.mp4"
    with open(big, "wb") as handle:
        handle.truncate(17 * 2**20)  # sparse: nothing written
    for read in (TrainConfig.from_file, load_datasets):
        with pytest.raises(ConfigError, match="clip.mp4 is 17 MiB, too large for a settings file"):
            read(big)


def test_output_dir_that_is_a_file_is_named_and_kept(tmp_path):
    from longcat_tuner.train import run_lock

    blocker = tmp_path / "results"
    blocker.write_text("precious")
    for output_dir in (blocker, blocker / "run"):
        with pytest.raises(ConfigError, match=f"{blocker} is a file, not a folder"):
            run_lock.acquire(output_dir)
    assert blocker.read_text() == "precious"


def test_train_names_a_broken_init_lora_before_the_data(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "start.safetensors"
    tensors = {k: v.clone() for k, v in _comfy(load_dit(tiny_checkpoint), paths=("blocks.0.ffn.w1",)).items()}
    tensors["diffusion_model.blocks.0.ffn.w1.lora_up.weight"][0, 0] = float("nan")
    save_file(tensors, str(bad))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(tmp_path, pretrained_model_name_or_path=str(tiny_checkpoint), init_lora=str(bad))))
    assert main(["train", "--config", str(config)]) == 2  # datasets.json does not exist: the LoRA is read first
    assert f"{bad}: 1 tensors hold NaN or Inf" in capsys.readouterr().err


def test_resume_from_a_lora_file_points_at_init_lora(tmp_path):
    from longcat_tuner.train.checkpoint import resolve_resume_path

    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="set init_lora to it instead"):
        resolve_resume_path(str(lora), tmp_path / "checkpoints")


def test_pickled_model_weights_are_named_not_unpickled(tiny_checkpoint, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint / "dit", model / "dit")
    weights = model / "dit" / "diffusion_pytorch_model.safetensors"
    weights.chmod(0o644)
    weights.write_bytes(pickle.dumps({"x": _RunsCode(tmp_path / "unpickled")}))
    with pytest.raises(CheckpointError, match="is a PyTorch pickle"):
        load_dit(model)
    assert not (tmp_path / "unpickled").exists()


def test_a_safetensors_header_that_starts_like_a_pickle_still_loads(dit, tmp_path):
    """A header 640 (0x280) bytes long makes the file start with b"\\x80\\x02", a pickle's first bytes."""
    path = tmp_path / "lora.safetensors"
    tensors = _comfy(dit, paths=("blocks.0.ffn.w1",))
    pad = 1
    for _ in range(4):
        save_file(tensors, str(path), metadata={"pad": "x" * pad})
        (length,) = struct.unpack("<Q", path.read_bytes()[:8])
        pad += 640 - length
    assert path.read_bytes()[:2] == b"\x80\x02"
    assert set(lf.read_lora_file(path)[0]) == {"blocks.0.ffn.w1"}


def test_dataset_config_that_is_a_folder_is_named(tmp_path):
    from longcat_tuner.config.datasets import load_datasets

    (tmp_path / "multidatabackend.json").mkdir()
    with pytest.raises(ConfigError, match="multidatabackend.json is a folder"):
        load_datasets(tmp_path / "multidatabackend.json")


@pytest.mark.parametrize("header,message", [
    ('{"transformer.lora_alpha": "abc"}', "the alpha 'abc', not a number"),
    ('{"transformer.lora_alpha": [8]}', r"the alpha \[8\], not a number"),
    ('{"transformer.lora_alpha": NaN}', "has alpha nan"),
    ('{"transformer.lora_alpha": 1e400}', "has alpha inf"),
    ('{"transformer.lora_alpha": 8, "transformer.alpha_pattern": [1, 2]}', "alpha_pattern is not an object"),
])
def test_bad_peft_header_alpha_is_refused(dit, tmp_path, header, message):
    """Before: a string or list alpha was a ValueError/TypeError traceback, NaN or 1e400 loaded a NaN/inf LoRA."""
    path = tmp_path / "peft.safetensors"
    tensors = {k.replace("diffusion_model.", "transformer.").replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v
               for k, v in _comfy(dit, paths=("blocks.0.ffn.w1",)).items()}
    save_file(tensors, str(path), metadata={lf.PEFT_METADATA_KEY: header})
    with pytest.raises(CheckpointError, match=message):
        lf.read_lora_file(path)


def test_a_model_file_given_as_lora_is_refused_from_its_header(tiny_checkpoint, monkeypatch):
    """The DiT weights passed as a LoRA are refused by their key names before a tensor is read (a 27 GB file)."""
    import safetensors

    def no_reading(*args, **kwargs):
        raise AssertionError("tensors were read")

    monkeypatch.setattr(safetensors, "safe_open", no_reading)
    weights = tiny_checkpoint / "dit" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match=r"keys match no known LongCat LoRA layout: blocks.0.adaLN_modulation.1.bias"):
        lf.read_lora_file(weights)


def test_an_unusable_attention_recorded_in_a_lora_falls_back_with_a_warning(tiny_checkpoint, tmp_path, capsys):
    """Before: a header naming an unknown backend (or xformers where it is not installed) stopped `sample`."""
    from safetensors.torch import load_file

    from longcat_tuner.commands.sample import trained_attention

    path = tmp_path / "lora.safetensors"
    save_file(load_file(str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")), str(path),
              metadata={"attention_implementation": "bogus"})
    assert trained_attention([str(path)]) is None
    assert "trained with attention 'bogus'" in capsys.readouterr().err
    save_file(load_file(str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")), str(path),
              metadata={"attention_implementation": "sdpa"})
    assert trained_attention([str(path)]) == "sdpa"


def test_lora_targets_typos_are_refused_by_the_schema_as_the_model_would(dit, tmp_path):
    """Before: a target naming no layer was refused only after caching and loading the model."""
    from longcat_tuner.model.lora import match_targets
    from longcat_tuner.model.lora_names import unknown_targets

    candidates = ["attn.qkv", "qkv", "blocks.1.ffn.w1", "1.ffn.w1", "final_layer.linear", "linear", "mlp.2",
                  "adaLN_modulation.1", "attn.qkvv", "attn", "cross_attn", "blocks.1", "ffn", "y_proj.0", "proj"]
    for target in candidates:
        try:
            match_targets(dit, [target])
            model_ok = True
        except ConfigError:
            model_ok = False
        assert (target not in unknown_targets([target])) == model_ok, target
    with pytest.raises(ConfigError, match=r"lora_targets: \['attn.qkvv'\] match no linear layer"):
        TrainConfig.from_dict(_config(tmp_path, lora_targets=["attn.qkv", "attn.qkvv"]))


def test_sample_output_that_cannot_take_a_video_is_refused_first(tiny_checkpoint, tmp_path, capsys):
    """Before: a folder or a .txt name as --output was a ValueError traceback after sampling."""
    (tmp_path / "file").write_text("x")
    for output, message in ((tmp_path, "is a folder"), (tmp_path / "video.txt", "must end in .mp4"),
                            (tmp_path / "file" / "v.mp4", "is a file, not a folder")):
        argv = ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--output", str(output)]
        assert main(argv) == 2  # the model folder does not exist: the output was checked first
        assert message in capsys.readouterr().err


def test_blank_paths_are_refused_or_unset_not_the_config_folder(tmp_path):
    """Before: `output_dir: ""` became the config file's own folder (the run wrote beside config.json)."""
    for key in ("output_dir", "pretrained_model_name_or_path", "data_backend_config"):
        (tmp_path / "config.json").write_text(json.dumps(_config(tmp_path, **{key: ""})))
        with pytest.raises(ConfigError, match=f"{key}: empty; give a folder or file path"):
            TrainConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(_config(tmp_path, init_lora="", resume_from_checkpoint=" ")))
    config = TrainConfig.from_file(tmp_path / "config.json")
    assert config.init_lora is None and config.resume_from_checkpoint is None


def test_a_name_clash_attaches_nothing(dit, tmp_path):
    """Before: a clash found on a later layer left the earlier layers of the new file attached."""
    save_file(_comfy(dit, paths=("blocks.0.ffn.w1",)), str(tmp_path / "one.safetensors"))
    save_file(_comfy(dit, paths=("blocks.0.attn.proj", "blocks.0.ffn.w1")), str(tmp_path / "two.safetensors"))
    load_lora(dit, tmp_path / "one.safetensors", name="x")
    try:
        with pytest.raises(ConfigError, match="already attached"):
            load_lora(dit, tmp_path / "two.safetensors", name="x")
        assert set(lora_modules(dit, "x")) == {"blocks.0.ffn.w1"}
    finally:
        remove_lora(dit)


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path):
    """Before: optimizer.pt / scheduler.pt / rng_state.pt were loaded with weights_only=False (code ran)."""
    from longcat_tuner.train import checkpoint as ckpt

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = ckpt.save_checkpoint(tmp_path, step=2, weights={"w": torch.zeros(2)}, optimizer_state=optimizer.state_dict(),
                                scheduler_state={"last_epoch": 2}, trainer_state={},
                                rng_state=ckpt.capture_rng_state({"g": torch.Generator().manual_seed(0)}))
    loaded = ckpt.load_checkpoint(path)  # our own files load (numpy RNG state included)
    assert loaded["scheduler"] == {"last_epoch": 2} and "numpy" in loaded["rng"]
    torch.save({"state": _RunsCode(tmp_path / "unpickled")}, str(path / ckpt.OPTIMIZER_FILE))
    with pytest.raises(CheckpointError, match="not written by longcat-tuner and is not loaded"):
        ckpt.load_checkpoint(path)
    assert not (tmp_path / "unpickled").exists()


def test_rng_state_pickled_under_the_other_numpy_major_resumes(tmp_path, monkeypatch):
    """numpy 1.x pickles its arrays through numpy.core.multiarray._reconstruct, numpy 2 through numpy._core: a
    checkpoint from before a numpy upgrade still resumes (it was refused as 'not written by longcat-tuner')."""
    import numpy as np

    from longcat_tuner.train import checkpoint as ckpt

    core = getattr(np, "_core", None) or np.core
    other = "numpy.core.multiarray" if core.__name__ == "numpy._core" else "numpy._core.multiarray"
    rng = ckpt.capture_rng_state({"g": torch.Generator().manual_seed(0)})
    monkeypatch.setattr(core.multiarray._reconstruct, "__module__", other)  # pickled by that name
    path = ckpt.save_checkpoint(tmp_path, step=1, weights={"w": torch.zeros(2)}, optimizer_state={},
                                scheduler_state={"last_epoch": 1}, trainer_state={}, rng_state=rng)
    monkeypatch.undo()
    assert other.encode() in _pickled_bytes(path / ckpt.RNG_FILE)
    loaded = ckpt.load_checkpoint(path)
    assert np.array_equal(loaded["rng"]["numpy"][1], rng["numpy"][1])


def _pickled_bytes(file) -> bytes:
    import zipfile

    with zipfile.ZipFile(file) as archive:
        return b"".join(archive.read(name) for name in archive.namelist() if name.endswith(".pkl"))


def test_check_names_a_missing_or_broken_init_lora(tmp_path, tiny_checkpoint, capsys):
    from tests.conftest import write_paired_workspace

    workspace = write_paired_workspace(tmp_path / "data", train_clips=1, eval_clips=1, frames=5, size=32)
    pickled = _unreadable(tmp_path, tiny_checkpoint, "torch_save")
    for init_lora, message in ((tmp_path / "none.safetensors", "does not exist"), (pickled, "PyTorch pickle")):
        config = tmp_path / "config.json"
        config.write_text(json.dumps(_config(tmp_path, data_backend_config=str(workspace / "multidatabackend.json"),
                                             eval_dataset_id="val", init_lora=str(init_lora))))
        assert main(["check", "--config", str(config), "--data-only"]) == 1
        err = capsys.readouterr().err
        assert "init_lora" in err and message in err


def test_outputs_that_cannot_be_written_are_named_not_a_traceback(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """Before: a read-only --output folder was an av.error.OSError traceback after sampling, and export-lora's
    a SafetensorError traceback; a disk that filled up during export-lora's write too."""
    import errno

    import safetensors.torch

    unwritable = "/proc/longcat-tuner-hostile"  # not creatable, even by root
    argv = ["sample", "--model", str(tmp_path / "no-model"), "--prompt", "x", "--output", f"{unwritable}/v.mp4"]
    assert main(argv) == 2  # the model folder does not exist: the output was checked first
    assert "the folder of --output /proc/longcat-tuner-hostile is not writable" in capsys.readouterr().err
    source = str(tiny_checkpoint / "lora" / "tiny_lora.safetensors")
    assert main(["export-lora", source, f"{unwritable}/x.safetensors"]) == 2
    assert "the folder of OUTPUT /proc/longcat-tuner-hostile is not writable" in capsys.readouterr().err

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["export-lora", source, str(tmp_path / "x.safetensors")]) == 2
    assert f"cannot write {tmp_path / 'x.safetensors'}: the disk is full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no partial file, no temporary


def test_a_video_that_cannot_be_written_after_sampling_is_named(tmp_path, monkeypatch):
    import errno

    import numpy as np

    from longcat_tuner import media
    from longcat_tuner.commands.sample import write_video_output

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(media, "write_mp4", full_disk)
    out = tmp_path / "v.mp4"
    with pytest.raises(ConfigError, match=f"cannot write --output {out}: the disk is full"):
        write_video_output(str(out), np.zeros((1, 16, 16, 3), np.uint8), fps=15)


@pytest.mark.parametrize("text", ['[]', '{"step": "two", "sampler": {"epoch": 0, "position": 2}}', '{"step": NaN}',
                                  '{"step": -5}', '{"step": 2, "sampler": []}', '{"step": 2, "world_size": [1]}'])
def test_a_damaged_trainer_state_is_named_not_a_traceback(tmp_path, text):
    """Before: a trainer_state.json that was a list, or held a step of NaN or a list of ranks, was an
    AttributeError/ValueError traceback after caching and model loading; a negative step resumed at step -5."""
    from longcat_tuner.train import checkpoint as ckpt

    path = ckpt.save_checkpoint(tmp_path, step=2, weights={"w": torch.zeros(2)}, optimizer_state={},
                                scheduler_state={"last_epoch": 2}, trainer_state={"sampler": {"epoch": 0, "position": 2}},
                                rng_state=ckpt.capture_rng_state({}))
    assert ckpt.load_checkpoint(path)["state"]["step"] == 2
    (path / ckpt.STATE_FILE).write_text(text)
    assert ckpt.saved_world_size(path) is None  # read before the data: not a traceback
    with pytest.raises(CheckpointError, match=f"checkpoint {path} could not be read .*trainer_state.json does not hold"):
        ckpt.load_checkpoint(path)


def test_a_resume_path_that_is_no_complete_checkpoint_is_named_by_check_and_before_the_data(tmp_path, capsys):
    """Before: `check` said ok for a resume_from_checkpoint that does not exist; `train` given its output_dir or
    checkpoints/ folder (not a checkpoint) refused it only after caching and loading the model."""
    from tests.conftest import write_paired_workspace

    from longcat_tuner.train import checkpoint as ckpt

    workspace = write_paired_workspace(tmp_path / "data", train_clips=1, eval_clips=1, frames=5, size=32)
    run = tmp_path / "run"
    done = ckpt.save_checkpoint(run / "checkpoints", step=3, weights={"w": torch.zeros(2)}, optimizer_state={},
                                scheduler_state={}, trainer_state={}, rng_state={})
    for resume, message in ((tmp_path / "nope", "is not a folder"),
                            (run, f"no COMPLETE marker: the newest complete checkpoint in it is {done}")):
        config = tmp_path / "config.json"
        config.write_text(json.dumps(_config(tmp_path, data_backend_config=str(workspace / "multidatabackend.json"),
                                             eval_dataset_id="val", resume_from_checkpoint=str(resume))))
        assert main(["check", "--config", str(config), "--data-only"]) == 1
        assert f"resume_from_checkpoint: {resume} " in capsys.readouterr().err
        with pytest.raises(CheckpointError, match=message):  # train's first step, before caching
            ckpt.resolve_resume_path(str(resume), run / "checkpoints")
    assert ckpt.resolve_resume_path(str(done), run / "checkpoints") == done


def test_a_damaged_model_config_is_named_by_sample_cache_and_train_as_by_check(tiny_checkpoint, tmp_path, capsys):
    """Before: `check` named these, but `sample`, `cache` and `train` met them in the loaders as tracebacks
    (TypeError from a z_dim of "16", JSONDecodeError from an empty tokenizer.json, AttributeError from a list)."""
    from longcat_tuner.data.cache import load_encoders

    root = tmp_path / "model"
    for component in ("dit", "text_encoder", "tokenizer", "scheduler", "vae"):
        (root / component).mkdir(parents=True)
        for file in (tiny_checkpoint / component).iterdir():
            (root / component / file.name).symlink_to(file)
    (root / "vae" / "config.json").unlink()
    vae = json.loads((tiny_checkpoint / "vae" / "config.json").read_text())
    (root / "vae" / "config.json").write_text(json.dumps({**vae, "z_dim": "16"}))
    said = f"{root / 'vae' / 'config.json'}: key 'z_dim' must be a positive whole number"
    assert main(["sample", "--model", str(root), "--prompt", "x", "--output", str(tmp_path / "o.mp4")]) == 2
    assert said in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="key 'z_dim'"):  # the cache stage (`cache`, and `train` first)
        load_encoders(root)
    with pytest.raises(CheckpointError, match="nope does not exist: point pretrained_model_name_or_path"):
        load_encoders(tmp_path / "nope")  # one sentence for a wrong path, not one per component
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(tmp_path, pretrained_model_name_or_path=str(root))))
    assert main(["train", "--config", str(config)]) == 2  # datasets.json does not exist: the model is read first
    assert said in capsys.readouterr().err


def test_a_device_or_worker_count_that_cannot_work_is_named(tiny_checkpoint, tmp_path, capsys):
    """Before: `--device bogus` was torch's RuntimeError and `--device cuda` on a machine without CUDA an
    AssertionError traceback (in `cache` after planning the data, in `sample` after reading the LoRAs);
    `cache --decode_workers 0` was accepted."""
    import torch

    from longcat_tuner.devices import chosen_device

    with pytest.raises(ConfigError, match="--device 'bogus' is not a device; use cpu, cuda or cuda:N"):
        chosen_device("bogus")
    with pytest.raises(ConfigError, match=f"--device cuda:99: torch sees {torch.cuda.device_count()} CUDA device"):
        chosen_device("cuda:99")
    assert chosen_device("cpu") == torch.device("cpu")
    argv = ["sample", "--model", str(tiny_checkpoint), "--prompt", "x", "--output", str(tmp_path / "o.mp4")]
    assert main(argv + ["--device", "bogus"]) == 2
    assert "--device 'bogus' is not a device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cache", "--data_backend_config", str(tmp_path / "d.json"), "--decode_workers", "0"])
    assert "argument --decode_workers: 0 is outside 1..64" in capsys.readouterr().err


@pytest.mark.parametrize("content", ['{"junk": 1}', '{"model": {"type": "Unigram"}, "added_tokens": {}}'])
def test_a_tokenizer_json_that_is_no_tokenizer_is_named(tiny_checkpoint, tmp_path, content):
    """Before: valid JSON of the wrong shape passed `check` and the pre-load check, then stopped the text
    encoder's load with a bare KeyError ('added_tokens') inside transformers."""
    from longcat_tuner.model.inspect import require_intact_model

    root = tmp_path / "model"
    for component in ("dit", "text_encoder", "tokenizer", "scheduler", "vae"):
        (root / component).mkdir(parents=True)
        for file in (tiny_checkpoint / component).iterdir():
            if file.name != "tokenizer.json":
                (root / component / file.name).symlink_to(file)
    (root / "tokenizer" / "tokenizer.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"tokenizer.json is JSON but not a tokenizer"):
        require_intact_model(root)


def test_a_device_or_pipe_as_an_output_is_never_replaced(tmp_path, tiny_checkpoint, capsys):
    """Run as root, an output named /dev/null was renamed over: the system's /dev/null became a plain file.
    A pipe stands for every node that is not a regular file (tests cannot count on making devices)."""
    import os
    import stat

    from longcat_tuner.cli import main as cli_main
    from longcat_tuner.fsutil import NotRegularFileError, atomic_file

    pipe = tmp_path / "out.safetensors"
    os.mkfifo(pipe)
    with pytest.raises(NotRegularFileError, match="not a regular file"):
        with atomic_file(pipe) as temporary:
            temporary.write_bytes(b"x")
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and not list(tmp_path.glob("out.safetensors.tmp*"))

    from longcat_tuner.model.lora import inject_lora, save_lora
    from longcat_tuner import load_dit

    dit = load_dit(tiny_checkpoint)
    inject_lora(dit, rank=2)
    lora = tmp_path / "in.safetensors"
    save_lora(dit, lora)
    assert cli_main(["export-lora", str(lora), str(pipe), "--format", "comfyui", "--overwrite"]) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)

    video = tmp_path / "v.mp4"
    os.mkfifo(video)
    code = cli_main(["sample", "--model", str(tiny_checkpoint), "--prompt", "x", "--frames", "5", "--steps", "1",
                     "--resolution", "32x32", "--device", "cpu", "--output", str(video), "--overwrite"])
    assert code == 2 and "not a regular file" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.stat(video).st_mode)
