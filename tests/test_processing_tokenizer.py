"""The LCL tokenizer: reference ids for CLIP BPE, the tiny test tokenizer, cleaning, caching, Auto loading."""

import gzip
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import processing.tokenization_lcl as tokenization_module

import processing.build_tokenizer as build_tokenizer_module
from processing import LCLTokenizer, build_clip_tokenizer, build_test_tokenizer, clean_text, read_clip_merges

FIXTURE = Path(__file__).parent / "fixtures" / "processing" / "clip_reference_ids.json"


@pytest.fixture(scope="module")
def clip_tokenizer():
    # First run downloads the open_clip_torch wheel (about 1.5 MB) once, then the cache is used.
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def test_tokenizer():
    return build_test_tokenizer()


# ----------------------------------------------------------------------------------------------
# The reference vocabulary
# ----------------------------------------------------------------------------------------------


def test_clip_ids_equal_reference_tokenizer(clip_tokenizer):
    """Ids of OpenCLIP's SimpleTokenizer on 133 varied strings (English, numbers, accents, CJK, emoji,
    mojibake, HTML entities, whitespace/control characters, random unicode), recorded in the fixture."""
    cases = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
    assert len(cases) > 100
    mismatches = [
        (case["text"], case["ids"], ids)
        for case in cases
        if (ids := clip_tokenizer(case["text"], add_special_tokens=False)["input_ids"]) != case["ids"]
    ]
    assert mismatches == []


def test_clip_batch_encoding_equals_one_by_one(clip_tokenizer):
    cases = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"][:40]
    batch = clip_tokenizer([case["text"] for case in cases], add_special_tokens=False)["input_ids"]
    assert batch == [case["ids"] for case in cases]


def pipeline_ids(tokenizer, texts):
    return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def test_encode_texts_equals_the_pipeline_and_the_reference(clip_tokenizer):
    """The processor's fast path (ASCII word cache) gives the `tokenizers` pipeline's ids, twice (cold and
    warm cache), and the reference ids wherever the text does not spell a special token."""
    cases = json.loads(FIXTURE.read_text(encoding="utf-8"))["cases"]
    texts = [case["text"] for case in cases]
    assert clip_tokenizer.encode_texts(texts) == pipeline_ids(clip_tokenizer, texts)
    assert clip_tokenizer.encode_texts(texts) == pipeline_ids(clip_tokenizer, texts)
    plain = [case for case in cases if "<" not in case["text"]]
    assert len(plain) > 100
    assert clip_tokenizer.encode_texts([case["text"] for case in plain]) == [case["ids"] for case in plain]


# ASCII-heavy text: what the word cache serves, with the characters that make the cleaning do work.
ascii_heavy = st.lists(
    st.sampled_from(list("abcXYZ019 '.,!?&;#<>_-/\t\n\x00\x7f\x1f") + ["amp;", "'s", "'LL", "é", "ſ", "ﬁ", "\u0345"]),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(ascii_heavy, min_size=1, max_size=4))
def test_encode_texts_equals_the_pipeline_on_generated_text(clip_tokenizer, texts):
    assert clip_tokenizer.encode_texts(texts) == pipeline_ids(clip_tokenizer, texts)


def test_encode_texts_chunk_cache_is_bounded(test_tokenizer, monkeypatch):
    monkeypatch.setattr(tokenization_module, "CHUNK_CACHE_SIZE", 3)
    texts = ["one two three four five six", "six five four three two one", "a b c d e"]
    assert test_tokenizer.encode_texts(texts) == pipeline_ids(test_tokenizer, texts)
    assert len(test_tokenizer._chunk_ids) == 5  # emptied before each text here; the last one has 5 chunks


def test_encode_texts_on_a_cold_cache_gives_the_pipeline_ids(clip_tokenizer):
    """The miss path of the chunk cache: repeated chunks, special-token strings spelled as text, punctuation
    runs and texts that clean to nothing."""
    texts = ["the the cat's <start_of_img> the!!", "\u00a0", "", "Hello, WORLD... 7:30pm kariven &amp; co"]
    clip_tokenizer.__dict__.pop("_chunk_ids", None)
    assert clip_tokenizer.encode_texts(texts) == pipeline_ids(clip_tokenizer, texts)
    cache = clip_tokenizer._chunk_ids
    assert cache["the"] == pipeline_ids(clip_tokenizer, ["the"])[0] and "" in cache
    assert clip_tokenizer.image_start_token_id not in cache["<start_of_img>"]


def test_clip_special_ids_and_framing(clip_tokenizer):
    tok = clip_tokenizer
    assert len(tok) == 49411
    assert (tok.bos_token_id, tok.eos_token_id) == (49406, 49407)
    assert (tok.image_token_id, tok.image_start_token_id, tok.image_end_token_id) == (49408, 49409, 49410)
    assert tok.convert_ids_to_tokens([49408, 49409, 49410]) == ["<img_placehold>", "<start_of_img>", "<end_of_img>"]
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    # Id 0 is the real token "!" (start of a word), never the padding token of the tokenizer.
    assert tok.convert_ids_to_tokens(0) == "!"
    assert tok.pad_token_id == 49407


def test_clip_decode(clip_tokenizer):
    ids = clip_tokenizer("Hello, World! It's 2024.")["input_ids"]
    assert clip_tokenizer.decode(ids, skip_special_tokens=True) == "hello , world ! it 's 2 0 2 4 ."


def test_build_clip_tokenizer_uses_its_cache(clip_tokenizer, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the cached tokenizer should have been used")

    monkeypatch.setattr(build_tokenizer_module, "_find_or_fetch_merges", no_network)
    cached = build_clip_tokenizer()
    assert cached.get_vocab() == clip_tokenizer.get_vocab()
    assert cached("Café &amp; crème")["input_ids"] == clip_tokenizer("Café &amp; crème")["input_ids"]


def test_read_clip_merges_rejects_other_files(tmp_path):
    fake = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    fake.write_bytes(gzip.compress(b"#version: 0.2\na b\n"))
    with pytest.raises(ValueError, match="not the CLIP BPE merges file"):
        read_clip_merges(fake)
    with pytest.raises(FileNotFoundError):
        read_clip_merges(tmp_path / "missing.txt.gz")
    with pytest.raises(ValueError, match="SHA-256"):
        build_clip_tokenizer(merges_path=fake)


def test_save_and_auto_load(clip_tokenizer, tmp_path):
    clip_tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(loaded, LCLTokenizer)
    text = "â€œQuotedâ€\x9d &amp; naïve Ｔｅｘｔ"
    assert loaded(text)["input_ids"] == clip_tokenizer(text)["input_ids"]
    assert loaded.image_start_token_id == 49409


def test_build_tokenizer_cli(tmp_path, clip_tokenizer, capsys):
    build_tokenizer_module.main(["--output", str(tmp_path / "tok")])
    assert "49411 tokens" in capsys.readouterr().out
    assert LCLTokenizer.from_pretrained(tmp_path / "tok").get_vocab() == clip_tokenizer.get_vocab()


# ----------------------------------------------------------------------------------------------
# Cleaning (what transformers' CLIP tokenizer skips) and the tiny tokenizer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("  A  Photo\tof\n\nA CAT  ", "a photo of a cat"),
        ("fish &amp;amp; chips", "fish & chips"),
        ("cafÃ©", "café"),
        ("\u00a0\u3000 ", ""),
        ("ﬁne", "fine"),
    ],
)
def test_clean_text(raw, cleaned):
    assert clean_text(raw) == cleaned


def test_cleaning_happens_in_every_entry_point(test_tokenizer):
    tok = test_tokenizer
    plain = tok("the cat & the dog")["input_ids"]
    assert tok("THE   cat &amp; the\ndog")["input_ids"] == plain
    assert tok.encode("THE cat &amp;amp; the dog") == plain
    assert tok.tokenize("The CAT") == tok.tokenize("the cat")
    assert tok(["The CAT", "a DOG"])["input_ids"] == [tok("the cat")["input_ids"], tok("a dog")["input_ids"]]


def test_test_tokenizer_shares_the_special_layout(test_tokenizer):
    tok = test_tokenizer
    size = len(tok)
    ids = [tok.bos_token_id, tok.eos_token_id, tok.image_token_id, tok.image_start_token_id, tok.image_end_token_id]
    assert ids == list(range(size - 5, size))
    # Byte-level: any text encodes, nothing becomes unknown.
    encoded = tok("日本 😀 ü", add_special_tokens=False)["input_ids"]
    assert encoded and max(encoded) < size - 5
    assert tok.decode(tok("the cat sat")["input_ids"], skip_special_tokens=True) == "the cat sat"


def test_special_token_text_is_split_on_request(test_tokenizer):
    tok = test_tokenizer
    as_special = tok("<start_of_img>", add_special_tokens=False)["input_ids"]
    as_text = tok("<start_of_img>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert as_special == [tok.image_start_token_id]
    assert tok.image_start_token_id not in as_text and len(as_text) > 1


def test_empty_and_whitespace_text(test_tokenizer):
    tok = test_tokenizer
    for text in ["", " ", "\n\t \u00a0"]:
        assert tok(text)["input_ids"] == [tok.bos_token_id, tok.eos_token_id]
