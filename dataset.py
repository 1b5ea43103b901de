"""Image-caption data: loaders for common layouts, a built-in synthetic set, the tokenizer,
and the one image pipeline that training and inference share.

Accepted layouts (detected from the path given to --data):
  builtin                      synthetic coloured shapes, generated from a seed (no files)
  DIR/captions.csv + DIR/images/   CSV `image,caption`, optional DIR/splits.csv `image,split`
  FILE.csv                     the same CSV, images next to it or in images/
  DIR/Flickr8k.token.txt       Flickr8k text files, split lists Flickr_8k.{train,dev,test}Images.txt
  captions_*.json              COCO captions (images in a sibling folder named like train2017/)
  dataset_*.json               Karpathy's split files (flickr8k, flickr30k, coco)

    python -c "import dataset; d = dataset.load_captions('builtin'); print(len(d.images))"
"""

import csv
import fcntl
import hashlib
import json
import logging
import os
import random
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, ImageOps
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

log = logging.getLogger(__name__)

# A truncated file must raise, not be padded with grey, so that bad data is reported.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "dev": "val",
                 "valid": "val", "validation": "val", "test": "test"}
ACCEPTED_LAYOUTS = ("'builtin'; a folder with captions.csv (image,caption) and images/; "
                    "a folder with Flickr8k.token.txt; a COCO captions_*.json; a Karpathy dataset_*.json")
MAX_CAPTION_WORDS = 60  # longer captions are cut to this many words (Flickr8k's longest has 38)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


class DataError(ValueError):
    """Invalid or unreadable dataset; the message names the path and the fix."""


@dataclass
class CaptionData:
    """Images with their reference captions and the split each image belongs to."""
    name: str
    images: list            # file paths, or builtin image ids
    captions: list          # list[list[str]], one list of references per image
    splits: list            # "train" | "val" | "test" | None (no official split)
    builtin: dict | None = None  # generator settings for the synthetic set
    stats: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Built-in synthetic data

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
          "yellow": (235, 210, 40), "purple": (140, 60, 180)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "center": (0.5, 0.5),
             "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75)}
TEMPLATES = ("a {size} {color} {shape} in the {position}",
             "there is a {size} {color} {shape} in the {position}",
             "a {size} {color} {shape} at the {position} of the picture")


def builtin_attributes(index, seed):
    """Return the attributes of builtin image `index`: a pure function of (index, seed)."""
    rng = random.Random(seed * 1_000_003 + index)
    return {"color": rng.choice(list(COLORS)), "shape": rng.choice(SHAPES),
            "position": rng.choice(list(POSITIONS)), "size": rng.choice(("small", "large")),
            "background": tuple(rng.randint(200, 255) for _ in range(3)),
            "jitter": (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05))}


def render_builtin(index, seed, size=96):
    """Draw builtin image `index` as an RGB PIL image of size x size pixels."""
    a = builtin_attributes(index, seed)
    img = Image.new("RGB", (size, size), a["background"])
    draw = ImageDraw.Draw(img)
    cx, cy = POSITIONS[a["position"]]
    cx, cy = (cx + a["jitter"][0]) * size, (cy + a["jitter"][1]) * size
    r = size * (0.17 if a["size"] == "large" else 0.09)
    color = COLORS[a["color"]]
    if a["shape"] == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif a["shape"] == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


def make_builtin(num_images=1200, seed=0):
    """Build the synthetic dataset: 80% train, 10% val, 10% test, three captions per image."""
    captions, splits = [], []
    for i in range(num_images):
        a = builtin_attributes(i, seed)
        captions.append([t.format(**a) for t in TEMPLATES])
        fraction = i / num_images
        splits.append("train" if fraction < 0.8 else "val" if fraction < 0.9 else "test")
    return CaptionData("builtin", list(range(num_images)), captions, splits,
                       builtin={"seed": seed, "size": 96})


# --------------------------------------------------------------------------------------
# Loaders for files on disk

def _find_images_dir(root, names):
    """Return the folder under `root` that contains the first image name, or raise."""
    candidates = [root / "images", root / "Images", root / "Flicker8k_Dataset", root / "Flickr8k_Dataset",
                  root]
    for folder in candidates:
        if folder.is_dir() and any((folder / n).exists() for n in names[:20]):
            return folder
    raise DataError(f"no image folder found for {root}: looked for {names[0]!r} in "
                    f"{', '.join(str(c) for c in candidates)}; put the images in {root / 'images'}")


def _group(pairs, split_of):
    """Turn (image, caption) pairs into a CaptionData-ready triple, keeping first-seen order."""
    captions = {}
    for image, caption in pairs:
        captions.setdefault(image, []).append(caption)
    names = list(captions)
    return names, [captions[n] for n in names], [split_of.get(n) for n in names]


def read_csv_layout(path):
    """Read captions.csv (image,caption), optional splits.csv (image,split) and the image folder."""
    csv_path = path if path.is_file() else path / "captions.csv"
    root = csv_path.parent
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise DataError(f"{csv_path} has columns {reader.fieldnames}; expected a header 'image,caption'")
        pairs = [(row["image"], row["caption"] or "") for row in reader]
    split_of = {}
    if (root / "splits.csv").exists():
        with open(root / "splits.csv", newline="", encoding="utf-8-sig") as f:
            split_of = {row["image"]: SPLIT_ALIASES.get((row.get("split") or "").strip().lower(), "none")
                        for row in csv.DictReader(f)}
    names, captions, splits = _group(pairs, split_of)
    folder = _find_images_dir(root, names)
    return CaptionData(str(path), [str(folder / n) for n in names], captions, splits)


def read_flickr_token(path):
    """Read Flickr8k.token.txt (`name.jpg#k<TAB>caption`) and the Flickr_8k.*Images.txt split lists."""
    token_file = path if path.is_file() else path / "Flickr8k.token.txt"
    root = token_file.parent
    pairs = []
    for line in token_file.read_text(encoding="utf-8").splitlines():
        if "\t" in line:
            key, caption = line.split("\t", 1)
            pairs.append((key.split("#")[0], caption))
    split_of = {}
    for split, alias in (("train", "train"), ("dev", "val"), ("test", "test")):
        listing = root / f"Flickr_8k.{split}Images.txt"
        if listing.exists():
            split_of.update({n.strip(): alias for n in listing.read_text().split() if n.strip()})
    if split_of:
        split_of = {n: split_of.get(n, "none") for n, _ in pairs}
    names, captions, splits = _group(pairs, split_of)
    folder = _find_images_dir(root, names)
    return CaptionData(str(path), [str(folder / n) for n in names], captions, splits)


def read_coco(path):
    """Read a COCO captions file; captions_train* is the train split, captions_val* the val split."""
    data = json.loads(path.read_text(encoding="utf-8"))
    files = {img["id"]: img["file_name"] for img in data["images"]}
    pairs = [(files[a["image_id"]], a["caption"]) for a in data["annotations"] if a["image_id"] in files]
    split = "val" if "val" in path.stem else "train" if "train" in path.stem else None
    names, captions, _ = _group(pairs, {})
    stem = re.sub(r"^captions_", "", path.stem)  # captions_train2017 -> train2017
    roots = [path.parent / stem, path.parent.parent / stem, path.parent / "images" / stem,
             path.parent.parent / "images" / stem, path.parent / "images"]
    folder = next((r for r in roots if (r / names[0]).exists()), None) if names else None
    if folder is None:
        raise DataError(f"no image folder found for {path}: expected {names[0] if names else 'images'} under "
                        f"{roots[0]} or {roots[1]}")
    return CaptionData(str(path), [str(folder / n) for n in names], captions, [split] * len(names))


def read_karpathy(path):
    """Read Karpathy's dataset_*.json: images with `filename`, `split` and `sentences[].raw`."""
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data["images"]
    root = path.parent
    names = [os.path.join(e.get("filepath", ""), e["filename"]) for e in entries]
    folder = _find_images_dir(root, names)
    captions = [[s.get("raw") or " ".join(s.get("tokens", [])) for s in e["sentences"]] for e in entries]
    splits = [SPLIT_ALIASES.get(e.get("split", ""), "none") for e in entries]
    return CaptionData(str(path), [str(folder / n) for n in names], captions, splits)


def detect_format(path):
    """Name the layout of `path` (csv, flickr_token, coco, karpathy), or raise DataError."""
    if path.is_dir():
        if (path / "captions.csv").exists():
            return "csv", path
        if (path / "Flickr8k.token.txt").exists():
            return "flickr_token", path
        found = sorted(path.glob("dataset_*.json")) or sorted(path.glob("annotations/captions_train*.json"))
        if found:
            return detect_format(found[0])
    elif path.is_file():
        if path.suffix == ".csv":
            return "csv", path
        if path.name.endswith(".token.txt"):
            return "flickr_token", path
        if path.suffix == ".json":
            return ("karpathy", path) if path.name.startswith("dataset_") else ("coco", path)
    raise DataError(f"no caption data found at {path}; accepted layouts: {ACCEPTED_LAYOUTS}")


READERS = {"csv": read_csv_layout, "flickr_token": read_flickr_token, "coco": read_coco, "karpathy": read_karpathy}


def load_captions(data="builtin", seed=0):
    """Load a dataset by path or name, clean its captions and return a CaptionData."""
    if data in (None, "", "builtin"):
        return clean_captions(make_builtin(seed=seed))
    path = Path(data).expanduser().resolve()  # absolute image paths: caches match however --data was written
    if not path.exists():
        raise DataError(f"data path {data} does not exist; pass --data with one of: {ACCEPTED_LAYOUTS}")
    kind, path = detect_format(path)
    try:
        dataset = READERS[kind](path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, csv.Error) as e:
        raise DataError(f"cannot read {path} as {kind} data ({type(e).__name__}: {e}); "
                        f"accepted layouts: {ACCEPTED_LAYOUTS}") from e
    if not dataset.images:
        raise DataError(f"{path} contains no captions; accepted layouts: {ACCEPTED_LAYOUTS}")
    return clean_captions(dataset)


def clean_captions(dataset):
    """Normalise whitespace, drop empty and duplicate captions, cut overlong ones; count each."""
    stats = {"empty": 0, "duplicate": 0, "truncated": 0, "images_without_captions": 0}
    keep = []
    for i, refs in enumerate(dataset.captions):
        seen, cleaned = set(), []
        for caption in refs:
            words = str(caption).split()
            if not words:
                stats["empty"] += 1
                continue
            if len(words) > MAX_CAPTION_WORDS:
                stats["truncated"] += 1
                words = words[:MAX_CAPTION_WORDS]
            text = " ".join(words)
            if text.lower() in seen:
                stats["duplicate"] += 1
                continue
            seen.add(text.lower())
            cleaned.append(text)
        dataset.captions[i] = cleaned
        if cleaned:
            keep.append(i)
        else:
            stats["images_without_captions"] += 1
    if len(keep) < len(dataset.images):
        dataset.images = [dataset.images[i] for i in keep]
        dataset.captions = [dataset.captions[i] for i in keep]
        dataset.splits = [dataset.splits[i] for i in keep]
    if any(stats.values()):
        log.warning("captions in %s: %s", dataset.name, ", ".join(f"{v} {k}" for k, v in stats.items() if v))
    dataset.stats.update(stats)
    return dataset


def split_indices(dataset, val_fraction=0.1, seed=0, max_train=None, max_val=None):
    """Return {"train": [...], "val": [...], "test": [...]} image indices, split by image.

    The official split is used where the data has one (images it leaves out are dropped);
    otherwise a seeded shuffle puts `val_fraction` of the images in val and none in test.
    An official split without validation images (a COCO captions_train file, a splits.csv
    that marks only train and test) gets `val_fraction` of its training images the same way.
    """
    if any(s is not None for s in dataset.splits):
        split = {name: [i for i, s in enumerate(dataset.splits) if s == name] for name in ("train", "val", "test")}
    else:
        split = {"train": list(range(len(dataset.images))), "val": [], "test": []}
    if not split["val"]:
        order = list(split["train"])
        random.Random(seed).shuffle(order)
        n_val = max(1, round(len(order) * val_fraction)) if len(order) > 1 else 0
        split["train"], split["val"] = sorted(order[n_val:]), sorted(order[:n_val])
    if max_train:
        split["train"] = split["train"][:max_train]
    if max_val:
        split["val"] = split["val"][:max_val]
    return split


# --------------------------------------------------------------------------------------
# Images: one conversion for training and inference

def open_image(path):
    """Open any file Pillow reads as an RGB image; raise OSError naming the file on failure.

    EXIF rotation is applied, transparency is composited on white, and 16-bit or float
    images are rescaled to 8 bits instead of being clipped.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 89M and 179M pixels; treat that as an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as e:
        raise OSError(f"{path}: image too large ({e})") from e
    except Image.DecompressionBombWarning as e:
        raise OSError(f"{path}: image too large ({e})") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise OSError(f"{path}: cannot read image ({e})") from e
    return to_rgb(img)


def to_rgb(img):
    """Convert a PIL image of any mode to RGB."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        img = Image.fromarray(array.astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def image_to_array(img, image_size):
    """Resize an RGB image to image_size x image_size and return uint8 (3, H, W)."""
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()


def normalize_images(pixels, mean, std):
    """uint8 (B, 3, H, W) -> float (B, 3, H, W) in the encoder's input range."""
    x = pixels.float().div_(255.0)
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_image_array(dataset, index, image_size):
    """Decode image `index` of a dataset into uint8 (3, S, S); raise OSError if unreadable."""
    if dataset.builtin is not None:
        img = render_builtin(dataset.images[index], dataset.builtin["seed"], dataset.builtin["size"])
    else:
        img = open_image(dataset.images[index])
    return image_to_array(img, image_size)


# --------------------------------------------------------------------------------------
# On-disk caches shared by runs (and by agents running side by side)

def cache_key(*parts):
    """Hash JSON-able parts into a short hex key for cache file names."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_list_fingerprint(dataset, indices):
    """Identify a list of images by name, size and mtime, so edits invalidate caches."""
    if dataset.builtin is not None:
        return [dataset.builtin, [dataset.images[i] for i in indices]]
    entries = []
    for i in indices:
        try:
            st = os.stat(dataset.images[i])
            entries.append((dataset.images[i], st.st_size, st.st_mtime_ns))
        except OSError:
            entries.append((dataset.images[i], -1, -1))
    return entries


def cached_array(cache_dir, key, shape, dtype, fill):
    """Return a read-only memmap of the array cached under `key`, computing it with fill() once.

    fill(out) writes rows into a writable memmap and returns a list of row indices that
    could not be computed (bad images). Runs started side by side wait on a file lock
    instead of computing the same cache twice; the file is renamed into place when complete.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path.exists() and meta_path.exists()):
            tmp = cache_dir / f"{key}.npy.{os.getpid()}.tmp"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            failed = fill(out)
            out.flush()
            del out
            os.replace(tmp, path)
            meta_tmp = cache_dir / f"{key}.json.{os.getpid()}.tmp"
            meta_tmp.write_text(json.dumps({"shape": list(shape), "failed": failed}))
            os.replace(meta_tmp, meta_path)
    meta = json.loads(meta_path.read_text())
    return np.load(path, mmap_mode="r"), meta["failed"]


def cache_images(dataset, indices, image_size, cache_dir):
    """Decode and resize the images once into a uint8 (N, 3, S, S) cache; return (array, bad rows)."""
    key = "images-" + cache_key(image_list_fingerprint(dataset, indices), image_size)

    def fill(out):
        failed = []
        for row, i in enumerate(indices):
            try:
                out[row] = load_image_array(dataset, i, image_size)
            except OSError as e:
                log.warning("skipping unreadable training image: %s", e)
                failed.append(row)
        return failed

    return cached_array(cache_dir, key, (len(indices), 3, image_size, image_size), np.uint8, fill)


# --------------------------------------------------------------------------------------
# Tokenizer

class CaptionTokenizer:
    """A `tokenizers.Tokenizer` with the ids of its BOS, EOS and PAD tokens.

    Sequences are [BOS] tokens [EOS], then PAD. Stored in checkpoints as plain strings and
    ints, so inference needs no tokenizer files and no network.
    """

    def __init__(self, tokenizer, bos_id, eos_id, pad_id, unk_id=None):
        # encode() adds the special tokens, cuts and pads itself. A tokenizer that pads on its own
        # (MiniLM's pads every caption to 128 tokens) would push [EOS] behind its padding.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self.tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id, self.unk_id = bos_id, eos_id, pad_id, unk_id
        self.source_ids = None  # ids in the full pretrained vocabulary, when restrict_vocabulary cut it
        self._never_generated = None

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size()

    def never_generated(self):
        """Return the ids of the bracketed tokens ([PAD], [UNK], BERT's [MASK], [unused0]...) except EOS."""
        if self._never_generated is None:
            bracketed = re.compile(r"^\[[^\[\]\s]+\]$")
            ids = {i for token, i in self.tokenizer.get_vocab(with_added_tokens=True).items() if bracketed.match(token)}
            ids |= {i for i in (self.bos_id, self.pad_id, self.unk_id) if i is not None}
            self._never_generated = sorted(ids - {self.eos_id})
        return self._never_generated

    def encode(self, captions, max_length):
        """Return (ids, lengths): LongTensor (N, max_length) padded, and the length of each sequence."""
        encodings = self.tokenizer.encode_batch(list(captions), add_special_tokens=False)
        ids = torch.full((len(encodings), max_length), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(encodings), dtype=torch.long)
        for row, enc in enumerate(encodings):
            tokens = [self.bos_id] + enc.ids[: max_length - 2] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            lengths[row] = len(tokens)
        return ids, lengths

    def decode(self, ids):
        """Decode rows of token ids up to the first EOS into caption strings."""
        captions = []
        for row in ids.tolist():
            if row and row[0] == self.bos_id:
                row = row[1:]
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            captions.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return captions

    def state_dict(self):
        return {"tokenizer_json": self.tokenizer.to_str(), "bos_id": self.bos_id, "eos_id": self.eos_id,
                "pad_id": self.pad_id, "unk_id": -1 if self.unk_id is None else self.unk_id}

    @classmethod
    def from_state_dict(cls, state):
        unk = state.get("unk_id", -1)
        return cls(Tokenizer.from_str(state["tokenizer_json"]), state["bos_id"], state["eos_id"],
                   state["pad_id"], None if unk < 0 else unk)


def train_tokenizer(captions, vocab_size=5000, min_frequency=2):
    """Build a lowercase WordPiece tokenizer from the training captions, deterministically.

    The vocabulary is every character (alone and as a ## continuation), then the most frequent
    words seen at least `min_frequency` times, ties broken alphabetically. Rarer words are spelled
    in characters, so [UNK] only stands for characters never seen in training. The tokenizers
    WordPiece trainer is not used because its vocabulary varies from process to process, which
    would make two runs with the same seed differ.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word})
    tokens = SPECIAL_TOKENS + chars + ["##" + ch for ch in chars]
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    budget = max(vocab_size - len(tokens), 0)
    tokens += [word for word, n in ranked if n >= min_frequency and len(word) > 1][:budget]
    tokenizer = Tokenizer(models.WordPiece(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]",
                                           max_input_chars_per_word=50))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    pad, unk, bos, eos = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)
    return CaptionTokenizer(tokenizer, bos, eos, pad, unk)


def pretrained_tokenizer(hf_tokenizer):
    """Wrap a transformers fast tokenizer (for a pretrained decoder) as a CaptionTokenizer."""
    backend = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())  # a copy: CaptionTokenizer changes it
    bos = hf_tokenizer.bos_token_id if hf_tokenizer.bos_token_id is not None else hf_tokenizer.cls_token_id
    eos = hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else hf_tokenizer.sep_token_id
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else eos
    if bos is None or eos is None:
        raise ValueError(f"tokenizer {hf_tokenizer.name_or_path} has no BOS/CLS or EOS/SEP token")
    return CaptionTokenizer(backend, bos, eos, pad, hf_tokenizer.unk_token_id)


def restrict_vocabulary(tokenizer, captions):
    """Keep only the tokens a pretrained decoder needs for these captions.

    Returns (tokenizer, kept). The tokenizer has the tokens the captions use, the special tokens
    and the single characters of the captions, so other words can still be spelled. kept lists
    the ascending ids those tokens had, for cutting the decoder's embeddings and output layer to
    match. WordPiece picks the longest known prefix, and every piece of these captions is kept,
    so they split exactly as before. Other tokenizer models (BPE, Unigram) depend on pieces that
    the captions do not use; for them the tokenizer is returned unchanged with kept = None.
    """
    spec = json.loads(tokenizer.tokenizer.to_str())
    if spec["model"].get("type") != "WordPiece":
        return tokenizer, None
    backend = tokenizer.tokenizer
    vocab = spec["model"]["vocab"]
    prefix = spec["model"].get("continuing_subword_prefix", "##")
    used = {i for enc in backend.encode_batch(list(captions), add_special_tokens=False) for i in enc.ids}
    if backend.normalizer is not None:
        chars = {ch for caption in captions for ch in backend.normalizer.normalize_str(caption)}
    else:
        chars = {ch for caption in captions for ch in caption}
    used |= {vocab[t] for t in chars if t in vocab} | {vocab[prefix + t] for t in chars if prefix + t in vocab}
    used |= {token["id"] for token in spec["added_tokens"]}
    used |= {i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id) if i is not None}
    kept = sorted(used)
    new_id = {old: new for new, old in enumerate(kept)}
    spec["model"]["vocab"] = {token: new_id[i] for token, i in vocab.items() if i in new_id}
    for token in spec["added_tokens"]:
        token["id"] = new_id[token["id"]]
    # encode() adds [BOS] and [EOS] and pads by itself. The template would refer to the old ids.
    spec["post_processor"] = spec["padding"] = spec["truncation"] = None
    remap = [None if i is None else new_id[i]
             for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id)]
    return CaptionTokenizer(Tokenizer.from_str(json.dumps(spec)), *remap), kept
