"""Prompt synthesis for HTTP replay (loadtest/live/prompts.py): exact token counts under the served tokenizer, shared
text exactly where the trace's hash_ids are shared, so prefix caching sees what the trace describes."""

from __future__ import annotations

import itertools

import pytest

from halffull.deploy.tokenizer import SimTokenizer
from halffull.loadtest.live.prompts import WORD_BASE, WORDS, PromptSynthesizer, synthesize_prompts
from halffull.loadtest.sim.traces import TraceRequest, load_trace
from halffull.prefix_hash import hash_token_blocks

TOK = SimTokenizer()
BLOCK = 512


def tokens(synth: PromptSynthesizer, rid: str, n: int, hash_ids=()) -> list[int]:
    return TOK.encode(synth.text(rid, n, hash_ids))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_every_word_is_one_token():
    assert len(WORDS) == WORD_BASE == 26**3
    assert all(TOK.count(w) == 1 for w in WORDS)
    assert TOK.count("".join(WORDS[:1000])) == 1000  # words never merge


@pytest.mark.parametrize(
    "num_tokens, hash_ids",
    [(1, ()), (2, ()), (3, ()), (511, ()), (512, ()), (513, ()), (1300, ()), (8191, ()),
     (1, (7,)), (700, (7, 8)), (1024, (7, 8)), (1300, (7, 8, 9)), (1300, (7,)), (5000, (1, 2))],
    ids=lambda v: str(v) if not isinstance(v, tuple) else ("ids" + "-".join(map(str, v)) if v else "no-ids"),
)
def test_token_count_is_exact(num_tokens, hash_ids):
    text = PromptSynthesizer(seed=3).text("r1", num_tokens, hash_ids)
    assert TOK.count(text) == num_tokens
    assert len(text) == 4 * num_tokens  # 4 characters a word: within the ingress's text-size check


@pytest.mark.parametrize(
    "a, b, shared",
    [
        # (num tokens, hash ids) of two requests -> tokens they share at the front, exactly
        ((1300, (1, 2, 3)), (1300, (1, 2, 3)), 1300),           # same ids, same length: identical
        ((1300, (1, 2, 3)), (1100, (1, 2, 9)), 1024),           # first two blocks shared
        ((1300, (1, 2, 3)), (1300, (1, 5, 3)), 512),            # chain broken at block 1
        ((1300, (1, 2, 3)), (1300, (4, 2, 3)), 0),              # nothing shared (later ids do not matter)
        ((700, (5, 6)), (900, (5, 6)), 700),                    # partial last block is a prefix of the full one
        ((512, (5,)), (1024, (5, 6)), 512),                     # one request extends the other
        ((600, (1, 2)), (600, (1, 2 + WORD_BASE)), 513),       # ids equal mod 17,576: differ at the 2nd word
        ((600, (1, 2)), (600, (1,)), 512),                     # past the ids: request-unique text
        ((300, ()), (300, ()), 0),                             # Azure (no ids): different requests share nothing
    ],
    ids=["identical", "two-blocks", "chain-broken", "none", "partial-block", "extension", "mod-collision",
         "ids-run-out", "no-ids"],
)
def test_shared_hash_ids_share_exactly_their_tokens(a, b, shared):
    synth = PromptSynthesizer(seed=0)
    ta, tb = tokens(synth, "ra", *a), tokens(synth, "rb", *b)
    assert common_prefix(ta, tb) == shared
    # The engine's prefix cache sees the same: chained 16-token block hashes agree for the shared full blocks.
    ha, hb = hash_token_blocks(ta, 16), hash_token_blocks(tb, 16)
    assert common_prefix(list(ha), list(hb)) == min(shared // 16, len(ha), len(hb))


def test_same_seed_same_text_other_seed_other_text():
    a, b, c = PromptSynthesizer(1), PromptSynthesizer(1), PromptSynthesizer(2)
    assert a.text("r", 1300, (4, 5)) == b.text("r", 1300, (4, 5))
    assert a.text("r", 1300, (4, 5)) != c.text("r", 1300, (4, 5))
    assert a.text("r", 1300) != a.text("s", 1300)


def test_block_cache_is_bounded_and_transparent():
    synth = PromptSynthesizer(0, cache_blocks=2)
    first = synth.text("r", 2000, (1, 2, 3, 4))
    assert len(synth._cache) == 2
    assert synth.text("r", 2000, (1, 2, 3, 4)) == first


def test_mooncake_slice_shares_exactly_where_hash_ids_do():
    trace = load_trace("mooncake_conv", limit=40, max_total_tokens=8192)
    texts = synthesize_prompts(trace, seed=0)
    toks = [TOK.encode(t) for t in texts]
    assert [len(t) for t in toks] == [r.num_prompt_tokens for r in trace]
    for (i, ri), (j, rj) in itertools.combinations(enumerate(trace), 2):
        ids = common_prefix(list(ri.hash_ids), list(rj.hash_ids))
        expected = min(ids * BLOCK, ri.num_prompt_tokens, rj.num_prompt_tokens)
        assert common_prefix(toks[i], toks[j]) == expected, (ri.request_id, rj.request_id)


def test_rejects_empty_prompt():
    with pytest.raises(ValueError):
        PromptSynthesizer().text("r", 0)


def test_for_request_uses_the_trace_fields():
    r = TraceRequest("t9", 0.0, 900, 10, (3, 4))
    synth = PromptSynthesizer(5)
    assert synth.for_request(r) == synth.text("t9", 900, (3, 4))
