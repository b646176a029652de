"""``trainer.strategy=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) per repeated block.

Built on Lightning's ``ModelParallelStrategy`` (FSDP2 + DTensor; it accepts CPU/gloo, unlike
the FSDP1 ``FSDPStrategy``) for process launch, sharded (DCP) checkpoints and optimizer
setup. Two things differ from using it directly:

* the sharding is applied here, not in the objective: ``connect`` installs a ``configure_model``
  hook on the LightningModule that Lightning calls at the usual point (after the process group,
  before the optimizer), so objectives stay free of parallelism code;
* the device mesh is 1-D (full sharding) or 2-D ``(replicate, shard)`` for hybrid sharding,
  instead of Lightning's ``(data_parallel, tensor_parallel)`` mesh meant for tensor parallelism.

Each rank holds 1/shard_size of every parameter, gradient and optimizer state. Gradient
clipping stays correct: the gradients are DTensors, so ``clip_grad_norm_`` reduces the norm
over all shards before scaling.
"""
from __future__ import annotations

import types
from typing import Any, Dict

from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from framework.config.schema import FSDPConfig
from framework.distributed.blocks import find_blocks
from framework.errors import ConfigError

_ORIGINAL_HOOK = "_framework_configure_model"
# LightningModule methods that run the model: FSDP gathers the outer unit around each call.
STEP_METHODS = ("training_step", "validation_step", "test_step", "predict_step")


def reshard_all(module: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.reshard()


class FSDP2Strategy(ModelParallelStrategy):
    strategy_name = "fsdp"

    def __init__(self, options: FSDPConfig) -> None:
        super().__init__(save_distributed_checkpoint=True)  # each rank writes its own shard (DCP)
        self.options = options
        self.sharded_blocks = 0

    # -- setup ------------------------------------------------------------------------
    def connect(self, model: LightningModule) -> None:  # type: ignore[override]
        super().connect(model)
        install_sharding_hook(model, self)

    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self._setup_distributed()  # Lightning's: accelerator device, ranks, process group (gloo/nccl)
        world = self.world_size
        shard = self.options.shard_size or world
        if world % shard:
            raise ConfigError(f"trainer.fsdp.shard_size={shard} does not divide the world size {world}")
        if shard == world:
            self._device_mesh = init_device_mesh(self.root_device.type, (world,), mesh_dim_names=("shard",))
        else:  # HSDP: dim 0 replicates (gradients all-reduced), dim 1 shards
            self._device_mesh = init_device_mesh(
                self.root_device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard")
            )
        self._data_parallel_size, self._tensor_parallel_size = world, 1
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> Dict[str, Any]:
        # Every rank is a data-parallel replica (the mesh only says how weights are split).
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    # -- sharding ---------------------------------------------------------------------
    def shard(self, module: LightningModule) -> None:
        """fully_shard every repeated block, then the objective itself as the outer unit.

        Blocks first: each becomes its own all-gather/reduce-scatter unit, so only one block's
        full weights exist at a time. The objective's unit holds every other parameter
        (embeddings, heads, mask tokens, an EMA teacher's stem). Its step methods are
        registered as FSDP forward methods, so those parameters are gathered for the whole
        step, whatever the objective calls on its submodules (``model.logits``, an encoder's
        ``patchify``...), and resharded after backward.

        Frozen blocks (an EMA teacher's) are sharded like the trained ones, so an EMA update is
        element-wise on matching local shards; having no backward, they reshard after forward."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

        offload = CPUOffloadPolicy() if self.options.cpu_offload else OffloadPolicy()
        mesh = self.device_mesh
        blocks = find_blocks(module)
        for block in blocks:
            trained = any(p.requires_grad for p in block.parameters())
            reshard = self.options.reshard_after_forward or not trained
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
        fully_shard(module, mesh=mesh, offload_policy=offload)
        for method in STEP_METHODS:
            if callable(getattr(module, method, None)):
                register_fsdp_forward_method(module, method)
        self.sharded_blocks = len(blocks)
        if not blocks:
            # Still correct (one unit for the whole objective) but every rank gathers the whole model.
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn("trainer.strategy=fsdp: no module declares `repeated_blocks`; the model is one FSDP unit")

    def lightning_module_state_dict(self) -> Dict[str, Any]:
        # After a validation (no backward) the outer unit may still hold gathered weights;
        # checkpoints are written from the shards.
        reshard_all(self.lightning_module)
        return super().lightning_module_state_dict()

    def describe(self) -> str:
        o = self.options
        kind = f"hybrid: sharded within groups of {o.shard_size} ranks, replicated across" if o.shard_size else "sharded over all ranks"
        return (
            f"FSDP2 fully_shard per repeated block, {kind}"
            + ("" if o.reshard_after_forward else ", blocks kept gathered after forward")
            + (", CPU offload" if o.cpu_offload else "")
        )


def install_sharding_hook(module: LightningModule, strategy: FSDP2Strategy) -> None:
    """Give ``module`` a ``configure_model`` that shards it, keeping any the objective defines.

    Lightning runs ``configure_model`` inside the strategy's init contexts at the right time
    and ``ModelParallelStrategy`` insists on it, so the strategy provides it per instance."""
    if getattr(module, _ORIGINAL_HOOK, None) is not None:
        return
    original = module.configure_model  # the objective's own (e.g. building layers lazily), or the no-op default
    setattr(module, _ORIGINAL_HOOK, original)

    def configure_model(self: LightningModule) -> None:
        original()
        if not any(_is_fsdp(m) for m in self.modules()):  # Lightning may call it again (e.g. validate after fit)
            strategy.shard(self)

    module.configure_model = types.MethodType(configure_model, module)  # type: ignore[method-assign]


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def check_fsdp(options: FSDPConfig, world_size: int, cpu: bool) -> None:
    if options.cpu_offload and cpu:
        raise ConfigError(
            "trainer.fsdp.cpu_offload needs a GPU: it moves shards between GPU and CPU memory, and on CPU "
            "they are in CPU memory already"
        )
    if options.shard_size < 0:
        raise ConfigError(f"trainer.fsdp.shard_size must be >= 0 (0 = all ranks), not {options.shard_size}")
    if options.shard_size and world_size % options.shard_size:
        raise ConfigError(
            f"trainer.fsdp.shard_size={options.shard_size} must divide the number of ranks "
            f"(trainer.devices x trainer.num_nodes = {world_size})"
        )


__all__ = ["FSDP2Strategy", "check_fsdp", "install_sharding_hook"]
