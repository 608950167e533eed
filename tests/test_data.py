import json

import pytest
import torch

from forgetscale.data import batch_indices, build_finetune_data, build_forgetting_blocks
from forgetscale.data.blocks import IGNORE, pack_documents, render_chat, split_heldout
from forgetscale.data.embedded import clean_wiki_markup, harmbench_prompts, news_articles, wikipedia_articles
from forgetscale.data.sources import load_records, split_text_documents
from forgetscale.errors import DataError, UnknownNameError
from forgetscale.models import load_model

from .conftest import parse


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-random-llama").tokenizer


def test_embedded_sets_are_real_text(tmp_path):
    news = news_articles()
    assert len(news) == 300 and all(len(a) > 100 for a in news)
    wiki = wikipedia_articles(tmp_path)
    assert 90 <= len(wiki) <= 120
    joined = "\n".join(wiki)
    assert "'''" not in joined and "\n==" not in joined and "#REDIRECT" not in joined
    assert wikipedia_articles(tmp_path) == wiki  # the cached copy is identical
    assert len(harmbench_prompts()) == 200


def test_wiki_cleaning_keeps_prose_drops_markup():
    text = "==History==\n'''Abacus''' is a ''counting'' frame used for arithmetic.\n Egyptian\n"
    assert clean_wiki_markup(text) == "Abacus is a counting frame used for arithmetic."


def test_pack_documents_joins_with_eos_and_cuts_full_blocks(tokenizer):
    blocks = pack_documents(["one two three four five six seven"] * 10, tokenizer, 8)
    assert blocks.input_ids.shape[1] == 8
    assert torch.equal(blocks.input_ids, blocks.labels)
    assert (blocks.input_ids == tokenizer.eos_token_id).any()
    budget = pack_documents(["word " * 500], tokenizer, 16, max_tokens=60)
    assert len(budget) == 4  # 60 // 15 predicted tokens per block


def test_chat_loss_is_on_response_only(tokenizer, chat_file):
    records = load_records(str(chat_file))
    blocks = render_chat(records, tokenizer, 64, source="x", fields=(None, None, None), loss_on="response")
    first = blocks.labels[0]
    target = first[first != IGNORE]
    assert tokenizer.decode(target).startswith("0 plus 0 is 0.")
    assert blocks.attention_mask[0].sum() < 64  # padded
    all_tokens = render_chat(records, tokenizer, 64, source="x", fields=(None, None, None), loss_on="all")
    assert (all_tokens.labels != IGNORE).sum() > (blocks.labels != IGNORE).sum()


def test_heldout_split_is_fixed_and_disjoint():
    records = list(range(100))
    train, held = split_heldout(records, 0.1)
    assert len(held) == 10 and not set(train) & set(held)
    assert split_heldout(records, 0.1) == (train, held)


def test_batches_are_a_pure_function_of_step_and_seed():
    a = [batch_indices(s, 4, 10, seed=3).tolist() for s in range(6)]
    b = [batch_indices(s, 4, 10, seed=3).tolist() for s in range(6)]
    assert a == b
    epoch = sum(a[:5], [])[:10]
    assert sorted(epoch) == list(range(10))  # every block once per epoch
    assert a != [batch_indices(s, 4, 10, seed=4).tolist() for s in range(6)]


def test_finetune_and_forgetting_data_from_config(tokenizer, tmp_path, tiny_cfg):
    cfg = parse(tiny_cfg())
    data = build_finetune_data(cfg.finetune, tokenizer, 32, tmp_path)
    assert data.format == "documents" and len(data.train) > len(data.heldout) > 0
    assert data.heldout.loss_tokens <= 256 and len(data.train_probe) == len(data.heldout)
    forget = build_forgetting_blocks(cfg.forgetting, tokenizer, 32, tmp_path)
    assert forget.loss_tokens == 256 // 31 * 31


def test_local_files_of_every_type(tmp_path, tokenizer):
    rows = [{"text": f"document number {i} " * 20} for i in range(10)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n\n".join(r["text"] for r in rows))
    for suffix in ("jsonl", "json", "csv", "parquet", "txt"):
        records = load_records(str(tmp_path / f"a.{suffix}"))
        assert [r["text"].strip() for r in records] == [r["text"].strip() for r in rows], suffix


def test_txt_documents_split_on_blank_lines_else_lines():
    assert split_text_documents("a b\nc\n\nd") == ["a b c", "d"]
    assert split_text_documents("x\ny\n") == ["x", "y"]


def test_data_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        load_records(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="dataset is empty"):
        load_records(str(empty))
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UnknownNameError, match="did you mean 'news'"):
        load_records("embedded:nwes")


def test_chat_record_without_response_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    path.write_text('{"question": "q1", "response": "r1"}\n{"question": "q2"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: missing or empty 'response'"):
        render_chat(load_records(str(path)), tokenizer, 64, source=str(path), fields=(None, None, None), loss_on="response")


# -- issue 12 items 20-21: every source alike, and what the data build does said out loud ---------------
def test_parquet_chat_messages_read_as_lists(tmp_path, tokenizer, tiny_cfg):
    import pandas as pd

    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(20)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pd.DataFrame(rows).to_parquet(tmp_path / "chat.parquet")  # pandas stores the column as arrays of structs
    assert isinstance(load_records(str(tmp_path / "chat.parquet"))[0]["messages"], list)
    built = [build_finetune_data(parse(tiny_cfg(finetune={"dataset": str(tmp_path / f"chat.{s}")})).finetune,
                                 tokenizer, 64, tmp_path) for s in ("jsonl", "parquet")]
    assert built[0].format == built[1].format == "chat"
    assert torch.equal(built[0].train.input_ids, built[1].train.input_ids)
    assert torch.equal(built[0].train.labels, built[1].train.labels)


def test_an_empty_system_prompt_is_reported_and_can_be_kept_out(chat_file, tokenizer, tiny_cfg, tmp_path):
    from forgetscale.data.blocks import template_default_system

    default = template_default_system(tokenizer)
    assert default is not None and default.startswith("You are a helpful AI assistant named SmolLM")
    prompt_ids = tokenizer(default, add_special_tokens=False)["input_ids"]

    def contains_default(blocks) -> int:
        rows = [r.tolist() for r in blocks.input_ids]
        return sum(any(r[i:i + len(prompt_ids)] == prompt_ids for i in range(len(r))) for r in rows)

    cfg = parse(tiny_cfg(finetune={"dataset": str(chat_file)}))
    data = build_finetune_data(cfg.finetune, tokenizer, 128, tmp_path)
    n_empty = 10  # the fixture: every even record has system_prompt ""
    assert contains_default(data.train) + contains_default(data.heldout) == n_empty
    (note,) = [n for n in data.notes if "system prompt" in n]
    assert f"{n_empty} chat records have no system prompt" in note and "template_system_prompt: false" in note
    kept_out = parse(tiny_cfg(finetune={"dataset": str(chat_file), "template_system_prompt": False}))
    data = build_finetune_data(kept_out.finetune, tokenizer, 128, tmp_path)
    assert contains_default(data.train) + contains_default(data.heldout) == 0 and not data.notes


def test_truncation_at_the_context_length_is_counted(tmp_path, tokenizer, tiny_cfg):
    rows = [{"question": f"Question {i}?", "response": ("word " * (5 if i % 4 else 80)).strip()} for i in range(40)]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = parse(tiny_cfg(finetune={"dataset": str(path), "template_system_prompt": False}))
    data = build_finetune_data(cfg.finetune, tokenizer, 64, tmp_path)
    (note,) = data.notes
    assert "10 of 40 chat records (25%) are cut at train.context_length=64 tokens (0 dropped" in note
    assert not build_finetune_data(cfg.finetune, tokenizer, 256, tmp_path).notes


def test_documents_separator_eos_or_blank_line(tokenizer, tmp_path, tiny_cfg):
    docs = [f"Document {i} is short prose about the number {i}." for i in range(40)]
    (tmp_path / "docs.txt").write_text("\n\n".join(docs))
    eos = parse(tiny_cfg(forgetting={"dataset": str(tmp_path / "docs.txt")})).forgetting
    blank = parse(tiny_cfg(forgetting={"dataset": str(tmp_path / "docs.txt"), "separator": "blank_line"})).forgetting
    with_eos = build_forgetting_blocks(eos, tokenizer, 32, tmp_path)
    without = build_forgetting_blocks(blank, tokenizer, 32, tmp_path)
    assert (with_eos.input_ids == tokenizer.eos_token_id).sum() >= 10  # <|im_end|>, SmolLM2's end of turn
    assert not (without.input_ids == tokenizer.eos_token_id).any()
    assert torch.equal(without.input_ids, pack_documents(docs, tokenizer, 32, 256, separator="blank_line").input_ids)
    assert "separator" not in eos.model_dump(mode="json")  # at its default the key keeps run ids as they were
    assert blank.model_dump(mode="json")["separator"] == "blank_line"


WIKITEXT = """ = Alpha =

 Alpha is the first letter of the Greek alphabet .

 = = History = =

 It came from the Phoenician letter aleph .

 = Beta =

 Beta is the second letter .
"""


def test_wikitext_articles_are_built_alike_from_hub_rows_and_txt(tmp_path, tokenizer, tiny_cfg):
    from forgetscale.data.blocks import wikitext_articles

    want = ["Alpha is the first letter of the Greek alphabet .\nIt came from the Phoenician letter aleph .",
            "Beta is the second letter ."]
    hub_rows = [line + "\n" for line in WIKITEXT.split("\n")]  # hf:wikitext: one row per line, blank rows too
    assert wikitext_articles(hub_rows) == want
    txt = tmp_path / "wiki.txt"
    txt.write_text(WIKITEXT)
    assert wikitext_articles([r["text"] for r in load_records(str(txt))]) == want
    assert wikitext_articles(["Plain prose with = signs = inside."]) is None  # other text is left as it is
    cfg = parse(tiny_cfg(forgetting={"dataset": str(txt), "max_tokens": 16})).forgetting
    blocks = build_forgetting_blocks(cfg, tokenizer, 8, tmp_path)
    assert torch.equal(blocks.input_ids, pack_documents(want, tokenizer, 8, max_tokens=16).input_ids)
