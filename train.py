"""Train one image-captioning run and save its best checkpoint.

A tiny CPU run on the built-in synthetic data (no downloads, about a minute):
    python train.py --max_steps 150
Flickr8k-style data (captions.csv + images/ + splits.csv):
    python train.py --data ../shared/data/flickr8k_224 --max_steps 200
What a W&B sweep agent runs (one --key=value token per parameter):
    python train.py --optimizer=adamw --learning_rate=2.7e-05 --scheduler=cosine --freeze_encoder=True
Several GPUs, one run (DDP; gloo on CPU):
    torchrun --nproc_per_node=4 train.py --data DATA
Continue a run stopped by SIGTERM (preemption):
    python train.py --resume saved_models/resume/RUN_ID.pt

The checkpoint goes to saved_models/sweep_runs/model_sweep_{run_id}_{optimizer}_lr{lr}_{scheduler}.pth
with a JSON summary of the same name beside it. Exit status: 0 completed, 1 failed (diverged or
error), 2 invalid settings or data, 143 stopped by SIGTERM with a resumable state saved.
"""

import argparse
import gc
import logging
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# Taken before the imports below, so that timing.setup_s counts them (torch alone took 1.2 to 2 s, 2-core CPU).
PROCESS_START = time.time()

import torch  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import training  # noqa: E402
from checkpoints import same_data  # noqa: E402
from data_pipeline import prefetch, train_batches  # noqa: E402
from dataset import DataError  # noqa: E402
from model import CheckpointError, caption_loss, save_checkpoint  # noqa: E402

log = logging.getLogger("train")

# Settings: (name, default, type, help). The sweep sets any of them by name; keep names stable.
SETTINGS = [
    # data
    ("data", "builtin", str, "'builtin' (synthetic shapes, no files) or a dataset path, see dataset.py"),
    ("val_fraction", 0.1, float, "share of images held out for validation when the data has no official split"),
    ("max_train_samples", None, int, "use at most this many training images (None = all)"),
    ("max_val_samples", None, int, "use at most this many validation images (None = all)"),
    ("eval_max_images", 500, int, "validation images captioned and scored at each evaluation"),
    ("meteor", True, bool, "also score METEOR when java is installed (its JVM adds about 10 s per run)"),
    # model
    ("encoder", "efficientnet_lite0", str, "efficientnet_lite0 | tiny_cnn | a transformers vision model name"),
    ("freeze_encoder", True, bool, "keep the encoder fixed and cache its features once (much faster on CPU)"),
    ("decoder", "transformer", str, "transformer (from scratch) | minilm | a transformers causal LM name"),
    ("decoder_vocab", "captions", str, "pretrained WordPiece decoders (minilm): 'captions' keeps only the tokens of "
                                       "the training captions (6,670 of MiniLM's 30,522 on Flickr8k: 1.55x faster "
                                       "steps), 'full' keeps them all"),
    ("d_model", 256, int, "decoder width of the from-scratch transformer"),
    ("num_layers", 3, int, "decoder layers of the from-scratch transformer"),
    ("num_heads", 4, int, "attention heads of the from-scratch transformer"),
    ("dropout", 0.1, float, "dropout of the from-scratch transformer"),
    ("vocab_size", 5000, int, "WordPiece vocabulary trained on the training captions (from-scratch decoder)"),
    ("max_caption_length", 32, int, "tokens per caption including [BOS] and [EOS]; longer ones are cut"),
    # optimisation
    ("optimizer", "adamw", str, "adamw | adam"),
    ("learning_rate", 3e-5, float, "base learning rate, for pretrained weights"),
    ("scratch_lr_multiplier", 30.0, float, "parts trained from scratch use learning_rate times this"),
    ("weight_decay", 0.01, float, "weight decay of matrices (biases, norms and embeddings get none)"),
    ("adam_beta2", 0.98, float, "Adam beta2; 0.98 is steadier than 0.999 for short transformer runs"),
    ("scheduler", "cosine", str, "cosine | linear | constant, each after a linear warmup"),
    ("warmup_steps", 50, int, "steps of linear learning-rate warmup"),
    ("grad_clip", 1.0, float, "clip the gradient norm to this (0 = no clipping)"),
    ("label_smoothing", 0.1, float, "label smoothing of the caption cross-entropy"),
    ("batch_size", 64, int, "captions per optimizer step, over all processes"),
    ("group_by_length", True, bool, "batch captions of similar length together (batches in random order), so "
                                      "less compute goes to padding: 1.6x faster on Flickr8k"),
    ("max_steps", 400, int, "optimizer steps of the run"),
    ("epochs", None, float, "train this many passes over the training captions instead of --max_steps"),
    ("scst_steps", 0, int, "self-critical steps after the cross-entropy ones: the model is fine-tuned on its "
                           "own sampled captions, rewarded by their CIDEr-D (0 = off)"),
    ("scst_images", 32, int, "training images per self-critical step"),
    ("scst_samples", 5, int, "captions sampled per image at each self-critical step"),
    ("scst_lr_multiplier", 3.0, float, "self-critical steps train parts from scratch at learning_rate times this "
                                       "(constant), pretrained parts at learning_rate"),
    ("seed", 0, int, "seed of initialisation, data order and the validation split"),
    ("max_bad_steps", 10, int, "consecutive non-finite steps after which the run fails as diverged"),
    # validation and decoding
    ("eval_interval", 200, int, "steps between validations; one always runs at the end"),
    ("log_interval", 20, int, "steps between progress lines"),
    ("metric", "val/loss", str, "validation metric that picks the checkpoint kept (val/loss, val/cider, ...)"),
    ("metric_goal", "auto", str, "minimize | maximize the metric; auto minimizes losses and the repeat and "
                                 "[UNK] rates, and maximizes caption scores"),
    ("top_k", 50, int, "top-k sampling of validation captions; stored as the run's decoding default"),
    ("temperature", 1.0, float, "sampling temperature of validation captions; stored as decoding default"),
    ("do_sample", True, bool, "sample validation captions with top_k/temperature (False: greedy or beam)"),
    ("num_beams", 1, int, "beam width of validation captions (1 = no beam search)"),
    ("no_repeat_ngram_size", 0, int, "forbid repeating n-grams of this size in captions (0 = off)"),
    ("rerank_neighbors", 0, int, "keep the beam whose caption agrees most (CIDEr-D) with the captions of this many "
                                 "nearest training images (all of them at most); needs --num_beams 2+, --do_sample False "
                                 "and a frozen encoder; stores every training image's pooled features and captions "
                                 "in the checkpoint, 15 MB for Flickr8k (0 = off, consensus.py)"),
    # system
    ("device", "auto", str, "auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:1 | mps"),
    ("precision", "auto", str, "auto (bf16 on GPUs that support it, else fp32) | bf16 | fp16 | fp32"),
    ("compile", False, bool, "torch.compile the model"),
    ("output_dir", "saved_models/sweep_runs", str, "folder of checkpoints"),
    ("cache_dir", "saved_models/cache", str, "folder of decoded-image and feature caches"),
    ("resume_dir", "saved_models/resume", str, "folder of resumable states written on SIGTERM"),
    ("resume", None, str, "continue the run saved in this resumable state file"),
    ("wandb_project", "image-captioning-sweeps", str, "W&B project"),
    ("wandb_entity", None, str, "W&B entity (user or team); None = your default"),
    ("wandb_mode", "auto", str, "auto (online with an API key, else offline) | online | offline | disabled"),
    ("log_model", True, bool, "also log the checkpoint to W&B as a model artifact"),
]
DEFAULTS = {name: default for name, default, _, _ in SETTINGS}
PATH_SETTINGS = ("data", "output_dir", "resume_dir", "cache_dir")
CHOICES = {"optimizer": ("adamw", "adam"), "scheduler": ("cosine", "linear", "constant"),
           "decoder_vocab": ("captions", "full"), "metric_goal": ("auto", "minimize", "maximize"),
           "precision": ("auto", "bf16", "fp16", "fp32"), "wandb_mode": ("auto", "online", "offline", "disabled")}
# Keys train.py logs; the sweep's metric.name must be one of them.
LOGGED_METRICS = ("train/loss", "train/lr", "train/grad_norm", "train/skipped_steps", "train/images_per_sec",
                  "train/reward",
                  "val/loss", "val/bleu1", "val/bleu2", "val/bleu3", "val/bleu4", "val/cider", "val/rouge_l",
                  "val/meteor", "val/distinct", "val/repeat3", "val/unk")


def parse_bool(text):
    """Parse what `wandb agent` and people write for booleans: True/False, true/false, 1/0, yes/no."""
    value = str(text).strip().lower()
    if value in ("true", "1", "yes", "y", "on"):
        return True
    if value in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False, 1/0), got {text!r}")


def optional(kind):
    """Wrap a type so that 'None' (how the agent renders a null value) parses as None."""
    def parse(text):
        return None if str(text).strip() in ("None", "none", "null") else kind(text)
    parse.__name__ = kind.__name__
    return parse


def build_parser(defaults=True):
    """Return the command-line parser. Without defaults, it parses only the settings given."""
    parser = argparse.ArgumentParser(description="Train one image-captioning run.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default, kind, text in SETTINGS:
        parse = parse_bool if kind is bool else optional(kind)
        parser.add_argument(f"--{name}", type=parse, default=default if defaults else argparse.SUPPRESS,
                            choices=CHOICES.get(name), help=text)
    return parser


def parse_config(argv=None):
    """Parse the command line into the run's config dict (plain JSON-able values)."""
    return vars(build_parser().parse_args(argv))


def validate_config(config):
    """Raise ValueError naming the setting for values that cannot train."""
    for name, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"--{name}={value} is not a finite number; pass a finite value")
    for key in ("learning_rate", "batch_size", "max_steps", "d_model", "num_layers", "num_heads", "vocab_size",
                "eval_interval", "log_interval", "max_bad_steps", "eval_max_images", "epochs", "scst_samples",
                "scst_images", "temperature", "top_k", "num_beams"):
        if config[key] is not None and config[key] <= 0:
            raise ValueError(f"--{key}={config[key]} must be positive")
    for key in ("weight_decay", "grad_clip", "dropout", "label_smoothing", "warmup_steps", "scratch_lr_multiplier",
                "scst_steps", "scst_lr_multiplier", "rerank_neighbors"):
        if config[key] < 0:
            raise ValueError(f"--{key}={config[key]} must not be negative")
    for key in ("dropout", "label_smoothing", "adam_beta2"):
        if config[key] >= 1:
            raise ValueError(f"--{key}={config[key]} must be below 1")
    if not 0 <= config["adam_beta2"]:
        raise ValueError(f"--adam_beta2={config['adam_beta2']} must be in [0, 1); 0.98 or 0.999 are usual")
    if not 0 < config["val_fraction"] < 1:
        raise ValueError(f"--val_fraction={config['val_fraction']} must be between 0 and 1 (0.1 holds out 10% of "
                         f"the images when the data has no official split)")
    if config["max_caption_length"] < 3:
        raise ValueError(f"--max_caption_length={config['max_caption_length']} leaves no room for a word between "
                         f"[BOS] and [EOS]; pass at least 3")
    if config["scst_steps"] and config["scst_samples"] < 2:
        raise ValueError(f"--scst_samples={config['scst_samples']} leaves no other sample as the baseline; "
                         f"pass at least 2")
    if config["rerank_neighbors"]:
        option = f"--rerank_neighbors={config['rerank_neighbors']}"
        if config["num_beams"] < 2:
            raise ValueError(f"{option} chooses among beams, but --num_beams={config['num_beams']}; pass --num_beams 2 "
                             f"or more (8 in the README's recipe), or --rerank_neighbors 0")
        if config["do_sample"]:
            raise ValueError(f"{option} reranks beam-search captions, but --do_sample=True samples the beams; "
                             f"pass --do_sample False, or --rerank_neighbors 0")
        if not config["freeze_encoder"]:
            raise ValueError(f"{option} stores the features of the frozen backbone, but --freeze_encoder=False "
                             f"fine-tunes it; pass --freeze_encoder True, or --rerank_neighbors 0")
    if config["metric"] not in LOGGED_METRICS or not config["metric"].startswith("val/"):
        raise ValueError(f"--metric={config['metric']} is not a validation metric train.py logs; use one of "
                         f"{', '.join(m for m in LOGGED_METRICS if m.startswith('val/'))}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config["batch_size"] % world_size:
        raise ValueError(f"--batch_size={config['batch_size']} is not divisible by the {world_size} processes")
    if config["metric"] == "val/meteor" and (not config["meteor"] or shutil.which("java") is None):
        reason = "--meteor=False" if not config["meteor"] else "java is not installed"
        raise ValueError(f"--metric=val/meteor is never logged here: {reason}; pass --metric val/cider, or install java "
                         f"and pass --meteor True")
    if not str(config["data"]).strip():
        raise ValueError("--data is empty; pass a dataset path, or builtin for the synthetic shapes")
    output_dir = Path(config["output_dir"])
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir={output_dir} is a file, not a folder; pass a folder for the checkpoints")
    if config["decoder"] == "transformer" and config["d_model"] % config["num_heads"]:
        raise ValueError(f"--d_model={config['d_model']} is not divisible by --num_heads={config['num_heads']}")


@dataclass
class RunState:
    """Progress of one run: the state that checkpoints and resumable states are built from."""
    config: dict
    run_id: str
    model: torch.nn.Module
    tokenizer: object
    data_stats: dict
    step: int = 0
    skipped: int = 0
    consecutive_bad: int = 0
    last_train_loss: float = float("nan")
    best: dict = None
    timing: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # every logged train/val dict with its step


def save_resume_state(state, optimizer, scheduler, scaler, path):
    """Write everything needed to continue the run bit for bit (weights, optimizer, step, RNG)."""
    save_checkpoint(path, {
        "run_id": state.run_id, "wandb_run_id": state.run_id, "config": state.config,
        "model_config": state.model.model_config, "tokenizer": state.tokenizer.state_dict(),
        "model_state_dict": state.model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": state.step,
        "skipped": state.skipped, "consecutive_bad": state.consecutive_bad,
        "last_train_loss": state.last_train_loss, "best": state.best, "history": state.history,
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    })


def restore_resume_state(state, resume, optimizer, scheduler, scaler):
    optimizer.load_state_dict(resume["optimizer"])
    scheduler.load_state_dict(resume["scheduler"])
    scaler.load_state_dict(resume["scaler"])
    for key in ("step", "skipped", "consecutive_bad", "last_train_loss", "best", "history"):
        setattr(state, key, resume[key])
    torch.set_rng_state(resume["rng"])
    if resume["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(resume["cuda_rng"])


def finish_run(state, run, path, status, reason=""):
    """Write the final checkpoint (best weights) and the W&B summary; return the status."""
    if status != "completed":
        log.error("run %s %s: %s", state.run_id, status, reason)
    if state.best is None:
        if status != "preempted":
            status = "failed"
            log.error("run %s failed: no checkpoint saved, because the run never reached a finite validation "
                      "point; lower --learning_rate or --grad_clip", state.run_id)
        return status
    training.write_run_files(path, training.build_checkpoint(state, status, reason))
    run.summary.update({**state.best["metrics"], "status": status, "best_step": state.best["step"],
                        "total_steps": state.step, "skipped_steps": state.skipped, "checkpoint": str(path)})
    if status == "completed" and state.config["log_model"] and run.settings.mode != "disabled":
        import wandb
        artifact = wandb.Artifact(f"model-{state.run_id}", type="model", metadata=state.best["metrics"])
        artifact.add_file(str(path))
        run.log_artifact(artifact)
    log.info("%s checkpoint: %s", status, path)
    return status


def record_decoder_shape(config, model, run):
    """Record a pretrained decoder's own shape in the run's config, in place of the settings it ignores."""
    if config["decoder"] == "transformer":
        return
    hf_config = model.decoder.config
    real = {"d_model": hf_config.hidden_size, "num_layers": hf_config.num_hidden_layers,
            "num_heads": hf_config.num_attention_heads}
    ignored = [f"--{key}={config[key]}" for key in real if config[key] not in (DEFAULTS[key], real[key])]
    if ignored:
        log.warning("--decoder %s has %d layers of width %d with %d heads; ignoring %s (they shape --decoder "
                    "transformer only)", config["decoder"], real["num_layers"], real["d_model"], real["num_heads"],
                    " ".join(ignored))
    config.update(real)
    if run.settings.mode != "disabled":
        run.config.update(real, allow_val_change=True)


def train(config, run, ctx, stop, resume_state=None):
    """Train one run; return "completed", "failed" (diverged) or "preempted" (SIGTERM)."""
    torch.manual_seed(config["seed"])
    model, tokenizer, train_inputs, val_inputs, data_stats = training.prepare(config, ctx, resume_state)
    record_decoder_shape(config, model, run)
    xe_steps = config["max_steps"]
    if config["epochs"]:
        xe_steps = max(1, math.ceil(config["epochs"] * len(train_inputs) / config["batch_size"]))
    total_steps = xe_steps + config["scst_steps"]
    if config["rerank_neighbors"]:
        from consensus import ConsensusMemory
        model.consensus = ConsensusMemory.from_split(train_inputs)
    optimizer = training.make_optimizer(model, config)
    scheduler = training.make_scheduler(optimizer, config, xe_steps)
    scst = None
    if config["scst_steps"]:
        from scst import SelfCritical
        scst = SelfCritical(train_inputs, tokenizer, config["scst_samples"], config["max_caption_length"],
                            config["seed"])
        scst_images = max(ctx.world_size, config["scst_images"])
    autocast, precision = training.autocast_factory(config["precision"], ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=precision == "fp16")
    run_id = training.resolve_run_id(run, resume_state)
    state = RunState(config, run_id, model, tokenizer, data_stats)
    if resume_state is not None:
        restore_resume_state(state, resume_state, optimizer, scheduler, scaler)
    net = DistributedDataParallel(model) if ctx.distributed else model
    if config["compile"]:
        net = torch.compile(net)
    params = [p for p in model.parameters() if p.requires_grad]
    path = training.checkpoint_path(config, run_id)
    resume_path = os.path.join(config["resume_dir"], f"{run_id}.pt")
    indices = train_batches(train_inputs, config["batch_size"], ctx.world_size, ctx.rank, config["seed"], state.step,
                            config["group_by_length"])
    batches = prefetch(train_inputs.caption_batch(idx) for _, idx in indices)
    if ctx.is_main:
        log.info("run %s: %d steps of %d captions, %.2fM trainable parameters, %s, %s%s", run_id, total_steps,
                 config["batch_size"], sum(p.numel() for p in params) / 1e6, ctx.device, precision,
                 f", {ctx.world_size} processes" if ctx.distributed else "")
    state.timing = {"setup_s": time.time() - PROCESS_START, "eval_s": 0.0}
    loop_start = window_start = time.time()
    window_steps, window_loss, window_reward = 0, 0.0, 0.0
    model.train()
    while state.step < total_steps:
        # preemption: every rank stops at the same step; rank 0 saves a resumable state
        if training.all_ranks_max(stop.requested, ctx):
            if ctx.is_main:
                save_resume_state(state, optimizer, scheduler, scaler, resume_path)
                log.warning("SIGTERM: saved resumable state at step %d to %s; continue with --resume %s",
                            state.step, resume_path, resume_path)
            return "preempted"

        # forward, backward: cross-entropy on the references, then self-critical steps
        if state.step < xe_steps:
            inputs, input_ids, attention_mask, targets = next(batches)
            inputs = {k: v.to(ctx.device, non_blocking=True) for k, v in inputs.items()}
            with autocast():
                logits = net(input_ids.to(ctx.device), attention_mask.to(ctx.device), **inputs)  # (B, L, V)
            loss = caption_loss(logits, targets.to(ctx.device), config["label_smoothing"])
        else:
            for group in optimizer.param_groups:  # a constant rate, lower than the cross-entropy peak
                group["lr"] = config["learning_rate"] * (config["scst_lr_multiplier"] if group["scratch"] else 1.0)
            rows = scst.image_rows(state.step - xe_steps, scst_images)[ctx.rank::ctx.world_size]
            loss, reward = scst.loss(model, net, rows, ctx.device, autocast)
            window_reward += reward
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config["grad_clip"] or float("inf"))

        # a non-finite loss or gradient skips the update; too many in a row fail the run
        loss_value = loss.item()
        finite = math.isfinite(loss_value) and (precision == "fp16" or math.isfinite(grad_norm.item()))
        state.step += 1
        if training.all_ranks_max(not finite, ctx):
            optimizer.zero_grad(set_to_none=True)
            state.skipped += 1
            state.consecutive_bad += 1
            if state.consecutive_bad >= config["max_bad_steps"]:
                reason = (f"diverged: {state.consecutive_bad} consecutive non-finite steps at step {state.step} "
                          f"(learning_rate={config['learning_rate']}); lower --learning_rate or --grad_clip")
                run.log({"train/skipped_steps": state.skipped}, step=state.step)
                return finish_run(state, run, path, "failed", reason) if ctx.is_main else "failed"
        else:
            # the update; a skipped step still logs and validates below when they are due
            state.consecutive_bad = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if state.step <= xe_steps:
                scheduler.step()
            state.last_train_loss = loss_value
            window_steps, window_loss = window_steps + 1, window_loss + loss_value

        # log a progress line
        if state.step % config["log_interval"] == 0 or state.step == total_steps:
            elapsed = time.time() - window_start
            images_per_sec = window_steps * config["batch_size"] / max(elapsed, 1e-9)
            lr = optimizer.param_groups[-1]["lr"]
            eta = (total_steps - state.step) * elapsed / max(window_steps, 1)
            reward = window_reward / max(window_steps, 1) if state.step > xe_steps else None
            if ctx.is_main:
                log.info("step %d/%d | loss %.4f%s | lr %.2e | %.0f img/s | eta %s", state.step, total_steps,
                         window_loss / max(window_steps, 1), "" if reward is None else f" | reward {reward:.3f}", lr,
                         images_per_sec, time.strftime("%M:%S", time.gmtime(eta)))
                logged = {"train/loss": window_loss / max(window_steps, 1), "train/lr": lr,
                          "train/grad_norm": grad_norm.item(), "train/skipped_steps": state.skipped,
                          "train/images_per_sec": images_per_sec}
                if reward is not None:
                    logged["train/reward"] = reward
                run.log(logged, step=state.step)
                state.history.append({"step": state.step, **logged})
            window_start, window_steps, window_loss, window_reward = time.time(), 0, 0.0, 0.0

        # evaluate; keep the best validation point as the run's checkpoint
        if state.step % config["eval_interval"] == 0 or state.step == total_steps:
            eval_start = time.time()
            failed = 0.0
            if ctx.is_main:
                metrics, samples = training.evaluate(model, tokenizer, val_inputs, config, ctx, autocast)
                log.info("eval step %d: %s", state.step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
                run.log({**metrics, "val/samples": training.samples_table(samples)}, step=state.step)
                state.history.append({"step": state.step, **metrics})
                failed = float(not math.isfinite(metrics["val/loss"]))
                if training.is_better(metrics[config["metric"]], state.best and state.best["metrics"][config["metric"]],
                                      training.resolve_metric_goal(config)):
                    encoder, decoder, opt = training.snapshot(model, optimizer)
                    state.best = {"metrics": metrics, "step": state.step, "samples": samples,
                                  "encoder": encoder, "decoder": decoder, "optimizer": opt}
                    training.write_run_files(path, training.build_checkpoint(state, "running", ""))
            if training.all_ranks_max(failed, ctx):
                reason = f"validation loss is not finite at step {state.step}"
                return finish_run(state, run, path, "failed", reason) if ctx.is_main else "failed"
            state.timing["eval_s"] += time.time() - eval_start
            window_start = time.time()

    state.timing["loop_s"] = time.time() - loop_start
    if ctx.is_main and os.path.exists(resume_path):
        os.remove(resume_path)  # the run is done; its resumable state is no longer needed
    return finish_run(state, run, path, "completed") if ctx.is_main else "completed"


def explicit_options(argv=None):
    """Return the settings given on the command line, without the defaults."""
    return vars(build_parser(defaults=False).parse_args(argv))


def check_resume_options(config, resume_state, explicit):
    """Reject (--resume) or log (a WANDB_RUN_ID rerun) values that differ from a resumed run's saved settings."""
    env_id = os.environ.get("WANDB_RUN_ID")
    if config["resume"] is not None and env_id and env_id != resume_state["wandb_run_id"]:
        raise ValueError(f"WANDB_RUN_ID={env_id} but --resume {config['resume']} continues run "
                         f"{resume_state['wandb_run_id']}; unset WANDB_RUN_ID or set it to {resume_state['wandb_run_id']}")
    saved = {**DEFAULTS, **resume_state["config"]}
    ignored = []
    for key, value in explicit.items():
        # paths are compared resolved, so saved_models/x/ and ./saved_models/x are the same folder
        same = same_data(value, saved.get(key)) if key in PATH_SETTINGS else value == saved.get(key)
        if key != "resume" and not same:
            ignored.append(f"--{key}={value}")
    if not ignored:
        return
    if config["resume"] is not None:
        raise ValueError(f"--resume {config['resume']} continues run {resume_state['run_id']} with its saved settings, "
                         f"so {' '.join(ignored)} would be ignored; drop them, or start a new run without --resume")
    log.warning("resuming run %s with its saved settings; ignoring %s", resume_state["run_id"], " ".join(ignored))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    config = parse_config(argv)
    resume_state = None
    try:
        resume_state = training.find_resume_state(config)
        if resume_state is not None:
            check_resume_options(config, resume_state, explicit_options(argv))
            # settings added since the state was saved take their defaults
            config = {**DEFAULTS, **resume_state["config"], "resume": config["resume"]}
            option = f"--resume {config['resume']}" if config["resume"] else f"WANDB_RUN_ID={resume_state['run_id']}"
            training.check_run_not_finished(config, resume_state["run_id"], option)
        elif os.environ.get("WANDB_RUN_ID"):
            run_id = os.environ["WANDB_RUN_ID"]
            training.check_run_not_finished(config, run_id, f"WANDB_RUN_ID={run_id}")
        validate_config(config)
        training.resolve_device(config["device"])  # a device this machine lacks fails here, before W&B starts
    except (ValueError, CheckpointError) as e:
        log.error("%s", e)
        return 2

    # On SIGTERM (cluster preemption, spot shutdown) the loop saves a resumable state and exits.
    # NOTE: Ctrl-C (SIGINT) is not handled the same way: it ends the run with a traceback and saves nothing.
    stop = training.StopFlag()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())

    ctx = training.setup_distributed(config)
    with training.gc_paused():  # imports wandb
        run = training.init_wandb(config, ctx, resume_state)
    try:
        validate_config(config)  # again, now with any values a sweep set
        status = train(config, run, ctx, stop, resume_state)
    except (DataError, CheckpointError, ValueError) as e:
        log.error("%s", e)
        training.finish_wandb(run, exit_code=2)
        return 2
    except Exception:
        training.finish_wandb(run, exit_code=1)
        raise
    finally:
        training.teardown_distributed(ctx)
    codes = {"completed": 0, "failed": 1, "preempted": 143}
    training.finish_wandb(run, exit_code=codes[status], preempting=status == "preempted")
    return codes[status]


if __name__ == "__main__":
    status = main()
    # Exclude every object left from the final garbage collection: walking the millions that torch,
    # transformers and timm create took 1.6 to 2 s of each run's exit (2-core CPU). Their finalizers are
    # not needed, because main() has closed the checkpoint files and finished the W&B run.
    gc.freeze()
    sys.exit(status)
