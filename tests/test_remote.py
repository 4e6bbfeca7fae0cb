"""The engine wire protocol without Triton: RemoteEngine drives an EngineServer exactly as a local
engine, and the server frees the slots its client released."""
import torch

from saguaro.config import DEMO_TARGET, EngineConfig
from saguaro.engines.torch_engine import TorchEngine
from saguaro.remote import EngineServer, RemoteEngine


def test_remote_engine_matches_local_and_frees_released_slots():
    cfg = EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=4)
    local, served = TorchEngine(cfg), TorchEngine(cfg)
    server = EngineServer(served)
    remote = RemoteEngine(server.handle)
    a, b = local.allocate(), remote.allocate()
    prompt = list(range(10, 40))
    assert torch.allclose(local.forward([a], [prompt])[0], remote.forward([b], [prompt])[0])
    local.truncate(a, 20)
    remote.truncate(b, 20)          # rollback travels with the next forward
    assert torch.allclose(local.forward([a], [[7, 8]])[0], remote.forward([b], [[7, 8]])[0])
    assert served.active_slots == 1
    remote.release(b)
    c = remote.allocate()
    remote.forward([c], [[1, 2, 3]])
    assert served.active_slots == 1 and remote.active_slots == 1   # b's engine slot was freed, c took one


def test_greedy_forward_sends_the_argmax_ids():
    cfg = EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=2)
    local, server = TorchEngine(cfg), EngineServer(TorchEngine(cfg))
    remote = RemoteEngine(server.handle)
    a, b = local.allocate(), remote.allocate()
    prompt = list(range(10, 40))
    logits = local.forward([a], [prompt])[0]
    ids = remote.forward_greedy([b], [prompt])[0]
    assert ids.shape == (len(prompt),) and torch.equal(ids, logits.argmax(-1))
    # the slot advanced as with logits: the next forward continues the same sequence
    assert torch.equal(remote.forward_greedy([b], [[7, 8]])[0], local.forward([a], [[7, 8]])[0].argmax(-1))
