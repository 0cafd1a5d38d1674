"""Property tests (hypothesis, 1,000 generated inputs each): the parser never raises on a str and always returns
well-formed alternating messages; the collator's labels are exactly the assistant contents and their
<|eot_id|>, whatever the text holds (unicode, control characters, literal special-token strings)."""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_process_sft import CompletionOnlyCollator
from hh_sft_chat import IGNORE_INDEX, hh_to_sft_messages, parse_hh_to_messages, tokenize_conversations

SPECIAL_STRINGS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>",
                   "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|finetune_right_pad_id|>"]
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
PIECES = st.one_of(
    st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human:", "Assistant:", "\nHuman:", "\r\n\r\nAssistant:",
                     "\n\n", "\r\n", " ", "\t", "\x00", "\x1f", "\u200b", *SPECIAL_STRINGS]),
    TEXT,
)
# 1,000 examples; 50 in a mutation run (mutmut runs the covering tests once per mutant)
PROPERTY = settings(max_examples=50 if os.environ.get("MUTANT_UNDER_TEST") else 1000, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.lists(PIECES, max_size=14).map("".join))
def test_parser_never_raises_and_output_is_well_formed(text):
    messages = parse_hh_to_messages(text)
    assert all(set(m) == {"role", "content"} and m["role"] in ("user", "assistant") for m in messages)
    assert all(m["content"] and m["content"] == m["content"].strip() and "\r\n" not in m["content"]
               for m in messages)
    assert all(a["role"] != b["role"] for a, b in zip(messages, messages[1:]))
    kept, reason = hh_to_sft_messages(text)
    assert (reason == "") == bool(kept) and (not kept or kept[-1]["role"] == "assistant")


CONTENT = st.lists(st.one_of(TEXT, st.sampled_from(SPECIAL_STRINGS + ["Human:", "\n\nAssistant:"])),
                   min_size=1, max_size=4).map("".join)


@st.composite
def conversations(draw):
    turns = draw(st.integers(1, 3))
    messages = [{"role": "system", "content": draw(CONTENT)}] if draw(st.booleans()) else []
    for _ in range(turns):
        messages += [{"role": "user", "content": draw(CONTENT)}, {"role": "assistant", "content": draw(CONTENT)}]
    if draw(st.booleans()):
        messages.pop()  # may end on a user turn
    return messages


@PROPERTY
@given(conversations())
def test_labels_are_exactly_the_assistant_turns(llama32_tokenizer, conversation):
    tokenizer = llama32_tokenizer
    [ids] = tokenize_conversations(tokenizer, [conversation])
    [labels] = CompletionOnlyCollator(tokenizer).labels_for([ids])
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    expected = []
    for message in conversation:
        if message["role"] == "assistant":
            content = message["content"].strip()
            expected += tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"] + [eot]
    assert [label for label in labels if label != IGNORE_INDEX] == expected
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))
    assert ids.count(tokenizer.bos_token_id) == 1
    if not any(s in m["content"] for m in conversation for s in ("<|", "|>")):
        assert ids == tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
