"""What a new user meets on the chat page (issue #16), in headless Chromium against `python app.py` with tiny
checkpoints: video settings that cannot contradict, a page that adapts to what the family reads, a status
that never goes stale, progress with numbers, the cost of a question before it is sent (and Fit), and the
small things (examples, narrow screens, overlay legend and download, animated GIFs, the console line).
Screenshots go to artifacts/app/ (git-ignored)."""

from __future__ import annotations

import re
import time

import pytest
from PIL import Image

from tests.app_client import Api
from tests.test_app import ARTIFACTS, ROOT, browser, last_answer, open_app, serve_app, set_number  # noqa: F401
from tests.test_robustness_media import make_video

BUDGET = 120  # VLM_PROMPT_BUDGET of this server: a photo and a video go over it

pytestmark = pytest.mark.timeout(600)

# Every text #chatbot and #model-status show, as they change (a poll could miss a short-lived one).
RECORD = """() => {
  window.seen = {chat: [], status: []};
  const watch = (selector, list) => new MutationObserver(() => {
    const text = document.querySelector(selector)?.innerText ?? "";
    if (list[list.length - 1] !== text) list.push(text);
  }).observe(document.querySelector(selector), {childList: true, subtree: true, characterData: true});
  watch("#chatbot", window.seen.chat);
  watch("#model-status", window.seen.status);
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve_app(tmp_path_factory, VLM_PROMPT_BUDGET=str(BUDGET), VLM_MAX_FRAMES="16")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 30 s video (60 frames at 2 fps, every frame 300: both over the server's 16) and an animated GIF."""
    root = tmp_path_factory.mktemp("clips")
    gif = root / "blink.gif"
    frames = [Image.new("RGB", (64, 48), color) for color in ("red", "green", "blue")]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {"long": make_video(root / "long.mp4", 300, size=(64, 48)), "gif": gif}


@pytest.fixture
def page(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(120_000)
    open_app(page, server.url)
    yield page
    context.close()


def attach(page, *paths) -> None:
    page.set_input_files("#chat-input input[type=file]", [str(p) for p in paths])
    page.wait_for_selector("#chat-input [aria-label='File thumbnail'], #chat-input img")


def send(page, question: str | None = None) -> str:
    """Send the question (None: what the box holds); the finished answer's text."""
    answers = page.locator("#chatbot [data-testid='bot']", has_text="to first token").count()
    if question is not None:
        page.fill("#chat-input textarea", question)
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(f"[...document.querySelectorAll('#chatbot [data-testid=bot]')]"
                           f".filter(b => b.innerText.includes('to first token')).length > {answers}")
    return last_answer(page)


def cost_of(page) -> dict[str, int]:
    """The composer's figures: visual tokens in total, prompt tokens."""
    text = page.locator("#cost").inner_text()
    return {"visual": int(re.search(r"total ([\d,]+) visual tokens", text)[1].replace(",", "")),
            "prompt": int(re.search(r"prompt ([\d,]+) tokens", text)[1].replace(",", ""))}


def footer_of(answer: str) -> dict[str, int]:
    return {"visual": int(re.search(r"([\d,]+) visual tokens", answer)[1].replace(",", "")),
            "prompt": int(re.search(r"([\d,]+) prompt tokens", answer)[1].replace(",", ""))}


def pick_family(page, family: str) -> None:
    page.click("#family input")
    page.get_by_role("option", name=family, exact=True).click()
    page.wait_for_selector(f"#model-status:has-text('{family} ready')")


# ------------------------------------------------------------------------------------- video settings
def test_video_frames_given_are_used_and_every_rate_fits_the_cap(page, clips):
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    page.get_by_text("Images and video", exact=True).click()
    page.wait_for_selector("#fps")  # the accordion opens
    assert not page.locator("#num-frames").is_visible()
    page.locator("#video-sampling label", has_text="number of frames").click()  # one control decides
    page.wait_for_selector("#num-frames")
    assert not page.locator("#fps").is_visible()
    set_number(page, "num-frames", 4)
    attach(page, ROOT / "assets" / "bouncing_ball.mp4")
    page.wait_for_selector("#cost:has-text('4 frames')")
    answer = send(page, "What happens?")
    assert "Error" not in answer and "visual tokens" in answer  # not "Give either num_frames or fps..."

    page.locator("#video-sampling label", has_text="frames per second").click()
    page.wait_for_selector("#fps")
    set_number(page, "fps", 0)  # the checkpoint's rate: every frame, 300 of them, over the cap of 16
    attach(page, clips["long"])
    page.wait_for_selector("#cost:has-text('long.mp4')")
    assert "sampled at" in page.locator("#cost").inner_text()  # said before sending...
    answer = send(page, "And this one?")
    assert "Error" not in answer and "long.mp4 sampled at" in answer and "at most 16 frames" in answer  # ...and after
    page.screenshot(path=str(ARTIFACTS / "page_video_settings.png"), full_page=True)


# ----------------------------------------------------------------------------------- text-only family
def test_a_text_only_family_offers_no_media_and_refuses_them_before_sending(page, server):
    assert page.locator("#chat-input input[type=file]").count() == 1
    assert page.locator("#media-examples").is_visible() and not page.locator("#text-examples").is_visible()
    pick_family(page, "glm4")
    page.wait_for_selector("#text-examples")
    assert page.locator("#chat-input input[type=file]").count() == 0  # no attach clip
    assert not page.locator("#media-examples").is_visible()
    assert not page.get_by_text("Images and video", exact=True).is_visible()
    assert not page.get_by_text("Thinking", exact=True).is_visible()  # GLM-4-0414 does not think
    page.screenshot(path=str(ARTIFACTS / "page_text_only.png"), full_page=True)
    page.get_by_text("Write a haiku about a bicycle in the rain.").click()
    page.wait_for_function("document.querySelector('#chat-input textarea').value.includes('haiku')")
    assert "tokens" in send(page)

    api = Api(server.url)  # a request that sends glm4 an image anyway is refused before anything runs
    image = api.upload(ROOT / "assets" / "cat.png")
    kind, error = api.event("add_turn", [{"text": "What is it?", "files": [image]}, None, "", "glm4"])
    assert kind == "error" and "glm4 reads text only" in error["error"], error


def test_a_thinking_checkpoint_shows_the_thinking_settings(page):
    pick_family(page, "glm4v")
    page.wait_for_selector("text=Thinking")
    assert page.locator("#chat-input input[type=file]").count() == 1


# ----------------------------------------------------------------------------------------- status
def test_offline_the_checkpoint_box_offers_no_hub_checkpoint(page):
    page.click("#checkpoint input")
    options = [option.replace("✓", "").strip() for option in page.get_by_role("option").all_inner_texts()]
    assert len(options) == 2 and options[0].endswith("(local directory)"), options  # not Qwen/Qwen2-VL-2B-Instruct
    assert options[1] == "tiny random (qwen2_vl)", options
    assert "pick the hub checkpoint" not in page.locator("#banner").inner_text()


def test_the_status_never_goes_stale(page):
    page.evaluate(RECORD)
    pick_family(page, "llava_onevision")
    seen = page.evaluate("window.seen.status")
    assert any("Loading llava_onevision" in text for text in seen), seen
    assert not [text for text in seen if "Loading" in text and "qwen2_vl ready" in text], seen

    page.click("#unload")
    page.wait_for_selector("#model-status:has-text('llava_onevision unloaded')")
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    send(page, "Hello?")
    page.wait_for_selector("#model-status:has-text('llava_onevision ready')")  # the question loaded it again
    assert "unloaded" not in page.locator("#model-status").inner_text()


# --------------------------------------------------------------------------------------- progress
def test_progress_has_numbers_before_and_while_streaming(page):
    set_number(page, "max-new-tokens", 300, accordion="Sampling")
    page.evaluate(RECORD)
    attach(page, ROOT / "assets" / "bouncing_ball.mp4")
    answer = send(page, "What happens in this video?")
    seen = page.evaluate("window.seen.chat")
    steps = r"Decoding the video: frame \d+ of 6|Encoding the images and videos: 1 of 1|Reading the prompt: [\d,]+ of"
    assert any(re.search(steps, text) for text in seen), seen  # which ones the page redraws in time varies
    live = [text for text in seen if re.search(r"\d+ tokens · [\d.]+ tokens/s", text) and "first token" not in text]
    assert len(live) >= 2, seen  # the count and speed grow as the answer streams
    assert re.search(r"[\d.]+ tokens/s · 300 tokens · \d+ prompt tokens · \d+ visual tokens · token limit reached",
                     answer), answer
    page.screenshot(path=str(ARTIFACTS / "page_progress.png"), full_page=True)


# ------------------------------------------------------------------------------------------- cost
def test_the_cost_shown_before_sending_is_what_the_answer_reports(page):
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    assert not page.locator("#cost").is_visible()
    page.fill("#chat-input textarea", "Compare them.")  # typed first: the estimate that shows the files counts it
    attach(page, ROOT / "assets" / "shapes.png", ROOT / "assets" / "bouncing_ball.mp4")
    page.wait_for_selector("#cost:has-text('bouncing_ball.mp4')")
    text = page.locator("#cost").inner_text()
    assert re.search(r"shapes\.png \d+ visual tokens \(640×480\)", text) and "6 frames" in text, text
    assert "of 4,096 left" in text
    expected = cost_of(page)
    answer = send(page)
    assert footer_of(answer) == expected
    attach(page, ROOT / "assets" / "cat.png")
    page.wait_for_selector("#cost:has-text('s to the first token')")  # measured on the first answer
    page.screenshot(path=str(ARTIFACTS / "page_cost.png"), full_page=True)


def test_fit_brings_a_question_under_the_budget_in_one_click(page):
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    media = ROOT.parent / "shared" / "media"
    photo = media / "extreme_ironing.jpg" if media.is_dir() else ROOT / "assets" / "street.png"
    attach(page, photo, ROOT / "assets" / "bouncing_ball.mp4")
    page.wait_for_selector("#fit")
    assert cost_of(page)["prompt"] > BUDGET and "Over the budget" in page.locator("#cost").inner_text()
    page.screenshot(path=str(ARTIFACTS / "page_over_budget.png"), full_page=True)
    page.click("#fit")
    page.wait_for_selector("#fit", state="hidden")
    page.wait_for_timeout(1000)
    fitted = cost_of(page)
    assert fitted["prompt"] <= BUDGET and "Over the budget" not in page.locator("#cost").inner_text()
    assert page.locator("#num-frames").is_visible()  # Fit chose a number of frames
    answer = send(page)
    assert footer_of(answer) == fitted
    page.screenshot(path=str(ARTIFACTS / "page_fitted.png"), full_page=True)


# ------------------------------------------------------------------------------------- small things
def test_examples_are_for_users_and_a_video_example_has_a_thumbnail(page):
    assert page.get_by_text("Examples", exact=True).first.is_visible()
    assert "make_assets" not in page.content()
    video = page.locator("#media-examples video")
    video.scroll_into_view_if_needed()
    deadline = time.monotonic() + 30
    while video.evaluate("v => v.readyState") < 2:  # the first frame is decoded
        assert time.monotonic() < deadline, "the example video never showed a frame"
        page.wait_for_timeout(200)
    assert video.evaluate("v => [v.preload, v.dataset.thumbnail]") == ["auto", "1"]
    shot = ARTIFACTS / "page_video_example.png"
    video.screenshot(path=str(shot))
    assert len(set(Image.open(shot).convert("RGB").getdata())) > 10  # a picture, not an empty box


def test_on_a_phone_the_model_picker_comes_before_the_chat_and_the_examples(browser, server):
    context = browser.new_context(viewport={"width": 390, "height": 844})
    page = context.new_page()
    open_app(page, server.url)
    picker, chat = page.locator("#family").bounding_box(), page.locator("#chatbot").bounding_box()
    examples = page.locator("#media-examples").bounding_box()
    assert picker["y"] < chat["y"] < examples["y"], (picker, chat, examples)
    page.screenshot(path=str(ARTIFACTS / "page_phone.png"), full_page=True)
    context.close()


def test_an_animated_gif_is_said_to_be_read_as_its_first_frame(page, clips):
    set_number(page, "max-new-tokens", 3, accordion="Sampling")
    attach(page, clips["gif"])
    page.wait_for_selector("#cost:has-text('blink.gif is animated (3 frames)')")
    assert "first frame only" in send(page, "What is it?")


def test_the_overlay_is_redrawn_for_the_labels_shown_and_downloads_under_the_inputs_name(page):
    page.get_by_role("tab", name="Segmentation").click()
    page.set_input_files("#seg-image input[type=file]", str(ROOT / "assets" / "cat.png"))
    page.fill("#seg-labels-input textarea", "cat, sofa, wall")
    set_number(page, "seg-threshold", 0)
    page.click("#segment")
    overlay = page.locator("#seg-overlay img")
    overlay.wait_for()
    before = overlay.get_attribute("src")
    page.locator("#seg-labels label:has-text('sofa')").click()  # hidden (the legend: test_groupvit_overlay.py)
    page.wait_for_function("before => document.querySelector('#seg-overlay img').src !== before", arg=before)
    with page.expect_download() as download:
        page.locator("#seg-overlay button[aria-label='Download'], #seg-overlay a[download]").first.click()
    assert download.value.suggested_filename == "cat-overlay.png"
    path = ARTIFACTS / "page_overlay_download.png"
    download.value.save_as(path)
    assert Image.open(path).format == "PNG"
    page.screenshot(path=str(ARTIFACTS / "page_overlay.png"), full_page=True)


def test_the_console_says_when_it_serves_tiny_checkpoints(server):
    log = server.log.read_text()  # this server's qwen2_vl is a local directory (tests/test_app.py), not tiny
    assert re.search(r"WARNING vlm\.ui: Serving tiny random checkpoints \(the answers are random\) for qwen2_5_vl, "
                     r"llava_onevision, groupvit, glm4v, glm4, idefics: VLM_TINY=1 is set\.", log), log[:2000]
