"""OpenAI request bodies (``/v1/completions``, ``/v1/chat/completions``) validated into what the
coordinator runs: a prompt and ``GenerationParams``, or a typed error naming the field.

Fields map onto ``GenerationParams`` (``max_tokens`` or ``max_completion_tokens``,
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``ignore_eos``,
``cache_prompt``, and the extension ``priority``); features edgeorch lacks are refused by name.
Chat prompts use the model's GGUF chat template when the coordinator loaded it, else the plain
format documented at ``render_chat``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from pydantic import ValidationError

from orchestrator.errors import InternalError, InvalidRequest, ModelNotFound, Unsupported
from orchestrator.predictor.conversation import ANSWERS_READ
from orchestrator.protocol import MAX_STOP_STRINGS, ConversationHint, GenerationParams
from orchestrator.tokens import ChatTemplate

DEFAULT_COMPLETION_MAX_TOKENS: Final = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""
PLAIN_CHAT_LABELS: Final = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
}
PLAIN_CHAT_STOPS: Final = ("\nUser:", "\nSystem:")
"""Stop strings added to plain-format chats so a base model does not write the next turn."""


@dataclass(frozen=True, slots=True)
class ModelView:
    """What the gateway knows of the served models when it parses a request."""

    served: Mapping[str, int]
    """Model name -> the smallest n_ctx among live agents serving it."""
    template: ChatTemplate | None
    count_tokens: Callable[[str, str | None, bool], int]
    """Tokens of a text for a model, the text being a chat's prompt or not (``TokenCounter``)."""


@dataclass(slots=True)
class Call:
    """One parsed OpenAI request, ready to submit."""

    kind: Literal["completion", "chat"]
    prompt: str
    params: GenerationParams
    stream: bool
    include_usage: bool
    model: str
    strip_leading: bool = False
    """Plain-format chat: drop the whitespace the model writes after ``Assistant:``."""
    conversation: ConversationHint | None = None
    """Chat: what the length predictor reads instead of the rendered prompt."""
    created: int = field(default_factory=lambda: int(time.time()))

    def response_id(self, request_id: str) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{request_id}"


def parse_completion(body: Mapping[str, Any], models: ModelView) -> Call:
    _refuse_unsupported(body, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        elif prompt and all(isinstance(p, str) for p in prompt):
            raise Unsupported(
                f"batched prompts ({len(prompt)} in one request); send one request per prompt",
                field="prompt",
            )
        else:
            raise Unsupported("token-id prompts; send the prompt as text", field="prompt")
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", field="prompt")
    model = _model(body, models)
    max_tokens = _int(body, "max_tokens")
    return Call(
        kind="completion",
        prompt=prompt,
        params=_params(
            body, model, max_tokens if max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        ),
        stream=_bool(body, "stream"),
        include_usage=_include_usage(body),
        model=model or _only_model(models) or "",
    )


def parse_chat(body: Mapping[str, Any], models: ModelView) -> Call:
    _refuse_unsupported(body, chat=True)
    messages = _messages(body)
    model = _model(body, models)
    target = model or _only_model(models)
    template = models.template
    if template is not None and template.model_name != target:
        template = None
    prompt, stops = render_chat(messages, template)
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is None:
        max_tokens = _rest_of_context(prompt, target, models)
    return Call(
        kind="chat",
        prompt=prompt,
        params=_params(body, model, max_tokens, extra_stops=stops),
        stream=_bool(body, "stream"),
        include_usage=_include_usage(body),
        model=target or "",
        strip_leading=template is None,
        conversation=conversation_hint(
            messages, lambda text: models.count_tokens(text, target, False)
        ),
    )


def conversation_hint(
    messages: Sequence[tuple[str, str]], count_tokens: Callable[[str], int]
) -> ConversationHint | None:
    """The latest user message and the token lengths of the assistant's answers before it
    (the last ANSWERS_READ, the ones the predictor reads); None without user text."""
    users = [i for i, (role, text) in enumerate(messages) if role == "user" and text]
    if not users:
        return None
    answers = [text for role, text in messages[: users[-1]] if role == "assistant" and text]
    return ConversationHint(
        last_user=messages[users[-1]][1],
        earlier_answer_tokens=tuple(count_tokens(t) for t in answers[-ANSWERS_READ:]),
    )


def render_chat(
    messages: Sequence[tuple[str, str]], template: ChatTemplate | None
) -> tuple[str, tuple[str, ...]]:
    """The prompt for ``messages`` ((role, text) pairs) and the stop strings it needs.

    With a template: the template rendered with ``add_generation_prompt`` (without a leading
    BOS text, which the agent adds itself). Without one, the plain format::

        System: <system or developer text>
        User: <text>
        Assistant: <text>
        User: <text>
        Assistant:

    one line per message, labels as in ``PLAIN_CHAT_LABELS``, with ``PLAIN_CHAT_STOPS`` as extra
    stop strings so the model's reply ends before it writes the next turn.
    """
    if template is None:
        lines = [f"{PLAIN_CHAT_LABELS[role]}: {text}" for role, text in messages]
        return "\n".join([*lines, "Assistant:"]), PLAIN_CHAT_STOPS
    import jinja2

    try:
        text = _compiled(template.source).render(
            messages=[
                {"role": "system" if role == "developer" else role, "content": content}
                for role, content in messages
            ],
            add_generation_prompt=True,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
            raise_exception=_template_refusal,
        )
    except jinja2.TemplateError as exc:
        raise InternalError(f"the chat template of {template.model_name} failed: {exc}") from None
    if template.bos_token and text.startswith(template.bos_token):
        text = text[len(template.bos_token) :]
    return text, ()


@functools.lru_cache(maxsize=4)
def _compiled(source: str) -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    return environment.from_string(source)


def _template_refusal(message: str) -> None:
    raise InvalidRequest(f"the model's chat template refused the messages: {message}")


def _refuse_unsupported(body: Mapping[str, Any], *, chat: bool) -> None:
    for name in ("n", "best_of"):
        value = body.get(name)
        if value is not None and value != 1:
            raise Unsupported(
                f"{name}={value!r}: edgeorch returns one choice per request; send several "
                "requests instead",
                field=name,
            )
    for name in ("tools", "functions"):
        if body.get(name):
            raise Unsupported(f"{name}: tool and function calling are not supported", field=name)
    for name in ("tool_choice", "function_call"):
        if body.get(name) not in (None, "none", "auto"):
            raise Unsupported(f"{name}: tool and function calling are not supported", field=name)
    logprobs = body.get("logprobs")
    if logprobs not in (None, False) and not (chat is False and logprobs == 0):
        raise Unsupported("logprobs are not supported", field="logprobs")
    if body.get("top_logprobs"):
        raise Unsupported("logprobs are not supported", field="top_logprobs")
    if not chat and body.get("echo"):
        raise Unsupported("echo is not supported; prepend the prompt yourself", field="echo")
    if not chat and body.get("suffix"):
        raise Unsupported("suffix (insertion) is not supported", field="suffix")
    for name, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("repetition_penalty", 1),
    ):
        if body.get(name) not in (None, neutral):
            raise Unsupported(f"{name} is not supported", field=name)
    if body.get("logit_bias"):
        raise Unsupported("logit_bias is not supported", field="logit_bias")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise Unsupported(
            "response_format other than text is not supported", field="response_format"
        )


def _messages(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", field="messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object", field=where)
        role = message.get("role")
        if role in ("tool", "function") or message.get("tool_calls"):
            raise Unsupported(f"{where}: tool messages are not supported", field=where)
        if role not in PLAIN_CHAT_LABELS:
            raise InvalidRequest(
                f"{where}.role must be one of {', '.join(PLAIN_CHAT_LABELS)}; got {role!r}",
                field=f"{where}.role",
            )
        parsed.append((str(role), _content(message.get("content"), where)))
    return parsed


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list", field=where)
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(kind, str):
            raise Unsupported(f"{where}: {kind} content is not supported", field=where)
        else:
            raise InvalidRequest(f"{where}.content has a malformed part", field=where)
    return "".join(texts)


def _model(body: Mapping[str, Any], models: ModelView) -> str | None:
    model = body.get("model")
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string", field="model")
    if models.served and model not in models.served:
        served = ", ".join(sorted(models.served))
        raise ModelNotFound(
            f"model {model!r} is not served by any live agent (served: {served})",
            field="model",
            model=model,
            served=served,
        )
    return model


def _only_model(models: ModelView) -> str | None:
    return next(iter(models.served)) if len(models.served) == 1 else None


def _rest_of_context(prompt: str, model: str | None, models: ModelView) -> int:
    """Chat's default max_tokens: what the prompt leaves of the smallest context that serves
    it (the coordinator refuses, with the numbers, if that is nothing)."""
    contexts = list(models.served.values())
    if model is not None and model in models.served:
        contexts = [models.served[model]]
    if not contexts:
        return GenerationParams().max_tokens
    return max(1, min(contexts) - models.count_tokens(prompt, model, True))


def _params(
    body: Mapping[str, Any],
    model: str | None,
    max_tokens: int,
    *,
    extra_stops: tuple[str, ...] = (),
) -> GenerationParams:
    fields: dict[str, Any] = {"max_tokens": max_tokens, "model": model}
    for name in ("temperature", "top_p", "min_p"):
        value = _float(body, name)
        if value is not None:
            fields[name] = value
    for name in ("top_k", "seed"):
        value = _int(body, name)
        if value is not None:
            fields[name] = value
    if fields.get("top_k") == -1:
        fields["top_k"] = 0  # vLLM's "no top-k"
    fields["ignore_eos"] = _bool(body, "ignore_eos")
    fields["cache_prompt"] = _bool(body, "cache_prompt", default=True)
    priority = body.get("priority")
    if priority is not None:
        if priority not in ("interactive", "batch"):
            raise InvalidRequest(
                f"priority must be 'interactive' or 'batch'; got {priority!r}", field="priority"
            )
        fields["priority"] = priority
    stops = _stops(body)
    fields["stop"] = (*stops, *(s for s in extra_stops if s not in stops))[
        : max(len(stops), MAX_STOP_STRINGS)
    ]
    try:
        return GenerationParams(**fields)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = str(first["loc"][0]) if first["loc"] else "request"
        raise InvalidRequest(f"invalid {name}: {first['msg']}", field=name) from None


def _stops(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise InvalidRequest("stop must be a string or a list of strings", field="stop")
    return tuple(s for s in stop if s)


def _int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{name} must be an integer; got {value!r}", field=name)
    return value


def _float(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(f"{name} must be a number; got {value!r}", field=name)
    return float(value)


def _bool(body: Mapping[str, Any], name: str, *, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidRequest(f"{name} must be true or false; got {value!r}", field=name)
    return value


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True
