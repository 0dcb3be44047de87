"""Shared fixtures: a tiny recipe (2-layer model, a few steps) that every end-to-end test starts from."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]

TINY: dict[str, Any] = {
    "name": "tiny-test",
    "seed": 0,
    "model": {
        "model_type": "llama",
        "config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        },
        "tokenizer": {"kind": "char"},
    },
    "data": {"task": "synthetic_text", "params": {"num_docs": 40, "doc_chars": 128}, "seq_len": 32, "batch_size": 8},
    "trainer": {"max_steps": 6, "lr": 3e-3, "warmup_steps": 1, "log_every": 2},
    "mitigations": [{"name": "noop"}],
    "evals": [{"name": "positional_loss", "seq_len": 64, "bucket_size": 16, "num_examples": 8, "batch_size": 8}],
    "tracking": {"wandb": {"mode": "offline"}},
}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module: tiny models gain nothing from more, and on a busy 2-core machine two
    threads spin against other processes (a 2 s test became 30 s). Use with ``pytestmark =
    pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_recipe() -> dict[str, Any]:
    """A fresh copy of the tiny recipe (tests mutate it)."""
    return copy.deepcopy(TINY)


@pytest.fixture
def write_recipe(tmp_path: Path):
    """``write_recipe(data, name="r.yaml") -> Path``: a recipe file under tmp_path whose runs go to tmp_path/runs."""

    def _write(data: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            data = copy.deepcopy(data)
            data.setdefault("output_dir", str(tmp_path / "runs"))
            path.write_text(f"# llm-limits train {path}\n" + yaml.safe_dump(data, sort_keys=False))
        return path

    return _write
