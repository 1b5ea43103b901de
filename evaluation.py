"""Caption decoding and scoring shared by train.py (validation) and inference.py (--evaluate).

Scores are pycocoevalcap's BLEU-1..4, CIDEr and ROUGE-L, plus METEOR when `java` runs.
Every caption, generated or reference, is lowercased and cut into alphanumeric words
before scoring, the same way for every system, so scores are comparable across runs.
"""

import logging
import re
import shutil

import torch

log = logging.getLogger(__name__)

METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "meteor")
UNK_MARKERS = ("[UNK]", "<unk>")


def normalize_caption(text):
    """Lowercase and keep alphanumeric words: 'A dog, running.' -> 'a dog running'."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


_meteor = None  # one METEOR process per Python process: its JVM takes seconds to start


def _meteor_score(references, hypotheses):
    """Return METEOR, or None when java or the METEOR jar does not run here."""
    global _meteor
    if shutil.which("java") is None:
        return None
    try:
        if _meteor is None:
            from pycocoevalcap.meteor.meteor import Meteor
            _meteor = Meteor()
        score, _ = _meteor.compute_score(references, hypotheses)
        return float(score)
    except (OSError, ValueError) as e:
        log.warning("METEOR skipped: %s", e)
        _meteor = None
        return None


def score_captions(references, hypotheses, meteor=True):
    """Score generated captions against references with pycocoevalcap.

    references: {key: [caption, ...]}; hypotheses: {key: caption}, same keys.
    Returns {"bleu1".."bleu4", "cider", "rouge_l"} and "meteor" when it can run.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    keys = list(hypotheses)
    gts = {k: [normalize_caption(r) for r in references[k]] for k in keys}
    # An empty hypothesis would divide by zero in ROUGE-L; a word found in no reference scores 0 instead.
    res = {k: [normalize_caption(hypotheses[k]) or "emptycaption"] for k in keys}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores.update(cider=float(cider), rouge_l=float(rouge))
    if meteor:
        value = _meteor_score(gts, res)
        if value is not None:
            scores["meteor"] = value
    return scores


def caption_statistics(captions):
    """Diversity and failure counts: distinct fraction, words repeated 3 times in a row, [UNK] fraction."""
    repeats = sum(1 for c in captions if re.search(r"\b(\w+)( \1\b){2}", normalize_caption(c)))
    unk = sum(1 for c in captions if any(m in c for m in UNK_MARKERS))
    n = max(1, len(captions))
    return {"distinct": len(set(captions)) / n, "repeat3": repeats / n, "unk": unk / n}


def generation_options(decoding, **overrides):
    """Turn a decoding config into transformers generate() options; overrides win when not None."""
    options = {**decoding, **{k: v for k, v in overrides.items() if v is not None}}
    kwargs = {"max_length": int(options.get("max_length", 32)),
              "num_beams": int(options.get("num_beams", 1))}
    if options.get("do_sample"):
        kwargs.update(do_sample=True, top_k=int(options["top_k"]), temperature=float(options["temperature"]))
    else:
        kwargs["do_sample"] = False
    if options.get("no_repeat_ngram_size"):
        kwargs["no_repeat_ngram_size"] = int(options["no_repeat_ngram_size"])
    if options.get("rerank_neighbors") and kwargs["num_beams"] > 1:
        kwargs["rerank_neighbors"] = int(options["rerank_neighbors"])
    if options.get("repetition_penalty") and float(options["repetition_penalty"]) != 1.0:
        kwargs["repetition_penalty"] = float(options["repetition_penalty"])
    return kwargs


@torch.no_grad()
def generate_captions(model, tokenizer, batches, options, device, autocast=None):
    """Caption every batch; batches yield dicts with `features` or `pixel_values` tensors."""
    model.eval()
    captions = []
    for batch in batches:
        inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast() if autocast else torch.autocast(device_type="cpu", enabled=False):
            ids = model.generate(tokenizer, **inputs, **options)
        captions.extend(tokenizer.decode(ids.cpu()))
    return captions
