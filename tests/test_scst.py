"""Self-critical training: the CIDEr-D reward, the token mask of sampled captions, and a short
run that switches from cross-entropy to self-critical steps.

    python -m pytest -q tests/test_scst.py
"""

import pytest
import torch

from conftest import TINY_TRAIN_ARGS, run_script
from dataset import load_captions, split_indices
from evaluation import normalize_caption
from model import read_checkpoint
from scst import CiderD, sampled_token_mask


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    data = load_captions("builtin", seed=0)
    rows = split_indices(data)["val"][:40]
    gts = {r: [normalize_caption(c) for c in data.captions[r]] for r in rows}
    # hypotheses of every quality: exact, another image's caption, a shortened one, nonsense
    res = {}
    for n, r in enumerate(rows):
        refs = gts[r]
        res[r] = [refs[0], gts[rows[n - 1]][0], " ".join(refs[0].split()[:3]), "zebra zebra on the moon"][n % 4]
    expected, per_image = Cider().compute_score(gts, {r: [h] for r, h in res.items()})
    cider = CiderD(list(gts.values()))
    ours = [cider.score(res[r], r, gts[r]) for r in rows]
    assert abs(sum(ours) / len(ours) - expected) < 1e-9
    assert max(abs(a - b) for a, b in zip(ours, per_image)) < 1e-9
    assert ours[0] > ours[2] > ours[3] == 0.0


def test_sampled_token_mask_stops_after_first_eos():
    eos, pad = 2, 0
    targets = torch.tensor([[5, 6, eos, pad, pad],
                            [5, eos, eos, pad, pad],
                            [5, 6, 7, 8, 9]])
    assert sampled_token_mask(targets, eos).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_run_switches_to_self_critical_steps(tmp_path):
    args = [*TINY_TRAIN_ARGS, "--scst_steps", "6", "--scst_samples", "4", "--log_interval", "3",
            "--metric", "val/cider"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 36/36" in result.stderr
    assert "| reward " in result.stderr
    path, = (tmp_path / "saved_models" / "sweep_runs").glob("*.pth")
    checkpoint = read_checkpoint(path)
    assert checkpoint["total_steps"] == 36
    assert checkpoint["config"]["scst_steps"] == 6
    rewards = [h["train/reward"] for h in checkpoint["metadata"]["history"] if "train/reward" in h]
    assert len(rewards) == 2 and all(r >= 0.0 for r in rewards)
    # parts from scratch take the self-critical multiple of the base rate, not the cross-entropy one
    config = checkpoint["config"]
    lrs = [h["train/lr"] for h in checkpoint["metadata"]["history"] if "train/reward" in h]
    assert lrs == [pytest.approx(config["learning_rate"] * config["scst_lr_multiplier"])] * 2
    assert config["scst_lr_multiplier"] != config["scratch_lr_multiplier"]


def test_single_sample_rejected(tmp_path):
    result = run_script("train.py", [*TINY_TRAIN_ARGS, "--scst_steps", "5", "--scst_samples", "1"], tmp_path)
    assert result.returncode == 2
    assert "--scst_samples=1 leaves no other sample as the baseline; pass at least 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "saved_models" / "sweep_runs").exists()
