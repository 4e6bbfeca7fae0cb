"""Every bad argument raises SaguaroError naming the field; a failed request leaves the Decoder
working and leaks no KV slot (finished, failed and aborted requests alike, target and draft)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from saguaro.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig, SamplingParams, SpecConfig
from saguaro.decoder import JOIN_READ, Decoder
from saguaro.draft import Drafter, LocalDraft, PendingRound
from saguaro.engines.torch_engine import TorchEngine
from saguaro.errors import DraftFailure, SaguaroError
from saguaro.llm import build_decoder
from saguaro.pair import validate_pair
from tiny_models import save_random_model

MAX_SEQ = 96
PROMPT = [307, 1105, 58, 19, 4006, 12, 880, 41]
TARGET = EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=4, max_seq_len=MAX_SEQ, max_draft_len=6, threads=1)
DRAFT = EngineConfig(checkpoint=str(DEMO_DRAFT), max_slots=4, max_seq_len=MAX_SEQ, max_draft_len=6, max_branches=16,
                     threads=1)


def _decoder() -> Decoder:
    torch.set_num_threads(1)
    return build_decoder(TARGET, DRAFT, SpecConfig(k=3, budget=8), draft_process=False)


@pytest.fixture(scope="module")
def dec() -> Decoder:
    d = _decoder()
    yield d
    d.close()


@pytest.fixture
def fresh() -> Decoder:
    """A decoder of its own, for tests whose failure could leave a shared one unusable."""
    d = _decoder()
    yield d
    d.close()


def draft_engine(d: Decoder):
    return d.draft.drafter.engine


def assert_no_leak(d: Decoder) -> None:
    assert d.active == 0
    assert d.target.active_slots == 0, "target KV slot leaked"
    assert draft_engine(d).active_slots == 0, "draft KV slot leaked"
    assert d.draft.drafter.seqs == {}


def assert_works(d: Decoder, mode: str = "ssd") -> None:
    out = d.generate([PROMPT], SamplingParams(max_tokens=6), mode=mode)
    assert len(out[0]) == 6
    assert_no_leak(d)


BAD_REQUESTS = [
    # (id, add() kwargs, words the message must contain)
    ("k-zero", dict(k=0), ["K", "num_draft_tokens"]),
    ("k-negative", dict(k=-2), ["num_draft_tokens"]),
    ("k-too-large", dict(k=7), ["num_draft_tokens", "max_draft_len"]),
    ("context", dict(prompt=PROMPT * 10, params=SamplingParams(max_tokens=20)), ["max_seq_len", "max_tokens", "prompt"]),
    ("context-by-max-tokens", dict(params=SamplingParams(max_tokens=MAX_SEQ - len(PROMPT) + 1)), ["max_seq_len"]),
    ("max-tokens-zero", dict(params=SamplingParams(max_tokens=0)), ["max_tokens"]),
    ("max-tokens-negative", dict(params=SamplingParams(max_tokens=-5)), ["max_tokens"]),
    ("temperature", dict(params=SamplingParams(temperature=-0.1)), ["temperature"]),
    ("top-p-zero", dict(params=SamplingParams(temperature=1.0, top_p=0.0)), ["top_p"]),
    ("top-p-above-one", dict(params=SamplingParams(temperature=1.0, top_p=1.5)), ["top_p"]),
    ("top-k-negative", dict(params=SamplingParams(temperature=1.0, top_k=-1)), ["top_k"]),
    ("mode", dict(mode="beam"), ["decoding_mode", "beam"]),
    ("empty-prompt", dict(prompt=[]), ["prompt"]),
    ("budget", dict(budget=17), ["budget", "max_branches"]),
    ("saguaro-c-above", dict(saguaro_c=1.5), ["saguaro_c"]),
    ("saguaro-c-below", dict(saguaro_c=-0.1), ["saguaro_c"]),
]


@pytest.mark.parametrize("kwargs,words", [(kw, w) for _, kw, w in BAD_REQUESTS], ids=[i for i, _, _ in BAD_REQUESTS])
def test_bad_request_raises_and_decoder_still_works(dec, kwargs, words):
    kw = dict(kwargs)
    prompt = kw.pop("prompt", PROMPT)
    kw.setdefault("mode", "ssd")
    with pytest.raises(SaguaroError) as err:
        dec.add(prompt, **kw)
    for w in words:
        assert w in str(err.value), f"message {str(err.value)!r} does not name {w!r}"
    assert_no_leak(dec)
    assert_works(dec)


def test_context_boundary_is_allowed(dec):
    out = dec.generate([PROMPT], SamplingParams(max_tokens=MAX_SEQ - len(PROMPT)), mode="ssd")
    assert len(out[0]) == MAX_SEQ - len(PROMPT)
    assert_no_leak(dec)


def test_bad_request_while_others_run(dec):
    """A rejected request between rounds does not disturb the sequences in flight."""
    ref = dec.generate([PROMPT], SamplingParams(max_tokens=12), mode="sd")[0]
    a = dec.add(PROMPT, SamplingParams(max_tokens=12), mode="sd")
    out = []
    for i in range(100):
        for e in dec.step():
            out.extend(e.tokens)
        if i == 1:
            with pytest.raises(SaguaroError):
                dec.add(PROMPT, SamplingParams(max_tokens=3, top_p=2.0))
        if not dec.active:
            break
    assert out == ref and a not in dec.seqs
    assert_no_leak(dec)


def test_spec_config_errors():
    for spec, word in [(SpecConfig(k=0), "num_draft_tokens"), (SpecConfig(k=9), "max_draft_len"),
                       (SpecConfig(budget=65), "max_branches"), (SpecConfig(budget=0), "budget"),
                       (SpecConfig(saguaro_c=1.01), "saguaro_c"), (SpecConfig(saguaro_c=-1), "saguaro_c"),
                       (SpecConfig(backup="slow"), "backup"), (SpecConfig(fanout="flat"), "fanout"),
                       (SpecConfig(accept_rate=1.0), "accept_rate"), (SpecConfig(power=0.0), "power")]:
        with pytest.raises(SaguaroError, match=word):
            spec.validate(max_draft_len=8, max_branches=64)
    SpecConfig(saguaro_c=0.0).validate(8, 64)
    SpecConfig(saguaro_c=1.0).validate(8, 64)


def test_build_decoder_rejects_bad_spec():
    with pytest.raises(SaguaroError, match="num_draft_tokens"):
        build_decoder(TARGET, DRAFT, SpecConfig(k=0), draft_process=False)
    with pytest.raises(SaguaroError, match="max_draft_len"):
        build_decoder(TARGET, DRAFT, SpecConfig(k=7), draft_process=False)
    with pytest.raises(SaguaroError, match="max_branches"):
        build_decoder(TARGET, DRAFT, SpecConfig(k=3, budget=17), draft_process=False)


def test_all_slots_in_use(dec):
    ids = [dec.add(PROMPT, SamplingParams(max_tokens=4), mode="ssd") for _ in range(4)]
    with pytest.raises(SaguaroError, match="max_slots"):
        dec.add(PROMPT, SamplingParams(max_tokens=4), mode="ssd")
    assert dec.target.active_slots == 4
    while dec.active:
        dec.step()
    assert all(i not in dec.seqs for i in ids)
    assert_no_leak(dec)
    assert_works(dec)


@pytest.mark.parametrize("mode", ["sd", "ssd"])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=40), SamplingParams(max_tokens=40, temperature=0.8, seed=1)],
                         ids=["greedy", "sampled"])
def test_abort_mid_generation_frees_target_and_draft_slots(fresh, mode, params):
    dec = fresh
    ids = [dec.add(PROMPT, params, mode=mode) for _ in range(3)]
    for _ in range(1 + JOIN_READ):   # joined; the drafter's answer to the joins is read by then
        dec.step()
    assert dec.target.active_slots == 3 and draft_engine(dec).active_slots == 3
    dec.abort(ids[1])
    assert dec.target.active_slots == 2
    dec.step()                    # the drafter hears of the leave with the next round
    assert draft_engine(dec).active_slots == 2
    dec.abort(ids[0])
    dec.abort(ids[2])             # the last one: the decoder tells the drafter at once
    dec.abort(ids[2])             # aborting twice (or an unknown id) is harmless
    dec.abort(12345)
    assert_no_leak(dec)
    assert_works(dec, mode)


def test_abort_before_first_round(fresh):
    dec = fresh
    a = dec.add(PROMPT, SamplingParams(max_tokens=5), mode="ssd")
    b = dec.add(PROMPT, SamplingParams(max_tokens=5), mode="ssd")
    dec.abort(a)                  # its join never reached the drafter
    out = []
    while dec.active:
        for e in dec.step():
            assert e.seq_id == b
            out += e.tokens
    assert len(out) == 5
    assert_no_leak(dec)


def test_requests_finishing_at_different_rounds_free_everything(dec):
    out = dec.generate([PROMPT, PROMPT[:3], PROMPT[2:]], SamplingParams(max_tokens=9), mode="ssd")
    assert [len(o) for o in out] == [9, 9, 9]
    dec.generate([PROMPT[:5]], SamplingParams(max_tokens=7, end_id=None, stop=((1,),)), mode="sd")
    assert_no_leak(dec)


# -- pairs that cannot be served together ------------------------------------------------------------
def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def test_vocabularies_that_differ(tmp_path):
    save_random_model(tmp_path / "draft", arch="llama", vocab_size=4000, hidden_size=32, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    bad = EngineConfig(checkpoint=str(tmp_path / "draft"), max_slots=2, max_seq_len=64)
    for call in (lambda: validate_pair(DEMO_TARGET, tmp_path / "draft"),
                 lambda: build_decoder(TARGET, bad, SpecConfig(k=3, budget=8), draft_process=False)):
        with pytest.raises(SaguaroError, match="vocab_size") as err:
            call()
        assert "4096" in str(err.value) and "4000" in str(err.value)
    # the Decoder itself (it has no tokenizer to check against) decodes over the ids both engines
    # have, so a pair padded differently works; refusing a draft that misses tokenizer ids is the
    # pair check's job, above
    target = TorchEngine(TARGET)
    dec = Decoder(target, LocalDraft(Drafter(TorchEngine(bad, branches=True), SpecConfig())), SpecConfig())
    assert dec.vocab == 4000
    dec.close()


@pytest.mark.parametrize("change", ["vocab", "rules"])
def test_tokenizers_that_differ(tmp_path, change):
    draft = _copy_checkpoint(DEMO_DRAFT, tmp_path / "draft")
    tok = json.loads((draft / "tokenizer.json").read_text())
    if change == "vocab":       # same size, two ids swapped
        vocab = tok["model"]["vocab"]
        a, b = list(vocab)[300], list(vocab)[301]
        vocab[a], vocab[b] = vocab[b], vocab[a]
    else:                       # same vocab, different pre-tokenization
        tok["pre_tokenizer"] = {"type": "Whitespace"}
    (draft / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(SaguaroError, match="tokenizer"):
        validate_pair(DEMO_TARGET, draft)
    with pytest.raises(SaguaroError, match="tokenizer"):
        build_decoder(TARGET, EngineConfig(checkpoint=str(draft), max_slots=2, max_seq_len=64), SpecConfig(k=3, budget=8),
                      draft_process=False)


def test_unsupported_architecture(tmp_path):
    draft = _copy_checkpoint(DEMO_DRAFT, tmp_path / "draft")
    cfg = json.loads((draft / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (draft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SaguaroError, match="GPT2LMHeadModel"):
        validate_pair(DEMO_TARGET, draft)
    with pytest.raises(SaguaroError, match="architecture"):
        TorchEngine(EngineConfig(checkpoint=str(draft), max_slots=1, max_seq_len=32))
    with pytest.raises(SaguaroError, match="architecture"):
        build_decoder(TARGET, EngineConfig(checkpoint=str(draft), max_slots=2, max_seq_len=64), SpecConfig(k=3, budget=8),
                      draft_process=False)


def test_engine_config_errors():
    with pytest.raises(SaguaroError, match="max_slots"):
        TorchEngine(EngineConfig(checkpoint=str(DEMO_DRAFT), max_slots=0))
    with pytest.raises(SaguaroError, match="dtype"):
        TorchEngine(EngineConfig(checkpoint=str(DEMO_DRAFT), dtype="float8", max_slots=1))
    with pytest.raises(SaguaroError, match="config.json"):
        TorchEngine(EngineConfig(checkpoint="/nonexistent/model", max_slots=1))


def test_model_parameters_name_the_config_the_key_and_the_fix(tmp_path):
    from saguaro.triton_models import Params, engine_config, serve_limits, spec_config
    p = Params("ssd", {"max_tokens": "12x", "saguaro_c": " 0.5 ", "cpu_core": "", "allow_fault_injection": "yes",
                       "fanout_budget": "100", "max_input_len": "64"})
    with pytest.raises(SaguaroError, match=r"ssd/config.pbtxt: parameter max_tokens='12x' must be an integer"):
        serve_limits(p, Params("draft", {}))
    with pytest.raises(SaguaroError, match=r"ssd/config.pbtxt: parameter 'tokenizer_dir' is missing; add \{ key: \"tokenizer_dir\""):
        p.text("tokenizer_dir")
    with pytest.raises(SaguaroError, match="allow_fault_injection='yes' must be true or false"):
        p.flag("allow_fault_injection")
    assert p.number("saguaro_c") == 0.5 and p.optional_integer("cpu_core") is None and p.integer("max_slots", 16) == 16
    for value in ("nan", "1e400"):      # (a poll interval of nan made the relay's watcher spin)
        with pytest.raises(SaguaroError, match=f"ensemble/config.pbtxt: parameter cancel_poll_ms='{value}' must be a finite number"):
            Params("ensemble", {"cancel_poll_ms": value}).number("cancel_poll_ms", 100)
    with pytest.raises(SaguaroError, match=r"fanout_budget \(B\)=100: must be in \[1, 64\] \(raise the draft's max_branches"):
        spec_config(p).validate(8, 64)
    target = Params("target", {"checkpoint": str(DEMO_TARGET), "gpu_device_ids": "0,x"})
    with pytest.raises(SaguaroError, match=r"target/config.pbtxt: parameter gpu_device_ids='0,x' must be integers"):
        engine_config(target, {"model_repository": str(tmp_path / "target")})


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("mode", ["sd", "ssd"])
def test_the_last_rounds_verify_and_draft_no_position_past_max_seq_len(fresh, mode, temperature):
    # a request at the limit (prompt + max_tokens = max_seq_len): TensorRT-LLM's KV holds exactly
    # max_seq_len positions. A round verifying K tokens with fewer left ran past it on the target,
    # and the drafter drafted K (and pre-drafted K past the longest outcome) whatever was left:
    # 101 and 107 positions at max_seq_len 96
    widest = {"target": [], "draft": [], "branch": []}

    def watch(engine, name, into):
        real = getattr(engine, name)

        def checked(slots, tokens, *a, **kw):
            widest[into].append(max(engine.length(s) + len(t) for s, t in zip(slots, tokens)))
            return real(slots, tokens, *a, **kw)
        setattr(engine, name, checked)
    for name in ("forward", "forward_greedy"):
        watch(fresh.target, name, "target")
    draft = draft_engine(fresh)
    watch(draft, "forward", "draft")
    real_branch = draft.branch_step

    def branch_step(parents, visible, tokens, depth):
        # a branch at this depth holds its parent's positions up to `visible`, its own token and `depth` drafted after it
        widest["branch"].append(int(visible.max()) + 1 + depth)
        return real_branch(parents, visible, tokens, depth)
    draft.branch_step = branch_step
    prompt = (PROMPT * 12)[: MAX_SEQ - 40]
    params = SamplingParams(max_tokens=40, temperature=temperature, seed=5)
    expected = fresh.generate([prompt], params, mode="ar")[0]
    for positions in widest.values():
        positions.clear()
    out = fresh.generate([prompt], params, mode=mode, k=6)[0]
    assert out == expected if temperature == 0 else len(out) == 40
    assert max(widest["target"]) <= MAX_SEQ and max(widest["draft"]) <= MAX_SEQ
    assert mode == "sd" or 0 < max(widest["branch"]) <= MAX_SEQ
    assert_no_leak(fresh)


def test_a_drafter_that_fails_after_the_forward_leaves_sampled_sequences_on_the_target(fresh):
    # every sequence verified a pre-drafted hit, so the drafter's answer is read after the target
    # forward; it fails, speculation is dropped (_degrade), and each sequence's step is a plain one
    # from the first of the rows the forward computed. The plain steps drawn together (_draw_plain)
    # took every row: two sampled sequences failed the round for everyone (shapes 2 and 8)
    real_start, fail = fresh.draft.start, []

    def start(rnd):
        if fail:
            fail.clear()

            def answers():
                raise DraftFailure("the drafter died during the forward")
                yield
            return PendingRound(answers())
        return real_start(rnd)
    fresh.draft.start = start
    params = SamplingParams(max_tokens=40, temperature=1.0, top_k=50)
    ids = [fresh.add(PROMPT, params.with_(seed=seed), mode="ssd", k=3) for seed in (1, 2)]
    tokens, degraded, armed = {i: [] for i in ids}, set(), False
    while fresh.active:
        seqs = list(fresh.seqs.values())
        if not armed and len(seqs) == 2 and all(s.spec is not None and not s.first_round for s in seqs):
            fail.append(True)               # this round verifies pre-drafted speculations
            armed = True
        for e in fresh.step():
            tokens[e.seq_id] += e.tokens
            if e.stats.degraded:
                degraded.add(e.seq_id)
    assert armed and degraded == set(ids)
    assert all(len(t) == 40 for t in tokens.values())
    assert_no_leak(fresh)
