"""Our wav2vec 2.0 training step next to HF transformers' ``Wav2Vec2ForPreTraining``, same config.

Both sides: the same conv layers, width, depth, heads, codebooks (G x V), final width,
distractors and span masks, pre-norm transformer blocks, group-norm conv encoder, no dropout,
the same padded batch of clips, AdamW, float32, the same number of CPU threads, in one process.
A step is forward + loss + backward + optimizer step; our side includes drawing its masks,
distractors and Gumbel noise, HF's side gets its masks and negatives drawn by its own helpers
before the timer starts. Rounds alternate between the two so that machine noise hits both.

    .venv/bin/python bench/audio.py                      # configs/models/audio-tiny.yaml's encoder
    .venv/bin/python bench/audio.py --batch 8 --seconds 4 --threads 2 --steps 10

Needs transformers (pip install -e '.[bench]').
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def our_step_fn(args, batch):
    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    cfg = load_config(str(REPO / "configs/experiments/wav2vec2-digits.yaml"),
                      ["data.train=unused", "model.dropout=0.0", f"objective.distractors={args.distractors}"])
    module = objective_module("wav2vec2").Objective(config_to_dict(cfg)).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step() -> float:
        drawn = module.draw(batch, generator)
        loss = module.loss(batch, drawn, gather=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return cfg, module, step


def hf_step_fn(cfg, batch, args):
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    m, o = cfg.model, cfg.objective
    config = Wav2Vec2Config(
        conv_dim=[layer[0] for layer in m.conv_layers], conv_kernel=[layer[1] for layer in m.conv_layers],
        conv_stride=[layer[2] for layer in m.conv_layers], conv_bias=m.conv_bias, feat_extract_norm="group",
        hidden_size=m.dim, num_hidden_layers=m.depth, num_attention_heads=m.heads,
        intermediate_size=int(m.dim * m.mlp_ratio), num_conv_pos_embeddings=m.pos_conv_kernel,
        num_conv_pos_embedding_groups=m.pos_conv_groups, do_stable_layer_norm=True,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        feat_quantizer_dropout=0.0, final_dropout=0.0, layerdrop=0.0, mask_time_prob=o.mask_prob,
        mask_time_length=o.mask_length, num_codevectors_per_group=o.codebook_entries,
        num_codevector_groups=o.codebooks, codevector_dim=o.final_dim, proj_codevector_dim=o.final_dim,
        num_negatives=o.distractors, contrastive_logits_temperature=o.temperature,
        diversity_loss_weight=o.diversity_weight,
    )
    model = Wav2Vec2ForPreTraining(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(batch["wave"].shape[1])))
    lengths = model._get_feat_extract_output_lengths(batch["length"])
    attention = (torch.arange(batch["wave"].shape[1])[None, :] < batch["length"][:, None]).long()
    frame_mask = (torch.arange(frames)[None, :] < lengths[:, None]).numpy()
    mask = _compute_mask_indices((len(lengths), frames), o.mask_prob, o.mask_length, attention_mask=torch.from_numpy(frame_mask),
                                 min_masks=o.min_masks)
    negatives = _sample_negative_indices((len(lengths), frames), o.distractors, mask_time_indices=mask)
    mask_t, negatives_t = torch.from_numpy(mask), torch.from_numpy(negatives)

    def step() -> float:
        out = model(batch["wave"], attention_mask=attention, mask_time_indices=mask_t, sampled_negative_indices=negatives_t)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    return model, step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=2.0, help="the longest clip; the others are 50-100%% of it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--distractors", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        raise SystemExit("bench/audio.py needs transformers: .venv/bin/pip install -e '.[bench]'") from None
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    longest = int(args.seconds * 16000)
    lengths = torch.linspace(longest // 2, longest, args.batch).long()
    wave = torch.randn(args.batch, longest) * (torch.arange(longest)[None, :] < lengths[:, None])
    batch = {"wave": wave, "length": lengths}
    cfg, ours, our_step = our_step_fn(args, batch)
    theirs, their_step = hf_step_fn(cfg, batch, args)
    params = {"ours": sum(p.numel() for p in ours.parameters()), "hf": sum(p.numel() for p in theirs.parameters())}
    for step in (our_step, their_step):  # warm-up
        step(), step()
    times = {"ours": [], "hf": []}
    for _ in range(args.rounds):
        for name, step in (("ours", our_step), ("hf", their_step)):
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - start) / args.steps)
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
    print(f"wav2vec 2.0 training step, batch {args.batch} clips of {args.seconds / 2:.1f}-{args.seconds:.1f} s, "
          f"{args.threads} CPU threads, float32; transformers {transformers.__version__}")
    print(f"model: conv {cfg.model.conv_layers}, dim {cfg.model.dim}, depth {cfg.model.depth}, "
          f"codebooks {cfg.objective.codebooks}x{cfg.objective.codebook_entries}, distractors {args.distractors}")
    print("| implementation | parameters | step (median of rounds) |")
    print("|---|--:|--:|")
    print(f"| ours (framework/objectives/wav2vec2.py) | {params['ours']:,} | {ours_s * 1000:.0f} ms |")
    print(f"| HF Wav2Vec2ForPreTraining | {params['hf']:,} | {hf_s * 1000:.0f} ms |")
    print(f"ours / HF: {ours_s / hf_s:.2f}x")
    return {"ours_s": ours_s, "hf_s": hf_s, "ratio": ours_s / hf_s}


if __name__ == "__main__":
    main()
