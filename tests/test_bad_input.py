"""Bad input through gunicorn: refused with OpenAI-shaped errors, never forwarded."""

import json
import socket
import time

import pytest
import requests

OVERSIZED_BYTES = 60 * 1024 * 1024


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["message"]
    return error


def send_raw(proxy, request_bytes, read_until_closed=True):
    """Send bytes as they are; return what came back (until close, or first read)."""
    host, port = proxy.url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(request_bytes)
        while piece := connection.recv(65536):
            answer += piece
            if not read_until_closed and b"\r\n\r\n" in answer:
                break

    return answer


def raw_request(key, target, headers=(), body=b"", method="GET"):
    """Return an HTTP/1.1 request as bytes, with nothing normalized."""
    if not any(header.lower().startswith("host:") for header in headers):
        headers = ["Host: 127.0.0.1", *headers]

    lines = [
        f"{method} {target} HTTP/1.1",
        f"Authorization: Bearer {key}",
        "Connection: close",
        *headers,
    ]
    if body:
        lines.append(f"Content-Length: {len(body)}")

    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def json_headers(key):
    return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}


def status_of(answer):
    return int(answer.split(b" ", 2)[1])


def access_lines_for(proxy, text, seconds=5):
    """Return the access-log lines mentioning `text`, after letting them land."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and text not in proxy.access_log():
        time.sleep(0.02)

    time.sleep(0.2)
    return [line for line in proxy.access_log().splitlines() if text in line]


def test_invalid_json_gets_400_and_nothing_is_forwarded(proxy, upstream, student):
    response = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers=json_headers(student.key),
        data=b'{"model": "gpt-4o-mini", "messages": [}',
        timeout=10,
    )

    error = assert_openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded"]
)
def test_wrong_content_type_gets_415_naming_json(
    proxy, upstream, student, content_type
):
    response = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers={**json_headers(student.key), "Content-Type": content_type},
        data=b'{"model": "gpt-4o-mini"}',
        timeout=10,
    )

    error = assert_openai_error(response, 415)
    assert "application/json" in error["message"]
    assert upstream.requests() == []


def test_body_without_content_type_gets_415(proxy, upstream, student):
    answer = send_raw(
        proxy,
        raw_request(student.key, "/v1/chat/completions", body=b"{}", method="POST"),
    )

    assert status_of(answer) == 415
    assert b"application/json" in answer
    assert upstream.requests() == []


def test_oversized_body_gets_413_before_it_is_sent(proxy, upstream, student):
    request = raw_request(
        student.key,
        "/v1/chat/completions",
        headers=[
            "Content-Type: application/json",
            f"Content-Length: {OVERSIZED_BYTES}",
        ],
        method="POST",
    )

    # Only the headers and a few bytes go out; the answer must come anyway.
    answer = send_raw(proxy, request + b'{"model": "gpt-4o', read_until_closed=False)

    assert status_of(answer) == 413
    head, _, _ = answer.partition(b"\r\n\r\n")
    assert b"application/json" in head.lower()
    assert upstream.requests() == []


def test_oversized_body_error_is_openai_shaped(proxy, upstream, student):
    response = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers=json_headers(student.key),
        data=b" " * (51 * 1024 * 1024),
        timeout=60,
    )

    error = assert_openai_error(response, 413)
    assert error["code"] == "request_too_large"
    assert "50" in error["message"]


@pytest.mark.parametrize(
    "target",
    [
        "/v1/../admin",
        "/v1/%2e%2e/x",
        "/v1/%2E%2E/%2E%2E/admin",
        "/v1/models/..%2f..%2fadmin",
        "/v1//evil.example/x",
        "/v1/http://evil.example/x",
        "/v1/./models",
    ],
)
def test_path_tricks_never_leave_the_upstream_base(proxy, upstream, student, target):
    answer = send_raw(proxy, raw_request(student.key, target, ["Host: evil.example"]))

    assert status_of(answer) in (400, 404), answer
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"location:" not in head.lower()
    assert b'"invalid_request_error"' in body
    assert upstream.requests() == []


@pytest.mark.parametrize(
    "target", ["/v1/models@evil.example", "http://evil.example/v1/models"]
)
def test_host_lookalikes_stay_on_the_upstream(proxy, upstream, student, target):
    send_raw(proxy, raw_request(student.key, target))

    for seen in upstream.requests():
        assert seen["path"].startswith("/v1/models")
        assert seen["headers"]["host"] == upstream.url.removeprefix("http://")


def test_crlf_in_the_query_string_injects_no_header(proxy, upstream, student):
    response = requests.post(
        f"{proxy.url}/v1/chat/completions?x=%0d%0aInjected:%201",
        headers={"Authorization": f"Bearer {student.key}"},
        json={"model": "gpt-4o-mini", "messages": []},
        timeout=10,
    )

    assert response.status_code == 200
    [seen] = upstream.requests()
    assert "injected" not in seen["headers"]
    assert seen["query"] == {"x": "\r\nInjected: 1"}


@pytest.mark.parametrize(
    "header",
    [
        "X-Custom: a\rInjected: 1",
        "X-Custom: a\nInjected: 1",
        "X-Custom: a\r\n Injected: 1",
    ],
)
def test_crlf_in_a_header_value_injects_no_header(proxy, upstream, student, header):
    request = raw_request(
        student.key,
        "/v1/chat/completions",
        headers=["Content-Type: application/json", header],
        body=b'{"model": "gpt-4o-mini", "messages": []}',
        method="POST",
    )

    answer = send_raw(proxy, request)

    assert status_of(answer) in (200, 400)
    for seen in upstream.requests():
        assert "injected" not in seen["headers"]
        assert "\r" not in str(seen["headers"]) and "\n" not in str(seen["headers"])


def test_missing_key_gets_401_and_one_access_line(proxy, upstream):
    marker = f"/v1/models/no-key-{time.monotonic_ns()}"

    response = requests.get(f"{proxy.url}{marker}", timeout=10)

    error = assert_openai_error(response, 401)
    assert error["code"] == "invalid_api_key"
    assert upstream.requests() == []
    [line] = access_lines_for(proxy, marker)
    assert 'user="(no key)"' in line
    assert "status=401" in line


def test_oversized_chunked_body_gets_413(proxy, upstream, student):
    def pieces():
        for _ in range(52):
            yield b" " * (1024 * 1024)

    try:
        response = requests.post(
            f"{proxy.url}/v1/chat/completions",
            headers=json_headers(student.key),
            data=pieces(),
            timeout=60,
        )
    except requests.ConnectionError:
        pytest.fail("the proxy hung up instead of answering 413")

    assert_openai_error(response, 413)
    assert upstream.requests() == []


def test_chunked_json_under_the_limit_is_forwarded_whole(proxy, upstream, student):
    content = "x" * (2 * 1024 * 1024)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [], "note": content})

    response = requests.post(
        f"{proxy.url}/v1/chat/completions",
        headers=json_headers(student.key),
        data=(body[i : i + 65536].encode() for i in range(0, len(body), 65536)),
        timeout=60,
    )

    assert response.status_code == 200, response.text
    [seen] = upstream.requests()
    assert seen["json"]["note"] == content
