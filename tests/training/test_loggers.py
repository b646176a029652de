"""The W&B run id file: every rank of a run, starting at the same moment, reads the same id."""
from __future__ import annotations

import multiprocessing as mp
import re
from pathlib import Path

from framework.training.loggers import WANDB_ID_FILE, wandb_run_id

RANKS = 6
ROUNDS = 40


def _rank(root: str, barrier, queue) -> None:
    for round_ in range(ROUNDS):
        barrier.wait()  # all ranks ask for the id of a fresh run directory at once
        queue.put((round_, wandb_run_id(Path(root) / f"run{round_}")))


def test_ranks_starting_together_read_one_complete_id(tmp_path):
    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(RANKS), ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(str(tmp_path), barrier, queue)) for _ in range(RANKS)]
    for p in procs:
        p.start()
    ids = {}
    for _ in range(RANKS * ROUNDS):
        round_, run_id = queue.get(timeout=120)
        ids.setdefault(round_, set()).add(run_id)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(len(seen) == 1 for seen in ids.values()), {r: s for r, s in ids.items() if len(s) > 1}
    assert all(re.fullmatch(r"[0-9a-f]{12}", next(iter(seen))) for seen in ids.values()), ids
    assert len({next(iter(seen)) for seen in ids.values()}) == ROUNDS, "each run has an id of its own"
    for round_ in range(ROUNDS):  # nothing left behind but the id file
        assert [p.name for p in (tmp_path / f"run{round_}").iterdir()] == [WANDB_ID_FILE]


def test_the_last_step_has_its_row_whatever_log_every_steps_is(text_corpus, tmp_path):
    """log_every_steps=2: a run to step 5, then resumed to 7, logs its loss at 2, 4, 5, 6, 7."""
    from run_helpers import REPO, metric_rows, run_cli

    run_dir = tmp_path / "run"
    common = ["fit", "--config", str(REPO / "configs/experiments/gpt-tiny.yaml"), f"data.train={text_corpus['train']}",
              f"data.val={text_corpus['val']}", f"data.tokenizer={text_corpus['tokenizer']}", "data.seq_len=32",
              "data.batch_size=4", "data.num_workers=0", "model.dim=32", "model.depth=1", "model.heads=2", "trainer.devices=1",
              "trainer.log_every_steps=2", "trainer.val_every_steps=100", "trainer.checkpoint_every_steps=100",
              "logging.wandb=disabled", f"run.dir={run_dir}"]
    run_cli([*common, "trainer.max_steps=5"])
    assert [r["step"] for r in metric_rows(run_dir) if "train/loss" in r] == [2, 4, 5]
    run_cli([*common, "trainer.max_steps=7"])
    assert [r["step"] for r in metric_rows(run_dir) if "train/loss" in r] == [2, 4, 5, 6, 7]
