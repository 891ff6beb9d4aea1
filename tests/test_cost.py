"""vlm.cost: the visual tokens, prompt length and context left it gives without decoding are those the
pipeline builds (`pipe.encode`), for every chat family, per image, per video and in total; fit() fits."""

from __future__ import annotations

import itertools

import pytest
import torch
from PIL import Image

import vlm
import vlm.media
import vlm.tiny
from tests.test_robustness_media import make_video
from vlm.cost import PrefillRate, estimate, fit
from vlm.errors import InputError

CHAT_FAMILIES = ("qwen2_vl", "llava_onevision", "glm4v", "glm4")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cost")
    return {family: vlm.load(vlm.tiny.write(family, root / family), dtype="float32") for family in CHAT_FAMILIES}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A wide photo, a portrait one stored sideways (EXIF orientation 6), and a 30-frame 96x64 video at 10 fps."""
    root = tmp_path_factory.mktemp("media")
    wide = root / "wide.png"
    Image.radial_gradient("L").convert("RGB").resize((200, 120)).save(wide)
    sideways = root / "sideways.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.linear_gradient("L").convert("RGB").resize((150, 90)).save(sideways, exif=exif)
    return {"wide": wide, "sideways": sideways, "video": make_video(root / "clip.mp4", 30, size=(96, 64))}


def conversations(media):
    image = lambda name: {"type": "image", "path": str(media[name])}  # noqa: E731
    video = {"type": "video", "path": str(media["video"])}
    return {
        "two images and a video": [{"role": "user", "content": [image("wide"), video, image("sideways"),
                                                                 {"type": "text", "text": "Compare them."}]}],
        "one image": [{"role": "user", "content": [image("sideways"), {"type": "text", "text": "What is it?"}]}],
        "two turns": [{"role": "user", "content": [image("wide"), {"type": "text", "text": "And this?"}]},
                      {"role": "assistant", "content": "A gradient."},
                      {"role": "user", "content": [video, {"type": "text", "text": "And that?"}]}],
    }


def vision_runs(pipe, inputs) -> dict[str, list[int]]:
    """The lengths of the runs of image and of video placeholder tokens in what the pipeline built, in
    order; a GLM-4.1V video is one run per frame pair, added up per video (`<|begin_of_video|>`...)."""
    ids = inputs["input_ids"][0].tolist()
    if pipe.family == "glm4v":
        kinds = inputs["mm_token_type_ids"][0].tolist()
        runs = {"image": [], "video": []}
        begin, end = (pipe.tokenizer.token_id(t) for t in ("<|begin_of_video|>", "<|end_of_video|>"))
        inside = False
        for token, kind in zip(ids, kinds):
            if token == begin:
                inside = True
                runs["video"].append(0)
            elif token == end:
                inside = False
            elif kind == 2 and inside:
                runs["video"][-1] += 1
        runs["image"] = [len(list(g)) for k, g in itertools.groupby(kinds) if k == 1]
        return runs
    marks = {pipe.build_inputs.ids.image: "image", pipe.build_inputs.ids.video: "video"}
    runs = {"image": [], "video": []}
    for token, group in itertools.groupby(ids):
        if token in marks:
            runs[marks[token]].append(len(list(group)))
    return runs


OPTIONS = [{}, {"num_frames": 4}, {"max_pixels": 4000, "fps": 5.0}]


@pytest.mark.parametrize("family", CHAT_FAMILIES[:3])
@pytest.mark.parametrize("options", OPTIONS, ids=["defaults", "4 frames", "small and 5 fps"])
def test_estimates_equal_what_the_pipeline_builds(pipes, media, family, options):
    pipe = pipes[family]
    for name, conversation in conversations(media).items():
        cost = estimate(pipe, conversation, prefill_rate=200.0, **options)
        inputs = pipe.encode(conversation, **options)
        assert cost.prompt_tokens == inputs["input_ids"].shape[1], name
        assert cost.context_left == pipe.max_context - inputs["input_ids"].shape[1]
        assert cost.seconds_to_first_token == pytest.approx(cost.prompt_tokens / 200.0)
        runs = vision_runs(pipe, inputs)
        for kind in ("image", "video"):
            ours = [m.tokens for m in cost.media if m.kind == kind]
            if len(runs[kind]) < len(ours):  # adjacent placeholders (LLaVA's template puts images together)
                ours = [sum(ours)]
            assert ours == runs[kind], (name, kind)
        assert cost.visual_tokens == sum(map(sum, runs.values())) > 0
        sizes = {m.name: (m.width, m.height) for m in cost.media}
        assert sizes.get("sideways.jpg", (90, 150)) == (90, 150)  # turned upright, as the processor gets it
        assert all(m.frames == 1 for m in cost.media if m.kind == "image")


def test_estimates_decode_nothing(pipes, media, monkeypatch):
    conversation = conversations(media)["two images and a video"]
    expected = estimate(pipes["qwen2_vl"], conversation)

    def refuse(*args, **kwargs):
        raise AssertionError("decoded")

    probes = []
    real = vlm.media._run_decoder
    monkeypatch.setattr(vlm.media, "_decode", refuse)  # image pixels
    monkeypatch.setattr(vlm.media, "_run_decoder", lambda request, *a: probes.append(request["op"]) or
                        (refuse() if request["op"] == "frames" else real(request, *a)))
    vlm.media._probe.cache_clear()
    assert estimate(pipes["qwen2_vl"], conversation) == expected
    assert probes == ["probe"]  # the video was probed, not decoded
    (sampled,) = [m.frames for m in expected.media if m.kind == "video"]
    assert sampled == 6  # 3 s at the reference's 2 fps


def test_text_only_and_segmentation(pipes, tmp_path):
    text = [{"role": "user", "content": "Hello there"}]
    cost = estimate(pipes["glm4"], text)
    assert cost.media == () and cost.visual_tokens == 0
    assert cost.prompt_tokens == pipes["glm4"].encode(text)["input_ids"].shape[1]
    assert cost.seconds_to_first_token is None  # no measured rate, no time
    groupvit = vlm.load(vlm.tiny.write("groupvit", tmp_path / "g"), dtype="float32")
    with pytest.raises(InputError, match="does not chat"):
        estimate(groupvit, [{"role": "user", "content": "Hi"}])


@pytest.mark.parametrize("family", ["qwen2_vl", "glm4v"])
def test_fit_lowers_pixels_and_frames_until_the_prompt_fits(pipes, media, family):
    pipe = pipes[family]
    conversation = conversations(media)["two images and a video"]
    full = estimate(pipe, conversation)
    options, cost = fit(pipe, conversation, budget=full.prompt_tokens)
    assert options == {} and cost == full  # it fits already: nothing changes
    budget = (full.prompt_tokens + estimate(pipe, conversation, max_pixels=3136, num_frames=2).prompt_tokens) // 2
    options, cost = fit(pipe, conversation, budget=budget)
    built = pipe.encode(conversation, **options)["input_ids"].shape[1]
    assert cost.prompt_tokens == built <= budget < full.prompt_tokens
    assert options["max_pixels"] < max(m.width * m.height for m in full.media)
    assert options["num_frames"] <= 6 and options["fps"] is None
    with pytest.raises(InputError, match="shorten the conversation"):
        fit(pipe, conversation, budget=10)


def test_prefill_rate_is_the_mean_of_the_last_answers():
    rate = PrefillRate(window=2)
    assert rate.value is None
    rate.add(1000, 10.0)
    rate.add(300, 1.0)
    assert rate.value == pytest.approx(200.0)
    rate.add(500, 1.0)
    rate.add(50, 0.0)  # no time measured: ignored
    assert rate.value == pytest.approx(400.0)
