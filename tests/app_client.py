"""A minimal client of the demo's HTTP API for the tests (Gradio's call and queue routes)."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    """A minimal client of Gradio's HTTP API (the /gradio_api/call and queue routes, server-sent events),
    all its calls in one Gradio session (as gradio_client does)."""

    def __init__(self, url: str, session: str | None = None):
        self.url = url
        self.session = session or uuid.uuid4().hex[:12]
        self.demo: Any = None  # the app's Blocks, when the test serves it
        self.checkpoint = ""  # the label of the app's Qwen2-VL checkpoint, when the test knows it
        self.port = int(url.rstrip("/").rsplit(":", 1)[1])
        self.http = httpx.Client(base_url=url, trust_env=False, timeout=120)
        self._events: dict[str, dict] = {}

    def user(self) -> "Api":
        """Another user of the same app (a session of its own)."""
        other = Api(self.url)
        other.demo, other.checkpoint = self.demo, self.checkpoint
        return other

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as f:
            response = self.http.post("gradio_api/upload", files={"files": (path.name, f)})
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def submit(self, api: str, data: list) -> httpx.Response | str:
        """The POST: an event id, or the response when it was refused (e.g. 503: the queue is full)."""
        body = json.dumps({"data": data, "session_hash": self.session})  # NaN allowed, as a raw client sends it
        response = self.http.post(f"gradio_api/call/{api}", content=body, headers={"content-type": "application/json"})
        return response.json()["event_id"] if response.status_code == 200 else response

    def events(self, api: str, event_id: str) -> Iterator[tuple[str, Any]]:
        with self.http.stream("GET", f"gradio_api/call/{api}/{event_id}") as stream:
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    yield kind, json.loads(line[5:])

    def event(self, name: str, data: list) -> tuple[str, Any]:
        """Run the page's event `name` (its api_name in /config) as the page does, by fn_index, private
        ones too: ("answer", output data) or ("error", the error payload)."""
        if not self._events:
            self._events = {d["api_name"]: d for d in self.http.get("config").json()["dependencies"]}
        event = self._events[name]
        body = {"data": data, "fn_index": event["id"], "session_hash": self.session, "event_data": None}
        if not event["queue"]:
            response = self.http.post("gradio_api/run/predict", json=body)
            payload = response.json()
            return ("answer", payload["data"]) if response.status_code == 200 else ("error", payload)
        event_id = self.http.post("gradio_api/queue/join", json=body).json()["event_id"]
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": self.session}) as stream:
            for line in stream.iter_lines():
                message = json.loads(line[5:]) if line.startswith("data:") else {}
                if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                    output = message["output"]
                    return ("answer", output["data"]) if message["success"] else ("error", output)
        return "closed", None

    def call(self, api: str, data: list) -> tuple[str, Any]:
        """("answer", data), ("error", message), or ("busy", detail) when the queue is full."""
        event_id = self.submit(api, data)
        if not isinstance(event_id, str):
            assert event_id.status_code == 503, event_id.text
            return "busy", event_id.json()["detail"]
        for kind, data in self.events(api, event_id):
            if kind == "complete":
                return "answer", data
            if kind == "error":
                return "error", data
        return "closed", None
