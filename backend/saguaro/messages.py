"""The one message format between our processes: typed dataclasses, data only.

Every message between the orchestrator and the engine processes (Unix sockets, Triton BLS, the
library's draft-worker pipe) is an instance of one of MESSAGES, sent as msgpack: its type's name and
its fields. Receiving rebuilds it from the field annotations and refuses anything else
(MessageError): the only types ever built are these dataclasses, the builtins, numpy arrays and
torch tensors their annotations name. Arrays travel as dtype (from a fixed list), shape and raw
bytes, checked against each other. Nothing received can name code to run (no pickle; see
docs/design.md, "Processes and messages").
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from saguaro.draft import DraftReply, DraftRound, NextCaches


class MessageError(ValueError):
    """Bytes that are not a well-formed message of a known type."""


# -- the messages (besides the drafter's DraftRound and DraftReply) ---------------------------------

@dataclass
class EngineInfoQuery:
    pass


@dataclass
class EngineInfo:
    vocab_size: int
    max_seq_len: int
    max_slots: int
    max_draft_len: int


@dataclass
class Forward:
    """One batched target forward: each slot truncated to its start, then fed its tokens."""
    slots: list[int]
    starts: list[int]
    tokens: list[list[int]]
    released: list[int] = field(default_factory=list)   # slots the client freed since the last forward
    greedy: bool = False             # answer argmax ids instead of logits
    logits: bool = True              # False: prefill only, no outputs wanted
    all_cores: bool = False          # the drafter is idle: the forward may use every core


@dataclass
class ForwardResult:
    outputs: list[torch.Tensor]


@dataclass
class ResetEngine:
    """The client starts over: free every slot (a new orchestrator, or one that lost the target)."""


@dataclass
class DraftInfoQuery:
    pass


@dataclass
class DraftInfo:
    vocab_size: int
    max_draft_len: int
    max_branches: int


@dataclass
class ResetDraft:
    pass


@dataclass
class Done:
    """Acknowledges a reset."""


@dataclass
class End:
    """The last answer to a message on a wire (serve_wire)."""


@dataclass
class Failed:
    """The handler raised: what went wrong, for the caller's error."""
    error: str


MESSAGES: dict[str, type] = {cls.__name__: cls for cls in (
    EngineInfoQuery, EngineInfo, Forward, ForwardResult, ResetEngine,
    DraftInfoQuery, DraftInfo, ResetDraft, Done, DraftRound, DraftReply, NextCaches, End, Failed)}

# dtypes an array may have on the wire (little-endian, as every platform we run on)
DTYPES = frozenset(np.dtype(t).str for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                             np.float16, np.float32, np.float64))


# -- encoding -----------------------------------------------------------------------------------

def encode(msg) -> bytes:
    name = type(msg).__name__
    if MESSAGES.get(name) is not type(msg):
        raise MessageError(f"{name} is not a message type (saguaro.messages.MESSAGES)")
    return msgpack.packb([name, _plain(msg)], use_bin_type=True)


_FIELDS: dict[type, tuple[str, ...] | None] = {}   # per type sent: its field names (None: not a dataclass)


def _plain(obj):
    tp = type(obj)
    if obj is None or tp in (bool, int, float, str, bytes):
        return obj
    if tp not in _FIELDS:
        _FIELDS[tp] = tuple(f.name for f in dataclasses.fields(obj)) if dataclasses.is_dataclass(tp) else None
    names = _FIELDS[tp]
    if names is not None:
        return {name: _plain(getattr(obj, name)) for name in names}
    if tp is list and all(type(x) is int for x in obj):    # token lists
        return obj
    if isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, dict):                          # pairs: keys may be tuples
        return [[_plain(k), _plain(v)] for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        obj = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    if isinstance(obj, np.generic):
        return obj.item()
    raise MessageError(f"cannot send a {type(obj).__name__}")


# -- decoding -----------------------------------------------------------------------------------

def decode(data: bytes):
    """A message from bytes; MessageError for anything that is not one."""
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as e:
        raise MessageError(f"not a message: {type(e).__name__}: {e}") from None
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str)):
        raise MessageError("not a message: expected [type name, fields]")
    cls = MESSAGES.get(raw[0])
    if cls is None:
        raise MessageError(f"unknown message type {raw[0][:80]!r}")
    return _builder(cls)(raw[1], cls.__name__)


# Where a value sits in the message, for errors: a name, or (parent, step) with step an index
# (int), a ".field" or " key" suffix (str), or a dict key to show by repr (a 1-tuple). Formatted
# only when an error is raised: decoding a round of 256 outcomes took 11 ms when every element
# formatted its own path.
Where = typing.Union[str, tuple]


def _fmt(where: Where) -> str:
    steps = []
    while isinstance(where, tuple):
        where, step = where
        steps.append(f"[{step}]" if isinstance(step, int) else step if isinstance(step, str) else f"[{step[0]!r}]")
    return where + "".join(reversed(steps))


@functools.cache
def _builder(tp) -> typing.Callable[[object, Where], object]:
    """The function that rebuilds a value of type tp from its wire form, checking it as it goes;
    made once per type from its annotations."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        if len(arms) != 1:
            def unsupported(value, where):
                raise MessageError(f"{_fmt(where)}: unsupported union {tp}")
            return unsupported
        arm, nullable = _builder(arms[0]), type(None) in args
        return lambda value, where: None if value is None and nullable else arm(value, where)
    if dataclasses.is_dataclass(tp):
        return _dataclass_builder(tp)
    if origin is list:
        item = _builder(args[0])
        if args[0] is int:                 # token lists: checked in one pass, kept as they came
            def ints(value, where):
                if all(type(x) is int for x in _expect(value, list, where)):
                    return value
                return [item(x, (where, i)) for i, x in enumerate(value)]
            return ints
        return lambda value, where: [item(x, (where, i)) for i, x in enumerate(_expect(value, list, where))]
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            item = _builder(args[0])
            return lambda value, where: tuple(item(x, (where, i)) for i, x in enumerate(_expect(value, list, where)))
        items = [_builder(a) for a in args]

        def fixed(value, where):
            if len(_expect(value, list, where)) != len(items):
                raise MessageError(f"{_fmt(where)}: expected {len(items)} items, got {len(value)}")
            return tuple(b(x, (where, i)) for i, (b, x) in enumerate(zip(items, value)))
        return fixed
    if origin is dict:
        key, val = _builder(args[0]), _builder(args[1])

        def pairs(value, where):
            out = {}
            for pair in _expect(value, list, where):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise MessageError(f"{_fmt(where)}: expected [key, value] pairs")
                out[key(pair[0], (where, " key"))] = val(pair[1], (where, (pair[0],)))
            return out
        return pairs
    if tp is bool:
        return lambda value, where: _expect(value, bool, where)
    if tp is int:
        def integer(value, where):
            if type(value) is not int:
                raise MessageError(f"{_fmt(where)}: expected int, got {type(value).__name__}")
            return value
        return integer
    if tp is float:
        def number(value, where):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
                raise MessageError(f"{_fmt(where)}: expected a number, got {value!r}"[:200])
            return float(value)
        return number
    if tp in (str, bytes):
        return lambda value, where: _expect(value, tp, where)
    if tp is np.ndarray:
        return _array
    if tp is torch.Tensor:
        return lambda value, where: torch.from_numpy(_array(value, where).copy())

    def none(value, where):
        raise MessageError(f"{_fmt(where)}: no wire form for {tp}")
    return none


def _dataclass_builder(cls: type):
    hints = typing.get_type_hints(cls)
    fields = {f.name: (_builder(hints[f.name]), "." + f.name) for f in dataclasses.fields(cls)}

    def build(value, where):
        given = _expect(value, dict, where)
        if given.keys() != fields.keys():
            unknown, missing = set(given) - set(fields), set(fields) - set(given)
            raise MessageError(f"{_fmt(where)}: fields {sorted(unknown)} unknown, {sorted(missing)} missing"[:300])
        return cls(**{name: fields[name][0](v, (where, fields[name][1])) for name, v in given.items()})
    return build


def _array(value, where: Where) -> np.ndarray:
    spec = _expect(value, dict, where)
    dtype, shape, data = spec.get("dtype"), spec.get("shape"), spec.get("data")
    if set(spec) != {"dtype", "shape", "data"} or dtype not in DTYPES or not isinstance(data, bytes):
        raise MessageError(f"{_fmt(where)}: an array is {{dtype in {sorted(DTYPES)}, shape, data}}")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise MessageError(f"{_fmt(where)}: bad array shape {shape!r}"[:200])
    dt = np.dtype(dtype)
    if math.prod(shape) * dt.itemsize != len(data):
        raise MessageError(f"{_fmt(where)}: {len(data)} bytes do not hold a {dtype} array of shape {shape}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _expect(value, tp: type, where: Where):
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise MessageError(f"{_fmt(where)}: expected {tp.__name__}, got {type(value).__name__}")
    return value

