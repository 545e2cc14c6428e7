"""The distributed contrastive loss: 2 processes (gloo, torchrun) train exactly like 1 process on the whole batch.

`helpers_distributed.py` runs one `LCLTrainer` step per scenario under `torchrun --nproc_per_node 2`, each rank
holding half of the global batch; here the same step runs on one process with the whole batch. The total loss,
its two halves and every parameter gradient (after DDP's averaging) must agree.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_distributed import SCENARIO_BATCH, SCENARIOS, first_log, train_one_step

from modeling_lcl.distributed_lcl import DistributedFeatureGather
from modeling_lcl.loss_lcl import contrastive_loss_terms

HELPER = Path(__file__).with_name("helpers_distributed.py")
REPO = HELPER.parents[1]
RTOL = 1e-5


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out_file = tmp_path_factory.mktemp("ddp") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HELPER), str(out_file)]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return torch.load(out_file)


@pytest.fixture(scope="module")
def two_process_resume(tmp_path_factory):
    out_file = tmp_path_factory.mktemp("ddp-resume") / "results.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HELPER), str(out_file), "resume"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return torch.load(out_file)


def test_two_processes_interrupted_and_resumed_reach_the_same_losses(two_process_resume):
    """Checkpoints written by 2 processes (rank 0 publishes the staging folder once all ranks have written)
    resume on 2 processes to the losses of the uninterrupted 2-process run."""
    full, resumed = two_process_resume["full"], two_process_resume["resumed"]
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    assert [step for step in sorted(resumed) if step > 4] == [5, 6]
    for step in (5, 6):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step
    folders = two_process_resume["folders"]
    assert {"checkpoint-2", "checkpoint-4", "checkpoint-6"} <= set(folders)
    assert not any(name.startswith("_tmp-") for name in folders)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_processes_match_one_process_on_the_concatenated_batch(two_process_results, scenario, tmp_path):
    trainer, gradients = train_one_step(str(tmp_path), SCENARIOS[scenario], per_device_batch=SCENARIO_BATCH)
    single_log = first_log(trainer)
    distributed = two_process_results[scenario]

    for key in ("loss", "loss_contrastive", "loss_generation"):
        assert distributed["log"][key] == pytest.approx(single_log[key], rel=RTOL), key
    assert distributed["gradients"].keys() == gradients.keys()

    total_norm = torch.cat([g.flatten() for g in gradients.values()]).norm()
    for name, expected in gradients.items():
        error = (distributed["gradients"][name] - expected).norm()
        # A few parameters have an exactly zero gradient in exact arithmetic (attention key biases, and the
        # LayerNorm bias feeding the pooler's keys: softmax ignores a shift shared by all keys). What both runs
        # compute there is rounding noise, so those are held to the noise level of the whole gradient instead.
        tolerance = RTOL * expected.norm() if expected.norm() > 1e-6 * total_norm else 1e-7 * total_norm
        assert error <= tolerance, f"{name}: |Δ| {error:.3g} > {tolerance:.3g} (|g| {expected.norm():.3g})"


def test_gather_falls_back_to_local_features_without_a_process_group():
    image, text = torch.randn(3, 8), torch.randn(3, 8)
    gathered = DistributedFeatureGather()(image, text)
    assert gathered.offset == 0 and gathered.valid.all()
    assert gathered.image_embeds is image and gathered.text_embeds is text
    loss_sum, count = contrastive_loss_terms(image, text, torch.tensor(1.0), gather=DistributedFeatureGather())
    assert count == 3 and torch.isfinite(loss_sum)
