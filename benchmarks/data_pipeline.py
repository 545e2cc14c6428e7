"""Data pipeline throughput on one core: MMC4-style documents through reader + processor + collator.

Measures documents/s and images/s of `load_mmc4` -> `LCLDataCollator` (`LCLTokenizer.encode_texts`: the
reference cleaning, then a chunk -> ids cache filled from the CLIP BPE model, or the `tokenizers` pipeline
for non-ASCII text; `LCLImageProcessor`; dynamic padding) on synthetic MMC4 shards (English sentences and
made-up words, 512x384 JPEGs, B/32-MMC4 settings: 49 image tokens, context 2048), pinned to one CPU core
and one torch thread.

In the same run, the same shards go through the reference's path (`MMC4InterleavedDataset.__getitem__` +
`collate_fn` of OpenGVLab/LCL, re-implemented here without its distributed bookkeeping): annotations in a
pyarrow array, similarity filter, sort, one image per sentence, at most 6, `Image.open().convert("RGB")`,
the eval transform (torchvision's resize bicubic + center crop + ToTensor + Normalize, written with PIL and
torch ops of the same arithmetic), image strings `<start_of_img> <img_placehold>x49 <end_of_img>`
inserted into the sentences, OpenCLIP's pure-Python `SimpleTokenizer` on the whole string padded to the
context length, the cut-block fix, then `torch.cat` / `torch.stack` of the 2048-long rows.

Also timed: the text path alone on pre-decoded documents (layout + tokenization + padding, no image work),
and tokenization alone in MB/s. Both tokenizers cache per word (`SimpleTokenizer` its BPE, ours the ids
of each space-separated chunk), so each is timed "cold" (an empty cache per pass: the first pass of a
worker) and "warm" (the same cache again: every word seen), and compared in the same state.

The reference tokenizer comes from an installed `open_clip_torch` (only its `tokenizer.py` is loaded, so
torchvision is not needed) or `--reference-src` (the `src/` folder of a checkout of the LCL repository).
Without either the reference rows are skipped with a message.

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
import pyarrow as pa
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


def write_synthetic_mmc4(
    root: Path, num_docs: int, seed: int = 0, image_size: tuple[int, int] = (512, 384)
) -> tuple[list[str], Path]:
    """One jsonl shard and one zipped shard of MMC4-style documents, and 32 JPEG files (`image_size`)."""
    rng, images = random.Random(seed), root / "images"
    images.mkdir(parents=True)
    pixels = np.random.default_rng(seed)
    for index in range(32):
        width, height = image_size
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
        noise = pixels.normal(0, 25, (height, width, 3))
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
    """The reference's text path for one document given as segments (text runs and images): the image
    strings inserted in the text, `SimpleTokenizer(text, context_length)[0]` (a padded `(context_length,)`
    tensor), the counts of image tokens and the cut-block fix (cut at the last `<start_of_img>`, put
    `<end_of_text>` there). Returns the padded ids and the number of images kept."""

    def __init__(self, tokenizer, num_image_tokens: int, context_length: int):
        self.tokenizer, self.n, self.context_length = tokenizer, num_image_tokens, context_length
        self.image_text = " <start_of_img> " + "<img_placehold> " * num_image_tokens + "<end_of_img> "
        self.soi = tokenizer.encoder["<start_of_img>"]
        self.img = tokenizer.encoder["<img_placehold>"]

    def text_of(self, segments: list) -> str:
        # The reference prepends/appends the image string to its sentence and joins sentences with " ".
        return "".join(self.image_text if not isinstance(s, str) else " " + s for s in segments)

    def __call__(self, text: str) -> tuple[torch.Tensor, int]:
        text_ids = self.tokenizer(text, context_length=self.context_length)[0]
        num_soi = int(torch.count_nonzero(text_ids == self.soi))
        num_img = int(torch.count_nonzero(text_ids == self.img))
        if num_soi * self.n != num_img:
            last_soi = int(torch.max(torch.nonzero(text_ids == self.soi)))
            fixed = torch.zeros_like(text_ids)
            fixed[:last_soi] = text_ids[:last_soi]
            fixed[last_soi] = self.tokenizer.eot_token_id
            text_ids = fixed
            num_soi = int(torch.count_nonzero(text_ids == self.soi))
        return text_ids, num_soi


class ReferenceEvalTransform:
    """torchvision's `Resize(size, BICUBIC)` + `CenterCrop(size)` + `ToTensor()` + `Normalize(mean, std)` on a PIL
    image, with the same operations (PIL resize, torch float division and in-order sub/div)."""

    def __init__(self, size: int, mean, std):
        self.size = size
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.size, int(self.size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        image = image.resize((new_w, new_h), PIL.Image.BICUBIC)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        image = image.crop((left, top, left + self.size, top + self.size))
        tensor = torch.from_numpy(np.array(image, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        tensor = tensor.to(dtype=torch.float32).div(255)
        return tensor.sub(self.mean).div(self.std)


class ReferenceMMC4:
    """`MMC4InterleavedDataset` of the reference: annotations loaded up front into a pyarrow array, images
    loaded, transformed and stacked per document in `__getitem__`, text through `ReferenceTextPath`."""

    def __init__(self, shards, image_dir, text_path, transform, seed=0, sim_threshold=0.24, max_images=6):
        rows = [json.loads(line) for shard in shards for line in _read_lines(shard)]
        self.annotations = pa.array(rows)
        self.image_dir, self.text_path, self.transform = image_dir, text_path, transform
        self.rng, self.sim_threshold, self.max_images = random.Random(seed), sim_threshold, max_images

    def __len__(self):
        return len(self.annotations)

    def __getitem__(self, index):
        info = self.annotations[index].as_py()
        sentences = info["text_list"]
        matched = [(i["matched_text_index"], os.path.join(self.image_dir, i["image_name"]))
                   for i in info["image_info"] if i["matched_sim"] >= self.sim_threshold]  # fmt: skip
        if not matched:
            return self[self.rng.randrange(len(self))]
        matched.sort(key=lambda item: item[0])
        by_sentence = {}
        for sentence_index, path in matched:
            by_sentence.setdefault(sentence_index, []).append(path)
        matched = [(i, paths[self.rng.randint(0, len(paths) - 1)]) for i, paths in by_sentence.items()]
        images, sentence_indices = [], []
        for sentence_index, path in matched[: self.max_images]:
            images.append(self.transform(PIL.Image.open(path).convert("RGB")))
            sentence_indices.append(sentence_index)
        images = torch.stack(images)
        for sentence_index in sentence_indices:
            image_text = self.text_path.image_text
            sentence = sentences[sentence_index]
            image_first = self.rng.random() < 0.5
            sentences[sentence_index] = image_text + sentence if image_first else sentence + image_text
        text_ids, num_images = self.text_path(" ".join(sentences))
        if num_images < 1:
            return self[self.rng.randrange(len(self))]
        return images[:num_images], text_ids

    @staticmethod
    def collate_fn(batch):
        images, texts = zip(*batch)
        return torch.cat(images), torch.stack(texts)


def _read_lines(shard: str) -> list[str]:
    if zipfile.is_zipfile(shard):
        with zipfile.ZipFile(shard) as archive:
            return [line for name in archive.namelist() for line in archive.read(name).decode().splitlines() if line]
    return [line for line in Path(shard).read_text().splitlines() if line]


def count_batch(docs: int, images: int, tokens: int, input_ids, pixel_values, attention_mask=None):
    tokens += int(attention_mask.sum()) if attention_mask is not None else int((input_ids != 0).sum())
    return docs + input_ids.shape[0], images + (pixel_values.shape[0] if pixel_values is not None else 0), tokens


def run_ours(dataset, collator, batch_size: int) -> dict:
    """Reader + processor + collator over the whole dataset (DataLoader, main process)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collator, num_workers=0)
    start = time.perf_counter()
    docs = images = tokens = 0
    for batch in loader:
        docs, images, tokens = count_batch(
            docs, images, tokens, batch["input_ids"], batch.get("pixel_values"), batch["attention_mask"]
        )
    return {"seconds": time.perf_counter() - start, "documents": docs, "images": images, "tokens": tokens}


def run_reference(dataset: ReferenceMMC4, batch_size: int) -> dict:
    """The reference dataset + `collate_fn` over the whole dataset (DataLoader, main process)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, collate_fn=dataset.collate_fn, num_workers=0
    )  # fmt: skip
    start = time.perf_counter()
    docs = images = tokens = 0
    for pixel_values, input_ids in loader:
        docs, images, tokens = count_batch(docs, images, tokens, input_ids, pixel_values)
    return {"seconds": time.perf_counter() - start, "documents": docs, "images": images, "tokens": tokens}


def run_ours_text(processor, examples, batch_size: int) -> dict:
    """Text path alone on pre-decoded documents: layout + tokenization + dynamic padding, no pixels."""
    from processing import Document, LCLSequence

    start = time.perf_counter()
    docs = tokens = 0
    for first in range(0, len(examples), batch_size):
        documents = [Document(example["segments"]) for example in examples[first : first + batch_size]]
        sequences = processor.build_sequences(documents)
        batch = processor.batch_sequences([LCLSequence(sequence.input_ids) for sequence in sequences])
        docs, tokens = docs + batch["input_ids"].shape[0], tokens + int(batch["attention_mask"].sum())
    return {"seconds": time.perf_counter() - start, "documents": docs, "images": 0, "tokens": tokens}


def run_reference_text(text_path: ReferenceTextPath, examples, batch_size: int) -> dict:
    """The reference's text path on the same pre-decoded documents: strings, `SimpleTokenizer`, 2048-long rows."""
    start = time.perf_counter()
    docs = tokens = 0
    for first in range(0, len(examples), batch_size):
        batch = examples[first : first + batch_size]
        input_ids = torch.stack([text_path(text_path.text_of(example["segments"]))[0] for example in batch])
        docs, tokens = docs + input_ids.shape[0], tokens + int((input_ids != 0).sum())
    return {"seconds": time.perf_counter() - start, "documents": docs, "images": 0, "tokens": tokens}


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
    parser.add_argument("--image-size", type=int, nargs=2, default=(512, 384), metavar=("WIDTH", "HEIGHT"),
                        help="size of the synthetic JPEGs (e.g. 341 256: shards pre-resized at download)")
    parser.add_argument("--reference-src", default=None, help="src/ of an LCL checkout (for SimpleTokenizer)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "data_pipeline.json"))
    args = parser.parse_args()

    core = pin_to_one_core()
    from processing import Document, LCLDataCollator, LCLImageProcessor, LCLProcessor, build_clip_tokenizer, load_mmc4

    tokenizer = build_clip_tokenizer()
    image_processor = LCLImageProcessor()
    processor = LCLProcessor(image_processor, tokenizer, num_image_tokens=args.num_image_tokens,
                             max_length=args.max_length)  # fmt: skip
    make_reference_tokenizer, reference_note = load_reference_tokenizer(args.reference_src)
    reference_transform = ReferenceEvalTransform(
        image_processor.crop_size["height"], image_processor.image_mean, image_processor.image_std
    )  # fmt: skip
    timings = {}

    with tempfile.TemporaryDirectory() as tmp:
        shards, image_dir = write_synthetic_mmc4(Path(tmp), args.docs, image_size=tuple(args.image_size))
        dataset = load_mmc4(shards, image_dir, image_first_prob=0.5, seed=0, cache_dir=str(Path(tmp) / "cache"))
        collator = LCLDataCollator(processor, seed=0)
        run_ours(torch.utils.data.Subset(dataset, range(min(16, len(dataset)))), collator, args.batch_size)  # warm-up
        examples = [dataset[i] for i in range(len(dataset))]
        texts = [s for example in examples for s in example["segments"] if isinstance(s, str)]

        def reference_dataset(reference_tokenizer):
            text_path = ReferenceTextPath(reference_tokenizer, args.num_image_tokens, args.max_length)
            return ReferenceMMC4(shards, image_dir, text_path, reference_transform, seed=0)

        # Interleave the paths repeat by repeat, so that a change of machine load hits them alike.
        def cold(function, *args_):
            tokenizer.__dict__.pop("_chunk_ids", None)  # empty the word cache: a fresh worker's first pass
            return function(*args_)

        for _ in range(args.repeats):
            timings.setdefault("ours_cold", []).append(cold(run_ours, dataset, collator, args.batch_size))
            timings.setdefault("ours", []).append(run_ours(dataset, collator, args.batch_size))
            timings.setdefault("ours_text_cold", []).append(cold(run_ours_text, processor, examples, args.batch_size))
            timings.setdefault("ours_text", []).append(run_ours_text(processor, examples, args.batch_size))
            timings.setdefault("encode_cold", []).append(cold(text_only, texts, tokenizer.encode_texts))
            timings.setdefault("encode", []).append(text_only(texts, tokenizer.encode_texts))
            timings.setdefault("fast_text", []).append(
                text_only(texts, lambda t: tokenizer(t, add_special_tokens=False, split_special_tokens=True))
            )
            timings.setdefault("backend_text", []).append(
                text_only(texts, lambda t: tokenizer.backend_tokenizer.encode_batch(t, add_special_tokens=False))
            )  # the Rust pipeline alone: what the Python cleaning adds is the difference
            if make_reference_tokenizer is None:
                continue
            # Cold: a fresh SimpleTokenizer per pass (empty BPE cache); warm: the same one a second time.
            reference = reference_dataset(make_reference_tokenizer())
            timings.setdefault("reference_cold", []).append(run_reference(reference, args.batch_size))
            timings.setdefault("reference", []).append(run_reference(reference, args.batch_size))
            text_path = ReferenceTextPath(make_reference_tokenizer(), args.num_image_tokens, args.max_length)
            timings.setdefault("reference_text_cold", []).append(
                run_reference_text(text_path, examples, args.batch_size)
            )
            timings.setdefault("reference_text", []).append(run_reference_text(text_path, examples, args.batch_size))
            simple = make_reference_tokenizer()
            for key in ("simple_text_cold", "simple_text"):
                timings.setdefault(key, []).append(text_only(texts, lambda t: [simple.encode(x) for x in t]))

        ids_match = None
        if make_reference_tokenizer is not None:
            # Same documents, same random choices: do both text paths give the same ids?
            text_path = ReferenceTextPath(make_reference_tokenizer(), args.num_image_tokens, args.max_length)
            documents = [Document(example["segments"]) for example in examples]
            ours_ids = [sequence.input_ids for sequence in processor.build_sequences(documents)]
            ids_match = 0
            for ids, example in zip(ours_ids, examples):
                row, _ = text_path(text_path.text_of(example["segments"]))
                ids_match += ids == row[: len(ids)].tolist() and not row[len(ids) :].any()
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

    labels = {
        "ours_cold": "ours: reader + LCLProcessor + collator, cold word cache",
        "ours": "ours: reader + LCLProcessor + collator, warm word cache",
        "reference_cold": "reference MMC4 dataset + collate, cold BPE cache",
        "reference": "reference MMC4 dataset + collate, warm BPE cache",
        "ours_text_cold": "text path only (pre-decoded docs): ours, cold",
        "ours_text": "text path only: ours, warm",
        "reference_text_cold": "text path only: reference, cold",
        "reference_text": "text path only: reference, warm",
    }
    rows = [{"path": label, "key": key, **rates(timings[key])} for key, label in labels.items() if key in timings]
    num_chars = sum(map(len, texts))
    text_labels = {
        "encode_cold": "LCLTokenizer.encode_texts (the processor's path), cold word cache",
        "encode": "LCLTokenizer.encode_texts, warm word cache",
        "fast_text": "LCLTokenizer.__call__ (cleaning + tokenizers pipeline)",
        "backend_text": "tokenizers pipeline alone (no ftfy/html)",
        "simple_text_cold": "SimpleTokenizer, cold BPE cache",
        "simple_text": "SimpleTokenizer, warm BPE cache",
    }
    text_rows = [
        {"text path": label, "key": key, "MB_per_s": num_chars / median(timings[key]) / 1e6}
        for key, label in text_labels.items() if key in timings
    ]  # fmt: skip
    # Ours against the reference in the same cache state (cold: a worker's first pass; warm: every word seen).
    comparisons = {
        "end to end, cold": ("ours_cold", "reference_cold"),
        "end to end, warm": ("ours", "reference"),
        "text path, cold": ("ours_text_cold", "reference_text_cold"),
        "text path, warm": ("ours_text", "reference_text"),
        "tokenization, cold": ("encode_cold", "simple_text_cold"),
        "tokenization, warm": ("encode", "simple_text"),
    }
    seconds = {key: median([r["seconds"] if isinstance(r, dict) else r for r in runs]) for key, runs in timings.items()}
    ratio_rows = [
        {"comparison": name, "ours_s": seconds[ours], "reference_s": seconds[ref], "speedup": seconds[ref] / seconds[ours]}
        for name, (ours, ref) in comparisons.items() if ours in seconds and ref in seconds
    ]  # fmt: skip

    columns = ["path", "documents_per_s", "images_per_s", "tokens_per_s", "seconds", "spread"]
    print(format_table(rows, columns))
    print()
    print(format_table(text_rows, ["text path", "MB_per_s"]))
    print()
    print(format_table(ratio_rows, ["comparison", "ours_s", "reference_s", "speedup"]))
    print("\n(speedup = the reference's time / ours, medians of the repeats.)")
    if ids_match is not None:
        print(f"Same input_ids on {ids_match}/{len(examples)} documents in both text paths.")
    payload = {
        "machine": {**machine_info(), "pinned_core": core},
        "settings": vars(args),
        "pipeline": rows,
        "text_only": text_rows,
        "speedups": ratio_rows,
        "text_characters": num_chars,
        "reference_tokenizer": reference_note,
        "documents_with_equal_ids": ids_match,
        "documents_checked": len(examples) if ids_match is not None else None,
    }
    print(f"\nWrote {write_json(payload, args.output)}")


if __name__ == "__main__":
    main()
