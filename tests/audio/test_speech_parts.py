"""The speech objectives' parts: span masks, distractors, the diversity loss, padding that never
changes a clip's loss, and losses that are exact across ranks (2 ranks x b = 1 rank x 2b)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from audio_helpers import objective
from framework.losses.speech import diversity_loss
from framework.modules.span_masking import sample_distractors, span_mask


@pytest.mark.parametrize("seed", range(20))
def test_masks_stay_inside_each_utterance_and_respect_the_span_counts(seed):
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 60, (6,), generator=generator)
    frames[0] = 3  # shorter than one span: masked whole
    mask = span_mask(frames, 64, mask_prob=0.4, mask_length=5, min_masks=2, generator=generator)
    for row, count in enumerate(frames.tolist()):
        assert not mask[row, count:].any(), "a mask covers padding"
        covered = int(mask[row].sum())
        if count == 0:
            assert covered == 0
        elif count <= 5:
            assert covered == count
        else:
            spans_most = min(max(int(0.4 * count / 5) + 1, 2), count - 4)
            assert min(5, count) <= covered <= spans_most * 5  # at least min_masks spans (overlapping: >= one span)


def test_mask_count_follows_mask_prob_on_average():
    """Spans of one frame never overlap: then the masked fraction is mask_prob (random rounding)."""
    generator = torch.Generator().manual_seed(0)
    frames = torch.full((2000,), 37)
    mask = span_mask(frames, 37, mask_prob=0.3, mask_length=1, min_masks=0, generator=generator)
    assert abs(mask.float().mean().item() - 0.3) < 0.005


def test_distractors_are_other_masked_frames_of_the_same_utterance():
    generator = torch.Generator().manual_seed(0)
    frames = torch.tensor([40, 25, 6, 0])
    mask = span_mask(frames, 40, 0.5, 4, 1, generator)
    mask[2] = False
    mask[2, 3] = True  # one masked frame: nothing to contrast with
    drawn = sample_distractors(mask, 7, generator)
    counts = mask.sum(1)
    assert drawn.shape == (4, int(counts.max()), 7)
    for row, m in enumerate(counts.tolist()):
        rows = drawn[row]
        assert (rows[m:] == -1).all(), "rows past an utterance's masked frames must be empty"
        if m < 2:
            assert (rows == -1).all()
            continue
        own = torch.arange(m)[:, None]
        assert ((rows[:m] >= 0) & (rows[:m] < m)).all(), "a distractor outside the utterance's masked frames"
        assert (rows[:m] != own).all(), "a frame is its own distractor"


def test_diversity_loss_reaches_its_extremes():
    groups, entries = 2, 8
    uniform = torch.full((groups, entries), 5.0)
    one_hot = torch.zeros(groups, entries)
    one_hot[:, 3] = 40.0
    assert diversity_loss(uniform).item() == pytest.approx(0.0, abs=1e-6)
    assert diversity_loss(one_hot).item() == pytest.approx((groups * entries - groups) / (groups * entries))
    half = torch.zeros(groups, entries)
    half[:, :4] = 1.0
    assert diversity_loss(uniform) < diversity_loss(half) < diversity_loss(one_hot)


def clips(lengths: list[int], seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    wave = torch.zeros(len(lengths), max(lengths))
    for row, n in enumerate(lengths):
        wave[row, :n] = torch.randn(n, generator=generator)
    return {"wave": wave, "length": torch.tensor(lengths)}


def test_padding_never_changes_a_clips_frames_or_loss():
    """A clip alone and the same clip padded in a batch with a longer one: the same encoder frames,
    and with the same masks, distractors and noise, the same per-frame wav2vec 2.0 losses."""
    module = objective()
    alone, batch = clips([5000]), clips([5000, 8000])
    batch["wave"][0] = torch.nn.functional.pad(alone["wave"][0], (0, 3000))
    frames_alone, valid_alone = module.encoder.encode(alone["wave"], alone["length"])
    frames_batch, valid_batch = module.encoder.encode(batch["wave"], batch["length"])
    n = int(valid_alone.sum())
    assert int(valid_batch[0].sum()) == n and not valid_batch[0, n:].any()
    torch.testing.assert_close(frames_batch[0, :n], frames_alone[0, :n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.encoder(batch["wave"], batch["length"])[0],
                               module.encoder(alone["wave"], alone["length"])[0], rtol=1e-5, atol=1e-5)

    drawn_batch = module.draw(batch, torch.Generator().manual_seed(1))
    mask_alone = drawn_batch["mask"][:1, : valid_alone.shape[1]]
    m = int(mask_alone.sum())
    drawn_alone = {"mask": mask_alone, "distractors": drawn_batch["distractors"][:1, :m],
                   "gumbel": drawn_batch["gumbel"][:m]}
    module.loss(batch, drawn_batch, gather=False)
    per_frame_batch = module._per_frame[:m].clone()
    module.loss(alone, drawn_alone, gather=False)
    torch.testing.assert_close(module._per_frame, per_frame_batch, rtol=1e-5, atol=1e-5)


def test_hubert_frames_without_targets_never_reach_the_loss():
    module = objective(name="hubert")
    batch = clips([4000, 6000])
    frames = module.encoder.frame_lengths(batch["length"])
    batch["targets"] = torch.randint(0, 6, (2, int(frames.max())))
    batch["targets"][0, int(frames[0]):] = -1
    drawn = module.draw(batch, torch.Generator().manual_seed(0))
    base = module.loss(batch, drawn, gather=False)
    changed = {**batch, "targets": batch["targets"].clone()}
    changed["targets"][0, int(frames[0]):] = 5  # labels beyond the clip's frames: padding
    changed["wave"] = batch["wave"].clone()
    torch.testing.assert_close(module.loss(changed, drawn, gather=False), base)
    changed["targets"][1, 0] = (batch["targets"][1, 0] + 1) % 6  # a real frame's label does count
    assert module.loss(changed, drawn, gather=False).item() != pytest.approx(base.item())


# ------------------------------------------------------------------ 2 ranks x b = 1 rank x 2b

LENGTHS = [3000, 5200, 4100, 6000]  # the global batch: rank r holds rows 2r and 2r + 1


def global_batch(name: str) -> tuple[dict, dict]:
    module = objective(name=name)
    batch = clips(LENGTHS, seed=3)
    frames = module.encoder.frame_lengths(batch["length"])
    if name == "hubert":
        batch["targets"] = torch.randint(0, 6, (len(LENGTHS), int(frames.max())), generator=torch.Generator().manual_seed(4))
    return batch, module.draw(batch, torch.Generator().manual_seed(5))


def rank_part(name: str, rank: int, world: int) -> tuple[dict, dict]:
    batch, drawn = global_batch(name)
    rows = slice(rank * len(LENGTHS) // world, (rank + 1) * len(LENGTHS) // world)
    part = {key: value[rows] for key, value in batch.items()}
    mine = {"mask": drawn["mask"][rows]}
    if "distractors" in drawn:
        masked = drawn["mask"].sum(1)
        first, last = int(masked[: rows.start].sum()), int(masked[: rows.stop].sum())
        mine["distractors"] = drawn["distractors"][rows, : int(masked[rows].max())]
        mine["gumbel"] = drawn["gumbel"][first:last]
    return part, mine


def step(name: str, rank: int, world: int) -> dict:
    module = objective(name=name)
    batch, drawn = rank_part(name, rank, world)
    value = module.loss(batch, drawn)
    value.backward()
    grads = {}
    for key, param in module.named_parameters():
        if param.grad is not None:
            grad = param.grad.clone()
            if world > 1:
                dist.all_reduce(grad)
            grads[key] = grad / world  # DDP's mean over ranks
    value = value.detach().clone()
    if world > 1:
        dist.all_reduce(value)
    return {"loss": value / world, "grads": grads}


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: step(name, rank, world) for name in ("wav2vec2", "hubert")}
        if rank == 0:
            torch.save(results, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    out = str(tmp_path / "ranks.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    two = torch.load(out, weights_only=False)
    for name in ("wav2vec2", "hubert"):
        one = step(name, 0, 1)
        assert math.isfinite(one["loss"].item())
        torch.testing.assert_close(two[name]["loss"], one["loss"], rtol=1e-5, atol=1e-6, msg=f"{name} loss")
        assert two[name]["grads"].keys() == one["grads"].keys() and one["grads"]
        for key, grad in one["grads"].items():
            torch.testing.assert_close(two[name]["grads"][key], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, key=key, name=name: f"{name} {key}: {m}")
    assert two["wav2vec2"]["grads"]["quantizer.logits.weight"].abs().sum() > 0  # the diversity loss reaches it
