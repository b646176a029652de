"""``trainer.strategy=deepspeed``: ZeRO stage 1, 2 or 3 through Lightning's ``DeepSpeedStrategy``.

Lightning's strategy refuses any accelerator but CUDA. DeepSpeed itself runs ZeRO 1-3 on CPU
with its CPU accelerator (``DS_ACCELERATOR=cpu``, communication over gloo), so the subclass
below lifts only that check and the CUDA device-index check; on GPUs it is Lightning's code
path unchanged. The DeepSpeed config is generated from ``trainer.deepspeed`` (plus a validated
``extra`` dict); batch sizes, accumulation, clipping and precision come from the rest of the
config, as Lightning fills them in.

Gradient clipping is DeepSpeed's (``gradient_clipping``): it computes the norm over all
partitions, so it is correct under every stage.
"""
from __future__ import annotations

import argparse
import copy
import os
from typing import Any, Dict

from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed

from framework.config.schema import DeepSpeedConfig
from framework.errors import ConfigError

# Top-level DeepSpeed keys set from other parts of the run config (refused in ``extra``).
MANAGED_KEYS = {
    "train_batch_size": "data.batch_size",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "trainer.accumulate_grad_batches",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim.name",
    "scheduler": "optim.warmup_steps / optim.min_lr_ratio",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
    "amp": "trainer.precision",
    "torch_autocast": "trainer.precision",
}
# Other top-level keys that may be passed through ``extra``.
ALLOWED_KEYS = {
    "zero_optimization", "activation_checkpointing", "aio", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "flops_profiler",
    "comms_logger", "data_types", "checkpoint", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "sparse_gradients", "dump_state", "seq_parallel_communication_data_type",
}
# ZeRO keys set from ``trainer.deepspeed`` itself.
MANAGED_ZERO_KEYS = {"stage": "stage", "offload_optimizer": "offload_optimizer", "offload_param": "offload_params", "overlap_comm": "overlap_comm"}


def use_cpu_accelerator() -> None:
    """Select DeepSpeed's CPU accelerator; must happen before ``deepspeed`` is first imported.
    Set in ``os.environ`` so the rank processes Lightning launches inherit it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deepspeed_config(options: DeepSpeedConfig) -> Dict[str, Any]:
    """The DeepSpeed config dict for these options (Lightning adds batch, accumulation,
    clipping and precision when the trainer starts)."""
    zero: Dict[str, Any] = {
        "stage": options.stage,
        "overlap_comm": options.overlap_comm,
        "contiguous_gradients": True,
    }
    if options.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if options.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    config: Dict[str, Any] = {
        "zero_optimization": zero,
        # The optimizer is the framework's (AdamW with per-group weight decay), not DeepSpeed's.
        "zero_allow_untested_optimizer": True,
        # ...also when offloading: DeepSpeedCPUAdam would need a compiled extension.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the framework logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    return _merge(config, dict(options.extra))


def check_deepspeed(options: DeepSpeedConfig, optimizer_name: str) -> None:
    """Every mistake in ``trainer.deepspeed`` as one ConfigError naming the key."""
    if options.stage not in (1, 2, 3):
        raise ConfigError(f"trainer.deepspeed.stage must be 1, 2 or 3, not {options.stage!r}")
    if options.offload_params and options.stage != 3:
        raise ConfigError("trainer.deepspeed.offload_params needs trainer.deepspeed.stage=3 (only stage 3 partitions parameters)")
    if optimizer_name in ("lars", "lamb"):
        raise ConfigError(
            f"optim.name={optimizer_name} with trainer.strategy=deepspeed: ZeRO flattens each parameter group "
            "into one buffer, so a layer-wise trust ratio would be computed over the whole group; "
            "use trainer.strategy=fsdp or ddp for lars/lamb"
        )
    extra = dict(options.extra)
    for key, value in extra.items():
        if key in MANAGED_KEYS:
            raise ConfigError(f"trainer.deepspeed.extra.{key}: set by the framework from {MANAGED_KEYS[key]}; set that instead")
        if key not in ALLOWED_KEYS:
            raise ConfigError(
                f"trainer.deepspeed.extra.{key}: not a DeepSpeed config key the framework passes through "
                f"(allowed: {', '.join(sorted(ALLOWED_KEYS))})"
            )
    zero_extra = extra.get("zero_optimization", {})
    if not isinstance(zero_extra, dict):
        raise ConfigError(f"trainer.deepspeed.extra.zero_optimization must be a mapping, not {zero_extra!r}")
    for key in zero_extra:
        if key in MANAGED_ZERO_KEYS:
            raise ConfigError(
                f"trainer.deepspeed.extra.zero_optimization.{key}: use trainer.deepspeed.{MANAGED_ZERO_KEYS[key]} instead"
            )
    _validate_with_deepspeed(deepspeed_config(options)["zero_optimization"])


def _validate_with_deepspeed(zero: Dict[str, Any]) -> None:
    # DeepSpeed's own (pydantic) model knows every ZeRO key and type; ask it rather than copy it.
    use_cpu_accelerator_if_no_gpu()
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    except Exception as exc:  # pragma: no cover - a broken install
        raise ConfigError(f"trainer.strategy=deepspeed: cannot import deepspeed ({exc})") from None
    try:
        DeepSpeedZeroConfig(**zero)
    except Exception as exc:
        errors = getattr(exc, "errors", None)
        if callable(errors):
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise ConfigError(
                f"trainer.deepspeed.extra.zero_optimization.{where}: {first.get('msg')}"
            ) from None
        raise ConfigError(f"trainer.deepspeed.extra.zero_optimization: {exc}") from None


def _skip_inference_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (a C++ build of about a
    minute on a fresh machine) used only by ``inference_all_reduce``; training never calls it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def use_cpu_accelerator_if_no_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        use_cpu_accelerator()


class DeepSpeedAnyDeviceStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy, also on DeepSpeed's CPU accelerator (gloo)."""

    strategy_name = "deepspeed"

    def __init__(self, options: DeepSpeedConfig, **kwargs: Any) -> None:
        super().__init__(config=deepspeed_config(options), **kwargs)
        self.options = options

    def setup_environment(self) -> None:
        if isinstance(self.accelerator, CUDAAccelerator):
            return super().setup_environment()
        # Skip only DeepSpeedStrategy's "CUDA GPUs only" check; the rest is DDPStrategy's.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        if self.root_device.type == "cuda":
            return super().setup_distributed()
        # Lightning checks CUDA device indices against local ranks; CPU devices have no index.
        reset_seed()
        self.set_world_ranks()
        _skip_inference_shm_op()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model: Any, optimizer: Any, lr_scheduler: Any = None) -> Any:
        if self.root_device.type == "cuda":
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # As Lightning's, except the device rank: Lightning passes the CUDA device index, which a
        # CPU device does not have (DeepSpeed then fails comparing None >= 0).
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def describe(self) -> str:
        zero = self.config.get("zero_optimization", {}) if isinstance(self.config, dict) else {}
        parts = [f"DeepSpeed ZeRO stage {zero.get('stage')}"]
        if "offload_optimizer" in zero:
            parts.append("optimizer offloaded to CPU")
        if "offload_param" in zero:
            parts.append("parameters offloaded to CPU")
        return ", ".join(parts)
