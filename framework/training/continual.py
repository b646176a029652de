"""Continual pretraining from a previous run's weights (``run.init_from``): the tokenizer must be
the old run's, since every embedding row is a token id. A different one is refused, naming both,
unless ``model.resize_vocab=true``: then the rows of the tokens both vocabularies share are
carried over by token string and the new tokens' rows keep their initialisation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from framework.errors import ConfigError

TOKEN_ROWS = ("model.embed.weight", "model.head.weight")


def _vocabulary(path: str) -> Optional[Dict[str, int]]:
    from framework.text.tokenizer import load_tokenizer

    return load_tokenizer(path).get_vocab() if path and Path(path).is_file() else None


def carry_shared_tokens(module: nn.Module, state: Dict[str, torch.Tensor], old: Dict[str, int], new: Dict[str, int]) -> int:
    """Rewrite the token rows of ``state`` for the new vocabulary (in place); returns the shared count."""
    current = module.state_dict()
    pairs = [(new_id, old[token]) for token, new_id in new.items() if token in old]
    for key in TOKEN_ROWS:
        if key in state and key in current:
            rows = current[key].detach().clone()
            for new_id, old_id in pairs:
                if new_id < rows.shape[0] and old_id < state[key].shape[0]:
                    rows[new_id] = state[key][old_id]
            state[key] = rows
    return len(pairs)


def load_initial_weights(module: nn.Module, cfg: Any) -> str:
    """Load ``run.init_from`` into a freshly built objective; returns what was done, for the log."""
    from framework.training.consolidate import load_consolidated

    path = cfg.run.init_from
    state, hparams = load_consolidated(path)
    old_tokenizer = (hparams.get("config") or {}).get("data", {}).get("tokenizer")
    new_tokenizer = getattr(cfg.data, "tokenizer", None)
    note = f"weights from {path}"
    if old_tokenizer and new_tokenizer and Path(old_tokenizer).resolve() != Path(new_tokenizer).resolve():
        old, new = _vocabulary(old_tokenizer), _vocabulary(new_tokenizer)
        if old is None:
            rank_zero_warn(f"run.init_from: {path} was trained with tokenizer {old_tokenizer}, which is not here: "
                           f"cannot check that data.tokenizer={new_tokenizer} is the same")
        elif old != new:
            shared = len(old.keys() & new.keys())
            if not getattr(cfg.model, "resize_vocab", False):
                raise ConfigError(
                    f"run.init_from: {path} was trained with tokenizer {old_tokenizer} ({len(old)} tokens); data.tokenizer="
                    f"{new_tokenizer} differs ({len(new)} tokens, {shared} shared): continue with the old tokenizer, or set "
                    "model.resize_vocab=true to carry the shared tokens' embeddings over (new tokens start from the initialisation)"
                )
            carry_shared_tokens(module, state, old, new)
            note += f", vocabulary resized: {shared} of {len(new)} tokens carried over by string"
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"run.init_from: {path} does not fit this objective/model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return note
