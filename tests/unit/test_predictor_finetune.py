"""The encoder fine-tuning loop, on a tiny bag-of-words encoder (runs only with the `train`
extra: `make test` has no torch, where the recipe's output is checked by the parity test).

The encoder's vectors are 2-d, so ten random word vectors are not linearly separable into
long-answer and short-answer words: a probe on the untrained encoder ranks poorly, and only
moving the vectors themselves (fine-tuning) can fix that."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from orchestrator.predictor import finetune
from orchestrator.predictor.encoder_export import minilm_dir
from orchestrator.predictor.evaluate import kendall_tau_b
from orchestrator.predictor.features import PromptTokenizer

torch = pytest.importorskip("torch")

LONG_WORDS = ("essay", "detail", "story", "explain", "article")
SHORT_WORDS = ("word", "yes", "name", "number", "short")


def bag_of_words_encoder(seed: int) -> Any:
    """Mean of learned token vectors, L2-normalised: the interface of build_encoder."""
    torch.manual_seed(seed)

    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vectors = torch.nn.Embedding(30522, 2)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            m = attention_mask.unsqueeze(-1).float()
            pooled = (self.vectors(input_ids) * m).sum(1) / m.sum(1)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return Bag()


def embed(encoder: Any, tokenizer: PromptTokenizer, prompts: list[str]) -> np.ndarray:
    batch = tokenizer.batch(prompts)
    with torch.no_grad():
        out = encoder(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
    return np.asarray(out.numpy(), dtype=np.float64)


def prompts_and_targets(n: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts, lengths = [], []
    for i in range(n):
        long = i % 2 == 0
        word = (LONG_WORDS if long else SHORT_WORDS)[int(rng.integers(5))]
        prompts.append(f"please {word}")
        lengths.append(float(rng.normal(6.0 if long else 3.0, 0.5)))
    y = np.asarray(lengths)
    return prompts, (y - y.mean()) / y.std()


def held_out_tau(
    encoder: Any,
    tokenizer: PromptTokenizer,
    train: list[str],
    y: np.ndarray,
    test: list[str],
    y_test: np.ndarray,
) -> float:
    """Kendall tau on held-out prompts of a least-squares probe fitted on the training ones."""
    x = np.hstack([embed(encoder, tokenizer, train), np.ones((len(train), 1))])
    coef = np.linalg.lstsq(x, y, rcond=None)[0]
    x_test = np.hstack([embed(encoder, tokenizer, test), np.ones((len(test), 1))])
    return kendall_tau_b(x_test @ coef, y_test)


def test_fine_tuning_learns_the_ranking_and_is_seeded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(finetune, "EPOCHS", 30)
    monkeypatch.setattr(finetune, "ENCODER_LR", 0.05)
    tokenizer = PromptTokenizer(minilm_dir() / "tokenizer.json")
    train, y = prompts_and_targets(64, seed=0)
    test, y_test = prompts_and_targets(40, seed=1)
    aux = np.stack([y, np.full_like(y, np.nan)], axis=1)
    aux[::3, 1] = y[::3]
    before = held_out_tau(bag_of_words_encoder(seed=1), tokenizer, train, y, test, y_test)
    tuned = []
    for _ in range(2):
        encoder = bag_of_words_encoder(seed=1)
        frozen = embed(encoder, tokenizer, train)
        finetune.finetune_encoder(
            encoder, tokenizer, train, y, np.ones(len(train)), aux, frozen, seed=3, progress=False
        )
        tuned.append(encoder)
    after = held_out_tau(tuned[0], tokenizer, train, y, test, y_test)
    assert after > before + 0.15  # measured 0.04 -> 0.30
    assert np.array_equal(embed(tuned[0], tokenizer, test), embed(tuned[1], tokenizer, test))
