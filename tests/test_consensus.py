"""Consensus reranking: the choice among candidate captions, and a run that stores its memory
of training images in the checkpoint and reranks its beams at validation and in inference.py.

    python -m pytest -q tests/test_consensus.py
"""

import json

import torch

from conftest import TINY_TRAIN_ARGS, run_script
from consensus import ConsensusMemory
from data_pipeline import prepare_split
from dataset import load_captions, split_indices
from evaluation import normalize_caption
from model import load_checkpoint, read_checkpoint

RERANK_ARGS = [*TINY_TRAIN_ARGS, "--do_sample", "False", "--num_beams", "3", "--rerank_neighbors", "4",
               "--metric", "val/cider"]


def grid(direction, positions=2):
    """(1, T, 4) features pointing along `direction` at every position."""
    return torch.tensor(direction, dtype=torch.float32).expand(1, positions, 4).clone()


def test_choice_follows_nearest_images_captions():
    memory = ConsensusMemory(
        torch.eye(4)[:3].half(),
        [["a red circle on the left", "a red circle at the left side"],
         ["a blue square at the top", "a small blue square on top"],
         ["a green triangle in the middle", "a green triangle"]])
    candidates = [["a blue square on top", "a red circle on the left", "a green triangle"]]
    # an image like training image 0 keeps the red circle, one like image 1 the blue square
    assert memory.choose(candidates, grid([0.9, 0.1, 0.0, 0.0]), k=1) == [1]
    assert memory.choose(candidates, grid([0.1, 0.9, 0.0, 0.0]), k=1) == [0]
    assert memory.choose(candidates, grid([0.0, 0.2, 0.9, 0.0]), k=1) == [2]
    # a tie (no neighbour shares a word) keeps the first, most likely beam
    assert memory.choose([["zebra", "moon"]], grid([1.0, 0.0, 0.0, 0.0]), k=1) == [0]


def test_run_stores_memory_and_reranks(tmp_path):
    result = run_script("train.py", RERANK_ARGS, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    path, = (tmp_path / "saved_models" / "sweep_runs").glob("*.pth")
    checkpoint = read_checkpoint(path)  # weights_only
    stored = checkpoint["consensus"]
    assert stored["features"].dtype == torch.float16
    assert stored["features"].shape == (len(stored["captions"]), checkpoint["model_config"]["encoder_dim"])
    assert all(captions for captions in stored["captions"])
    assert all(c == normalize_caption(c) for captions in stored["captions"] for c in captions)
    assert checkpoint["decoding"]["rerank_neighbors"] == 4

    # generate() keeps, for every image, the beam the memory chooses
    model, tokenizer, _ = load_checkpoint(path)
    data = load_captions("builtin", seed=0)
    val = prepare_split("val", data, split_indices(data)["val"][:6], model, tokenizer,
                        {"cache_dir": str(tmp_path / "cache"), "max_caption_length": 32}, torch.device("cpu"))
    features = val.image_batch(val.valid_rows)["features"]
    beams = model.generate(tokenizer, features=features, num_beams=3, num_return_sequences=3, max_length=32)
    candidates = [tokenizer.decode(beams[i * 3:(i + 1) * 3]) for i in range(len(features))]
    chosen = model.consensus.choose(candidates, features, 4)
    reranked = tokenizer.decode(model.generate(tokenizer, features=features, num_beams=3, rerank_neighbors=4,
                                               max_length=32))
    assert reranked == [c[i] for c, i in zip(candidates, chosen)]

    # inference.py decodes with the stored reranking unless an option turns it off
    args = ["--evaluate", "builtin", "--split", "test", "--max-images", "12", "--no-meteor", path,
            "--output", tmp_path / "eval.json"]
    for extra, expected in (([], 4), (["--rerank-neighbors", "0"], None)):
        scored = run_script("inference.py", [*args, *extra], tmp_path)
        assert scored.returncode == 0, scored.stderr[-2000:]
        decoding = json.loads((tmp_path / "eval.json").read_text())["decoding"]
        assert decoding.get("rerank_neighbors") == expected
    # sampling the stored beams would rerank random captions, so it needs reranking turned off
    sampled = run_script("inference.py", [*args, "--top-k", "5"], tmp_path)
    assert sampled.returncode == 2
    assert "rerank_neighbors=4 reranks beam-search captions, but --top-k/--temperature sample them" in sampled.stderr


def test_rerank_needs_beam_search_and_frozen_encoder(tmp_path):
    for extra, named in ((["--num_beams", "1"], "but --num_beams=1"),
                         (["--do_sample", "True"], "but --do_sample=True"),
                         (["--freeze_encoder", "False"], "but --freeze_encoder=False")):
        result = run_script("train.py", [*RERANK_ARGS, *extra], tmp_path)
        assert result.returncode == 2
        assert "--rerank_neighbors=4" in result.stderr
        assert named in result.stderr, result.stderr[-1000:]
    assert not (tmp_path / "saved_models" / "sweep_runs").exists()
