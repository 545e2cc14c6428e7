"""The LCL tokenizer: CLIP's byte-level BPE with the reference text cleaning, plus three image tokens.

The reference (OpenCLIP's `SimpleTokenizer`) cleans every text in Python before BPE:
`ftfy.fix_text`, `html.unescape` twice, whitespace collapse, lower-casing. transformers' CLIP tokenizer
skips ftfy and HTML unescaping, so it disagrees on mojibake, entities and some Unicode. `LCLTokenizer`
runs the same cleaning in Python, then a `tokenizers` pipeline whose pre-tokenizer is the reference
regex, so the ids are the reference ids.

Vocabulary layout (CLIP: 49,406 BPE tokens, then the special tokens in this order):

    0 .. V-1   BPE: 256 byte symbols, the same 256 with `</w>`, then one token per merge
    V          <start_of_text>   (<sot>, bos)
    V + 1      <end_of_text>     (<eot>, eos)
    V + 2      <img_placehold>   (<img>)
    V + 3      <start_of_img>    (<soi>)
    V + 4      <end_of_img>      (<eoi>)

Padding: the reference pads with id 0, which is a real token (`!`), so it cannot be the tokenizer's
`pad_token` (every `!` would become padding). `LCLProcessor` pads with 0 as the reference; the tokenizer
used alone pads with `<end_of_text>` as transformers' CLIP does. Either way the model reads padding from
`attention_mask`, never from the id.
"""

import html
import re
from collections.abc import Iterable
from itertools import chain

import ftfy
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import TokenizersBackend
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS_TOKEN = "<start_of_text>"
EOS_TOKEN = "<end_of_text>"
IMAGE_TOKEN = "<img_placehold>"
IMAGE_START_TOKEN = "<start_of_img>"
IMAGE_END_TOKEN = "<end_of_img>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN)
END_OF_WORD = "</w>"

# The reference pre-tokenizer: contractions, runs of letters, single digits, runs of other symbols.
# The reference compiles it with IGNORECASE, which matters for the contractions (e.g. "'ſ" after
# lower-casing), so they are matched case-insensitively. A global (?i) makes the whole tokenizer ~1.7x
# slower; its only other effect is that U+0345 (a combining mark that case-folds to a letter) counts
# as a letter, which the classes below spell out (same splits as the global (?i) on every code point).
PRE_TOKENIZER_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[\p{L}\x{345}]+|\p{N}|[^\s\p{L}\p{N}\x{345}]+"""

# The pre-tokenizer on cleaned ASCII text: lower-case, and its only whitespace is single spaces (the cleaning
# collapses it), so the Unicode classes reduce to ASCII ones and the standard library's regex gives the
# same splits.
_ASCII_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+")
# The chunk cache of `LCLTokenizer.encode_texts` is emptied when it reaches this many entries (~40 MB).
CHUNK_CACHE_SIZE = 200_000

# Text made only of these characters is left unchanged by `ftfy.fix_text` (up to line breaks, which the
# whitespace collapse removes): printable ASCII except "&" (HTML entities), tab and line breaks.
_NEEDS_FTFY = re.compile(r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]")


def clean_text(text: str) -> str:
    """The reference cleaning ("lower"): ftfy, HTML unescape twice, whitespace collapse, lower-case."""
    if _NEEDS_FTFY.search(text) is None:
        # Plain ASCII without entities: ftfy and html.unescape would return it unchanged (ftfy is ~15% of
        # the tokenizer's time on such text).
        return " ".join(text.split()).lower()
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def bpe_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: the 256 byte symbols, the same with `</w>`, then one token per merge."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + END_OF_WORD for symbol in symbols] + ["".join(merge) for merge in merges]
    vocab = {}
    for token in tokens:
        # A merge list may re-create an existing token (trained lists can); keep the first id, as the reference.
        vocab.setdefault(token, len(vocab))
    return vocab


def build_backend(merges: list[tuple[str, str]]) -> Tokenizer:
    """The `tokenizers` pipeline for a CLIP-style BPE `merges` list, with the five special tokens appended."""
    backend = Tokenizer(
        BPE(
            vocab=bpe_vocab(merges),
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix=END_OF_WORD,
            fuse_unk=False,
        )
    )
    # `LCLTokenizer` already cleans in Python; this normalizer is a no-op after that cleaning and keeps
    # tokenizer.json usable on its own (whitespace collapse + lower-casing, as CLIP's).
    backend.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " "), decoders.Strip(" ", 0, 1)]
    )
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} {BOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, backend.token_to_id(BOS_TOKEN)), (EOS_TOKEN, backend.token_to_id(EOS_TOKEN))],
    )
    return backend


class LCLTokenizer(TokenizersBackend):
    """CLIP byte-level BPE with the reference cleaning; `tok("a photo")` gives `<sot> ... <eot>` ids.

    Build it with `processing.build_clip_tokenizer()` (the reference vocabulary) or
    `processing.build_test_tokenizer()` (a tiny one for tests), or `LCLTokenizer.from_merges(merges)`.
    The image tokens are named special tokens: `image_token`, `image_start_token`, `image_end_token`
    (and `*_id`).

    Text given to this tokenizer is cleaned first (see `clean_text`), so the ids equal the reference
    tokenizer's. As in the reference, special-token strings found in the text become special ids unless
    `split_special_tokens=True` is passed (the processor always passes it: document text cannot forge
    an image block).
    """

    model_input_names = ["input_ids", "attention_mask"]

    @classmethod
    def from_merges(cls, merges: Iterable[tuple[str, str]], **kwargs) -> "LCLTokenizer":
        """A tokenizer for a CLIP-style merges list (pairs of symbols, in rank order)."""
        backend = build_backend([tuple(merge) for merge in merges])
        return cls(
            tokenizer_object=backend,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            extra_special_tokens={
                "image_token": IMAGE_TOKEN,
                "image_start_token": IMAGE_START_TOKEN,
                "image_end_token": IMAGE_END_TOKEN,
            },
            clean_up_tokenization_spaces=False,
            **kwargs,
        )

    def _encode_plus(self, text, text_pair=None, *args, is_split_into_words: bool = False, **kwargs):
        # Every encoding entry point (`__call__`, `encode`, `tokenize`) of the backend lands here.
        return super()._encode_plus(
            _clean_input(text, is_split_into_words),
            _clean_input(text_pair, is_split_into_words),
            *args,
            is_split_into_words=is_split_into_words,
            **kwargs,
        )

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without `<sot>`/`<eot>` and with special-token strings split as text:
        `self(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]`, faster.

        This is the processor's path. Cleaned ASCII text (most web text) is lower-case with single spaces,
        and no piece of the pre-tokenizer crosses a space, so its ids are the ids of its space-separated
        chunks put end to end: those come from a cache of chunk -> ids, filled on first sight by the same
        pre-tokenizer (its ASCII form) and BPE model. The reference tokenizer caches BPE per word too.
        Other text goes through the `tokenizers` pipeline.
        """
        ids: list = [None] * len(texts)
        others = []
        for index, text in enumerate(texts):
            if _NEEDS_FTFY.search(text) is None:
                # Plain ASCII: the cleaning is the whitespace collapse and lower-casing, i.e. these chunks.
                ids[index] = self._encode_ascii(text.lower().split())
                continue
            cleaned = clean_text(text)
            if cleaned.isascii():
                ids[index] = self._encode_ascii(cleaned.split(" "))
            else:
                others.append(index)
        if others:
            encoded = self([texts[i] for i in others], add_special_tokens=False, split_special_tokens=True)
            for index, row in zip(others, encoded["input_ids"]):
                ids[index] = row
        return ids

    def _encode_ascii(self, chunks: list[str]) -> list[int]:
        cache = self.__dict__.get("_chunk_ids")
        if cache is None or len(cache) >= CHUNK_CACHE_SIZE:
            cache = self.__dict__["_chunk_ids"] = {}
        ids = []
        try:
            for chunk in chunks:
                ids += cache[chunk]
        except KeyError:
            for chunk in chunks:
                if chunk not in cache:
                    cache[chunk] = [i for word in _ASCII_WORDS.findall(chunk) for i in self._bpe_word(word)]
            ids = list(chain.from_iterable(map(cache.__getitem__, chunks)))
        return ids

    def _bpe_word(self, word: str) -> list[int]:
        """The BPE ids of one pre-tokenized ASCII word (mapped to byte-level symbols, as the pipeline does)."""
        return [token.id for token in self.backend_tokenizer.model.tokenize(word.translate(_ASCII_SYMBOLS))]


# Byte-level symbols of the ASCII characters (an ASCII character is its own byte); printable ones map to
# themselves.
_ASCII_SYMBOLS = {byte: symbol for byte, symbol in bytes_to_unicode().items() if byte < 128}


def _clean_input(text, is_split_into_words: bool):
    """Apply `clean_text` to a text, a batch of texts, or (pre-split input) to every word."""
    if text is None:
        return None
    if isinstance(text, str):
        return clean_text(text)
    if is_split_into_words and text and isinstance(text[0], str):
        return [clean_text(word) for word in text]
    return [_clean_input(item, is_split_into_words) for item in text]


__all__ = ["LCLTokenizer", "clean_text", "bpe_vocab", "build_backend", "SPECIAL_TOKENS"]
