"""Readers: MMC4 shards (jsonl and zip, real PNG/JPEG, a corrupt and a missing file), OBELICS rows, pairs."""

import io
import json
import tarfile
import zipfile

import PIL.Image
import pytest
import torch
from datasets import Dataset, Features, Image, List, Value

from processing import (
    LCLDataCollator,
    LCLImageProcessor,
    LCLProcessor,
    MMC4DocumentBuilder,
    ObelicsDocumentBuilder,
    build_test_tokenizer,
    load_image_folder_pairs,
    load_mmc4,
    load_obelics,
    load_pairs,
    load_webdataset_pairs,
)

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


def color_of(image) -> tuple:
    return image.getpixel((0, 0))


def jpeg_bytes(color, size=(12, 8)) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(buffer, format="JPEG", quality=100)
    return buffer.getvalue()


def info(name, sentence, sim=0.3):
    return {"image_name": name, "matched_text_index": sentence, "matched_sim": sim, "raw_url": "http://x/" + name}


# Documents of the fixture, in shard order. Comments: what the reader must do with each.
DOCS_SHARD0 = [
    # 0: kept; the low-similarity image is dropped.
    {"text_list": ["The cat sat.", "It was happy.", "The end."],
     "image_info": [info("red.png", 0), info("green.jpg", 2, 0.5), info("blue.png", 1, 0.1)]},
    # 1: its only image is missing -> skipped (missing_image, no_loadable_images).
    {"text_list": ["Only text here."], "image_info": [info("missing.png", 0, 0.9)]},
    # 2: the corrupt image is dropped (bad_image), the other kept.
    {"text_list": ["First.", "Second."], "image_info": [info("corrupt.jpg", 0, 0.4), info("blue.png", 1)]},
]  # fmt: skip
DOCS_SHARD1 = [
    # 3: nothing above the 0.24 threshold -> skipped (no_matched_images).
    {"text_list": ["Low similarity."], "image_info": [info("red.png", 0, 0.2)]},
    # 4: two images for sentence 0 -> one of them; the truncated JPEG for sentence 1 is dropped (bad_image).
    {"text_list": ["One.", "Two."],
     "image_info": [info("red.png", 0), info("green.jpg", 0), info("truncated.jpg", 1)]},
    # 5: eight images (listed out of order) -> the first six by sentence.
    {"text_list": [f"S{i}." for i in range(9)],
     "image_info": [info("white.png", i) for i in (7, 2, 0, 5, 1, 6, 3, 4)]},
]  # fmt: skip


@pytest.fixture(scope="module")
def mmc4(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmc4")
    images = root / "images"
    images.mkdir()
    for name in ("red", "blue", "white"):
        PIL.Image.new("RGB", (16, 10), COLORS[name]).save(images / f"{name}.png")
    (images / "green.jpg").write_bytes(jpeg_bytes(COLORS["green"]))
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (images / "truncated.jpg").write_bytes(jpeg_bytes(COLORS["red"], size=(64, 64))[:200])
    lines = [json.dumps(doc) for doc in DOCS_SHARD0]
    lines.insert(1, "{not json")  # a broken line is skipped at read time
    (root / "docs_shard_0_v2.jsonl").write_text("\n".join(lines) + "\n")
    with zipfile.ZipFile(root / "docs_shard_1_v2.jsonl.zip", "w") as archive:
        archive.writestr("docs_shard_1_v2.jsonl", "\n".join(json.dumps(doc) for doc in DOCS_SHARD1) + "\n")
    return {"shards": [str(root / "docs_shard_0_v2.jsonl"), str(root / "docs_shard_1_v2.jsonl.zip")],
            "images": str(images), "root": root}  # fmt: skip


def color_name(image) -> str:
    """The fixture color nearest to the image's first pixel (JPEG shifts colors a little)."""
    pixel = color_of(image)
    return min(COLORS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLORS[name], pixel)))


def describe(example) -> list:
    """Segments with images replaced by their color name."""
    return [segment if isinstance(segment, str) else color_name(segment) for segment in example["segments"]]


@pytest.mark.parametrize("streaming", [False, True])
def test_mmc4_documents_images_after(mmc4, streaming):
    builder = MMC4DocumentBuilder(mmc4["images"], image_first_prob=0.0, seed=0)
    dataset = load_mmc4(mmc4["shards"], builder=builder, streaming=streaming, cache_dir=str(mmc4["root"] / "cache"))
    examples = list(dataset) if streaming else [dataset[i] for i in (0, 2, 4, 5)]
    described = [describe(example) for example in examples]
    assert described[0] == ["The cat sat.", "red", "It was happy. The end.", "green"]
    assert described[1] == ["First. Second.", "blue"]
    assert described[2] in (["One.", "red", "Two."], ["One.", "green", "Two."])
    assert described[3] == [segment for i in range(6) for segment in (f"S{i}.", "white")] + ["S6. S7. S8."]
    assert all(isinstance(s, str) or s.mode == "RGB" for example in examples for s in example["segments"])
    if streaming:
        assert len(examples) == 4
        assert builder.stats.as_dict() == {
            "missing_image": 1, "no_loadable_images": 1, "bad_image": 2, "no_matched_images": 1,
        }  # fmt: skip


def test_mmc4_images_before_their_sentences(mmc4):
    dataset = load_mmc4(mmc4["shards"], mmc4["images"], image_first_prob=1.0, cache_dir=str(mmc4["root"] / "cache"))
    assert describe(dataset[0]) == ["red", "The cat sat. It was happy.", "green", "The end."]


def test_mmc4_map_style_replaces_skipped_documents(mmc4):
    dataset = load_mmc4(mmc4["shards"], mmc4["images"], image_first_prob=0.0, cache_dir=str(mmc4["root"] / "cache"))
    assert len(dataset) == 6  # the broken JSON line is not a row
    # Row 1 (missing image) and row 3 (low similarity) are replaced by the next valid document.
    assert describe(dataset[1]) == describe(dataset[2]) == ["First. Second.", "blue"]
    # Row 3 becomes document 4, whose image for sentence 0 is a random one of two.
    assert describe(dataset[3]) in (["One.", "red", "Two."], ["One.", "green", "Two."])
    assert dataset.stats["missing_image"] >= 1 and dataset.stats["no_matched_images"] >= 1


def test_mmc4_random_choices_are_a_function_of_seed_epoch_and_row(mmc4):
    """Map-style rows: the same (seed, epoch, row) gives the same document, read after read (so a resumed
    run sees what the interrupted one saw); another epoch or seed draws again."""
    dataset = load_mmc4(mmc4["shards"], mmc4["images"], seed=1, cache_dir=str(mmc4["root"] / "cache"))

    def placements(epoch, seed=1):
        dataset.builder.seed = seed
        dataset.set_epoch(epoch)
        return [tuple(describe(dataset[i])) for i in range(len(dataset))]

    first = placements(0)
    assert placements(0) == first
    assert placements(1) != first and placements(0) == first
    assert placements(0, seed=2) != first
    unseeded = load_mmc4(mmc4["shards"], mmc4["images"], cache_dir=str(mmc4["root"] / "cache"))
    assert len({tuple(describe(unseeded[5])) for _ in range(10)}) > 1  # no seed: drawn afresh on each read


def test_mmc4_disjoint_split_by_node(mmc4):
    cache = str(mmc4["root"] / "cache")

    def first_sentences(rank, streaming):
        dataset = load_mmc4(mmc4["shards"], mmc4["images"], image_first_prob=0.0, streaming=streaming, rank=rank,
                            world_size=2, cache_dir=cache)  # fmt: skip
        if streaming:  # two shards for two ranks: one shard each, skipped documents filtered out
            return [example["segments"][0] for example in dataset]
        return [row["text_list"][0] for row in dataset.source]  # raw rows: a contiguous half each

    assert [first_sentences(rank, True) for rank in range(2)] == [["The cat sat.", "First. Second."], ["One.", "S0."]]
    assert [first_sentences(rank, False) for rank in range(2)] == [
        ["The cat sat.", "Only text here.", "First."],
        ["Low similarity.", "One.", "S0."],
    ]


def test_mmc4_through_processor_and_collator(mmc4):
    tokenizer = build_test_tokenizer()
    processor = LCLProcessor(LCLImageProcessor(size=16, crop_size=16), tokenizer, num_image_tokens=4, max_length=64)
    dataset = load_mmc4(mmc4["shards"], mmc4["images"], image_first_prob=0.0, cache_dir=str(mmc4["root"] / "cache"))
    special = processor.special_token_ids()
    block = [special["image_start_token_id"]] + [special["image_token_id"]] * 4 + [special["image_end_token_id"]]

    def text(value):
        return tokenizer(value, add_special_tokens=False)["input_ids"]

    batch = LCLDataCollator(processor)([dataset[0], dataset[2]])
    expected_first = [special["bos_token_id"]] + text("The cat sat.") + block + text("It was happy. The end.") + block
    expected_first += [special["eos_token_id"]]
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == expected_first
    assert batch["image_counts"].tolist() == [2, 1] and batch["pixel_values"].shape == (3, 3, 16, 16)
    # The whole fixture through a DataLoader: every batch is consistent.
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=LCLDataCollator(processor, seed=0))
    for batch in loader:
        num_soi = (batch["input_ids"] == special["image_start_token_id"]).sum().item()
        assert num_soi == batch["image_counts"].sum().item() == batch["pixel_values"].shape[0]


# ----------------------------------------------------------------------------------------------
# OBELICS
# ----------------------------------------------------------------------------------------------


def test_obelics_rows_with_nulls(tmp_path):
    PIL.Image.new("RGB", (8, 8), COLORS["red"]).save(tmp_path / "red.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    rows = {  # one row per pair of lists: texts, images
        "texts": [["Intro.", None, "Outro."], [None, "Caption."], ["Text only."], [None, "x"], ["both", None]],
        "images": [[None, "red.png", None], ["bad.png", None], [None], ["https://example.com/a.jpg", None],
                   ["red.png", "red.png"]],
    }  # fmt: skip
    builder = ObelicsDocumentBuilder(image_dir=tmp_path)
    dataset = load_obelics(Dataset.from_dict(rows), builder=builder)
    assert describe(dataset[0]) == ["Intro.", "red", "Outro."]
    # Rows 1-4 are skipped (broken image, no image, URL not downloaded, malformed) and replaced.
    assert all(describe(dataset[i]) == describe(dataset[0]) for i in range(1, 5))
    stats = builder.stats.as_dict()
    assert stats["bad_image"] >= 1 and stats["missing_image"] >= 1 and stats["malformed_document"] >= 1
    assert stats["no_loadable_images"] >= 2


def test_obelics_image_feature_is_decoded_by_the_reader(tmp_path):
    """A `datasets.Image` list column with a corrupt image: counted, not raised while formatting the row."""
    features = Features({"texts": List(Value("string")), "images": List(Image())})
    good = {"bytes": jpeg_bytes(COLORS["blue"]), "path": None}
    bad = {"bytes": b"\xff\xd8 broken", "path": None}
    rows = {"texts": [[None, "blue."], [None, None, "two"]], "images": [[good, None], [bad, good, None]]}
    dataset = Dataset.from_dict(rows, features=features)
    streaming = load_obelics(dataset.to_iterable_dataset(num_shards=1))
    examples = list(streaming)
    assert [len(example["segments"]) for example in examples] == [2, 2]
    assert isinstance(examples[1]["segments"][0], PIL.Image.Image)


# ----------------------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------------------


def test_pairs_from_an_image_folder(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    PIL.Image.new("RGB", (20, 10), COLORS["red"]).save(folder / "a.png")
    (folder / "b.jpg").write_bytes(jpeg_bytes(COLORS["green"]))
    (folder / "c.jpg").write_bytes(b"not an image")
    captions = [("a.png", "a red thing"), ("b.jpg", "a green thing"), ("c.jpg", "broken")]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": t}) for n, t in captions))
    streamed = list(load_image_folder_pairs(folder, streaming=True))
    assert [example["text"] for example in streamed] == ["a red thing", "a green thing"]
    assert all(example["image"].mode == "RGB" for example in streamed)
    mapped = load_image_folder_pairs(folder)
    assert [mapped[i]["text"] for i in range(3)] == ["a red thing", "a green thing", "a red thing"]
    assert mapped.stats["bad_image"] == 1


def test_pairs_from_webdataset_shards(tmp_path):
    def add(archive, name, data):
        entry = tarfile.TarInfo(name)
        entry.size = len(data)
        archive.addfile(entry, io.BytesIO(data))

    with tarfile.open(tmp_path / "shard-000.tar", "w") as archive:
        add(archive, "000.jpg", jpeg_bytes(COLORS["red"]))
        add(archive, "000.txt", b"a red square")
        add(archive, "001.jpg", b"garbage")
        add(archive, "001.txt", b"a broken one")
    with tarfile.open(tmp_path / "shard-001.tar", "w") as archive:
        add(archive, "002.jpg", jpeg_bytes(COLORS["blue"]))
        add(archive, "002.txt", b"a blue square")
    shards = str(tmp_path / "shard-*.tar")
    assert [ex["text"] for ex in load_webdataset_pairs(shards)] == ["a red square", "a blue square"]
    parts = [[ex["text"] for ex in load_webdataset_pairs(shards, rank=rank, world_size=2)] for rank in range(2)]
    assert parts == [["a red square"], ["a blue square"]]  # one shard each


def test_pairs_from_any_dataset_columns():
    features = Features({"photo": Image(), "caption": Value("string")})
    rows = {"photo": [{"bytes": jpeg_bytes(COLORS["red"]), "path": None}, None], "caption": ["red", "no image"]}
    dataset = load_pairs(Dataset.from_dict(rows, features=features))
    assert dataset.builder.image_column == "photo" and dataset.builder.text_column == "caption"
    assert dataset[0]["text"] == "red" and dataset[1]["text"] == "red"
    assert dataset.stats["missing_image"] == 1
    with pytest.raises(ValueError, match="Cannot find the text column"):
        load_pairs(
            Dataset.from_dict(
                {"photo": rows["photo"], "label": [0, 1]},
                features=Features({"photo": Image(), "label": Value("int64")}),
            )
        )


def test_pairs_can_carry_their_own_seeded_layout():
    features = Features({"image": Image(), "text": Value("string")})
    rows = {"image": [{"bytes": jpeg_bytes(COLORS["red"]), "path": None}] * 40, "text": [f"red {i}" for i in range(40)]}
    raw = Dataset.from_dict(rows, features=features)
    assert "image_first" not in load_pairs(raw)[0]  # by default the collator draws the layout
    dataset = load_pairs(raw, image_first_prob=0.5, seed=3)
    layouts = [dataset[i]["image_first"] for i in range(40)]
    assert layouts == [dataset[i]["image_first"] for i in range(40)] and 5 < sum(layouts) < 35
    dataset.set_epoch(1)
    assert [dataset[i]["image_first"] for i in range(40)] != layouts
    with pytest.raises(ValueError, match="image_first_prob"):
        load_pairs(raw, image_first_prob=2.0)
