"""Channel: what a request's responses carry when streamed pieces are coalesced."""
import pytest

from saguaro.config import DEMO_TARGET, SamplingParams
from saguaro.decoder import SeqStats
from saguaro.request_loop import Channel, Request
from saguaro.text import load_tokenizer

TOKENIZER = load_tokenizer(DEMO_TARGET)


class Recorder(Channel):
    def __init__(self, interval_s: float):
        super().__init__(Request(prompt=[1], params=SamplingParams(), stream=True, text_out=True), TOKENIZER, interval_s)
        self.pieces: list[tuple[str, bool]] = []

    def send(self, outputs, final):
        self.pieces.append((outputs["text_output"][0].decode(), final))


@pytest.mark.parametrize("interval_s,most_pieces", [(0.0, 30), (60.0, 2)])
def test_coalesced_pieces_concatenate_to_the_full_text(interval_s, most_pieces):
    ids = TOKENIZER.encode("def quicksort(xs):\n    return sorted(xs)  # naïve ✓\n").ids
    ch = Recorder(interval_s)
    for i in range(0, len(ids), 2):          # rounds of two tokens
        ch.on_tokens(ids[i:i + 2])
    ch.on_finish(SeqStats())
    text = "".join(p for p, _ in ch.pieces)
    assert text == TOKENIZER.decode(ids)
    assert ch.pieces[-1][1] and not any(final for _, final in ch.pieces[:-1])
    assert len(ch.pieces) <= most_pieces
    if interval_s:                           # the first piece goes at once, the rest at the end
        assert len(ch.pieces) == 2 and ch.pieces[0][0]
