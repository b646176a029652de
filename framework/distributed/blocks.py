"""Find a model's repeated blocks, and the per-block memory savers that every strategy shares.

Models know nothing of parallelism: a model class only declares ``repeated_blocks``, a tuple of
its block types (``Transformer.repeated_blocks = (TransformerBlock,)``). Anything under the
LightningModule that declares it is found here, whatever the objective or modality, so an
objective that holds a backbone and a projection head needs no strategy code either.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, List, Tuple, Type

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CHECKPOINTED = "_framework_checkpointed"


def repeated_block_types(root: nn.Module) -> Tuple[Type[nn.Module], ...]:
    """Every block type declared by ``root`` or one of its submodules."""
    types: List[Type[nn.Module]] = []
    for module in root.modules():
        for block_type in getattr(module, "repeated_blocks", ()) or ():
            if block_type not in types:
                types.append(block_type)
    return tuple(types)


def find_blocks(root: nn.Module) -> List[nn.Module]:
    """The outermost instances of the declared block types, in module order.

    Outermost, because a block nested in another block is already covered by the outer one
    (sharding or checkpointing it again would only add communication or recomputation)."""
    types = repeated_block_types(root)
    if not types:
        return []
    blocks: List[nn.Module] = []
    inside: set[int] = set()
    for module in root.modules():  # pre-order: a parent comes before its children
        if id(module) in inside:
            continue
        if isinstance(module, types):
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def _checkpointed_forward(forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to save, nothing to recompute
            return forward(*args, **kwargs)
        # Non-reentrant: works with FSDP2 and ZeRO-3 (their hooks gather the weights again
        # during recomputation) and with inputs that do not require grad.
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def apply_activation_checkpointing(root: nn.Module) -> int:
    """Recompute each block's forward in backward instead of keeping its activations.

    Patches the instance's ``forward`` rather than wrapping the module in a new one, so
    parameter names, state dicts and checkpoints stay identical with and without it."""
    blocks = find_blocks(root)
    for block in blocks:
        if not getattr(block, _CHECKPOINTED, False):
            block.forward = _checkpointed_forward(block.forward)
            setattr(block, _CHECKPOINTED, True)
    return len(blocks)


def compile_blocks(root: nn.Module) -> int:
    """``torch.compile`` each block in place (``nn.Module.compile`` keeps parameter names).

    Per block rather than the whole model: every block has the same graph, so one compilation
    serves all of them, and FSDP2/ZeRO-3 keep their per-block hooks outside compiled code."""
    blocks = find_blocks(root)
    for block in blocks:
        block.compile()
    return len(blocks)


def prepare_blocks(root: nn.Module, activation_checkpointing: bool, compile: bool) -> List[str]:
    """Apply the configured per-block memory/speed options; returns what was done (for the log)."""
    done: List[str] = []
    if not (activation_checkpointing or compile):
        return done
    types = repeated_block_types(root)
    names = ", ".join(t.__name__ for t in types) or "none declared"
    if activation_checkpointing:
        done.append(f"activation checkpointing on {apply_activation_checkpointing(root)} blocks ({names})")
    if compile:
        done.append(f"torch.compile on {compile_blocks(root)} blocks ({names})")
    return done
