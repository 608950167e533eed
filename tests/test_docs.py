"""The docs stay true: docs/config.md is `forgetscale keys --markdown`, every repository path and link that
README.md and docs/*.md name exists, and the shipped quick-start config loads. Fast: no torch, no model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from forgetscale.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# a repository path written in prose or code: configs/x.yaml, docs/x.md, benchmarks/x.py, src/forgetscale/...,
# tests/x.py (optionally ::test_name), .ci/run; {a,b} alternatives are expanded
PATH = re.compile(r"(?<![\w./~$<-])((?:configs|docs|benchmarks|tests|src|\.ci)/[\w.{},/-]*[\w}])(::\w+)?")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _expand(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for alt in match.group(1).split(",")
            for p in _expand(path[:match.start()] + alt + path[match.end():])]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, flags=re.M)}


def test_config_md_is_keys_markdown(capsys):
    assert main(["keys", "--markdown"]) == 0
    expected = capsys.readouterr().out
    actual = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert actual == expected, ("docs/config.md differs from `forgetscale keys --markdown`; regenerate it with "
                                "`forgetscale keys --markdown > docs/config.md`")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_named_repository_paths_exist(doc):
    missing = []
    for match in PATH.finditer(doc.read_text(encoding="utf-8")):
        for path in _expand(match.group(1)):
            target = ROOT / path
            if not target.exists():
                missing.append(path)
            elif match.group(2) and f"def {match.group(2)[2:]}(" not in target.read_text(encoding="utf-8"):
                missing.append(path + match.group(2))
    assert not missing, f"{doc.name} names paths that are not in the repository: {sorted(set(missing))}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_and_anchors_resolve(doc):
    broken = []
    for match in LINK.finditer(doc.read_text(encoding="utf-8")):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{doc.name} has links to missing files or headings: {broken}"


def test_cli_help_names_existing_paths():
    from forgetscale.cli import _verbs

    missing = [(name, path) for name, module in _verbs().items()
               for match in PATH.finditer(f"{getattr(module, 'EPILOG', None) or ''}\n{module.__doc__ or ''}")
               for path in _expand(match.group(1)) if not (ROOT / path).exists()]
    assert not missing, f"`forgetscale VERB --help` names paths that are not in the repository: {missing}"


def test_quickstart_config_loads_and_plans():
    from forgetscale.cli.demo import demo_config_path
    from forgetscale.config import load_config, parse_overrides
    from forgetscale.runs import plan_runs

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.model.name == "smollm2-135m-instruct"
    # as shipped, its runs are the demo's (README quotes the demo's time for it)
    demo = load_config(demo_config_path())
    assert [p.run_id for p in plan_runs(cfg)] == [p.run_id for p in plan_runs(demo)]
    own = load_config(ROOT / "configs" / "quickstart.yaml", parse_overrides(["finetune.dataset=data/train.jsonl"]))
    assert own.finetune.dataset == "data/train.jsonl"
