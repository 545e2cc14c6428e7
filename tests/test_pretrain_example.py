"""The main job (`examples/pretrain_lcl.py`, console script `lcl-pretrain`) and its embedded digits data.

The full default run (300 steps, about 0.9 held-out zero-shot accuracy) is too slow for the suite; here a
5-step run goes through every stage: data, training, evaluation, saving, model card, results table.
"""

import json

import numpy as np
import pytest
from huggingface_hub import ModelCard

from examples.digits import (
    CAPTION_TEMPLATES,
    DIGIT_NAMES,
    DigitDocuments,
    DigitPairs,
    digit_training_data,
    held_out_captions,
    load_digit_split,
)
from helpers_distributed import StopAfter

from examples.pretrain_lcl import DEMO_TRAINING_DEFAULTS, build_job, parse_args, run

# ---------------------------------------------------------------------------------------------
# The embedded dataset
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split():
    return load_digit_split(num_eval=500, seed=0)


def test_split_holds_out_a_stratified_seeded_set_of_real_digits(split):
    assert len(split.eval_images) == 500 and len(split.train_images) == 1797 - 500
    assert np.bincount(split.eval_labels, minlength=10).min() >= 45  # every digit, ~50 each
    assert split.eval_images[0].size == (8, 8) and split.eval_images[0].mode == "RGB"
    train_pixels = {image.tobytes() for image in split.train_images}
    # scikit-learn's digits contain a few exact duplicates; nearly every held-out image is unseen.
    assert sum(image.tobytes() in train_pixels for image in split.eval_images) < 5
    again = load_digit_split(num_eval=500, seed=0)
    assert (again.eval_labels == split.eval_labels).all()


def test_pairs_caption_every_training_image_with_every_template(split):
    pairs = DigitPairs(split.train_images, split.train_labels)
    assert len(pairs) == len(split.train_images) * len(CAPTION_TEMPLATES)
    label = int(split.train_labels[3])
    captions = [pairs[3 * len(CAPTION_TEMPLATES) + t]["text"] for t in range(len(CAPTION_TEMPLATES))]
    assert all(DIGIT_NAMES[label] in caption or str(label) in caption.split() for caption in captions)
    assert pairs[3 * len(CAPTION_TEMPLATES)]["image"] is split.train_images[3]


def test_pair_layouts_are_a_seeded_function_of_the_index(split):
    pairs = DigitPairs(split.train_images, split.train_labels, image_first_prob=0.5, seed=3)
    layouts = [pairs[i]["image_first"] for i in range(200)]
    assert layouts == [pairs[i]["image_first"] for i in range(200)]  # resumable: no hidden state
    assert 60 < sum(layouts) < 140
    other_seed = DigitPairs(split.train_images, split.train_labels, image_first_prob=0.5, seed=4)
    assert layouts != [other_seed[i]["image_first"] for i in range(200)]
    never = DigitPairs(split.train_images, split.train_labels, image_first_prob=0.0)
    assert not any(never[i]["image_first"] for i in range(50))
    with pytest.raises(IndexError):
        pairs[len(pairs)]


def test_documents_interleave_digits_with_sentences_naming_them_deterministically(split):
    documents = DigitDocuments(split.train_images, split.train_labels, num_documents=50, seed=0)
    document = documents[7]["segments"]
    assert len(document) == 4 and sum(isinstance(s, str) for s in document) == 2
    assert documents[7]["segments"] == document  # a pure function of (seed, index): resumable
    layouts = {tuple(isinstance(s, str) for s in documents[i]["segments"][:2]) for i in range(50)}
    assert layouts == {(True, False), (False, True)}  # images before and after their sentence
    labels = {id(image): label for image, label in zip(split.train_images, split.train_labels)}
    for i in range(50):
        segments = documents[i]["segments"]
        for first, second in zip(segments[::2], segments[1::2]):
            image, sentence = (second, first) if isinstance(first, str) else (first, second)
            label = int(labels[id(image)])
            assert DIGIT_NAMES[label] in sentence or str(label) in sentence
    with pytest.raises(IndexError):
        documents[50]


@pytest.mark.parametrize("kind, factor", [("paired", 1), ("interleaved", 1), ("both", 2)])
def test_training_data_kinds(split, kind, factor):
    data = digit_training_data(split, kind)
    assert len(data) == factor * len(split.train_images) * len(CAPTION_TEMPLATES)
    with pytest.raises(ValueError, match="paired"):
        digit_training_data(split, "pairs")


def test_held_out_captions_name_their_digit(split):
    captions = held_out_captions(split.eval_labels)
    assert len(captions) == 500 and len(set(captions)) <= 10 * len(CAPTION_TEMPLATES)
    label = int(split.eval_labels[0])
    assert DIGIT_NAMES[label] in captions[0] or str(label) in captions[0]


# ---------------------------------------------------------------------------------------------
# Arguments: the demo recipe, overridable, and the ablation switches
# ---------------------------------------------------------------------------------------------


def test_no_arguments_give_the_demo_recipe():
    script_args, training_args = parse_args([])
    assert script_args.config == "lcl-tiny-demo" and script_args.data == "paired" and script_args.eval_samples == 500
    assert training_args.max_steps == DEMO_TRAINING_DEFAULTS["max_steps"]
    assert training_args.per_device_train_batch_size == 64 and training_args.learning_rate == 1e-3
    assert training_args.contrastive_loss_weight is None and training_args.generation_loss_weight is None


def test_ablation_switches_and_training_arguments_are_accepted():
    script_args, training_args = parse_args(
        ["--generation-loss-weight", "0", "--data", "both", "--max_steps", "7", "--learning-rate", "5e-4"]
    )
    assert training_args.generation_loss_weight == 0.0 and training_args.contrastive_loss_weight is None
    assert script_args.data == "both" and training_args.max_steps == 7 and training_args.learning_rate == 5e-4
    with pytest.raises(ValueError, match="--data"):
        parse_args(["--data", "pairs"])


# ---------------------------------------------------------------------------------------------
# A fast end-to-end run
# ---------------------------------------------------------------------------------------------


def test_fast_run_trains_evaluates_saves_and_prints_the_table(tmp_path, capsys):
    output_dir = tmp_path / "demo"
    metrics = run([
        "--max-steps", "5", "--eval-samples", "50", "--per-device-train-batch-size", "8", "--logging-steps", "1",
        "--save-strategy", "no", "--output-dir", str(output_dir), "--disable-tqdm", "true", "--data", "both",
    ])
    assert set(metrics) == {"zero_shot_accuracy", "linear_probe_accuracy", "image_to_text_recall@1"}
    assert all(0.0 <= value <= 1.0 for value in metrics.values())

    printed = capsys.readouterr().out
    assert "| zero_shot_accuracy" in printed and "| linear_probe_accuracy" in printed and "5 steps" in printed

    saved = {path.name for path in output_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "README.md",
            "modeling_lcl.py", "eval_results.json"} <= saved
    card = ModelCard.load(output_dir / "README.md")
    reported = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert reported["zero-shot accuracy"] == pytest.approx(metrics["zero_shot_accuracy"])
    assert {"loss_contrastive", "loss_generation"} <= set(card.data.training_metrics)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["steps"] == 5 and results["linear_probe_accuracy"] == pytest.approx(metrics["linear_probe_accuracy"])
    # Trainer aligns the causal head's special ids to the tokenizer's; they already agree (padding: <eot>),
    # while the batches keep the reference's padding id 0.
    saved_config = json.loads((output_dir / "config.json").read_text())
    assert saved_config["pad_token_id"] == 0
    assert saved_config["text_config"]["pad_token_id"] == saved_config["eos_token_id"] == 49407


def train_losses(output_dir, callbacks=None, resume=False, data_args=("--eval-samples", "50")) -> dict[int, float]:
    """The main job's training (image-first layouts drawn at random), 4 steps of 16; digits by default."""
    script_args, training_args = parse_args([
        "--max-steps", "4", "--per-device-train-batch-size", "16", "--logging-steps", "1",
        "--save-strategy", "steps", "--save-steps", "2", "--output-dir", str(output_dir), "--disable-tqdm", "true",
        "--image-first-prob", "0.5", *data_args,
    ])  # fmt: skip
    trainer = build_job(script_args, training_args, callbacks).trainer
    trainer.train(resume_from_checkpoint=True if resume else None)
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_main_job_resumed_after_an_interruption_reaches_the_same_losses(tmp_path):
    # The collator's own random state is not in the checkpoint; the digits give every pair its layout.
    expected = train_losses(tmp_path / "full")
    assert sorted(train_losses(tmp_path / "resumed", callbacks=[StopAfter(2)])) == [1, 2]
    resumed = train_losses(tmp_path / "resumed", resume=True)
    assert [step for step in sorted(resumed) if step > 2] == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


def write_mmc4(root) -> list[str]:
    """40 MMC4 documents whose first sentence has two candidate images (the reader picks one at random)."""
    import PIL.Image

    images = root / "images"
    images.mkdir()
    colors = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200), "grey": (120, 120, 120)}
    for name, color in colors.items():
        PIL.Image.new("RGB", (20, 16), color).save(images / f"{name}.png")
    names = list(colors)
    documents = [
        {"text_list": [f"A {names[i % 4]} square.", "Then another one.", f"Number {i}."],
         "image_info": [{"image_name": f"{names[(i + k) % 4]}.png", "matched_text_index": sentence, "matched_sim": 0.3}
                        for k, sentence in ((0, 0), (1, 0), (2, 2))]}
        for i in range(40)
    ]  # fmt: skip
    shard = root / "docs_shard_0.jsonl"
    shard.write_text("\n".join(json.dumps(document) for document in documents) + "\n")
    return ["--mmc4", str(shard), "--mmc4-images", str(images), "--eval-samples", "0"]


def test_main_job_on_mmc4_resumes_with_the_same_image_choices_and_layouts(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    data_args = write_mmc4(tmp_path)
    expected = train_losses(tmp_path / "full", data_args=data_args)
    assert sorted(train_losses(tmp_path / "resumed", callbacks=[StopAfter(2)], data_args=data_args)) == [1, 2]
    resumed = train_losses(tmp_path / "resumed", resume=True, data_args=data_args)
    assert [step for step in sorted(resumed) if step > 2] == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-6), step


def test_main_job_trains_on_mmc4_obelics_and_pairs_together(tmp_path, monkeypatch):
    """Every data option of the command line at once: the sources are concatenated and named in the card."""
    import PIL.Image

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    mmc4_args = write_mmc4(tmp_path)  # also writes images/red.png, green.png, ...
    images = tmp_path / "images"
    obelics = tmp_path / "obelics.jsonl"
    rows = [{"texts": [f"Document {i}.", None, "The end."], "images": [None, "blue.png", None]} for i in range(12)]
    obelics.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i in range(12):
        PIL.Image.new("RGB", (20, 20), (10 * i, 80, 120)).save(pairs / f"{i}.png")
    (pairs / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"a square {i}"})
                                                    for i in range(12)) + "\n")  # fmt: skip
    output_dir = tmp_path / "mixed"
    metrics = run([
        *mmc4_args, "--obelics", str(obelics), "--obelics-images", str(images), "--pairs", str(pairs),
        "--max-steps", "2", "--per-device-train-batch-size", "8", "--output-dir", str(output_dir),
        "--save-strategy", "no", "--disable-tqdm", "true", "--logging-steps", "1",
    ])  # fmt: skip
    assert metrics == {}  # no held-out digits to evaluate on
    card = ModelCard.load(output_dir / "README.md")
    assert {"pairs", "mmc4", "obelics"} <= set(card.data.datasets)
    assert json.loads((output_dir / "eval_results.json").read_text())["steps"] == 2
