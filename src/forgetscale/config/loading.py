"""Reading a sweep config: YAML -> overrides -> one validation pass, with one error formatter for every
caller (sweep files, `--set`, the stored evals section), so each message names the key and its line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from forgetscale.config.sweep import SweepConfig
from forgetscale.errors import ConfigError


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key path in a YAML document to its 1-based line, for messages that point at the line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, key.value)
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _format_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_FIELD_RULE = re.compile(r"^([a-z_][a-z0-9_]*): (.*)$")


def _child(node: Any, part: Any) -> tuple[bool, Any]:
    if isinstance(node, dict) and part in node:
        return True, node[part]
    if isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
        return True, node[part]
    return False, None


def _data_path(loc: tuple, data: Any, missing: bool) -> tuple[tuple, Any]:
    """(`loc` without pydantic's union tags (`list[int]`, `int`, ...), the value found there): only the parts
    that are keys or indices of the data as written (the last part is kept for a missing key)."""
    out, node = [], data
    for i, part in enumerate(loc):
        found, child = _child(node, part)
        if found:
            node = child
        elif missing and i == len(loc) - 1:
            node = None
        else:
            continue
        out.append(part)
    return tuple(out), node


def _shown(value: Any) -> str:
    """A value as the message quotes it: JSON, a mapping or list abbreviated, never just its type name."""
    text = json.dumps(value, default=str)
    if len(text) > 60:
        text = text[:57] + "..."
    if isinstance(value, dict):
        return f"a mapping {text}"
    if isinstance(value, (list, tuple)):
        return f"a list {text}"
    return text


def error_message(err: ValidationError, source: str, lines: dict[tuple, int] | None = None,
                  prefix: tuple = (), data: Any = None) -> str:
    """One line for the first error: `<source>:<line> <key>: <rule>; got <value>`. With `data` (what was
    validated), union tags are dropped from the key, and a section check that names its field (`checkpoints:
    ...`) points at that field's own line."""
    lines = lines or {}
    first = err.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    rule = first["msg"].removeprefix("Value error, ")
    if isinstance(data, dict):
        loc, node = _data_path(loc, data, first["type"] == "missing")
        named = _FIELD_RULE.match(rule)
        if named and isinstance(node, dict) and named.group(1) in node:  # a model check about one of its fields
            loc, rule = (*loc, named.group(1)), named.group(2)
    loc = (*prefix, *loc)
    if len(loc) > 1 and loc[1] == 0 and (loc[0], 0) not in lines and any(
            len(k) == 2 and k[0] == loc[0] and isinstance(k[1], str) for k in lines):
        loc = (loc[0], *loc[2:])  # a one-entry shorthand (`method: {name: lora}`): the file has no [0]
    key = _format_loc(loc) or "config"
    line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
    where = f"{source}:{line}" if line else source
    if first["type"] == "extra_forbidden":
        return f"{where} {key}: unknown key; remove it or check its spelling"
    rule = rule[0].lower() + rule[1:] if rule else rule
    if "; got " in rule:  # the rule already quotes the offending value
        return f"{where} {key}: {rule}"
    return f"{where} {key}: {rule}; got {_shown(first.get('input'))}"


def parse_config(data: Any, source: str = "config", text: str = "") -> SweepConfig:
    """Validate a mapping (as read from YAML) into a SweepConfig."""
    lines = _yaml_lines(text) if text else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a YAML mapping of keys; got {type(data).__name__}")
    try:
        cfg = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(error_message(err, source, lines, data=data)) from None
    if isinstance(cfg.evals.steps, list):
        off = [s for s in cfg.evals.steps if s not in cfg.train.checkpoint_steps]
        if off:
            line = lines.get(("evals", "steps"))
            raise ConfigError(f"{source}{':' + str(line) if line else ''} evals.steps: must be checkpoint steps "
                              f"({', '.join(map(str, cfg.train.checkpoint_steps))}); got {off[0]}")
    return cfg


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` items -> {dotted key: value parsed as YAML}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: must be KEY=VALUE; got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key.strip()}: the value is not valid YAML "
                              f"({getattr(err, 'problem', None) or 'unparseable'}); got {value!r}") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any], *, strip: str = "",
                    shorthands: dict[str, str] | None = None) -> dict[str, Any]:
    """Set each dotted key in `data` (a copy is not made). `strip` drops a leading section name (`evals.`);
    `shorthands` turns a scalar written for a section into its mapping (`model: NAME` -> {name: NAME})."""
    shorthands = shorthands or {}
    for dotted, value in overrides.items():
        if value is None and not strip:
            continue  # a CLI flag left unset
        node = data
        *parents, leaf = dotted.removeprefix(strip).split(".")
        path: list[str] = []
        for part in parents:
            path.append(part)
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                field = shorthands.get(".".join(path))
                if field is None:
                    raise ConfigError(f"--set {dotted}: '{'.'.join(path)}' is a value, not a section")
                child = node[part] = {field: child}
            node = child
        node[leaf] = value
    return data


def validate_section(model: type[BaseModel], data: Any, source: str) -> Any:
    """A config section validated on its own (the stored evals settings under --set), errors as for files."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(error_message(err, source, data=data)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice (also on line {seen[key]}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepConfig:
    """Read and validate a YAML sweep config; `overrides` are dotted keys applied on top (is-not-None)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if data is None:  # a file that failed to save is likelier than a wish for minutes of default sweep
        raise ConfigError(f"{path}: empty config (no keys); copy configs/quickstart.yaml, or write {{}} for every "
                          "default")
    if isinstance(data, dict):
        apply_overrides(data, overrides or {}, shorthands={"model": "name"})
    return parse_config(data, str(path), text)
