"""The message format between our processes: every message type survives the wire, and bytes that
are not a well-formed message of a known type are refused before anything is built from them."""
from __future__ import annotations

import os
import pickle

import msgpack
import pytest
import torch

from saguaro.config import SamplingParams
from saguaro.draft import DraftReply, DraftRound, Join, Outcome, Speculation
from saguaro.messages import (MESSAGES, Done, DraftInfo, DraftInfoQuery, End, EngineInfo, EngineInfoQuery, Failed,
                              Forward, ForwardResult, MessageError, NextCaches, ResetDraft, ResetEngine, decode, encode)

MARKER = "/tmp/saguaro-test-pwned"


class Hostile:
    """Unpickling this runs a shell command (what the old pickle wire would have done)."""
    def __reduce__(self):
        return os.system, (f"touch {MARKER}",)


def examples():
    q = torch.rand(3, 11)
    return [
        EngineInfoQuery(), EngineInfo(vocab_size=11, max_seq_len=64, max_slots=4, max_draft_len=8),
        Forward(slots=[0, 2], starts=[5, 0], tokens=[[1, 2], [3]], released=[1], greedy=True),
        ForwardResult(outputs=[torch.arange(6).reshape(2, 3), torch.rand(1, 11)]), ResetEngine(),
        DraftInfoQuery(), DraftInfo(vocab_size=11, max_draft_len=8, max_branches=64), ResetDraft(), Done(),
        DraftRound(joins=[Join(3, [5, 6, 7], SamplingParams(temperature=0.7, seed=9, stop=((1, 2), (4,))), "ssd", 3, 8, 0.3)],
                   outcomes=[Outcome(2, 1, [9, 4])], leaves=[1], verify_ms=2.5),
        DraftReply(specs={3: Speculation([1, 2, 3], q, "cache"), 4: Speculation([5], None, "fast")},
                   hits={3: True}, backup="neural", draft_ms=0.5, build_ms=3.0, active_slots=2),
        NextCaches(keys={3: {(0, 7): [1, 2, 3], (2, 1): [4, 5, 6]}}), End(), Failed("Traceback ..."),
    ]


def equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(equal(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_every_message_type_round_trips():
    msgs = examples()
    assert {type(m).__name__ for m in msgs} == set(MESSAGES)
    for m in msgs:
        assert equal(decode(encode(m)), m), type(m).__name__


def test_tensors_keep_dtype_shape_and_values():
    out = decode(encode(ForwardResult(outputs=[torch.tensor([[1, 2]], dtype=torch.int64), torch.zeros(0, 5)])))
    assert out.outputs[0].dtype == torch.int64 and out.outputs[0].tolist() == [[1, 2]]
    assert out.outputs[1].shape == (0, 5)
    assert decode(encode(ForwardResult(outputs=[torch.ones(2, dtype=torch.bfloat16)]))).outputs[0].dtype == torch.float32


@pytest.mark.parametrize("payload", [
    pickle.dumps(Hostile()),
    pickle.dumps({"op": "forward"}),
    b"",
    b"\x00" * 64,
    msgpack.packb(["Hostile", {}]),
    msgpack.packb(["Forward"]),
    msgpack.packb(["Forward", {"slots": [0], "starts": [0], "tokens": [[1]], "released": [], "greedy": False}]),
    msgpack.packb(["Forward", {"slots": [0], "starts": [0], "tokens": [[1]], "released": [], "greedy": False,
                               "logits": True, "code": "os.system('x')"}]),
    msgpack.packb(["Forward", {"slots": ["0"], "starts": [0], "tokens": [[1]], "released": [], "greedy": False,
                               "logits": True}]),
    msgpack.packb(["Forward", {"slots": [True], "starts": [0], "tokens": [[1]], "released": [], "greedy": False,
                               "logits": True}]),
    msgpack.packb(["ForwardResult", {"outputs": [{"dtype": "|O", "shape": [1], "data": b"12345678"}]}]),
    msgpack.packb(["ForwardResult", {"outputs": [{"dtype": "<f4", "shape": [4], "data": b"1234"}]}]),
    msgpack.packb(["ForwardResult", {"outputs": [{"dtype": "<f4", "shape": [-1], "data": b"1234"}]}]),
    msgpack.packb(["Failed", {"error": 1}]),
    msgpack.packb(["__builtins__", {}]),
], ids=["pickle-exploit", "pickle-dict", "empty", "zeros", "unknown-type", "no-fields", "missing-field", "extra-field",
        "wrong-type", "bool-for-int", "object-dtype", "short-buffer", "negative-shape", "error-not-str", "builtins"])
def test_anything_but_a_message_is_refused_and_nothing_runs(payload):
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    with pytest.raises(MessageError):
        decode(payload)
    assert not os.path.exists(MARKER)


def test_a_refusal_names_where_in_the_message_it_is():
    rnd = msgpack.unpackb(encode(DraftRound(outcomes=[Outcome(0, 0, [5]), Outcome(1, 1, [6, 7])])))
    rnd[1]["outcomes"][1]["emitted"][1] = "7"
    with pytest.raises(MessageError, match=r"^DraftRound\.outcomes\[1\]\.emitted\[1\]: expected int, got str"):
        decode(msgpack.packb(rnd))
    reply = msgpack.unpackb(encode(DraftReply(specs={3: Speculation([1, 2], None, "cache")}, hits={}, backup="neural",
                                              draft_ms=0.0, build_ms=0.0, active_slots=1)))
    reply[1]["specs"][0][1]["tokens"] = [1, True]
    with pytest.raises(MessageError, match=r"^DraftReply\.specs\[3\]\.tokens\[1\]: expected int, got bool"):
        decode(msgpack.packb(reply))


def test_only_message_types_are_sent():
    with pytest.raises(MessageError):
        encode({"op": "info"})
    with pytest.raises(MessageError):
        encode(Forward(slots=[0], starts=[0], tokens=[[object()]]))
