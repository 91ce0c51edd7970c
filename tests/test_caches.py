"""The cache registry: ``attnfuse.reset()`` clears every cache, each cache is bounded, and caches shared by
two models optimized and run in two threads at once keep both models' outputs right."""
import copy
import math
import threading

import pytest
import torch
from torch import nn

import attnfuse
from attnfuse import caches
from attnfuse.canonical import _CANONICALIZERS


def test_reset_clears_every_registered_cache_and_keeps_the_rules():
    cache = caches.Cache("test_caches.reset", maxsize=4)
    cache.put("a", 1)
    model = attnfuse.optimize(CausalAttention())
    model(torch.randn(2, 5, 16))
    shared = [c for c in caches.registered() if c.name == "capture.backends"]
    assert len(shared) == 1 and len(shared[0]) >= 1 and len(cache) == 1
    rules = list(_CANONICALIZERS)
    attnfuse.reset()
    assert all(len(c) == 0 for c in caches.registered())
    assert _CANONICALIZERS == rules  # the spelling rules are a registry, not a cache
    fresh = attnfuse.optimize(CausalAttention())
    fresh(torch.randn(2, 5, 16))
    assert attnfuse.report(fresh).fused == 1


def test_a_cache_is_bounded_and_drops_the_least_recently_used_entry():
    cache = caches.Cache("test_caches.bounded", maxsize=2)
    cache["a"], cache["b"] = 1, 2
    assert cache.get("a") == 1  # "a" is now the most recently used
    cache.put("c", 3)
    assert "b" not in cache and cache["a"] == 1 and cache["c"] == 3 and len(cache) == 2
    assert cache.get("b", "missing") == "missing"
    with pytest.raises(KeyError):
        cache["b"]
    cache.clear()
    assert len(cache) == 0


def test_an_unhashable_key_is_never_stored_and_never_found():
    """Keys holding sizes a tracer made symbolic cannot be hashed: every call creates, nothing is stored."""
    cache = caches.Cache("test_caches.unhashable", maxsize=4)
    key = ("shape", [1, 2])  # unhashable, as a tuple holding a non-nested SymInt is
    created = []
    assert cache.get_or_create(key, lambda: created.append(1) or len(created)) == 1
    assert cache.get_or_create(key, lambda: created.append(1) or len(created)) == 2
    cache.put(key, 3)
    assert cache.get(key, "missing") == "missing" and cache.peek(key) is None and key not in cache
    assert cache.setdefault(key, 4) == 4 and len(cache) == 0


def test_a_name_is_registered_once():
    caches.Cache("test_caches.once", maxsize=1)
    with pytest.raises(ValueError, match="already registered"):
        caches.Cache("test_caches.once", maxsize=1)


def test_threads_creating_one_entry_at_once_all_get_the_first_one_stored():
    cache = caches.Cache("test_caches.threads", maxsize=8)
    start, got = threading.Barrier(8), []

    def worker():
        start.wait()
        got.append(cache.get_or_create("key", object))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 8 and all(value is got[0] for value in got) and cache["key"] is got[0]


class CausalAttention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)


class PaddedAttention(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.heads, self.qkv = heads, nn.Linear(dim, 3 * dim)

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
        s = s.masked_fill(~keep[:, None, None, :], torch.finfo(s.dtype).min)
        return torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v).transpose(1, 2).reshape(b, n, -1)


def _padded_inputs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = torch.rand(3, n) > 0.3
    keep[:, 0] = True  # every row keeps a key
    return torch.randn(3, n, 24), keep


def test_two_models_optimized_and_run_in_two_threads_at_once_give_their_own_outputs():
    torch.manual_seed(0)
    causal, padded = CausalAttention().eval(), PaddedAttention().eval()
    calls = {"causal": (causal, [(torch.randn(2, n, 16),) for n in (5, 7, 5, 9)]),
             "padded": (padded, [_padded_inputs(n) for n in (6, 6, 8, 4)])}
    with torch.no_grad():
        expected = {name: [model(*args) for args in inputs] for name, (model, inputs) in calls.items()}
    start, outputs, errors = threading.Barrier(2), {}, []

    def run(name):
        try:
            model, inputs = calls[name]
            optimized = attnfuse.optimize(copy.deepcopy(model))
            start.wait()
            with torch.no_grad():
                outputs[name] = [optimized(*args) for args in inputs]
            outputs[name + " report"] = attnfuse.report(optimized)
        except Exception as error:  # surfaced below, with the thread's name
            errors.append((name, error))

    threads = [threading.Thread(target=run, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name in calls:
        assert outputs[name + " report"].fused == 1, str(outputs[name + " report"])
        for got, want in zip(outputs[name], expected[name]):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
