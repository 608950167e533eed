"""Where text comes from: the keys every data source shares (finetune, forgetting, the eval suites),
declared once. Torch-free."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A config section: unknown keys are errors, values never change after validation."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(Section):
    """A dataset: an embedded name, `hf:<hub id>` or a local file; hub sources also take a config and split.
    Subclasses name the dataset key and may change defaults (the forgetting set reads the test split)."""

    config: str | None = Field(None, description="hub dataset config name (hf: sources)")
    split: str = Field("train", description="hub dataset split (hf: sources)")
    text_field: str = Field("text", description="column holding the text")
