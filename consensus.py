"""Consensus reranking of beam-search captions.

Beam search keeps its `num_beams` best captions of an image. The training images nearest to
it (cosine similarity of mean-pooled backbone features) then vote: the caption kept is the one
with the highest CIDEr-D against the human captions of those neighbours. The consensus idea is
from Devlin et al. (2015), "Exploring Nearest Neighbor Approaches for Image Captioning", where
the candidates are the neighbours' own captions; here they are the model's beams, so every
caption is still generated for the image. Only training images and their captions are used.

train.py --rerank_neighbors N stores the memory (pooled features and captions of the training
images) in the checkpoint under "consensus", and generate() reranks when given
rerank_neighbors. RESULTS.md has the measurements on Flickr8k.
"""

import numpy as np
import torch
import torch.nn.functional as F

from evaluation import normalize_caption
from scst import CiderD


def pooled_features(features):
    """(B, T, C) backbone features -> (B, C) mean over positions, unit length, float32."""
    return F.normalize(features.float().mean(1), dim=-1)


class ConsensusMemory:
    """Pooled backbone features (N, C) of training images and their normalised captions."""

    def __init__(self, features, captions):
        if len(features) != len(captions):
            raise ValueError(f"consensus memory has {len(features)} feature rows but {len(captions)} caption sets")
        self.features = features
        self.captions = captions
        self._cider = None

    @classmethod
    def from_split(cls, split, chunk=512):
        """Build the memory from a SplitInputs of cached backbone features (a frozen encoder)."""
        if split.kind != "features":
            raise ValueError("consensus reranking needs cached backbone features: use a frozen encoder "
                             "(--freeze_encoder True) or --rerank_neighbors 0")
        rows = list(split.valid_rows)
        pooled = [pooled_features(torch.from_numpy(np.asarray(split.images[rows[i:i + chunk]])))
                  for i in range(0, len(rows), chunk)]
        captions = [[normalize_caption(c) for c in split.references[r]] for r in rows]
        return cls(torch.cat(pooled).half(), captions)

    def state_dict(self):
        return {"features": self.features, "captions": self.captions}

    @classmethod
    def from_state_dict(cls, state):
        return cls(state["features"].cpu(), state["captions"])  # neighbours are searched on the CPU

    @property
    def cider(self):
        # Document frequencies of the training captions, one document per image, built on first use.
        if self._cider is None:
            self._cider = CiderD(self.captions)
        return self._cider

    def neighbours(self, features, k):
        """Rows of the k training images nearest to each image of features (B, T, C): (B, k)."""
        similarity = pooled_features(features.cpu()) @ self.features.float().T
        return similarity.topk(min(k, len(self.features)), dim=1).indices

    def choose(self, candidates, features, k):
        """Index of the candidate caption to keep for each image.

        candidates: per image, a list of caption strings (the beams, best first)
        features:   (B, T, C) backbone features of the same images
        """
        chosen = []
        for rows, captions in zip(self.neighbours(features, k).tolist(), candidates):
            references = [v for r in rows for v in self.cider.reference_vectors(r, self.captions[r])]
            scores = [self.cider.score_vectors(self.cider.vector(normalize_caption(c)), references)
                      for c in captions]
            chosen.append(max(range(len(captions)), key=lambda i: (scores[i], -i)))  # ties: the better beam
        return chosen
