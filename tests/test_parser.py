"""parse_hh_to_messages and the row filter, one test per edge case real HH data has."""

import pytest

from hh_sft_chat import hh_to_sft_messages, parse_hh_to_messages


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_multi_turn():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    assert parse_hh_to_messages(text) == msgs(("user", "Hi there"), ("assistant", "Hello!"),
                                              ("user", "How are you?"), ("assistant", "Fine, thanks."))


def test_tag_at_very_start_without_newlines():
    assert parse_hh_to_messages("Human: a\n\nAssistant: b") == msgs(("user", "a"), ("assistant", "b"))


def test_crlf_is_normalised():
    text = "\r\n\r\nHuman: line one\r\nline two\r\n\r\nAssistant: ok"
    assert parse_hh_to_messages(text) == msgs(("user", "line one\nline two"), ("assistant", "ok"))


def test_contents_are_stripped_and_empty_final_reply_dropped():
    text = "\n\nHuman:   hi  \n\nAssistant:   hey \n\nHuman: more?\n\nAssistant:"
    assert parse_hh_to_messages(text) == msgs(("user", "hi"), ("assistant", "hey"), ("user", "more?"))


def test_consecutive_same_role_turns_are_merged():
    text = "\n\nHuman: q\n\nAssistant: part one\n\nAssistant: part two\n\nHuman: x\n\nHuman: y"
    assert parse_hh_to_messages(text) == msgs(("user", "q"), ("assistant", "part one\n\npart two"),
                                              ("user", "x\n\ny"))


def test_merge_after_dropping_an_empty_turn_keeps_roles_alternating():
    text = "\n\nHuman: a\n\nAssistant:  \n\nHuman: b\n\nAssistant: c"
    assert parse_hh_to_messages(text) == msgs(("user", "a\n\nb"), ("assistant", "c"))


def test_tag_without_blank_line_is_text():
    text = "\n\nHuman: she said\nHuman: hi and Assistant: bye\n\nAssistant: ok"
    assert parse_hh_to_messages(text) == msgs(("user", "she said\nHuman: hi and Assistant: bye"),
                                              ("assistant", "ok"))


def test_text_before_the_first_tag_is_dropped():
    assert parse_hh_to_messages("preamble\n\nHuman: a\n\nAssistant: b") == msgs(("user", "a"), ("assistant", "b"))


def test_no_tags_and_empty_text():
    assert parse_hh_to_messages("") == []
    assert parse_hh_to_messages("just text") == []


def test_non_string_raises_type_error():
    with pytest.raises(TypeError):
        parse_hh_to_messages(None)


@pytest.mark.parametrize(("chosen", "reason", "n_messages"), [
    ("\n\nHuman: a\n\nAssistant: b\n\nHuman: unanswered", "", 2),   # trailing user turn dropped
    ("\n\nHuman: only a question", "no_assistant_turn", 0),
    ("\n\nHuman: q\n\nAssistant:", "no_assistant_turn", 0),         # its only reply is empty
    (None, "chosen_not_a_string", 0),
    (42, "chosen_not_a_string", 0),
])
def test_row_filter(chosen, reason, n_messages):
    messages, why = hh_to_sft_messages(chosen)
    assert why == reason and len(messages) == n_messages
    assert not messages or messages[-1]["role"] == "assistant"


def test_real_rows_parse_into_alternating_turns(hh_rows):
    multi = 0
    for row in hh_rows:
        messages = parse_hh_to_messages(row["chosen"])
        roles = [m["role"] for m in messages]
        assert all(a != b for a, b in zip(roles, roles[1:]))
        assert all(m["content"] and m["content"] == m["content"].strip() for m in messages)
        multi += roles.count("assistant") > 1
    assert multi / len(hh_rows) > 0.5  # most real conversations have several assistant turns


def test_bare_carriage_return_separators_parse_like_blank_lines():
    text = "\n\nHuman: first line\nsecond\n\nAssistant: ok\n\nHuman: more?\n\nAssistant: yes"
    assert parse_hh_to_messages(text.replace("\n", "\r")) == parse_hh_to_messages(text)
    assert len(parse_hh_to_messages(text.replace("\n", "\r"))) == 4
