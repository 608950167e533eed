"""The base classes of every config model (Strict: what all of them refuse; Section: a frozen sweep
section) and where text comes from: the keys every data source shares (finetune, forgetting, the eval
suites), declared once. Torch-free, and below config: the method, arm and suite modules that config
validates with build on these."""

from __future__ import annotations

import types
import typing
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer


def _takes_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_takes_bool(a) for a in typing.get_args(annotation))
    return origin is typing.Literal and any(isinstance(a, bool) for a in typing.get_args(annotation))


class Strict(BaseModel):
    """What every config model refuses: unknown keys, inf/nan, and true/false where a number or text is
    asked for (pydantic would read `steps: true` as 1)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bools_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None and not _takes_bool(field.annotation):
            raise ValueError(f"must be a {_kind(field.annotation)}, not true/false")
        return value


def _kind(annotation: Any) -> str:
    text = str(annotation)
    return "number" if ("int" in text or "float" in text) else "value"


class Section(Strict):
    """A config section: unknown keys are errors, values never change after validation.

    Keys added after a section was first stored are listed in ADDED_KEYS: left out of the dumped config
    while at their default, so the run ids and stored sweep configs written before they existed stay valid."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    ADDED_KEYS: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for key in self.ADDED_KEYS:
                if key in data and getattr(self, key) == type(self).model_fields[key].default:
                    del data[key]
        return data


class SourceSpec(Section):
    """A dataset: an embedded name, `hf:<hub id>` or a local file; hub sources also take a config and split.
    Subclasses name the dataset key and may change defaults (the forgetting set reads the test split)."""

    config: str | None = Field(None, description="hub dataset config name (hf: sources)")
    split: str = Field("train", description="hub dataset split (hf: sources)")
    text_field: str = Field("text", description="column holding the text")
