"""The proxy through real gunicorn, driven by the official openai SDK."""

import json
import signal
import socket
import threading
import time

import openai
import pytest
import requests
from conftest import (
    UPSTREAM_KEY,
    add_student,
    read_usage_rows,
    wait_for_usage_rows,
)

from keys import generate_key


def test_chat_completion_is_forwarded_and_metered(proxy, upstream, client, student):
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )

    assert reply.choices[0].message.content.startswith("Héllo")
    assert reply.usage.total_tokens == 14
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        9,
        5,
        14,
    )
    assert row["model"] == "gpt-4o-mini"
    assert row["endpoint"] == "/v1/chat/completions"
    assert row["email"] == student.email
    assert row["status"] == 200
    assert (row["streamed"], row["partial"]) == (0, 0)


def test_student_key_never_reaches_upstream(proxy, upstream, client, student):
    client.chat.completions.create(model="gpt-4o-mini", messages=[])

    [seen] = upstream.requests()
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert student.key not in json.dumps(seen)


def test_stream_without_usage_option_hides_the_injected_usage_chunk(
    proxy, upstream, client, student
):
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[], stream=True
    )
    chunks = list(stream)

    assert all(chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).startswith("Hé")
    [seen] = upstream.requests()
    assert seen["json"]["stream_options"] == {"include_usage": True}
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert row["total_tokens"] == 14
    assert (row["streamed"], row["partial"]) == (1, 0)


def test_stream_with_usage_option_arrives_unchanged(proxy, upstream, client, student):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 14
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert row["total_tokens"] == 14


def test_legacy_completions_stream_is_metered(proxy, upstream, client, student):
    stream = client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say", stream=True
    )
    texts = [chunk.choices[0].text for chunk in stream]

    assert texts
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert (row["prompt_tokens"], row["total_tokens"]) == (5, 10)


def test_responses_api_plain_and_streamed(proxy, upstream, client, student):
    plain = client.responses.create(model="gpt-4o-mini", input="hi")
    events = list(client.responses.create(model="gpt-4o-mini", input="hi", stream=True))

    assert plain.usage.output_tokens == 5
    assert events[-1].type == "response.completed"
    sent = [request["json"] for request in upstream.requests()]
    assert "stream_options" not in sent[1]
    rows = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 2)
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [
        (12, 5),
        (12, 5),
    ]
    assert [r["streamed"] for r in rows] == [0, 1]


def test_embeddings_are_metered(proxy, upstream, client, student):
    result = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])

    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 8
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert (row["prompt_tokens"], row["total_tokens"]) == (16, 16)


def test_speech_audio_comes_back_byte_for_byte(proxy, upstream, client, student):
    direct = requests.post(
        f"{upstream.url}/v1/audio/speech",
        headers={"Authorization": f"Bearer {UPSTREAM_KEY}"},
        json={"model": "tts-1", "input": "Hello", "voice": "alloy"},
        timeout=10,
    ).content

    speech = client.audio.speech.create(model="tts-1", input="Hello", voice="alloy")

    assert speech.content == direct
    assert speech.response.headers["content-type"] == "audio/mpeg"
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert row["total_tokens"] is None  # no usage in a binary answer: unknown


def test_gzip_answer_is_decoded_once(proxy, upstream, client, student):
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[], extra_headers={"x-fake-gzip": "1"}
    )

    assert reply.usage.total_tokens == 14


def test_unknown_key_raises_authentication_error(proxy, upstream, make_client):
    stranger = make_client(proxy, "sk-not-a-student")

    with pytest.raises(openai.AuthenticationError) as raised:
        stranger.chat.completions.create(model="gpt-4o-mini", messages=[])

    assert raised.value.code == "invalid_api_key"
    assert upstream.requests() == []


def test_upstream_rate_limit_passes_through(proxy, upstream, client, student):
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[], extra_headers={"x-fake-status": "429"}
        )

    assert raised.value.code == "rate_limit_exceeded"
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert row["status"] == 429
    assert row["total_tokens"] is None


@pytest.mark.parametrize("status", [400, 404, 500])
def test_upstream_error_bodies_pass_through_unchanged(proxy, upstream, student, status):
    headers = {"Authorization": f"Bearer {UPSTREAM_KEY}", "x-fake-status": str(status)}
    direct = requests.post(
        f"{upstream.url}/v1/chat/completions", headers=headers, json={}
    )

    through = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={**headers, "Authorization": f"Bearer {student.key}"},
        json={},
        timeout=10,
    )

    assert through.status_code == status
    assert through.content == direct.content


def test_key_headers_of_the_node_proxy_are_accepted(proxy, upstream, student):
    for header in ("api-key", "x-api-key"):
        answer = requests.get(
            f"{proxy.url}/v1/models", headers={header: student.key}, timeout=10
        )

        assert answer.status_code == 200, header

    assert all(
        r["headers"].get(h) is None
        for r in upstream.requests()
        for h in (
            "api-key",
            "x-api-key",
        )
    )


def test_disabled_key_is_refused_with_403(proxy, upstream, make_client):
    disabled = add_student(proxy.keys_path, disabled=True)
    client = make_client(proxy, disabled.key)

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.models.list()

    assert raised.value.code == "key_disabled"
    assert upstream.requests() == []


def test_upstream_refusing_the_proxy_key_is_reported_as_misconfiguration(
    proxy_factory, upstream, caplog, make_client
):
    broken = proxy_factory(OPENAI_API_KEY="sk-wrong-upstream-secret")
    student = add_student(broken.keys_path)
    client = make_client(broken, student.key)

    with pytest.raises(openai.InternalServerError) as raised:
        client.models.list()

    assert raised.value.status_code == 502
    assert raised.value.code == "proxy_misconfigured"
    assert "sk-wrong" not in raised.value.response.text
    assert "OPENAI_API_KEY" in broken.log()
    assert "sk-wrong-upstream-secret" not in broken.log()
    assert "sk-wrong" not in broken.access_log()


def test_unreachable_upstream_gives_502(proxy_factory, make_client):
    port = _closed_port()
    broken = proxy_factory(OPENAI_BASE_URL=f"http://127.0.0.1:{port}")
    student = add_student(broken.keys_path)
    client = make_client(broken, student.key)

    with pytest.raises(openai.InternalServerError) as raised:
        client.models.list()

    assert raised.value.status_code == 502
    [row] = wait_for_usage_rows(broken.usage_path, student.fingerprint, 1)
    assert row["status"] == 502


def test_slow_upstream_gives_504(proxy_factory, upstream, make_client):
    slow = proxy_factory(UPSTREAM_TIMEOUT=0.3)
    student = add_student(slow.keys_path)
    client = make_client(slow, student.key)

    with pytest.raises(openai.InternalServerError) as raised:
        client.models.list(extra_headers={"x-fake-delay-ms": "2000"})

    assert raised.value.status_code == 504
    assert raised.value.code == "upstream_timeout"


def _closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_stream_chunks_arrive_as_the_upstream_sends_them(proxy, upstream, student):
    started = time.monotonic()
    arrivals = []
    with requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={
            "Authorization": f"Bearer {student.key}",
            "x-fake-chunks": "4",
            "x-fake-interval-ms": "400",
        },
        json={"model": "gpt-4o-mini", "messages": [], "stream": True},
        stream=True,
        timeout=10,
    ) as answer:
        for line in answer.iter_lines():
            if line.startswith(b"data: {"):
                arrivals.append(time.monotonic() - started)

    # The upstream needs 1.6 s for the whole stream; the first content must
    # not wait for the end.
    assert arrivals[1] < 0.8
    assert arrivals[-1] > 1.4


def test_events_and_characters_split_across_reads_survive(proxy, upstream, client):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[],
        stream=True,
        extra_headers={"x-fake-split-bytes": "3", "x-fake-chunks": "4"},
    )

    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert text == "Héllo wörld 世界 🎉 "


def test_client_hanging_up_mid_stream_leaves_a_partial_row(proxy, upstream, student):
    with requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={
            "Authorization": f"Bearer {student.key}",
            "x-fake-chunks": "100",
            "x-fake-interval-ms": "50",
        },
        json={"model": "gpt-4o-mini", "messages": [], "stream": True},
        stream=True,
        timeout=10,
    ) as answer:
        lines = answer.iter_lines()
        next(line for line in lines if line.startswith(b"data: {"))

    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert row["partial"] == 1
    # No usage chunk came: the tokens are the proxy's estimate, and say so.
    assert row["tokens_estimated"] == 1
    assert row["completion_tokens"] >= 1
    _wait_for_upstream_hang_up(upstream)


def _wait_for_upstream_hang_up(upstream, seconds=5):
    # 100 chunks 50 ms apart take 5 s; the proxy must hang up long before.
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        [seen] = upstream.requests()
        if seen.get("client_disconnected"):
            return

        time.sleep(0.05)

    raise AssertionError("the proxy kept the upstream stream open")


def test_upstream_cutting_a_stream_gives_the_student_an_error(
    proxy, upstream, client, student
):
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[],
        stream=True,
        extra_headers={"x-fake-break-after": "2"},
    )

    with pytest.raises(openai.APIError):
        list(stream)

    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert row["partial"] == 1


def test_health_needs_no_key(proxy):
    answer = requests.get(f"{proxy.url}/health", timeout=5)

    assert answer.status_code == 200


def test_browser_preflight_is_answered_without_a_key(proxy, upstream):
    answer = requests.options(
        f"{proxy.url}/v1/chat/completions",
        headers={
            "Origin": "https://class.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": (
                "authorization,content-type,api-key,x-stainless-os,"
                "x-stainless-runtime,x-stainless-retry-count"
            ),
        },
        timeout=5,
    )

    assert answer.status_code == 200
    allowed = answer.headers["Access-Control-Allow-Headers"].lower()
    for header in ("authorization", "api-key", "content-type", "x-stainless-os"):
        assert header in allowed
    assert upstream.requests() == []


def test_cors_headers_are_on_errors_too(proxy):
    answer = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={"Origin": "https://class.example"},
        json={},
        timeout=5,
    )

    assert answer.status_code == 401
    assert answer.headers["Access-Control-Allow-Origin"] in (
        "*",
        "https://class.example",
    )


# json.loads takes about 990 levels; the fake upstream parses what we forward.
@pytest.mark.parametrize("depth, allowed", [(900, {200, 400}), (100_000, {400})])
def test_deeply_nested_json_never_breaks_the_proxy(
    proxy, upstream, student, depth, allowed
):
    body = '{"model": "gpt-4o-mini", "messages": ' + "[" * depth + "]" * depth + "}"

    answer = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={
            "Authorization": f"Bearer {student.key}",
            "Content-Type": "application/json",
        },
        data=body,
        timeout=10,
    )

    assert answer.status_code in allowed, answer.text
    if answer.status_code == 400:
        assert "nested too deeply" in answer.json()["error"]["message"]


def test_key_pasted_into_a_prompt_is_not_logged(proxy, upstream, client, student):
    client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"my key is {student.key}"}],
    )

    wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    [line] = [x for x in proxy.access_log().splitlines() if student.email in x]
    assert student.key not in line
    assert "my key is [their key]" in line


def test_data_files_are_readable_by_the_owner_only(proxy, upstream, client, student):
    client.chat.completions.create(model="gpt-4o-mini", messages=[])
    wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)

    for name in ("keys.json", "usage.sqlite", "access.log", "temp-uploads"):
        mode = (proxy.data_dir / name).stat().st_mode

        assert mode & 0o077 == 0, f"{name} is {oct(mode)}"


def test_other_keys_pasted_into_a_body_are_not_logged(proxy, upstream, client, student):
    other_key = generate_key()  # as create.py makes them
    add_student(proxy.keys_path, key=other_key)

    client.embeddings.create(
        model="text-embedding-3-small", input=f"{other_key} and {UPSTREAM_KEY}"
    )

    wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    [line] = [x for x in proxy.access_log().splitlines() if student.email in x]
    for secret in (other_key, UPSTREAM_KEY):
        assert secret not in line


def test_a_key_in_the_url_path_is_refused_and_not_logged(proxy, upstream, student):
    answer = requests.get(
        f"{proxy.url}/v1/files/{student.key}",
        headers={"Authorization": f"Bearer {student.key}"},
        timeout=10,
    )
    real = requests.get(
        f"{proxy.url}/v1/models/{UPSTREAM_KEY}",
        headers={"Authorization": f"Bearer {student.key}"},
        timeout=10,
    )

    assert answer.status_code == 400
    assert "in the URL" in answer.json()["error"]["message"]
    assert real.status_code == 404  # forwarded: the student cannot know it
    wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    log = proxy.access_log()
    assert log.count(student.email) == 2
    assert student.key not in log and UPSTREAM_KEY not in log
    assert all(student.key not in r["path"] for r in upstream.requests())


def test_a_graceful_stop_ends_long_streams_and_accounts_for_them(
    proxy_factory, make_client
):
    # gunicorn kills a stopping worker after graceful_timeout; a stream that
    # would outlive it is ended a few seconds before, with an error the SDK
    # raises, and still leaves its row and its log line.
    running = proxy_factory(
        workers=1, name="stopping", gunicorn_args=("--graceful-timeout", "7")
    )
    student = add_student(running.data_dir / "keys.json")
    stream = make_client(running, student.key).chat.completions.create(
        model="gpt-4o-mini",
        messages=[],
        stream=True,
        extra_headers={"x-fake-chunks": "300", "x-fake-interval-ms": "100"},
    )
    chunks = iter(stream)
    next(chunks)

    running.process.send_signal(signal.SIGTERM)

    with pytest.raises(openai.APIError, match="restarting"):
        list(chunks)
    assert running.process.wait(timeout=20) == 0
    [row] = read_usage_rows(running.usage_path, student.fingerprint)
    assert (row["streamed"], row["partial"], row["tokens_estimated"]) == (1, 1, 1)
    assert student.email in running.access_log()


def test_a_graceful_stop_ends_requests_still_waiting_for_the_upstream(
    proxy_factory, make_client
):
    # A slow model may not have sent a byte when the worker must go: the
    # student gets an error saying so, and the request its row and line.
    running = proxy_factory(
        workers=1, name="stopping", gunicorn_args=("--graceful-timeout", "7")
    )
    student = add_student(running.data_dir / "keys.json")
    sdk = make_client(running, student.key)
    outcome = {}

    def ask():
        try:
            sdk.chat.completions.create(
                model="gpt-4o-mini",
                messages=[],
                extra_headers={"x-fake-delay-ms": "30000"},
            )
        except openai.APIError as error:
            outcome["error"] = error

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1)
    running.process.send_signal(signal.SIGTERM)
    asking.join(timeout=20)

    assert "restarting" in str(outcome.get("error"))
    assert running.process.wait(timeout=20) == 0
    [row] = read_usage_rows(running.usage_path, student.fingerprint)
    assert row["status"] == 502
    assert student.email in running.access_log()
