"""`LCLTrainer`: the dual LCL objective in transformers' `Trainer`, on one process or many.

What it adds to `Trainer`:

- **Loss.** `λ_con·L_con + λ_gen·L_gen` with the weights of the model config, or of `LCLTrainingArguments`
  when set there. Both means are taken over the *global* batch of an optimizer step (all accumulation
  micro-batches, all processes): before each step the trainer counts the contrastive pairs and the
  generation targets of the step, and every micro-batch on every rank contributes `sum_local / global_count`.
  Each rank's loss is multiplied by the number of processes because DDP averages gradients over ranks.
- **Distributed contrastive loss.** On several processes the model's `contrastive_gather` becomes a
  `DistributedFeatureGather` (features of all ranks, with gradients, padded and masked). Under gradient
  accumulation the negatives of a pair are the pairs of its own micro-batch (on all ranks), as in OpenCLIP
  without feature caching.
- **Packed prefixes.** The model runs its causal transformer only on the part of each sequence the loss reads,
  packed several sequences to a row (`LCLForPreTraining(pack_sequences=True)`, see `packing_lcl`): the same
  losses, without the image block of every text-first pair. `LCLTrainingArguments.pack_sequences=False` turns
  it off.
- **Logs.** `loss_contrastive`, `loss_generation` (global means, averaged over the logging interval),
  `logit_scale` (the learned log inverse temperature) and `images_per_second` next to the usual ones.
- **Weight decay** skips biases, norms and parameters of fewer than 2 dimensions (`logit_scale`, the class
  embedding), as the reference's OpenCLIP training does.
- **Temperature clamp.** `logit_scale` is clamped to `config.logit_scale_max` (ln 100) after every
  optimizer step (`LogitScaleClampCallback`).
- **Epoch-seeded data.** At every epoch the training dataset's `set_epoch` is called, also inside a
  `ConcatDataset` (`DatasetEpochCallback`), so readers that seed per (epoch, row) resume exactly.
- **Atomic checkpoints.** A checkpoint is written into `_tmp-checkpoint-<step>` and renamed to
  `checkpoint-<step>` only when complete, so a crash during a save leaves the previous checkpoints as they
  were and never a partial `checkpoint-*` that `resume_from_checkpoint=True` would pick up.
- **Hub.** Saved folders carry the model code and `auto_map` (`hub_lcl.add_remote_code`); the model card
  is `hub_lcl.build_model_card`.
"""

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy, rotate_checkpoints
from transformers.utils import logging

from .distributed_lcl import DistributedFeatureGather
from .hub_lcl import add_remote_code, build_model_card
from .loss_lcl import contrastive_soi_mask, generation_target_mask
from .modeling_lcl import LCLForPreTraining, LCLModel

logger = logging.get_logger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
# Not matched by transformers' `checkpoint-<step>` pattern (resume, rotation) nor pushed (`_*` is ignored).
STAGING_PREFIX = "_tmp-"
REPLACED_PREFIX = "_old-"
# The batch keys the model reads; collators may add bookkeeping such as `image_counts`.
MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values", "position_ids")


@dataclass
class LCLTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus optional overrides of the loss weights stored in the model config."""

    contrastive_loss_weight: float | None = field(
        default=None, metadata={"help": "λ_con; default: the model config's (0.1 in the reference). 0 trains generation only."}
    )
    generation_loss_weight: float | None = field(
        default=None, metadata={"help": "λ_gen; default: the model config's (1.0). 0 trains contrastive only (CLIP-like)."}
    )
    pack_sequences: bool = field(
        default=True,
        metadata={"help": "Run the causal transformer only on the prefix of each sequence that the loss reads, packed "
                          "several to a row (same losses; a text-first pair skips its image block)."},
    )

    def __post_init__(self):
        super().__post_init__()
        for name in ("contrastive_loss_weight", "generation_loss_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}.")


class LCLBatchCounts(NamedTuple):
    """Global denominators of one optimizer step: over its accumulation micro-batches and all processes."""

    contrastive_pairs: int
    generation_targets: int


class LogitScaleClampCallback(TrainerCallback):
    """Clamp every `LCLModel.logit_scale` to its `config.logit_scale_max` after each optimizer step."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, LCLModel):
                    module.logit_scale.clamp_(max=module.config.logit_scale_max)


class DatasetEpochCallback(TrainerCallback):
    """Tell the training dataset (and the datasets inside a `ConcatDataset` / `Subset`) which epoch begins.

    Datasets whose random choices depend on the epoch (`processing.SkippingDataset` and its readers) then make
    the same choices in a resumed run as in the interrupted one. `Trainer`'s data loader does not do it when
    its sampler has a `set_epoch` of its own, which the default seeded sampler has.
    """

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        if train_dataloader is not None:
            _set_dataset_epoch(getattr(train_dataloader, "dataset", None), int(state.epoch or 0))


def _set_dataset_epoch(dataset, epoch: int) -> None:
    if dataset is None:
        return
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    for inner in getattr(dataset, "datasets", ()):  # ConcatDataset
        _set_dataset_epoch(inner, epoch)
    if isinstance(dataset, torch.utils.data.Subset):
        _set_dataset_epoch(dataset.dataset, epoch)


class LCLTrainer(Trainer):
    """`Trainer` for `LCLForPreTraining` (see the module docstring).

    Use it like `Trainer`, with `LCLTrainingArguments` (or plain `TrainingArguments`) and a collator that
    returns `input_ids`, `attention_mask` and `pixel_values` (e.g. `processing.LCLDataCollator`).
    """

    # compute_loss already divides by the global counts of the whole accumulated step.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            # nn.DataParallel would contrast each replica's slice alone and average the global-count shares.
            raise ValueError(
                f"LCLTrainer needs one process per device: launch with torchrun or accelerate launch instead of "
                f"running one process on {self.args.n_gpu} GPUs (nn.DataParallel)."
            )
        self._lcl_model, self._lcl_model_of = None, None
        _ = self._pretraining_model  # fail here, not at the first step, if the model is not an LCL one
        self.add_callback(LogitScaleClampCallback())
        self.add_callback(DatasetEpochCallback())
        if self.loss_weights[1] == 0:
            # Contrastive only: the model skips the LM head, so it gets no gradient. Frozen, it is neither decayed
            # by AdamW nor a parameter DDP waits for.
            logger.info("generation_loss_weight is 0: the LM head is not run and is frozen.")
            self._pretraining_model.lm_head.requires_grad_(False)
        self._metric_sums = None  # (loss_contrastive, loss_generation, images) since the last log, this rank
        self._metrics_since = None
        self._pending_logs = {}

    @property
    def _pretraining_model(self) -> LCLForPreTraining:
        """The `LCLForPreTraining` inside `self.model` (which `model_init` may replace), with the gather installed."""
        if self._lcl_model_of is not self.model:
            found = _find_module(self.model, LCLForPreTraining)
            if found is None:
                raise TypeError(f"LCLTrainer trains an LCLForPreTraining model, got {type(self.model).__name__}.")
            if self.args.world_size > 1:
                found.contrastive_gather = DistributedFeatureGather()
            self._lcl_model, self._lcl_model_of = found, self.model
        return self._lcl_model

    # ------------------------------------------------------------------ loss

    @property
    def loss_weights(self) -> tuple[float, float]:
        """`(λ_con, λ_gen)`: the training arguments' overrides, else the model config's."""
        config = self._pretraining_model.config
        con = getattr(self.args, "contrastive_loss_weight", None)
        gen = getattr(self.args, "generation_loss_weight", None)
        return (
            config.contrastive_loss_weight if con is None else con,
            config.generation_loss_weight if gen is None else gen,
        )

    @property
    def pack_sequences(self) -> bool:
        """`LCLTrainingArguments.pack_sequences`; True with plain `TrainingArguments`, as its default."""
        return getattr(self.args, "pack_sequences", True)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Prefetch the micro-batches of one optimizer step and count its global pairs and targets."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        return batch_samples, self.count_batch_items(batch_samples, device)

    def count_batch_items(self, batches: list[dict], device=None) -> LCLBatchCounts:
        """Contrastive pairs and generation targets in `batches`, summed over all processes."""
        config = self._pretraining_model.config
        counts = torch.zeros(2, dtype=torch.long)
        for batch in batches:
            input_ids = batch["input_ids"]
            attention_mask = batch.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            counts[1] += int(
                generation_target_mask(input_ids, attention_mask, config.image_token_id, config.image_end_token_id).sum()
            )
            if _has_images(batch):
                counts[0] += int(contrastive_soi_mask(input_ids, attention_mask, config.image_start_token_id).sum())
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(device or self.args.device), reduction="sum").cpu()
        return LCLBatchCounts(int(counts[0]), int(counts[1]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`λ_con·L_con + λ_gen·L_gen`.

        With `num_items_in_batch` an `LCLBatchCounts` (training: see `get_batch_samples`) the result is this
        micro-batch's share of the global mean, times the number of processes (DDP averages gradients).
        Without it (evaluation, direct calls) it is the plain mean over this batch.
        """
        inputs = _model_inputs(inputs)
        counts = num_items_in_batch if isinstance(num_items_in_batch, LCLBatchCounts) else None
        if counts is not None:
            inputs["num_contrastive_pairs_in_batch"] = counts.contrastive_pairs
            inputs["num_generation_targets_in_batch"] = counts.generation_targets
        weight_con, weight_gen = self.loss_weights
        outputs = model(
            **inputs,
            contrastive_loss_weight=weight_con,
            generation_loss_weight=weight_gen,
            pack_sequences=self.pack_sequences,
        )
        loss = outputs.loss
        if counts is not None:
            loss = loss * self.accelerator.num_processes
            if model.training:
                self._accumulate_metrics(outputs, inputs)
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation of a pre-training run is its loss: `(loss, None, None)`."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Transformers' rule (no decay on biases and norms) plus the reference's (OpenCLIP): no decay on parameters
        of fewer than 2 dimensions, i.e. `logit_scale` and the ViT's class embedding."""
        parameters = dict(model.named_parameters())
        return [name for name in super().get_decay_parameter_names(model) if parameters[name].ndim >= 2]

    # ------------------------------------------------------------------ logging

    def _accumulate_metrics(self, outputs, inputs):
        if self._metric_sums is None:
            self._metric_sums = torch.zeros(3, device=self.args.device)
            self._metrics_since = time.perf_counter()
        pixel_values = inputs.get("pixel_values")
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        self._metric_sums += torch.stack(
            [
                outputs.loss_contrastive.detach().float().to(self._metric_sums.device),
                (outputs.loss_generation if outputs.loss_generation is not None else torch.zeros(()))
                .detach().float().to(self._metric_sums.device),
                torch.tensor(float(num_images), device=self._metric_sums.device),
            ]
        )

    def _collect_metrics(self) -> dict[str, float]:
        """The LCL metrics since the last log; a collective, so it runs on every process."""
        steps = self.state.global_step - self._globalstep_last_logged
        if self._metric_sums is None or steps <= 0:
            return {}
        sums = self._metric_sums.clone()
        if self.accelerator.num_processes > 1:
            sums = self.accelerator.reduce(sums, reduction="sum")
        elapsed = max(time.perf_counter() - self._metrics_since, 1e-9)
        logs = {
            # Each micro-batch on each rank holds a share of the step's global mean: their sum is the mean.
            "loss_contrastive": sums[0].item() / steps,
            "loss_generation": sums[1].item() / steps,
            "logit_scale": self._pretraining_model.lcl.logit_scale.item(),
            "images_per_second": sums[2].item() / elapsed,
        }
        if self.loss_weights[1] == 0:
            del logs["loss_generation"]  # not computed (the LM head does not run)
        self._metric_sums.zero_()
        self._metrics_since = time.perf_counter()
        return logs

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, *args, **kwargs):
        if self.control.should_log and self.state.global_step > self._globalstep_last_logged:
            self._pending_logs = self._collect_metrics()
        super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._pending_logs:
            logs = {**logs, **self._pending_logs}
            self._pending_logs = {}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving

    def _save(self, output_dir: str | None = None, state_dict=None):
        super()._save(output_dir, state_dict=state_dict)
        if self.args.should_save:
            add_remote_code(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model: nn.Module, trial) -> None:
        """`Trainer._save_checkpoint`'s steps, written to a staging folder that is renamed into place when complete."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final_dir = os.path.join(run_dir, name)
        staging_dir = os.path.join(run_dir, STAGING_PREFIX + name)
        if self.args.should_save:
            _remove_stale_staging(run_dir)
        self.accelerator.wait_for_everyone()  # no rank writes into a staging folder that is being removed

        if self.hp_search_backend is None and trial is None:
            self.store_flos()
        self.save_model(staging_dir, _internal_call=True)
        if (
            self.args.save_strategy in (SaveStrategy.STEPS, SaveStrategy.EPOCH, SaveStrategy.BEST)
            and self.state.best_global_step
        ):
            best_dir = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.exists(best_dir):
                self.state.best_model_checkpoint = best_dir
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging_dir)
            self._save_scaler(staging_dir)
            self._save_rng_state(staging_dir)
        if self.args.should_save:
            self._export_callback_states()
            self.state.save_to_json(os.path.join(staging_dir, TRAINER_STATE_NAME))

        self.accelerator.wait_for_everyone()  # every rank's files (e.g. RNG states) are in the staging folder
        if self.args.should_save:
            _publish(staging_dir, final_dir)
        self.accelerator.wait_for_everyone()

        if self.args.push_to_hub:
            self._push_from_checkpoint(final_dir)
        if self.args.should_save:
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )

    def _export_callback_states(self):
        for callback in self.callback_handler.callbacks + [self.control]:
            if isinstance(callback, ExportableState):
                callback_name = callback.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(callback_name), list):
                    self.state.stateful_callbacks[callback_name].append(callback.state())
                else:
                    self.state.stateful_callbacks[callback_name] = callback.state()

    # ------------------------------------------------------------------ model card

    def create_model_card(
        self,
        model_name: str | None = None,
        license: str = "apache-2.0",
        tags: str | list[str] | None = None,
        datasets: str | list[str] | None = None,
        eval_results=(),
        description: str | None = None,
        **kwargs,
    ):
        """Write `README.md` (see `hub_lcl.build_model_card`) into `args.output_dir`, with this run's losses.

        Extra keyword arguments of `Trainer.create_model_card` (language, finetuned_from, ...) are ignored.
        """
        if not self.is_world_process_zero():
            return
        card = build_model_card(
            model_name or Path(self.args.output_dir).name,
            self._pretraining_model.config,
            license=license,
            datasets=[datasets] if isinstance(datasets, str) else list(datasets or ()),
            tags=[tags] if isinstance(tags, str) else list(tags or ()),
            training_metrics=self.final_training_metrics(),
            eval_results=eval_results,
            hyperparameters=self._hyperparameters(),
            description=description,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))
        return card

    def final_training_metrics(self) -> dict[str, float]:
        """The last logged `loss`, `loss_contrastive`, `loss_generation`, `logit_scale`, plus `train_loss`."""
        metrics = {}
        for entry in self.state.log_history:
            for key in ("loss", "loss_contrastive", "loss_generation", "logit_scale", "train_loss", "eval_loss"):
                if key in entry:
                    metrics[key] = entry[key]
        return metrics

    def _hyperparameters(self) -> dict[str, object]:
        args = self.args
        weight_con, weight_gen = self.loss_weights
        return {
            "learning_rate": args.learning_rate,
            "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "optimizer": str(getattr(args.optim, "value", args.optim)),
            "weight_decay": args.weight_decay,
            "train_batch_size (per device)": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": args.world_size,
            "steps": self.state.global_step,
            "contrastive_loss_weight": weight_con,
            "generation_loss_weight": weight_gen,
            "pack_sequences": self.pack_sequences,
            "seed": args.seed,
        }


def _find_module(model: nn.Module, cls: type) -> nn.Module | None:
    if isinstance(model, cls):
        return model
    return next((module for module in model.modules() if isinstance(module, cls)), None)


def _has_images(batch: dict) -> bool:
    pixel_values = batch.get("pixel_values")
    return pixel_values is not None and pixel_values.shape[0] > 0


def _model_inputs(batch: dict) -> dict:
    """The model's own inputs from a collated batch; an empty `pixel_values` (text-only batch) is dropped."""
    inputs = {name: batch[name] for name in MODEL_INPUT_NAMES if batch.get(name) is not None}
    if "pixel_values" in inputs and inputs["pixel_values"].shape[0] == 0:
        del inputs["pixel_values"]
    return inputs


def _remove_stale_staging(run_dir: str) -> None:
    """Staging folders left by a crash during a save are incomplete by construction."""
    if not os.path.isdir(run_dir):
        return
    for entry in os.listdir(run_dir):
        if entry.startswith((STAGING_PREFIX + PREFIX_CHECKPOINT_DIR, REPLACED_PREFIX + PREFIX_CHECKPOINT_DIR)):
            logger.warning(f"Removing {os.path.join(run_dir, entry)}, an incomplete checkpoint of an interrupted save.")
            shutil.rmtree(os.path.join(run_dir, entry), ignore_errors=True)


def _publish(staging_dir: str, final_dir: str) -> None:
    """Make the complete checkpoint in `staging_dir` visible as `final_dir` with one rename."""
    for root, _, files in os.walk(staging_dir):
        for name in files:
            _fsync(os.path.join(root, name))
    if os.path.exists(final_dir):
        # Saving the same step twice (e.g. an explicit save after the last step): swap the folders.
        previous = os.path.join(os.path.dirname(final_dir), REPLACED_PREFIX + os.path.basename(final_dir))
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(final_dir, previous)
        os.rename(staging_dir, final_dir)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.rename(staging_dir, final_dir)
    _fsync(os.path.dirname(final_dir) or ".")


def _fsync(path: str) -> None:
    """Flush a file's (or a folder's entries') data to disk so that a rename never exposes unwritten data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on folders
    finally:
        os.close(fd)


__all__ = ["LCLBatchCounts", "LCLTrainer", "LCLTrainingArguments", "LogitScaleClampCallback", "DatasetEpochCallback"]
