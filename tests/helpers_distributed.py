"""Tiny data, collator and one-step trainer runs shared by the trainer tests and the distributed launch.

Run as a script under `torchrun` it trains one step with `LCLTrainer` on each global batch of `SCENARIOS`,
sharded over the ranks, and saves the logged losses and the averaged gradients (rank 0) to `<out_file>`:

    torchrun --standalone --nproc_per_node 2 tests/helpers_distributed.py <out_file>

With `resume` after `<out_file>` it instead trains 6 steps with a checkpoint every 2, once uninterrupted and
once interrupted after step 4 and resumed, and saves both runs' step losses (`resume_main`).
"""

import os
import sys

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import EOT, SOT, image_block, pad_batch, tiny_config  # noqa: E402

from modeling_lcl import LCLForPreTraining  # noqa: E402
from modeling_lcl.trainer_lcl import LCLTrainer, LCLTrainingArguments  # noqa: E402

IMAGE_SIZE = 16


def _text(generator, length: int) -> list[int]:
    return torch.randint(1, 90, (length,), generator=generator).tolist()


def make_sample(kind: str, generator: torch.Generator, num_image_tokens: int) -> dict:
    """One document of a given kind: token ids and its images `(k, 3, 16, 16)`."""
    block = image_block(num_image_tokens)
    words = lambda: _text(generator, int(torch.randint(2, 6, (1,), generator=generator)))  # noqa: E731
    if kind == "text_first":  # pair, contrastive + text modelling
        ids, num_images = [SOT, *words(), *block], 1
    elif kind == "image_first":  # pair, captioning only: no contrastive image
        ids, num_images = [*block, *words(), EOT], 1
    elif kind == "interleaved":
        ids, num_images = [SOT, *words(), *block, *words(), *block, *words(), EOT], 2
    elif kind == "text_only":
        ids, num_images = [SOT, *words(), EOT], 0
    else:
        raise ValueError(kind)
    pixel_values = torch.randn(num_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"input_ids": ids, "pixel_values": pixel_values}


class DocumentDataset(Dataset):
    def __init__(self, kinds: list[str], seed: int = 0, num_image_tokens: int = 4):
        generator = torch.Generator().manual_seed(seed)
        self.samples = [make_sample(kind, generator, num_image_tokens) for kind in kinds]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def collate(samples: list[dict]) -> dict:
    input_ids, attention_mask = pad_batch([s["input_ids"] for s in samples])
    pixel_values = torch.cat([s["pixel_values"] for s in samples])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


class StopAfter(TrainerCallback):
    """Stops training after `step` optimizer steps, as an interruption would (the run is resumed later)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


class GradientCapture(TrainerCallback):
    """Keeps a copy of every gradient just before the first optimizer step (after DDP's averaging)."""

    def __init__(self):
        self.gradients = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.gradients is None:
            self.gradients = {
                name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None
            }


# Global batches of the distributed test: the first half goes to rank 0, the second half to rank 1.
SCENARIOS = {
    # Ranks with different numbers of contrastive images (1 + 2 against 2 + 1 + 0).
    "uneven": ["text_first", "interleaved", "image_first", "interleaved", "text_first", "image_first"],
    # Rank 1 holds images, but none of them is in the contrastive loss.
    "rank1_no_contrastive": ["text_first", "interleaved", "text_first", "image_first", "image_first", "image_first"],
    # Rank 1 holds no image at all (its vision tower is unused this step).
    "rank1_text_only": ["interleaved", "text_first", "text_first", "text_only", "text_only", "text_only"],
}
SCENARIO_BATCH = 6


def make_trainer(output_dir: str, kinds: list[str], per_device_batch: int, config_overrides=None, callbacks=(),
                 trainer_class=LCLTrainer, **arg_overrides) -> LCLTrainer:
    """An `LCLTrainer` on a seeded tiny model and the documents `kinds` (λ_con = 0.5 so both halves matter)."""
    torch.manual_seed(0)
    model = LCLForPreTraining(tiny_config(**{"contrastive_loss_weight": 0.5, **(config_overrides or {})}))
    arguments = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=1,
        learning_rate=1e-3,
        max_grad_norm=0.0,  # clipping would rescale the gradients we compare
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
    )
    arguments.update(arg_overrides)
    dataset = DocumentDataset(kinds, num_image_tokens=model.config.num_image_tokens)
    return trainer_class(
        model=model,
        args=LCLTrainingArguments(**arguments),
        train_dataset=dataset,
        data_collator=collate,
        callbacks=list(callbacks),
    )


def train_one_step(output_dir: str, kinds: list[str], per_device_batch: int, config_overrides=None, **arg_overrides):
    """One optimizer step; returns `(trainer, gradients just before the step)`."""
    capture = GradientCapture()
    trainer = make_trainer(output_dir, kinds, per_device_batch, config_overrides, [capture], **arg_overrides)
    trainer.train()
    return trainer, capture.gradients


def first_log(trainer) -> dict:
    return next(entry for entry in trainer.state.log_history if "loss" in entry)


RESUME_KINDS = SCENARIOS["uneven"] * 4  # 24 documents: 6 steps of 4 (on one process or several)


def step_losses(trainer) -> dict[int, tuple]:
    """`{step: (loss, loss_contrastive, loss_generation)}` of every logged training step."""
    return {
        entry["step"]: (entry["loss"], entry["loss_contrastive"], entry["loss_generation"])
        for entry in trainer.state.log_history
        if "loss" in entry
    }


def resumable_trainer(output_dir, per_device_batch: int = 4, callbacks=(), trainer_class=LCLTrainer, **overrides):
    """6 steps on `RESUME_KINDS` (shuffled, warm-up + cosine, clipping), a checkpoint every 2 steps."""
    return make_trainer(
        str(output_dir), RESUME_KINDS, per_device_batch=per_device_batch, callbacks=callbacks,
        trainer_class=trainer_class, max_steps=6, save_strategy="steps", save_steps=2,
        train_sampling_strategy="random", max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=2, **overrides,
    )  # fmt: skip


def resume_main(out_file: str) -> None:
    """Under torchrun: an uninterrupted run and one interrupted after step 4 then resumed; rank 0 saves both
    runs' step losses and the checkpoint folders to `out_file`."""
    world_size = int(os.environ["WORLD_SIZE"])
    root = os.path.dirname(out_file)
    per_device = 4 // world_size
    full = resumable_trainer(os.path.join(root, "full"), per_device, ddp_backend="gloo")
    full.train()
    interrupted = resumable_trainer(os.path.join(root, "resumed"), per_device, [StopAfter(4)], ddp_backend="gloo")
    interrupted.train()
    resumed = resumable_trainer(os.path.join(root, "resumed"), per_device, ddp_backend="gloo")
    resumed.train(resume_from_checkpoint=True)
    if resumed.is_world_process_zero():
        results = {
            "full": step_losses(full),
            "resumed": step_losses(resumed),
            "folders": sorted(os.listdir(os.path.join(root, "resumed"))),
        }
        torch.save(results, out_file)


def main():
    """`scenarios_main` on argv[1], or `resume_main` with `resume` as argv[2]."""
    out_file = sys.argv[1]
    if sys.argv[2:] == ["resume"]:
        resume_main(out_file)
    else:
        scenarios_main(out_file)
    # A clean teardown: every rank waits for rank 0's file, then leaves the group before the interpreter exits.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def scenarios_main(out_file: str) -> None:
    """Every scenario in one process group; rank 0 saves `{scenario: {"log", "gradients"}}` to `out_file`."""
    world_size = int(os.environ["WORLD_SIZE"])
    results = {}
    for scenario, kinds in SCENARIOS.items():
        trainer, gradients = train_one_step(
            os.path.join(os.path.dirname(out_file), scenario), kinds, SCENARIO_BATCH // world_size, ddp_backend="gloo"
        )
        results[scenario] = {"log": first_log(trainer), "gradients": gradients}
    if trainer.is_world_process_zero():
        torch.save(results, out_file)


if __name__ == "__main__":
    main()
