"""Load a run config: compose YAML files, apply ``key=value`` overrides, validate against the schema.

The schema is chosen per run: ``objective.name`` picks the objective's ``Config`` and
``model.name`` (or the objective's ``default_model``) picks the model's config class, so a
key that only another objective knows (``objective.mask_prob`` under ``clm``) is rejected.
Every mistake becomes a one-line ``ConfigError`` naming the source and the dotted key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from framework.config.schema import RunConfig
from framework.errors import ConfigError
from framework.models import MODELS, model_config_class
from framework.objectives import OBJECTIVES, objective_module

COMMAND_LINE = "command line"
Source = tuple[str, dict]  # (label used in error messages, raw content)

# Names shown in "is not a valid <type>" messages, by omegaconf value node class.
_NODE_TYPES = {"IntegerNode": "int", "FloatNode": "float", "BooleanNode": "bool", "StringNode": "str"}


def load_config(config_path: str | None, overrides: list[str]) -> RunConfig:
    """Compose ``config_path`` (and its ``defaults``) with ``overrides``; return the resolved RunConfig."""
    sources = _compose(Path(config_path)) if config_path is not None else []
    sources.append((COMMAND_LINE, _parse_overrides(overrides)))
    where = f"in {config_path} or on the command line" if config_path else "on the command line"
    return _build(sources, where)


def compose_config(base: dict[str, Any], overrides: list[str], label: str) -> RunConfig:
    """``base`` (a config as a dict, named ``label`` in errors) with command-line ``overrides``."""
    sources = [(label, base), (COMMAND_LINE, _parse_overrides(overrides))]
    return _build(sources, f"in {label} or on the command line")


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Inverse of ``config_to_dict`` (e.g. for a checkpoint's saved hyperparameters), same validation."""
    return _build([("config dict", dict(data))], "in the config dict")


def _build(sources: list[Source], where: str) -> RunConfig:
    """Merge the sources onto the schema they select, check for missing values, resolve."""
    cfg = _schema_for(sources, where)
    for label, raw in sources:  # one at a time, so an error names the source it came from
        try:
            cfg = OmegaConf.merge(cfg, raw)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{label}: {_describe_merge_error(e, raw, cfg)}") from None

    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False))  # resolving would fail first
    if missing:
        raise ConfigError("; ".join(f"missing required value '{k}' (set it {where}: {k}=...)" for k in missing))
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve interpolation in '{e.full_key}': {_first_line(e)}") from None


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain nested dict with every interpolation resolved (for loggers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def config_to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML; ``load_config(path, [])`` gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))


# --- sources ------------------------------------------------------------------------------


def _compose(path: Path, chain: tuple[Path, ...] = ()) -> list[Source]:
    """The file's defaults (recursively, in list order), then the file itself: later wins."""
    if path.resolve() in [p.resolve() for p in chain]:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"cycle in config defaults: {cycle}")
    raw = _read_yaml(path)
    defaults = raw.pop("defaults", None) or []
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise ConfigError(f"{path}: 'defaults' must be a list of YAML file paths, got {defaults!r}")
    sources: list[Source] = []
    for entry in defaults:
        sources += _compose(_default_path(path, entry), (*chain, path))
    sources.append((str(path), raw))
    return sources


def _default_path(including: Path, entry: str) -> Path:
    # Relative to the including file's directory; the ".yaml" suffix may be left out.
    path = including.parent / entry
    if not path.is_file() and path.suffix not in (".yaml", ".yml"):
        path = path.with_name(path.name + ".yaml")
    if not path.is_file():
        raise ConfigError(f"{including}: default '{entry}' not found (looked for {path})")
    return path


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{line}: {e.problem or e.context}") from None
    except (yaml.YAMLError, OmegaConfBaseException, OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config: {_first_line(e)}") from None
    if not isinstance(loaded, DictConfig):
        kind = "a list" if isinstance(loaded, ListConfig) else type(loaded).__name__
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {kind}")
    return OmegaConf.to_container(loaded, resolve=False)


def _parse_overrides(overrides: list[str]) -> dict:
    parsed = OmegaConf.create()
    for item in overrides:  # one by one, so a parse error names the override
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            parsed.merge_with_dotlist([item])
        except yaml.MarkedYAMLError as e:
            raise ConfigError(f"{COMMAND_LINE}: cannot parse override '{item}': {e.problem}") from None
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"{COMMAND_LINE}: cannot parse override '{item}': {_first_line(e)}") from None
    return OmegaConf.to_container(parsed, resolve=False)


# --- schema -------------------------------------------------------------------------------


def _schema_for(sources: list[Source], where: str) -> DictConfig:
    """RunConfig with the chosen objective's and model's sections swapped in."""
    found = _last_set(sources, "objective")
    if found is None:
        raise ConfigError(
            f"objective.name is not set: set it {where} (objective.name=...); "
            f"known objectives: {', '.join(OBJECTIVES)}"
        )
    objective, label = found
    _check_known(objective, OBJECTIVES, "objective", label)
    module = objective_module(objective)

    model, label = _last_set(sources, "model") or (module.default_model, f"objective '{objective}'")
    _check_known(model, MODELS, "model", label)

    cfg = OmegaConf.structured(RunConfig)
    cfg.objective = OmegaConf.structured(module.Config)
    cfg.model = OmegaConf.structured(model_config_class(model))
    OmegaConf.set_struct(cfg, True)  # unknown keys fail instead of being added
    # ...except in free-form pass-through mappings, which their readers validate themselves.
    OmegaConf.set_struct(cfg.trainer.deepspeed.extra, False)  # framework/distributed/deepspeed.py
    return cfg


def _last_set(sources: list[Source], section: str) -> tuple[str, str] | None:
    """``(<section>.name, label of the source that set it)`` from the last source setting it."""
    found = None
    for label, raw in sources:
        node = raw.get(section)
        if isinstance(node, dict) and node.get("name") not in (None, "???"):
            found = (str(node["name"]), label)
    return found


def _check_known(name: str, known: dict, what: str, label: str) -> None:
    if name not in known:
        raise ConfigError(
            f"{label}: unknown {what} '{name}'{_did_you_mean(name, list(known))}; "
            f"known {what}s: {', '.join(known)}"
        )


def _missing_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(node)]
    else:
        return [prefix] if node == "???" else []
    return [key for sub, value in items for key in _missing_keys(value, sub)]


# --- error messages -----------------------------------------------------------------------


def _describe_merge_error(e: OmegaConfBaseException, raw: dict, cfg: DictConfig) -> str:
    key = e.full_key
    if isinstance(e, ConfigKeyError) and key and isinstance(e.parent_node, DictConfig):
        prefix = key.rpartition(".")[0]
        valid = [f"{prefix}.{k}" if prefix else str(k) for k in e.parent_node.keys()]
        return f"unknown key '{key}'{_did_you_mean(key, valid)}"
    if isinstance(e, ValidationError) and key and e.parent_node is not None:
        return f"{key}: {e.value!r} is not a valid {_expected_type(e)}"
    # omegaconf gives no key when a whole section is replaced by a scalar or list.
    for name, value in raw.items():
        if isinstance(cfg.get(name), DictConfig) and not isinstance(value, (dict, type(None))):
            return f"'{name}' must be a mapping of keys, got {value!r}"
    return _first_line(e)


def _expected_type(e: OmegaConfBaseException) -> str:
    parent = e.parent_node
    if isinstance(parent, ListConfig):  # a list element, e.g. optim.betas[1]
        element = parent._metadata.element_type
        return getattr(element, "__name__", str(element))
    node = parent._get_node(e.key) if isinstance(parent, DictConfig) else None
    return _NODE_TYPES.get(type(node).__name__, "value")


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
