"""Assemble a Decoder from configs: the one entry point the benchmark and tests use
(the `ssd` Triton model builds its Decoder over the engine models' sockets)."""
from __future__ import annotations

from dataclasses import replace

from saguaro.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig, SpecConfig
from saguaro.decoder import Decoder
from saguaro.draft import Drafter, LocalDraft
from saguaro.draft_worker import DraftWorker
from saguaro.engines import create_engine
from saguaro.pair import validate_pair
from saguaro.remote import RemoteDraft


def build_decoder(target: EngineConfig = EngineConfig(checkpoint=str(DEMO_TARGET)),
                  draft: EngineConfig | None = EngineConfig(checkpoint=str(DEMO_DRAFT)),
                  spec: SpecConfig = SpecConfig(), draft_process: bool = True, draft_core: int | None = None) -> Decoder:
    """draft_process=True runs the draft in a worker process (SSD overlap); False keeps it in this
    process (SD, tests). draft_core pins the worker to one core; the target's forwards on its
    `threads` then run off that core, those on every core on it too."""
    if draft is not None:
        validate_pair(target.checkpoint, draft.checkpoint, num_draft_tokens=spec.k,
                      max_draft_len=min(target.max_draft_len, draft.max_draft_len))
        draft = replace(draft, max_slots=max(draft.max_slots, target.max_slots))
        if draft_process and draft_core is not None:
            target = replace(target, draft_core=draft_core)
    engine = create_engine(target)
    client = None
    if draft is not None:
        client = (RemoteDraft(DraftWorker(draft, spec, core=draft_core)) if draft_process
                  else LocalDraft(Drafter(create_engine(draft, branches=True), spec)))
    return Decoder(engine, client, spec)
