"""Config checking: unknown keys and bad overrides become ONE readable error.

Every node with a ``_target_`` is checked against the target's signature (the signature is the
schema) before anything is instantiated; Hydra's own composition errors (a misspelled override, a
missing group option) are caught and rewritten with the valid keys or options listed.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = ["ConfigError", "validate", "check_overrides", "CONF_DIR", "INJECTED", "compose"]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
_SPECIAL = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# constructor arguments that experiments.run supplies itself (they are not config keys)
INJECTED = {"target": "the target model", "continuation": "the target's greedy continuation (per turn)",
            "target_tokenizer": "the target's tokenizer"}


class ConfigError(ValueError):
    """A config problem, with a message meant to be read by a person (no traceback needed)."""


def _locate(path: str):
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception as e:  # ImportError / AttributeError with Hydra's wrapping
        raise ConfigError(f"_target_ '{path}' cannot be imported: {e}") from None


def _params(obj) -> tuple[dict[str, inspect.Parameter], bool]:
    fn = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(fn)
    params = {n: p for n, p in sig.parameters.items() if n not in ("self", "cls")}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {n: p for n, p in params.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    return params, var_kw


def _walk(node, path: str):
    if isinstance(node, DictConfig):
        if node._is_missing() or node._is_none():
            return
        if "_target_" in node:
            yield path, node
        for k in node.keys():
            child = node._get_node(k)
            yield from _walk(child if isinstance(child, (DictConfig, ListConfig)) else None, f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        if node._is_missing() or node._is_none():
            return
        for i in range(len(node)):
            child = node._get_node(i)
            yield from _walk(child if isinstance(child, (DictConfig, ListConfig)) else None, f"{path}[{i}]")


def validate(cfg: DictConfig, sections: Iterable[str] | None = None) -> None:
    """Check every ``_target_`` node of ``cfg`` (or of the given top-level sections) against its
    target's signature: unknown keys, missing required arguments, unset ``???`` values."""
    roots = [(s, cfg._get_node(s)) for s in sections] if sections is not None else [("", cfg)]
    for root_path, root in roots:
        for path, node in _walk(root, root_path):
            target = node._get_node("_target_")._value()
            obj = _locate(str(target))
            params, var_kw = _params(obj)
            keys = [str(k) for k in node.keys() if k not in _SPECIAL]
            injected = [n for n in params if n in INJECTED and n not in keys]
            for k in keys:
                if k not in params and not var_kw:
                    valid = ", ".join(n for n in params if n not in INJECTED) or "(none)"
                    extra = f" (supplied by experiments.run: {', '.join(injected)})" if injected else ""
                    raise ConfigError(
                        f"unknown key '{path}.{k}' for {target}; valid keys: {valid}{extra}" + _suggest(k, params)
                    )
                if OmegaConf.is_missing(node, k):
                    raise ConfigError(f"'{path}.{k}' is required ({target}); set it with {path}.{k}=...")
            for n, p in params.items():
                if p.default is inspect.Parameter.empty and n not in keys and n not in INJECTED:
                    raise ConfigError(f"'{path}' ({target}) needs '{n}': add {path}.{n}=...")


def _suggest(key: str, options: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(options), n=1)
    return f". Did you mean '{close[0]}'?" if close else ""


def _group_options(group: str) -> list[str]:
    d = CONF_DIR / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _compose_raw(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides, return_hydra_config=return_hydra_config)


def compose(overrides: list[str], return_hydra_config: bool = False) -> DictConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` in-process (Hydra's compose API); errors
    come back as one :class:`ConfigError`."""
    try:
        return _compose_raw(overrides, return_hydra_config)
    except Exception as e:
        raise explain(e, overrides) from None


def explain(e: Exception, overrides: list[str]) -> ConfigError:
    """Rewrite a Hydra/OmegaConf composition error as one short message."""
    msg = str(e)
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(r"Key '([^']+)' is not in struct", msg)
    full = re.search(r"full_key: (\S+)", msg)
    key = full.group(1) if full else (m.group(1) if m else None)
    if key is not None and ("not in struct" in msg or "Could not override" in msg or "Could not append" in msg):
        parent, _, leaf = key.rpartition(".")
        valid = _valid_keys_after(parent, overrides)
        where = f" in '{parent}'" if parent else " at the top level"
        return ConfigError(f"unknown key '{key}'{where}; valid keys: {', '.join(valid)}" + _suggest(leaf, valid))
    m = re.search(r"Could not find '([^']+)/([^']+)'", msg) or re.search(r"In '[^']+': Could not find '([^']+)/([^']+)'", msg)
    if m:
        group, opt = m.group(1), m.group(2)
        opts = _group_options(group)
        return ConfigError(f"unknown {group} '{opt}'; choose one of: {', '.join(opts)}" + _suggest(opt, opts))
    first = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    return ConfigError(first)


def _valid_keys_after(parent: str, overrides: list[str]) -> list[str]:
    """Keys of node ``parent`` when the config is composed with the group choices of ``overrides``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keep = []
    try:
        for o in OverridesParser.create().parse_overrides(overrides):
            if not o.is_sweep_override() and (CONF_DIR / o.key_or_group).is_dir() and o.key_or_group != "hydra":
                keep.append(o.input_line)
    except Exception:
        keep = []
    try:
        cfg = _compose_raw(keep)
    except Exception:
        try:
            cfg = _compose_raw([])
        except Exception:
            return []
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return []
    return [str(k) for k in node.keys() if k not in _SPECIAL]


def first_point(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep (``a=1,2``, ``range``, ``choice``) cut to its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()))
            prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
            pkg = f"@{o.package}" if o.package else ""
            out.append(f"{prefix}{o.key_or_group}{pkg}={first}")
        else:
            out.append(o.input_line)
    return out


def check_overrides(args: list[str]) -> None:
    """Compose (and validate) the config a command line asks for, before Hydra runs anything.

    For a multirun, every combination of the sweep's parameters (command line and
    ``hydra.sweeper.params`` from a ``sweep=`` config) is checked. Raises :class:`ConfigError`.
    """
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in args if not a.startswith("-")]
    multirun = any(a in ("-m", "--multirun") for a in args)
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as e:
        raise ConfigError(f"cannot parse overrides: {str(e).strip().splitlines()[0]}") from None
    job = [o for o in parsed if not o.key_or_group.startswith("hydra")]
    job_lines = [o.input_line for o in job]
    base = first_point(job_lines) if multirun else job_lines
    cfg = compose(base, return_hydra_config=True)
    if not multirun:
        validate(cfg_without_hydra(cfg))
        return
    # every point of the grid: command-line sweeps x hydra.sweeper.params (command line wins)
    axes: dict[str, list[str]] = {}
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    for k, v in params.items():
        axes[str(k)] = [str(x) for x in next(iter(parser.parse_overrides([f"{k}={v}"]))).sweep_string_iterator()] \
            if "," in str(v) or "(" in str(v) else [str(v)]
    for o in job:
        if o.is_sweep_override():
            axes[o.key_or_group] = list(o.sweep_string_iterator())
    fixed = [o.input_line for o in job if not o.is_sweep_override() and o.key_or_group not in axes]
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys)):
        point = fixed + [f"{k}={v}" for k, v in zip(keys, combo)]
        try:
            validate(cfg_without_hydra(compose(point)))
        except ConfigError as e:
            raise ConfigError(f"{e} (in sweep point: {' '.join(f'{k}={v}' for k, v in zip(keys, combo))})") from None


def cfg_without_hydra(cfg: DictConfig) -> DictConfig:
    if "hydra" not in cfg:
        return cfg
    c = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"])
    return c
