"""Self-critical sequence training (Rennie et al. 2017, "Self-critical Sequence Training for
Image Captioning"): after the cross-entropy steps, train.py can fine-tune the captioner on its
own sampled captions, rewarded by their CIDEr-D against the image's reference captions.

Each step samples `scst_samples` captions per image. The baseline of a sample is the mean
reward of the other samples of the same image (Luo 2020, "A Better Variant of Self-Critical
Sequence Training"), so no greedy decode is needed. The loss is the advantage-weighted
negative log-likelihood of the sampled tokens.
"""

import math
from collections import Counter

import torch

from evaluation import normalize_caption


def ngram_counts(words, n_max=4):
    """Count the 1..n_max-grams of a word list, keyed by tuple."""
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def sampled_token_mask(targets, eos_id):
    """Return 1.0 for the tokens of each sampled caption up to and including its first [EOS], else 0.0."""
    ended_before = (targets == eos_id).long().cumsum(1) - (targets == eos_id).long()
    return (ended_before == 0).float()


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) with document frequencies of a fixed reference corpus.

    The corpus is the training split's reference sets, one document per image, as in the
    usual SCST set-up. Scores use the clipped, length-penalised variant (sigma 6, times 10),
    which is what pycocoevalcap's Cider computes.
    """

    def __init__(self, reference_sets, n_max=4, sigma=6.0):
        self.n_max, self.sigma = n_max, sigma
        self.df = Counter()
        for refs in reference_sets:
            self.df.update(set().union(*(ngram_counts(r.split(), n_max) for r in refs)))
        self.log_docs = math.log(max(len(reference_sets), 1))
        self._refs = {}

    def vector(self, caption):
        """Return the tf-idf vectors per n-gram order, their norms and the caption length in words."""
        words = caption.split()
        vec = [{} for _ in range(self.n_max)]
        for gram, count in ngram_counts(words, self.n_max).items():
            vec[len(gram) - 1][gram] = count * (self.log_docs - math.log(max(1.0, self.df[gram])))
        norms = [math.sqrt(sum(v * v for v in order.values())) for order in vec]
        return vec, norms, len(words)

    def reference_vectors(self, key, refs):
        if key not in self._refs:
            self._refs[key] = [self.vector(r) for r in refs]
        return self._refs[key]

    def score(self, caption, key, refs):
        """Score one normalised caption against the normalised references `refs` of image `key`."""
        return self.score_vectors(self.vector(caption), self.reference_vectors(key, refs))

    def score_vectors(self, hypothesis, references):
        """CIDEr-D of a vector() against a list of reference vector()s."""
        hyp, hyp_norms, hyp_len = hypothesis
        total = 0.0
        for ref, ref_norms, ref_len in references:
            penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * self.sigma ** 2))
            for n in range(self.n_max):
                if hyp_norms[n] and ref_norms[n]:
                    dot = sum(min(v, ref[n].get(g, 0.0)) * ref[n].get(g, 0.0) for g, v in hyp[n].items())
                    total += penalty * dot / (hyp_norms[n] * ref_norms[n])
        return 10.0 * total / (self.n_max * max(len(references), 1))


class SelfCritical:
    """SCST steps over the images of a training split (SplitInputs of train.py)."""

    def __init__(self, split, tokenizer, samples, max_length, seed):
        self.split, self.tokenizer, self.samples, self.max_length = split, tokenizer, samples, max_length
        self.rows = list(split.valid_rows)
        self.references = {r: [normalize_caption(c) for c in split.references[r]] for r in self.rows}
        self.cider = CiderD([self.references[r] for r in self.rows])
        self.seed = seed

    def image_rows(self, step, images):
        """Return the `images` rows of SCST step `step` (0-based), from a seeded order per pass."""
        per_pass = max(1, len(self.rows) // images)
        epoch, index = divmod(step, per_pass)
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return [self.rows[i] for i in order[index * images:(index + 1) * images].tolist()]

    def loss(self, model, net, rows, device, autocast):
        """Return (loss, mean reward) of one SCST step on image rows `rows`."""
        k = self.samples
        inputs = {name: v.to(device).repeat_interleave(k, dim=0) for name, v in self.split.image_batch(rows).items()}
        model.eval()  # sample without dropout
        with autocast():
            ids = model.generate(self.tokenizer, **inputs, max_length=self.max_length, do_sample=True, top_k=0,
                                 temperature=1.0)
        model.train()
        captions = self.tokenizer.decode(ids.cpu())
        rewards = torch.tensor([self.cider.score(normalize_caption(c), row, self.references[row])
                                for c, row in zip(captions, (r for r in rows for _ in range(k)))]).view(-1, k)
        baseline = (rewards.sum(1, keepdim=True) - rewards) / max(k - 1, 1)
        advantage = (rewards - baseline).view(-1).to(device)

        # log-probabilities of the sampled tokens, up to and including each caption's [EOS]
        input_ids, targets = ids[:, :-1], ids[:, 1:]
        mask = sampled_token_mask(targets, self.tokenizer.eos_id)
        with autocast():
            logits = net(input_ids, mask.long(), **inputs)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(advantage.unsqueeze(1) * logp * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, rewards.mean().item()
