"""Training on MONAI's engines through ``python -m sarco_app train``: the same run in two
processes (torch DDP, gloo) as in one, resume after a killed run, TensorBoard and MLflow records,
and CPU against GPU where there is one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sarco_app.__main__ import main
from sarco_app.segmentation.network import load_checkpoint
from sarco_app.segmentation.segment import SHIPPED_MODEL_PATH, segment_volume
from sarco_app.synthesis.phantom import generate, write_cohort

ROOT = Path(__file__).resolve().parents[1]

#: Epoch line: "epoch 1/2 iter 2 loss 1.2345 val dice muscle 0.9 sat ... [3 s]".
EPOCH_LINE = re.compile(r"^epoch (\d+)/\d+ iter (\d+) loss (\S+) val dice (.*?)( \(best, saved\))? \[\d+ s\]$", re.M)

# Tolerances of a sharded run against one process. DDP sums the two halves' gradients in
# another order than one backward pass over the whole batch, so float32 rounding differs:
# losses agree to 1e-4 (relative), validation Dice to 1e-3, weights to 1e-4 after a few
# iterations, and labels on >= 99.9 % of the pixels.
LOSS_RTOL, DICE_ATOL, WEIGHT_ATOL, LABEL_AGREEMENT = 1e-4, 1e-3, 1e-4, 0.999


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    folder = tmp_path_factory.mktemp("engine_studies")
    write_cohort(folder, 3, seed=11, format="nifti", size=128)
    return folder


@pytest.fixture(scope="module")
def test_phantom():
    return generate(19, spacing_mm=2.0, size=160)


def epoch_lines(text: str) -> list[tuple[int, int, float, dict[str, float]]]:
    """(epoch, iterations, loss, val dice per tissue) of every epoch line printed."""
    lines = []
    for epoch, it, loss, dice, _ in EPOCH_LINE.findall(text):
        values = dict(zip(dice.split()[::2], dice.split()[1::2]))
        lines.append((int(epoch), int(it), float(loss), {k: float(v) for k, v in values.items() if v != "-"}))
    return lines


def cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python -m sarco_app ARGS`` in a child process (as a user runs it)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "sarco_app", *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=600, **kwargs)


def train_args(studies, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(studies), "--out", str(out), "--epochs", "2", "--iterations-per-epoch", "2",
            "--batch-size", "2", "--crop", "64", "--threads", "1", "--seed", "3", "--last", str(out.with_suffix(".last.pt")),
            *extra]


def agreement(a: Path, b: Path, phantom) -> float:
    """Fraction of a phantom's pixels both checkpoints label the same (the served answer)."""
    label_a = segment_volume(phantom.hu, phantom.spacing, model=load_checkpoint(a), threads=1).label
    label_b = segment_volume(phantom.hu, phantom.spacing, model=load_checkpoint(b), threads=1).label
    return float((label_a == label_b).mean())


#: Biases of the convolutions an instance norm follows (BasicUNet's ``conv_N.conv.bias``): the
#: norm subtracts them again, so they change no output and their true gradient is 0. AdamW
#: turns the float noise of that zero into steps of +-lr whose sign differs between any two
#: summation orders; measured: up to 9e-3 apart between 1 and 2 processes, while every other
#: weight agrees to 1.3e-6. They are left out of the weight comparison (labels cover them).
NORMALISED_BIAS = re.compile(r"conv_\d\.conv\.bias$")


def max_weight_difference(a: Path, b: Path) -> float:
    """Largest difference of two checkpoints' weights that reach the output (see NORMALISED_BIAS)."""
    sa, sb = torch.load(a, weights_only=True)["state_dict"], torch.load(b, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa if not NORMALISED_BIAS.search(k))


@pytest.mark.slow
def test_two_processes_train_the_one_process_run(studies, test_phantom, tmp_path):
    """Fine-tuning the shipped model for a few iterations with ``--nproc 2`` (gloo, one crop per
    process) gives the epoch lines and weights of ``--nproc 1`` with the same global batch."""
    if not SHIPPED_MODEL_PATH.is_file():
        pytest.fail("models/bodycomp_unet.pt is missing")
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}.pt"
        done = cli(train_args(studies, out, "--init", str(SHIPPED_MODEL_PATH), "--lr", "3e-3", "--nproc", str(nproc)))
        assert done.returncode == 0, done.stdout + done.stderr
        runs[nproc] = (out.with_suffix(".last.pt"), done.stdout)
    one, two = epoch_lines(runs[1][1]), epoch_lines(runs[2][1])
    assert "training in 2 processes (torch DDP, gloo)" in runs[2][1] and "(2 processes x 1)" in runs[2][1]
    assert len(one) == len(two) == 2 and [line[:2] for line in one] == [line[:2] for line in two] == [(1, 2), (2, 4)]
    for (_, _, loss1, dice1), (_, _, loss2, dice2) in zip(one, two):
        assert loss2 == pytest.approx(loss1, rel=LOSS_RTOL)
        assert dice1.keys() == dice2.keys() and all(abs(dice1[k] - dice2[k]) <= DICE_ATOL for k in dice1)
    # The network moved (lr 3e-3, still warming up), and both runs moved it the same way.
    assert max_weight_difference(runs[1][0], SHIPPED_MODEL_PATH) > 10 * WEIGHT_ATOL
    assert max_weight_difference(runs[1][0], runs[2][0]) <= WEIGHT_ATOL
    # Rank 0's checkpoint has the usual format: it loads and segments like the one-process one.
    assert agreement(runs[1][0], runs[2][0], test_phantom) >= LABEL_AGREEMENT
    labels = segment_volume(test_phantom.hu, test_phantom.spacing, model=load_checkpoint(runs[2][0]), threads=1).label
    assert labels.shape == test_phantom.hu.shape and set(np.unique(labels)) <= {0, 1, 2, 3, 4} and labels.any()


def test_nproc_must_divide_the_batch(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "m.pt"), "--batch-size", "3",
                 "--nproc", "2"])
    assert code == 1
    assert "nproc 2 does not divide batch_size 3" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_state(studies, test_phantom, tmp_path):
    """SIGKILL after the first resume state; the same command with ``--state-dir`` continues
    from it and ends with the weights and labels of a run never interrupted."""
    args = ["--epochs", "4"]
    whole = cli(train_args(studies, tmp_path / "whole.pt", "--state-dir", str(tmp_path / "whole_state")) + args)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    state = tmp_path / "state"
    command = [sys.executable, "-m", "sarco_app"] + train_args(studies, tmp_path / "resumed.pt", "--state-dir",
                                                               str(state)) + args
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
                            env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(state.glob("resume_checkpoint_*.pt")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    killed_output = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, killed_output
    assert "epoch 4/4" not in killed_output and [p.name for p in state.iterdir()] == ["resume_checkpoint_1.pt"]
    resumed = cli(train_args(studies, tmp_path / "resumed.pt", "--state-dir", str(state)) + args)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "(epoch 1, iteration 2)" in resumed.stdout
    # The resumed run printed epochs 2-4 only, with the uninterrupted run's losses.
    whole_lines, resumed_lines = epoch_lines(whole.stdout), epoch_lines(resumed.stdout)
    assert [line[0] for line in resumed_lines] == [2, 3, 4]
    for (_, it1, loss1, _), (_, it2, loss2, _) in zip(whole_lines[1:], resumed_lines):
        assert it1 == it2 and loss2 == pytest.approx(loss1, rel=LOSS_RTOL)
    for name in ("whole", "resumed"):
        assert torch.load(tmp_path / f"{name}.last.pt", weights_only=True)["meta"]["epoch"] == 4
    assert max_weight_difference(tmp_path / "whole.last.pt", tmp_path / "resumed.last.pt") <= WEIGHT_ATOL
    assert agreement(tmp_path / "whole.last.pt", tmp_path / "resumed.last.pt", test_phantom) >= LABEL_AGREEMENT
    assert agreement(tmp_path / "whole.pt", tmp_path / "resumed.pt", test_phantom) >= LABEL_AGREEMENT


@pytest.mark.slow
def test_tensorboard_and_mlflow_record_loss_and_dice(studies, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    mlflow = pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(train_args(studies, tmp_path / "m.pt", "--tensorboard-dir", str(tmp_path / "tb"), "--mlflow-uri", uri))
    printed = capsys.readouterr().out
    assert code == 0, printed
    lines = epoch_lines(printed)
    assert len(lines) == 2
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "train_loss", "val_dice_muscle", "val_dice_sat", "val_score"} <= set(tags), tags
    assert len(events.Scalars("loss")) == 4  # one per iteration
    for (_, _, loss, dice), logged_loss, logged_dice in zip(lines, events.Scalars("train_loss"),
                                                          events.Scalars("val_dice_muscle")):
        assert logged_loss.value == pytest.approx(loss, abs=1e-4) and logged_dice.value == pytest.approx(dice["muscle"], abs=1e-4)
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("sarco_bodycomp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["batch_size"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_dice_sat")
    assert [round(m.value, 4) for m in sorted(history, key=lambda m: m.step)] == [line[3]["sat"] for line in lines]
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cpu_and_gpu_give_the_same_labels(studies, test_phantom, tmp_path):
    """Inference (``segment --device``) and a short training on the GPU agree with the CPU."""
    labels = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.nii.gz"
        done = cli(["segment", str(studies / "phantom_0000.nii.gz"), "--out", str(out), "--device", device])
        assert done.returncode == 0, done.stdout + done.stderr
        import nibabel as nib

        labels[device] = np.asarray(nib.load(str(out)).dataobj)
    assert (labels["cpu"] == labels["cuda"]).mean() >= LABEL_AGREEMENT
    for device in ("cpu", "cuda"):
        done = cli(train_args(studies, tmp_path / f"{device}.pt", "--init", str(SHIPPED_MODEL_PATH), "--device", device))
        assert done.returncode == 0, done.stdout + done.stderr
    assert agreement(tmp_path / "cpu.last.pt", tmp_path / "cuda.last.pt", test_phantom) >= LABEL_AGREEMENT
