"""Helpers of the training loop in train.py: devices and DDP, W&B, the optimizer, validation,
checkpoints and preemption-safe resume. train.py contains the settings, the loop and main().
"""

import copy
import glob
import gc
import logging
import math
import netrc
import os
import secrets
import string
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from data_pipeline import prepare_split
from dataset import (CaptionTokenizer, DataError, load_captions, pretrained_tokenizer, restrict_vocabulary, split_indices,
                     train_tokenizer)
from evaluation import caption_statistics, generate_captions, generation_options, score_captions
from model import (FORMAT_VERSION, CheckpointError, build_model, caption_loss, make_model_config, minilm_path,
                   save_checkpoint, unknown_decoder, write_summary)

log = logging.getLogger("train")


class StopFlag:
    """Set by the SIGTERM handler; the loop polls it between steps."""

    def __init__(self):
        self.requested = False

    def set(self):
        self.requested = True


@contextmanager
def gc_paused():
    """Pause automatic garbage collection in a block that creates many long-lived objects.

    Importing wandb, transformers and timm and building the model create millions of objects
    that live until the process exits. The collector walked them again and again, which took
    0.75 s of each run's setup (2-core CPU, Python 3.11).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------------------
# Devices, DDP, precision

@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(name, local_rank=0):
    """CUDA, then Apple MPS, then CPU for 'auto'; raise ValueError for a device this machine lacks."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"--device={name} is not a device name ({e}); use auto, cpu, cuda, cuda:1 or mps") from e
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device={name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"--device={name}: Apple MPS is not available on this machine; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(config):
    """Join the torchrun process group if there is one (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config["device"], local_rank)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistContext(rank, world_size, local_rank, device)


def teardown_distributed(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def autocast_factory(precision, device):
    """Return (a no-argument autocast context factory, resolved precision name)."""
    if precision == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if cuda_bf16 else "fp32"
    if precision == "fp32":
        return nullcontext, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), precision


def all_ranks_max(value, ctx):
    """Max of a float over all processes (the value itself in a single process)."""
    if not ctx.distributed:
        return value
    t = torch.tensor([float(value)], device=ctx.device if ctx.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


# --------------------------------------------------------------------------------------
# W&B

def wandb_api_key_configured():
    """True when W&B has an API key here (WANDB_API_KEY or a netrc entry); never uses the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def init_wandb(config, ctx, resume_state=None):
    """Start this process's W&B run (offline without an API key) and apply sweep overrides to config."""
    import wandb
    if not ctx.is_main:
        return wandb.init(mode="disabled")
    mode = config["wandb_mode"]
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_api_key_configured() else "offline")
    kwargs = {"project": config["wandb_project"], "entity": config["wandb_entity"], "config": config,
              "mode": mode, "job_type": "train"}
    if resume_state is not None and not os.environ.get("WANDB_RUN_ID"):
        kwargs.update(id=resume_state["wandb_run_id"], resume="allow")
    run = wandb.init(**kwargs)
    for key, value in dict(run.config).items():
        if key in config:
            config[key] = value  # a sweep's values override defaults and the command line
    return run


def new_run_id():
    """Generate a W&B-style run id (8 lowercase letters and digits) for processes without a W&B run."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def resolve_run_id(run, resume_state):
    """Return the id that names the checkpoint: the resumed run's, W&B's, WANDB_RUN_ID, or a new one."""
    if resume_state is not None:
        return resume_state["run_id"]
    if run.settings.mode != "disabled":
        return run.id
    return os.environ.get("WANDB_RUN_ID") or new_run_id()


def samples_table(samples):
    import wandb
    return wandb.Table(columns=["image", "caption", "reference"],
                       data=[[s["image"], s["caption"], s["reference"]] for s in samples])


def finish_wandb(run, exit_code=0, preempting=False):
    if run is None:
        return
    if preempting:
        run.mark_preempting()
    run.finish(exit_code=exit_code)


# --------------------------------------------------------------------------------------
# Model, optimizer, schedule

def make_tokenizer(config, train_captions):
    """Return the caption tokenizer: trained on the training captions, or the pretrained decoder's own."""
    if config["decoder"] == "transformer":
        return train_tokenizer(train_captions, vocab_size=config["vocab_size"])
    from transformers import AutoTokenizer
    source = minilm_path() if config["decoder"] == "minilm" else config["decoder"]
    try:
        hf_tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise unknown_decoder(config["decoder"], e) from e
    tokenizer = pretrained_tokenizer(hf_tokenizer)
    if config["decoder_vocab"] == "full":
        return tokenizer
    restricted, source_ids = restrict_vocabulary(tokenizer, train_captions)
    if source_ids is None:
        log.info("decoder %s: its tokenizer is not WordPiece, so it keeps its full vocabulary", config["decoder"])
        return tokenizer
    log.info("decoder vocabulary: %d of %d tokens (those of the training captions)", restricted.vocab_size,
             tokenizer.vocab_size)
    restricted.source_ids = source_ids
    return restricted


def make_optimizer(model, config):
    """AdamW or Adam with two learning rates (pretrained, scratch) and decay on matrices only."""
    scratch = set(model.model_config["scratch_parameters"])
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_scratch = name in scratch
        decay = param.ndim >= 2 and "wte" not in name and "wpe" not in name and "embeddings" not in name
        lr = config["learning_rate"] * (config["scratch_lr_multiplier"] if is_scratch else 1.0)
        key = (is_scratch, decay)
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": config["weight_decay"] if decay else 0.0,
                                "scratch": is_scratch})
        groups[key]["params"].append(param)
    kind = torch.optim.AdamW if config["optimizer"] == "adamw" else torch.optim.Adam
    ordered = [groups[k] for k in sorted(groups)]
    return kind(ordered, lr=config["learning_rate"], betas=(0.9, config["adam_beta2"]))


def make_scheduler(optimizer, config, total_steps):
    from transformers import get_scheduler
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[config["scheduler"]]
    warmup = min(config["warmup_steps"], max(total_steps - 1, 0))
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def decoding_defaults(config):
    return {"do_sample": config["do_sample"], "top_k": config["top_k"], "temperature": config["temperature"],
            "num_beams": config["num_beams"], "no_repeat_ngram_size": config["no_repeat_ngram_size"],
            "rerank_neighbors": config.get("rerank_neighbors", 0), "max_length": config["max_caption_length"]}


# --------------------------------------------------------------------------------------
# Validation

@torch.no_grad()
def evaluate(model, tokenizer, val, config, ctx, autocast):
    """Teacher-forced val/loss over all validation captions, then caption metrics on up to
    eval_max_images images decoded with the run's decoding settings. Returns (metrics, samples)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(val), 256):
        idx = list(range(start, min(start + 256, len(val))))
        inputs, input_ids, attention_mask, targets = val.caption_batch(idx)
        inputs = {k: v.to(ctx.device) for k, v in inputs.items()}
        with autocast():
            logits = model(input_ids.to(ctx.device), attention_mask.to(ctx.device), **inputs)
        tokens = int((targets != -100).sum())
        total += caption_loss(logits, targets.to(ctx.device)).item() * tokens
        count += tokens
    metrics = {"val/loss": total / max(count, 1)}
    if not math.isfinite(metrics["val/loss"]):
        # non-finite weights: no caption can be decoded from them, and this point is never kept
        model.train()
        return {**metrics, **{f"val/{k}": math.nan for k in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l",
                                                               "distinct", "repeat3", "unk")}}, []

    rows = val.valid_rows[: config["eval_max_images"]]
    hypotheses = generate_captions(model, tokenizer, val.image_batches(rows, 64),
                                   generation_options(decoding_defaults(config)), ctx.device, autocast)
    references = {r: val.references[r] for r in rows}
    scores = score_captions(references, dict(zip(rows, hypotheses)), meteor=config["meteor"])
    metrics.update({f"val/{k}": v for k, v in scores.items()})
    metrics.update({f"val/{k}": v for k, v in caption_statistics(hypotheses).items()})
    samples = [{"image": os.path.basename(val.names[r]), "caption": h, "reference": val.references[r][0]}
               for r, h in zip(rows[:5], hypotheses[:5])]
    model.train()
    return metrics, samples


def resolve_metric_goal(config):
    """Return "minimize" or "maximize" for config["metric"], resolving metric_goal "auto"."""
    from checkpoints import metric_goal
    return metric_goal(config["metric"]) if config["metric_goal"] == "auto" else config["metric_goal"]


def is_better(value, best, goal):
    if not math.isfinite(value):
        return False
    return best is None or (value < best if goal == "minimize" else value > best)


# --------------------------------------------------------------------------------------
# Checkpoints and resumable state

def checkpoint_path(config, run_id):
    name = f"model_sweep_{run_id}_{config['optimizer']}_lr{config['learning_rate']:.3g}_{config['scheduler']}.pth"
    return Path(config["output_dir"]) / name


def write_run_files(path, checkpoint):
    """Write the checkpoint, then its JSON summary (read by --list-models without loading weights)."""
    save_checkpoint(path, checkpoint)
    write_summary(path, checkpoint["metadata"])


def check_run_not_finished(config, run_id, option):
    """Reject a run id whose completed checkpoint is already in --output_dir, which this run would replace.

    The checkpoint of an unfinished run (running, preempted) or of a failed one is replaced on
    purpose: the resumed or repeated run writes the final one.
    """
    from checkpoints import load_record
    for path in sorted(Path(config["output_dir"]).glob(f"model_sweep_{glob.escape(run_id)}_*.pth")):
        record = load_record(path)  # an unreadable file gives a record with status "unreadable"
        if record.run_id == run_id and record.status == "completed":
            raise CheckpointError(f"{option} names run {run_id}, which already has a completed checkpoint: "
                                  f"{path}; start a new run (another WANDB_RUN_ID, or none), or move that file away "
                                  f"to train the run again")


def find_resume_state(config):
    """Return the resumable state to continue from: --resume, or a rerun under the same WANDB_RUN_ID."""
    path = config["resume"]
    if path is None and os.environ.get("WANDB_RUN_ID"):
        candidate = Path(config["resume_dir"]) / f"{os.environ['WANDB_RUN_ID']}.pt"
        path = str(candidate) if candidate.exists() else None
    if path is None:
        return None
    if not Path(path).is_file():
        raise CheckpointError(f"resume state {path} not found; pass a file from {config['resume_dir']}/")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"resume state {path} cannot be read ({e}); start the run again without --resume")
    if not isinstance(state, dict) or "run_id" not in state or "optimizer" not in state:
        raise CheckpointError(f"{path} is not a resume state (train.py writes those to {config['resume_dir']}/ on "
                              f"SIGTERM; a finished run's .pth cannot be continued); start a new run without --resume")
    log.info("resuming run %s from %s at step %d", state["run_id"], path, state["step"])
    return state


# --------------------------------------------------------------------------------------
# The run

def prepare(config, ctx, resume_state):
    """Load data, tokenizer and model; return (model, tokenizer, train_inputs, val_inputs, data_stats)."""
    data = load_captions(config["data"], seed=config["seed"])
    splits = split_indices(data, config["val_fraction"], config["seed"], config["max_train_samples"],
                           config["max_val_samples"])
    for name in ("train", "val"):
        if not splits[name]:
            raise DataError(f"{config['data']} has no {name} images; add a {name} split or lower --val_fraction")
    log.info("data %s: %d train, %d val images (%d test images held out)", data.name, len(splits["train"]),
             len(splits["val"]), len(splits["test"]))
    if resume_state is None:
        tokenizer = make_tokenizer(config, [c for i in splits["train"] for c in data.captions[i]])
        with gc_paused():  # imports transformers and timm
            model = build_model(make_model_config(config, tokenizer), pretrained=True)
    else:
        tokenizer = CaptionTokenizer.from_state_dict(resume_state["tokenizer"])
        with gc_paused():
            model = build_model(dict(resume_state["model_config"]), pretrained=False)
        model.load_state_dict(resume_state["model_state_dict"])
    model.to(ctx.device)
    train_inputs = prepare_split("train", data, splits["train"], model, tokenizer, config, ctx.device)
    val_inputs = prepare_split("val", data, splits["val"], model, tokenizer, config, ctx.device)
    return model, tokenizer, train_inputs, val_inputs, data.stats


def build_checkpoint(state, status, reason):
    """Assemble the checkpoint of the best validation point from a train.RunState."""
    config, best = state.config, state.best
    metadata = {
        "format_version": FORMAT_VERSION, "run_id": state.run_id, "wandb_run_id": state.run_id,
        "sweep_id": os.environ.get("WANDB_SWEEP_ID"), "status": status, "status_reason": reason,
        "optimizer": config["optimizer"], "learning_rate": config["learning_rate"],
        "scheduler": config["scheduler"], "metric": config["metric"], "metric_goal": resolve_metric_goal(config),
        "metrics": best["metrics"], "best_step": best["step"], "final_train_loss": state.last_train_loss,
        "total_steps": state.step, "skipped_steps": state.skipped, "timing": state.timing,
        "config": config, "encoder": config["encoder"], "decoder": config["decoder"],
        "samples": best["samples"], "history": state.history, "data_stats": state.data_stats, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # --data as typed may be relative to the folder train.py ran in; --evaluate DATA matches either.
        "data_path": None if config["data"] == "builtin" else os.path.realpath(os.path.expanduser(config["data"])),
    }
    model_config = state.model.model_config
    return {
        "format_version": FORMAT_VERSION,
        "encoder_state_dict": best["encoder"], "decoder_state_dict": best["decoder"],
        "optimizer_state_dict": best["optimizer"], "config": config, "model_config": model_config,
        "tokenizer": state.tokenizer.state_dict(),
        "preprocessing": {"image_size": model_config["image_size"], "mean": model_config["mean"],
                          "std": model_config["std"], "resize": "bicubic, no crop"},
        "decoding": decoding_defaults(config), "metrics": best["metrics"],
        "final_train_loss": state.last_train_loss, "total_steps": state.step, "wandb_run_id": state.run_id,
        "status": status, "metadata": metadata,
        **({"consensus": state.model.consensus.state_dict()} if state.model.consensus is not None else {}),
    }


def snapshot(model, optimizer):
    """CPU copies of the weights and optimizer state, kept for the best validation point."""
    def cpu(tree):
        return {k: (v.detach().cpu().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in tree.items()}
    opt = optimizer.state_dict()
    opt_state = {k: cpu(v) for k, v in opt["state"].items()}
    return cpu(model.encoder.state_dict()), cpu(model.decoder.state_dict()), {"state": opt_state,
                                                                              "param_groups": opt["param_groups"]}
