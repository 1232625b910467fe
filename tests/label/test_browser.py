"""The labelling app in a real browser: Debian's headless Chromium, driven by Selenium, against `lmforge label
serve` on loopback. An annotator logs in with a token and labels by keyboard (vote, next, undo, skip), the page
stays blind until the vote and then names the models, hostile replies stay text, and the admin reads the results
page and downloads both exports. Screenshots of the labelling and results pages go to the test's tmp dir; with
LMFORGE_DOCS_SCREENSHOT=1 the labelling one is also written to docs/img/labelling.png (how the docs' copy is made).

Without chromium and chromedriver the test skips, saying how to install them, except under CI (env CI set), where
it fails: CI installs them (scripts/install.sh --dev) and must run it."""

import csv
import json
import os
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
from helpers import chromium_driver, wait_for
from live import Annotator, Server, make_db

from lmforge.align.preferences import read_preferences
from lmforge.label.store import LabelStore

DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "img" / "labelling.png"
MODELS = ("sft", "dpo")  # neither appears in a prompt or reply below, so seeing one on the page means it was revealed
HOSTILE = ('<script>window.__xss = 1; alert(1)</script> <img src=x onerror="window.__xss = 2; alert(2)"> '
           '[click me](javascript:window.__xss=3) "><svg onload="window.__xss = 4">')  # fmt: skip
ITEMS = [  # (prompt, first model's reply, second model's reply), written for this test
    ("Explain what a hash map is in two sentences.",
     "A hash map stores key-value pairs in an array of buckets. A hash function turns each key into the index of "
     "the bucket that holds its value, so a lookup takes constant time on average.",
     "It is a map. You can put things in it and get them back."),
    ("Write a Python function that reverses a string.",
     "def reverse(text: str) -> str:\n    return text[::-1]",
     "def reverse(s):\n    out = ''\n    for ch in s:\n        out = ch + out\n    return out"),
    ("Name three prime numbers greater than 10.", "11, 13 and 17.", "11, 15 and 21."),
    ("Summarise: the meeting moved from Monday to Wednesday at 3 pm.",
     "The meeting is now on Wednesday at 3 pm.", "There is a meeting."),
    ("Render this note for me.", HOSTILE, "I can only show it as plain text."),
    ("Is 2 + 2 equal to 5?", "No, 2 + 2 = 4.", "Yes."),
]


def records() -> list[dict]:
    return [{"id": f"item{n}", "prompt": [{"role": "user", "content": prompt}],
             "responses": [{"model": m, "content": reply} for m, reply in zip(MODELS, replies)]}
            for n, (prompt, *replies) in enumerate(ITEMS)]  # fmt: skip


@pytest.fixture
def browser(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium_driver(downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return found[0] if found else None


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def progress(driver) -> str:
    return by_id(driver, "progress").text.strip()


def shown(driver) -> tuple[str, str]:
    return by_id(driver, "left").text, by_id(driver, "right").text


def check_safe(driver, seen: list[str]) -> None:
    """No injected script ran and no alert is open; a hostile reply on the page is shown as its literal text."""
    from selenium.common.exceptions import NoAlertPresentException

    assert driver.execute_script("return window.__xss") is None
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text
    if HOSTILE in shown(driver):
        seen.append(HOSTILE)


def login(driver, url: str, token: str) -> None:
    driver.get(f"{url}/login")
    by_id(driver, "token").send_keys(token + "\n")
    wait_for(lambda: by_id(driver, "logout"), "the page after logging in")


def save_png(driver, path: Path) -> tuple[int, int]:
    """Save a screenshot; its width and height, read from the PNG header."""
    assert driver.save_screenshot(str(path))
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def download(driver, link_id: str, suffix: str) -> Path:
    by_id(driver, link_id).click()
    return wait_for(lambda: next(driver.downloads.glob(f"*{suffix}"), None), f"the {suffix} download")


def test_label_by_keyboard_then_results_and_exports(tmp_path, browser):
    live = make_db(tmp_path, records(), annotators=2, k=2)  # 6 comparisons
    store, driver, hostile_seen = LabelStore(live.path), browser, []
    with Server(live.path, tmp_path / "server.log") as server:
        login(driver, server.url, live.tokens["ann00"])
        driver.get(f"{server.url}/p/{live.project}")
        assert progress(driver) == "0 / 6" and by_id(driver, "reveal") is None
        body = driver.find_element("tag name", "body").text
        assert not any(m in body for m in MODELS), "model names shown before the vote"
        check_safe(driver, hostile_seen)
        width, height = save_png(driver, tmp_path / "labelling.png")
        assert width == 1280 and height > 600  # the viewport of the 1280 x 900 window
        if os.environ.get("LMFORGE_DOCS_SCREENSHOT"):
            DOCS_SHOT.parent.mkdir(exist_ok=True)
            shutil.copy(tmp_path / "labelling.png", DOCS_SHOT)

        first = shown(driver)
        press(driver, "1")  # A better
        reveal = wait_for(lambda: by_id(driver, "reveal"), "#reveal after the vote").text
        assert progress(driver) == "1 / 6"
        a_model, b_model = (m for m in sorted(MODELS, key=reveal.index))  # "A was X, B was Y"
        assert {a_model, b_model} == set(MODELS) and f"A was {a_model}" in reveal
        press(driver, "n")
        wait_for(lambda: by_id(driver, "reveal") is None, "the next item")
        check_safe(driver, hostile_seen)
        second = shown(driver)
        assert second != first
        press(driver, "2")  # B better ...
        wait_for(lambda: progress(driver) == "2 / 6", "progress 2 / 6 after the second vote")
        press(driver, "u")  # ... undone: the same item comes back
        wait_for(lambda: progress(driver) == "1 / 6", "progress back to 1 / 6 after undo")
        assert shown(driver) == second and by_id(driver, "reveal") is None
        press(driver, "3")  # tie instead
        wait_for(lambda: progress(driver) == "2 / 6", "progress 2 / 6 after the tie")
        press(driver, "n")
        wait_for(lambda: by_id(driver, "reveal") is None, "the next item")
        check_safe(driver, hostile_seen)
        skipped = shown(driver)
        press(driver, "s")  # skip: never offered again, so this annotator's total drops by one
        wait_for(lambda: progress(driver) == "2 / 5", "progress 2 / 5 after the skip")
        while by_id(driver, "done") is None:  # the rest: both bad
            check_safe(driver, hostile_seen)
            assert shown(driver) != skipped
            done = int(progress(driver).split(" / ")[0])
            press(driver, "4")
            wait_for(lambda: progress(driver) == f"{done + 1} / 5", f"progress {done + 1} / 5")
            press(driver, "n")
            wait_for(lambda: by_id(driver, "reveal") is None, "the next item")
        assert progress(driver) == "5 / 5"
        assert hostile_seen, "the hostile reply was never on screen"

        mine = [v for v in store.votes(live.project) if v.annotator == "ann00"]
        winner = {"a": mine[0].model_a, "b": mine[0].model_b}.get(mine[0].choice)
        assert winner == a_model, "the first vote (A better) must credit the model revealed as A"
        assert Counter(v.choice for v in mine[1:]) == {"tie": 1, "both_bad": 3}
        assert all(v.seconds is not None and v.seconds > 0 for v in mine), "the page times each item"

        helper = Annotator(server.url, live.tokens["ann01"])  # a second annotator, so the results compare two
        helper.login()
        while (page := helper.page(live.project)).assignment:
            assert helper.vote(live.project, page, "left").status_code == 303
        helper.close()

        by_id(driver, "logout").click()
        wait_for(lambda: by_id(driver, "token"), "the login page after logging out")
        login(driver, server.url, live.tokens["admin"])
        driver.get(f"{server.url}/p/{live.project}/results")
        assert driver.find_element("tag name", "h1").text == f"{live.project}: results"
        assert len(driver.find_elements("css selector", "table.grid")) >= 2
        save_png(driver, tmp_path / "results.png")

        exported = download(driver, "export-jsonl", ".jsonl")
        records_out = [json.loads(line) for line in exported.read_text().splitlines()]
        assert len(records_out) == 6  # one per comparison with a vote
        votes = [v for r in records_out for v in r["provenance"]["votes"]]
        assert Counter(v["annotator"] for v in votes) == {"ann00": 5, "ann01": 6}
        decided, _ = read_preferences(exported)  # as the reward and dpo stages read it: ties and both-bad left out
        assert 0 < len(decided) == sum(not (r["tie"] or r["both_bad"]) for r in records_out)
        with open(download(driver, "export-csv", ".csv"), newline="") as f:
            assert len(list(csv.DictReader(f))) == 6
