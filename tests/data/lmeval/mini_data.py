"""The dataset of forgetscale_mini.yaml: the JSONL next to this file (lm-eval's `data_files` would be
read relative to the working folder)."""

from pathlib import Path


def load(**kwargs):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(Path(__file__).with_name("mini_choice.jsonl"))})
