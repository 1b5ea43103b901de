"""train.py end to end: checkpoint contents, exact overfitting, divergence, the agent's argv,
bad training images, and a short run on real Flickr8k photos.

    python -m pytest -q tests/test_train.py
"""

import gc
import json

import numpy as np
import pytest
import torch
from PIL import Image

import dataset
import train
import training
from conftest import TINY_TRAIN_ARGS, run_script, script_env
from evaluation import generation_options
from model import ImageCaptioner, build_model, caption_loss, load_checkpoint, make_model_config

CHECKPOINT_KEYS = ("encoder_state_dict", "decoder_state_dict", "optimizer_state_dict", "config",
                   "final_train_loss", "total_steps", "wandb_run_id", "tokenizer", "model_config", "preprocessing",
                   "metrics", "status", "format_version", "decoding", "metadata")


def test_checkpoint_has_every_key(tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    for key in CHECKPOINT_KEYS:
        assert key in checkpoint, key
    assert checkpoint["status"] == "completed"
    assert checkpoint["total_steps"] == 30
    assert np.isfinite(checkpoint["final_train_loss"])
    assert np.isfinite(checkpoint["metrics"]["val/loss"])
    assert 0.0 <= checkpoint["metrics"]["val/bleu4"] <= 1.0


def test_checkpoint_name_and_summary(tiny_checkpoint):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    run_id = checkpoint["wandb_run_id"]
    assert tiny_checkpoint.name == f"model_sweep_{run_id}_adamw_lr3e-05_cosine.pth"
    summary = json.loads(tiny_checkpoint.with_suffix(".json").read_text())
    assert summary["checkpoint_size"] == tiny_checkpoint.stat().st_size
    assert summary["metrics"] == pytest.approx(checkpoint["metrics"])
    assert not list(tiny_checkpoint.parent.glob(".*.tmp"))


def test_checkpoint_reloads_and_captions(tiny_checkpoint):
    model, tokenizer, checkpoint = load_checkpoint(tiny_checkpoint, "cpu")
    size = checkpoint["preprocessing"]["image_size"]
    img = dataset.render_builtin(1100, 0)
    pixels = torch.from_numpy(dataset.image_to_array(img, size))[None]
    pixels = dataset.normalize_images(pixels, checkpoint["preprocessing"]["mean"], checkpoint["preprocessing"]["std"])
    options = generation_options(checkpoint["decoding"], do_sample=False)
    ids = model.generate(tokenizer, pixel_values=pixels, **options)
    caption = tokenizer.decode(ids)[0]
    assert caption and len(caption.split()) < checkpoint["decoding"]["max_length"]


def test_run_logged_offline_to_wandb(tiny_run, tiny_checkpoint):
    runs = list(tiny_run.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    run_id = torch.load(tiny_checkpoint, weights_only=True)["wandb_run_id"]
    assert runs[0].name.endswith(run_id)


def test_overfit_one_batch_exactly():
    """Eight images, one caption each: greedy decoding must give back every caption word for word.

    Catches targets shifted by one, [EOS] not learned (captions that never end) and padding
    that leaks into the loss.
    """
    torch.manual_seed(0)
    data = dataset.load_captions("builtin", seed=0)
    captions = [data.captions[i][i % 3] for i in range(8)]
    tokenizer = dataset.train_tokenizer([c for refs in data.captions for c in refs], vocab_size=200)
    config = {**train.DEFAULTS, "encoder": "tiny_cnn", "freeze_encoder": False, "d_model": 64, "num_layers": 2,
              "num_heads": 2, "dropout": 0.0, "max_caption_length": 24}
    model = build_model(make_model_config(config, tokenizer), pretrained=False)
    assert isinstance(model, ImageCaptioner)
    pixels = torch.from_numpy(np.stack([dataset.load_image_array(data, i, 64) for i in range(8)]))
    pixels = dataset.normalize_images(pixels, [0.5] * 3, [0.5] * 3)
    ids, lengths = tokenizer.encode(captions, 24)
    width = int(lengths.max())
    ids = ids[:, :width]
    mask = (torch.arange(width - 1)[None] < (lengths - 1)[:, None]).long()
    targets = ids[:, 1:].masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = caption_loss(model(ids[:, :-1], mask, pixel_values=pixels), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    out = model.generate(tokenizer, pixel_values=pixels, max_length=24)
    assert tokenizer.decode(out) == [c.lower() for c in captions]


def test_gc_paused_restores_collection():
    """Setup pauses automatic garbage collection; it must come back on, even after an error."""
    assert gc.isenabled()
    with pytest.raises(ValueError):
        with training.gc_paused():
            assert not gc.isenabled()
            raise ValueError("setup failed")
    assert gc.isenabled()
    gc.disable()  # a caller that had turned collection off keeps it off
    try:
        with training.gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_divergence_fails_without_checkpoint(tmp_path):
    args = [*TINY_TRAIN_ARGS, "--learning_rate", "1e6", "--scratch_lr_multiplier", "1e6", "--max_bad_steps", "3",
            "--eval_interval", "1000", "--warmup_steps", "0", "--max_steps", "60"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "diverged" in result.stderr
    assert "3 consecutive non-finite steps" in result.stderr
    assert not list((tmp_path / "saved_models" / "sweep_runs").glob("*.pth"))


def test_nonfinite_last_step_fails(tmp_path):
    # fewer bad steps than max_bad_steps, but the step due to validate is one of them
    args = [*TINY_TRAIN_ARGS, "--learning_rate", "1e30", "--warmup_steps", "0", "--max_steps", "5",
            "--eval_interval", "5"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "no checkpoint saved, because the run never reached a finite validation point" in result.stderr
    assert not list((tmp_path / "saved_models" / "sweep_runs").glob("*.pth"))


@pytest.mark.parametrize("setting,message", [("--learning_rate=inf", "--learning_rate=inf is not a finite number"),
                                             ("--grad_clip=nan", "--grad_clip=nan is not a finite number"),
                                             ("--dropout=1.5", "--dropout=1.5 must be below 1"),
                                             ("--max_caption_length=1", "--max_caption_length=1 leaves no room"),
                                             ("--eval_max_images=0", "--eval_max_images=0 must be positive"),
                                             ("--adam_beta2=1.0", "--adam_beta2=1.0 must be below 1"),
                                             ("--val_fraction=1.5", "--val_fraction=1.5 must be between 0 and 1"),
                                             ("--data=", "--data is empty")])
def test_unusable_numbers_rejected(tmp_path, setting, message):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, setting], tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text,expected", [("True", True), ("False", False), ("true", True), ("false", False),
                                           ("1", True), ("0", False)])
def test_agent_booleans(text, expected):
    config = train.parse_config([f"--freeze_encoder={text}", f"--log_model={text}"])
    assert config["freeze_encoder"] is expected
    assert config["log_model"] is expected


def test_agent_floats_ints_and_none():
    config = train.parse_config(["--learning_rate=2.7e-05", "--top_k=37", "--temperature=0.93",
                                 "--max_train_samples=None", "--weight_decay=0.0123"])
    assert config["learning_rate"] == pytest.approx(2.7e-05)
    assert config["top_k"] == 37 and isinstance(config["top_k"], int)
    assert config["temperature"] == pytest.approx(0.93)
    assert config["max_train_samples"] is None
    assert config["weight_decay"] == pytest.approx(0.0123)


def test_invalid_values_rejected_with_name(tmp_path):
    result = run_script("train.py", ["--freeze_encoder=maybe"], tmp_path)
    assert result.returncode == 2
    assert "--freeze_encoder" in result.stderr and "maybe" in result.stderr
    result = run_script("train.py", ["--learning_rate=-1"], tmp_path)
    assert result.returncode == 2
    assert "--learning_rate=-1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so --device cuda is valid")
def test_missing_cuda_is_one_line_error(tmp_path):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--device", "cuda"], tmp_path)
    assert result.returncode == 2
    assert "--device=cuda: CUDA is not available on this machine" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_from_run_checkpoint_rejected(tiny_checkpoint, tmp_path):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--resume", tiny_checkpoint], tmp_path)
    assert result.returncode == 2
    assert f"{tiny_checkpoint} is not a resume state" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_is_one_line_error(tmp_path):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--data", tmp_path / "no_such_data"], tmp_path)
    assert result.returncode == 2
    assert "no_such_data" in result.stderr and "Traceback" not in result.stderr


def test_settings_that_would_fail_after_training_rejected_first(tmp_path):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--metric", "val/meteor", "--meteor", "False"], tmp_path)
    assert result.returncode == 2
    assert "--metric=val/meteor is never logged here: --meteor=False" in result.stderr
    (tmp_path / "a_file").write_text("not a folder\n")
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--output_dir", "a_file"], tmp_path)
    assert result.returncode == 2
    assert "--output_dir=a_file is a file, not a folder" in result.stderr
    assert (tmp_path / "a_file").read_text() == "not a folder\n"
    env = {**script_env(tmp_path), "HF_HUB_OFFLINE": "1"}
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--decoder", "minilm6"], tmp_path, env=env)
    assert result.returncode == 2
    assert "--decoder minilm6: not 'transformer', 'minilm', a model folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_training_images_skipped(tmp_path):
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = ["image,caption"]
    for i in range(24):
        dataset.render_builtin(i, 0).save(images / f"ok{i}.jpg")
        rows += [f"ok{i}.jpg,{c}" for c in dataset.load_captions("builtin").captions[i]]
    good = (images / "ok0.jpg").read_bytes()
    (images / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("this is not an image")
    rows += [f"{name},a broken picture" for name in ("truncated.jpg", "empty.jpg", "text.jpg")]
    (tmp_path / "data" / "captions.csv").write_text("\n".join(rows) + "\n")
    args = [*TINY_TRAIN_ARGS, "--data", tmp_path / "data", "--val_fraction", "0.5", "--max_steps", "5"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("truncated.jpg", "empty.jpg", "text.jpg"):
        assert name in result.stderr
    assert "3 of" in result.stderr or "images unreadable" in result.stderr


def test_short_run_on_flickr8k(tmp_path, flickr_dir):
    args = ["--data", flickr_dir, "--max_train_samples", "64", "--max_val_samples", "16", "--max_steps", "8",
            "--eval_interval", "8", "--log_interval", "4", "--eval_max_images", "16", "--log_model", "False",
            "--batch_size", "16", "--meteor", "False"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64 train, 16 val images" in result.stderr
    (path,) = (tmp_path / "saved_models" / "sweep_runs").glob("*.pth")
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["model_config"]["encoder"] == "efficientnet_lite0"
    assert np.isfinite(checkpoint["metrics"]["val/loss"])


def test_data_never_trains_on_test_split(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rows, splits = ["image,caption"], ["image,split"]
    for i, split in enumerate(["train"] * 6 + ["dev"] * 2 + ["test"] * 2):
        Image.new("RGB", (16, 16)).save(images / f"{i}.jpg")
        rows.append(f"{i}.jpg,caption {i}")
        splits.append(f"{i}.jpg,{split}")
    (tmp_path / "captions.csv").write_text("\n".join(rows))
    (tmp_path / "splits.csv").write_text("\n".join(splits))
    data = dataset.load_captions(str(tmp_path))
    split = dataset.split_indices(data)
    train_names = {data.images[i].split("/")[-1] for i in split["train"] + split["val"]}
    assert train_names.isdisjoint({"8.jpg", "9.jpg"})


def test_resume_rejects_option_equal_to_default(monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    state = {"config": {**train.DEFAULTS, "learning_rate": 1e-4}, "run_id": "abc12345", "wandb_run_id": "abc12345"}
    argv = ["--resume", "state.pt", "--learning_rate", "3e-5"]
    config = train.parse_config(argv)
    explicit = train.explicit_options(argv)
    assert set(explicit) == {"resume", "learning_rate"}
    with pytest.raises(ValueError, match="--learning_rate=3e-05 would be ignored"):
        train.check_resume_options(config, state, explicit)


def test_resume_rejects_other_wandb_run_id(monkeypatch):
    monkeypatch.setenv("WANDB_RUN_ID", "other123")
    state = {"config": dict(train.DEFAULTS), "run_id": "abc12345", "wandb_run_id": "abc12345"}
    argv = ["--resume", "state.pt"]
    with pytest.raises(ValueError, match="WANDB_RUN_ID=other123 but --resume state.pt continues run abc12345"):
        train.check_resume_options(train.parse_config(argv), state, train.explicit_options(argv))
