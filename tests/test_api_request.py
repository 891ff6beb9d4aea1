"""Chat Completions requests checked before anything runs (vlm.api_request): every field against the
server's lists and ranges, media as bounded files in the request's own directory, URLs refused."""

from __future__ import annotations

import base64
import http.server
import threading
from pathlib import Path

import pytest

from vlm.api_request import MAX_TEXT_CHARS, ApiError, Bounds, MediaFiles, ServedModel, parse
from vlm.media_urls import DataUrl, parse_data_url

ROOT = Path(__file__).resolve().parents[1]
PNG = (ROOT / "assets" / "shapes.png").read_bytes()
MP4 = (ROOT / "assets" / "bouncing_ball.mp4").read_bytes()
MODELS = {"qwen2_vl": ServedModel("qwen2_vl", "qwen2_vl", "tiny:qwen2_vl")}
BOUNDS = Bounds(max_new_tokens=512, max_images=2, max_frames=16, max_file_bytes=len(MP4) + 10,
                max_image_pixels=10**6, allowed_hosts=("localhost",))


def data_url(payload: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def ask(*parts, **fields) -> dict:
    return {"model": "qwen2_vl", "messages": [{"role": "user", "content": list(parts) or "Hi"}], **fields}


def test_a_full_request_becomes_a_conversation_and_options():
    body = {"model": "qwen2_vl", "max_completion_tokens": 64, "temperature": 0.7, "top_p": 0.9, "seed": 7,
            "stop": ["\n\n", "END"], "stream": True, "stream_options": {"include_usage": True}, "n": 1, "user": "u",
            "top_k": 20, "repetition_penalty": 1.05, "max_pixels": 50_000, "num_frames": 8, "thinking_budget": 10,
            "enable_thinking": True, "skip_special_tokens": True,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [image(data_url(PNG)), {"type": "text", "text": "What?"}]},
                         {"role": "assistant", "content": None, "reasoning_content": "...", "tool_calls": []},
                         {"role": "user", "content": [{"type": "video_url",
                                                       "video_url": {"url": data_url(MP4, "video/mp4")}}]}]}
    request = parse(body, MODELS, BOUNDS)
    assert request.model == MODELS["qwen2_vl"] and request.stream and request.include_usage
    assert request.stop == ("\n\n", "END") and request.skip_special_tokens
    assert request.options == {"max_new_tokens": 64, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 20,
                               "repetition_penalty": 1.05, "seed": 7, "max_pixels": 50_000, "num_frames": 8,
                               "thinking_budget": 10, "enable_thinking": True}
    assert [m["role"] for m in request.conversation] == ["system", "user", "assistant", "user"]
    assert request.conversation[2]["content"] == ""
    assert [(m.kind, m.where, m.data.mime) for m in request.media] == [
        ("image", "messages[1].content[0]", "image/png"), ("video", "messages[3].content[0]", "video/mp4")]


def test_defaults_greedy_and_the_token_cap():
    assert parse(ask(), MODELS, BOUNDS).options == {"max_new_tokens": 512}  # the server's cap; the rest: checkpoint's
    greedy = parse(ask(temperature=0, top_k=-1, max_tokens=5), MODELS, BOUNDS).options
    assert greedy == {"max_new_tokens": 5, "do_sample": False, "top_k": 0}


@pytest.mark.parametrize("body, status, words", [
    ([], 400, "JSON object"),
    (ask(tools=[{"type": "function"}]), 400, "Unsupported parameter: 'tools'"),
    (ask(n=2), 400, "n must be 1"),
    (ask(logprobs=True), 400, "logprobs must be False"),
    (ask(presence_penalty=0.5), 400, "presence_penalty must be 0"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "model is required"),
    (ask(model="gpt-4o"), 404, "'gpt-4o' does not exist"),
    (ask(model="/etc"), 404, "does not exist"),
    (ask(max_tokens=0), 400, "max_tokens must be between 1 and 512"),
    (ask(max_tokens=513), 400, "between 1 and 512"),
    (ask(max_tokens=10.0), 400, "max_tokens must be an integer"),
    (ask(max_tokens=True), 400, "must be an integer"),
    (ask(max_tokens=5, max_completion_tokens=6), 400, "differ"),
    (ask(temperature=2.5), 400, "temperature must be between 0 and 2"),
    (ask(temperature="hot"), 400, "temperature must be a number"),
    (ask(top_p=0), 400, "top_p must be between"),
    (ask(top_k=1000), 400, "top_k must be between -1 and 200"),
    (ask(repetition_penalty=5), 400, "repetition_penalty"),
    (ask(seed=-1), 400, "seed must be between 0"),
    (ask(seed=2**70), 400, "seed must be between 0"),
    (ask(stop=["a"] * 5), 400, "stop must be"),
    (ask(stop=""), 400, "stop must be"),
    (ask(stop=[1]), 400, "stop must be"),
    (ask(stream="yes"), 400, "stream must be true or false"),
    (ask(stream_options={"include_usage": True}), 400, "only allowed with stream"),
    (ask(stream=True, stream_options={"continuous_usage_stats": True}), 400, "takes only include_usage"),
    (ask(max_pixels=10**7), 400, "max_pixels must be between 1 and 1000000"),
    (ask(min_pixels=1000, max_pixels=100), 400, "min_pixels is larger"),
    (ask(fps=0), 400, "fps must be between"),
    (ask(fps=2.0, num_frames=4), 400, "either fps or num_frames"),
    (ask(num_frames=17), 400, "num_frames must be between 1 and 16"),
    (ask(thinking_budget=-1), 400, "thinking_budget must be between 0"),
    (ask(enable_thinking="no"), 400, "enable_thinking must be true or false"),
    (ask(user=5), 400, "user must be a string"),
    ({"model": "qwen2_vl", "messages": []}, 400, "messages must be a non-empty list"),
    ({"model": "qwen2_vl", "messages": "Hi"}, 400, "messages must be a non-empty list"),
    ({"model": "qwen2_vl", "messages": [{"role": "user", "content": "x"}] * 1001}, 400, "up to 1000"),
    ({"model": "qwen2_vl", "messages": ["Hi"]}, 400, "messages[0] must be an object"),
    ({"model": "qwen2_vl", "messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role is 'tool'"),
    ({"model": "qwen2_vl", "messages": [{"role": "user", "content": "x", "tool_call_id": "1"}]}, 400,
     "'tool_call_id'"),
    ({"model": "qwen2_vl", "messages": [{"role": "assistant", "content": "x", "tool_calls": [{}]}]}, 400,
     "'tool_calls'"),
    ({"model": "qwen2_vl", "messages": [{"role": "user", "content": None}]}, 400, "content must be a string or"),
    ({"model": "qwen2_vl", "messages": [{"role": "user", "content": []}]}, 400, "content must be a string or"),
    (ask({"type": "text", "text": 5}), 400, "messages[0].content[0] must be"),
    (ask({"type": "input_audio", "input_audio": {}}), 400, "'input_audio'; use text, image_url or video_url"),
    (ask({"type": "image", "path": "/etc/passwd"}), 400, "'image'; use text, image_url or video_url"),
    (ask({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}), 400, "must be {\"type\": \"image_url\""),
    (ask({"type": "image_url", "image_url": {"url": "/etc/passwd"}}), 400, "paths and other URL schemes are refused"),
    (ask({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), 400, "paths and other URL schemes"),
    (ask(image("http://169.254.169.254/latest/meta-data")), 400, "URLs are not fetched"),
    (ask(image("https://localhost.evil.com/x.png")), 400, "URLs are not fetched"),
    (ask(image("http://localhost@evil.com/x.png")), 400, "URLs are not fetched"),
    (ask(image("data:image/png,notbase64")), 400, "data:<type>/<subtype>;base64"),
    (ask(image(data_url(MP4, "video/mp4"))), 400, "holds video/mp4; image_url takes a data:image/"),
    (ask({"type": "video_url", "video_url": {"url": data_url(PNG)}}), 400, "image/png; video_url takes a data:video/"),
    (ask(image(data_url(b"x" * (len(MP4) + 11)))), 413, "this server takes files up to"),
    (ask(image(data_url(PNG)), image(data_url(PNG)), image(data_url(PNG))), 400, "3 images; this server takes up to 2"),
    ({"model": "qwen2_vl", "messages": [{"role": "system", "content": [image(data_url(PNG))]}]}, 400,
     "images and videos go in user messages"),
    (ask({"type": "text", "text": "x" * (MAX_TEXT_CHARS + 1)}), 413, "characters of text"),
])
def test_bad_requests_are_refused_with_a_status_and_a_reason(body, status, words):
    with pytest.raises(ApiError) as refused:
        parse(body, MODELS, BOUNDS)
    assert refused.value.status == status and words in refused.value.message
    assert refused.value.body()["error"]["message"] == refused.value.message


def test_data_url_sizes_are_known_before_decoding():
    for payload in (b"", b"a", b"ab", b"abc", PNG):
        assert parse_data_url(data_url(payload), "x").size == len(payload)
    assert DataUrl("image/png", "A" * 4_000_000).size == 3_000_000


def test_media_is_written_into_the_requests_own_directory_and_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    request = parse(ask(image(data_url(PNG)), {"type": "video_url", "video_url": {"url": data_url(MP4, "video/mp4")}}),
                    MODELS, BOUNDS)
    files = MediaFiles()
    files.write(request.media, BOUNDS)
    parts = request.conversation[0]["content"]
    assert [p["type"] for p in parts] == ["image", "video"]
    assert Path(parts[0]["path"]).read_bytes() == PNG and Path(parts[1]["path"]).read_bytes() == MP4
    assert Path(parts[0]["path"]).name == "message0-part0.png" and Path(parts[0]["path"]).parent.parent == tmp_path
    files.close()
    assert list(tmp_path.iterdir()) == []


def test_corrupt_base64_is_an_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    request = parse(ask(image("data:image/png;base64,AAAA!!!!")), MODELS, BOUNDS)
    files = MediaFiles()
    with pytest.raises(ApiError, match="not valid base64"):
        files.write(request.media, BOUNDS)
    files.close()
    assert list(tmp_path.iterdir()) == []


class Files(http.server.BaseHTTPRequestHandler):
    """/shapes.png, /big.png (over the size limit), /moved (a redirect to the metadata address), /page (HTML)."""

    hits: list[str] = []

    def do_GET(self):
        Files.hits.append(self.path)
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()
            return
        body, kind = {"/shapes.png": (PNG, "image/png"), "/big.png": (b"x" * (len(MP4) + 100), "image/png"),
                      "/page": (b"<html></html>", "text/html")}[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_urls_of_allowed_hosts_are_fetched_within_the_limits(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://localhost:{server.server_address[1]}"
    try:
        with pytest.raises(ApiError, match="URLs are not fetched"):  # 127.0.0.1 is not in the allowed list
            parse(ask(image(f"http://127.0.0.1:{server.server_address[1]}/shapes.png")), MODELS, BOUNDS)
        assert Files.hits == []
        request = parse(ask(image(base + "/shapes.png")), MODELS, BOUNDS)
        files = MediaFiles()
        files.write(request.media, BOUNDS)
        assert Path(request.conversation[0]["content"][0]["path"]).read_bytes() == PNG
        for path, words in (("/big.png", "larger than"), ("/moved", "answered HTTP 302"), ("/page", "is text/html")):
            with pytest.raises(ApiError, match=words):
                files.write(parse(ask(image(base + path)), MODELS, BOUNDS).media, BOUNDS)
        files.close()
        assert Files.hits == ["/shapes.png", "/big.png", "/moved", "/page"]  # the redirect was not followed
        assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()
