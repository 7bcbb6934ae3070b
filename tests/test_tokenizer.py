"""The simulated model's tokenizer (deploy/tokenizer.py): exact counts, exact round trips, the chat template."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from halffull.deploy.tokenizer import BEGIN_OF_TEXT, END_HEADER, EOT, SPECIAL_TOKENS, START_HEADER, SimTokenizer

TOK = SimTokenizer()


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("Hello world", ["Hell", "o", " wor", "ld"]),
        ("a  b", ["a", " ", " b"]),
        ("12345", ["123", "45"]),
        ("x\n\ny", ["x", "\n", "\n", "y"]),  # a whitespace run before a word leaves its last character
        ("x\n\n", ["x", "\n\n"]),
        ("foo_bar!!", ["foo", "_", "bar", "!!"]),
        ("héllo", ["hél", "lo"]),  # é is 2 bytes: "hél" is 4 bytes
        ("", []),
    ],
    ids=["words", "double-space", "digits-by-three", "newlines", "trailing-newlines", "underscore-punct", "utf8-bytes", "empty"],
)
def test_counting_rule(text, pieces):
    ids = TOK.encode(text)
    assert [TOK.decode([i]) for i in ids] == pieces
    assert TOK.count(text) == len(pieces)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_is_exact(text):
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert all(256 <= i < 1 << 40 for i in ids)
    decoder = TOK.stream_decoder()
    assert "".join(decoder.feed([i]) for i in ids) + decoder.flush() == text  # split characters come out whole


@settings(max_examples=100, deadline=None)
@given(st.text(), st.text())
def test_prefix_is_stable_except_the_last_piece(a, b):
    whole, head = TOK.encode(a + b), TOK.encode(a)
    k = len(head)
    # Only the tokens of a's last piece may merge with b's first characters.
    last_piece = len(TOK.encode(a[-1:] if a else "")) + 8
    assert whole[: max(k - last_piece, 0)] == head[: max(k - last_piece, 0)]


def test_decode_never_raises_on_foreign_ids():
    assert TOK.decode([0, 7, 255, 1 << 50, 0x2AA]) == "\ufffd" * 5
    assert TOK.decode([BEGIN_OF_TEXT], skip_special_tokens=False) == SPECIAL_TOKENS[BEGIN_OF_TEXT]
    assert TOK.decode([BEGIN_OF_TEXT]) == ""


def test_chat_template_layout():
    ids = TOK.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    expected = (
        [BEGIN_OF_TEXT, START_HEADER, *TOK.encode("system"), END_HEADER, *TOK.encode("\n\nBe brief."), EOT,
         START_HEADER, *TOK.encode("user"), END_HEADER, *TOK.encode("\n\nHi"), EOT,
         START_HEADER, *TOK.encode("assistant"), END_HEADER, *TOK.encode("\n\n")]
    )
    assert ids == expected
    parts = TOK.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}])
    assert parts == TOK.apply_chat_template([{"role": "user", "content": "Hi"}])


def test_output_vocab_words_are_single_tokens():
    vocab = SimTokenizer.output_vocab()
    assert len(set(vocab)) == len(vocab) >= 50
    for token in vocab:
        assert TOK.encode(TOK.decode([token])) == [token]
