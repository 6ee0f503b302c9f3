"""The usage page's JSON endpoints, through real gunicorn, against usage.py."""

import json
import os
import subprocess
import sys
from datetime import datetime, time, timedelta

import openai
import pytest
import requests
from conftest import (
    PROJECT_DIR,
    add_student,
    start_proxy,
    stop_process,
    upstream_settings,
    wait_for_usage_rows,
)

ADMIN_KEY = "sk-config-teacher-0123456789"


@pytest.fixture(scope="module")
def school(fake_upstream, tmp_path_factory):
    """A proxy of its own with a small class whose usage came through the SDK."""
    proxy = start_proxy(
        tmp_path_factory.mktemp("school"),
        {**upstream_settings(fake_upstream), "ADMIN_KEYS": [ADMIN_KEY]},
    )
    keys = proxy.keys_path
    school = {
        "proxy": proxy,
        "ann": add_student(keys),
        "bob": add_student(keys, daily_token_budget=5000),
        "idle": add_student(keys),
        "teacher": add_student(keys, role="admin"),
    }
    ask(proxy, school["ann"], chunks=5)
    ask(proxy, school["ann"], chunks=2000)
    ask(proxy, school["bob"], chunks=1, model="gpt-4o")
    embed(proxy, school["bob"])
    wait_for_usage_rows(proxy.usage_path, school["ann"].fingerprint, 2)
    wait_for_usage_rows(proxy.usage_path, school["bob"].fingerprint, 2)
    yield school
    stop_process(proxy.process)


def sdk(proxy, student):
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key=student.key, max_retries=0)


def ask(proxy, student, chunks, model="gpt-4o-mini"):
    """One chat completion: 9 prompt tokens, `chunks` completion tokens."""
    sdk(proxy, student).chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-fake-chunks": str(chunks)},
    )


def embed(proxy, student):
    """One embeddings request of two inputs: 16 tokens."""
    sdk(proxy, student).embeddings.create(
        model="text-embedding-3-small", input=["a", "b"]
    )


def get_api(proxy, path, key=None, header="Authorization", **params):
    headers = {}
    if key is not None:
        headers[header] = f"Bearer {key}" if header == "Authorization" else key

    return requests.get(
        f"{proxy.url}{path}", headers=headers, params=params, timeout=10
    )


def run_usage_script(proxy, *args):
    result = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "usage.py"), *args],
        cwd=PROJECT_DIR,
        env={**os.environ, "PROXY_CONFIG": str(proxy.data_dir / "config.json")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_page_is_served_without_a_key(school):
    proxy = school["proxy"]

    pages = [requests.get(f"{proxy.url}{path}", timeout=10) for path in ("/", "/usage")]
    script = requests.get(f"{proxy.url}/static/usage.js", timeout=10)

    for page in pages:
        assert page.status_code == 200
        assert page.headers["Content-Type"].startswith("text/html")
        assert "usage.js" in page.text
        assert "default-src 'self'" in page.headers["Content-Security-Policy"]

    assert script.status_code == 200


@pytest.mark.parametrize("path", ["/api/usage", "/api/class", "/api/class.csv"])
def test_usage_endpoints_refuse_a_missing_or_wrong_key(school, path):
    proxy = school["proxy"]

    missing = get_api(proxy, path)
    wrong = get_api(proxy, path, key="sk-not-a-key")

    for response in (missing, wrong):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_student_sees_only_their_own_usage(school):
    ann, bob = school["ann"], school["bob"]

    report = get_api(school["proxy"], "/api/usage", ann.key, tz="Asia/Tokyo").json()

    assert (report["name"], report["email"], report["role"]) == (
        ann.name,
        ann.email,
        "student",
    )
    for period in ("today", "week", "total"):
        assert report["periods"][period]["requests"] == 2
        assert report["periods"][period]["total_tokens"] == 14 + 2009

    assert [model["model"] for model in report["models"]] == ["gpt-4o-mini"]
    assert len(report["days"]) == 30
    assert report["days"][-1]["total_tokens"] == 2023
    assert sum(day["total_tokens"] for day in report["days"]) == 2023
    assert [row["total_tokens"] for row in report["recent"]] == [2009, 14]
    assert {row["endpoint"] for row in report["recent"]} == {"/v1/chat/completions"}
    text = json.dumps(report)
    assert bob.email not in text and 'gpt-4o"' not in text and ann.key not in text


@pytest.mark.parametrize("header", ["Authorization", "api-key", "x-api-key"])
def test_usage_endpoint_takes_every_key_header(school, header):
    response = get_api(school["proxy"], "/api/usage", school["bob"].key, header)

    assert response.status_code == 200
    assert response.json()["periods"]["total"] == {
        "requests": 2,
        "prompt_tokens": 9 + 16,
        "completion_tokens": 1,
        "total_tokens": 10 + 16,
    }
    assert response.headers["Cache-Control"] == "no-store"


def test_student_budget_shows_what_is_left(school):
    bob = get_api(school["proxy"], "/api/usage", school["bob"].key).json()
    ann = get_api(school["proxy"], "/api/usage", school["ann"].key).json()

    assert bob["budget"]["daily"]["limit"] == 5000
    assert bob["budget"]["daily"]["used"] == 26
    assert bob["budget"]["daily"]["remaining"] == 5000 - 26
    resets_at = datetime.fromisoformat(bob["budget"]["daily"]["resets_at"])
    assert (resets_at.time(), resets_at.utcoffset()) == (time(0), timedelta(0))
    assert bob["budget"]["total"] == {"limit": None, "used": 26, "remaining": None}
    assert ann["budget"]["daily"]["limit"] is None


@pytest.mark.parametrize("path", ["/api/class", "/api/class.csv"])
def test_student_key_cannot_read_the_class(school, path):
    response = get_api(school["proxy"], path, school["ann"].key)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_only"


@pytest.mark.parametrize("who", ["keys.json admin", "ADMIN_KEYS"])
def test_teacher_sees_every_student(school, who):
    key = school["teacher"].key if who == "keys.json admin" else ADMIN_KEY

    report = get_api(school["proxy"], "/api/class", key).json()

    by_email = {person["email"]: person for person in report["students"]}
    names = ("ann", "bob", "idle", "teacher")
    assert set(by_email) == {school[name].email for name in names}
    assert by_email[school["ann"].email]["total_tokens"] == 2023
    assert by_email[school["ann"].email]["tokens_today"] == 2023
    assert by_email[school["bob"].email]["budget"]["daily"]["remaining"] == 5000 - 26
    assert by_email[school["idle"].email]["requests"] == 0
    assert by_email[school["idle"].email]["last_seen"] is None
    assert report["totals"]["total_tokens"] == 2023 + 26
    assert {model["model"] for model in report["models"]} == {
        "gpt-4o-mini",
        "gpt-4o",
        "text-embedding-3-small",
    }
    assert "keys" not in report["students"][0]


def test_config_teacher_key_cannot_call_the_api(school):
    response = requests.post(
        f"{school['proxy'].url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=10,
    )

    assert response.status_code == 401


def test_unknown_time_zone_is_refused(school):
    response = get_api(school["proxy"], "/api/usage", school["ann"].key, tz="Mars/Base")

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tz"


def test_class_figures_match_usage_script(school):
    proxy = school["proxy"]
    report = get_api(proxy, "/api/class", ADMIN_KEY, tz="UTC").json()

    people = json.loads(run_usage_script(proxy, "--json"))
    models = json.loads(run_usage_script(proxy, "--by", "model", "--json"))
    first_day = report["days"][0]["date"]
    days = json.loads(
        run_usage_script(proxy, "--by", "day", "--since", first_day, "--json")
    )

    figures = (
        "email",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
    )
    assert [{name: p[name] for name in figures} for p in people] == [
        {name: p[name] for name in figures} for p in report["students"]
    ]
    assert models == report["models"]
    assert days == report["days"]


def test_one_students_figures_match_usage_script(school):
    proxy = school["proxy"]
    ann = school["ann"]
    report = get_api(proxy, "/api/usage", ann.key).json()

    [person] = json.loads(run_usage_script(proxy, ann.email, "--json"))
    models = json.loads(run_usage_script(proxy, ann.email, "--by", "model", "--json"))
    csv_text = run_usage_script(proxy, ann.email, "--csv")

    assert person["total_tokens"] == report["periods"]["total"]["total_tokens"]
    assert person["requests"] == report["periods"]["total"]["requests"]
    assert models == report["models"]
    assert csv_text.splitlines()[1].startswith(f"{ann.name},{ann.email},2,")


def test_disabled_student_still_sees_their_usage(proxy):
    student = add_student(proxy.keys_path, disabled=True)

    report = get_api(proxy, "/api/usage", student.key)

    assert report.status_code == 200
    assert report.json()["disabled"] is True


def test_expired_student_sees_their_usage_and_that_the_key_expired(proxy):
    student = add_student(proxy.keys_path, expires="2020-01-31")

    report = get_api(proxy, "/api/usage", student.key)

    assert report.status_code == 200
    assert (report.json()["expired"], report.json()["expires"]) == (True, "2020-01-31")
