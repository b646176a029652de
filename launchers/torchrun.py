"""``pretrain launch torchrun``: the torchrun command for one box (standalone) or several (c10d).

One box::

    python -m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=P --max-restarts=K \
        -m framework.cli fit --config C [overrides] trainer.devices=P trainer.num_nodes=1

Several (run the same command on every node, each with its --node-rank)::

    python -m torch.distributed.run --nnodes=N --nproc-per-node=P --node-rank=R --rdzv-backend=c10d \
        --rdzv-endpoint=HOST:PORT --rdzv-id=ID [--rdzv-conf=is_host=1|0] --max-restarts=K \
        -m framework.cli fit --config C [overrides] trainer.devices=P trainer.num_nodes=N

``--max-restarts K``: when a worker dies, torchrun stops the others and starts the group again
(at most K times); the new workers resume from the newest checkpoint (``run.resume=auto``)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import zlib
from typing import List, Optional, Sequence

from launchers.common import layout_overrides, validated_config, without_keys

# After a restart (--max-restarts), workers of the new round would read the previous round's
# addresses from torchrun's shared store (same keys, no per-round prefix) and fail to connect
# (gloo "Connection refused") when they look before the new workers wrote theirs. With the
# store sharing off, each round's rank 0 hosts a fresh store.
ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def rdzv_id_for(run_dir: str) -> str:
    """The same on every node (it depends only on run.dir), different for different runs."""
    return f"pretrain-{zlib.crc32(os.path.abspath(run_dir).encode()) & 0xFFFFFFFF:08x}"


def torchrun_command(
    config: str,
    overrides: Sequence[str],
    *,
    nnodes: int,
    nproc_per_node: int,
    run_dir: str,
    node_rank: Optional[int] = None,
    rdzv_endpoint: Optional[str] = None,
    max_restarts: int = 0,
    python: str = sys.executable,
) -> List[str]:
    command = [python, "-m", "torch.distributed.run"]
    if nnodes == 1 and rdzv_endpoint is None:
        command += ["--standalone", "--nnodes=1"]
    else:
        if rdzv_endpoint is None:
            raise ValueError("several nodes need --rdzv-endpoint HOST:PORT (the same on every node)")
        command += [f"--nnodes={nnodes}"]
        if node_rank is not None:
            command += [f"--node-rank={node_rank}"]
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id_for(run_dir)}"]
        if node_rank is not None:
            # Node 0 hosts the rendezvous store; said explicitly so that several "nodes" on one
            # host (or an endpoint given as a name) do not both try to host it.
            command += [f"--rdzv-conf=is_host={1 if node_rank == 0 else 0}"]
    command += [f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"]
    command += ["-m", "framework.cli", "fit", "--config", config]
    command += [*without_keys(overrides, ("trainer.devices", "trainer.num_nodes")), *layout_overrides(nproc_per_node, nnodes)]
    return command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="experiment YAML")
    parser.add_argument("--nnodes", type=int, default=None, help="nodes (default: trainer.num_nodes)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: trainer.devices)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (multi-node; node 0 hosts the rendezvous)")
    parser.add_argument("--rdzv-endpoint", default=None, help="HOST:PORT of node 0, the same on every node (multi-node)")
    parser.add_argument("--max-restarts", type=int, default=0, help="restart the worker group at most K times after a failure")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from framework.errors import ConfigError

    cfg = validated_config(args.config, args.overrides)
    nnodes = args.nnodes or cfg.trainer.num_nodes
    nproc = args.nproc_per_node or cfg.trainer.devices
    if nnodes < 1 or nproc < 1 or args.max_restarts < 0:
        raise ConfigError("--nnodes and --nproc-per-node must be at least 1, --max-restarts at least 0")
    if nnodes > 1 and not args.rdzv_endpoint:
        raise ConfigError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node)")
    # Validate with the layout the workers will get (the strategy may depend on it).
    validated_config(args.config, [*args.overrides, *layout_overrides(nproc, nnodes)])
    command = torchrun_command(
        args.config, args.overrides, nnodes=nnodes, nproc_per_node=nproc, run_dir=cfg.run.dir,
        node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts,
    )
    if args.dry_run:
        print(" ".join(f"{k}={v}" for k, v in ENV.items()), shlex.join(command))
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, {**os.environ, **ENV})  # torchrun takes this process's place: signals reach it directly
