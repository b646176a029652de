"""Run logs: ``metrics.jsonl`` in the run directory, and W&B (offline without key or network)."""
from __future__ import annotations

import json
import netrc
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Dict, Mapping, Optional
from urllib.parse import urlparse

from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from framework.config.schema import LoggingConfig
from framework.errors import ConfigError

WANDB_ID_FILE = "wandb_run_id"


class JsonlLogger(Logger):
    """One JSON object per logged step: ``{"step": N, "<metric>": value, ...}``.

    ``step`` counts optimizer steps completed (Lightning hands loggers that count minus
    one), so it matches checkpoint names. Metrics of the same step share one row, except
    metrics that arrive after the row was written early (at a checkpoint): those go on a
    second row of that step, and values already written are not written again."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._step: Optional[int] = None
        self._row: Dict[str, float] = {}
        self._written_step: Optional[int] = None
        self._written: Dict[str, float] = {}

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the resolved config is saved as config.yaml in the run directory

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        step = None if step is None else step + 1
        if step != self._step:
            self._flush()
            self._step = step
        self._row.update({k: float(v) for k, v in metrics.items() if k != "epoch"})

    def _flush(self) -> None:
        if self._step is not None and self._step == self._written_step:
            self._row = {k: v for k, v in self._row.items() if self._written.get(k) != v}
        else:
            self._written_step, self._written = self._step, {}
        if self._row and self._step is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"step": self._step, **self._row}) + "\n")
            self._written.update(self._row)
        self._row = {}

    @rank_zero_only
    def flush(self) -> None:
        """Write the buffered row now."""
        self._flush()

    @rank_zero_only
    def save(self) -> None:
        pass  # a row is written once its step is complete (or at finalize)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._flush()


def write_row_before_checkpoint(trainer: Any, logger: JsonlLogger) -> None:
    """Writes the current step's row now, from inside ``on_train_batch_end``.

    Lightning hands a step's metrics to loggers only after every ``on_train_batch_end``, and
    checkpoints are committed in that hook: a rank killed between the two would take the
    checkpointed step's row with it, and the resumed run starts after that step."""
    connector = trainer._logger_connector  # no public API exposes the pending step metrics
    if not connector.should_update_logs:
        return
    metrics = convert_tensors_to_scalars(connector.metrics["log"])  # on-step values: no collective
    logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)  # as Lightning will
    logger.flush()


def drop_rows_after(path: Path, step: int) -> None:
    """On resume, forget rows logged after the checkpoint's step: they will be logged again."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(row + "\n" for row in rows))


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode(setting: str) -> str:
    """``auto`` becomes ``offline`` unless there is an API key and the server answers,
    so a run never hangs at start-up on a machine without network."""
    if setting not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"logging.wandb must be auto, online, offline or disabled, not {setting!r}")
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    if _has_wandb_key() and _reachable(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")):
        return "online"
    return "offline"


def wandb_run_id(run_dir: Path) -> str:
    """The W&B run id kept in the run directory, so a resumed run continues the same W&B run."""
    path = run_dir / WANDB_ID_FILE
    if not path.exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        # Ranks start together: write the id aside, then link it into place (atomic, and the
        # first link wins), so no rank can read the file between its creation and its write.
        draft = run_dir / f".{WANDB_ID_FILE}.{uuid.uuid4().hex}"
        draft.write_text(uuid.uuid4().hex[:12])
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: exclusive create, the first wins
            try:
                with open(path, "x") as f:
                    f.write(draft.read_text())
            except FileExistsError:
                pass
        finally:
            draft.unlink()
    return path.read_text().strip()


def make_wandb_logger(cfg: LoggingConfig, run_dir: Path, config: Dict[str, Any]) -> Optional[WandbLogger]:
    mode = wandb_mode(cfg.wandb)
    if mode == "disabled":
        return None
    os.environ["WANDB_MODE"] = mode  # ranks started later inherit the decision
    return WandbLogger(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.run_name or run_dir.name,
        id=wandb_run_id(run_dir),
        save_dir=str(run_dir),
        offline=mode == "offline",
        resume="allow",
        config=config,
    )
