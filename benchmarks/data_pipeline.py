"""Data pipeline throughput on one core: MMC4-style documents through reader + processor + collator.

Measures documents/s and images/s of `load_mmc4` -> `LCLDataCollator` (CLIP BPE fast tokenizer with the
reference cleaning, `LCLImageProcessor`) on synthetic MMC4 shards (English sentences, 512x384 JPEGs,
B/32-MMC4 settings: 49 image tokens, context 2048), pinned to one CPU core and one torch thread.

In the same run, the same documents go through a path equivalent to the reference's: the reference
builds one string per document with `<start_of_img> <img_placehold>... <end_of_img>` substrings and
tokenizes it with OpenCLIP's pure-Python `SimpleTokenizer`, then fixes a cut image block. That path
needs the reference tokenizer: an installed `open_clip_torch` (only its `tokenizer.py` is loaded, so
torchvision is not needed) or `--reference-src` (the `src/` folder of a checkout of the LCL repository).
Without either it is skipped with a message. Image processing is the same in both paths (torchvision is
not used here), so the difference is the text path.

    taskset -c 0 python benchmarks/data_pipeline.py [--docs 256] [--reference-src /path/to/LCL/src]
"""

import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import RESULTS_DIR, format_table, machine_info, median, spread, write_json  # noqa: E402

WORDS = (
    "the a of and to in is was for on that with as by at from it this be are an or which his her their "
    "photo image city river house garden family music history people world water light summer winter "
    "beautiful small large old new first last great little good local famous popular modern traditional "
    "built opened painted visited discovered designed written played known called made found used shown "
    "2019 2020 12 3 45 100 1,000 $20 50% 7:30pm"
).split()


def pin_to_one_core() -> int:
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return core
    return -1


SYLLABLES = "ka ri to men sa lo vi ne tra bel cor dan fi gu ha jo lu mar nor pe qui ros sel tin u ver wil".split()


def word(rng: random.Random) -> str:
    """Common words 60% of the time, else a made-up word (mostly unseen): the reference tokenizer's BPE
    cache helps on the first kind only, as on real web text with its long tail of rare words."""
    if rng.random() < 0.6:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def sentence(rng: random.Random) -> str:
    words = [word(rng) for _ in range(rng.randint(8, 28))]
    words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", ".", "!", "?", "..."])


def write_synthetic_mmc4(root: Path, num_docs: int, seed: int = 0) -> tuple[list[str], Path]:
    """One jsonl shard and one zipped shard of MMC4-style documents, and 32 JPEG files (512x384)."""
    rng, images = random.Random(seed), root / "images"
    images.mkdir(parents=True)
    pixels = np.random.default_rng(seed)
    for index in range(32):
        gradient = np.linspace(0, 255, 512, dtype=np.float32)[None, :, None] * np.ones((384, 1, 3), np.float32)
        noise = pixels.normal(0, 25, (384, 512, 3))
        array = np.clip(gradient * (index % 5 + 1) / 5 + noise, 0, 255).astype(np.uint8)
        PIL.Image.fromarray(array).save(images / f"{index:04d}.jpg", quality=90)
    documents = []
    for _ in range(num_docs):
        sentences = [sentence(rng) for _ in range(rng.randint(6, 30))]
        infos = [
            {"image_name": f"{rng.randrange(32):04d}.jpg", "matched_text_index": rng.randrange(len(sentences)),
             "matched_sim": rng.uniform(0.15, 0.4)}
            for _ in range(rng.randint(1, 8))
        ]  # fmt: skip
        documents.append({"text_list": sentences, "image_info": infos})
    half = num_docs // 2
    first = root / "docs_shard_0.jsonl"
    first.write_text("\n".join(json.dumps(doc) for doc in documents[:half]) + "\n")
    second = root / "docs_shard_1.jsonl.zip"
    with zipfile.ZipFile(second, "w") as archive:
        archive.writestr("docs_shard_1.jsonl", "\n".join(json.dumps(doc) for doc in documents[half:]) + "\n")
    return [str(first), str(second)], images


def load_reference_tokenizer(reference_src: str | None):
    """OpenCLIP's `SimpleTokenizer` module, loaded from its file (no `open_clip/__init__`, no torchvision)."""
    if reference_src:
        path = Path(reference_src) / "open_clip" / "tokenizer.py"
    else:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None, "open_clip_torch is not installed and --reference-src was not given"
        path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    if not path.is_file():
        return None, f"{path} not found"
    spec = importlib.util.spec_from_file_location("reference_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def make():
        return module.SimpleTokenizer(additional_special_tokens=["<img_placehold>", "<start_of_img>", "<end_of_img>"])

    return make, str(path)


class ReferenceTextPath:
    """The reference's MMC4 text path over our reader's segments: one string per document with image
    substrings, `SimpleTokenizer(text, context_length)`, then the cut-block fix (cut at the last
    `<start_of_img>`, put `<end_of_text>` there)."""

    def __init__(self, tokenizer, num_image_tokens: int, context_length: int):
        self.tokenizer, self.n, self.context_length = tokenizer, num_image_tokens, context_length
        self.image_text = " <start_of_img> " + "<img_placehold> " * num_image_tokens + "<end_of_img> "
        self.soi = tokenizer.encoder["<start_of_img>"]
        self.img = tokenizer.encoder["<img_placehold>"]

    def __call__(self, segments: list) -> tuple[list[int], int]:
        text = "".join(self.image_text if not isinstance(s, str) else " " + s for s in segments)
        ids = self.tokenizer(text, context_length=self.context_length)[0]
        length = int((ids != 0).nonzero().max()) + 1 if ids.any() else 0
        ids = ids[:length].tolist()
        if ids.count(self.soi) * self.n != ids.count(self.img):
            last = max(i for i, token in enumerate(ids) if token == self.soi)
            ids = ids[:last] + [self.tokenizer.eot_token_id]
        return ids, ids.count(self.soi)


def run_ours(dataset, collator, batch_size: int) -> dict:
    """Reader + processor + collator over the whole dataset (DataLoader, main process)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=0)
    start = time.perf_counter()
    docs = images = tokens = 0
    for batch in loader:
        docs += batch["input_ids"].shape[0]
        images += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
        tokens += int(batch["attention_mask"].sum())
    return {"seconds": time.perf_counter() - start, "documents": docs, "images": images, "tokens": tokens}


def run_reference(dataset, text_path: ReferenceTextPath, image_processor, batch_size: int) -> dict:
    """Same reader, the reference text path, the same image processing and padding."""
    start = time.perf_counter()
    docs = images = tokens = 0
    for first in range(0, len(dataset), batch_size):
        examples = [dataset[i] for i in range(first, min(first + batch_size, len(dataset)))]
        sequences, batch_images = [], []
        for example in examples:
            ids, kept = text_path(example["segments"])
            sequences.append(ids)
            batch_images += [s for s in example["segments"] if not isinstance(s, str)][:kept]
        length = max(len(ids) for ids in sequences)
        input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
        if batch_images:
            image_processor(batch_images, return_tensors="pt")
        docs, images, tokens = docs + len(sequences), images + len(batch_images), tokens + sum(map(len, sequences))
    return {"seconds": time.perf_counter() - start, "documents": docs, "images": images, "tokens": tokens}


def text_only(texts: list[str], encode) -> float:
    start = time.perf_counter()
    encode(texts)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=256, help="synthetic documents")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the data (medians reported)")
    parser.add_argument("--num-image-tokens", type=int, default=49)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--reference-src", default=None, help="src/ of an LCL checkout (for SimpleTokenizer)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "data_pipeline.json"))
    args = parser.parse_args()

    core = pin_to_one_core()
    from processing import Document, LCLDataCollator, LCLImageProcessor, LCLProcessor, build_clip_tokenizer, load_mmc4

    tokenizer = build_clip_tokenizer()
    processor = LCLProcessor(LCLImageProcessor(), tokenizer, num_image_tokens=args.num_image_tokens,
                             max_length=args.max_length)  # fmt: skip
    make_reference_tokenizer, reference_note = load_reference_tokenizer(args.reference_src)

    with tempfile.TemporaryDirectory() as tmp:
        shards, image_dir = write_synthetic_mmc4(Path(tmp), args.docs)
        dataset = load_mmc4(shards, image_dir, image_first_prob=0.5, seed=0, cache_dir=str(Path(tmp) / "cache"))
        collator = LCLDataCollator(processor, seed=0)
        run_ours(torch.utils.data.Subset(dataset, range(min(16, len(dataset)))), collator, args.batch_size)  # warm-up
        ours = [run_ours(dataset, collator, args.batch_size) for _ in range(args.repeats)]

        examples = [dataset[i] for i in range(len(dataset))]
        texts = [s for example in examples for s in example["segments"] if isinstance(s, str)]
        fast_text = [text_only(texts, lambda t: tokenizer(t, add_special_tokens=False)) for _ in range(args.repeats)]
        backend_text = [
            text_only(texts, lambda t: tokenizer.backend_tokenizer.encode_batch(t, add_special_tokens=False))
            for _ in range(args.repeats)
        ]  # the Rust pipeline alone: what the Python cleaning (ftfy, html) adds is the difference

        reference_cold = reference = reference_text = reference_text_cold = None
        ids_match = None
        if make_reference_tokenizer is not None:
            # SimpleTokenizer caches the BPE of every word it has seen: a fresh one per timed pass ("cold",
            # the first pass of a worker) and the same one again ("warm", an upper bound: every word cached).
            cold = [make_reference_tokenizer() for _ in range(args.repeats)]
            reference_text_cold = [text_only(texts, lambda t, ref=ref: [ref.encode(x) for x in t]) for ref in cold]
            reference_tokenizer = cold[0]
            reference_text = [
                text_only(texts, lambda t: [reference_tokenizer.encode(x) for x in t]) for _ in range(args.repeats)
            ]
            fresh_path = ReferenceTextPath(make_reference_tokenizer(), args.num_image_tokens, args.max_length)
            reference_cold = [run_reference(dataset, fresh_path, processor.image_processor, args.batch_size)]
            text_path = ReferenceTextPath(reference_tokenizer, args.num_image_tokens, args.max_length)
            reference = [
                run_reference(dataset, text_path, processor.image_processor, args.batch_size)
                for _ in range(args.repeats)
            ]
            # Same documents, same random choices: do both paths give the same ids?
            documents = [Document(example["segments"]) for example in examples]
            ours_ids = [sequence.input_ids for sequence in processor.build_sequences(documents)]
            ids_match = sum(a == text_path(example["segments"])[0] for a, example in zip(ours_ids, examples))
        else:
            print(f"Reference path skipped: {reference_note}.")

    def rates(runs):
        seconds = median([run["seconds"] for run in runs])
        return {
            "documents_per_s": runs[0]["documents"] / seconds,
            "images_per_s": runs[0]["images"] / seconds,
            "tokens_per_s": runs[0]["tokens"] / seconds,
            "seconds": seconds,
            "spread": spread([run["seconds"] for run in runs]),
            "documents": runs[0]["documents"],
            "images": runs[0]["images"],
        }

    num_chars = sum(map(len, texts))
    rows = [{"path": "ours: reader + LCLProcessor (fast BPE) + collator", **rates(ours)}]
    if reference is not None:
        rows.append({"path": "reference text path, cold cache (first pass)", **rates(reference_cold)})
        rows.append({"path": "reference text path, warm cache", **rates(reference)})
    text_rows = [
        {"text path": "LCLTokenizer (cleaning + Rust BPE)", "MB_per_s": num_chars / median(fast_text) / 1e6},
        {"text path": "Rust pipeline alone (no ftfy/html)", "MB_per_s": num_chars / median(backend_text) / 1e6},
    ]
    if reference_text is not None:
        text_rows += [
            {
                "text path": "SimpleTokenizer, cold BPE cache",
                "MB_per_s": num_chars / median(reference_text_cold) / 1e6,
            },
            {"text path": "SimpleTokenizer, warm BPE cache", "MB_per_s": num_chars / median(reference_text) / 1e6},
        ]

    print(format_table(rows, ["path", "documents_per_s", "images_per_s", "tokens_per_s", "seconds", "spread"]))
    print()
    print(format_table(text_rows, ["text path", "MB_per_s"]))
    if ids_match is not None:
        print(f"\nSame input_ids on {ids_match}/{len(examples)} documents in both paths.")
    payload = {
        "machine": {**machine_info(), "pinned_core": core},
        "settings": vars(args),
        "pipeline": rows,
        "text_only": text_rows,
        "text_characters": num_chars,
        "reference_tokenizer": reference_note,
        "documents_with_equal_ids": ids_match,
        "documents_checked": len(examples) if ids_match is not None else None,
    }
    print(f"\nWrote {write_json(payload, args.output)}")


if __name__ == "__main__":
    main()
