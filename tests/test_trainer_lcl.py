"""LCLTrainer on a tiny model (CPU): the loss it trains on, its logs, the temperature clamp, gradient
accumulation, gradient checkpointing, mixed precision, evaluation, resuming and crash-safe checkpoints."""

import functools
import json
import math
import os

import pytest
import torch
from helpers_distributed import (
    SCENARIOS,
    DocumentDataset,
    StopAfter,
    collate,
    RESUME_KINDS,
    first_log,
    make_trainer,
    resumable_trainer,
    step_losses,
    train_one_step,
)
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from modeling_lcl import LCLForPreTraining
from modeling_lcl.trainer_lcl import LCLTrainer, LCLTrainingArguments

KINDS = SCENARIOS["uneven"]  # text-first pairs, image-first pairs, two-image documents
RTOL = 1e-5


def assert_same_gradients(actual: dict, expected: dict, rtol: float = RTOL):
    assert actual.keys() == expected.keys()
    total_norm = torch.cat([g.flatten() for g in expected.values()]).norm()
    for name, value in expected.items():
        # Parameters whose exact gradient is zero (attention key biases) carry only rounding noise.
        tolerance = rtol * value.norm() if value.norm() > 1e-6 * total_norm else 1e-7 * total_norm
        assert (actual[name] - value).norm() <= tolerance, name


# ---------------------------------------------------------------------------------------------
# Loss and logs
# ---------------------------------------------------------------------------------------------


def test_training_step_logs_the_two_losses_logit_scale_and_throughput(tmp_path):
    trainer, gradients = train_one_step(str(tmp_path), KINDS, per_device_batch=6)
    log = first_log(trainer)
    assert log["loss"] == pytest.approx(0.5 * log["loss_contrastive"] + 1.0 * log["loss_generation"], rel=1e-6)
    assert log["loss_contrastive"] > 0 and log["loss_generation"] > 0
    assert log["logit_scale"] == pytest.approx(math.log(1 / 0.07), abs=1e-2)  # one small step from its init
    assert log["images_per_second"] > 0
    assert gradients["lcl.logit_scale"].abs() > 0  # the contrastive half reaches the temperature


def test_loss_equals_the_model_loss_on_the_whole_batch(tmp_path):
    trainer, _ = train_one_step(str(tmp_path), KINDS, per_device_batch=6)
    torch.manual_seed(0)
    model = LCLForPreTraining(trainer.model.config)  # same seed, same initial weights
    outputs = model(**collate([trainer.train_dataset[i] for i in range(6)]))
    assert first_log(trainer)["loss"] == pytest.approx(outputs.loss.item(), rel=1e-6)


@pytest.mark.parametrize(
    "weights, kept_key, kept_weight",
    [((0.0, None), "loss_generation", 1.0), ((None, 0.0), "loss_contrastive", 0.5), ((2.0, 0.0), "loss_contrastive", 2.0)],
)
def test_loss_weights_from_training_arguments_override_the_config(tmp_path, weights, kept_key, kept_weight):
    # The tiny config has λ_con = 0.5, λ_gen = 1; None keeps the config's weight.
    contrastive, generation = weights
    trainer, gradients = train_one_step(
        str(tmp_path), KINDS, per_device_batch=6, contrastive_loss_weight=contrastive, generation_loss_weight=generation
    )
    log = first_log(trainer)
    assert log["loss"] == pytest.approx(kept_weight * log[kept_key], rel=1e-6)
    if kept_key == "loss_generation":
        assert gradients["lcl.logit_scale"].abs() == 0  # no contrastive term, no temperature gradient
    else:
        # No generation term: the LM head is not run (no logged loss) and is frozen, so nothing updates it.
        assert "loss_generation" not in log
        assert not any(name.startswith("lm_head.") for name in gradients)
        assert not any(p.requires_grad for p in trainer.model.lm_head.parameters())


@pytest.mark.parametrize("pack", [True, False])
def test_trainer_packs_the_prefixes_by_default_with_the_same_step(tmp_path, pack, monkeypatch):
    seen, original = [], LCLForPreTraining.forward

    @functools.wraps(original)  # Trainer keeps the batch columns that the forward's signature names
    def recording_forward(self, *args, **kwargs):
        seen.append(kwargs["pack_sequences"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LCLForPreTraining, "forward", recording_forward)
    overrides = {} if pack else {"pack_sequences": False}
    trainer, gradients = train_one_step(str(tmp_path / "run"), KINDS, per_device_batch=6, **overrides)
    assert seen == [pack]
    monkeypatch.setattr(LCLForPreTraining, "forward", original)
    unpacked, unpacked_gradients = train_one_step(str(tmp_path / "unpacked"), KINDS, per_device_batch=6,
                                                  pack_sequences=False)
    assert first_log(trainer)["loss"] == pytest.approx(first_log(unpacked)["loss"], rel=1e-6)
    assert_same_gradients(gradients, unpacked_gradients)


def test_negative_loss_weight_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="contrastive_loss_weight must be >= 0"):
        LCLTrainingArguments(output_dir=str(tmp_path), contrastive_loss_weight=-1.0, report_to="none")


def test_trainer_rejects_a_model_without_the_lcl_objective(tmp_path):
    args = LCLTrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="LCLForPreTraining"):
        LCLTrainer(model=torch.nn.Linear(2, 2), args=args)


def test_weight_decay_skips_the_temperature_biases_norms_and_1d_parameters(tmp_path):
    trainer = make_trainer(str(tmp_path), KINDS, per_device_batch=6)
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    assert "lcl.text_model.layers.0.self_attn.q_proj.weight" in decayed and "lm_head.proj.weight" in decayed
    for name in ("lcl.logit_scale", "lcl.vision_model.vit.embeddings.class_embedding",
                 "lcl.text_model.layers.0.self_attn.q_proj.bias", "lcl.text_final_layer_norm.weight"):
        assert name not in decayed, name


# ---------------------------------------------------------------------------------------------
# Temperature clamp
# ---------------------------------------------------------------------------------------------


class LogitScaleRecorder(TrainerCallback):
    def __init__(self):
        self.values = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.values.append(model.lcl.logit_scale.item())


@pytest.mark.parametrize("accumulation", [1, 2])
def test_logit_scale_is_clamped_to_ln_100_after_every_optimizer_step(tmp_path, accumulation):
    recorder = LogitScaleRecorder()
    trainer = make_trainer(
        str(tmp_path), KINDS * 2, per_device_batch=6 // accumulation, config_overrides={"logit_scale_init_value": 6.0},
        callbacks=[recorder], max_steps=2, gradient_accumulation_steps=accumulation, learning_rate=1e-4,
    )
    trainer.train()
    assert len(recorder.values) == 2
    assert all(value <= math.log(100) + 1e-6 for value in recorder.values)
    # A step of lr 1e-4 alone cannot move 6.0 below ln(100) = 4.6: the clamp did.
    assert recorder.values[0] == pytest.approx(math.log(100), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation, gradient checkpointing, mixed precision
# ---------------------------------------------------------------------------------------------


def test_accumulated_step_trains_on_the_mean_over_all_pairs_and_targets_of_the_step(tmp_path):
    _, accumulated = train_one_step(str(tmp_path), KINDS, per_device_batch=2, gradient_accumulation_steps=3)

    # The definition: sums over the micro-batches divided by the step's totals. Each micro-batch's pairs are
    # contrasted among themselves (there is no feature cache across micro-batches).
    config = make_trainer(str(tmp_path), KINDS, 2).model.config
    torch.manual_seed(0)  # the trainer's initial weights
    model = LCLForPreTraining(config)
    dataset = DocumentDataset(KINDS, num_image_tokens=model.config.num_image_tokens)
    outputs = [model(**collate([dataset[i] for i in rows])) for rows in ((0, 1), (2, 3), (4, 5))]
    pairs = sum(o.num_contrastive_pairs for o in outputs)
    targets = sum(o.num_generation_targets for o in outputs)
    assert [o.num_contrastive_pairs for o in outputs] == [3, 2, 1]  # unequal shares: a plain average would differ
    contrastive = sum(o.loss_contrastive * o.num_contrastive_pairs for o in outputs) / pairs
    generation = sum(o.loss_generation * o.num_generation_targets for o in outputs) / targets
    (0.5 * contrastive + generation).backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(accumulated, expected)


def test_accumulation_equals_one_large_batch_for_the_generation_loss(tmp_path):
    # Token-level mean over the whole step: 2 micro-batches of 3 give the gradient of 1 batch of 6.
    _, large = train_one_step(str(tmp_path), KINDS, per_device_batch=6, contrastive_loss_weight=0.0)
    _, accumulated = train_one_step(
        str(tmp_path), KINDS, per_device_batch=3, gradient_accumulation_steps=2, contrastive_loss_weight=0.0
    )
    assert_same_gradients(accumulated, large)


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, plain = train_one_step(str(tmp_path), KINDS, per_device_batch=6)
    _, checkpointed = train_one_step(str(tmp_path), KINDS, per_device_batch=6, activation_checkpointing=True)
    assert_same_gradients(checkpointed, plain)


def test_bf16_mixed_precision_step_runs_on_cpu(tmp_path):
    trainer, _ = train_one_step(str(tmp_path / "bf16"), KINDS, per_device_batch=6, bf16=True)
    reference, _ = train_one_step(str(tmp_path / "fp32"), KINDS, per_device_batch=6)
    assert trainer.model.lcl.logit_scale.dtype == torch.float32  # autocast: weights stay float32
    # bfloat16 has 8 bits of mantissa: the loss agrees to about a percent.
    assert first_log(trainer)["loss"] == pytest.approx(first_log(reference)["loss"], rel=2e-2)


def test_evaluate_reports_the_loss(tmp_path):
    trainer = make_trainer(str(tmp_path), KINDS, per_device_batch=6, per_device_eval_batch_size=6)
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(**collate([trainer.train_dataset[i] for i in range(6)])).loss.item()
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Checkpoints: resume equivalence and crash safety
# ---------------------------------------------------------------------------------------------

def test_interrupted_and_resumed_run_reaches_the_same_losses(tmp_path):
    uninterrupted = resumable_trainer(tmp_path / "full")
    uninterrupted.train()

    first_part = resumable_trainer(tmp_path / "resumed", callbacks=[StopAfter(4)])
    first_part.train()
    assert sorted(step_losses(first_part)) == [1, 2, 3, 4]
    resumed = resumable_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)

    expected, actual = step_losses(uninterrupted), step_losses(resumed)
    assert [step for step in actual if step > 4] == [5, 6]
    for step in (5, 6):
        assert actual[step] == pytest.approx(expected[step], rel=1e-6), step


class FailingSave(LCLTrainer):
    """Dies while writing the optimizer state of the checkpoint at step 4, after the weights are written."""

    def _save_optimizer_and_scheduler(self, output_dir):
        if self.state.global_step == 4:
            raise RuntimeError("simulated crash during a checkpoint save")
        super()._save_optimizer_and_scheduler(output_dir)


def test_crash_during_a_save_leaves_the_previous_checkpoint_as_the_last_one(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        resumable_trainer(tmp_path, trainer_class=FailingSave).train()

    entries = sorted(os.listdir(tmp_path))
    assert "checkpoint-2" in entries and "checkpoint-4" not in entries
    assert "_tmp-checkpoint-4" in entries  # the half-written one, under a name nothing resumes from
    assert "model.safetensors" in os.listdir(tmp_path / "_tmp-checkpoint-4")
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    previous = tmp_path / "checkpoint-2"
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "rng_state.pth"} <= set(
        os.listdir(previous)
    )
    assert json.loads((previous / "trainer_state.json").read_text())["global_step"] == 2

    resumed = resumable_trainer(tmp_path)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    entries = os.listdir(tmp_path)
    assert not any(entry.startswith("_tmp-") for entry in entries)  # the next save cleared the debris
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")


def test_trainer_is_exported_by_the_package_without_importing_it_eagerly():
    import subprocess
    import sys

    code = (
        "import sys, modeling_lcl; assert 'modeling_lcl.trainer_lcl' not in sys.modules; "
        "from modeling_lcl import LCLTrainer, LCLTrainingArguments; "
        "from modeling_lcl.trainer_lcl import LCLTrainer as T; assert LCLTrainer is T"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class EpochRecorder(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples, self.epochs = examples, []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, index):
        return self.examples[index]


def test_datasets_are_told_every_epoch_also_inside_a_concatenation(tmp_path):
    from modeling_lcl.trainer_lcl import DatasetEpochCallback

    data = DocumentDataset(RESUME_KINDS[:8])
    first, second = EpochRecorder(data), EpochRecorder(data)
    trainer = make_trainer(str(tmp_path), RESUME_KINDS[:8], per_device_batch=4, max_steps=-1, num_train_epochs=3)
    trainer.train_dataset = torch.utils.data.ConcatDataset([first, torch.utils.data.Subset(second, range(8))])
    trainer.train()
    assert first.epochs == [0, 1, 2] and second.epochs == [0, 1, 2]
    assert any(isinstance(callback, DatasetEpochCallback) for callback in trainer.callback_handler.callbacks)
