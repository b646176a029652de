"""CLIP end to end: padding never reaches a text feature; a 2-process run resumes exactly and is
evaluated online (zero-shot, retrieval, probes) and by the commands; the logit scale stays under
its cap; towers start from other runs' checkpoints and a locked one stays bit-identical; sharded
strategies give DDP's losses; bad inputs get one clear line."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clip_helpers import RESNET, TINY, VIT, data_overrides, metric_rows, objective, run_cli
from framework.errors import ConfigError

STEPS, HALF = 6, 3


def fit_args(shards: dict, run_dir: Path, *extra: str) -> list[str]:
    return [
        "fit", *data_overrides(shards), "data.batch_size=16", "data.num_workers=0", "trainer.devices=2",
        f"trainer.max_steps={STEPS}", f"trainer.val_every_steps={HALF}", "trainer.val_batches=-1",
        f"trainer.checkpoint_every_steps={HALF}", "trainer.log_every_steps=1", "optim.lr=3e-3", "optim.warmup_steps=2",
        "objective.zeroshot.classes=[zero,one,two,three,four,five,six,seven,eight,nine]",
        "logging.wandb=disabled", "logging.progress=false", f"run.dir={run_dir}", *extra,
    ]


# ---------------------------------------------------------------- the text tower


@pytest.mark.parametrize("causal, pool", [(True, "eot"), (True, "mean"), (False, "eot"), (False, "mean")])
def test_padding_never_reaches_the_text_feature(causal, pool):
    module = objective(f"objective.text.causal={str(causal).lower()}", f"objective.text.pool={pool}").eval()
    tokens = torch.randint(3, 64, (2, 12))
    lengths = torch.tensor([5, 9])
    other = tokens.clone()
    for row, n in enumerate(lengths):
        other[row, n:] = torch.randint(3, 64, (12 - n,))  # different "padding" after the real tokens
    with torch.no_grad():
        a, b = module.encode_text(tokens, lengths), module.encode_text(other, lengths)
        alone = module.encode_text(tokens[:1, :5], lengths[:1])  # the first caption without any padding
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:1], alone, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a[0], a[1])


def test_zero_shot_and_retrieval_on_a_known_example():
    from framework.evaluate.zeroshot import class_embeddings, retrieval_recall, zeroshot_accuracy

    table = {"a cat": [1.0, 0.0, 0.0], "a dog": [0.0, 1.0, 0.0], "the cat": [0.8, 0.0, 0.6], "the dog": [0.0, 0.6, 0.8]}
    classes = class_embeddings(lambda texts: torch.tensor([table[t] for t in texts]), ["cat", "dog"], ["a {}", "the {}"])
    torch.testing.assert_close(classes[0], torch.nn.functional.normalize(torch.tensor([0.9, 0.0, 0.3]), dim=0))
    images = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.9], [0.1, 1.0, 0.0]]), dim=1)
    assert zeroshot_accuracy(images, torch.tensor([0, 1, 0]), classes, top=(1, 2)) == pytest.approx({1: 2 / 3, 2: 1.0})
    # Images 0 and 1 are each nearest to the other's caption: misses at rank 1, hits at rank 2...
    texts = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.0, 1.0]])
    recall = retrieval_recall(torch.eye(3), texts, torch.tensor([7, 8, 9]), at=(1, 2))
    assert recall["i2t_r1"] == pytest.approx(1 / 3) and recall["i2t_r2"] == 1.0
    assert recall["t2i_r1"] == pytest.approx(1 / 3) and recall["t2i_r2"] == 1.0
    # ...unless their captions are the same words: then the other's caption is theirs too.
    same = retrieval_recall(torch.eye(3), texts, torch.tensor([7, 7, 9]), at=(1, 2))
    assert same["i2t_r1"] == 1.0 and same["t2i_r1"] == 1.0
    with pytest.raises(ConfigError, match="'{}'"):
        class_embeddings(lambda t: torch.zeros(len(t), 3), ["cat"], ["a photo"])


# ---------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def clip_run(pair_shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-run")
    run_cli(fit_args(pair_shards, root / "straight"))
    return root / "straight"


@pytest.mark.timeout(400)
def test_ddp_fit_resumes_exactly_and_evaluates_online(clip_run, pair_shards, tmp_path):
    rows = metric_rows(clip_run)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    for key in ("probe/zeroshot_top1", "probe/zeroshot_top5", "probe/retrieval_i2t_r1", "probe/retrieval_t2i_r10",
                "probe/knn_acc", "probe/linear_acc", "val/loss"):
        assert any(key in r for r in rows), key
    # stop at step 3 and resume elsewhere: the same end state, bit for bit (data position, views, scale)
    resumed = tmp_path / "resumed"
    output = run_cli(fit_args(pair_shards, resumed, f"run.resume={clip_run}/checkpoints/step-{HALF:08d}.ckpt"))
    assert "resuming from" in output
    end_a = torch.load(clip_run / f"checkpoints/step-{STEPS:08d}.ckpt", weights_only=False)["state_dict"]
    end_b = torch.load(resumed / f"checkpoints/step-{STEPS:08d}.ckpt", weights_only=False)["state_dict"]
    assert end_a.keys() == end_b.keys() and "logit_scale" in end_a
    for key, value in end_a.items():
        torch.testing.assert_close(end_b[key], value, msg=lambda m, key=key: f"{key}: {m}")


def test_load_clip_load_text_tower_and_load_backbone(clip_run):
    from framework import load_backbone, load_clip, load_text_tower

    clip = load_clip(clip_run)  # a run directory stands for its newest checkpoint
    images = torch.rand(3, 1, 8, 8)
    image = clip.encode_image(images)
    text = clip.encode_text(["a handwritten seven", "the digit 7", "x"])
    assert image.shape == text.shape == (3, 8)
    torch.testing.assert_close(image.norm(dim=1), torch.ones(3))
    assert 1 < clip.logit_scale <= 100
    tower, encoder = load_text_tower(clip_run)
    tokens, length = encoder("the digit 7")
    with torch.no_grad():
        torch.testing.assert_close(tower(torch.from_numpy(tokens)[None], torch.tensor([length]))[0], text[1])
    backbone = load_backbone(clip_run)  # the image tower, as a plain backbone
    with torch.no_grad():
        projected = torch.nn.functional.normalize(clip.objective.image_projection(backbone(images)), dim=1)
    torch.testing.assert_close(projected, image)


def test_eval_commands_print_zero_shot_and_recall(clip_run, pair_shards, capsys):
    from framework.cli import main

    main(["eval", "zeroshot", "--checkpoint", str(clip_run), "--classes", "zero,one,two,three,four,five,six,seven,eight,nine",
          "--templates", "a handwritten {}|the digit {}", f"data.val={pair_shards['val']}"])
    out = capsys.readouterr().out
    assert "zero-shot on 48 images: top-1 " in out and "top-5 " in out
    main(["eval", "retrieval", "--checkpoint", str(clip_run), f"data.val={pair_shards['val']}"])
    out = capsys.readouterr().out
    assert "retrieval over 48 pairs:" in out and "image -> text: R@1 " in out and "text -> image: R@1 " in out
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "zeroshot", "--checkpoint", str(clip_run), "--classes", "zero,one", f"data.val={pair_shards['val']}"])
    assert exit_info.value.code == 2 and "--classes names 2 classes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "retrieval", "--checkpoint", str(clip_run), "data.vall=x"])
    assert "unknown option 'data.vall=x'" in capsys.readouterr().err


# ---------------------------------------------------------------- the logit scale, towers from checkpoints, locking


def save_run(module, path: Path) -> Path:
    """A checkpoint file as `pretrain fit` writes one (weights + the run config)."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": {"config": dict(module.hparams["config"])}}, path)
    return path


@pytest.fixture(scope="module")
def init_checkpoints(pair_shards, tmp_path_factory) -> dict:
    """A 2-block ViT from a simclr run, and a clm run's text transformer on the pairs' tokenizer."""
    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    root = tmp_path_factory.mktemp("inits")
    torch.manual_seed(5)
    vision = load_config(None, ["objective.name=simclr", *VIT, "model.depth=2", "data.train=x", "data.image_size=8",
                                "data.channels=1", "objective.proj_hidden_dim=8", "objective.proj_dim=4"])
    text = load_config(None, ["objective.name=clm", "model.dim=16", "model.depth=1", "model.heads=2", "model.max_seq_len=64",
                              "data.train=x", f"data.tokenizer={pair_shards['tokenizer']}", "model.vocab_size=320"])
    return {
        "image": save_run(objective_module("simclr").Objective(config_to_dict(vision)), root / "simclr.ckpt"),
        "text": save_run(objective_module("clm").Objective(config_to_dict(text), 320, {}), root / "clm.ckpt"),
    }


def single_fit(shards: dict, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", *data_overrides(shards), "data.batch_size=16", "data.num_workers=0", "trainer.devices=1",
            "trainer.max_steps=4", "trainer.val_every_steps=4", "trainer.val_batches=1", "trainer.checkpoint_every_steps=4",
            "trainer.log_every_steps=1", "optim.warmup_steps=1", "logging.wandb=disabled", "logging.progress=false",
            f"run.dir={run_dir}", *extra]


@pytest.mark.timeout(300)
def test_logit_scale_never_exceeds_its_cap(pair_shards, tmp_path):
    run_cli(single_fit(pair_shards, tmp_path / "r", "objective.init_logit_scale=4.6", "optim.lr=0.5",
                       "objective.retrieval=false", "objective.probe.linear=false", "objective.probe.knn=false"))
    scales = [r["train/logit_scale"] for r in metric_rows(tmp_path / "r") if "train/logit_scale" in r]
    assert len(scales) == 4 and max(scales) <= 100.0 + 1e-4 and max(scales) > 99  # it pushed against the cap
    state = torch.load(tmp_path / "r/checkpoints/step-00000004.ckpt", weights_only=False)["state_dict"]
    assert float(state["logit_scale"]) <= math.log(100) + 1e-6


@pytest.mark.timeout(300)
def test_named_validation_sets_are_scored_set_by_set(pair_shards, tmp_path):
    run_cli(single_fit(pair_shards, tmp_path / "r", f"data.val={{held_out: {pair_shards['val']}, seen: {pair_shards['train']}}}",
                       "objective.zeroshot.classes=[zero,one,two,three,four,five,six,seven,eight,nine]",
                       "objective.probe.linear=false"))
    row = next(r for r in metric_rows(tmp_path / "r") if any(k.startswith("val/") for k in r))
    for name in ("held_out", "seen"):
        assert {f"val/{name}/loss", f"probe/{name}/zeroshot_top1", f"probe/{name}/retrieval_i2t_r1",
                f"probe/{name}/knn_acc"} <= set(row), sorted(row)
    assert "val/loss" not in row and row["val/held_out/loss"] != row["val/seen/loss"]


@pytest.mark.timeout(300)
def test_towers_from_checkpoints_and_a_locked_image_tower(pair_shards, init_checkpoints, tmp_path):
    from framework.config.load import load_config
    from framework.objectives import clip

    image_init, text_init = init_checkpoints["image"], init_checkpoints["text"]
    inits = [f"objective.image_init={image_init}", f"objective.text_init={text_init}"]
    simclr = torch.load(image_init, weights_only=False)["state_dict"]
    backbone = {k.removeprefix("backbone."): v for k, v in simclr.items() if k.startswith("backbone.")}
    clm = {k.removeprefix("model."): v for k, v in torch.load(text_init, weights_only=False)["state_dict"].items()}

    built, _ = clip.build(load_config(None, [*data_overrides(pair_shards), *inits]))
    assert built.cfg.model.depth == 2 and built.cfg.objective.text.vocab_size == 320  # the checkpoints' shapes
    for key, value in built.image_tower.state_dict().items():
        torch.testing.assert_close(value, backbone[key])
    for key, value in built.text_tower.transformer.state_dict().items():
        if key in clm:
            torch.testing.assert_close(value, clm[key])

    # LiT: 4 steps with the image tower locked: bit-identical; with its last block unlocked, only that moves
    for unlocked in (0, 1):
        run_dir = tmp_path / f"locked-{unlocked}"
        run_cli(single_fit(pair_shards, run_dir, *inits, "objective.lock_image=true",
                           f"objective.lock_image_unlocked_blocks={unlocked}", "optim.lr=1e-2"))
        state = torch.load(run_dir / "checkpoints/step-00000004.ckpt", weights_only=False)["state_dict"]
        tower = {k.removeprefix("image_tower."): v for k, v in state.items() if k.startswith("image_tower.")}
        changed = {k for k, v in tower.items() if not torch.equal(v, backbone[k])}
        text = {k.removeprefix("text_tower.transformer."): v for k, v in state.items() if k.startswith("text_tower.transformer.")}
        assert any(not torch.equal(v, clm[k]) for k, v in text.items() if k in clm), "the text tower learns"
        if unlocked == 0:
            assert changed == set(), changed
        else:
            assert changed and all(k.startswith(("blocks.1.", "norm.")) for k in changed), changed
    assert {k for k in tower if k.startswith("blocks.0.")}.isdisjoint(changed)


def test_bad_inputs_are_one_clear_line(pair_shards, init_checkpoints, tmp_path):
    from framework.config.load import load_config
    from framework.objectives import clip

    def build(*overrides):
        return clip.build(load_config(None, [*data_overrides(pair_shards), *overrides]))

    with pytest.raises(ConfigError, match="objective.loss must be one of clip, siglip"):
        build("objective.loss=infonce")
    with pytest.raises(ConfigError, match="objective.zeroshot.templates: 'a photo' has no"):
        build("objective.zeroshot.templates=[a photo]")
    with pytest.raises(ConfigError, match="data.tokenizer is required"):
        build("data.tokenizer=null")
    with pytest.raises(ConfigError, match="objective.image_init: .*clm.ckpt is a 'clm' run, not a vision one"):
        build(f"objective.image_init={init_checkpoints['text']}")
    with pytest.raises(ConfigError, match="objective.text_init: .*simclr.ckpt is a 'simclr' run"):
        build(f"objective.text_init={init_checkpoints['image']}")
    with pytest.raises(ConfigError, match="objective.text_init: checkpoint not found"):
        build(f"objective.text_init={tmp_path}/nope.ckpt")
    with pytest.raises(ConfigError, match="lock_image_unlocked_blocks needs objective.lock_image"):
        build("objective.lock_image_unlocked_blocks=1")


def test_an_empty_caption_is_a_bad_sample(pair_shards, tmp_path):
    import io
    import tarfile

    from clip_helpers import png
    from framework.data.pairs import CaptionEncoder, PairDecoder
    from framework.data.sources import Shard
    from framework.data.stream import ShardStream
    from framework.errors import DataError

    path = tmp_path / "pairs.tar"
    with tarfile.open(path, "w") as tar:
        for key, text in (("a", b"the digit 1"), ("b", b"  "), ("c", b"a handwritten two")):
            for ext, data in (("png", png(torch.zeros(8, 8, dtype=torch.uint8).numpy())), ("txt", text)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    decoder = PairDecoder(8, 1, CaptionEncoder(str(pair_shards["tokenizer"]), 12))
    stream = ShardStream([Shard(str(path), 3)], decoder, seed=0, endless=False, remainder="none")
    assert len(list(stream.reader_items(0, 1))) == 2 and stream.counters["skipped_samples"] == 1
    with pytest.raises(DataError, match="sample b: empty caption"):
        list(ShardStream([Shard(str(path), 3)], decoder, seed=0, endless=False, remainder="none",
                         on_error="raise").reader_items(0, 1))


# ---------------------------------------------------------------- strategies


@pytest.mark.timeout(900)
def test_strategies_and_accumulation_give_the_ddp_losses(pair_shards, tmp_path):
    """The same 4 steps under ddp, fsdp, deepspeed (CLIP: ZeRO-2; SigLIP, whose texts go round the
    ring of ranks: ZeRO-3), and CLIP with batches of 8 accumulated twice: the losses of batches of 16."""
    quiet = ["trainer.max_steps=4", "trainer.val_every_steps=4", "trainer.checkpoint_every_steps=4",
             "objective.retrieval=false", "objective.zeroshot.classes=[]", "objective.probe.linear=false",
             "objective.probe.knn=false"]
    runs = {
        ("clip", "ddp"): [], ("clip", "fsdp"): ["trainer.strategy=fsdp"],
        ("clip", "zero2"): ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=2"],
        ("clip", "ddp, 2 x 8"): ["data.batch_size=8", "trainer.accumulate_grad_batches=2"],
        ("siglip", "ddp"): [], ("siglip", "zero3"): ["trainer.strategy=deepspeed", "trainer.deepspeed.stage=3"],
    }
    losses = {}
    for (loss, name), extra in runs.items():
        run_dir = tmp_path / f"{loss}-{name.replace(' ', '')}"
        run_cli(fit_args(pair_shards, run_dir, f"objective.loss={loss}", *quiet, *extra), timeout=400)
        losses[loss, name] = [r["train/loss"] for r in metric_rows(run_dir) if "train/loss" in r]
    for (loss, name), got in losses.items():
        assert len(got) == 4 and got == pytest.approx(losses[loss, "ddp"], abs=1e-4), (loss, name, losses)
