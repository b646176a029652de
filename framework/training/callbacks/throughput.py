"""Measures samples/s, tokens/s, step time, the share of it spent waiting for data, peak memory
per device and MFU (model FLOPs utilization).

MFU = model FLOPs per second per device / peak FLOPs of the device, where

* **model FLOPs per sample** = 3 x the forward FLOPs of the objective's ``training_step`` on one
  sample of the first batch, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the real
  model (matrix multiplies, attention, convolutions: what the counter knows). Backward is taken
  as 2x forward, the usual convention (Kaplan et al. 2020; PaLM's MFU): recomputation from
  activation checkpointing is *not* counted, so MFU stays comparable with it on or off. For a
  GPT that is ~6 N + 12 L d T FLOPs per token. The count runs once, without gradients and with
  the RNG states untouched; an objective may define ``flops_per_sample(batch) -> float`` instead.
* **peak FLOPs** = ``trainer.peak_flops`` if set, else the dense (no sparsity) tensor-core peak of
  the GPU from ``PEAK_FLOPS`` for the run's precision, else on CPU a measured matmul rate
  (an upper bound the model could reach on this machine, not a datasheet figure).
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import Any, Dict, Iterator, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

# Dense peak FLOP/s per GPU (vendor datasheets, no structured sparsity): (16-bit tensor core, fp32).
# fp32 uses the TF32 tensor-core peak where the GPU has one, as torch does with
# ``torch.backends.cuda.matmul.allow_tf32``; without it the plain fp32 peak is far lower.
PEAK_FLOPS: Dict[str, tuple[float, float]] = {
    "B200": (2250e12, 1100e12),
    "H200": (989e12, 494e12),
    "H100 SXM": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "GH200": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "A800": (312e12, 156e12),
    "L40S": (362e12, 183e12),
    "L40": (181e12, 90.5e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "A10": (125e12, 62.5e12),
    "A6000": (155e12, 77e12),
    "RTX 4090": (165e12, 82.6e12),
    "RTX 3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}


def gpu_peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Peak for a CUDA device name (e.g. "NVIDIA A100-SXM4-80GB"), longest matching key first."""
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):
        if key.lower() in device_name.lower():
            half, single = PEAK_FLOPS[key]
            return single if precision in ("32", "32-true") else half
    return None


def measured_cpu_flops(precision: str, size: int = 512, repeats: int = 4) -> float:
    """FLOP/s of a square matmul in the run's dtype on this process's threads."""
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _register_cpu_attention_flops() -> None:
    """torch's FLOP counter knows the CUDA attention kernels but not the CPU flash kernel that
    ``scaled_dot_product_attention`` runs on CPU; give it the same formula (4 B H T^2 d)."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_flash_attention(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _one_sample(batch: Any) -> Any:
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(batch, torch.Tensor, lambda t: t[:1] if t.ndim else t)


@contextlib.contextmanager
def _outer_unit_gathered(module: LightningModule) -> Iterator[None]:
    # Under FSDP2 the objective's own parameters are gathered around its step methods only;
    # an objective's flops_per_sample may call other methods. Duck-typed (FSDPModule API).
    unshard, reshard = getattr(module, "unshard", None), getattr(module, "reshard", None)
    if callable(unshard) and callable(reshard):
        unshard()
        try:
            yield
        finally:
            reshard()
    else:
        yield


def count_flops_per_sample(module: LightningModule, batch: Any) -> float:
    """3 x forward FLOPs of ``training_step`` on one sample (see the module docstring)."""
    own = getattr(module, "flops_per_sample", None)
    if callable(own):
        with _outer_unit_gathered(module):
            return float(own(batch))
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_attention_flops()
    sample = _one_sample(batch)
    quiet = {"log": lambda *a, **k: None, "log_dict": lambda *a, **k: None}
    saved = {name: module.__dict__.get(name) for name in quiet}
    module.__dict__.update(quiet)  # training_step logs; outside Lightning's loop that is an error
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else contextlib.nullcontext()
    devices = [module.device.index or 0] if module.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), stance:
            counter = FlopCounterMode(display=False)
            with counter:
                module.training_step(sample, 0)
            return 3.0 * counter.get_total_flops()
    finally:
        for name, value in saved.items():
            if value is None:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated memory of this rank's device: CUDA allocator peak, or on CPU the peak
    resident set of the process (which includes the Python runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


class Throughput(Callback):
    """Logs ``perf/*`` every ``trainer.log_every_n_steps`` optimizer steps (global figures:
    per-rank counts times world size). ``latest`` holds the last figures for the progress bar."""

    def __init__(self, peak_flops: float = 0.0) -> None:
        self.latest: Dict[str, float] = {}
        self.configured_peak_flops = peak_flops
        self.peak_flops: Optional[float] = None  # per device
        self.flops_per_sample: Optional[float] = None
        self._batches_started = 0
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._batch_end = now
        self._wait = 0.0
        self._samples = 0
        self._tokens = 0
        self._steps = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        precision = str(trainer.precision)
        if self.configured_peak_flops > 0:
            self.peak_flops, source = self.configured_peak_flops, "trainer.peak_flops"
        elif pl_module.device.type == "cuda":
            name = torch.cuda.get_device_name(pl_module.device)
            self.peak_flops, source = gpu_peak_flops(name, precision), f"table ({name})"
        else:
            self.peak_flops, source = measured_cpu_flops(precision), "measured matmul on CPU"
        if self.peak_flops:
            rank_zero_info(f"MFU against {self.peak_flops / 1e12:.3g} TFLOP/s per device ({source})")
        else:
            rank_zero_info("MFU not logged: unknown device peak; set trainer.peak_flops")
        self._reset(time.perf_counter())

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._wait += time.perf_counter() - self._batch_end  # the loader's time to hand over this batch
        # Counted at the second batch: the first step has set the strategy up completely
        # (FSDP2 initializes lazily from the first call of a step method).
        self._batches_started += 1
        if self.flops_per_sample is None and self._batches_started >= 2:
            counted_from = time.perf_counter()
            try:
                self.flops_per_sample = count_flops_per_sample(pl_module, batch)
            except Exception as exc:  # MFU is a report: never stop training over it
                rank_zero_info(f"MFU not logged: cannot count FLOPs ({type(exc).__name__}: {exc})")
                self.flops_per_sample = 0.0
            self._window_start += time.perf_counter() - counted_from  # not part of the step time
            if self.flops_per_sample:
                rank_zero_info(f"model FLOPs per sample (fwd+bwd): {self.flops_per_sample / 1e9:.4g} GFLOP")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._batch_end = now
        first = _first_tensor(batch)
        if first is not None:
            self._samples += first.shape[0]
            if isinstance(batch, torch.Tensor) and batch.ndim >= 2 and not batch.is_floating_point():
                self._tokens += batch.numel()
        if trainer.fit_loop._should_accumulate():
            return
        self._steps += 1
        if self._steps < trainer.log_every_n_steps:
            return
        elapsed = now - self._window_start
        world = trainer.world_size
        peak = torch.tensor(float(peak_memory_bytes(pl_module.device)), device=pl_module.device)
        peak = trainer.strategy.reduce(peak, reduce_op="max")  # the device closest to running out
        self.latest = {
            "perf/step_time_s": elapsed / self._steps,
            "perf/samples_per_s": self._samples * world / elapsed,
            "perf/data_wait_frac": self._wait / elapsed,
            "perf/peak_mem_gb": float(peak) / 2**30,
        }
        if self._tokens:
            self.latest["perf/tokens_per_s"] = self._tokens * world / elapsed
        if trainer.optimizers:  # the schedule's learning rate now (the first parameter group's)
            self.latest["optim/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        if self.flops_per_sample and self.peak_flops:
            per_device = self.flops_per_sample * self._samples / elapsed  # this rank's samples
            self.latest["perf/mfu"] = per_device / self.peak_flops
        pl_module.log_dict(self.latest, rank_zero_only=True)
        self._reset(now)
