"""Training-step benchmark: forward + backward + AdamW of `LCLForPreTraining` on image-caption pairs.

Default: the ViT-B/32 LAION config at batch 8, our model only, on realistic caption lengths (a fixed,
seeded sample of a log-normal with median 12 BPE tokens, sigma 0.6 in log space) with dynamic padding
and, for comparison, on the same captions padded to the full context (128) as the reference pipeline
does. Prints images/s, tokens/s, peak RSS and MFU; writes everything to JSON.

    python benchmarks/train_step.py                                   # ours only
    python benchmarks/train_step.py --reference-src /path/to/LCL/src  # + the reference, side by side

With `--reference-src`, the reference model (OpenGVLab/LCL on OpenCLIP, never part of this repository)
is built in the same process, its initial weights are copied into ours (`convert_lcl.convert_state_dict`),
the losses of both are compared on every batch, and the timed steps of all runs are interleaved so that
every run sees the same machine load. Peak RSS is measured in one fresh subprocess per run.

Every pair is laid out as the reference does: image first `<soi> <img>x49 <eoi> caption <eot>` or text
first `<sot> caption <soi> <img>x49 <eoi>` (p = 0.5 each). Caption tokens are random ids in [1, 49405],
so no real token is 0 (the reference drops every target equal to 0, its padding id).
"""

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    RESULTS_DIR,
    current_rss_mib,
    format_table,
    lcl_config,
    machine_info,
    matmul_peak_flops,
    median,
    peak_rss_mib,
    spread,
    write_json,
)
from flops import StepShape, format_flops, training_step_flops  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

CAPTION_LENGTH_MEDIAN = 12  # BPE tokens; LAION captions are short with a long tail
CAPTION_LENGTH_SIGMA = 0.6  # of log(length)


@dataclass
class PairBatch:
    """One batch of image-caption pairs in both layouts.

    pixel_values: `(batch, 3, H, W)`.
    input_ids, attention_mask: `(batch, longest)`, right-padded (dynamic padding).
    padded_input_ids, padded_attention_mask: `(batch, context_length)`, padded with 0 like the reference.
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    padded_input_ids: torch.Tensor
    padded_attention_mask: torch.Tensor
    caption_lengths: list[int]
    image_first: list[bool]

    @property
    def num_real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def sample_caption_lengths(rng: random.Random, count: int, max_length: int) -> list[int]:
    """`count` caption lengths spread over the quantiles of a log-normal (median `CAPTION_LENGTH_MEDIAN`),
    clipped to [1, max_length], in a seeded random order.

    Quantiles rather than random draws: the sample's median is the intended one whatever `count` is,
    and its tail (the longest captions, which set each batch's padded length) is the distribution's.
    """
    normal = statistics.NormalDist(math.log(CAPTION_LENGTH_MEDIAN), CAPTION_LENGTH_SIGMA)
    lengths = [min(max(round(math.exp(normal.inv_cdf((i + 0.5) / count))), 1), max_length) for i in range(count)]
    rng.shuffle(lengths)
    return lengths


def make_pair_batches(config, batch_size: int, num_batches: int, seed: int = 0) -> list[PairBatch]:
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    context = config.text_config.max_position_embeddings
    n = config.num_image_tokens
    max_caption = context - n - 4  # the reference's text budget: <sot>/<eot> + <soi>/<eoi>
    image_block = [config.image_start_token_id] + [config.image_token_id] * n + [config.image_end_token_id]
    vision = config.vision_config
    all_lengths = sample_caption_lengths(rng, batch_size * num_batches, max_caption)
    batches = []
    for start in range(0, batch_size * num_batches, batch_size):
        lengths = all_lengths[start: start + batch_size]
        image_first = [rng.random() < 0.5 for _ in range(batch_size)]
        rows = []
        for length, first in zip(lengths, image_first):
            caption = torch.randint(1, config.bos_token_id, (length,), generator=generator).tolist()
            if first:
                rows.append(image_block + caption + [config.eos_token_id])
            else:
                rows.append([config.bos_token_id] + caption + image_block)
        longest = max(map(len, rows))
        input_ids = torch.full((batch_size, longest), config.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch_size, longest, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
        padded_input_ids = torch.zeros(batch_size, context, dtype=torch.long)
        padded_input_ids[:, :longest] = input_ids
        padded_attention_mask = torch.zeros(batch_size, context, dtype=torch.long)
        padded_attention_mask[:, :longest] = attention_mask
        image_shape = (batch_size, vision.num_channels, vision.image_size, vision.image_size)
        pixel_values = torch.randn(image_shape, generator=generator)
        batches.append(PairBatch(pixel_values, input_ids, attention_mask, padded_input_ids, padded_attention_mask,
                                 lengths, image_first))
    return batches


# ----------------------------------------------------------------------------------------------
# Runs: one model + optimizer + input layout each
# ----------------------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    """AdamW with OpenCLIP's recipe: no weight decay on gains, biases and `logit_scale` (tensors below 2-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    options = {"fused": {"fused": True}, "foreach": {"foreach": True}, "default": {}}[kind]
    groups = [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6, **options)


class Run:
    """A named way of running a training step; `step` returns the loss and the time of each phase."""

    def __init__(self, name, model, optimizer, forward, layout: str, logit_scale, compiled_layers=None):
        self.name, self.model, self.optimizer, self.forward, self.layout = name, model, optimizer, forward, layout
        self.logit_scale = logit_scale  # clamped after each step, as both trainers do
        self.compiled_layers = compiled_layers
        self.times, self.phases, self.losses = [], [], []

    def step(self, batch: PairBatch) -> tuple[float, dict, float]:
        if self.compiled_layers is not None:
            self.compiled_layers.swap_in()
        clock = time.perf_counter
        start = clock()
        loss = self.forward(batch)["loss"]
        after_forward = clock()
        loss.backward()
        after_backward = clock()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(100))
        end = clock()
        if self.compiled_layers is not None:
            self.compiled_layers.swap_out()
        phases = {"forward": after_forward - start, "backward": after_backward - after_forward,
                  "optimizer": end - after_backward}
        return end - start, phases, float(loss.detach())


class CompiledLayers:
    """`torch.compile` of every transformer block (ViT and causal), swapped into the model for one run.

    Compiling the blocks rather than the whole model keeps the data-dependent bookkeeping (input
    validation, boolean indexing of targets) out of the graphs; the 24 blocks share two compiled graphs.
    The compiled modules share their parameters with the eager ones, so the same optimizer serves both.
    """

    def __init__(self, model):
        self.layer_lists = [model.lcl.vision_model.vit.encoder.layers, model.lcl.text_model.layers]
        self.eager = [list(layers) for layers in self.layer_lists]
        self.compiled = [[torch.compile(layer, dynamic=True) for layer in layers] for layers in self.layer_lists]

    def _put(self, which):
        for layers, modules in zip(self.layer_lists, which):
            for i, module in enumerate(modules):
                layers[i] = module

    def swap_in(self):
        self._put(self.compiled)

    def swap_out(self):
        self._put(self.eager)


def layout_inputs(batch: PairBatch, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids`, `attention_mask` of a layout: padded to the context, or to the batch's longest sequence
    (`dynamic`, and `packed`, which the model then packs itself)."""
    if layout == "max_length":
        return batch.padded_input_ids, batch.padded_attention_mask
    return batch.input_ids, batch.attention_mask


def ours_forward(model, layout: str):
    def forward(batch: PairBatch):
        ids, mask = layout_inputs(batch, layout)
        out = model(input_ids=ids, attention_mask=mask, pixel_values=batch.pixel_values,
                    pack_sequences=layout == "packed")
        return {"loss": out.loss, "loss_generation": out.loss_generation, "loss_contrastive": out.loss_contrastive}

    return forward


def build_models(args, config):
    """Our model (with the reference's initial weights when the reference is given) and the reference."""
    from modeling_lcl import LCLForPreTraining

    torch.manual_seed(args.seed)
    reference = None
    ours = LCLForPreTraining(config)
    if args.reference_src:
        from reference_lcl import ReferenceTrainStep

        from modeling_lcl.convert_lcl import convert_state_dict

        torch.manual_seed(args.seed)
        reference = ReferenceTrainStep(args.reference_src, config)
        ours.load_state_dict(convert_state_dict(reference.state_dict(), config), strict=True)
    ours.train()
    if reference is not None:
        reference.model.train()
    return ours, reference


# Runs: (model, input layout, AdamW implementation, compiled blocks). "default" is what
# `torch.optim.AdamW(params)` picks on CPU (a per-tensor loop), i.e. what the reference trainer builds;
# "fused" is the default of transformers' Trainer (`optim="adamw_torch_fused"`), i.e. what ours builds.
RUN_SPECS = {
    "reference / max_length / AdamW default": ("reference", "max_length", "default", False),
    "reference / max_length / AdamW fused": ("reference", "max_length", "fused", False),
    "ours / max_length / AdamW fused": ("ours", "max_length", "fused", False),
    "ours / dynamic / AdamW fused": ("ours", "dynamic", "fused", False),
    "ours / packed / AdamW fused": ("ours", "packed", "fused", False),
    "ours / packed / AdamW fused / compiled blocks": ("ours", "packed", "fused", True),
}


def run_names(args) -> list[str]:
    names = [name for name, (model, _, _, compiled) in RUN_SPECS.items()
             if (model == "ours" or args.reference_src) and (args.compile or not compiled)]
    return names


def build_runs(config, ours, reference, names) -> list[Run]:
    """The runs of `names`. Runs of one model share it, and share an optimizer when they name the same
    kind: step time does not depend on the weights' values."""
    runs, optimizers, compiled = [], {}, None
    for name in names:
        which, layout, optimizer_kind, use_compiled = RUN_SPECS[name]
        model = reference.model if which == "reference" else ours
        if (which, optimizer_kind) not in optimizers:
            optimizers[which, optimizer_kind] = make_optimizer(model, optimizer_kind)
        optimizer = optimizers[which, optimizer_kind]
        if which == "reference":
            forward = lambda b: reference.losses(b.pixel_values, b.padded_input_ids)  # noqa: E731
            runs.append(Run(name, model, optimizer, forward, layout, model.logit_scale))
            continue
        if use_compiled and compiled is None:
            compiled = CompiledLayers(ours)
        runs.append(Run(name, ours, optimizer, ours_forward(ours, layout), layout, ours.lcl.logit_scale,
                        compiled if use_compiled else None))
    return runs


# ----------------------------------------------------------------------------------------------
# Loss parity with the reference
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def compare_losses(ours, reference, batches: list[PairBatch]) -> dict:
    """Largest |ours - reference| of each loss over the batches, in each of our layouts.

    The reference logs its losses already weighted; ours are compared after the same weighting.
    """
    config = ours.config
    diffs = {}
    for layout in ("packed", "dynamic", "max_length"):
        forward = ours_forward(ours, layout)
        worst = {"loss": 0.0, "loss_generation": 0.0, "loss_contrastive": 0.0}
        for batch in batches:
            theirs = reference.losses(batch.pixel_values, batch.padded_input_ids)
            mine = forward(batch)
            mine = {
                "loss": mine["loss"],
                "loss_generation": config.generation_loss_weight * mine["loss_generation"],
                "loss_contrastive": config.contrastive_loss_weight * mine["loss_contrastive"],
            }
            for key in worst:
                worst[key] = max(worst[key], abs(float(mine[key]) - float(theirs[key])))
        diffs[layout] = worst
    diffs["reference_loss_first_batch"] = float(reference.losses(batches[0].pixel_values,
                                                                 batches[0].padded_input_ids)["loss"])
    return diffs


def compare_gradients(ours, reference, batch: PairBatch, layout: str) -> dict:
    """Gradients of one batch, ours (in `layout`) vs the reference (padded to the context), mapped through
    the checkpoint converter: the largest |difference| relative to the largest |gradient|."""
    from modeling_lcl.convert_lcl import convert_state_dict

    reference.losses(batch.pixel_values, batch.padded_input_ids)["loss"].backward()
    ours_forward(ours, layout)(batch)["loss"].backward()
    theirs = convert_state_dict({name: p.grad for name, p in reference.model.named_parameters()}, ours.config)
    worst, scale = 0.0, 0.0
    for name, param in ours.named_parameters():
        worst = max(worst, float((param.grad - theirs[name]).abs().max()))
        scale = max(scale, float(theirs[name].abs().max()))
    reference.model.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return {"max_abs_grad_diff": worst, "max_abs_grad": scale, "relative": worst / scale}


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------


def step_shape(config, batch: PairBatch, layout: str) -> StepShape:
    """What the step computes on (the reference and ours project only supervised positions through lm_head).

    Packed, the causal transformer runs on the rows of the model's own packing plan (`packing_lcl`)."""
    from modeling_lcl.loss_lcl import contrastive_soi_mask, generation_target_mask, loss_prefix_lengths
    from modeling_lcl.packing_lcl import plan_packing

    ids, mask = layout_inputs(batch, layout)
    targets = generation_target_mask(ids, mask, config.image_token_id, config.image_end_token_id)
    pairs = contrastive_soi_mask(ids, mask, config.image_start_token_id)
    num_rows, row_length = ids.shape
    if layout == "packed":
        lengths = loss_prefix_lengths(ids, mask, config.image_token_id, config.image_end_token_id,
                                      config.image_start_token_id)
        num_rows, row_length = plan_packing(lengths.tolist(), ids.shape[1]).packed_shape
    return StepShape(batch.pixel_values.shape[0], num_rows, row_length, int(targets.sum()), int(pairs.sum()))


def time_runs(runs: list[Run], batches: list[PairBatch], warmup: int, steps: int) -> list[float]:
    """Interleave the runs step by step (rotating their order) so that all see the same machine load.

    After each round the fp32 matmul peak is measured again; the largest is the MFU's denominator, so a
    moment of load on the shared machine cannot lower the peak and inflate the MFU. Returns all of them.
    """
    peaks = [matmul_peak_flops(repeats=3)]
    for i in range(warmup + steps):
        batch = batches[i]
        order = runs[i % len(runs):] + runs[: i % len(runs)]
        for run in order:
            seconds, phases, loss = run.step(batch)
            if i >= warmup:
                run.times.append(seconds)
                run.phases.append(phases)
                run.losses.append(loss)
            print(f"  step {i:2d} {'(warm-up)' if i < warmup else '         '} {run.name:48s} {seconds:7.3f} s  "
                  f"loss {loss:.4f}", flush=True)
        peaks.append(matmul_peak_flops(repeats=3))
    return peaks


def summarize(run: Run, config, batches, warmup, peak_flops, batch_size) -> dict:
    """Medians over the timed steps; rates are taken step by step (batches differ in length), then medianed."""
    timed_batches = batches[warmup: warmup + len(run.times)]
    flops = [training_step_flops(config, step_shape(config, b, run.layout))["total"] for b in timed_batches]
    achieved = median(f / t for f, t in zip(flops, run.times))
    return {
        "run": run.name,
        "step_s": median(run.times),
        "best_step_s": min(run.times),
        "spread": spread(run.times),
        "images_per_s": median(batch_size / t for t in run.times),
        "tokens_per_s": median(b.num_real_tokens / t for b, t in zip(timed_batches, run.times)),
        "forward_s": median(p["forward"] for p in run.phases),
        "backward_s": median(p["backward"] for p in run.phases),
        "optimizer_s": median(p["optimizer"] for p in run.phases),
        "gflop_per_step": sum(flops) / len(flops) / 1e9,
        "achieved_gflop_per_s": achieved / 1e9,
        "mfu": achieved / peak_flops,
        "step_times_s": run.times,
        "losses": run.losses,
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_step(run: Run, batch: PairBatch, config) -> dict:
    """One profiled step: the share of its CPU time spent in matmul kernels, and their own FLOP/s.

    This splits the MFU gap in two: matmuls slower than the peak, and time outside matmuls
    (LayerNorm, GELU, residual adds, bias gradients, layout copies, the optimizer).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run.step(batch)
    events = prof.key_averages()
    total_us = sum(event.self_cpu_time_total for event in events)
    matmul_us = sum(event.self_cpu_time_total for event in events if event.key in MATMUL_OPS)
    top = sorted(events, key=lambda event: event.self_cpu_time_total, reverse=True)[:12]
    flops = training_step_flops(config, step_shape(config, batch, run.layout))["total"]
    return {
        "matmul_share_of_cpu_time": matmul_us / total_us,
        "matmul_kernels_gflop_per_s": flops / (matmul_us / 1e6) / 1e9,
        "top_ops_self_s": {event.key: event.self_cpu_time_total / 1e6 for event in top},
    }


def measure_memory(args, names: list[str]) -> dict:
    """Peak RSS of each run in a fresh process (same imports in each), so the figures do not mix."""
    results = {}
    for name in names:
        command = [sys.executable, __file__, "--worker", name, "--variant", args.variant, "--batch-size",
                   str(args.batch_size), "--seed", str(args.seed)]
        if args.reference_src:
            command += ["--reference-src", args.reference_src]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker for {name!r} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name:48s} peak RSS {results[name]['peak_rss_mib']:8.0f} MiB", flush=True)
    return results


def memory_worker(args, config) -> None:
    """Build one run alone, take 3 steps, print its RSS figures as one JSON line."""
    reference = ours = None
    if args.reference_src:
        from reference_lcl import ReferenceTrainStep, import_reference

        import_reference(args.reference_src)  # every worker loads the same libraries
    from modeling_lcl import LCLForPreTraining

    rss_after_imports = current_rss_mib()
    batches = make_pair_batches(config, args.batch_size, 3, args.seed)
    torch.manual_seed(args.seed)
    if args.worker.startswith("reference"):
        reference = ReferenceTrainStep(args.reference_src, config)
        reference.model.train()
    else:
        ours = LCLForPreTraining(config).train()
    [run] = build_runs(config, ours, reference, [args.worker])
    rss_after_build = current_rss_mib()
    for batch in batches:
        run.step(batch)
    peak = peak_rss_mib()
    print(json.dumps({"rss_after_imports_mib": rss_after_imports, "rss_after_build_mib": rss_after_build,
                      "peak_rss_mib": peak, "step_peak_over_build_mib": peak - rss_after_build}))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="b32-laion", help="model size (see bench_utils.MODEL_VARIANTS)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (medians are reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="add a run of ours with every transformer block under torch.compile(dynamic=True)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one extra step per run: matmul share of the step and matmul FLOP/s")
    parser.add_argument("--reference-src", default=None, help="src/ folder of a checkout of the reference LCL code")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None,
                        help="JSON path (default: benchmarks/results/train_step_<variant>[_vs_reference].json)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = lcl_config(args.variant)
    if args.worker:
        memory_worker(args, config)
        return

    info = machine_info()
    names = run_names(args)
    batches = make_pair_batches(config, args.batch_size, args.warmup + args.steps, args.seed)
    lengths = [n for b in batches for n in b.caption_lengths]
    packed = [step_shape(config, b, "packed") for b in batches]
    print(f"{args.variant}, batch {args.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"caption lengths: median {median(lengths):.0f}, max {max(lengths)}; dynamic lengths per batch: "
          f"{[b.input_ids.shape[1] for b in batches]} (reference: {config.text_config.max_position_embeddings}); "
          f"packed rows x length: {[(s.num_sequences, s.sequence_length) for s in packed]}")

    ours, reference = build_models(args, config)
    parity = None
    if reference is not None:
        parity = compare_losses(ours, reference, batches)
        parity["gradients_first_batch"] = {
            layout: compare_gradients(ours, reference, batches[0], layout) for layout in ("packed", "dynamic")
        }
        print(f"parity vs reference (max |diff| over {len(batches)} batches, same initial weights): {parity}")

    runs = build_runs(config, ours, reference, names)
    print(f"timing {len(runs)} runs, interleaved: {args.warmup} warm-up + {args.steps} timed steps each")
    peaks = time_runs(runs, batches, args.warmup, args.steps)
    peak = max(peaks)
    summaries = [summarize(run, config, batches, args.warmup, peak, args.batch_size) for run in runs]
    if args.profile:
        for run, row in zip(runs, summaries):
            row["profile"] = profile_step(run, batches[args.warmup], config)
            row["matmul_share"] = row["profile"]["matmul_share_of_cpu_time"]
            row["matmul_mfu"] = row["profile"]["matmul_kernels_gflop_per_s"] * 1e9 / peak
            print(f"  profiled {run.name:48s} matmul share {row['matmul_share']:.2f}, matmul kernels at "
                  f"{row['matmul_mfu']:.2f} of peak", flush=True)

    memory = None
    if args.memory:
        print("peak RSS, one fresh process per run:")
        memory = measure_memory(args, [name for name in names if "compile" not in name])
        for row in summaries:
            if row["run"] in memory:
                row["peak_rss_mib"] = memory[row["run"]]["peak_rss_mib"]
                row["step_peak_over_build_mib"] = memory[row["run"]]["step_peak_over_build_mib"]

    # Speed-ups against the reference with the same optimizer, and against the reference as its trainer runs.
    by_name = {row["run"]: row for row in summaries}
    same = by_name.get("reference / max_length / AdamW fused")
    shipped = by_name.get("reference / max_length / AdamW default")
    # On a shared machine the fastest step (least disturbed, as `timeit` reports) is the steadier estimate.
    for row in summaries:
        for key, baseline in (("same_optim", same), ("as_shipped", shipped)):
            row[f"vs_ref_{key}"] = baseline["step_s"] / row["step_s"] if baseline else None
            row[f"vs_ref_{key}_best"] = baseline["best_step_s"] / row["best_step_s"] if baseline else None

    example = training_step_flops(config, step_shape(config, batches[args.warmup], "dynamic"))
    example_packed = training_step_flops(config, step_shape(config, batches[args.warmup], "packed"))
    print()
    print(format_flops(example))
    print("packed:")
    print(format_flops(example_packed))
    print(f"\nfp32 matmul peak (4096^3 torch.mm, {torch.get_num_threads()} threads), measured after each round: "
          f"{', '.join(f'{p / 1e9:.0f}' for p in peaks)} GFLOP/s; MFU uses the largest, {peak / 1e9:.1f}\n")
    columns = ["run", "step_s", "best_step_s", "spread", "images_per_s", "tokens_per_s", "forward_s", "backward_s", "optimizer_s",
               "gflop_per_step", "mfu", "matmul_share", "matmul_mfu", "peak_rss_mib", "vs_ref_same_optim",
               "vs_ref_same_optim_best", "vs_ref_as_shipped", "vs_ref_as_shipped_best"]
    columns = [column for column in columns if any(row.get(column) is not None for row in summaries)]
    table = format_table(summaries, columns)
    print(table)

    payload = {
        "benchmark": "train_step",
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k != "worker"},
        "caption_lengths": {"median": median(lengths), "max": max(lengths),
                            "per_batch": [b.caption_lengths for b in batches],
                            "dynamic_sequence_lengths": [b.input_ids.shape[1] for b in batches],
                            "packed_rows_and_length": [(s.num_sequences, s.sequence_length) for s in packed]},
        "matmul_peak_gflop_per_s": {"used": peak / 1e9, "each_round": [p / 1e9 for p in peaks]},
        "loss_parity_vs_reference": parity,
        "flops_example_step": example,
        "flops_example_step_packed": example_packed,
        "runs": summaries,
        "table": table,
    }
    suffix = "_vs_reference" if args.reference_src else ""
    output = Path(args.output) if args.output else RESULTS_DIR / f"train_step_{args.variant}{suffix}.json"
    print(f"\nwrote {write_json(payload, output)}")


if __name__ == "__main__":
    main()
