"""The usage page in a real headless Chromium (Debian's), driven by Playwright.

Screenshots of each view go to tests/artifacts/ for a person to look at.
"""

import csv
import os
from pathlib import Path

import pytest
from conftest import add_student
from playwright.sync_api import expect, sync_playwright
from test_page import ADMIN_KEY, school  # noqa: F401  (the shared class fixture)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium; Playwright's own browser download is not used."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium")

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, school):  # noqa: F811
    """Open the usage page in a fresh context; closed after the test."""
    contexts = []

    def build(viewport=PHONE):
        context = browser.new_context(
            viewport=viewport,
            locale="en-US",
            timezone_id="Asia/Tokyo",
            accept_downloads=True,
        )
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{school['proxy'].url}/")
        return page

    yield build
    for context in contexts:
        context.close()


def enter_key(page, key, remember=False):
    page.fill("#key", key)
    if remember:
        page.check("#remember")

    page.click("button[type=submit]")


def save_screenshot(page, name):
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def assert_fits_the_screen(page):
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= page.viewport_size["width"]


def test_student_sees_totals_chart_and_recent_requests(open_page, school):  # noqa: F811
    page = open_page()

    enter_key(page, school["ann"].key)

    expect(page.locator("#student-view")).to_be_visible()
    total = page.locator('.big[data-period="total"]')
    expect(total).to_have_text("2,023")
    expect(page.locator('[data-period="today"][data-figure="requests"]')).to_have_text(
        "2"
    )
    expect(page.locator("#who")).to_contain_text(school["ann"].email)
    bars = page.locator("#student-chart rect.bar")
    expect(bars).to_have_count(30)
    assert bars.last.get_attribute("data-tokens") == "2023"
    assert float(bars.last.get_attribute("height")) > float(
        bars.first.get_attribute("height")
    )
    expect(page.locator("#recent tbody tr")).to_have_count(2)
    expect(page.locator("#student-models tbody tr")).to_have_count(1)
    expect(page.locator("#budget")).to_be_hidden()
    expect(page.locator("#zone")).to_have_text("Asia/Tokyo")
    assert_fits_the_screen(page)
    save_screenshot(page, "usage-student")


def test_student_with_a_budget_sees_what_is_left(open_page, school):  # noqa: F811
    page = open_page()

    enter_key(page, school["bob"].key)

    expect(page.locator("#budget-daily .big")).to_have_text("4,974")
    expect(page.locator("#budget-total")).to_be_hidden()


def test_wrong_key_shows_a_clear_message(open_page):
    page = open_page()

    enter_key(page, "sk-proxy-not-a-real-key")

    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not valid for this proxy")
    expect(page.locator("#student-view")).to_be_hidden()
    assert_fits_the_screen(page)
    save_screenshot(page, "usage-wrong-key")


def test_key_is_remembered_only_when_asked(open_page, school):  # noqa: F811
    page = open_page()

    enter_key(page, school["ann"].key, remember=True)
    expect(page.locator("#student-view")).to_be_visible()
    page.reload()

    expect(page.locator('.big[data-period="total"]')).to_have_text("2,023")
    page.click("#sign-out")
    expect(page.locator("#key-form")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    enter_key(page, school["ann"].key)
    expect(page.locator("#student-view")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_teacher_table_lists_every_student_and_downloads_them(
    open_page,
    school,  # noqa: F811
    tmp_path,
):
    page = open_page(DESKTOP)
    enter_key(page, school["teacher"].key)
    rows = page.locator("#class-table tbody tr")
    expect(rows).to_have_count(4)

    emails = rows.locator('td[data-column="email"]').all_text_contents()
    with page.expect_download() as download:
        page.click("#download-csv")

    path = tmp_path / "class.csv"
    download.value.save_as(path)
    with open(path, newline="") as file:
        table = list(csv.DictReader(file))
    assert set(emails) == {
        school[name].email for name in ("ann", "bob", "idle", "teacher")
    }
    assert [row["email"] for row in table] == emails
    tokens = rows.locator('td[data-column="total_tokens"]').all_text_contents()
    assert [f"{int(row['total_tokens']):,}" for row in table] == tokens
    expect(page.locator("#class-chart rect.bar")).to_have_count(30)
    save_screenshot(page, "usage-teacher")


def test_teacher_table_sorts_by_a_clicked_column(open_page, school):  # noqa: F811
    page = open_page()
    enter_key(page, ADMIN_KEY)
    expect(page.locator("#class-table tbody tr")).to_have_count(4)

    page.click('#class-table th[data-column="email"] button')

    emails = page.locator('#class-table td[data-column="email"]').all_text_contents()
    assert emails == sorted(emails)
    header = page.locator('#class-table th[data-column="email"]')
    expect(header).to_have_attribute("aria-sort", "ascending")
    assert_fits_the_screen(page)
    save_screenshot(page, "usage-teacher-phone")


def test_a_term_of_large_numbers_still_fits_a_phone(open_page, school):  # noqa: F811
    page = open_page()

    def inflate(route):
        # The real answer, with the figures a busy term reaches.
        answer = route.fetch()
        report = answer.json()
        for period in report["periods"].values():
            period["total_tokens"] = 25_000_154
        report["days"][-1]["total_tokens"] = 25_000_154
        route.fulfill(response=answer, json=report)

    page.route("**/api/usage*", inflate)
    enter_key(page, school["ann"].key)

    total = page.locator('.big[data-period="total"]')
    expect(total).to_have_text("25,000,154")
    assert total.bounding_box()["height"] < 32  # on one line, not broken
    assert_fits_the_screen(page)
    save_screenshot(page, "usage-student-large-numbers")


def test_an_expired_key_is_told_so_on_the_page(open_page, school):  # noqa: F811
    expired = add_student(school["proxy"].keys_path, expires="2020-01-31")
    page = open_page()

    enter_key(page, expired.key)

    expect(page.locator("#expired-note")).to_be_visible()
    expect(page.locator("#expired-note")).to_contain_text("2020-01-31")
