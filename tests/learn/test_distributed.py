"""Data-parallel training: the sharded sampler, and real torchrun + DDP (gloo) runs of the train stage on the CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import torch
import yaml

from src.ingest.rawdata import DataError
from src.learn.checkpoint import load_checkpoint
from src.learn.data import ShardedBatches, sample_weights
from src.prepare.split import split
from tests.conftest import clean_environ, make_tiny_params

REPO = Path(__file__).resolve().parents[2]
LABELS = np.random.default_rng(0).integers(0, 7, 100)


def _batches(mode: str, world: int, rank: int, batch_size: int = 16) -> list[list[int]]:
    torch.manual_seed(3)  # as the training loop seeds each epoch, the same on every rank
    return list(ShardedBatches(sample_weights(LABELS, mode), len(LABELS), batch_size, True, rank, world))


@pytest.mark.parametrize("mode", ["balanced", "none"])
def test_ranks_split_each_global_batch_of_one_stream(mode):
    single = _batches(mode, 1, 0)
    parts = [_batches(mode, 2, rank) for rank in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(single) == len(LABELS) // 16
    for step, batch in enumerate(single):  # the two halves are exactly the batch one process trains on
        assert parts[0][step] + parts[1][step] == batch
        assert len(parts[0][step]) == len(parts[1][step]) == 8


def test_ranks_draw_their_own_augmentation_after_the_shared_stream():
    """Every rank draws the same stream; what the epoch draws after it (augmentation, dropout) differs per rank, and
    one process draws exactly what it drew before (nothing reseeded)."""
    after = {}
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        _batches("balanced", world, rank)
        after[world, rank] = torch.rand(4)
    torch.manual_seed(3)
    torch.multinomial(sample_weights(LABELS, "balanced"), len(LABELS), replacement=True)
    assert torch.equal(after[1, 0], torch.rand(4))
    assert not torch.equal(after[2, 0], after[2, 1]) and not torch.equal(after[2, 0], after[1, 0])
    _batches("balanced", 2, 1)
    assert torch.equal(after[2, 1], torch.rand(4))  # reproducible: a resumed epoch draws the same


def test_batches_that_cannot_be_split_are_clear_errors():
    with pytest.raises(DataError, match="train.batch_size 15 does not split evenly over 2"):
        ShardedBatches(None, 100, 15, True, 0, 2)
    with pytest.raises(DataError, match="fewer than train.batch_size 128"):
        ShardedBatches(None, 100, 128, False, 0, 2)


@pytest.fixture(scope="module")
def project(synthetic_raw, tmp_path_factory) -> Path:
    """A split of the generated data and a params file per run; augmentation, dropout and drop-path off, so that
    one process and two see the same pixels and the runs can be compared weight for weight."""
    root = tmp_path_factory.mktemp("ddp")
    params = make_tiny_params(root)
    params = params.model_copy(update={"paths": params.paths.model_copy(update={"raw": synthetic_raw})})
    split(synthetic_raw, params.split, params.data, params.paths)
    return root


def write_run_params(root: Path, name: str, nproc: int, epochs: int) -> Path:
    run = make_tiny_params(root / name).model_dump(mode="json")
    for key in ("splits", "cache"):
        run["paths"][key] = str(root / key)
    (root / name / "reports").mkdir(parents=True)
    (root / name / "reports" / "split.json").write_text((root / "reports" / "split.json").read_text())
    run["model"] |= {"dropout": 0.0, "drop_path": 0.0}
    still = {"flips": False, "rot90": False, "scale_min": 1.0, "brightness": 0, "contrast": 0, "saturation": 0}
    # fp32: in bf16 (precision auto on a CPU with AVX512-BF16 or AMX) a batch summed in halves rounds otherwise than
    # whole; one process and two drifted 4e-3 apart in 2 epochs on an AMD Zen 5, and the runs are compared weight
    # for weight
    run["train"] |= {"nproc": nproc, "threads": 1, "epochs": epochs, "precision": "fp32"}
    run["train"]["augment"] |= still
    run["train"]["augment"]["hue"] = 0
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def start_train(params_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "src.train", "--params", str(params_file)],
        cwd=REPO,
        env=clean_environ(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def train_to_end(params_file: Path) -> str:
    proc = start_train(params_file)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-3000:]
    return err.decode()


def weights(root: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(root / name / "models" / "checkpoints" / "last.pt")["model"]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.e2e
def test_two_processes_train_the_weights_one_process_trains(project):
    train_to_end(write_run_params(project, "one", 1, 2))
    log = train_to_end(write_run_params(project, "two", 2, 2))
    assert "data-parallel training: 2 processes (gloo)" in log
    assert log.count("epoch 2/2  loss") == 1  # rank 1 trains silently

    assert largest_difference(weights(project, "one"), weights(project, "two")) < 1e-4  # 3e-6 measured
    one, two = (pd.read_csv(project / n / "reports" / "train_history.csv") for n in ("one", "two"))
    columns = ["train/loss", "val/loss", "val/balanced_accuracy"]
    np.testing.assert_allclose(two[columns].to_numpy(), one[columns].to_numpy(), rtol=1e-4)

    mlflow.set_tracking_uri(f"sqlite:///{project / 'two' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1  # only rank 0 tracks
    assert runs.loc[0, "tags.compute.processes"] == "2" and runs.loc[0, "params.train.nproc"] == "2"


def _worker(launcher: subprocess.Popen, rank: str) -> psutil.Process:
    """The training process torchrun started for `rank` (launcher -> torchrun -> one worker per rank)."""
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and "torch.distributed.run" not in " ".join(child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no worker with RANK={rank} under the launcher")


@pytest.mark.e2e
def test_a_data_parallel_run_killed_with_sigkill_resumes_to_the_same_weights(project):
    epochs = 8
    reference = write_run_params(project, "reference", 1, epochs)
    params_file = write_run_params(project, "killed", 2, epochs)
    launcher = start_train(params_file)
    last = project / "killed" / "models" / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and launcher.poll() is None:
        if last.exists() and load_checkpoint(last)["epoch"] >= 1:
            break
        time.sleep(0.1)
    assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
    os.kill(_worker(launcher, "0").pid, signal.SIGKILL)  # the rank that writes checkpoints, mid-epoch
    launcher.wait(timeout=120)
    assert launcher.returncode != 0  # torchrun stops the other rank and reports the failure
    killed_at = load_checkpoint(last)["epoch"]
    assert 1 <= killed_at < epochs

    log = train_to_end(params_file)
    assert f"resuming from epoch {killed_at}" in log
    history = pd.read_csv(project / "killed" / "reports" / "train_history.csv")
    assert list(history["epoch"]) == list(range(1, epochs + 1))
    train_to_end(reference)  # one process, never interrupted
    assert largest_difference(weights(project, "killed"), weights(project, "reference")) < 2e-4
