"""Fast, single-process checks of the strategy layer's pieces."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from framework.config.schema import OptimConfig, RunConfig
from framework.distributed.blocks import apply_activation_checkpointing, find_blocks, repeated_block_types
from framework.models.transformer import Transformer, TransformerBlock, TransformerConfig
from framework.training.callbacks.throughput import count_flops_per_sample, gpu_peak_flops
from framework.training.checkpoint import commit, list_checkpoints, newest_checkpoint, prune
from framework.training.optim import resolve_lr, scaled_lr


def tiny(depth: int = 2) -> Transformer:
    return Transformer(TransformerConfig(dim=32, depth=depth, heads=2, max_seq_len=64), vocab_size=128, causal=True)


class Objective(nn.Module):
    """Shaped like an SSL objective: a backbone and a projection head, no strategy code."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny(depth=3)
        self.head = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))


def test_blocks_are_found_through_the_declaration_only():
    objective = Objective()
    assert repeated_block_types(objective) == (TransformerBlock,)
    assert find_blocks(objective) == list(objective.model.blocks)


def test_activation_checkpointing_keeps_names_outputs_and_gradients():
    torch.manual_seed(0)
    plain, checkpointed = tiny(), tiny()
    checkpointed.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(checkpointed) == 2
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 128, (2, 16))
    for model in (plain, checkpointed):
        model.logits(model(tokens)).square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_learning_rate_scaling_from_the_reference_batch():
    optim = OptimConfig(lr=1e-3, reference_batch_size=256)
    assert scaled_lr(dataclasses.replace(optim, scale_rule="none"), 1024) == 1e-3
    assert scaled_lr(dataclasses.replace(optim, scale_rule="linear"), 1024) == pytest.approx(4e-3)
    assert scaled_lr(dataclasses.replace(optim, scale_rule="sqrt"), 1024) == pytest.approx(2e-3)
    cfg = RunConfig()
    cfg.optim = dataclasses.replace(optim, scale_rule="linear")
    cfg.data.batch_size, cfg.trainer.devices, cfg.trainer.num_nodes, cfg.trainer.accumulate_grad_batches = 8, 4, 2, 4
    built, line = resolve_lr(cfg)
    assert built.optim.lr == pytest.approx(1e-3) and built.optim.scale_rule == "none"  # 8*4*2*4 = 256
    assert line.startswith("global batch 256 = 8 per device x 4 devices x 2 nodes x 4 accumulation")
    assert cfg.optim.lr == 1e-3 and cfg.optim.scale_rule == "linear", "the user's config is left as written"


def test_commit_and_keep_last(tmp_path: Path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (100, 200, 300):
        tmp = folder / f".tmp-step-{step:08d}.ckpt"
        tmp.mkdir()
        (tmp / "shard").write_text(str(step))
        assert newest_checkpoint(tmp_path) is None or newest_checkpoint(tmp_path).name != tmp.name
        commit(tmp, folder / f"step-{step:08d}.ckpt")
        prune(tmp_path, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000200.ckpt", "step-00000300.ckpt"]
    # Saving a step again replaces it only once the new one is complete.
    tmp = folder / ".tmp-step-00000300.ckpt"
    tmp.write_text("new")
    commit(tmp, folder / "step-00000300.ckpt")
    assert (folder / "step-00000300.ckpt").read_text() == "new"
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000200.ckpt", "step-00000300.ckpt"]


def test_flops_counted_on_the_real_model_match_the_transformer_formula():
    from framework.losses.language import next_token_loss

    class Clm(nn.Module):  # the CLM objective's training_step, without Lightning
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny(depth=4)
            self.device = torch.device("cpu")

        def training_step(self, tokens, batch_idx):
            loss = next_token_loss(self.model.logits(self.model(tokens)), tokens)
            self.log("train/loss", loss)
            return loss

        def log(self, *args, **kwargs):
            raise AssertionError("logging is silenced while counting")

    objective = Clm()
    length, dim, depth, vocab = 64, 32, 4, 128
    counted = count_flops_per_sample(objective, torch.randint(0, vocab, (8, length)))
    # 3 x forward; forward per sample = 2 T (12 L d^2 + V d) matmuls + 4 L T^2 d attention.
    formula = 3 * (2 * length * (12 * depth * dim**2 + vocab * dim) + 4 * depth * length**2 * dim)
    assert counted == pytest.approx(formula, rel=0.01)


def test_peak_flops_table():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "32") == 156e12
    assert gpu_peak_flops("Some Future GPU", "bf16-mixed") is None
