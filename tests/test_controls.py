"""Classroom controls through real gunicorn with several workers."""

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import openai
import pytest
import requests
from conftest import PROJECT_DIR, add_student, wait_for_usage_rows, worker_pids

UNLIMITED = {"RATE_LIMIT_PER_STUDENT": None, "MAX_CONCURRENT_PER_STUDENT": None}


@pytest.fixture
def make_client():
    """Build openai SDK clients for a proxy and student; closed after the test."""
    made = []

    def build(proxy, student):
        made.append(
            openai.OpenAI(
                base_url=f"{proxy.url}/v1", api_key=student.key, max_retries=0
            )
        )
        return made[-1]

    yield build
    for client in made:
        client.close()


def stream_once(client, headers):
    """Stream one chat answer; return "ok" or the refusal's error code."""
    try:
        stream = client.chat.completions.create(
            model="gpt-4o-mini", messages=[], stream=True, extra_headers=headers
        )
        for _ in stream:
            pass
    except openai.RateLimitError as error:
        return error.code

    return "ok"


def stream_until_refused(client, headers):
    outcomes = []
    while not outcomes or outcomes[-1] == "ok":
        outcomes.append(stream_once(client, headers))

    return outcomes


def read_tokens(usage_path, fingerprint_value):
    import sqlite3

    with sqlite3.connect(usage_path) as connection:
        return connection.execute(
            "SELECT COALESCE(SUM(total_tokens), 0), COUNT(*) FROM usage_log"
            " WHERE api_key = ?",
            (fingerprint_value,),
        ).fetchone()


def test_budget_runs_out_mid_burst_and_overshoots_only_by_requests_in_flight(
    proxy_factory, upstream, make_client
):
    budget, senders, tokens_each = 300, 6, 14
    proxy = proxy_factory(workers=3, DAILY_TOKEN_BUDGET=budget, **UNLIMITED)
    student = add_student(proxy.keys_path)
    client = make_client(proxy, student)
    headers = {"x-fake-chunks": "5", "x-fake-interval-ms": "15"}

    with ThreadPoolExecutor(senders) as pool:
        runs = list(pool.map(lambda _: stream_until_refused(client, headers), range(6)))

    admitted = sum(run.count("ok") for run in runs)
    wait_for_usage_rows(proxy.usage_path, student.fingerprint, admitted)
    used, _ = read_tokens(proxy.usage_path, student.fingerprint)
    overshoot = used - budget
    print(f"budget={budget} used={used} overshoot={overshoot} admitted={admitted}")
    assert all(run[-1] == "insufficient_quota" for run in runs)
    assert used == admitted * tokens_each
    assert 0 <= overshoot < senders * tokens_each
    assert len(upstream.requests()) == admitted


def test_used_up_budget_says_which_and_when_it_resets(
    proxy_factory, upstream, make_client
):
    proxy = proxy_factory(DAILY_TOKEN_BUDGET=10, BUDGET_TIMEZONE="Asia/Tokyo")
    student = add_student(proxy.keys_path)
    capped = add_student(
        proxy.keys_path, total_token_budget=10, daily_token_budget=None
    )
    for person in (student, capped):
        make_client(proxy, person).chat.completions.create(
            model="gpt-4o-mini", messages=[]
        )
        wait_for_usage_rows(proxy.usage_path, person.fingerprint, 1)

    daily = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {student.key}"},
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=10,
    )
    total = requests.post(
        f"{proxy.url}/v1/embeddings",
        headers={"Authorization": f"Bearer {capped.key}"},
        json={"model": "text-embedding-3-small", "input": "a"},
        timeout=10,
    )

    assert daily.status_code == total.status_code == 429
    assert daily.headers["x-should-retry"] == "false"
    error = daily.json()["error"]
    assert (error["type"], error["code"]) == (
        "insufficient_quota",
        "insufficient_quota",
    )
    assert "today's budget of 10 tokens" in error["message"]
    assert "T00:00:00+09:00" in error["message"]
    assert "total budget of 10 tokens" in total.json()["error"]["message"]
    assert len(upstream.requests()) == 2


def ask_many(url, key, count):
    """Send `count` requests from this process; return their statuses and a 429."""
    statuses, refusal = [], None
    with requests.Session() as session:
        for _ in range(count):
            response = session.get(
                f"{url}/v1/models",
                headers={"Authorization": f"Bearer {key}"},
                timeout=10,
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                refusal = (dict(response.headers), response.json())

    return statuses, refusal


def test_rate_limit_is_exact_across_workers_and_client_processes(
    proxy_factory, upstream
):
    proxy = proxy_factory(workers=3, RATE_LIMIT_PER_STUDENT="10/minute")
    student = add_student(proxy.keys_path)

    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(ask_many, [proxy.url] * 4, [student.key] * 4, [8] * 4))

    statuses = [status for result, _ in results for status in result]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 22
    headers, body = next(refusal for _, refusal in results if refusal)
    assert 0 < int(headers["Retry-After"]) <= 60
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == (
        "10",
        "0",
    )
    assert "X-RateLimit-Reset" in headers
    assert (body["error"]["type"], body["error"]["code"]) == (
        "requests",
        "rate_limit_exceeded",
    )
    assert len(upstream.requests()) == 10


def test_global_rate_limit_counts_every_student_together(proxy_factory, upstream):
    proxy = proxy_factory(RATE_LIMIT_GLOBAL="5/minute")
    students = [add_student(proxy.keys_path) for _ in range(3)]

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda s: ask_many(proxy.url, s.key, 4), students))

    statuses = [status for result, _ in results for status in result]
    assert statuses.count(200) == 5
    assert (
        "for everyone together"
        in next(r for _, r in results if r)[1]["error"]["message"]
    )


def test_concurrent_requests_per_student_are_capped(
    proxy_factory, upstream, make_client
):
    proxy = proxy_factory(MAX_CONCURRENT_PER_STUDENT=2)
    student = add_student(proxy.keys_path)
    client = make_client(proxy, student)
    slow = {"x-fake-chunks": "4", "x-fake-interval-ms": "300"}

    with ThreadPoolExecutor(5) as pool:
        outcomes = list(pool.map(lambda _: stream_once(client, slow), range(5)))

    assert outcomes.count("ok") == 2
    assert outcomes.count("rate_limit_exceeded") == 3
    wait_for_usage_rows(proxy.usage_path, student.fingerprint, 2)
    assert [stream_once(client, {}) for _ in range(3)] == ["ok"] * 3


def test_allowlist_refuses_a_model_in_json_and_in_multipart(
    proxy_factory, upstream, make_client
):
    proxy = proxy_factory(
        ALLOWED_MODELS=["gpt-4o-mini", "whisper-*"], DEFAULT_MODEL="gpt-4o-mini"
    )
    client = make_client(proxy, add_student(proxy.keys_path))
    audio = ("hello.wav", b"RIFF" + b"\0" * 4000, "audio/wav")

    with pytest.raises(openai.PermissionDeniedError) as json_refusal:
        client.chat.completions.create(model="gpt-4o", messages=[])
    with pytest.raises(openai.PermissionDeniedError) as form_refusal:
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=audio)
    allowed = client.audio.transcriptions.create(model="whisper-1", file=audio)

    for refusal in (json_refusal.value, form_refusal.value):
        assert refusal.code == "model_not_allowed"
        assert "Allowed models: gpt-4o-mini, whisper-*" in refusal.message
    assert allowed.text
    [seen] = upstream.requests()
    assert seen["form"]["model"] == "whisper-1"
    assert seen["files"][0]["size"] == 4004


def test_default_model_fills_a_request_naming_none(proxy_factory, upstream):
    proxy = proxy_factory(DEFAULT_MODEL="gpt-4o-mini")
    student = add_student(proxy.keys_path)

    response = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {student.key}"},
        json={"messages": []},
        timeout=10,
    )

    assert response.status_code == 200
    assert upstream.requests()[0]["json"]["model"] == "gpt-4o-mini"


def test_endpoint_allowlist_names_what_is_allowed(proxy_factory, upstream, make_client):
    proxy = proxy_factory(ALLOWED_ENDPOINTS=["chat/completions", "/v1/models"])
    client = make_client(proxy, add_student(proxy.keys_path))

    with pytest.raises(openai.PermissionDeniedError) as refusal:
        client.embeddings.create(model="text-embedding-3-small", input="a")
    models = client.models.list()

    assert refusal.value.code == "endpoint_not_allowed"
    assert "/v1/chat/completions, /v1/models" in refusal.value.message
    assert models.data


def test_expired_key_is_refused_and_a_later_date_is_not(proxy, upstream, make_client):
    expired = add_student(proxy.keys_path, expires="2000-01-31")
    current = add_student(proxy.keys_path, expires="2999-12-31")

    with pytest.raises(openai.PermissionDeniedError) as refusal:
        make_client(proxy, expired).models.list()
    models = make_client(proxy, current).models.list()

    assert refusal.value.code == "key_expired"
    assert "2000-01-31" in refusal.value.message
    assert models.data
    assert len(upstream.requests()) == 1


def run_create(proxy, *args):
    env = {**os.environ, "PROXY_CONFIG": str(proxy.data_dir / "config.json")}
    return subprocess.run(
        [sys.executable, "create.py", *args],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_disabled_key_is_switched_back_on_with_create(proxy, upstream, make_client):
    student = add_student(proxy.keys_path, disabled=True)
    client = make_client(proxy, student)
    with pytest.raises(openai.PermissionDeniedError):
        client.models.list()

    enabled = run_create(proxy, "--enable", student.email.upper())
    models = client.models.list()
    disabled = run_create(proxy, "--disable", student.email)

    assert enabled.returncode == 0, enabled.stderr
    assert models.data
    assert disabled.returncode == 0, disabled.stderr
    with pytest.raises(openai.PermissionDeniedError) as refusal:
        client.models.list()
    assert refusal.value.code == "key_disabled"


def test_create_sets_budgets_and_expiry_on_a_new_key(proxy):
    made = run_create(
        proxy,
        "Ada",
        "ada@school.test",
        "--daily-budget",
        "500",
        "--expires",
        "2030-06-30",
    )

    entry = json.loads(made.stdout)
    assert (entry["daily_token_budget"], entry["expires"]) == (500, "2030-06-30")
    assert "total_token_budget" not in entry


def test_settings_reload_and_a_bad_value_keeps_the_last_good(
    proxy_factory, upstream, make_client
):
    proxy = proxy_factory(workers=2)
    client = make_client(proxy, add_student(proxy.keys_path))
    config_path = proxy.data_dir / "config.json"
    settings = json.loads(config_path.read_text())

    config_path.write_text(json.dumps({**settings, "ALLOWED_MODELS": ["gpt-4o-mini"]}))
    refusals = [refused_model(client, "gpt-4o") for _ in range(6)]
    config_path.write_text(
        json.dumps({**settings, "ALLOWED_MODELS": [], "BUDGET_TIMEZONE": "Mars/Base"})
    )
    still = [refused_model(client, "gpt-4o-mini") for _ in range(6)]

    assert refusals == [True] * 6
    assert still == [False] * 6
    bad_lines = [line for line in proxy.log().splitlines() if "Mars/Base" in line]
    assert 1 <= len(bad_lines) <= 2  # one per worker that saw it


def refused_model(client, model):
    try:
        client.chat.completions.create(model=model, messages=[])
    except openai.PermissionDeniedError:
        return True

    return False


def test_retry_after_is_ours_only_on_our_refusals(proxy_factory, upstream):
    proxy = proxy_factory(RATE_LIMIT_PER_STUDENT="50/minute")
    student = add_student(proxy.keys_path)
    headers = {"Authorization": f"Bearer {student.key}"}

    answered = requests.get(f"{proxy.url}/v1/models", headers=headers, timeout=10)
    busy = requests.get(
        f"{proxy.url}/v1/models",
        headers={**headers, "x-fake-status": "429"},
        timeout=10,
    )

    assert answered.status_code == 200
    assert "Retry-After" not in answered.headers
    assert answered.headers["X-RateLimit-Remaining"] == "49"
    assert busy.status_code == 429
    assert busy.headers["Retry-After"] == "0"  # the upstream's, unchanged


def test_a_student_refused_by_every_control_still_reads_their_usage(
    proxy_factory, upstream
):
    proxy = proxy_factory(
        RATE_LIMIT_PER_STUDENT="1/minute",
        ALLOWED_ENDPOINTS=["chat/completions"],
        DAILY_TOKEN_BUDGET=10,
    )
    student = add_student(proxy.keys_path, expires="2020-01-01")
    headers = {"Authorization": f"Bearer {student.key}"}
    refused = requests.post(
        f"{proxy.url}/v1/chat/completions", headers=headers, json={}, timeout=10
    )

    pages = [
        requests.get(f"{proxy.url}/api/usage", headers=headers, timeout=10)
        for _ in range(3)
    ]

    assert refused.status_code == 403
    assert [page.status_code for page in pages] == [200, 200, 200]
    assert pages[0].json()["email"] == student.email


def test_streams_stopped_before_their_usage_still_use_up_the_budget(
    proxy_factory, upstream
):
    proxy = proxy_factory(DAILY_TOKEN_BUDGET=30)
    student = add_student(proxy.keys_path)
    headers = {
        "Authorization": f"Bearer {student.key}",
        "x-fake-chunks": "40",
        "x-fake-interval-ms": "20",
    }
    body = {"model": "gpt-4o-mini", "messages": [], "stream": True}

    statuses = []
    for _ in range(5):
        with requests.post(
            f"{proxy.url}/v1/chat/completions",
            headers=headers,
            json=body,
            stream=True,
            timeout=10,
        ) as answer:
            statuses.append(answer.status_code)
            if answer.ok:
                # Read most of the stream, then hang up before the usage chunk.
                lines = [line for _, line in zip(range(60), answer.iter_lines())]
                assert lines

        wait_for_usage_rows(proxy.usage_path, student.fingerprint, statuses.count(200))

    assert statuses[0] == 200
    assert 429 in statuses


def test_removing_config_json_keeps_the_class_limits(proxy_factory, upstream):
    proxy = proxy_factory(ALLOWED_MODELS=["gpt-4o-mini"])
    student = add_student(proxy.keys_path)
    headers = {"Authorization": f"Bearer {student.key}"}

    (proxy.data_dir / "config.json").unlink()
    answer = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers=headers,
        json={"model": "gpt-4o", "messages": []},
        timeout=10,
    )

    assert answer.status_code == 403
    assert "was removed: keeping the current settings" in proxy.log()


def test_a_worker_started_after_a_bad_config_save_keeps_the_last_good_settings(
    proxy_factory, upstream
):
    proxy = proxy_factory(workers=1)
    student = add_student(proxy.keys_path)
    config_path = proxy.data_dir / "config.json"
    settings = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**settings, "ALLOWED_MODELS": ["gpt-4o-mini"]}))
    assert ask_model(proxy, student, "gpt-4o").status_code == 403
    config_path.write_text('{"ALLOWED_MODELS": [')

    [worker] = worker_pids(proxy.process.pid)
    os.kill(worker, signal.SIGKILL)

    assert ask_model_when_back(proxy, student, "gpt-4o").status_code == 403
    assert ask_model(proxy, student, "gpt-4o-mini").status_code == 200


def ask_model(proxy, student, model):
    return requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {student.key}"},
        json={"model": model, "messages": []},
        timeout=10,
    )


def ask_model_when_back(proxy, student, model, seconds=20):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return ask_model(proxy, student, model)
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise

            time.sleep(0.2)
