"""Choosing each next token, and its text, on a llama.cpp vocabulary.

Greedy decoding takes a numpy argmax over the logits (cheaper than llama.cpp's sampler over a
262k vocabulary); other settings use llama.cpp's sampler chain per sequence. With
``ignore_eos`` the end-of-generation tokens can never be chosen.
"""

from __future__ import annotations

import ctypes
from typing import Any, Final

import numpy as np

from orchestrator.protocol import GenerationParams

PIECE_BUFFER_BYTES: Final = 256


class Sampling:
    def __init__(self, lib: Any, vocab: Any) -> None:
        self._lib = lib
        self._vocab = vocab
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.eog = np.array(
            [t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(vocab, t)], dtype=np.int64
        )
        self._piece = ctypes.create_string_buffer(PIECE_BUFFER_BYTES)

    def is_eog(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def chain(self, params: GenerationParams) -> Any:
        """None for greedy decoding (numpy argmax); else llama.cpp's chain (free it with
        ``free``)."""
        if params.temperature == 0.0:
            return None
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.ignore_eos and self.eog.size:
            biases = (lib.llama_logit_bias * self.eog.size)()
            for i, token in enumerate(self.eog):
                biases[i].token = int(token)
                biases[i].bias = float("-inf")
            lib.llama_sampler_chain_add(
                chain, lib.llama_sampler_init_logit_bias(self.n_vocab, self.eog.size, biases)
            )
        if params.top_k > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_min_p(params.min_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else lib.LLAMA_DEFAULT_SEED
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def free(self, chain: Any) -> None:
        if chain is not None:
            self._lib.llama_sampler_free(chain)

    def sample(self, ctx: Any, row: int, chain: Any, ignore_eos: bool) -> int:
        """The next token from the logits of batch row ``row``."""
        if chain is not None:
            return int(self._lib.llama_sampler_sample(chain, ctx, row))
        logits = np.ctypeslib.as_array(
            self._lib.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,)
        )
        if ignore_eos and self.eog.size:
            logits[self.eog] = -np.inf
        return int(logits.argmax())

    def token_bytes(self, token: int) -> bytes:
        lib = self._lib
        n = lib.llama_token_to_piece(self._vocab, token, self._piece, PIECE_BUFFER_BYTES, 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self._vocab, token, buffer, -n, 0, False)
            return buffer.raw[:n]
        return self._piece.raw[:n]
