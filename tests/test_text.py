"""Streaming detokenization: pieces concatenate to exactly tokenizer.decode(all ids)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from saguaro.errors import SaguaroError
from saguaro.text import (CONTEXT_IDS, REPLACEMENT, StreamWindow, decode_text_input,
                          encode_prompt, load_tokenizer, window_text)

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "demo-code-target"
MULTIBYTE = "héllo → 世界 🌵"
CODE = 'def f(x):\n    """Ünïcödé — ok ✓ 🌵🌵"""\n    return {"ключ": x * 2}  # 世界\n'


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL_DIR)


def stream(tok, ids, chunks):
    """Feeds ids in chunks of the given sizes to a StreamWindow; returns the pieces, each window
    decoded as postprocessing decodes it."""
    window, pieces, i = StreamWindow(tok), [], 0
    text = lambda sent: "" if sent is None else window_text(tok, sent[0], sent[1])
    for n in chunks:
        pieces.append(text(window.push(ids[i:i + n])))
        i += n
    pieces.append(text(window.finish()))
    assert i == len(ids)
    return pieces


def test_load_tokenizer_missing_names_the_fix(tmp_path):
    with pytest.raises(SaguaroError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def test_multibyte_one_id_at_a_time(tok):
    ids = tok.encode(MULTIBYTE).ids
    # The premise: some ids end mid-character, so naive per-id decoding would show U+FFFD.
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    pieces = stream(tok, ids, [1] * len(ids))
    assert "".join(pieces) == tok.decode(ids) == MULTIBYTE
    assert not any(REPLACEMENT in p for p in pieces)  # no character is ever split


def test_random_chunks_match_full_decode(tok):
    text = CODE * 3
    ids = tok.encode(text).ids
    rng = random.Random(0)
    for _ in range(20):
        chunks, left = [], len(ids)
        while left:
            chunks.append(min(left, rng.randint(1, 5)))
            left -= chunks[-1]
        pieces = stream(tok, ids, chunks)
        assert "".join(pieces) == text
        assert not any(REPLACEMENT in p for p in pieces)


def test_arbitrary_ids_including_invalid_utf8_match_exactly(tok):
    # Random ids (as an untrained model could emit) make invalid UTF-8 mid-stream and at the end;
    # the pieces must still concatenate to exactly what decode() gives, U+FFFD included.
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tok.get_vocab_size()) for _ in range(rng.randint(0, 40))]
        pieces = stream(tok, ids, [1] * len(ids))
        assert "".join(pieces) == tok.decode(ids)


def test_special_tokens_are_skipped_like_decode(tok):
    eos = tok.token_to_id("<|endoftext|>")
    ids = tok.encode("a → b").ids
    ids = ids[:2] + [eos] + ids[2:] + [eos]
    assert "".join(stream(tok, ids, [1] * len(ids))) == tok.decode(ids) == "a → b"


def test_stream_window_contract_round_trips_and_stays_small(tok):
    # What ssd sends and postprocessing decodes: the concatenation of window_text() over the windows.
    ids = tok.encode(CODE * 4).ids
    sw, shown, longest = StreamWindow(tok), [], 0
    for i in ids:
        sent = sw.push([i])
        if sent is not None:
            window, prefix_len = sent
            longest = max(longest, len(window))
            shown.append(window_text(tok, window, prefix_len))
    sent = sw.finish()
    if sent is not None:
        shown.append(window_text(tok, *sent))
    assert "".join(shown) == CODE * 4
    assert longest <= CONTEXT_IDS + 4  # context plus at most one character's worth of pending ids


def test_stream_window_finish_flushes_incomplete_tail(tok):
    ids = tok.encode("🌵").ids[:-1]  # an emoji cut short: decode() ends with U+FFFD
    sw = StreamWindow(tok)
    assert all(sw.push([i]) is None for i in ids)
    window, prefix_len = sw.finish()
    assert window == ids and prefix_len == 0
    assert window_text(tok, window, prefix_len) == tok.decode(ids)
    assert sw.finish() is None


def test_window_text_rejects_bad_prefix_len(tok):
    with pytest.raises(SaguaroError, match="prefix_len"):
        window_text(tok, [1, 2], 3)
    assert window_text(tok, [], 0) == ""


def test_decode_text_input_errors_name_the_field():
    assert decode_text_input("é".encode()) == "é"
    with pytest.raises(SaguaroError, match="text_input: not valid UTF-8"):
        decode_text_input(b"\xff\xfe")
    with pytest.raises(SaguaroError, match="text_input: empty"):
        decode_text_input(b"")


def test_encode_prompt_is_the_tokenizers_encoding(tok):
    assert encode_prompt(tok, MULTIBYTE) == tok.encode(MULTIBYTE).ids


def test_window_text_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(SaguaroError, match="output_ids"):
        window_text(tok, [1, tok.get_vocab_size()], 0)
    with pytest.raises(SaguaroError, match="output_ids"):
        window_text(tok, [-1], 0)
