"""Loaders, splits, caption cleaning, tokenizer and image conversion.

    python -m pytest -q tests/test_dataset.py
"""

import json

import numpy as np
import pytest
from PIL import Image

import dataset
from dataset import DataError, load_captions, split_indices


def write_images(folder, names, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (size, size), (i * 40 % 255, 100, 200)).save(folder / name)


def test_csv_layout_with_splits(tmp_path):
    write_images(tmp_path / "images", ["a.jpg", "b.jpg", "c.jpg"])
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,A dog runs .\na.jpg,a dog running\n"
                                           "b.jpg,\"A cat, sleeping\"\nc.jpg,a bird\n")
    (tmp_path / "splits.csv").write_text("image,split\na.jpg,train\nb.jpg,dev\nc.jpg,test\n")
    data = load_captions(str(tmp_path))
    assert [p.split("/")[-1] for p in data.images] == ["a.jpg", "b.jpg", "c.jpg"]
    assert data.captions[0] == ["A dog runs .", "a dog running"]
    assert data.captions[1] == ["A cat, sleeping"]
    assert split_indices(data) == {"train": [0], "val": [1], "test": [2]}


def test_flickr_token_layout(tmp_path):
    write_images(tmp_path / "Flicker8k_Dataset", ["1_a.jpg", "2_b.jpg"])
    (tmp_path / "Flickr8k.token.txt").write_text("1_a.jpg#0\tA man .\n1_a.jpg#1\tA person\n2_b.jpg#0\tTwo dogs\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("1_a.jpg\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text("2_b.jpg\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text("")
    data = load_captions(str(tmp_path))
    assert data.captions == [["A man .", "A person"], ["Two dogs"]]
    assert data.splits == ["train", "val"]


def test_coco_captions_json(tmp_path):
    write_images(tmp_path / "train2017", ["000001.jpg", "000002.jpg"])
    (tmp_path / "annotations").mkdir()
    coco = {"images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "000002.jpg"}],
            "annotations": [{"image_id": 1, "id": 10, "caption": "A train at a station."},
                            {"image_id": 2, "id": 11, "caption": "A plate of food."},
                            {"image_id": 1, "id": 12, "caption": "A red train."}]}
    (tmp_path / "annotations" / "captions_train2017.json").write_text(json.dumps(coco))
    data = load_captions(str(tmp_path / "annotations" / "captions_train2017.json"))
    assert data.captions == [["A train at a station.", "A red train."], ["A plate of food."]]
    assert data.splits == ["train", "train"]
    assert data.images[0].endswith("train2017/000001.jpg")
    # a captions_train file has no validation images: a seeded share of its training images is held out
    split = split_indices(data, val_fraction=0.5)
    assert sorted(split["train"] + split["val"]) == [0, 1]
    assert len(split["val"]) == 1
    assert split["test"] == []


def test_csv_with_byte_order_mark(tmp_path):
    write_images(tmp_path / "images", ["a.jpg"])
    (tmp_path / "captions.csv").write_text("\ufeffimage,caption\na.jpg,a dog runs\n", encoding="utf-8")
    data = load_captions(str(tmp_path))
    assert data.captions == [["a dog runs"]]


def test_karpathy_json(tmp_path):
    write_images(tmp_path / "images", ["x.jpg", "y.jpg", "z.jpg"])
    entries = [{"filename": n, "split": s, "sentences": [{"raw": f"caption of {n}", "tokens": []}]}
               for n, s in (("x.jpg", "train"), ("y.jpg", "restval"), ("z.jpg", "val"))]
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    data = load_captions(str(tmp_path))  # detected from the folder
    assert data.splits == ["train", "train", "val"]
    assert data.captions[2] == ["caption of z.jpg"]


def test_missing_path_names_it_and_layouts(tmp_path):
    with pytest.raises(DataError) as err:
        load_captions(str(tmp_path / "nowhere"))
    assert "nowhere" in str(err.value)
    assert "captions.csv" in str(err.value)


def test_folder_without_captions_rejected(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError) as err:
        load_captions(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    assert "accepted layouts" in str(err.value)


def test_builtin_is_deterministic():
    a, b = load_captions("builtin", seed=3), load_captions("builtin", seed=3)
    assert a.captions == b.captions
    pixels_a = dataset.load_image_array(a, 5, 64)
    pixels_b = dataset.load_image_array(b, 5, 64)
    assert np.array_equal(pixels_a, pixels_b)
    assert load_captions("builtin", seed=4).captions != a.captions


def test_builtin_caption_names_drawn_colour():
    data = load_captions("builtin", seed=0)
    attributes = dataset.builtin_attributes(7, 0)
    assert attributes["color"] in data.captions[7][0] and attributes["shape"] in data.captions[7][0]
    img = dataset.render_builtin(7, 0, size=96)
    x, y = (c * 96 for c in dataset.POSITIONS[attributes["position"]])
    nearby = np.asarray(img)[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3].reshape(-1, 3)
    assert any(tuple(p) == dataset.COLORS[attributes["color"]] for p in nearby)


def test_split_by_image_never_overlaps():
    data = load_captions("builtin")
    data.splits = [None] * len(data.images)
    split = split_indices(data, val_fraction=0.2, seed=1)
    assert not set(split["train"]) & set(split["val"])
    assert len(split["val"]) == round(0.2 * len(data.images))
    assert split == split_indices(data, val_fraction=0.2, seed=1)
    assert split["test"] == []


def test_limits_cut_train_and_val():
    split = split_indices(load_captions("builtin"), max_train=10, max_val=3)
    assert len(split["train"]) == 10 and len(split["val"]) == 3


def test_caption_cleaning_counts(tmp_path):
    write_images(tmp_path / "images", ["a.jpg", "b.jpg"])
    long_caption = " ".join(["word"] * 500)
    (tmp_path / "captions.csv").write_text(
        f"image,caption\na.jpg,\na.jpg,A Dog!\na.jpg,a dog!\na.jpg,{long_caption}\nb.jpg,   \n")
    data = load_captions(str(tmp_path))
    assert data.stats["empty"] == 2
    assert data.stats["duplicate"] == 1
    assert data.stats["truncated"] == 1
    assert data.stats["images_without_captions"] == 1
    assert len(data.images) == 1
    assert len(data.captions[0][1].split()) == dataset.MAX_CAPTION_WORDS


def test_tokenizer_handles_case_and_punctuation():
    tokenizer = dataset.train_tokenizer(["A Dog, running!", "a dog runs.", "The CAT sleeps"] * 5, vocab_size=200)
    ids, lengths = tokenizer.encode(["A DOG, running!"], max_length=16)
    assert ids[0, 0] == tokenizer.bos_id and ids[0, lengths[0] - 1] == tokenizer.eos_id
    assert tokenizer.decode(ids) == ["a dog, running!"]
    restored = dataset.CaptionTokenizer.from_state_dict(tokenizer.state_dict())
    assert restored.decode(ids) == ["a dog, running!"]


def test_tokenizer_truncates_to_max_length():
    tokenizer = dataset.train_tokenizer(["one two three four five six"] * 3, vocab_size=100)
    ids, lengths = tokenizer.encode(["one two three four five six"], max_length=5)
    assert ids.shape == (1, 5) and int(lengths[0]) == 5
    assert ids[0, 4] == tokenizer.eos_id


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_to_rgb_every_mode(mode):
    img = Image.new(mode, (8, 8))
    assert dataset.to_rgb(img).mode == "RGB"


def test_16_bit_is_rescaled_not_clipped(tmp_path):
    array = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    Image.fromarray(array).save(tmp_path / "deep.png")
    rgb = np.asarray(dataset.open_image(tmp_path / "deep.png"))
    assert rgb.min() == 0 and rgb.max() == 255
    assert len(np.unique(rgb[..., 0])) > 32  # a clipped conversion would give almost only 255


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert dataset.to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 40])
def test_open_image_bad_files_raise_oserror(tmp_path, content):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(OSError) as err:
        dataset.open_image(path)
    assert "bad.jpg" in str(err.value)
