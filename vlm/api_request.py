"""Chat Completions requests (OpenAI's format) checked against the server's own lists and ranges, and
turned into a vlm conversation plus generation options.

`parse(body, models, bounds)` checks everything a request carries before anything runs: the model against
the served list, every message and content part, every option against the ranges below, and the media
counts and sizes against the upload limits (a data URL's size from its length, before decoding). Then
`MediaFiles.write` puts the media into a temporary directory of the request's own, deleted by `close()`:
a request never names a server path. Errors are `ApiError`s carrying their HTTP status.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import InputError, MediaError
from .media_urls import SUFFIXES, DataUrl, TooLargeError, allowed_host, fetch, parse_data_url, write_data_url

MAX_MESSAGES = 1000
MAX_TEXT_CHARS = 1_000_000  # text in one request, all messages together
MAX_STOP_SEQUENCES, MAX_STOP_CHARS = 4, 200
# Inclusive ranges, as the chat tab's sliders (vlm/ui/chat.py) offer them.
TEMPERATURE = (0.0, 2.0)
TOP_P = (0.001, 1.0)
TOP_K = (-1, 200)  # -1 and 0: off
REPETITION_PENALTY = (0.8, 2.0)
SEED = (0, 2**63 - 1)
FPS = (0.01, 1000.0)

# Parameters taken only at their neutral value (what clients such as LangChain send by default).
NEUTRAL = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
PARAMETERS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
              "stream", "stream_options", "user", *NEUTRAL,
              # extras (extra_body in the openai client), as vLLM and SGLang name them
              "top_k", "repetition_penalty", "min_pixels", "max_pixels", "fps", "num_frames", "thinking_budget",
              "enable_thinking", "skip_special_tokens"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = {"role", "content", "name"}
ASSISTANT_FIELDS = {"reasoning_content", "reasoning", "refusal", "tool_calls"}  # the last two only when empty
MEDIA_PARTS = {"image_url": "image", "video_url": "video"}


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ServedModel:
    """A name clients put in "model", and what the session manager loads for it."""

    id: str
    family: str
    source: str


@dataclass(frozen=True)
class Bounds:
    """The server's limits a request is checked against."""

    max_new_tokens: int
    max_images: int  # images in a conversation; videos are counted apart with the same cap
    max_frames: int
    max_file_bytes: int  # one image or video, as an upload
    max_image_pixels: int
    allowed_hosts: tuple[str, ...] = ()  # hosts whose http(s) URLs are fetched (none by default)


@dataclass
class MediaRef:
    """An image or video of the request: where it is, and the conversation part that will hold its file."""

    kind: str  # "image" | "video"
    where: str  # e.g. "messages[1].content[0]"
    name: str  # file name stem, e.g. "message1-part0"
    data: DataUrl | None  # None: an URL of an allowed host
    url: str
    part: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChatRequest:
    model: ServedModel
    conversation: list[dict[str, Any]]  # vlm's format; media parts get their paths from MediaFiles.write
    media: list[MediaRef]
    options: dict[str, Any]  # for SessionManager.generate
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = False  # True: box markup tokens are left out of the text


def parse(body: Any, models: Mapping[str, ServedModel], bounds: Bounds) -> ChatRequest:
    """Check a decoded JSON body; ApiError (400, 404 or 413) names the first thing wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    for name in body:
        if name not in PARAMETERS:
            raise ApiError(400, f"Unsupported parameter: {name!r}.", code="unsupported_parameter", param=name)
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and (value != neutral or isinstance(value, bool) != isinstance(neutral, bool)):
            raise ApiError(400, f"{name} must be {neutral!r} on this server, not {value!r}.",
                           code="unsupported_value", param=name)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required: one of the ids GET /v1/models lists.", param="model")
    if model not in models:
        raise ApiError(404, f"The model {model!r} does not exist on this server; GET /v1/models lists "
                            f"{', '.join(sorted(models))}.", code="model_not_found", param="model")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string.", param="user")
    stream = _flag(body, "stream") or False
    conversation, media = _messages(body.get("messages"), bounds)
    return ChatRequest(models[model], conversation, media, _options(body, bounds), stream, _include_usage(body, stream),
                       _stop(body.get("stop")), _flag(body, "skip_special_tokens") or False)


# ------------------------------------------------------------------------------------------- options
def _options(body: dict[str, Any], bounds: Bounds) -> dict[str, Any]:
    """Generation options for the session manager (None: the checkpoint's own value)."""
    tokens = {name: _integer(body, name, 1, bounds.max_new_tokens) for name in ("max_completion_tokens", "max_tokens")}
    if None not in tokens.values() and len(set(tokens.values())) > 1:
        raise ApiError(400, "max_tokens and max_completion_tokens differ; give one of them.", param="max_tokens")
    temperature = _number(body, "temperature", *TEMPERATURE)
    top_k = _integer(body, "top_k", *TOP_K)
    options: dict[str, Any] = {
        "max_new_tokens": tokens["max_completion_tokens"] or tokens["max_tokens"] or bounds.max_new_tokens,
        "do_sample": None if temperature is None else temperature > 0,
        "temperature": temperature or None,
        "top_p": _number(body, "top_p", *TOP_P),
        "top_k": None if top_k is None else max(top_k, 0),
        "repetition_penalty": _number(body, "repetition_penalty", *REPETITION_PENALTY),
        "seed": _integer(body, "seed", *SEED),
        "min_pixels": _integer(body, "min_pixels", 1, bounds.max_image_pixels),
        "max_pixels": _integer(body, "max_pixels", 1, bounds.max_image_pixels),
        "fps": _number(body, "fps", *FPS),
        "num_frames": _integer(body, "num_frames", 1, bounds.max_frames),
        "thinking_budget": _integer(body, "thinking_budget", 0, bounds.max_new_tokens),
        "enable_thinking": _flag(body, "enable_thinking"),
    }
    if None not in (options["min_pixels"], options["max_pixels"]) and options["min_pixels"] > options["max_pixels"]:
        raise ApiError(400, "min_pixels is larger than max_pixels.", param="min_pixels")
    if options["fps"] is not None and options["num_frames"] is not None:
        raise ApiError(400, "Give either fps or num_frames for videos, not both.", param="fps")
    return {name: value for name, value in options.items() if value is not None}


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{name} must be an integer, not {value!r}.", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high} on this server, not {value}.", param=name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, not {value!r}.", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g} on this server, not {value:g}.",
                       param=name)
    return float(value)


def _flag(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, not {value!r}.", param=name)
    return value


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true.", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options takes only include_usage.", param="stream_options")
    return _flag(options, "include_usage") or False


def _stop(stop: Any) -> tuple[str, ...]:
    sequences = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(sequences, list) or len(sequences) > MAX_STOP_SEQUENCES or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in sequences):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} non-empty strings of "
                            f"at most {MAX_STOP_CHARS} characters.", param="stop")
    return tuple(sequences)


# ------------------------------------------------------------------------------------------ messages
def _messages(messages: Any, bounds: Bounds) -> tuple[list[dict[str, Any]], list[MediaRef]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list.", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"messages holds {len(messages)} messages; this server takes up to {MAX_MESSAGES}.",
                       param="messages")
    conversation, media, chars = [], [], 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"{where} must be an object with a role and a content.", param=where)
        role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ApiError(400, f"{where}.role is {message.get('role')!r}; this server takes system, developer, user "
                                "and assistant messages (no tools).", param=f"{where}.role")
        for name in message:
            if name not in MESSAGE_FIELDS | (ASSISTANT_FIELDS if role == "assistant" else set()) or (
                    name in ("refusal", "tool_calls") and message[name]):
                raise ApiError(400, f"{where} has {name!r}, which this server does not take.", param=f"{where}.{name}")
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list) and content:
            parts = [_part(part, role, f"{where}.content[{j}]", f"message{i}-part{j}", bounds, media)
                     for j, part in enumerate(content)]
            chars += sum(len(p.get("text", "")) for p in parts)
            content = parts
        else:
            raise ApiError(400, f"{where}.content must be a string or a non-empty list of parts.",
                           param=f"{where}.content")
        conversation.append({"role": role, "content": content})
    if chars > MAX_TEXT_CHARS:
        raise ApiError(413, f"The messages hold {chars:,} characters of text; this server takes up to "
                            f"{MAX_TEXT_CHARS:,}.", code="request_too_large", param="messages")
    for kind in ("image", "video"):
        count = sum(ref.kind == kind for ref in media)
        if count > bounds.max_images:
            raise ApiError(400, f"The conversation holds {count} {kind}s; this server takes up to "
                                f"{bounds.max_images}.", param="messages")
    return conversation, media


def _part(part: Any, role: str, where: str, name: str, bounds: Bounds, media: list[MediaRef]) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if set(part) != {"type", "text"} or not isinstance(part["text"], str):
            raise ApiError(400, f"{where} must be {{\"type\": \"text\", \"text\": \"...\"}}.", param=where)
        return {"type": "text", "text": part["text"]}
    if kind not in MEDIA_PARTS:
        raise ApiError(400, f"{where}.type is {kind!r}; use text, image_url or video_url.", param=where)
    if role != "user":
        raise ApiError(400, f"{where}: images and videos go in user messages.", param=where)
    target = part.get(kind)
    if set(part) != {"type", kind} or not isinstance(target, dict) or not isinstance(target.get("url"), str) or (
            set(target) - {"url", "detail"}):
        raise ApiError(400, f"{where} must be {{\"type\": \"{kind}\", \"{kind}\": {{\"url\": \"data:...\"}}}}.",
                       param=where)
    ref = _media(MEDIA_PARTS[kind], target["url"], where, name, bounds)
    media.append(ref)
    return ref.part


def _media(kind: str, url: str, where: str, name: str, bounds: Bounds) -> MediaRef:
    if url.startswith("data:"):
        data = _checked(parse_data_url, url, where)
        if not data.mime.startswith(kind + "/"):
            raise ApiError(400, f"{where} holds {data.mime}; {kind}_url takes a data:{kind}/... URL.",
                           param=where)
        if data.size > bounds.max_file_bytes:
            raise ApiError(413, f"{where}: the {kind} is {data.size:,} bytes; this server takes files up to "
                                f"{bounds.max_file_bytes:,} bytes.", code="file_too_large", param=where)
        return MediaRef(kind, where, name, data, "", {"type": kind})
    if url.split(":", 1)[0].lower() in ("http", "https"):
        if not allowed_host(url, bounds.allowed_hosts):
            raise ApiError(400, f"{where}: URLs are not fetched by this server; send the {kind} as a data URL "
                                f"(data:{kind}/...;base64,...).", code="url_not_allowed", param=where)
        return MediaRef(kind, where, name, None, url, {"type": kind})
    raise ApiError(400, f"{where}: give the {kind} as a data URL (data:{kind}/...;base64,...); paths and other URL "
                        "schemes are refused.", param=where)


def _checked(function, *args):
    """`function(*args)`, its InputError or MediaError as an ApiError (400; 413 when too large)."""
    try:
        return function(*args)
    except (InputError, MediaError) as exc:
        raise ApiError(413 if isinstance(exc, TooLargeError) else 400, str(exc)) from None


# ------------------------------------------------------------------------------------------ media files
class MediaFiles:
    """A request's temporary directory: `write` puts its media there, `close` deletes it."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="vlm-api-"))

    def write(self, media: list[MediaRef], bounds: Bounds) -> None:
        """Decode (or download) every media item into a file and point its conversation part at it."""
        for ref in media:
            if ref.data is not None:
                path = self.directory / (ref.name + SUFFIXES.get(ref.data.mime, ".bin"))
                _checked(write_data_url, ref.data, path, ref.where)
            else:
                path = self.directory / ref.name
                mime = _checked(fetch, ref.url, path, bounds.max_file_bytes, ref.where)
                if not mime.startswith(ref.kind + "/"):
                    raise ApiError(400, f"{ref.where}: {ref.url} is {mime or 'of no declared type'}, not a {ref.kind}.",
                                   param=ref.where)
                path = path.rename(path.with_suffix(SUFFIXES.get(mime, ".bin")))
            ref.part["path"] = str(path)

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
