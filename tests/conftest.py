"""Shared fixtures: tiny seeded llama checkpoints built at test time, and the demo model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_models import TinySpec, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> Path:
    """6 layers, hidden 256, 8 query heads in 2 KV groups, FFN 768, tied embeddings."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-tied"), TinySpec(tie_word_embeddings=True, seed=1))


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory) -> Path:
    """4 layers, untied output matrix, 4 query heads per KV head."""
    spec = TinySpec(tie_word_embeddings=False, num_hidden_layers=4, seed=2)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-untied"), spec)


@pytest.fixture(scope="session", params=["tied", "untied"])
def tiny_model(request, tiny_tied, tiny_untied) -> Path:
    return tiny_tied if request.param == "tied" else tiny_untied


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo checkpoint (SmolLM2-135M-Instruct) that scripts/setup.sh prepares."""
    from gguf_prune.models.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The fixture models are tiny: intra-op threads only add contention on a shared machine (2-4x slower).
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- bad input, counted

def pytest_configure(config):
    config.addinivalue_line("markers", "bad_input: one case of the README's 'bad input → what gguf-prune says' table")


def pytest_terminal_summary(terminalreporter):
    """How many bad-input cases ran, and how many gave their one clear message (the README table's count)."""
    reports = [r for k in ("passed", "failed") for r in terminalreporter.stats.get(k, [])
               if r.when == "call" and "bad_input" in r.keywords]
    if reports:
        ok = sum(r.passed for r in reports)
        terminalreporter.write_line(f"bad-input cases: {len(reports)} run, {ok} gave one clear message and left "
                                    f"every input as it was, {len(reports) - ok} did not")
