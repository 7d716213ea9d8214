"""Fine-tuning the sentence encoder on answer lengths. Training only: needs the `train` extra.

Why: a frozen MiniLM under a linear head ranked held-out alpaca_eval prompts at Kendall tau
0.536; adapting the encoder's weights to the task raised the same grouped measurement
(docs/PREDICTOR_RESULTS.md, section 2).

Method, LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"): a ridge
fit on the frozen embeddings (the linear probe) initialises the head, so the first gradient
steps refine the pretrained features instead of scrambling them to fit a random head. Then
encoder and heads train together for a few epochs at a small learning rate on three losses:
- weighted squared error on each prompt's length target, standardised within its source;
- a pairwise logistic loss on the pairs of a batch, because the scheduler uses the ranking;
- squared error on each answering model's own standardised length, through one more linear
  head (an auxiliary task: twelve models' answers say more about a prompt than their mean).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from orchestrator.predictor.features import PromptTokenizer

EPOCHS = 3
#: AdamW learning rate of the encoder; the heads learn HEAD_LR_FACTOR times faster.
ENCODER_LR = 2.0e-5
HEAD_LR_FACTOR = 10.0
WEIGHT_DECAY = 0.01
BATCH_PROMPTS = 16
#: Weight of the in-batch pairwise ranking loss against the squared error.
PAIR_LOSS_WEIGHT = 1.0
#: Pairs whose standardised targets differ by less than this are ties, not ranked.
PAIR_MIN_GAP = 0.1
#: Weight of the per-model auxiliary loss.
AUX_LOSS_WEIGHT = 1.0
#: The auxiliary head's outputs are scaled up by this so that it learns at the rate of a
#: head on unnormalised features (the embeddings are unit vectors).
AUX_OUTPUT_SCALE = 10.0
#: Ridge penalty of the linear probe on the unit-length embeddings.
PROBE_PENALTY = 0.01


def standardise_columns(values: np.ndarray) -> np.ndarray:
    """Each column to mean 0 and standard deviation 1 over its finite entries (NaN kept)."""
    mean = np.nanmean(values, axis=0)
    std = np.nanstd(values, axis=0)
    return (values - mean) / np.where(std > 0, std, 1.0)


def finetune_encoder(
    encoder: Any,
    tokenizer: PromptTokenizer,
    prompts: list[str],
    target: np.ndarray,
    weights: np.ndarray,
    aux_targets: np.ndarray,
    frozen_embeddings: np.ndarray,
    seed: int,
    progress: bool = True,
) -> None:
    """Train `encoder` (a build_encoder module) in place.

    target: (n,) standardised length per prompt; weights: (n,) its loss weights;
    aux_targets: (n, k) standardised per-model lengths, NaN where a model did not answer;
    frozen_embeddings: (n, d) the untrained encoder's embeddings, for the linear probe.
    """
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    frozen = frozen_embeddings.astype(np.float64)
    w = weights / weights.mean()
    y_mean = float(np.average(target, weights=w))
    gram = frozen.T @ (frozen * w[:, None]) + PROBE_PENALTY * np.eye(frozen.shape[1])
    probe = np.linalg.solve(gram, frozen.T @ (w * (target - y_mean)))

    head = torch.nn.Linear(frozen.shape[1], 1)
    aux_head = torch.nn.Linear(frozen.shape[1], aux_targets.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe[None, :].astype(np.float32)))
        head.bias.fill_(y_mean)
        aux_head.weight.zero_()
        aux_head.bias.zero_()
    optimiser = torch.optim.AdamW(
        [
            {"params": encoder.parameters(), "lr": ENCODER_LR},
            {
                "params": [*head.parameters(), *aux_head.parameters()],
                "lr": ENCODER_LR * HEAD_LR_FACTOR,
            },
        ],
        weight_decay=WEIGHT_DECAY,
    )
    n = len(prompts)
    batches = (n + BATCH_PROMPTS - 1) // BATCH_PROMPTS
    total_steps = EPOCHS * batches
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: max(0.0, 1.0 - step / total_steps)
    )
    y_all = torch.tensor(target, dtype=torch.float32)
    w_all = torch.tensor(w, dtype=torch.float32)
    aux_mask_all = torch.tensor(~np.isnan(aux_targets), dtype=torch.float32)
    aux_all = torch.tensor(np.nan_to_num(aux_targets, nan=0.0), dtype=torch.float32)
    encoder.train()
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        running = 0.0
        for start in range(0, n, BATCH_PROMPTS):
            idx = order[start : start + BATCH_PROMPTS]
            batch = tokenizer.batch([prompts[i] for i in idx])
            emb = encoder(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask))
            pred = head(emb).squeeze(-1)
            y, bw = y_all[idx], w_all[idx]
            loss = (bw * (pred - y) ** 2).sum() / bw.sum()
            gap = y[:, None] - y[None, :]
            ranked = (gap.abs() > PAIR_MIN_GAP).to(pred.dtype)
            margin = torch.sign(gap) * (pred[:, None] - pred[None, :])
            pair_loss = torch.nn.functional.softplus(-margin) * ranked
            loss = loss + PAIR_LOSS_WEIGHT * pair_loss.sum() / ranked.sum().clamp(min=1.0)
            aux_mask = aux_mask_all[idx]
            aux_error = (aux_head(emb) * AUX_OUTPUT_SCALE - aux_all[idx]) ** 2 * aux_mask
            loss = loss + AUX_LOSS_WEIGHT * aux_error.sum() / aux_mask.sum().clamp(min=1.0)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            running += float(loss.detach())
        if progress:
            mean_loss = running / batches
            print(f"  fine-tuning epoch {epoch + 1}/{EPOCHS}: loss {mean_loss:.4f}", flush=True)
    encoder.eval()
