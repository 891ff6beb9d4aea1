"""The OpenAI-compatible API of `python app.py` (vlm/api.py), driven with the real `openai` client on
loopback: answers equal the library's greedy answers (images, a video, two images, multi-turn, a thinking
model with a budget), streaming ends with [DONE], every bad input is an OpenAI-shaped error, closing a
stream cancels its generation, and concurrent clients share the session manager with the chat tab.

The app is built and launched in this process (as app.py does) so that its threads and temporary files
can be looked at; Qwen2-VL is the never-ending tiny model of test_app.py.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

import vlm
import vlm.media
import vlm.tiny
from tests.test_app import endless_qwen2_vl, free_port
from vlm.families.glm4.tiny import Z1_CHAT_TEMPLATE
from vlm.api import AnswerText, api_error
from vlm.api_request import ChatRequest, ServedModel
from vlm.errors import (CheckpointError, ContextLengthError, InputError, OutOfMemoryError, RemoteError,
                        ServerBusyError, VideoDecodeError)
from vlm.session import MemoryBudgetError, Snapshot
from vlm.ui import Settings, build, launch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
KEY = "test-key"
QUEUE_SIZE = 3  # requests in flight at once (the API answers 429 beyond)

pytestmark = pytest.mark.timeout(600)


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def image_part(name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(ASSETS / name, "image/png")}}


def video_part() -> dict:
    return {"type": "video_url", "video_url": {"url": data_url(ASSETS / "bouncing_ball.mp4", "video/mp4")}}


def as_local(messages: list[dict]) -> list[dict]:
    """The same conversation for the library: data URLs of the assets become their paths."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{"type": "image", "path": str(ASSETS / p["name"])} if p.get("name") and p["type"] == "image_url"
                       else {"type": "video", "path": str(ASSETS / "bouncing_ball.mp4")} if p["type"] == "video_url"
                       else p for p in content]
        out.append({"role": message["role"], "content": content})
    return out


def named(name: str) -> dict:
    """An image part that remembers its asset's name (dropped before sending)."""
    return {**image_part(name), "name": name}


def sent(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{k: v for k, v in p.items() if k != "name"} for p in m["content"]]
             if isinstance(m["content"], list) else m["content"]} for m in messages]


def api_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("vlm-session", "vlm-generate", "vlm-api"))]


def wait_until_idle(seconds: float) -> float:
    """Seconds until no generation or API release thread is left (fails after `seconds`)."""
    start = time.monotonic()
    while api_threads():
        assert time.monotonic() - start < seconds, api_threads()
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The demo on a free loopback port with an API key, tiny models (Qwen2-VL never ends, GLM-4 opens its
    reasoning like GLM-Z1), 1 MB files, 3 MB requests, QUEUE_SIZE requests in flight, two generations at once."""
    temp = tmp_path_factory.mktemp("temp")
    qwen = endless_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))
    z1 = vlm.tiny.write("glm4", tmp_path_factory.mktemp("z1"), seed=3, chat_template=Z1_CHAT_TEMPLATE)
    env = {"VLM_TINY": "1",
           "VLM_FAMILIES": "qwen2_vl,glm4,groupvit", "VLM_CACHE_DIR": str(tmp_path_factory.mktemp("c")),
           "VLM_MODEL_QWEN2_VL": str(qwen), "VLM_MODEL_GLM4": str(z1), "VLM_DEVICE": "cpu", "VLM_DTYPE": "float32",
           "VLM_API_KEY": KEY, "VLM_QUEUE_SIZE": str(QUEUE_SIZE), "VLM_CONCURRENCY": "2", "VLM_MAX_FILE_SIZE": "1mb",
           "VLM_API_MAX_REQUEST_SIZE": "3mb", "VLM_MAX_FRAMES": "16"}
    limits, pillow_limit, tempdir = vlm.media.current_limits(), Image.MAX_IMAGE_PIXELS, tempfile.tempdir
    tempfile.tempdir = str(temp)  # the API's temporary directories land here
    settings = Settings.from_env(env)
    demo = build(settings)
    port = free_port()
    launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "client": openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120),
           "qwen": vlm.load(qwen, device="cpu", dtype="float32"), "z1": vlm.load(z1, device="cpu", dtype="float32"),
           "temp": temp}
    demo.close()
    vlm.media.configure(limits)
    Image.MAX_IMAGE_PIXELS, tempfile.tempdir = pillow_limit, tempdir


@pytest.fixture(autouse=True)
def no_request_left_behind(request):
    yield
    if "app" in request.fixturenames:
        wait_until_idle(10)
        temp, deadline = request.getfixturevalue("app")["temp"], time.monotonic() + 10
        while list(temp.glob("vlm-api-*")) and time.monotonic() < deadline:  # a response may reach the client
            time.sleep(0.01)  # just before its request's files are released
        assert list(temp.glob("vlm-api-*")) == []  # the media files are gone


def ask(app, messages, **options):
    return app["client"].chat.completions.create(model="qwen2_vl", messages=sent(messages), temperature=0,
                                                 **options)


# ------------------------------------------------------------------------------------------- answers
CONVERSATIONS = {
    "image": [{"role": "user", "content": [named("shapes.png"), {"type": "text", "text": "What is here?"}]}],
    "two images": [{"role": "user", "content": [named("street.png"), named("cat.png"),
                                                {"type": "text", "text": "What do they share?"}]}],
    "multi-turn": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": [named("cat.png"), {"type": "text", "text": "Describe it."}]},
                   {"role": "assistant", "content": "A cat sits on a red sofa."},
                   {"role": "user", "content": "And the window?"}],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_greedy_answers_equal_the_librarys(app, name):
    messages = CONVERSATIONS[name]
    expected = app["qwen"].chat(as_local(messages), max_new_tokens=12, do_sample=False)
    answer = ask(app, messages, max_tokens=12)
    assert answer.choices[0].message.content == expected and answer.choices[0].finish_reason == "length"
    assert answer.model == "qwen2_vl" and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    prompt = app["qwen"].encode(as_local(messages))["input_ids"]
    assert answer.usage.prompt_tokens == prompt.shape[1] and answer.usage.completion_tokens == 12
    assert answer.usage.total_tokens == prompt.shape[1] + 12
    visual = sum(int((prompt == i).sum()) for i in app["qwen"].visual_ids)
    assert answer.usage.prompt_tokens_details.visual_tokens == visual > 0

    streamed = ask(app, messages, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == answer.usage.model_dump()


def test_answers_stream_as_they_are_written(app):
    arrivals = []
    for chunk in ask(app, [{"role": "user", "content": "Go on."}], max_tokens=200, stream=True):
        if chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 3 and arrivals[-1] - arrivals[0] > 0.1  # pieces while the answer was written


def test_a_video_with_its_frame_count_equals_the_librarys(app):
    messages = [{"role": "user", "content": [video_part(), {"type": "text", "text": "What happens?"}]}]
    local = [{"role": "user", "content": [{"type": "video", "path": str(ASSETS / "bouncing_ball.mp4")},
                                          {"type": "text", "text": "What happens?"}]}]
    for options in ({"num_frames": 4}, {"fps": 2.0}):
        expected = app["qwen"].chat(local, max_new_tokens=8, do_sample=False, **options)
        answer = ask(app, messages, max_tokens=8, extra_body=options)
        assert answer.choices[0].message.content == expected
        assert answer.usage.prompt_tokens_details.visual_tokens > 0


def test_a_thinking_model_sends_its_reasoning_apart_within_its_budget(app):
    messages = [{"role": "user", "content": "How many dogs run across the grass?"}]
    out = app["z1"].generate(messages, max_new_tokens=12, do_sample=False, thinking_budget=3)[0]
    assert out.reasoning and out.text  # the budget cut the reasoning, then the answer came
    answer = app["client"].chat.completions.create(model="glm4", messages=messages, max_completion_tokens=12,
                                                   temperature=0, extra_body={"thinking_budget": 3})
    message = answer.choices[0].message
    assert message.content == out.text and message.reasoning_content == out.reasoning == message.reasoning
    chunks = list(app["client"].chat.completions.create(model="glm4", messages=messages, max_tokens=12, temperature=0,
                                                        stream=True, extra_body={"thinking_budget": 3}))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == out.reasoning
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == out.reasoning
    assert "".join(d.content or "" for d in deltas) == out.text


def test_stop_strings_cut_the_answer_and_finish_with_stop(app):
    messages = CONVERSATIONS["image"]
    full = ask(app, messages, max_tokens=30).choices[0].message.content
    stop = full[10:13]
    expected = full[:full.index(stop)]
    for stream in (False, True):
        answer = ask(app, messages, max_tokens=30, stop=[stop, "never"], stream=stream)
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            text, finish = answer.choices[0].message.content, [answer.choices[0].finish_reason]
        assert (text, finish) == (expected, ["stop"])


def test_the_stream_is_server_sent_events_ending_with_done(app):
    body = {"model": "qwen2_vl", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", app["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert "usage" not in chunks[0]  # only with stream_options.include_usage


# -------------------------------------------------------------------------------------------- errors
def post(app, body, key: str | None = KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(app["url"] + "/v1/chat/completions", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **headers}, **kwargs)


def text(words: int) -> dict:
    return {"model": "qwen2_vl", "messages": [{"role": "user", "content": "cat " * words}], "max_tokens": 2}


BAD = {
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}, 404, "model_not_found",
                      "does not exist"),
    "unsupported parameter": ({**text(1), "tools": []}, 400, "unsupported_parameter", "'tools'"),
    "out of range": ({**text(1), "top_p": 3}, 400, None, "top_p must be between"),
    "over the token cap": ({**text(1), "max_tokens": 4096}, 400, None, "between 1 and 2048"),
    "a remote URL": ({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]}, 400, "url_not_allowed",
        "URLs are not fetched"),
    "a server path": ({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 400, None, "paths and other URL schemes"),
    "an image over the file size": ({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 1_500_000}}]}]}, 413,
        "file_too_large", "this server takes files up to 1,048,576 bytes"),
    "a request over the request size": ({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 3_200_000}]}]}, 413, "request_too_large", "larger than 3,145,728 bytes"),
    "an image that is not one": ({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"GIF89" * 50).decode()}}
    ]}]},
        400, None, "message0-part0.png is not a supported image"),
    "too many video frames": ({"model": "qwen2_vl", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(ASSETS / "bouncing_ball.mp4", "video/mp4")}}]}]},
        400, None, "The video would use 30 frames; this server allows at most 16"),
    "a prompt over the context": (text(3000), 400, "context_length_exceeded", "this model's context holds 4096"),
    "a thinking budget for a model that does not think": ({**text(1), "thinking_budget": 5}, 400, None,
                                                          "qwen2_vl does not think"),
    "invalid JSON": (b'{"model": "qwen2_vl", ', 400, None, "not valid JSON"),
    "NaN": (b'{"model": "qwen2_vl", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None,
            "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_input_is_an_openai_shaped_error(app, name):
    body, status, code, words = BAD[name]
    response = post(app, body)
    error = response.json()["error"]
    assert response.status_code == status and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert "/tmp" not in error["message"] and "vlm-api-" not in error["message"]  # no server directory


def test_the_openai_client_raises_its_own_exceptions(app):
    client = app["client"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError, match="temperature must be between 0 and 2"):
        client.chat.completions.create(model="qwen2_vl", messages=[{"role": "user", "content": "Hi"}], temperature=3)
    with pytest.raises(openai.BadRequestError, match="would use 30 frames"):  # found by the generation, not streamed
        list(client.chat.completions.create(model="qwen2_vl", stream=True, messages=[
            {"role": "user", "content": [video_part()]}]))
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai.OpenAI(base_url=app["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_the_key_guards_v1_only_and_models_are_listed(app):
    assert post(app, text(1), key=None).status_code == 401
    assert post(app, text(1), key="wrong").json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(app["url"] + "/v1/models").status_code == 401
    assert httpx.get(app["url"] + "/health").json() == {"status": "ok"}
    assert httpx.get(app["url"] + "/").status_code == 200  # the Gradio page needs no key
    models = app["client"].models.list().data
    assert {(m.id, m.model_extra["family"]) for m in models} == {
        ("qwen2_vl", "qwen2_vl"), ("glm4", "glm4")}  # chat families only; local directories not listed by path
    assert app["client"].models.retrieve("glm4").id == "glm4"
    with pytest.raises(openai.NotFoundError):
        app["client"].models.retrieve("groupvit")


# -------------------------------------------------------------------------------- cancel, concurrency
def test_closing_the_stream_cancels_the_generation(app):
    messages = [{"role": "user", "content": "Tell me everything."}]
    for _ in range(2):
        stream = app["client"].chat.completions.create(model="qwen2_vl", messages=messages, max_tokens=2048,
                                                       stream=True)
        received = 0
        for chunk in stream:
            received += bool(chunk.choices[0].delta.content)
            if received == 5:
                break
        assert api_threads()
        stream.close()
        # 2048 tokens of this model take about 10 s; the generation ends at its next step instead
        assert wait_until_idle(5) < 5


def test_concurrent_clients_all_get_their_own_answer_and_beyond_the_queue_a_429(app):
    questions = {f"q{i}": [{"role": "user", "content": [named("shapes.png"), {"type": "text", "text": f"Q {i}?"}]}]
                 for i in range(QUEUE_SIZE)}
    expected = {k: app["qwen"].chat(as_local(m), max_new_tokens=6 + i, do_sample=False)
                for i, (k, m) in enumerate(questions.items())}
    answers, errors = {}, []

    def client(i: int, name: str) -> None:
        try:
            answers[name] = ask(app, questions[name], max_tokens=6 + i).choices[0].message.content
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i, k)) for i, k in enumerate(questions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and answers == expected

    # two endless streams hold both generation slots, a third request waits for one: the queue is full
    streams = [app["client"].chat.completions.create(model="qwen2_vl", messages=[{"role": "user", "content": "Go."}],
                                                     max_tokens=2048, stream=True) for _ in range(2)]

    def patient() -> None:  # turned away only while a probe below holds the last place
        while True:
            client(0, "q0")
            if not (errors and isinstance(errors[-1], openai.RateLimitError)):
                return
            errors.pop()
            time.sleep(0.1)

    waiting = threading.Thread(target=patient)
    answers.clear()
    waiting.start()
    deadline = time.monotonic() + 60
    while True:  # until the third request is in flight (a probe let in before it gives up after 2 s)
        try:
            app["client"].with_options(timeout=2).chat.completions.create(
                model="qwen2_vl", messages=[{"role": "user", "content": "Hi"}], max_tokens=1)
        except openai.RateLimitError as exc:
            assert exc.status_code == 429 and "busy" in str(exc)
            break
        except openai.APITimeoutError:
            pass
        assert time.monotonic() < deadline, "the queue never filled"
    for stream in streams:
        stream.close()
    waiting.join(60)
    assert not errors and answers == {"q0": expected["q0"]}  # served once a slot was free


# ----------------------------------------------------------------------------------------------- units
class FakeGeneration:
    cancelled = False

    def cancel(self):
        self.cancelled = True


def snapshots(*answers: str, thinking: str = "") -> list[Snapshot]:
    return [Snapshot(i, "", thinking, answer) for i, answer in enumerate(answers)]


def test_stop_strings_split_across_snapshots_are_found_and_the_held_text_comes_back():
    request = ChatRequest(ServedModel("m", "qwen2_vl", "s"), [], [], {}, stop=("STOP", "</x>"))
    generation = FakeGeneration()
    answer = AnswerText(request, generation)
    pieces = [answer.take(s) for s in snapshots("Hello S", "Hello ST", "Hello STO", "Hello STOP and more")]
    assert pieces == [("", "Hello "), ("", ""), ("", ""), ("", "")] and generation.cancelled
    assert answer.flush() == "" and answer.finish(Snapshot(9, "", "", "", done=True, finish="cancelled")) == "stop"

    answer = AnswerText(request, FakeGeneration())
    assert [answer.take(s)[1] for s in snapshots("a </", "a </y")] == ["a ", "</y"]
    assert answer.take(Snapshot(2, "", "", "a </y <")) == ("", " ") and answer.flush() == "<"  # never completed
    assert answer.finish(Snapshot(3, "", "", "", done=True, finish="length")) == "length"


def test_reasoning_and_markup():
    request = ChatRequest(ServedModel("m", "glm4v", "s"), [], [], {}, skip_special_tokens=True)
    answer = AnswerText(request, FakeGeneration())
    box = "<|begin_of_box|>[1, 2, 3, 4]<|end_of_box|>"
    assert answer.take(Snapshot(0, "", "hmm", "")) == ("hmm", "")
    assert answer.take(Snapshot(1, "", "hmm, so", "Here " + box)) == (", so", "Here [1, 2, 3, 4]")


@pytest.mark.parametrize("error, status, code", [
    (ContextLengthError("long"), 400, "context_length_exceeded"), (InputError("bad"), 400, None),
    (VideoDecodeError("broken"), 400, None), (MemoryBudgetError("big"), 503, "server_busy"),
    (OutOfMemoryError("oom"), 503, "server_busy"), (ServerBusyError("busy"), 503, "server_busy"),
    (RemoteError("gone"), 502, "upstream_error"), (CheckpointError("corrupt"), 500, None),
    (RuntimeError("boom /srv/app/x.py"), 500, None),
])
def test_generation_errors_become_statuses(error, status, code):
    refused = api_error(error)
    assert (refused.status, refused.code) == (status, code) and "/srv/app/" not in refused.message
