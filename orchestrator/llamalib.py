"""llama-cpp-python, loaded once per process with llama.cpp's own log lines routed into
Python logging (warnings and errors always; the rest only at DEBUG), for the agent's engine and
the coordinator's tokenizer alike."""

from __future__ import annotations

import ctypes
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from orchestrator.prompt_pieces import SpecialToken

GGML_LOG_LEVELS: Final = {
    1: logging.DEBUG,
    2: logging.INFO,
    3: logging.WARNING,
    4: logging.ERROR,
}
"""ggml.h's ggml_log_level (NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5) to logging."""
GGML_LOG_CONTINUE: Final = 5
CXX_RUNTIME_SONAME: Final = "libstdc++.so.6"

llama_log = logging.getLogger("edgeorch.llama_cpp")
_llama: Any = None
_last_level = logging.DEBUG
"""Level of the last line, for llama.cpp's continuation lines."""


def _forward_log(level: int, text: bytes, user_data: Any) -> None:
    """llama.cpp's log lines into Python logging (INFO and below show only at DEBUG)."""
    global _last_level
    python_level = (
        _last_level if level == GGML_LOG_CONTINUE else GGML_LOG_LEVELS.get(level, logging.DEBUG)
    )
    _last_level = python_level
    if _silenced:
        return
    if python_level >= logging.WARNING or llama_log.isEnabledFor(logging.DEBUG):
        llama_log.log(
            max(python_level, logging.DEBUG), "%s", text.decode("utf-8", "replace").rstrip()
        )


_log_callback: Any = None
_silenced = False


@contextmanager
def silenced() -> Iterator[None]:
    """Drop llama.cpp's log lines for a block whose warnings are known to be spurious (a
    vocabulary-only load warns that its context exceeds a training context of 0)."""
    global _silenced
    _silenced = True
    try:
        yield
    finally:
        _silenced = False


def load_cxx_runtime_first() -> None:
    """Put the C++ runtime in the process's global symbol scope before llama.cpp's libraries.

    A CUDA 13 build's libggml-cuda.so carries copies of libstdc++ functions from a static
    archive and exports them. llama-cpp-python loads it into the global scope before libstdc++,
    so libllama's stream calls bound to those copies, whose locale data is not the process's,
    and every model load died with SIGSEGV in `llama_model::print_info` (an H200 with CUDA
    13.0, 2026-12-04; llama.cpp PR 22434 shows the same stack). Loaded first, libstdc++ wins
    every binding. It is loaded by soname, so the loader takes the copy this Python would take
    anyway (one already loaded, or a conda environment's own, newer than the system's)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(CXX_RUNTIME_SONAME, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        llama_log.debug("could not load %s first: %s", CXX_RUNTIME_SONAME, exc)


def llama_cpp() -> Any:
    """The llama_cpp module with its backend initialised once per process and llama.cpp's
    logging routed through Python's (the callback is kept alive in a module global)."""
    global _llama
    if _llama is None:
        load_cxx_runtime_first()
        import llama_cpp as module

        global _log_callback
        _log_callback = module.llama_log_callback(_forward_log)
        module.llama_log_set(_log_callback, ctypes.c_void_p(0))
        module.llama_backend_init()
        _llama = module
    return _llama


def tokenize(vocab: Any, text: str, *, add_bos: bool, special: bool) -> list[int]:
    """``text``'s token ids in ``vocab`` (a ``llama_vocab`` pointer), by one call into
    llama.cpp with a buffer the prompt's size (llama-cpp-python's ``tokenize`` zeroes one of the
    model's whole training context, 128 KiB for Gemma 3, every call). ``special`` parses
    control-token texts (``<start_of_turn>``) as the control tokens, as llama-server does."""
    lib = llama_cpp()
    data = text.encode("utf-8")
    capacity = len(data) + 2
    tokens = (lib.llama_token * capacity)()
    n = lib.llama_tokenize(vocab, data, len(data), tokens, capacity, add_bos, special)
    if n < 0:
        tokens = (lib.llama_token * -n)()
        n = lib.llama_tokenize(vocab, data, len(data), tokens, -n, add_bos, special)
    ids: list[int] = tokens[:n]
    return ids


SPECIAL_ATTRS: Final = (
    "LLAMA_TOKEN_ATTR_CONTROL",
    "LLAMA_TOKEN_ATTR_USER_DEFINED",
    "LLAMA_TOKEN_ATTR_UNKNOWN",
)
"""The attributes of the tokens llama.cpp matches by their text in a prompt."""


def special_tokens(vocab: Any) -> list[SpecialToken]:
    """Every token of ``vocab`` llama.cpp matches by its text when it parses special tokens
    (``UnicodeDecodeError`` when one's text is not UTF-8)."""
    lib = llama_cpp()
    mask = 0
    for name in SPECIAL_ATTRS:
        mask |= getattr(lib, name)
    found = []
    for token in range(lib.llama_vocab_n_tokens(vocab)):
        attr = lib.llama_vocab_get_attr(vocab, token)
        if attr & mask:
            text = lib.llama_vocab_get_text(vocab, token).decode("utf-8")
            found.append(
                SpecialToken(
                    text,
                    control=bool(attr & lib.LLAMA_TOKEN_ATTR_CONTROL),
                    strips=bool(attr & (lib.LLAMA_TOKEN_ATTR_LSTRIP | lib.LLAMA_TOKEN_ATTR_RSTRIP)),
                    rstrip=bool(attr & lib.LLAMA_TOKEN_ATTR_RSTRIP),
                )
            )
    return found


def tokenizes_pieces_alone(vocab: Any) -> bool:
    """Whether ``vocab`` tokenizes each stretch of text between special tokens on its own and
    adds nothing after the last (SentencePiece and BPE vocabularies without an added EOS)."""
    lib = llama_cpp()
    kind = lib.llama_vocab_type(vocab)
    return kind in (lib.LLAMA_VOCAB_TYPE_SPM, lib.LLAMA_VOCAB_TYPE_BPE) and not bool(
        lib.llama_vocab_get_add_eos(vocab)
    )
