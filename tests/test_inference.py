"""inference.py: captioning, best-model choice, --list-models, bad images and checkpoints, --evaluate.

    python -m pytest -q tests/test_inference.py

Most cases call inference.main() in this process, where the model loads in a fraction of a
second once torch and transformers are imported. A few run the script as a real subprocess.
"""

import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import inference
from captioning import model_inputs
from conftest import REPO, run_script
from dataset import load_captions, load_image_array, render_builtin, split_indices
from model import load_checkpoint, read_checkpoint
from training import write_run_files

# Runs with known metrics: (run id, status, val/loss, val/cider). Lowest loss: goodb; highest CIDEr: goodc.
# The failed and still-running runs score better and the NaN run has no score; none of them may be picked.
RUNS = [("gooda", "completed", 2.0, 0.5), ("goodb", "completed", 1.5, 0.3), ("goodc", "completed", 2.5, 0.9),
        ("failed", "failed", 0.5, 2.0), ("nanrun", "completed", float("nan"), float("nan")),
        ("running", "running", 0.7, 1.5)]


# --------------------------------------------------------------------------------------
# Files the tests write

def write_variant(runs_dir, source, run_id, status, metrics, decoding=None):
    """Copy a real checkpoint under a new run id with the given status and metrics (and JSON summary)."""
    checkpoint = read_checkpoint(source)
    checkpoint["metadata"] = {**checkpoint["metadata"], "run_id": run_id, "status": status, "metrics": metrics}
    checkpoint.update(metrics=metrics, status=status)
    if decoding is not None:
        checkpoint["decoding"] = decoding
    path = Path(runs_dir) / f"model_sweep_{run_id}_adamw_lr0.001_cosine.pth"
    write_run_files(path, checkpoint)
    return path


def write_builtin_png(path, index=1150):
    """Save builtin image `index` (1150 is in the test split, so no run trained on it)."""
    render_builtin(index, 0).save(path)
    return path


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_raw_png(path, width, height, bit_depth, color_type, rows):
    """Write a valid PNG from raw scanlines (each prefixed with filter byte 0), streaming the zlib data."""
    compressor = zlib.compressobj(6)
    data = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data)
                           + png_chunk(b"IEND", b""))
    return path


def write_decompression_bomb(path):
    """A real, complete 20000x20000 1-bit PNG: 400M pixels, above Pillow's 179M-pixel error limit."""
    width, height = 20000, 20000
    row = bytes((width + 7) // 8)
    return write_raw_png(path, width, height, 1, 0, (row for _ in range(height)))


def write_truncated_jpeg(path):
    full = path.with_name("full_" + path.name)
    render_builtin(3, 0).save(full, quality=95)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_zero_bytes(path):
    path.write_bytes(b"")
    return path


def write_text_as_jpg(path):
    path.write_text("a caption, not an image\n")
    return path


BAD_IMAGES = {
    "truncated_jpeg": write_truncated_jpeg,
    "zero_bytes": write_zero_bytes,
    "text_named_jpg": write_text_as_jpg,
    "decompression_bomb": lambda path: write_decompression_bomb(path.with_suffix(".png")),
    "missing": lambda path: path,
}


def make_bad_image(kind, folder):
    return BAD_IMAGES[kind](Path(folder) / f"bad_{kind}.jpg")


def write_evil_checkpoint(path, marker):
    """A .pth whose pickle calls open(marker, "w") when loaded without weights_only."""
    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"format_version": 1, "payload": Payload()}, path)
    return path


def run_main(argv, capsys):
    """Call inference.main in this process; return (exit status, stdout, stderr)."""
    code = inference.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def ranked_runs(tmp_path_factory, tiny_checkpoint):
    """A runs folder with the checkpoints of RUNS; returns {run id: path}."""
    runs_dir = tmp_path_factory.mktemp("ranked") / "sweep_runs"
    return {run_id: write_variant(runs_dir, tiny_checkpoint, run_id, status, {"val/loss": loss, "val/cider": cider})
            for run_id, status, loss, cider in RUNS}


@pytest.fixture
def photo(tmp_path):
    return write_builtin_png(tmp_path / "photo.png")


# --------------------------------------------------------------------------------------
# Images: modes, bad files, folders and globs

def write_image_modes(folder):
    """Write one image per mode a user is likely to have; return {file name: Pillow mode on disk}."""
    rgb = Image.fromarray((np.random.default_rng(0).random((48, 64, 3)) * 255).astype(np.uint8))
    rgb.convert("L").save(folder / "gray.jpg")
    rgb.convert("LA").save(folder / "gray_alpha.png")
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("P").save(folder / "palette.gif")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)).save(folder / "gray16.png")
    rgb16 = (np.random.default_rng(1).random((48, 64, 3)) * 65535).astype(">u2")
    write_raw_png(folder / "rgb16.png", 64, 48, 16, 2, (r.tobytes() for r in rgb16))
    modes = {}
    for path in sorted(folder.iterdir()):
        with Image.open(path) as img:
            modes[path.name] = img.mode
    return modes


def test_image_modes_all_captioned(tiny_checkpoint, tmp_path):
    folder = tmp_path / "modes"
    folder.mkdir()
    modes = write_image_modes(folder)
    assert {"L", "LA", "RGBA", "P", "CMYK", "I;16"} <= set(modes.values()), modes
    result = run_script("inference.py", [folder, tiny_checkpoint, "--json", "--greedy"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    document = json.loads(result.stdout)
    assert document["errors"] == []
    captioned = {Path(c["image"]).name: c["caption"] for c in document["captions"]}
    assert set(captioned) == set(modes)
    for name, caption in captioned.items():
        assert caption.strip(), f"{name} ({modes[name]}) got an empty caption"


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_reported_others_captioned(kind, tiny_checkpoint, tmp_path, capsys):
    good = write_builtin_png(tmp_path / "good.png")
    bad = make_bad_image(kind, tmp_path)
    code, out, err = run_main([good, bad, tiny_checkpoint, "--greedy"], capsys)
    assert code == inference.EXIT_UNREADABLE_IMAGES
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert str(bad) in errors[0]
    assert "Traceback" not in err
    assert any(line.startswith(f"{good}: ") and len(line) > len(f"{good}: ") for line in out.splitlines()), out


def test_multi_image_call_with_bad_file(tiny_checkpoint, tmp_path):
    first = write_builtin_png(tmp_path / "first.png", 1151)
    bad = write_truncated_jpeg(tmp_path / "broken.jpg")
    second = write_builtin_png(tmp_path / "second.png", 1152)
    result = run_script("inference.py", [first, bad, second, tiny_checkpoint], tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr
    assert "broken.jpg" in errors[0]
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"checkpoint: {tiny_checkpoint}")
    assert [line.split(": ")[0] for line in lines[1:]] == [str(first), str(second)]


def test_folder_and_glob_expanded(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "album"
    folder.mkdir()
    for i in range(3):
        write_builtin_png(folder / f"img{i}.png", 1160 + i)
    (folder / "notes.txt").write_text("not an image")
    code, out, _ = run_main([folder, tiny_checkpoint, "--json", "--greedy", "--batch-size", "2"], capsys)
    assert code == 0
    by_folder = json.loads(out)["captions"]
    assert [Path(c["image"]).name for c in by_folder] == ["img0.png", "img1.png", "img2.png"]
    code, out, _ = run_main([str(folder / "img*.png"), tiny_checkpoint, "--json", "--greedy", "--batch-size", "8"],
                            capsys)
    assert code == 0
    assert json.loads(out)["captions"] == by_folder


def test_no_images_rejected(tiny_checkpoint, tmp_path, capsys):
    code, _, err = run_main([tmp_path / "nothing_*.png", tiny_checkpoint], capsys)
    assert code == inference.EXIT_INVALID
    assert "no files match" in err
    assert "no images to caption" in err


# --------------------------------------------------------------------------------------
# Choosing the best checkpoint

def test_best_checkpoint_skips_failed_nan_running(ranked_runs):
    runs_dir = ranked_runs["gooda"].parent
    assert inference.best_checkpoint_path is checkpoints.best_checkpoint_path
    assert Path(inference.best_checkpoint_path(runs_dir)) == ranked_runs["goodb"]
    assert Path(inference.best_checkpoint_path(runs_dir, "val/loss")) == ranked_runs["goodb"]
    assert Path(inference.best_checkpoint_path(runs_dir, "val/cider")) == ranked_runs["goodc"]


@pytest.mark.parametrize("metric, expected, score", [("val/loss", "goodb", "1.5000"), ("val/cider", "goodc", "0.9000")])
def test_cli_names_best_checkpoint(metric, expected, score, ranked_runs, photo, capsys):
    runs_dir = ranked_runs["gooda"].parent
    code, out, _ = run_main([photo, "--runs-dir", runs_dir, "--metric", metric, "--greedy"], capsys)
    assert code == 0
    first, caption = out.splitlines()[:2]
    assert first.startswith(f"checkpoint: {ranked_runs[expected]} ")
    assert f"{metric}: {score}" in first
    assert caption.startswith(f"{photo}: ")


def test_no_checkpoints_says_how_to_train(tmp_path, photo, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main([photo], capsys)
    assert code == inference.EXIT_INVALID
    assert "no checkpoints in saved_models/sweep_runs" in err
    assert "python train.py" in err
    assert len(error_lines(err)) == 1
    code, out, err = run_main(["--list-models"], capsys)
    assert code == 0
    assert "no checkpoints" in err
    assert "python train.py" in err


def test_only_unusable_runs_not_picked(tiny_checkpoint, tmp_path, photo, capsys):
    runs_dir = tmp_path / "runs"
    write_variant(runs_dir, tiny_checkpoint, "failed", "failed", {"val/loss": 0.1})
    write_variant(runs_dir, tiny_checkpoint, "nanrun", "completed", {"val/loss": float("nan")})
    code, _, err = run_main([photo, "--runs-dir", runs_dir], capsys)
    assert code == inference.EXIT_INVALID
    assert "2 checkpoints, none completed with a finite val/loss" in err


def test_wrong_folder_arguments(tiny_checkpoint, tmp_path, photo, capsys):
    code, _, err = run_main(["--list-models", "--runs-dir", tmp_path / "no_such_runs"], capsys)
    assert code == inference.EXIT_INVALID
    assert f"--runs-dir {tmp_path / 'no_such_runs'}: no such folder" in err
    code, _, err = run_main(["--list-models", "--runs-dir", photo], capsys)
    assert code == inference.EXIT_INVALID
    assert f"--runs-dir {photo} is a file" in err
    code, _, err = run_main([photo, "--checkpoint", tmp_path], capsys)
    assert code == inference.EXIT_INVALID
    assert f"checkpoint {tmp_path} is a folder; pass a .pth file in it, or pass the folder as --runs-dir" in err


def test_metric_no_run_logged_lists_logged_ones(ranked_runs, photo, capsys):
    runs_dir = next(iter(ranked_runs.values())).parent
    code, _, err = run_main([photo, "--runs-dir", runs_dir, "--metric", "val/cidre"], capsys)
    assert code == inference.EXIT_INVALID
    assert f"no checkpoint in {runs_dir} logged --metric val/cidre; they logged val/cider, val/loss" in err
    assert len(error_lines(err)) == 1
    code, out, err = run_main(["--list-models", "--runs-dir", runs_dir, "--metric", "val/cidre"], capsys)
    assert code == inference.EXIT_INVALID
    assert f"--metric val/cidre: no checkpoint in {runs_dir} logged it; they logged val/cider, val/loss" in err


# --------------------------------------------------------------------------------------
# --list-models

def write_bad_checkpoints(runs_dir, source, marker):
    """Write a truncated, a foreign, an unsafe and a text .pth; return {kind: path}."""
    data = Path(source).read_bytes()
    truncated = runs_dir / "model_sweep_truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    foreign = runs_dir / "other_project.pth"
    torch.save({"state_dict": {"weight": torch.zeros(2)}, "epoch": 3}, foreign)
    text = runs_dir / "notes.pth"
    text.write_text("not a checkpoint\n")
    evil = write_evil_checkpoint(runs_dir / "unsafe.pth", marker)
    return {"truncated": truncated, "foreign": foreign, "text": text, "evil": evil}


def test_list_models_with_corrupt_files(ranked_runs, tmp_path, capsys):
    runs_dir = tmp_path / "runs"
    shutil.copytree(ranked_runs["gooda"].parent, runs_dir)
    marker = tmp_path / "code_ran"
    bad = write_bad_checkpoints(runs_dir, ranked_runs["gooda"], marker)
    code, out, err = run_main(["--list-models", "--runs-dir", runs_dir], capsys)
    assert code == 0, err
    assert not marker.exists()
    lines = out.splitlines()
    assert lines[0].startswith(f"{len(RUNS) + len(bad)} checkpoints in {runs_dir}")
    rows = lines[2:]
    assert len(rows) == len(RUNS) + len(bad)
    ranked_ids = [row.split()[1] for row in rows[:3]]
    assert ranked_ids == ["goodb", "gooda", "goodc"]
    reasons = {"truncated": "not a zip archive", "text": "not a zip archive", "foreign": "missing keys",
               "evil": "was rejected"}
    for kind, path in bad.items():
        row = next(r for r in rows if str(path) in r)
        assert "unreadable" in row, row
        assert reasons[kind] in row, row


def test_list_models_reads_no_weights(tiny_checkpoint, tmp_path, photo, capsys):
    runs_dir = tmp_path / "runs"
    path = write_variant(runs_dir, tiny_checkpoint, "summary", "completed", {"val/loss": 1.25})
    # Zero the checkpoint but keep its size and mtime: only a reader of the weights would notice.
    stat = path.stat()
    path.write_bytes(bytes(stat.st_size))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, out, err = run_main(["--list-models", "--runs-dir", runs_dir], capsys)
    assert code == 0, err
    row = out.splitlines()[2]
    assert "summary" in row
    assert "1.2500" in row
    assert "completed" in row
    # The control: loading the weights does fail.
    code, _, err = run_main([photo, path], capsys)
    assert code == inference.EXIT_INVALID
    assert "not a zip archive" in err


def test_list_models_json(ranked_runs, capsys):
    code, out, _ = run_main(["--list-models", "--json", "--runs-dir", ranked_runs["gooda"].parent], capsys)
    assert code == 0
    records = json.loads(out)
    assert [r["run_id"] for r in records[:3]] == ["goodb", "gooda", "goodc"]
    nan_run = next(r for r in records if r["run_id"] == "nanrun")
    assert nan_run["metrics"]["val/loss"] is None
    assert "config" not in records[0]


# --------------------------------------------------------------------------------------
# Bad checkpoints and devices

def test_evil_checkpoint_payload_is_real(tmp_path):
    """The control for the rejection test: an unrestricted load does run the payload."""
    marker = tmp_path / "code_ran"
    path = write_evil_checkpoint(tmp_path / "unsafe.pth", marker)
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    pickle.loads(pickled)
    assert marker.exists()


@pytest.mark.parametrize("kind, reason", [("missing", "not found"), ("truncated", "not a zip archive"),
                                          ("text", "not a zip archive"), ("foreign", "missing keys"),
                                          ("evil", "was rejected")])
def test_bad_checkpoint_rejected(kind, reason, tiny_checkpoint, tmp_path, photo, capsys):
    marker = tmp_path / "code_ran"
    bad = write_bad_checkpoints(tmp_path, tiny_checkpoint, marker)
    path = bad.get(kind, tmp_path / "missing.pth")
    code, out, err = run_main([photo, path], capsys)
    assert code == inference.EXIT_INVALID
    errors = error_lines(err)
    assert len(errors) == 1, err
    assert str(path) in errors[0]
    assert reason in errors[0]
    assert "Traceback" not in err
    assert not marker.exists()
    if kind == "foreign":
        assert "encoder_state_dict" in errors[0]
        assert "model_config" in errors[0]
    if kind == "evil":
        assert "io.open" in errors[0]


GPU_TAGGER = """
import sys, torch
# Tag every CPU storage as cuda:0 when saving, as torch.save does for tensors on a GPU.
def tag_as_cuda(obj):
    return "cuda:0" if getattr(obj, "device", None) is not None and obj.device.type == "cpu" else None
torch.serialization.register_package(0, tag_as_cuda, lambda obj, location: None)
checkpoint = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
torch.save(checkpoint, sys.argv[2])
"""


def test_gpu_checkpoint_loads_on_cpu(tiny_checkpoint, tmp_path, photo, capsys):
    gpu_path = tmp_path / "model_sweep_gpu.pth"
    subprocess.run([sys.executable, "-c", GPU_TAGGER, str(tiny_checkpoint), str(gpu_path)], check=True, cwd=REPO)
    with zipfile.ZipFile(gpu_path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"cuda:0" in pickled
    assert b"cpu" not in pickled
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_path, weights_only=True)
    code, out, err = run_main([photo, gpu_path, "--greedy", "--device", "cpu"], capsys)
    assert code == 0, err
    code, cpu_out, _ = run_main([photo, tiny_checkpoint, "--greedy", "--device", "cpu"], capsys)
    assert out.splitlines()[1] == cpu_out.splitlines()[1]


@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("gpu", "not a device name")])
def test_unusable_device_rejected(device, message, tiny_checkpoint, photo, capsys):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run_main([photo, tiny_checkpoint, "--device", device], capsys)
    assert code == inference.EXIT_INVALID
    assert message in err
    assert f"--device={device}" in err


# --------------------------------------------------------------------------------------
# Decoding

def captions_json(argv, capsys):
    code, out, err = run_main([*argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


def test_decoding_defaults_from_checkpoint(tiny_checkpoint, tmp_path, photo, capsys):
    document = captions_json([photo, tiny_checkpoint], capsys)
    run_decoding = read_checkpoint(tiny_checkpoint)["decoding"]
    assert document["decoding"]["do_sample"] is True
    assert document["decoding"]["top_k"] == run_decoding["top_k"]
    assert document["decoding"]["temperature"] == run_decoding["temperature"]
    assert document["decoding"]["max_length"] == run_decoding["max_length"]
    greedy_run = write_variant(tmp_path / "runs", tiny_checkpoint, "greedyrun", "completed", {"val/loss": 1.0},
                               decoding={**run_decoding, "do_sample": False})
    stored = captions_json([photo, greedy_run], capsys)
    assert stored["decoding"]["do_sample"] is False
    assert stored["captions"] == captions_json([photo, tiny_checkpoint, "--greedy"], capsys)["captions"]


def test_decoding_overrides(tiny_checkpoint, photo, capsys):
    sampled = captions_json([photo, tiny_checkpoint, "--top-k", "5", "--temperature", "0.7", "--seed", "3"], capsys)
    assert sampled["decoding"]["do_sample"] is True
    assert sampled["decoding"]["top_k"] == 5
    assert sampled["decoding"]["temperature"] == 0.7
    assert sampled["seed"] == 3
    again = captions_json([photo, tiny_checkpoint, "--top-k", "5", "--temperature", "0.7", "--seed", "3"], capsys)
    assert again["captions"] == sampled["captions"]
    beams = captions_json([photo, tiny_checkpoint, "--num-beams", "3"], capsys)
    assert beams["decoding"]["num_beams"] == 3
    assert beams["decoding"]["do_sample"] is False
    short = captions_json([photo, tiny_checkpoint, "--max-length", "3", "--greedy"], capsys)
    assert short["decoding"]["max_length"] == 3
    assert len(short["captions"][0]["caption"].split()) <= 2


@pytest.mark.parametrize("options, named", [(["--max-length", "100"], "--max-length=100"),
                                            (["--max-length", "1"], "--max-length=1"),
                                            (["--temperature", "0"], "--temperature=0"),
                                            (["--temperature", "inf"], "--temperature=inf must be positive and finite"),
                                            (["--output", "x.json"], "--output only applies to --evaluate"),
                                            (["--split", "val", "--max-images", "3"],
                                             "--split, --max-images only apply to --evaluate"),
                                            (["--top-k", "0"], "--top-k=0"),
                                            (["--greedy", "--top-k", "5"], "--greedy"),
                                            (["--rerank-neighbors", "-1"], "--rerank-neighbors=-1"),
                                            (["--rerank-neighbors", "3", "--greedy"], "--rerank-neighbors=3 chooses among beams"),
                                            # the tiny run stored no training images to rerank with
                                            (["--rerank-neighbors", "5", "--num-beams", "2"], ".pth stores no training captions")])
def test_invalid_decoding_rejected(options, named, tiny_checkpoint, photo, capsys):
    code, out, err = run_main([photo, tiny_checkpoint, *options], capsys)
    assert code == inference.EXIT_INVALID
    assert named in err
    assert f"{photo}:" not in out


@pytest.mark.parametrize("options, name", [
    ({"num_beams": 1, "do_sample": False}, "greedy"),
    ({"num_beams": 8, "do_sample": False, "no_repeat_ngram_size": 3, "rerank_neighbors": 15},
     "beam8-norepeat3-rerank15"),
    ({"num_beams": 1, "do_sample": True, "top_k": 50, "temperature": 0.7, "repetition_penalty": 1.2},
     "sample-k50-t0.7-penalty1.2"),
    ({"num_beams": 3, "do_sample": True, "top_k": 10, "temperature": 1.0}, "sample-k10-t1-beam3")])
def test_decoding_name_per_option(options, name):
    assert inference.decoding_name(options) == name


# --------------------------------------------------------------------------------------
# Python API

def test_caption_images_api(tiny_checkpoint, tmp_path, photo, capsys):
    model, tokenizer, checkpoint = load_checkpoint(tiny_checkpoint, "cpu")
    size = checkpoint["preprocessing"]["image_size"]
    builtin = load_captions("builtin")
    assert np.array_equal(inference.load_pixels(photo, size), load_image_array(builtin, 1150, size))
    with Image.open(photo) as img:
        pil_image = img.copy()
    captions = inference.caption_images(model, tokenizer, checkpoint, [pil_image, photo], greedy=True)
    assert len(captions) == 2
    assert captions[0] == captions[1]
    cli = captions_json([photo, tiny_checkpoint, "--greedy"], capsys)
    assert cli["captions"][0]["caption"] == captions[0]
    with pytest.raises(OSError, match="missing.png"):
        inference.caption_images(model, tokenizer, checkpoint, [tmp_path / "missing.png"])


def test_frozen_features_match_training_cache(tiny_checkpoint, tmp_path):
    """Inference feeds the decoder the same features that training read from its cache."""
    model, _, checkpoint = load_checkpoint(tiny_checkpoint, "cpu")
    assert model.model_config["freeze_encoder"]
    caches = [np.load(p, mmap_mode="r") for p in (tiny_checkpoint.parents[1] / "cache").glob("features-*.npy")]
    builtin = load_captions("builtin")
    val_indices = split_indices(builtin)["val"]
    val_cache = next(c for c in caches if c.shape[0] == len(val_indices))
    photo = write_builtin_png(tmp_path / "val.png", val_indices[0])
    preprocessing = checkpoint["preprocessing"]
    pixels = inference.load_pixels(photo, preprocessing["image_size"])
    features = model_inputs(model, [pixels], preprocessing)["features"][0].numpy()
    # Training encoded batches of 32 and this one image alone, which changes the last float32 bits, so about
    # 1% of the values round to the neighbouring float16. Without the float16 rounding none would be equal.
    equal = np.mean(features == val_cache[0].astype(np.float32))
    assert equal > 0.95


# --------------------------------------------------------------------------------------
# --evaluate

def test_evaluate_builtin_test_split(tiny_checkpoint, tmp_path):
    output = tmp_path / "scores" / "test.json"
    result = run_script("inference.py", ["--evaluate", "builtin", "--split", "test", "--max-images", "16",
                                         "--batch-size", "6", "--output", output, tiny_checkpoint], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    expected = {"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "distinct", "repeat3", "unk"}
    if shutil.which("java"):
        expected.add("meteor")
    assert expected <= printed, result.stdout
    document = json.loads(output.read_text())
    assert document["num_images"] == 16
    assert len(document["captions"]) == 16
    assert set(expected) - {"distinct", "repeat3", "unk"} <= set(document["metrics"])
    builtin = load_captions("builtin")
    test_ids = {f"builtin:{i}" for i in split_indices(builtin)["test"]}
    for row in document["captions"]:
        assert row["image"] in test_ids
        assert row["references"] and isinstance(row["caption"], str)
    assert all(math.isfinite(v) for v in document["metrics"].values())


def write_csv_dataset(root, splits):
    """A captions.csv dataset of builtin renders: {image name: split}; two captions per image."""
    (root / "images").mkdir(parents=True)
    rows, split_rows = ["image,caption"], ["image,split"]
    for i, (name, split) in enumerate(splits.items()):
        write_builtin_png(root / "images" / name, 1100 + i)
        rows += [f"{name},a shape number {i}", f"{name},a picture of a shape"]
        split_rows.append(f"{name},{split}")
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "splits.csv").write_text("\n".join(split_rows) + "\n")


def test_evaluate_csv_with_unreadable_image(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_csv_dataset(data, {"a.png": "test", "b.png": "test", "c.png": "test", "d.png": "train", "e.png": "test"})
    broken = data / "images" / "c.png"
    broken.write_bytes(broken.read_bytes()[:100])
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["--evaluate", data, "--split", "test", "--no-meteor", tiny_checkpoint], capsys)
    assert code == inference.EXIT_UNREADABLE_IMAGES
    # the tiny run samples its captions with top-k 50 at temperature 1
    output = tmp_path / "saved_models" / "evaluations" / f"{tiny_checkpoint.stem}_data_test_sample-k50-t1.json"
    assert f"captions: {output.relative_to(tmp_path)}" in out
    document = json.loads(output.read_text())
    assert [Path(r["image"]).name for r in document["captions"]] == ["a.png", "b.png", "e.png"]
    assert [Path(s["image"]).name for s in document["skipped"]] == ["c.png"]
    assert document["captions"][0]["references"] == ["a shape number 0", "a picture of a shape"]
    assert "meteor" not in document["metrics"]

    code, _, err = run_main(["--evaluate", data, "--split", "val", tiny_checkpoint], capsys)
    assert code == inference.EXIT_INVALID
    assert "has no val images" in err


def test_evaluate_flickr_test_split(tiny_checkpoint, flickr_dir, tmp_path, capsys):
    output = tmp_path / "flickr.json"
    code, _, err = run_main(["--evaluate", flickr_dir, "--split", "test", "--max-images", "8", "--no-meteor",
                             "--output", output, "--json", tiny_checkpoint], capsys)
    assert code == 0, err
    document = json.loads(output.read_text())
    assert len(document["captions"]) == 8
    for row in document["captions"]:
        assert Path(row["image"]).is_relative_to(flickr_dir)
        assert 4 <= len(row["references"]) <= 5  # five per image, less any exact duplicates


def test_evaluate_picks_run_trained_on_data(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    write_csv_dataset(data, {"a.png": "test", "b.png": "train"})
    runs_dir = tmp_path / "runs"
    write_variant(runs_dir, tiny_checkpoint, "onshapes", "completed", {"val/loss": 0.1})
    path = write_variant(runs_dir, tiny_checkpoint, "oncsvdata", "completed", {"val/loss": 0.9})
    checkpoint = read_checkpoint(path)
    checkpoint["metadata"]["config"] = {**checkpoint["metadata"]["config"], "data": "data"}  # relative, as typed
    write_run_files(path, checkpoint)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["--evaluate", data, "--runs-dir", runs_dir, "--no-meteor"], capsys)
    assert code == inference.EXIT_OK, err
    assert "oncsvdata" in out + err
    assert "onshapes" not in out + err

    other = tmp_path / "other"
    write_csv_dataset(other, {"c.png": "test"})
    code, out, err = run_main(["--evaluate", other, "--runs-dir", runs_dir], capsys)
    assert code != inference.EXIT_OK
    assert f"none of the 2 checkpoints in {runs_dir} was trained on {other}" in err


def test_evaluate_missing_data_names_the_option(tiny_checkpoint, tmp_path, capsys):
    missing = tmp_path / "no_such_data"
    code, _, err = run_main(["--evaluate", missing, tiny_checkpoint], capsys)
    assert code == inference.EXIT_INVALID
    assert f"--evaluate {missing}: no such file or folder; pass a dataset path" in err
    assert "--data" not in err
    assert len(error_lines(err)) == 1


def test_evaluate_unwritable_output_fails_before_scoring(tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / ("x" * 300 + ".json")  # longer than the 255-byte name limit of ext4 and most Linux file systems
    code, out, err = run_main(["--evaluate", "builtin", "--split", "test", "--max-images", "4", "--no-meteor",
                               "--output", output, tiny_checkpoint], capsys)
    assert code == inference.EXIT_INVALID
    assert f"cannot write --output {output}" in err
    assert "bleu" not in out  # nothing was scored
    assert len(error_lines(err)) == 1
    assert list(tmp_path.iterdir()) == []


def test_evaluate_finds_run_from_another_folder(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    data = tmp_path / "project" / "data"
    write_csv_dataset(data, {"a.png": "test", "b.png": "train"})
    runs_dir = tmp_path / "runs"
    path = write_variant(runs_dir, tiny_checkpoint, "relative", "completed", {"val/loss": 0.5})
    checkpoint = read_checkpoint(path)
    # trained in tmp_path/project/scripts with --data ../data, as typed
    checkpoint["metadata"]["config"] = {**checkpoint["metadata"]["config"], "data": "../data"}
    checkpoint["metadata"]["data_path"] = str(data)
    write_run_files(path, checkpoint)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(["--evaluate", "project/data", "--runs-dir", runs_dir, "--no-meteor"], capsys)
    assert code == inference.EXIT_OK, err
    assert "relative" in out + err


@pytest.mark.parametrize("name, message", [
    ("model.pth", "is a checkpoint file name"),
    ("CHECKPOINT_SUMMARY", "is the summary of the checkpoint"),
    ("a_file/x.json", "which is a file"),
])
def test_evaluate_output_rejected_before_scoring(tiny_checkpoint, tmp_path, capsys, name, message):
    runs = tmp_path / "runs"
    path = write_variant(runs, tiny_checkpoint, "kept", "completed", {"val/loss": 0.5})
    (tmp_path / "a_file").write_text("not a folder")
    output = path.with_suffix(".json") if name == "CHECKPOINT_SUMMARY" else tmp_path / name
    before = {p: p.read_bytes() for p in runs.iterdir()}
    code, out, err = run_main(["--evaluate", "builtin", "--split", "test", "--max-images", "4", "--no-meteor",
                               "--output", output, path], capsys)
    assert code == inference.EXIT_INVALID
    assert message in err
    assert "bleu" not in out
    assert {p: p.read_bytes() for p in runs.iterdir()} == before
