"""Every strategy on 2 CPU processes (gloo): same losses, exact resume, crash-safe saves,
consolidation to plain weights, and clear errors for bad options.

One 20-step run per strategy (module fixture) from the same seed and data; the other tests
reuse its checkpoints (saved at steps 10 and 20) and its probe outputs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from framework.config.load import config_from_dict, load_config
from framework.errors import ConfigError
from framework.models.transformer import Transformer
from framework.training.checkpoint import check_resume, newest_checkpoint, read_info
from framework.training.consolidate import consolidate, load_consolidated
from framework.training.fit import check_trainer

REPO = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("driver.py")
CONFIG = REPO / "configs/experiments/gpt-tiny.yaml"
STEPS = 20
# Absolute, on losses of about 6. The strategies compute the same fp32 math but reduce
# gradients in different orders (all-reduce, reduce-scatter, bucketed partitions), so they
# may differ in the last bits; observed: <= 5e-7 after 20 steps.
LOSS_TOLERANCE = 1e-5

STRATEGIES = {
    "ddp": ["trainer.strategy=ddp"],
    "fsdp": ["trainer.strategy=fsdp"],
    "zero1": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=1"],
    "zero2": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=2"],
    "zero3": ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"],
    # Recomputing blocks in backward must not change the numbers.
    "fsdp_checkpointed": ["trainer.strategy=fsdp", "trainer.activation_checkpointing=true"],
}


def corpus_overrides(corpus: dict) -> list[str]:
    return [f"data.train={corpus['train']}", f"data.val={corpus['val']}", f"data.tokenizer={corpus['tokenizer']}"]


def small_run(corpus: dict, run_dir: Path, *overrides: str) -> list[str]:
    return [
        *corpus_overrides(corpus), "data.seq_len=32", "data.batch_size=4", "data.num_workers=1",
        "model.dim=32", "model.depth=2", "model.heads=2", "trainer.devices=2", f"trainer.max_steps={STEPS}",
        "trainer.val_every_steps=10", "trainer.val_batches=2", "trainer.checkpoint_every_steps=10",
        "trainer.log_every_steps=1", "optim.grad_clip=0.05",  # small: clipping is active at every step
        "logging.wandb=disabled", "logging.progress=false", f"run.dir={run_dir}", *overrides,
    ]


def launch(corpus: dict, run_dir: Path, *overrides: str, env: dict | None = None, expect_ok: bool = True):
    command = [sys.executable, str(DRIVER), str(CONFIG), *small_run(corpus, run_dir, *overrides)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **(env or {})}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=400, cwd=REPO)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def copy_checkpoint(source_run: Path, step: int, new_run: Path) -> Path:
    name = f"step-{step:08d}.ckpt"
    (new_run / "checkpoints").mkdir(parents=True)
    source = source_run / "checkpoints" / name
    target = new_run / "checkpoints" / name
    (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    if not source.is_dir():  # a checkpoint file travels with its ranks' own state files
        shutil.copytree(source.with_suffix(".ranks"), target.with_suffix(".ranks"))
    return target


@pytest.fixture(scope="module")
def runs(text_corpus, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("strategies")
    done = {}
    for name, overrides in STRATEGIES.items():
        run_dir = root / name
        launch(text_corpus, run_dir, *overrides, env={"PROBE_OUT": str(run_dir / "probe.pt")})
        done[name] = run_dir
    return done


@pytest.mark.timeout(900)
def test_losses_agree_across_strategies(runs):
    reference = losses(runs["ddp"])
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1], "the model learns"
    for name, run_dir in runs.items():
        got = losses(run_dir)
        assert sorted(got) == sorted(reference), name
        worst = max(abs(got[s] - reference[s]) for s in reference)
        assert worst <= LOSS_TOLERANCE, f"{name}: loss differs from ddp by up to {worst:.2e}"


@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_resume_continues_bit_for_bit(runs, text_corpus, tmp_path, name):
    run_dir = tmp_path / name
    copy_checkpoint(runs[name], 10, run_dir)
    output = launch(text_corpus, run_dir, *STRATEGIES[name])
    assert "resuming from step-00000010.ckpt" in output.stdout + output.stderr
    original, resumed = losses(runs[name]), losses(run_dir)
    assert sorted(resumed) == list(range(11, STEPS + 1))
    assert [resumed[s] for s in resumed] == [original[s] for s in resumed], "identical, not just close"


def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(runs, text_corpus, tmp_path):
    """FSDP (every rank writes a shard): all ranks die after writing step 20's shards, before
    the commit. Step 10 stays the newest checkpoint, and resuming from it is bit-exact."""
    run_dir = tmp_path / "crashed"
    copy_checkpoint(runs["fsdp"], 10, run_dir)
    crashed = launch(text_corpus, run_dir, *STRATEGIES["fsdp"], env={"CRASH_AT_SAVE": "20"}, expect_ok=False)
    assert crashed.returncode != 0
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".tmp-step-00000020.ckpt").is_dir(), "the crash happened mid-save"
    assert not (checkpoints / "step-00000020.ckpt").exists()
    assert newest_checkpoint(run_dir).name == "step-00000010.ckpt"
    assert read_info(newest_checkpoint(run_dir))["world_size"] == 2

    output = launch(text_corpus, run_dir, *STRATEGIES["fsdp"])  # run.resume=auto
    assert "resuming from step-00000010.ckpt" in output.stdout + output.stderr
    assert not (checkpoints / ".tmp-step-00000020.ckpt").exists(), "the stale temporary is cleaned up"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000010.ckpt", "step-00000020.ckpt"]
    original, resumed = losses(runs["fsdp"]), losses(run_dir)
    assert [resumed[s] for s in range(11, STEPS + 1)] == [original[s] for s in range(11, STEPS + 1)]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero1", "zero2", "zero3"])
def test_consolidated_weights_give_the_same_outputs_in_a_plain_model(runs, tmp_path, name):
    out = tmp_path / f"{name}.safetensors"
    consolidate(runs[name] / "checkpoints" / f"step-{STEPS:08d}.ckpt", out)
    state, hparams = load_consolidated(out)
    cfg = config_from_dict(hparams["config"])
    model = Transformer(cfg.model, hparams["vocab_size"], causal=True)  # no strategy, no Lightning
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    model.eval()
    probe = torch.load(runs[name] / "probe.pt")
    with torch.no_grad():
        logits = model.logits(model(probe["tokens"]))
    torch.testing.assert_close(logits, probe["logits"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["fsdp", "zero3"])
def test_sharded_checkpoints_export_to_what_their_run_computed(runs, tmp_path, name):
    """`pretrain export --format hf` of an FSDP or ZeRO-3 directory: transformers' model gives
    the logits the run itself computed at its end (as the ddp twin's export does)."""
    import transformers

    from framework.export.export import export

    for strategy in ("ddp", name):
        export(runs[strategy] / "checkpoints" / f"step-{STEPS:08d}.ckpt", "hf", tmp_path / strategy)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / strategy)).eval()
        probe = torch.load(runs[strategy] / "probe.pt")
        with torch.no_grad():
            torch.testing.assert_close(model(probe["tokens"]).logits, probe["logits"], rtol=0, atol=1e-5)


def test_resume_under_another_strategy_says_why_and_how(runs, text_corpus, tmp_path):
    sharded = runs["fsdp"] / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    with pytest.raises(ConfigError, match=r"strategy=fsdp on 2 ranks.*strategy fsdp -> deepspeed.*pretrain consolidate"):
        check_resume(sharded, {"strategy": "deepspeed", "world_size": 2, "deepspeed_stage": 3})
    check_resume(sharded, {"strategy": "fsdp", "world_size": 4, "deepspeed_stage": None})  # DCP reshards on load
    zero3 = runs["zero3"] / "checkpoints" / f"step-{STEPS:08d}.ckpt"
    with pytest.raises(ConfigError, match=r"\(ZeRO stage 3\).*world_size 2 -> 4.*partitioned per rank"):
        check_resume(zero3, {"strategy": "deepspeed", "world_size": 4, "deepspeed_stage": 3})
    with pytest.raises(ConfigError, match=r"deepspeed_stage 3 -> 2"):
        check_resume(zero3, {"strategy": "deepspeed", "world_size": 2, "deepspeed_stage": 2})
    # ... and the way it names works: consolidated ZeRO-3 weights start a 1-process run.
    weights = tmp_path / "zero3.safetensors"
    consolidate(runs["zero3"] / "checkpoints" / f"step-{STEPS:08d}.ckpt", weights)
    run_dir = tmp_path / "from_weights"
    launch(text_corpus, run_dir, "trainer.devices=1", "trainer.max_steps=2", f"run.init_from={weights}")
    fresh_first = losses(runs["ddp"])[1]
    assert losses(run_dir)[1] < fresh_first - 0.05, "starts from the trained weights, not from scratch"


def _config(corpus: dict, *overrides: str):
    return load_config(str(CONFIG), [*corpus_overrides(corpus), "trainer.devices=2", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.strategy=fsdp2"], r"trainer.strategy: unknown strategy 'fsdp2' \(known: auto, ddp, fsdp, deepspeed\)"),
        (["trainer.strategy=fsdp", "trainer.fsdp.shard_size=3"], r"trainer.fsdp.shard_size=3 must divide the number of ranks"),
        (["trainer.strategy=fsdp", "trainer.fsdp.cpu_offload=true", "trainer.accelerator=cpu"], r"trainer.fsdp.cpu_offload needs a GPU"),
        (["trainer.strategy=deepspeed", "trainer.deepspeed.stage=4"], r"trainer.deepspeed.stage must be 1, 2 or 3, not 4"),
        (["trainer.strategy=deepspeed", "trainer.deepspeed.offload_params=true"], r"offload_params needs trainer.deepspeed.stage=3"),
        (["trainer.strategy=deepspeed", "trainer.deepspeed.extra={gradient_clipping: 1.0}"], r"extra.gradient_clipping: set by the framework from optim.grad_clip"),
        (["trainer.strategy=deepspeed", "trainer.deepspeed.extra={zero_optimization: {stage: 3}}"], r"use trainer.deepspeed.stage instead"),
        (["trainer.strategy=deepspeed", "trainer.deepspeed.extra={zero_optimization: {reduce_bucket_sise: 5}}"], r"trainer.deepspeed.extra.zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"),
        (["trainer.strategy=deepspeed", "trainer.deepspeed.extra={zero_optimisation: {}}"], r"trainer.deepspeed.extra.zero_optimisation: not a DeepSpeed config key"),
        (["trainer.strategy=deepspeed", "optim.name=lamb"], r"optim.name=lamb with trainer.strategy=deepspeed: ZeRO flattens"),
        (["trainer.precision=16-mixed", "trainer.accelerator=cpu"], r"trainer.precision=16-mixed is not supported on CPU"),
        (["optim.scale_rule=cubic"], r"optim.scale_rule: unknown rule 'cubic'"),
    ],
)
def test_bad_strategy_options_fail_with_one_clear_message(text_corpus, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_trainer(_config(text_corpus, *overrides))


def test_bad_options_stop_the_command_before_any_process_starts(text_corpus, tmp_path):
    command = [sys.executable, "-m", "framework.cli", "fit", "--config", str(CONFIG), *corpus_overrides(text_corpus),
               "trainer.strategy=deepspeed", "trainer.deepspeed.stage=5", f"run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: trainer.deepspeed.stage must be 1, 2 or 3, not 5"
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ConfigError, match=r"unknown key .trainer.fsdp.cpu_ofload. \(did you mean .trainer.fsdp.cpu_offload.\?\)"):
        _config(text_corpus, "trainer.fsdp.cpu_ofload=true")
    with pytest.raises(ConfigError, match=r"trainer.fsdp.reshard_after_forward: 'maybe' is not a valid bool"):
        _config(text_corpus, "trainer.fsdp.reshard_after_forward=maybe")
