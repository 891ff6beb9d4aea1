"""A family served by an OpenAI-compatible server (vLLM, SGLang, `python -m vlm serve`) instead of weights.

Settings: VLM_REMOTE_<FAMILY>=http://host:8000/v1, optionally VLM_REMOTE_<FAMILY>_API_KEY and
VLM_REMOTE_<FAMILY>_MODEL (the server's name for the model; default: the first it lists), and
VLM_REMOTE_TIMEOUT (seconds to connect, and to wait for each piece of an answer; 120).

`RemotePipeline.connect(family, server)` checks that the server answers and serves the model. Its
`stream(conversation, cancel, **options)` takes the chat tab's options like ChatPipeline.stream and yields
the same Deltas: the reasoning (a server's reasoning_content / reasoning, or think tags in the content)
as "thinking", the rest as "answer", then a last delta with the report (finish reason, usage). Images
are decoded and checked by vlm.media's limits, downscaled to max_pixels (at most TRANSPORT_PIXELS) and
sent as PNG data URLs; videos are probed (the same limits) and sent as they are. Setting `cancel` shuts
the connection, which the server takes as the client going away. Box markup is asked for
(skip_special_tokens: false), so boxes can be drawn.
"""

from __future__ import annotations

import json
import math
import socket
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

import httpx  # a dependency of gradio
from PIL import Image

from .conversation import normalize
from .errors import ContextLengthError, InputError, RemoteError, ServerBusyError, VLMError
from .generation import Sampling
from .media import load_image, probe_video
from .media_urls import file_data_url, image_data_url
from .reasoning import ANSWER, THINKING, Delta, ReasoningParser, Report, ThinkingFormat

PREFIX, KEY, MODEL = "VLM_REMOTE_", "_API_KEY", "_MODEL"
TIMEOUT_SETTING = "VLM_REMOTE_TIMEOUT"
TRANSPORT_PIXELS = 12_845_056  # images are sent at most this large (Qwen2-VL's own largest, 3584 x 3584)
CONNECT_SECONDS = 10.0
WATCH_SECONDS = 0.05  # how often a stream looks at its cancel event
# The options ChatPipeline.stream takes, and the request field each becomes (None: handled apart).
OPTIONS = {"max_new_tokens": "max_tokens", "do_sample": None, "temperature": None, "top_p": "top_p",
           "top_k": "top_k", "repetition_penalty": "repetition_penalty", "seed": "seed", "min_pixels": "min_pixels",
           "max_pixels": "max_pixels", "fps": "fps", "num_frames": "num_frames",
           "thinking_budget": "thinking_budget", "enable_thinking": "enable_thinking"}


@dataclass(frozen=True)
class RemoteServer:
    url: str  # the API's base URL, e.g. http://host:8000/v1
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    timeout: float = 120.0


def servers_from_env(env: Mapping[str, str], families: Mapping[str, Any]) -> dict[str, RemoteServer]:
    """The VLM_REMOTE_<FAMILY> settings by family (ValueError for an unknown family or a URL that is not http)."""
    text = env.get(TIMEOUT_SETTING, "").strip()
    try:
        timeout = float(text) if text else RemoteServer.timeout
    except ValueError:
        raise ValueError(f"{TIMEOUT_SETTING}={text!r} is not a number of seconds.") from None
    servers = {}
    for name, value in env.items():
        if not name.startswith(PREFIX) or name.endswith((KEY, MODEL)) or name == TIMEOUT_SETTING or not value.strip():
            continue
        family = name[len(PREFIX):].lower()
        if family not in families:
            raise ValueError(f"{name} names no family; use one of {', '.join(f.upper() for f in families)}.")
        url = value.strip().rstrip("/")
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"{name}={value!r} is not an http(s) URL like http://host:8000/v1.")
        servers[family] = RemoteServer(url, env.get(name + KEY) or None, env.get(name + MODEL) or None, timeout)
    return servers


class RemotePipeline:
    """A client of one model on an OpenAI-compatible server, streaming like a ChatPipeline."""

    def __init__(self, family: str, server: RemoteServer, model: str, thinking: ThinkingFormat | None,
                 http: httpx.Client):
        self.family, self.server, self.model, self.thinking, self.http = family, server, model, thinking, http
        self.defaults = Sampling()  # the chat tab's starting values; the server applies its own when asked

    @classmethod
    def connect(cls, family: str, server: RemoteServer) -> "RemotePipeline":
        """Check the server answers and serves the model; RemoteError (ServerBusyError) says why not."""
        from .families import FAMILIES

        headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
        http = httpx.Client(base_url=server.url, headers=headers,
                            timeout=httpx.Timeout(server.timeout, connect=min(server.timeout, CONNECT_SECONDS)))
        try:
            model = _served_model(http, server, family)
        except BaseException:
            http.close()
            raise
        return cls(family, server, model, getattr(FAMILIES[family].module, "THINKING", None), http)

    # ------------------------------------------------------------------------------------------ stream
    def stream(self, conversation: Any, cancel: threading.Event | None = None, **options: Any) -> Iterator[Delta]:
        """Deltas of the server's answer to one conversation (see the module docstring)."""
        body = self.request(conversation, options)
        cancel = cancel or threading.Event()
        where = f"The server of {self.family} ({self.server.url})"
        try:
            with self.http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    response.read()
                    raise refusal(response, where)
                with _shut_on(cancel, response):
                    yield from self._deltas(response, cancel, where)
        except httpx.ConnectError as exc:
            raise RemoteError(f"{where} cannot be reached ({_reason(exc)}); it may have stopped. Try again "
                              "later.") from None
        except httpx.TimeoutException:
            if not cancel.is_set():
                raise RemoteError(f"{where} did not answer within {self.server.timeout:g} s; it may be overloaded. "
                                  "Try again later.") from None
        except httpx.HTTPError as exc:
            if not cancel.is_set():
                raise RemoteError(f"{where} went away mid-answer ({_reason(exc)}); the answer is incomplete. "
                                  "Ask again.") from None

    def request(self, conversation: Any, options: dict[str, Any]) -> dict[str, Any]:
        """The Chat Completions request body for a conversation and the chat tab's options."""
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise InputError(f"Unknown options: {', '.join(sorted(unknown))}")
        body: dict[str, Any] = {"model": self.model, "stream": True, "stream_options": {"include_usage": True},
                                "skip_special_tokens": False,
                                "messages": self.messages(conversation, options.get("max_pixels"))}
        body.update({OPTIONS[k]: v for k, v in options.items() if OPTIONS[k] and v is not None})
        if options.get("top_k") == 0:
            body["top_k"] = -1  # off, in every server's reading (older vLLM refuses 0)
        if options.get("do_sample") is False:
            body["temperature"] = 0.0
        elif options.get("do_sample") and options.get("temperature") is not None:
            body["temperature"] = options["temperature"]
        return body

    def messages(self, conversation: Any, max_pixels: int | None) -> list[dict[str, Any]]:
        """OpenAI messages: text as it is, images as PNG data URLs (checked, downscaled), videos as data URLs."""
        limit = min(max_pixels or TRANSPORT_PIXELS, TRANSPORT_PIXELS)
        out = []
        for message in normalize(conversation):
            content = message["content"]
            if not isinstance(content, str):
                content = [_part(part, limit) for part in content]
            out.append({"role": message["role"], "content": content})
        return out

    def _deltas(self, response: httpx.Response, cancel: threading.Event, where: str) -> Iterator[Delta]:
        parser = ReasoningParser(self.thinking) if self.thinking else None
        tokens, finish, counts = 0, None, {}
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            try:
                event = json.loads(data)
                choices, counts = event.get("choices") or [], event.get("usage") or counts
            except (ValueError, AttributeError):
                raise RemoteError(f"{where} sent an event that is not a chat completion chunk.") from None
            if event.get("error"):
                raise _error(event["error"], where)
            for choice in choices:
                delta = choice.get("delta") or {}
                finish = choice.get("finish_reason") or finish
                reasoning, content = delta.get("reasoning_content") or delta.get("reasoning"), delta.get("content")
                pieces = [Delta(reasoning, THINKING)] if reasoning else []
                pieces += (parser.feed(content) if parser else [Delta(content, ANSWER)]) if content else []
                tokens += bool(reasoning or content)  # a token per chunk until the usage says how many
                for piece in pieces:
                    piece.tokens = tokens
                    yield piece
        for piece in parser.flush() if parser else []:
            piece.tokens = tokens
            yield piece
        details = counts.get("prompt_tokens_details") or {}
        report = Report(None if cancel.is_set() else "length" if finish == "length" else "stop",
                        counts.get("prompt_tokens"), details.get("visual_tokens"))
        yield Delta("", tokens=counts.get("completion_tokens") or tokens, report=report)


def _served_model(http: httpx.Client, server: RemoteServer, family: str) -> str:
    """The configured model if the server lists it, else the first it lists."""
    where = f"The server of {family} ({server.url})"
    try:
        response = http.get("/models")
    except httpx.HTTPError as exc:
        raise RemoteError(f"{where} cannot be reached ({_reason(exc)}). Check that it is running and "
                          f"VLM_REMOTE_{family.upper()}.") from None
    if response.status_code != 200:
        raise refusal(response, where)
    try:
        served = [str(m["id"]) for m in response.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise RemoteError(f"{where} did not list its models at {server.url}/models.") from None
    model = server.model or (served[0] if served else None)
    if model not in served:
        raise RemoteError(f"{where} serves {', '.join(served) or 'no model'}, not {model}; set "
                          f"VLM_REMOTE_{family.upper()}_MODEL to one of them.")
    return model


def refusal(response: httpx.Response, where: str) -> VLMError:
    """The error for a response that is not 200: busy (429, 503), a refused key, a refused request."""
    try:
        body = response.json()
        error = body.get("error") or body  # OpenAI's {"error": {...}}, or vLLM's flat {"object": "error", ...}
    except (ValueError, AttributeError):
        error = {}
    if not isinstance(error, dict) or not error.get("message"):
        error = {"message": response.text[:300] or response.reason_phrase}
    status = response.status_code
    if status in (429, 503):
        return ServerBusyError(f"{where} is busy ({status}: {error['message']}). Try again in a moment.")
    if status in (401, 403):
        return RemoteError(f"{where} refused the API key ({status}); set VLM_REMOTE_<FAMILY>_API_KEY.")
    if status in (400, 413, 422):
        return _error(error, where)
    return RemoteError(f"{where} answered HTTP {status}: {error['message']}")


def _error(error: Any, where: str) -> VLMError:
    """A request error the server described: a context overflow, else an input error in its words."""
    message = str(error.get("message") if isinstance(error, dict) else error)
    if (isinstance(error, dict) and error.get("code") == "context_length_exceeded") or "context length" in (
            message.lower()):
        return ContextLengthError(f"{where}: {message}")
    return InputError(f"{where} refused the request: {message}")


def _part(part: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    if part["type"] == "image":
        image = load_image(part["image"])
        if image.width * image.height > max_pixels:
            scale = math.sqrt(max_pixels / (image.width * image.height))
            image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        return {"type": "image_url", "image_url": {"url": image_data_url(image)}}
    probe_video(part["video"])
    return {"type": "video_url", "video_url": {"url": file_data_url(part["video"])}}


@contextmanager
def _shut_on(cancel: threading.Event, response: httpx.Response) -> Iterator[None]:
    """Shut the response's connection as soon as `cancel` is set, so that a blocked read ends."""
    done = threading.Event()

    def watch() -> None:
        while not cancel.wait(WATCH_SECONDS):
            if done.is_set():
                return
        if done.is_set():  # the stream ended first: its connection may be reused
            return
        stream = response.extensions.get("network_stream")
        sock = stream.get_extra_info("socket") if stream is not None else None
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed
            pass

    watcher = threading.Thread(target=watch, name="vlm-remote-cancel", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _reason(exc: httpx.HTTPError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
