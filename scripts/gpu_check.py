"""The PyTorch engine on a GPU, in one short run (scripts/gpu_check.sh): greedy SD and SSD against
AR on the development prompts, then AR/SD/SSD tokens per second with SSD's drafter on a CUDA
stream of its own (a thread in this process, so its cache build overlaps the target's verify on
the same GPU). Everything goes to one JSON file.

Needs python3, torch and numpy only: without `safetensors` the checkpoints are read by
read_safetensors below, without `tokenizers` the prompts are cut into vocabulary tokens by
longest match (ids of the same vocabulary, fine for timing and for comparing modes).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The safetensors format: an 8-byte little-endian header size, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw tensor bytes."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
              "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    body = memoryview(raw)[8 + n:]
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=dtypes[meta["dtype"]]) if end > start \
            else torch.empty(0, dtype=dtypes[meta["dtype"]])
        out[name] = t.reshape(meta["shape"]).to(device)
    return out


def provide_safetensors() -> str:
    try:
        import safetensors.torch  # noqa: F401
        return "safetensors"
    except ImportError:
        module = types.ModuleType("safetensors.torch")
        module.load_file = read_safetensors
        package = types.ModuleType("safetensors")
        package.torch = module
        sys.modules.update({"safetensors": package, "safetensors.torch": module})
        return "read_safetensors"


def prompt_encoder(model_dir: Path):
    """encode(text) -> ids: the model's tokenizer, or longest-match over its vocabulary."""
    try:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        return "tokenizers", lambda text: tok.encode(text).ids
    except ImportError:
        vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
        # byte-level BPE spells a space as "Ġ" and a newline as "Ċ"
        table = {k.replace("Ġ", " ").replace("Ċ", "\n"): v for k, v in vocab.items()}
        longest = max(map(len, table))

        def encode(text: str) -> list[int]:
            ids, i = [], 0
            while i < len(text):
                for n in range(min(longest, len(text) - i), 0, -1):
                    if text[i:i + n] in table:
                        ids.append(table[text[i:i + n]])
                        i += n
                        break
                else:
                    i += 1                  # a character outside the vocabulary: skipped
            return ids
        return "longest-match", encode


class StreamDraft:
    """A DraftClient whose Drafter runs each round in a thread, its CUDA work on its own stream:
    the reply is waited for only when the round needs it, the cache build overlaps the target."""

    def __init__(self, drafter, device: str):
        self.drafter, self.inject_fault = drafter, False
        e = drafter.engine
        self.vocab_size, self.max_draft_len, self.max_branches = e.vocab_size, e.max_draft_len, e.max_branches
        self.stream = torch.cuda.Stream() if device.startswith("cuda") else None

    def start(self, rnd):
        return _ThreadRound(self.drafter.answer(rnd), self.stream)

    def reset(self) -> None:
        self.drafter.release_all()

    def close(self) -> None:
        self.drafter.release_all()


class _ThreadRound:
    def __init__(self, answers, stream):
        self._reply_ready, self._done = threading.Event(), threading.Event()
        self._reply = self._caches = self._error = None
        threading.Thread(target=self._run, args=(answers, stream), daemon=True).start()

    def _run(self, answers, stream) -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                self._reply = next(answers)
                if stream is not None:
                    stream.synchronize()
                self._reply_ready.set()
                self._caches = next(answers, None)
                if stream is not None:
                    stream.synchronize()
        except Exception as e:          # handed to the round loop, which degrades to the target alone
            self._error = e
        finally:
            self._reply_ready.set()
            self._done.set()

    def arrived(self) -> bool:
        return self._reply_ready.is_set()

    def reply(self):
        self._reply_ready.wait()
        if self._reply is None:
            from saguaro.errors import DraftFailure
            raise DraftFailure(f"drafter thread failed: {self._error!r}")
        return self._reply

    def caches(self):
        from saguaro.draft import NextCaches
        self._done.wait()
        return self._caches if self._caches is not None else NextCaches(keys={})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(args: argparse.Namespace) -> dict:
    loader = provide_safetensors()
    import numpy  # noqa: F401  (the decoding core needs it; fail here with the others named)
    from saguaro.config import DEMO_DRAFT, DEMO_TARGET, DEV_PROMPTS, EngineConfig, SamplingParams, SpecConfig
    from saguaro.decoder import Decoder
    from saguaro.draft import Drafter
    from saguaro.engines import create_engine

    device = args.device
    tokenizer, encode = prompt_encoder(DEMO_TARGET)
    prompts = [encode(json.loads(line)["prompt"]) for line in DEV_PROMPTS.read_text().splitlines()][:args.prompts]
    prompts = [p[-args.max_prompt_len:] for p in prompts if p]
    spec = SpecConfig(k=args.k, budget=args.budget)
    target = create_engine(EngineConfig(checkpoint=str(DEMO_TARGET), device=device, dtype=args.target_dtype,
                                        max_slots=2, max_seq_len=args.max_prompt_len + args.max_new_tokens + 16))
    drafter = Drafter(create_engine(EngineConfig(checkpoint=str(DEMO_DRAFT), device=device, dtype=args.draft_dtype,
                                                 max_slots=2, max_seq_len=args.max_prompt_len + args.max_new_tokens + 16,
                                                 max_branches=max(args.budget, 8)), branches=True), spec)
    decoder = Decoder(target, StreamDraft(drafter, device), spec)
    params = SamplingParams(max_tokens=args.max_new_tokens)
    report = {"device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "checkpoint_loader": loader, "prompt_tokenizer": tokenizer,
              "target_dtype": args.target_dtype, "draft_dtype": args.draft_dtype, "k": args.k,
              "budget": args.budget, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "modes": {}}
    decoder.generate(prompts[:1], SamplingParams(max_tokens=8), "ssd")     # warm-up: kernels, allocator
    outputs = {}
    for mode in ("ar", "sd", "ssd"):
        sync(device)
        t0 = time.perf_counter()
        outputs[mode] = [decoder.generate([p], params, mode)[0] for p in prompts]
        sync(device)
        seconds = time.perf_counter() - t0
        tokens = sum(map(len, outputs[mode]))
        report["modes"][mode] = {"tokens": tokens, "seconds": round(seconds, 3),
                                 "tokens_per_s": round(tokens / seconds, 1)}
    for mode in ("sd", "ssd"):
        mismatched = [i for i, (a, b) in enumerate(zip(outputs[mode], outputs["ar"])) if a != b]
        report["modes"][mode]["greedy_equals_ar"] = not mismatched
        report["modes"][mode]["mismatched_prompts"] = mismatched
    rounds = [r for r in decoder.history if r.hits + r.misses]
    report["modes"]["ssd"]["cache_hit_rate"] = round(sum(r.hits for r in rounds) / max(1, sum(r.hits + r.misses for r in rounds)), 3)
    report["ok"] = all(report["modes"][m]["greedy_equals_ar"] for m in ("sd", "ssd"))
    decoder.close()
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--device", default="cuda")
    p.add_argument("--prompts", type=int, default=31)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-len", type=int, default=384)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--budget", type=int, default=8)
    # fp32 target: greedy exactness needs a K+1-token verify to pick what one-token forwards would
    p.add_argument("--target-dtype", default="float32")
    p.add_argument("--draft-dtype", default="bfloat16")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = run(args)
    except Exception as e:              # still one file saying what went wrong
        report = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if report.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
