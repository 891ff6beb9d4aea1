"""The chat-template child: Jinja renders checkpoints' chat templates in a process of its own.

A chat template is code that comes with a checkpoint: nested loops can run for hours and string
arithmetic can take gigabytes, which Jinja's sandbox does not bound. `vlm.tokenizer` runs this file as
a script (`python -I safe_render.py`), kept for the process and started again after a failure; the
child caps its own address space and file writes, and the parent kills it past a deadline.

Requests and replies are messages on stdin / stdout: an 8-byte little-endian length, then JSON.

    {"op": "compile", "source": str}                                  -> {"ok": true}
    {"op": "render", "source": str, "variables": {...}, "max_chars": int} -> {"ok": true, "text": str}

A refusal is {"ok": false, "kind": "template" | "input" | "size" | "memory", "message": ...}: "template"
for a template that does not parse, "input" for one that rejects the conversation (raise_exception, a
failed expression), "size" for output over `max_chars`. Compiled templates are kept by source. Only
the standard library and jinja2 are imported so the child starts in a fraction of a second.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from datetime import datetime
from typing import Any, BinaryIO

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEMPLATES = 16  # compiled templates kept (one per loaded checkpoint)


class TemplateInputError(Exception):
    """raise_exception() called by a template."""


def raise_exception(message: str):
    raise TemplateInputError(message)


def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
           sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for training masks) renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def environment() -> ImmutableSandboxedEnvironment:
    """Jinja's sandbox with the helpers hub templates use (as transformers renders them)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols", GenerationBlock])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Refused(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Renderer:
    def __init__(self):
        self.env = environment()
        self.templates: dict[str, jinja2.Template] = {}

    def template(self, source: str) -> jinja2.Template:
        if source not in self.templates:
            try:
                compiled = self.env.from_string(source)
            except (jinja2.TemplateError, RecursionError) as exc:
                raise Refused("template", f"The chat template does not parse: {exc}") from None
            if len(self.templates) >= MAX_TEMPLATES:
                self.templates.pop(next(iter(self.templates)))
            self.templates[source] = compiled
        return self.templates[source]

    def render(self, source: str, variables: dict[str, Any], max_chars: int) -> str:
        parts, total = [], 0
        try:
            for part in self.template(source).generate(**variables):
                total += len(part)
                if total > max_chars:
                    raise Refused("size", f"The chat template wrote more than {max_chars:,} characters for this "
                                          "conversation; it is broken or hostile.")
                parts.append(part)
        except TemplateInputError as exc:
            raise Refused("input", f"The chat template rejected the conversation: {exc}") from None
        except (jinja2.TemplateError, RecursionError, ArithmeticError, TypeError, ValueError, LookupError) as exc:
            raise Refused("input", f"The chat template failed on this conversation: {exc}") from None
        return "".join(parts)


# ---------------------------------------------------------------------------------------- the child
def limit_resources(memory: int) -> None:
    """Cap this process: address space (what is mapped now + `memory`), no file writes."""
    try:
        import resource
    except ImportError:  # not a POSIX system: the parent's deadline still applies
        return
    if os.path.exists("/proc/self/statm"):  # Linux (elsewhere RLIMIT_AS is not enforced)
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + memory, mapped + memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))


def read_message(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack("<Q", header)
    return json.loads(stream.read(size))


def write_message(stream: BinaryIO, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def answer(renderer: Renderer, request: dict[str, Any]) -> dict[str, Any]:
    try:
        if request["op"] == "compile":
            renderer.template(request["source"])
            return {"ok": True}
        return {"ok": True, "text": renderer.render(request["source"], request["variables"], request["max_chars"])}
    except Refused as exc:
        return {"ok": False, "kind": exc.kind, "message": str(exc)}
    except MemoryError:
        renderer.templates.clear()
        return {"ok": False, "kind": "memory", "message": "The chat template needed more memory than this server "
                                                          "allows; it is broken or hostile."}


def serve(stdin: BinaryIO, stdout: BinaryIO, memory: int) -> None:
    renderer = Renderer()
    limit_resources(memory)
    while (request := read_message(stdin)) is not None:
        write_message(stdout, answer(renderer, request))


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer, int(sys.argv[1]))
