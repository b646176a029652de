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
