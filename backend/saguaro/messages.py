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
import math
import types
import typing
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from saguaro.draft import CacheKeys, DraftReply, DraftRound


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
class NextCaches:
    """The drafter's second answer to a round: per sequence, outcome (accepted, bonus) -> tokens."""
    keys: CacheKeys


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


def _plain(obj):
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
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
    return _build(cls, raw[1], cls.__name__)


_HINTS: dict[type, dict[str, object]] = {}


def _hints(cls: type) -> dict[str, object]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) != 1:
            raise MessageError(f"{where}: unsupported union {tp}")
        return _build(arms[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, where)
    if origin is list:
        return [_build(args[0], x, f"{where}[{i}]") for i, x in enumerate(_expect(value, list, where))]
    if origin is tuple:
        items = _expect(value, list, where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_build(args[0], x, f"{where}[{i}]") for i, x in enumerate(items))
        if len(items) != len(args):
            raise MessageError(f"{where}: expected {len(args)} items, got {len(items)}")
        return tuple(_build(a, x, f"{where}[{i}]") for i, (a, x) in enumerate(zip(args, items)))
    if origin is dict:
        out = {}
        for pair in _expect(value, list, where):
            if not (isinstance(pair, list) and len(pair) == 2):
                raise MessageError(f"{where}: expected [key, value] pairs")
            out[_build(args[0], pair[0], f"{where} key")] = _build(args[1], pair[1], f"{where}[{pair[0]!r}]")
        return out
    if tp is bool:
        return _expect(value, bool, where)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{where}: expected int, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise MessageError(f"{where}: expected a number, got {value!r}"[:200])
        return float(value)
    if tp in (str, bytes):
        return _expect(value, tp, where)
    if tp is np.ndarray:
        return _array(value, where)
    if tp is torch.Tensor:
        return torch.from_numpy(_array(value, where).copy())
    raise MessageError(f"{where}: no wire form for {tp}")


def _build_dataclass(cls: type, value, where: str):
    fields = _expect(value, dict, where)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown, missing = set(fields) - names, names - set(fields)
    if unknown or missing:
        raise MessageError(f"{where}: fields {sorted(unknown)} unknown, {sorted(missing)} missing"[:300])
    return cls(**{name: _build(hints[name], v, f"{where}.{name}") for name, v in fields.items()})


def _array(value, where: str) -> np.ndarray:
    spec = _expect(value, dict, where)
    dtype, shape, data = spec.get("dtype"), spec.get("shape"), spec.get("data")
    if set(spec) != {"dtype", "shape", "data"} or dtype not in DTYPES or not isinstance(data, bytes):
        raise MessageError(f"{where}: an array is {{dtype in {sorted(DTYPES)}, shape, data}}")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise MessageError(f"{where}: bad array shape {shape!r}"[:200])
    dt = np.dtype(dtype)
    if math.prod(shape) * dt.itemsize != len(data):
        raise MessageError(f"{where}: {len(data)} bytes do not hold a {dtype} array of shape {shape}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def _expect(value, tp: type, where: str):
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise MessageError(f"{where}: expected {tp.__name__}, got {type(value).__name__}")
    return value

