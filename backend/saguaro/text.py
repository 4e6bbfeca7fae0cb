"""Text in and out: loading the tokenizer, prompt encoding, and streaming detokenization.

Streaming text must concatenate to exactly `tokenizer.decode(all_ids)` and never split a multi-byte
UTF-8 character. Byte-level BPE tokens can end mid-character, which decodes to U+FFFD, so text is
held back while the decoded tail ends with U+FFFD. Each step decodes only a short trailing window of
ids (the "prefix offset / read offset" technique of vLLM and TGI), so a step costs O(window), not
O(length).

How streamed ids travel to a client that turns them into text with `postprocessing` (one that sends
`ssd` ids; `ensemble` and `ssd` given text_input stream text, decoded in `ssd` the same way):
`postprocessing` is stateless (an ensemble step carries no per-request state), so the `ssd` model
keeps one `StreamWindow` per request and sends, with every streamed response,
    output_ids  INT32 [-1]  = window ids: context ids already shown, then the ids to show now
    prefix_len  INT32 [1]   = how many leading ids of `output_ids` are context
and `postprocessing` emits `window_text(tokenizer, output_ids, prefix_len)`. `StreamWindow` calls the
same function to decide what to send, so it knows exactly what the client has seen: ids whose text is
still incomplete are not sent yet and come again, with more ids, in a later window; `finish()` sends
whatever is left (a trailing U+FFFD then, exactly as the full decode has it). An empty `output_ids`
(prefix_len 0) emits "" (a response that carries only totals). A non-streaming response is one
window: all ids, prefix_len 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from tokenizers import Tokenizer

from saguaro.errors import SaguaroError

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to
CONTEXT_IDS = 5         # ids of already-shown context kept before the new ids (as vLLM does)
BYTES_PER_TOKEN = 32    # a prompt longer than max_input_len x this many bytes is refused untokenized


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer in `model_dir/tokenizer.json` (Hugging Face `tokenizers` format)."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise SaguaroError(f"tokenizer: {path} not found; point tokenizer_dir at a model folder "
                           f"with a tokenizer.json (e.g. models/demo-code-target)")
    return Tokenizer.from_file(str(path))


def decode_text_input(value: bytes | str, field: str = "text_input", max_bytes: int | None = None) -> str:
    """A request's text field as str; SaguaroError naming `field` when empty, longer than
    max_bytes (checked before any decoding or tokenizing), or not UTF-8."""
    if max_bytes is not None and len(value) > max_bytes:
        raise SaguaroError(f"{field}: {len(value)} bytes, above this server's limit of {max_bytes} "
                           f"(max_input_len tokens x {BYTES_PER_TOKEN} bytes); shorten it")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SaguaroError(f"{field}: not valid UTF-8 (byte {e.start}); send UTF-8 text") from None
    if not value:
        raise SaguaroError(f"{field}: empty; send a non-empty prompt")
    return value


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Prompt token ids, as the library and the `preprocessing` model both tokenize."""
    return tokenizer.encode(text).ids


def window_text(tokenizer: Tokenizer, window_ids: Sequence[int], prefix_len: int,
                skip_special_tokens: bool = True, check_ids: bool = True) -> str:
    """Text the ids after the first `prefix_len` ids of the window add to the text of those first ids.

    Decoding both from the same start keeps decoder quirks at the window start (a stripped leading
    space, a partial character) identical on both sides, so the difference is exact. Ids a client
    sent are checked (`check_ids`); an id the model generated that the tokenizer lacks (a vocabulary
    padded past the tokenizer's, as Qwen2.5's 151936 rows for 151665 ids) decodes to nothing, as
    the tokenizer's decode() has it.
    """
    if not 0 <= prefix_len <= len(window_ids):
        raise SaguaroError(f"prefix_len: {prefix_len} outside 0..{len(window_ids)} (the window length)")
    ids = list(window_ids)
    vocab = tokenizer.get_vocab_size()
    if check_ids and ids and not 0 <= min(ids) <= max(ids) < vocab:  # decode() would silently drop unknown ids
        raise SaguaroError(f"output_ids: ids must lie in 0..{vocab - 1} (the tokenizer's vocabulary)")
    prefix = tokenizer.decode(ids[:prefix_len], skip_special_tokens=skip_special_tokens) if prefix_len else ""
    full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    return full[len(prefix):]


class StreamWindow:
    """Tracks one stream's ids; says which window to send so that shown text is always complete.

    `push(new_ids)` returns `(window_ids, prefix_len)` to send now, or None when the new text is still
    incomplete (nothing to show yet; those ids come again in a later window). `finish()` returns the
    last window, or None when it would show no text. Only the window is kept, so memory and time per step
    do not grow with the stream's length.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # ids from the window start on: shown context, then pending ids
        self._shown = 0            # how many of _ids have had their text shown

    def _take(self, final: bool) -> Optional[tuple[list[int], int]]:
        if self._shown == len(self._ids):
            return None
        text = window_text(self.tokenizer, self._ids, self._shown, self.skip_special_tokens, check_ids=False)
        # Empty text (e.g. skipped special tokens) adds nothing: keep those ids pending. A trailing
        # U+FFFD may be the start of a character the next ids complete: hold it back until the end.
        if not text or (text.endswith(REPLACEMENT) and not final):
            return None
        window, prefix_len = list(self._ids), self._shown
        # The next window keeps CONTEXT_IDS ids of shown context: enough for decoders that look at
        # neighbouring tokens, while a window that starts mid-character is harmless (see window_text).
        self._ids = self._ids[-CONTEXT_IDS:]
        self._shown = len(self._ids)
        return window, prefix_len

    def hold(self, new_ids: Iterable[int]) -> None:
        """Add ids without sending: they come with the next window."""
        self._ids.extend(int(i) for i in new_ids)

    def push(self, new_ids: Iterable[int]) -> Optional[tuple[list[int], int]]:
        self.hold(new_ids)
        return self._take(final=False)

    def finish(self) -> Optional[tuple[list[int], int]]:
        return self._take(final=True)
