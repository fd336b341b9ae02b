"""A site declared cuda/rocm trains on a GPU or stops saying why; the CPU only when the config says so."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from fedhpc.training import devices
from fedhpc.training.devices import DeviceError, pick_device
from fedhpc.training.distributed import World
from tests.workflow_util import BIN, env, tiny_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these tests need a machine without a GPU")


def test_a_cuda_site_on_a_machine_without_gpu_stops_naming_the_site_what_it_saw_and_what_to_do(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["training"]["device"] = "auto"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    status = tmp_path / "status.json"
    proc = subprocess.run(
        [str(BIN / "fedhpc"), "train", "--config", str(tmp_path / "c.json"), "--round", "0", "--site", "a100"]
        + ["--threads", "1", "--status", str(status)],
        capture_output=True,
        text=True,
        env={**env(), "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    err = proc.stderr
    assert proc.returncode == 1, err
    assert "fedhpc train: error: site 'a100' declares accelerator 'cuda' (training.device: auto)" in err
    assert f"runs a torch without GPU support. The job sees: torch {torch.__version__} (a CPU-only build)" in err
    assert "CUDA_VISIBLE_DEVICES=''" in err and "ROCR_VISIBLE_DEVICES" in err
    for advice in ("the site's cuda image", "--nv", "GPU partition", "gres: gpu:N", "set training.device: cpu"):
        assert advice in err, advice
    assert "Traceback" not in err and not status.exists()  # stopped before any training


@pytest.mark.parametrize(
    "choice, accelerator",
    [("cpu", "rocm"), ("cpu", "cuda"), ("cpu", "cpu"), ("auto", "cpu")],
)
def test_the_cpu_trains_a_site_only_when_the_config_says_so(choice, accelerator):
    assert pick_device(choice, "s", accelerator, World()) == torch.device("cpu")


def test_device_cuda_puts_even_a_cpu_site_on_a_gpu_or_stops():
    with pytest.raises(DeviceError, match=r"site 'laptop' must train on a GPU \(training.device: cuda\)"):
        pick_device("cuda", "laptop", "cpu", World())


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this torch was built for `family` and sees `count` GPUs."""

    def pretend(family: str | None, count: int) -> None:
        monkeypatch.setattr(torch.version, "hip", "6.2.41133" if family == "rocm" else None)
        monkeypatch.setattr(torch.version, "cuda", "12.4" if family == "cuda" else None)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    for name in devices.VISIBLE_DEVICE_VARIABLES + ("LOCAL_WORLD_SIZE",):
        monkeypatch.delenv(name, raising=False)
    return pretend


def test_a_rocm_site_whose_job_sees_no_gpu_is_told_about_rocm_visibility(gpus, monkeypatch):
    gpus("rocm", 0)
    monkeypatch.setenv("ROCR_VISIBLE_DEVICES", "")
    with pytest.raises(DeviceError) as info:
        pick_device("auto", "lumi", "rocm", World())
    msg = str(info.value)
    assert "site 'lumi' declares accelerator 'rocm' (training.device: auto), but its job sees no GPU" in msg
    assert "(built for ROCm 6.2.41133), 0 GPU(s) visible; CUDA_VISIBLE_DEVICES unset, ROCR_VISIBLE_DEVICES=''" in msg
    assert "--rocm" in msg and "standard-g" in msg and "--nv" not in msg


def test_a_site_in_the_other_familys_image_is_stopped_even_with_gpus_in_view(gpus):
    gpus("cuda", 4)
    with pytest.raises(DeviceError, match="runs a torch built for cuda, not rocm.*correct sites.lumi.accelerator"):
        pick_device("auto", "lumi", "rocm", World())
    # `cuda` asks for any GPU: simulating a rocm site on an NVIDIA machine is allowed.
    assert pick_device("cuda", "lumi", "rocm", World(1, 2, 1, "slurm")) == torch.device("cuda", 1)


def test_each_rank_takes_its_own_gpu_and_ranks_sharing_one_are_stopped(gpus, monkeypatch):
    gpus("cuda", 4)
    assert [pick_device("auto", "a", "cuda", World(r, 8, r % 4, "slurm")).index for r in range(8)] == [0, 1, 2, 3] * 2
    with pytest.raises(DeviceError, match="has local rank 5 .* sees only 4 GPUs"):
        pick_device("auto", "a", "cuda", World(5, 8, 5, "slurm"))
    gpus("cuda", 1)  # srun with one GPU per task: each task's only GPU is its device 0
    assert pick_device("auto", "a", "cuda", World(3, 4, 3, "slurm")) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's ranks all see the one GPU
    with pytest.raises(DeviceError, match="starts 2 ranks on one node, which share 1 GPU.*ranks_per_node at most 1"):
        pick_device("auto", "a", "cuda", World(1, 2, 1, "torchrun"))
