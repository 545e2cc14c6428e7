"""Build the reference CLIP BPE tokenizer (and a tiny one for tests).

The reference vocabulary is OpenAI CLIP's BPE merges file `bpe_simple_vocab_16e6.txt.gz`. It is not
shipped with this package: `build_clip_tokenizer()` takes it, in this order, from

1. `merges_path=` (a `bpe_simple_vocab_16e6.txt.gz`, its uncompressed `.txt`, or an `open_clip_torch` wheel);
2. the `LCL_CLIP_BPE_PATH` environment variable (same kinds of file);
3. the tokenizer it built before, cached in `$LCL_CACHE_DIR` (default `~/.cache/lcl-transformers`);
4. an installed `open_clip` package (its file is read, the package is not imported);
5. the `open_clip_torch` wheel, fetched with `pip download --no-deps` (about 1.5 MB), read in place.

Whatever the source, the file is checked against the SHA-256 of the reference merges, so a wrong or
corrupted file fails loudly instead of giving other ids. Command line:

    python -m processing.build_tokenizer --output DIR [--merges PATH]
"""

import argparse
import gzip
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from functools import cache
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils import logging

from .tokenization_lcl import END_OF_WORD, LCLTokenizer

logger = logging.get_logger(__name__)

OPEN_CLIP_WHEEL_REQUIREMENT = "open_clip_torch==3.3.0"
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# SHA-256 of the *decompressed* merges text (same in the OpenAI CLIP, OpenCLIP and LCL repositories).
BPE_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
# CLIP keeps the first 49152 - 256 - 2 merges (line 0 is a version header): 256 + 256 + 48894 = 49406 tokens.
NUM_CLIP_MERGES = 49152 - 256 - 2
CACHE_SUBDIR = "clip-bpe-v1"


def build_clip_tokenizer(merges_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None):
    """The reference tokenizer: CLIP BPE (49,408) + `<img_placehold>` 49408, `<start_of_img>` 49409,
    `<end_of_img>` 49410; `<start_of_text>` 49406, `<end_of_text>` 49407.

    Built once, then loaded from the cache (`cache_dir`, `$LCL_CACHE_DIR` or `~/.cache/lcl-transformers`).
    """
    merges_path = merges_path or os.environ.get("LCL_CLIP_BPE_PATH")
    if merges_path:
        return LCLTokenizer.from_merges(read_clip_merges(merges_path))

    cached = _cache_root(cache_dir) / CACHE_SUBDIR
    if (cached / "tokenizer.json").is_file():
        return LCLTokenizer.from_pretrained(str(cached))

    with tempfile.TemporaryDirectory(prefix="lcl-open-clip-") as download_dir:
        tokenizer = LCLTokenizer.from_merges(read_clip_merges(_find_or_fetch_merges(Path(download_dir))))
    _save_atomically(tokenizer, cached)
    return tokenizer


def read_clip_merges(path: str | os.PathLike) -> list[tuple[str, str]]:
    """The reference merges from a `.txt.gz`, a `.txt` or an `open_clip_torch` wheel, checksum-verified."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE merges file not found: {path}")
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            raw = wheel.read(f"open_clip/{BPE_FILE_NAME}")
    else:
        raw = path.read_bytes()
    text_bytes = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    digest = hashlib.sha256(text_bytes).hexdigest()
    if digest != BPE_TEXT_SHA256:
        raise ValueError(
            f"{path} is not the CLIP BPE merges file (SHA-256 of its text {digest}, expected {BPE_TEXT_SHA256})."
        )
    lines = text_bytes.decode("utf-8").split("\n")[1 : NUM_CLIP_MERGES + 1]
    return [tuple(line.split()) for line in lines]


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("LCL_CACHE_DIR", Path.home() / ".cache" / "lcl-transformers"))


def _find_or_fetch_merges(download_dir: Path) -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / BPE_FILE_NAME
        if installed.is_file():
            return installed
    return _download_wheel(download_dir)


def _download_wheel(target: Path) -> Path:
    """`pip download --no-deps` the open_clip_torch wheel into `target` (read in place, never installed)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               OPEN_CLIP_WHEEL_REQUIREMENT, "--dest", str(target)]  # fmt: skip
    logger.info("Fetching the CLIP BPE merges: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wheels = sorted(target.glob("open_clip_torch-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Could not fetch {OPEN_CLIP_WHEEL_REQUIREMENT} to read the CLIP BPE merges "
            f"(pip exited {result.returncode}: {result.stderr.strip()[-500:]}). Pass merges_path= or set "
            f"LCL_CLIP_BPE_PATH to a local {BPE_FILE_NAME} or open_clip_torch wheel."
        )
    return wheels[0]


def _save_atomically(tokenizer: LCLTokenizer, destination: Path) -> None:
    """Save into a temporary sibling, then rename: concurrent first builds (one per rank) never see half a
    folder, and the loser of the race just keeps the winner's identical copy."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=destination.parent))
    try:
        tokenizer.save_pretrained(str(staging))
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        os.replace(staging, destination)
    except OSError:
        if not (destination / "tokenizer.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# A small fixed corpus: enough English for a few hundred merges, nothing downloaded.
_TEST_CORPUS_WORDS = (
    "a photo of the cat dog bird car tree house person man woman child playing running sitting on in at "
    "with and red blue green small large old new picture image text document page web site sentence "
    "beach sunset mountain river city street food plate table chair window door book reading writing "
    "one two three four five six seven eight nine ten zero hello world this that is are was were it "
    "there here some many very good great nice beautiful day night morning evening summer winter"
).split()


@cache
def _test_merges(num_merges: int) -> tuple[tuple[str, str], ...]:
    """Learn BPE merges on the fixed corpus, deterministically (the `tokenizers` trainer breaks ties in
    hash order, which changes from one process to the next): most frequent pair first, ties by the pair."""
    byte_encoder = bytes_to_unicode()
    words = Counter()
    for word in _TEST_CORPUS_WORDS:
        symbols = [byte_encoder[byte] for byte in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        words[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge_pair(symbols, best): count for symbols, count in words.items()})
    return tuple(merges)


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, index = [], 0
    while index < len(symbols):
        if symbols[index : index + 2] == pair:
            merged.append(pair[0] + pair[1])
            index += 2
        else:
            merged.append(symbols[index])
            index += 1
    return tuple(merged)


def build_test_tokenizer(num_merges: int = 256) -> LCLTokenizer:
    """A tiny CLIP-style BPE learned on the fly from a fixed corpus (no download, same result in every
    process): same pipeline and special tokens as the CLIP one, other ids. It has `512 + num_merges + 5`
    tokens at most (byte symbols, merges, special tokens) and encodes any text (byte-level).
    """
    return LCLTokenizer.from_merges(_test_merges(num_merges))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the LCL (CLIP BPE + image tokens) tokenizer.")
    parser.add_argument("--output", required=True, help="folder to save the tokenizer into")
    parser.add_argument("--merges", default=None, help=f"local {BPE_FILE_NAME}, .txt or open_clip_torch wheel")
    args = parser.parse_args(argv)
    tokenizer = build_clip_tokenizer(merges_path=args.merges)
    tokenizer.save_pretrained(args.output)
    print(f"Saved {type(tokenizer).__name__} ({len(tokenizer)} tokens) to {args.output}")


if __name__ == "__main__":
    main()
