"""The Gradio demos end to end: real servers on 127.0.0.1 driven by gradio_client, and by headless Chromium."""
from __future__ import annotations

import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or driver: the system ones only

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from conftest import BROWSER_INSTALL, skip_unless_required  # noqa: E402

from mmadapt.serve.demo import EXAMPLES_DIR, REPO_ROOT, Limits, check_audio, launch  # noqa: E402
from mmadapt.errors import CardError, DataError  # noqa: E402
from mmadapt.eval.evaluate import named_digit  # noqa: E402

DIGITS = sorted((EXAMPLES_DIR / "digits").glob("*.png"))
SLANTED = sorted((REPO_ROOT / "examples" / "slanted-digits").iterdir())
SCREENSHOTS = os.environ.get("MMADAPT_DEMO_SCREENSHOTS")  # a folder (e.g. docs) to keep the browser screenshots in
STUDIO_STEPS = 800 if SCREENSHOTS else 10  # README screenshots show the recipe's full run; tests a short one
SMALL_LIMITS = Limits(max_image_pixels=32 * 32)  # the zoo's digits are 8x8; a 64x64 upload stands for "too large"


def label_of(path: Path) -> int:
    return int(path.name.split("-")[0])  # examples are named <digit>-<word>-sklearn<index>.png


def serve(demo: Any) -> tuple[Any, Client]:
    launch(demo, port=None, block=False)
    assert demo.local_url.startswith("http://127.0.0.1:")  # bound to the loopback address by default
    return demo, Client(demo.local_url, verbose=False)


def save_card_of(recipe: str, folder: Path) -> Path:
    """A real card of another kind (the untrained image-token graph: digits in, pictures out)."""
    from mmadapt.core.assemble import assemble
    from mmadapt.core.card import save_card
    from mmadapt.core.validate import load_recipe

    return save_card(assemble(*load_recipe(str(REPO_ROOT / recipe))), folder)


@pytest.fixture(scope="module")
def picture_card(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_card_of("recipes/mini/image-token.yaml", tmp_path_factory.mktemp("cards") / "image-token")


@pytest.fixture(scope="module")
def vlm(picture_card: Path) -> Iterator[tuple[Any, Client]]:
    from demos.vlm import CHAT_CARD, DEFAULT_CARD, build_demo

    demo, client = serve(build_demo([CHAT_CARD, DEFAULT_CARD, picture_card], SMALL_LIMITS))
    yield demo, client
    demo.close()


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Client]]:
    from demos.personalize import build_demo

    work = tmp_path_factory.mktemp("studio")
    demo, client = serve(build_demo(work, SMALL_LIMITS, overrides=[] if SCREENSHOTS else ["data.num_class_images=4"],
                                    default_steps=STUDIO_STEPS))
    yield demo, client
    demo.close()


def caption(client: Client, card: str, image: Any) -> str:
    return client.predict(card, image, "greedy", 1.0, 16, api_name="/caption")


def message(text: Any, *pictures: Path) -> dict[str, Any]:
    """The chat box's value: typed text and attached pictures."""
    return {"text": text, "files": [handle_file(p) for p in pictures]}


def reply_text(shown: dict[str, Any]) -> str:
    return shown["content"][0]["text"]


# --- vlm ---
def test_vlm_captions_name_the_digit_and_answers_follow_up_questions(vlm: tuple[Any, Client]) -> None:
    from demos.vlm import DEFAULT_CARD

    _, client = vlm
    for path in DIGITS[::3]:
        text = caption(client, str(DEFAULT_CARD), handle_file(path))
        assert named_digit(text) == label_of(path), (path.name, text)
    seven = next(p for p in DIGITS if label_of(p) == 7)
    history, cleared = client.predict(str(DEFAULT_CARD), message("Is it even?"), handle_file(seven), "greedy", 1.0, 16, api_name="/chat")
    assert cleared == {"text": "", "files": []}
    assert [m["role"] for m in history] == ["user", "user", "assistant"]  # the picture on the left, the question, the reply
    assert "no" in reply_text(history[-1]).lower().split(".")[0]  # seven is odd
    sampled = client.predict(str(DEFAULT_CARD), handle_file(seven), "sampled", 0.7, 4, api_name="/caption")
    assert 0 < len(sampled.split()) <= 4  # max tokens caps the reply


# Two test digits the shipped chat card answers every question below about (19 of the 90 ordered pairs). It reads "the
# second one" from the first picture (docs/vlm.md), so no question here asks about the second picture alone.
PAIR = (8, 2)


def test_vlm_chats_about_two_pictures_with_history_and_streams_the_reply(vlm: tuple[Any, Client],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import mmadapt.serve.inference
    from demos.vlm import CHAT_CARD
    from mmadapt.data.conversations import answer_is_right

    demo, _ = vlm
    asked: list[tuple[list[dict[str, str]], int]] = []
    stock = mmadapt.serve.inference.generate_reply

    def spy(model: Any, conversation: list[dict[str, str]], inputs: dict[str, list[Any]], **settings: Any) -> str:
        asked.append(([dict(turn) for turn in conversation], len(inputs["image"])))
        return stock(model, conversation, inputs, **settings)

    monkeypatch.setattr(mmadapt.serve.inference, "generate_reply", spy)
    client = Client(demo.local_url, verbose=False)  # a session of its own: the conversation lives in it
    card, (a, b) = str(CHAT_CARD), PAIR
    first, second = (next(p for p in DIGITS if label_of(p) == d) for d in PAIR)
    job = client.submit(card, message("What is their sum?", first, second), None, "greedy", 1.0, 32, api_name="/chat")
    shown, cleared = job.result(timeout=120)
    streamed = [reply_text(output[0][-1]) for output in job.outputs()]
    final = reply_text(shown[-1])
    assert len(set(streamed)) >= 3 and all(final.startswith(part) for part in streamed), streamed  # token by token
    assert answer_is_right("sum", final, [a, b]), final
    for question, kind, labels in [("And what does the first one show?", "shows", [a]), ("And which of the two is larger?", "larger", [a, b])]:
        shown, _ = client.predict(card, message(question), None, "greedy", 1.0, 32, api_name="/chat")
        assert answer_is_right(kind, reply_text(shown[-1]), labels), (question, reply_text(shown[-1]))
    assert cleared == {"text": "", "files": []}
    assert [m["role"] for m in shown] == ["user"] * 3 + ["assistant", "user", "assistant", "user", "assistant"]
    # the card was given the whole conversation each turn, both pictures at the first turn's two markers
    assert [len(conversation) for conversation, _ in asked] == [1, 3, 5] and {n for _, n in asked} == {2}
    final_turns = asked[-1][0]
    assert final_turns[0]["value"].count("<image>") == 2 and final_turns[1]["value"] == final
    assert [t["from"] for t in final_turns] == ["human", "gpt", "human", "gpt", "human"]
    with pytest.raises(AppError, match=r"at most 4 pictures \(2 given before, 3 now\)"):
        client.predict(card, message("What is their sum?", *DIGITS[:3]), None, "greedy", 1.0, 8, api_name="/chat")
    client.predict(api_name="/clear")
    shown, _ = client.predict(card, message("What does it show?", first), None, "greedy", 1.0, 32, api_name="/chat")
    assert len(shown) == 3 and answer_is_right("shows", reply_text(shown[-1]), [a])  # a new conversation
    assert asked[-1][0] == [{"from": "human", "value": "<image>\nWhat does it show?"}]


def test_vlm_bad_requests_get_messages_and_the_server_stays_up(vlm: tuple[Any, Client], picture_card: Path,
                                                                tmp_path: Path) -> None:
    from demos.vlm import DEFAULT_CARD

    _, client = vlm
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    large = tmp_path / "large.png"
    Image.new("RGB", (64, 64), "white").save(large)
    card = str(DEFAULT_CARD)
    cases = [
        (lambda: caption(client, card, handle_file(not_image)), "notes.png is not an image"),
        (lambda: caption(client, card, handle_file(large)), "large.png is 64x64 = 4,096 pixels; the limit is 1,024"),
        (lambda: caption(client, card, None), "no image given"),
        (lambda: client.predict(str(picture_card), api_name="/switch_card"), "does not fit the vlm demo: its generator makes image"),
        (lambda: caption(client, str(picture_card), handle_file(DIGITS[0])), "does not fit the vlm demo"),
        (lambda: client.predict(card, message("   "), handle_file(DIGITS[0]), "greedy", 1.0, 8, api_name="/chat"), "message: empty"),
    ]
    for request, expected in cases:
        with pytest.raises(AppError, match=expected.replace("(", r"\(")):
            request()
    assert named_digit(caption(client, card, handle_file(DIGITS[4]))) == label_of(DIGITS[4])


def test_a_card_that_does_not_fit_stops_the_cli_with_a_message(picture_card: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmadapt.cli import main

    assert main(["demo", "vlm", "--card", str(picture_card)]) == 2
    assert "does not fit the vlm demo: its generator makes image; the vlm demo shows text" in capsys.readouterr().err
    assert main(["demo", "audio2image", "--card", str(REPO_ROOT / "demos" / "cards" / "mini-qformer")]) == 2
    assert "does not fit the audio2image demo" in capsys.readouterr().err


# --- personalize ---
SD, DIT = "digits-sd (U-Net, SD 1.x layout)", "digits-dit (transformer, SD 3 layout)"  # the studio's two bases
def test_studio_trains_shows_before_and_after_and_offers_the_card_and_lora(studio: tuple[Any, Client]) -> None:
    _, client = studio
    job = client.submit([handle_file(p) for p in SLANTED], "<sks>", "digit", "lora", 10, "a {token} seven", "handwritten", SD,
                        api_name="/train")
    seen = []
    while not job.done():
        status = job.status()
        seen += [u.desc for u in (status.progress_data or []) if u.desc]
        time.sleep(0.2)
    message, grid, card_zip, exported = job.result()
    assert message.startswith("Done: 10 steps")
    assert any(d.startswith("step ") and " · loss " in d and " s left" in d for d in seen), seen  # the live progress
    assert Image.open(grid).size == (190 + 2 * (128 + 6), 20 + 2 * (128 + 6))  # 2 rows (before, after) x 2 seeds
    assert {"bridge.safetensors", "recipe.yaml", "card.json"} <= set(zipfile.ZipFile(card_zip).namelist())
    assert sorted(Path(p).name for p in exported) == ["learned_embeds.safetensors", "pytorch_lora_weights.safetensors"]


def test_studio_trains_on_the_transformer_layout_too(studio: tuple[Any, Client]) -> None:
    """The digits-dit base runs the SD 3 recipe: the word is read as written, so the export is the LoRA alone."""
    _, client = studio
    message, grid, _, exported = client.predict([handle_file(p) for p in SLANTED], "<sks>", "digit", "lora", 10,
                                                "a {token} seven", "handwritten", DIT, api_name="/train")
    assert message.startswith("Done: 10 steps") and "read as written" in message
    assert Image.open(grid).size == (190 + 2 * (128 + 6), 20 + 2 * (128 + 6))
    assert [Path(p).name for p in exported] == ["pytorch_lora_weights.safetensors"]


def test_studio_bad_requests_get_messages_then_a_run_can_be_cancelled(studio: tuple[Any, Client], tmp_path: Path) -> None:
    _, client = studio
    images = [p for p in SLANTED if p.suffix == ".png"]
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    pdf = tmp_path / "notes.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    six = []
    for index in range(6):
        six.append(tmp_path / f"copy-{index}.png")
        shutil.copy(images[index % len(images)], six[-1])

    def train(files: list[Path], token: str = "<sks>", prompts: str = "a {token} seven", steps: int = 10) -> Any:
        return client.submit([handle_file(p) for p in files], token, "digit", "lora", steps, prompts, "handwritten", SD,
                             api_name="/train")

    cases = [
        (images[:2], {}, "2 picture\\(s\\); personalization needs 3 to 5"),
        (six, {}, "6 picture\\(s\\); personalization needs 3 to 5"),
        ([*images[:3], fake], {}, "fake.png is not an image"),
        ([*images[:3], pdf], {}, "notes.pdf: not a picture"),
        (images, {"token": "two words"}, "token: 'two words' must be one word"),
        (images, {"prompts": "a seven"}, "grid prompts: one prompt per line, each with \\{token\\}"),
    ]
    for files, changes, message in cases:
        with pytest.raises(AppError, match=message):
            train(files, **changes).result()
    job = train(images, steps=1600)
    while not any(u.index for u in (job.status().progress_data or [])):  # wait for the first training step
        assert not job.done(), job.result()
        time.sleep(0.2)
    assert client.predict(api_name="/cancel").startswith("Cancelled")
    deadline = time.time() + 60
    while not job.done() and time.time() < deadline:
        time.sleep(0.2)
    assert job.done()  # the page is free again; a good run still succeeds afterwards
    assert client.predict(api_name="/cancel") == "Nothing is training."
    assert train(images).result()[0].startswith("Done: 10 steps")


# --- audio2image ---
TOKEN_CARD, IP_CARD = "mini-audio-token", "mini-audio-ip-adapter"  # the shipped cards, by folder name


def test_audio_checks_refuse_non_audio_long_and_silent_clips(tmp_path: Path) -> None:
    import soundfile

    rate = 8000
    tone = 0.3 * np.sin(np.linspace(0, 2 * np.pi * 440, rate // 2)).astype(np.float32)
    soundfile.write(tmp_path / "ok.wav", tone, rate)
    soundfile.write(tmp_path / "silent.wav", np.zeros(rate, dtype=np.float32), rate)
    soundfile.write(tmp_path / "long.wav", np.tile(tone, 30), rate)
    (tmp_path / "notes.wav").write_text("not audio")
    wave, got_rate = check_audio(tmp_path / "ok.wav", Limits())
    assert got_rate == rate and wave.shape == (rate // 2,)
    for name, message in [("silent.wav", "silent.wav is silent"), ("long.wav", "long.wav lasts 15.0 s; the limit is 10 s"),
                          ("notes.wav", "notes.wav is not an audio file")]:
        with pytest.raises(DataError, match=message):
            check_audio(tmp_path / name, Limits())


@pytest.fixture(scope="module")
def audio_demo() -> Iterator[tuple[Any, Client]]:
    from demos.audio2image import build_demo

    demo = build_demo(limits=Limits(max_audio_seconds=3.0))  # the shipped cards must load: a skip here hid a stale card
    demo, client = serve(demo)
    yield demo, client
    demo.close()


def test_audio2image_draws_pictures_and_refuses_bad_clips(audio_demo: tuple[Any, Client], tmp_path: Path) -> None:
    import soundfile

    from demos.audio2image import example_clips

    _, client = audio_demo
    clips = example_clips()
    if not clips:
        skip_unless_required("fsdd", "the FSDD recordings are not here (set MMADAPT_FSDD)")
    pictures = client.predict(handle_file(clips[7]), 0, 10, 4.0, 2, TOKEN_CARD, api_name="/generate")
    assert len(pictures) == 2
    assert Image.open(pictures[0]["image"]).size == (16, 16)  # the zoo's digits-sd resolution
    soundfile.write(tmp_path / "silent.wav", np.zeros(8000, dtype=np.float32), 8000)
    soundfile.write(tmp_path / "long.wav", 0.3 * np.ones(8000 * 5, dtype=np.float32), 8000)
    (tmp_path / "notes.wav").write_text("not audio")
    for name, message in [("silent.wav", "is silent"), ("long.wav", "the limit is 3 s"), ("notes.wav", "not an audio file")]:
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(tmp_path / name), 0, 10, 4.0, 1, TOKEN_CARD, api_name="/generate")
    assert len(client.predict(handle_file(clips[3]), 1, 10, 4.0, 1, TOKEN_CARD, api_name="/generate")) == 1
    with pytest.raises(AppError, match="card: expected one of mini-audio-token, mini-audio-ip-adapter, got 'mini-qformer'"):
        client.predict(handle_file(clips[3]), 1, 10, 4.0, 1, "mini-qformer", api_name="/generate")


def test_audio2image_offers_the_ip_adapter_card_beside_audiotokens(audio_demo: tuple[Any, Client]) -> None:
    """The same clip through both shipped cards: each draws its own pictures (the IP card through its image prompt)."""
    from demos.audio2image import example_clips

    _, client = audio_demo
    clips = example_clips()
    if not clips:
        skip_unless_required("fsdd", "the FSDD recordings are not here (set MMADAPT_FSDD)")
    drawn = {card: np.asarray(Image.open(client.predict(handle_file(clips[7]), 0, 10, 4.0, 1, card, api_name="/generate")[0]["image"]))
             for card in (TOKEN_CARD, IP_CARD)}
    assert drawn[IP_CARD].shape == (16, 16, 3)
    assert np.abs(drawn[IP_CARD].astype(int) - drawn[TOKEN_CARD].astype(int)).max() > 0  # two cards, two pictures


# --- a real browser ---
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        skip_unless_required("browser", f"needs Debian's chromium and chromium-driver: {BROWSER_INSTALL}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # No sandbox: CI runs as root, where Chromium's sandbox cannot start. No background networking: on a closed network
    # Chromium's own update, sync and component requests are refused, many at a time.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000", "--disable-gpu",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def screenshot_shows(driver: Any, element: Any, path: Path) -> None:
    """Save the page and check the result element is on it: inside the picture, and not a blank area."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    driver.save_screenshot(str(path))
    page = Image.open(path).convert("L")
    ratio = page.width / driver.execute_script("return window.innerWidth")
    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]", element)
    box = tuple(int(v * ratio) for v in rect)
    assert element.is_displayed() and 0 <= box[0] < box[2] <= page.width and 0 <= box[1] < box[3] <= page.height, box
    assert np.asarray(page.crop(box)).std() > 10  # text or pictures, not an empty box
    if SCREENSHOTS:
        shutil.copy(path, Path(SCREENSHOTS) / path.name)


def wait_for(driver: Any, condition: Any, timeout: float = 120) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(condition)


def test_browser_captions_an_uploaded_digit(browser: Any, vlm: tuple[Any, Client], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    demo, _ = vlm
    browser.get(demo.local_url)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#vlm-input input[type=file]"), 60)
    seven = next(p for p in DIGITS if label_of(p) == 7)
    upload.send_keys(str(seven))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#vlm-input img"), 30)
    browser.find_element(By.ID, "caption-button").click()
    box = browser.find_element(By.CSS_SELECTOR, "#caption textarea")
    wait_for(browser, lambda d: box.get_attribute("value"))
    assert named_digit(box.get_attribute("value")) == 7
    browser.find_element(By.CSS_SELECTOR, "#message textarea").send_keys("Is it even?")
    browser.find_element(By.CSS_SELECTOR, "#message [data-testid=submit-button]").click()
    wait_for(browser, lambda d: "odd" in d.find_element(By.ID, "chat").text, 60)
    screenshot_shows(browser, browser.find_element(By.ID, "caption"), tmp_path / "demo-vlm.png")


def test_browser_chats_three_turns_about_two_pictures(browser: Any, vlm: tuple[Any, Client], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from mmadapt.data.conversations import answer_is_right

    demo, _ = vlm
    browser.get(demo.local_url)
    box = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#message textarea"), 60)
    first, second = (next(p for p in DIGITS if label_of(p) == d) for d in PAIR)
    browser.find_element(By.CSS_SELECTOR, "#message input[type=file]").send_keys(f"{first}\n{second}")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#message img")) == 2, 30)  # both attached

    def replies() -> list[str]:
        return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=bot]")]

    a, b = PAIR
    turns = [("What is their sum?", "sum", [a, b]), ("And what does the first one show?", "shows", [a]),
             ("And which of the two is larger?", "larger", [a, b])]
    for number, (question, kind, labels) in enumerate(turns, 1):
        box.send_keys(question)
        box.send_keys(Keys.ENTER)
        wait_for(browser, lambda d: len(replies()) == number and answer_is_right(kind, replies()[-1], labels), 90)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chat img")) == 2  # the two pictures, shown in the first turn
    assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#chat [data-testid=user]") if e.text] == [q for q, _, _ in turns]
    screenshot_shows(browser, browser.find_element(By.ID, "chat"), tmp_path / "demo-vlm-chat.png")


def test_browser_trains_in_the_studio(browser: Any, studio: tuple[Any, Client], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    demo, _ = studio
    browser.get(demo.local_url)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#pictures input[type=file]"), 60)
    upload.send_keys("\n".join(str(p) for p in SLANTED))
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pictures tr")) >= len(SLANTED), 30)
    browser.find_element(By.ID, "train-button").click()
    grid = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#grid img"), 120 + STUDIO_STEPS)  # a busy 2-core box
    wait_for(browser, lambda d: "Done:" in d.find_element(By.ID, "status").text)
    screenshot_shows(browser, grid, tmp_path / "demo-personalize.png")


def test_browser_turns_a_spoken_digit_into_a_picture(browser: Any, audio_demo: tuple[Any, Client], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    from demos.audio2image import example_clips

    demo, _ = audio_demo
    clips = example_clips()
    if not clips:
        skip_unless_required("fsdd", "the FSDD recordings are not here (set MMADAPT_FSDD)")
    browser.get(demo.local_url)
    upload = wait_for(browser, lambda d: d.find_element(By.CSS_SELECTOR, "#audio input[type=file]"), 60)
    upload.send_keys(str(clips[7]))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#audio audio, #audio wave, #audio canvas"), 30)
    browser.find_element(By.ID, "generate-button").click()
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#pictures img"))
    screenshot_shows(browser, browser.find_element(By.ID, "pictures"), tmp_path / "demo-audio2image.png")


# --- bounded inputs, clean refusals, one model queue ---
def refusals_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The demo's refusal lines, each checked to be one line without a stack."""
    records = [r for r in caplog.records if r.name == "mmadapt.serve.demo" and r.getMessage().startswith("refused ")]
    for record in records:
        assert record.levelno == logging.WARNING and not record.exc_info and "\n" not in record.getMessage(), record
    return [r.getMessage() for r in records]


def test_vlm_refuses_long_text_and_wrong_types_with_a_message_and_one_log_line(
        vlm: tuple[Any, Client], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    from demos.vlm import DEFAULT_CARD

    _, client = vlm
    card, seven = str(DEFAULT_CARD), handle_file(next(p for p in DIGITS if label_of(p) == 7))
    caplog.set_level(logging.INFO, logger="mmadapt.serve.demo")
    capfd.readouterr()

    def ask(text: Any, image: Any = seven, max_tokens: Any = 8, box: Any = None) -> Any:
        return client.predict(card, box if box is not None else {"text": text, "files": []}, image, "greedy", 1.0, max_tokens,
                              api_name="/chat")

    with pytest.raises(AppError, match=r"message: 100,000 characters; the limit is 500 \(--max-text-chars\)"):
        ask(("Is it even? " * 8_334)[:100_000])  # the 100,000 characters took the LM 14 s
    started = time.perf_counter()
    history, _ = ask("Is it even?")  # answered at once: the refusal held nothing
    assert time.perf_counter() - started < 10 and "no" in reply_text(history[-1]).lower()
    cases = [
        (lambda: ask(5), "message: expected text, got int"),
        (lambda: ask({"text": "Is it even?"}), "message: expected text, got dict"),
        (lambda: ask(None), "message: expected text, got None"),
        (lambda: ask("", box=5), r"message: expected \{'text': \.\.\., 'files': \[\.\.\.\]\}, got int"),
        (lambda: ask("   "), "message: empty"),  # the handler's own refusal: one line too
        (lambda: ask("Is it even?", image="/no/such/digit.png"), r"image: expected an uploaded file \(gradio_client"),
        (lambda: ask("", box={"text": "Is it even?", "files": ["/no/such/digit.png"]}), r"message: expected uploaded files"),
        (lambda: ask("", box=message("What is their sum?", *DIGITS[:5])), "message: 5 files; a conversation holds at most 4"),
        (lambda: ask("Is it even?", max_tokens="lots"), "max new tokens: expected a number, got str"),
        (lambda: ask("Is it even?", max_tokens=10**9), "max new tokens: 1000000000 is not between 1 and 64"),
        (lambda: client.predict(card, seven, 3, 1.0, 8, api_name="/caption"), "decoding: expected one of greedy, sampled, got"),
    ]
    for request, expected in cases:
        with pytest.raises(AppError, match=expected):
            request()
    logged = refusals_logged(caplog)
    assert len(logged) == 1 + len(cases), logged  # exactly one line per refusal
    assert "message: 100,000 characters" in logged[0]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err + caplog.text


def test_vlm_runs_one_model_call_at_a_time(vlm: tuple[Any, Client], monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import mmadapt.serve.inference
    from demos.vlm import DEFAULT_CARD

    demo, _ = vlm
    stock, lock, active, most, calls = mmadapt.serve.inference.generate_for_samples, threading.Lock(), [0], [0], [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        with lock:
            active[0] += 1
            most[0], calls[0] = max(most[0], active[0]), calls[0] + 1
        try:
            time.sleep(0.3)  # widen the window two overlapping calls would share
            return stock(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(mmadapt.serve.inference, "generate_for_samples", counted)
    captions, questions = Client(demo.local_url, verbose=False), Client(demo.local_url, verbose=False)
    card, image = str(DEFAULT_CARD), handle_file(DIGITS[2])
    jobs = []
    for _ in range(3):
        jobs.append(captions.submit(card, image, "greedy", 1.0, 8, api_name="/caption"))
        jobs.append(questions.submit(card, message("Is it even?"), image, "greedy", 1.0, 8, api_name="/chat"))
    for job in jobs:
        job.result(timeout=120)
    assert calls[0] == 6 and most[0] == 1, (calls, most)


def test_studio_bounds_text_and_numbers(studio: tuple[Any, Client], caplog: pytest.LogCaptureFixture,
                                        capfd: pytest.CaptureFixture[str]) -> None:
    _, client = studio
    caplog.set_level(logging.INFO, logger="mmadapt.serve.demo")
    capfd.readouterr()
    files = [handle_file(p) for p in SLANTED]
    cases = [(("x" * 600, "digit", 10, "a {token} two"), "token: 600 characters; the limit is 500"),
             (("<sks>", "digit", 10, "a {token} two\n" * 100), "grid prompts: 1,400 characters; the limit is 500"),
             (("<sks>", 7, 10, "a {token} two"), "class word: expected text, got int"),
             (("<sks>", "digit", 10**6, "a {token} two"), "training steps: 1000000 is not between 10 and 1600")]
    for (token, word, steps, prompts), message in cases:
        with pytest.raises(AppError, match=message):
            client.submit(files, token, word, "lora", steps, prompts, "handwritten", SD, api_name="/train").result(timeout=60)
    assert len(refusals_logged(caplog)) == len(cases)
    assert "Traceback" not in "".join(capfd.readouterr())


def test_audio2image_bounds_the_seed(audio_demo: tuple[Any, Client], caplog: pytest.LogCaptureFixture) -> None:
    _, client = audio_demo
    caplog.set_level(logging.INFO, logger="mmadapt.serve.demo")
    with pytest.raises(AppError, match="seed: -1 is not between 0 and 2147483647"):
        client.predict(None, -1, 10, 4.0, 1, TOKEN_CARD, api_name="/generate")
    assert len(refusals_logged(caplog)) == 1


def test_demo_cli_takes_the_text_limit() -> None:
    from mmadapt.cli import build_parser

    assert build_parser().parse_args(["demo", "vlm", "--max-text-chars", "80"]).max_text_chars == 80
    assert build_parser().parse_args(["demo", "vlm"]).max_text_chars == Limits().max_text_chars
