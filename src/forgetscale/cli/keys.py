"""Print every sweep-config key with its default and meaning (the reference README's table is made from)."""

from __future__ import annotations

import argparse

NAME = "keys"
HELP = "list every config key with its default and meaning"
EPILOG = """examples:
  forgetscale keys
  forgetscale keys --markdown > keys.md"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for the sweep config and every registered method."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from forgetscale.config import SweepConfig
    from forgetscale.methods import METHODS

    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            name = field.alias or name  # the key as written (`evals.lm-eval`)
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name}.")
                continue
            if name == "method" and not prefix:
                continue
            default = field.default
            if default is PydanticUndefined and field.default_factory is not None:
                default = field.default_factory()
            rows.append((f"{prefix}{name}", repr(default), field.description or ""))

    walk(SweepConfig, "")
    rows.append(("method.name", "'lora'", f"fine-tuning method, one of {', '.join(METHODS.names())}; "
                 "`method` may also be a list of method mappings"))
    for method in METHODS.names():
        spec = METHODS.get(method)
        for name, field in spec.model_fields.items():
            if name == "name":
                continue
            rows.append((f"method.{name} ({method})", repr(field.default), field.description or ""))
    from forgetscale.mitigations import MITIGATIONS

    for arm in MITIGATIONS.names():  # each `mitigation:` entry is one arm's settings (docs/mitigations.md)
        for name, field in MITIGATIONS.get(arm).model_fields.items():
            if name != "name":
                rows.append((f"mitigation.{name} ({arm})", repr(field.default), field.description or ""))
    return rows


def run(args: argparse.Namespace) -> int:
    rows = config_keys()
    if args.markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, text in rows:
            print(f"| `{key}` | `{default}` | {text.replace('|', '/')} |")
        return 0
    width = max(len(k) for k, _, _ in rows)
    for key, default, text in rows:
        print(f"{key:<{width}}  {default:<24}  {text}")
    return 0
