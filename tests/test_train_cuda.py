"""The CUDA path of the train step, shown on a CPU where a CPU can show it (issue 13).

No GPU is needed: the device facts (compute capability, device count, GPU UUIDs, CUDA's absence)
are the inputs of small functions, and fp16 with its loss scaler runs on the CPU through
``GradScaler("cpu")`` (a stand-in for the CUDA scaler, named as such where it is used). What only a
GPU can show (speed, NCCL, memory) is measured by ``bench/gpu_check.sh``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from test_train import (  # noqa: F401 (no_slurm_env is an autouse fixture)
    make_features,
    new_run,
    no_slurm_env,
    subprocess_env,
)

from hpcpipe.config import from_dict
from hpcpipe.errors import ConfigError
from hpcpipe.run.metrics import MetricsWriter
from hpcpipe.runtime.env import ALLOW_CPU_ON_GPU_ALLOCATION, JobEnvironment
from hpcpipe.steps.train import checkpoint, data, dist, model, recipe
from hpcpipe.steps.train import run as train_run

REPO = Path(__file__).resolve().parents[1]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dataset") / "run"
    make_features(root)
    return root


def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.precision=fp16 trains in fp16 with an enabled loss scaler on the CPU too (a stand-in
    for a GPU: torch's CPU autocast and GradScaler("cpu") take the CUDA path's code)."""
    real = recipe.autocast_dtype

    def dtype(device: torch.device, precision: str) -> torch.dtype | None:
        return torch.float16 if precision == "fp16" else real(device, precision)

    monkeypatch.setattr(recipe, "autocast_dtype", dtype)


REAL_SAVE = checkpoint.save


def crash_after_checkpoint(monkeypatch: pytest.MonkeyPatch, after_step: int) -> None:
    real_save = REAL_SAVE

    def save(path: Path, state: dict) -> Path:
        out = real_save(path, state)
        if path.name == "last.pt" and state["global_step"] >= after_step:
            raise Crash(f"crash after step {state['global_step']}")
        return out

    monkeypatch.setattr(checkpoint, "save", save)


def test_resume_across_precisions_keeps_the_loss_scale(dataset: Path, tiny_model: Path,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 (scaler off) -> fp16 (scaler on) -> fp32 -> done: no "source state dict is empty",
    and the fp16 loss scale survives the fp32 leg."""
    settings = {"checkpoint_every": 4, "max_steps_per_epoch": 12, "num_workers": 1}
    layout, cfg32 = new_run(dataset, tmp_path / "run", tiny_model, precision="fp32", **settings)
    crash_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Crash):
        train_run(layout, cfg32, MetricsWriter(layout.metrics, "train"))
    assert checkpoint.load(checkpoint.last_path(layout.train))["scaler"] == {}

    fp16_on_cpu(monkeypatch)
    cfg16 = from_dict({"train": {**cfg32.to_dict()["train"], "precision": "fp16"}})
    crash_after_checkpoint(monkeypatch, 8)
    with pytest.raises(Crash):
        train_run(layout, cfg16, MetricsWriter(layout.metrics, "train"))
    scaled = checkpoint.load(checkpoint.last_path(layout.train))
    assert scaled["global_step"] == 8 and scaled["scaler"]["scale"] > 0, scaled["scaler"]

    crash_after_checkpoint(monkeypatch, 10**9)
    summary = train_run(layout, cfg32, MetricsWriter(layout.metrics, "train"))
    assert summary is not None
    done = checkpoint.load(checkpoint.last_path(layout.train))
    assert done["scaler"] == scaled["scaler"], "the fp16 loss scale is kept through fp32"


def test_scaler_state_round_trips_between_precisions() -> None:
    on = torch.amp.GradScaler("cpu", init_scale=1024.0)  # stand-in for the CUDA scaler
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert checkpoint.restore_scaler(on, {}) == {}, "an empty state starts a fresh scale"
    on.scale(torch.ones(()))
    on.update(1.0)  # a step, and a scale set by hand
    saved = checkpoint.scaler_state(on, {})
    assert saved["scale"] == 1.0
    kept = checkpoint.restore_scaler(off, saved)
    assert checkpoint.scaler_state(off, kept) == saved
    again = torch.amp.GradScaler("cpu")
    checkpoint.restore_scaler(again, checkpoint.scaler_state(off, kept))
    assert again.get_scale() == 1.0


@pytest.mark.parametrize(("environ", "gpus"), [
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ["0", "1"]),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "2,3"}, ["2", "3"]),
    ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "2"}, ["0", "1"]),
    ({"SLURM_JOB_ID": "7", "CUDA_VISIBLE_DEVICES": "NoDevFiles"}, []),
    ({"CUDA_VISIBLE_DEVICES": ""}, []),
    ({}, []),
])
def test_a_gpu_allocation_without_cuda_is_refused_unless_cpu_is_allowed(
        environ: dict[str, str], gpus: list[str]) -> None:
    job = JobEnvironment.from_environ(environ)
    assert job.allocated_gpus == gpus
    if gpus:
        with pytest.raises(dist.GpuError, match=ALLOW_CPU_ON_GPU_ALLOCATION) as err:
            dist.pick_device(job, cuda_available=False)
        assert "CUDA cannot use them" in str(err.value) and "CPU-only build" in str(err.value)
    else:
        assert dist.pick_device(job, cuda_available=False) == torch.device("cpu")
    allowed = JobEnvironment.from_environ({**environ, ALLOW_CPU_ON_GPU_ALLOCATION: "1"})
    assert dist.pick_device(allowed, cuda_available=False) == torch.device("cpu")


def test_the_train_job_on_gpus_cuda_cannot_use_fails_at_once(dataset: Path, tiny_model: Path,
                                                             tmp_path: Path) -> None:
    """The real job entry, with this machine's CPU-only torch as the broken CUDA."""
    layout, _ = new_run(dataset, tmp_path / "run", tiny_model, num_workers=1)
    env = {**subprocess_env(), "CUDA_VISIBLE_DEVICES": "0"}
    env.pop(ALLOW_CPU_ON_GPU_ALLOCATION, None)
    proc = subprocess.run([sys.executable, "-u", "-m", "hpcpipe.jobs.train", "--run-dir",
                           str(layout.root)], capture_output=True, text=True, env=env,
                          timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "GpuError" in out and "CUDA cannot use them" in out, out[-3000:]
    assert ALLOW_CPU_ON_GPU_ALLOCATION in out
    assert not checkpoint.last_path(layout.train).exists(), "nothing trained"


def test_each_rank_gets_a_gpu_of_its_own() -> None:
    assert [dist.gpu_index(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]  # each sees all
    assert [dist.gpu_index(r, 1, 4) for r in range(4)] == [0, 0, 0, 0]  # Slurm binds one each
    assert dist.gpu_index(1, 2, None) == 1
    with pytest.raises(dist.GpuError, match="ranks would share a GPU"):
        dist.gpu_index(2, 2, 4)  # 4 ranks, 2 GPUs visible to each
    with pytest.raises(dist.GpuError, match="ranks would share a GPU"):
        dist.gpu_index(0, 2, 4)
    dist.check_own_gpus([(0, "n1", "GPU-a"), (1, "n1", "GPU-b"), (2, "n2", "GPU-a")])
    with pytest.raises(dist.GpuError, match="ranks 0 and 1 both run on GPU GPU-a of n1"):
        dist.check_own_gpus([(0, "n1", "GPU-a"), (1, "n1", "GPU-a")])
    job = JobEnvironment.from_environ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4",
                                       "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
                                       "SLURM_NODEID": "1",
                                       "SLURM_STEP_TASKS_PER_NODE": "2(x2)"})
    assert dist.local_world_size(job) == 2
    assert dist.pick_device(job, cuda_available=True, device_count=2) == torch.device("cuda", 1)


def _rendezvous_rank(rank: int, folder: str) -> None:
    env = JobEnvironment.from_environ({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
                                       "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                                       "SLURM_JOB_NODELIST": "localhost"})
    torch.set_num_threads(1)
    world = dist.setup(env, Path(folder))
    try:
        assert world.backend == "gloo" and world.world_size == 2
        assert dist.all_reduce_sum(world, [rank + 1.0]) == [3.0]
    finally:
        dist.teardown()


def test_srun_ranks_meet_on_a_port_the_system_gave_rank_0(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No MASTER_PORT: rank 0's store takes a free port and the other rank reads it from the run
    folder; no port derived from the job id, which another job could hold."""
    monkeypatch.delenv("MASTER_PORT", raising=False)
    torch.multiprocessing.spawn(_rendezvous_rank, args=(str(tmp_path),), nprocs=2, join=True)
    assert not list(tmp_path.glob(".rendezvous-*")), "rank 0 removes the file once all joined"


def test_precision_auto_is_bf16_only_where_the_gpu_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100")
    for capability, auto in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                             ((7, 0), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=capability: c)
        assert model.autocast_dtype(gpu, "auto") is auto
        assert model.autocast_dtype(gpu, "fp16") is torch.float16
        assert model.autocast_dtype(gpu, "fp32") is None
    with pytest.raises(ConfigError, match=r"Tesla V100 \(compute capability 7.0\) has no native"):
        model.autocast_dtype(gpu, "bf16")
    cpu = torch.device("cpu")
    assert model.autocast_dtype(cpu, "auto") is None and model.autocast_dtype(cpu, "fp16") is None
    assert model.precision_name(torch.bfloat16) == "bf16" and model.precision_name(None) == "fp32"


def test_the_forecast_is_fp32_under_bf16_autocast(tiny_model: Path) -> None:
    torch.manual_seed(0)
    net = model.build_model(tiny_model, len(data.NUMERIC_NAMES), freeze_encoder=False)
    ids = torch.randint(0, 100, (4, 8))
    with model.autocast(torch.device("cpu"), torch.bfloat16):
        out = net(torch.randn(4, len(data.NUMERIC_NAMES)), ids, torch.ones_like(ids))
    assert out.dtype == torch.float32 and out.shape == (4, 2)  # log mean, log dispersion


def test_padding_widths_are_multiples_of_8(dataset: Path, tiny_model: Path,
                                           tmp_path: Path) -> None:
    from hpcpipe.run.layout import RunLayout

    layout = RunLayout(dataset)
    rows = data.load_rows(layout)
    tokens = data.token_cache(tmp_path, tiny_model, rows, 64, True, lambda: None)
    ds = data.ForecastDataset(range(len(rows)), rows.numeric, rows.target, rows.product, tokens)
    widths = {ds.__getitems__(list(range(i, i + 5))).arrays["input_ids"].shape[1]
              for i in range(0, 200, 5)}
    assert widths and all(w % 8 == 0 for w in widths), widths


# ---- the host out of the hot loop ------------------------------------------------------------

#: What makes the host wait for the device: reading a tensor's value, or synchronizing.
SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_training_loop_never_waits_for_the_device_between_checks(
        dataset: Path, tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        precision: str) -> None:
    """Every tensor read (``.item()``, ``float()``, ``bool()``...) and ``cuda.synchronize``
    during the training steps is counted: none in a step, and one stop check (one read of the
    divergence flag) per ``STOP_CHECK_EVERY`` steps. fp16 runs with its loss scaler (on the CPU:
    GradScaler("cpu"), a stand-in for CUDA's), whose fused-AdamW path must not read its flag.
    The encoder is fine-tuned, as configs/default.yaml does."""
    if precision == "fp16":
        fp16_on_cpu(monkeypatch)
    steps = 3 * recipe.STOP_CHECK_EVERY
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, precision=precision,
                          epochs=1, max_steps_per_epoch=steps, log_every=1000,
                          checkpoint_every=1000, num_workers=1, freeze_encoder=False)
    counts: dict[str, list[str]] = {"step": [], "loop": []}
    where = {"now": ""}

    def counting(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if where["now"]:
                frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}"
                          for f in traceback.extract_stack()[-6:-1]]
                # The loader seeds its workers from a CPU generator (once per epoch): no device.
                if not any(f.startswith("torch/utils/data/") for f in frames):
                    counts[where["now"]].append(name + " " + " < ".join(reversed(frames)))
            return real(*args, **kwargs)
        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counting("synchronize", torch.cuda.synchronize))
    real_step, real_epoch = recipe.TrainRecipe._train_step, recipe.TrainRecipe._train_epoch

    def step(self: recipe.TrainRecipe) -> None:
        outer, where["now"] = where["now"], "step"
        try:
            real_step(self)
        finally:
            where["now"] = outer

    def epoch(self: recipe.TrainRecipe) -> Any:
        where["now"] = "loop"
        try:
            return real_epoch(self)
        finally:
            where["now"] = ""

    checks = []
    real_agreed = dist.agreed_stop
    monkeypatch.setattr(recipe.TrainRecipe, "_train_step", step)
    monkeypatch.setattr(recipe.TrainRecipe, "_train_epoch", epoch)
    monkeypatch.setattr(dist, "agreed_stop", lambda *a: checks.append(1) or real_agreed(*a))
    train_run(layout, cfg, MetricsWriter(layout.metrics, "train"))
    # transformers' SDPA path asks whether the attention mask masks anything (``mask.all()``,
    # once per encoder forward) to pick the flash kernel: the encoder's, not the loop's; under
    # torch.compile (train.compile) it is traced away.
    ours = [c for c in counts["step"] if "transformers/masking_utils.py" not in c]
    assert ours == [], f"{len(ours)} device reads in {steps} steps: {ours[:3]}"
    assert len(counts["step"]) <= steps
    assert len(checks) == steps // recipe.STOP_CHECK_EVERY
    assert [c.split()[0] for c in counts["loop"]] == ["__bool__"] * len(checks), counts["loop"]


def test_torch_compile_trains_the_model(dataset: Path, tiny_model: Path, tmp_path: Path) -> None:
    """train.compile=true on the CPU (inductor with the system's C compiler), a few steps."""
    layout, cfg = new_run(dataset, tmp_path / "run", tiny_model, compile=True, epochs=1,
                          max_steps_per_epoch=3, num_workers=1, freeze_encoder=True)
    env = {**subprocess_env(), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, "-u", "-m", "hpcpipe.jobs.train", "--run-dir",
                           str(layout.root)], capture_output=True, text=True, env=env,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert layout.predictions.exists()
    assert os.path.getsize(checkpoint.best_path(layout.train)) > 0
