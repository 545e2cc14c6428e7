"""The downstream examples run end to end on a tiny model folder and print their metric.

Each script runs in a subprocess, as a user runs it, on a folder laid out like the main job's output (a
pre-training checkpoint + its processor), built here from a tiny config and the test tokenizer.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from modeling_lcl import LCLForPreTraining
from processing import LCLImageProcessor, LCLProcessor, build_test_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
METRIC_LINE = r"^{} (\d\.\d+)$"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-lcl")
    tokenizer = build_test_tokenizer()
    processor = LCLProcessor(image_processor=LCLImageProcessor(size=16, crop_size=16), tokenizer=tokenizer,
                             num_image_tokens=4, max_length=48)
    text_config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=48)
    torch.manual_seed(0)
    LCLForPreTraining(tiny_config(text_config=text_config, **processor.special_token_ids())).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def run_example(script: str, *args: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def metric(stdout: str, name: str) -> float:
    match = re.search(METRIC_LINE.format(re.escape(name + ":")), stdout, flags=re.MULTILINE)
    assert match, f"no '{name}: <value>' line in:\n{stdout}"
    return float(match.group(1))


def test_zero_shot_example(model_dir):
    stdout = run_example("zero_shot.py", "--model", str(model_dir), "--max-samples", "40")
    for name in ("zero-shot top1_accuracy", "zero-shot top5_accuracy", "retrieval image_to_text_recall@1",
                 "retrieval text_to_image_recall@10"):
        assert 0.0 <= metric(stdout, name) <= 1.0
    assert metric(stdout, "zero-shot top1_accuracy") <= metric(stdout, "zero-shot top5_accuracy")
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metric(stdout, f"retrieval {direction}_recall@{k}") for k in (1, 5, 10)]
        assert recalls == sorted(recalls)
    assert re.search(r"^pipeline: first held-out image \(a \w+\) -> \w+ \(0\.\d+\)$", stdout, flags=re.MULTILINE)


def test_finetune_classification_example_full_lora_and_linear_probe(model_dir):
    stdout = run_example(
        "finetune_classification.py", "--model", str(model_dir), "--mode", "full", "lora", "linear-probe",
        "--max-train-samples", "64", "--max-eval-samples", "40", "--max-steps", "3", "--batch-size", "32",
    )
    for mode in ("full", "lora", "linear-probe"):
        assert 0.0 <= metric(stdout, f"{mode} top1_accuracy") <= 1.0
    # Frozen tiny random features still carry the digit: the probe beats chance (0.1) clearly.
    assert metric(stdout, "linear-probe top1_accuracy") > 0.3


def test_caption_example(model_dir):
    stdout = run_example("caption.py", "--model", str(model_dir), "--num-images", "4", "--max-new-tokens", "4",
                         "--prefix", "a photo of", "--show", "2")
    assert 0.0 <= metric(stdout, "caption greedy class_accuracy") <= 1.0
    assert 0.0 <= metric(stdout, "caption beam class_accuracy") <= 1.0
    assert re.search(r"^reference caption perplexity: \d+\.\d+$", stdout, flags=re.MULTILINE)
    shown = re.findall(r"^(greedy|beam) \| digit \w+ +\| a photo of", stdout, flags=re.MULTILINE)
    assert shown == ["greedy", "greedy", "beam", "beam"]
