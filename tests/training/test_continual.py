"""Continual pretraining: schedules that need no re-warming, and the tokenizer a run continues with."""
from __future__ import annotations

import math

import pytest

from framework.config.schema import OptimConfig
from framework.errors import ConfigError
from framework.training.optim import check_optim, lr_multiplier, warmup_cosine


def test_wsd_warms_up_holds_then_decays_linearly_over_its_last_fraction():
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1)
    curve = [lr_multiplier(step, cfg, 100) for step in range(101)]
    assert curve[:10] == [(s + 1) / 10 for s in range(10)]
    assert set(curve[10:80]) == {1.0}, "stable between warmup and the decay"
    assert curve[80] == 1.0 and curve[90] == pytest.approx(0.55) and curve[100] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(curve[80:], curve[81:])), "the decay only goes down"
    constant = OptimConfig(schedule="constant", warmup_steps=5)
    assert [lr_multiplier(s, constant, 50) for s in (0, 4, 5, 49)] == [0.2, 1.0, 1.0, 1.0]
    cosine = OptimConfig(warmup_steps=10)
    assert all(lr_multiplier(s, cosine, 100) == warmup_cosine(s, 10, 100, cosine.min_lr_ratio) for s in range(101))


def test_bad_schedules_are_named():
    with pytest.raises(ConfigError, match="optim.schedule: unknown schedule 'linear'"):
        check_optim(OptimConfig(schedule="linear"))
    with pytest.raises(ConfigError, match="optim.decay_fraction must be in"):
        check_optim(OptimConfig(schedule="wsd", decay_fraction=0.0))


def _objective(text_corpus, tokenizer, *overrides):
    from framework.config.load import config_to_dict, load_config
    from framework.objectives.clm import Objective
    from framework.objectives.text_common import tokenizer_facts
    from run_helpers import REPO

    cfg = load_config(str(REPO / "configs/experiments/gpt-tiny.yaml"), [
        f"data.tokenizer={tokenizer}", f"data.train={text_corpus['train']}", "model.dim=16", "model.depth=1", "model.heads=2",
        *overrides])
    vocab, special = tokenizer_facts(cfg)
    return cfg, Objective(config_to_dict(cfg), vocab, special)


def test_another_tokenizer_is_refused_unless_resize_vocab_carries_the_shared_rows(text_corpus, tmp_path):
    import shutil

    import torch

    from framework.text.tokenizer import load_tokenizer, train_tokenizer
    from framework.training.consolidate import consolidate
    from framework.training.continual import load_initial_weights

    _, old = _objective(text_corpus, text_corpus["tokenizer"])
    torch.save({"state_dict": old.state_dict(), "hyper_parameters": dict(old.hparams)}, tmp_path / "old.ckpt")
    consolidate(tmp_path / "old.ckpt", tmp_path / "old.safetensors")
    init = f"run.init_from={tmp_path / 'old.safetensors'}"

    copy = tmp_path / "same.json"  # the same vocabulary under another path continues as is
    shutil.copy(text_corpus["tokenizer"], copy)
    cfg, same = _objective(text_corpus, copy, init)
    assert load_initial_weights(same, cfg) == f"weights from {tmp_path / 'old.safetensors'}"
    assert torch.equal(same.model.embed.weight, old.model.embed.weight)

    prose = tmp_path / "prose"  # a new domain's words: tokens the old vocabulary lacks
    prose.mkdir()
    (prose / "notes.txt").write_text("zebrafish quokka xylophone marmalade lighthouse pelican " * 200)
    other = train_tokenizer([str(text_corpus["train"]), str(prose)], str(tmp_path / "other.json"), vocab_size=700)
    cfg, new = _objective(text_corpus, other, init)
    with pytest.raises(ConfigError, match=r"trained with tokenizer .*\(\d+ tokens\); data.tokenizer=.*other.json differs "
                                          r"\(700 tokens, \d+ shared\).*model.resize_vocab=true"):
        load_initial_weights(new, cfg)
    cfg, new = _objective(text_corpus, other, init, "model.resize_vocab=true")
    fresh = new.model.embed.weight.detach().clone()
    note = load_initial_weights(new, cfg)
    old_vocab, new_vocab = load_tokenizer(str(text_corpus["tokenizer"])).get_vocab(), load_tokenizer(other).get_vocab()
    shared = [t for t in new_vocab if t in old_vocab]
    only_new = [t for t in new_vocab if t not in old_vocab]
    assert f"{len(shared)} of 700 tokens carried over" in note and shared and only_new
    for token in shared[:50]:
        assert torch.equal(new.model.embed.weight[new_vocab[token]], old.model.embed.weight[old_vocab[token]])
    for token in only_new[:20]:
        assert torch.equal(new.model.embed.weight[new_vocab[token]], fresh[new_vocab[token]])

    # the same through `pretrain fit`: the resized model trains on the new tokenizer's blocks
    from run_helpers import REPO, metric_rows, run_cli

    from framework.data.writers.text import write_text_shards

    write_text_shards([str(prose)], str(tmp_path / "prose-shards"), workers=1)
    run_dir = tmp_path / "run"
    output = run_cli(["fit", "--config", str(REPO / "configs/experiments/gpt-tiny.yaml"), f"data.train={tmp_path / 'prose-shards'}", "data.val=null",
                      f"data.tokenizer={other}", init, "model.resize_vocab=true", "model.dim=16", "model.depth=1",
                      "model.heads=2", "data.seq_len=32", "data.batch_size=4", "data.num_workers=0", "trainer.devices=1",
                      "trainer.max_steps=2", "trainer.checkpoint_every_steps=2", "logging.wandb=disabled", f"run.dir={run_dir}"])
    assert f"{len(shared)} of 700 tokens carried over" in output
    losses = [r["train/loss"] for r in metric_rows(run_dir) if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)


def test_named_validation_sets_are_logged_set_by_set(text_corpus, tmp_path):
    from run_helpers import REPO, metric_rows, run_cli

    run_dir = tmp_path / "run"
    run_cli(["fit", "--config", str(REPO / "configs/experiments/gpt-tiny.yaml"), f"data.train={text_corpus['train']}",
             f"data.val={{old: {text_corpus['val']}, new: {text_corpus['train']}}}", f"data.tokenizer={text_corpus['tokenizer']}",
             "data.seq_len=32", "data.batch_size=4", "data.num_workers=0", "model.dim=32", "model.depth=1", "model.heads=2",
             "trainer.devices=1", "trainer.max_steps=4", "trainer.val_every_steps=2", "trainer.val_batches=2",
             "trainer.checkpoint_every_steps=4", "optim.schedule=wsd", "logging.wandb=disabled", f"run.dir={run_dir}"])
    validated = [r for r in metric_rows(run_dir) if any(k.startswith("val/") for k in r)]
    assert [r["step"] for r in validated] == [2, 4]
    for row in validated:
        assert {"val/old/loss", "val/old/ppl", "val/new/loss", "val/new/ppl"} <= set(row) and "val/loss" not in row
        assert row["val/old/loss"] != row["val/new/loss"], "two sets, two figures"
        assert row["health/rankme"] >= 1 and row["health/feature_std"] > 0  # the text encoder's health, too


def test_validation_set_names_are_checked():
    from framework.data.loader import val_set_names
    from framework.errors import DataError

    assert val_set_names("some/dir") == [] and val_set_names({"old": "a", "new": "b"}) == ["old", "new"]
    with pytest.raises(DataError, match="set names must be non-empty and have no '/'"):
        val_set_names({"a/b": "x"})
