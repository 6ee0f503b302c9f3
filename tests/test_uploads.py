"""Audio uploads through the real gunicorn proxy: spooled to disk, limited."""

import hashlib
import io
import multiprocessing
import os
import signal
import socket
import time
import wave

import openai
import pytest
import requests
from conftest import add_student, stop_process, wait_for_usage_rows, worker_pids

from uploads import MAX_UPLOADS_PER_STUDENT, sweep


def make_wav(seconds=0.2, rate=8000):
    """Return a short silent mono WAV file's bytes."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes(b"\x00\x00" * int(seconds * rate))

    return buffer.getvalue()


def temp_files(proxy):
    folder = proxy.data_dir / "temp-uploads"
    return sorted(p.name for p in folder.glob("*.upload")) if folder.exists() else []


def wait_until_no_temp_files(proxy, seconds=5):
    deadline = time.monotonic() + seconds
    while temp_files(proxy) and time.monotonic() < deadline:
        time.sleep(0.05)

    assert temp_files(proxy) == []


def post_upload(proxy, student, files, data=None, path="audio/transcriptions"):
    return requests.post(
        f"{proxy.url}/v1/{path}",
        headers={"Authorization": f"Bearer {student.key}"},
        files=files,
        data=data if data is not None else {"model": "whisper-1"},
        timeout=30,
    )


def test_sdk_transcription_goes_through_disk_and_is_metered(
    proxy, upstream, client, student
):
    audio = make_wav()

    result = client.audio.transcriptions.create(
        model="whisper-1", file=("hello.wav", audio, "audio/wav")
    )

    assert result.text == "Héllo wörld 世界 🎉"
    [seen] = upstream.requests()
    assert seen["files"][0]["sha256"] == hashlib.sha256(audio).hexdigest()
    assert seen["form"]["model"] == "whisper-1"
    [row] = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    assert (row["model"], row["audio_seconds"], row["status"]) == ("whisper-1", 9, 200)
    wait_until_no_temp_files(proxy)


# openai 3.x marks audio.translations deprecated; classes still use it.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_sdk_translation_and_token_metered_transcription(
    proxy, upstream, client, student
):
    audio = make_wav()

    translation = client.audio.translations.create(
        model="whisper-1", file=("hello.mp3", audio)
    )
    transcript = client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("hello.m4a", audio)
    )

    assert translation.text and transcript.text
    rows = wait_for_usage_rows(proxy.usage_path, student.fingerprint, 2)
    assert rows[0]["total_tokens"] is None  # translations report no usage
    assert (rows[1]["prompt_tokens"], rows[1]["total_tokens"]) == (14, 59)
    wait_until_no_temp_files(proxy)


def test_access_log_names_files_and_sizes_not_content(proxy, upstream, student):
    audio = make_wav()

    post_upload(proxy, student, {"file": ("lecture-notes.wav", audio)})

    wait_for_usage_rows(proxy.usage_path, student.fingerprint, 1)
    [line] = [x for x in proxy.access_log().splitlines() if student.email in x]
    assert f"file:lecture-notes.wav({len(audio)} B)" in line
    assert "fields=model" in line
    assert "RIFF" not in line


@pytest.mark.parametrize(
    "files, data, status, param",
    [
        ([("file", (f"a{n}.wav", b"RIFF")) for n in range(6)], None, 400, None),
        ({"file": ("notes.txt", b"hello")}, None, 400, "file"),
        ({"file": ("noextension", b"hello")}, None, 400, "file"),
        ({"audio": ("a.wav", b"RIFF")}, None, 400, "file"),
    ],
    ids=["six-files", "text-file", "no-extension", "no-file-field"],
)
def test_upload_limits_answer_clearly_and_forward_nothing(
    proxy, upstream, student, files, data, status, param
):
    answer = post_upload(proxy, student, files, data)

    assert answer.status_code == status
    assert answer.json()["error"]["message"]
    assert answer.json()["error"]["param"] == param
    assert upstream.requests() == []
    wait_until_no_temp_files(proxy)


def test_file_over_50_mb_is_refused_with_413(proxy, upstream, student):
    too_big = b"\0" * (50 * 1024 * 1024 + 1)

    answer = post_upload(proxy, student, {"file": ("long.wav", too_big)})

    assert answer.status_code == 413
    assert "50 MB" in answer.json()["error"]["message"]
    assert upstream.requests() == []
    wait_until_no_temp_files(proxy)


def test_other_multipart_endpoints_are_spooled_without_audio_rules(
    proxy, upstream, student
):
    answer = post_upload(
        proxy, student, {"file": ("data.jsonl", b"{}\n")}, {"purpose": "batch"}, "files"
    )

    assert answer.status_code == 404  # the fake has no /files; it was forwarded
    [seen] = upstream.requests()
    assert seen["path"] == "/v1/files"


def _hold_uploads(url, key, count, ready, release):
    """Open `count` uploads that stay in flight until `release` is set."""
    sockets = [_start_slow_upload(url, key) for _ in range(count)]
    ready.release()
    release.wait(30)
    for held in sockets:
        held.close()


def _start_slow_upload(url, key):
    host, port = url.removeprefix("http://").split(":")
    boundary = "holdboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\n'
        f"whisper-1\r\n--{boundary}\r\nContent-Disposition: form-data; "
        f'name="file"; filename="slow.wav"\r\n\r\n'
    ).encode() + b"\0" * 1024
    held = socket.create_connection((host, int(port)))
    held.sendall(
        (
            f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(head) + 10_000_000}\r\n\r\n"
        ).encode()
        + head
    )
    return held


def _wait_for_temp_files(proxy, count, seconds=10):
    deadline = time.monotonic() + seconds
    while len(temp_files(proxy)) < count and time.monotonic() < deadline:
        time.sleep(0.05)

    assert len(temp_files(proxy)) == count


def test_eleventh_upload_in_flight_waits_across_processes(proxy, upstream, student):
    context = multiprocessing.get_context("spawn")
    ready, release = context.Semaphore(0), context.Event()
    holders = [
        context.Process(
            target=_hold_uploads, args=(proxy.url, student.key, 5, ready, release)
        )
        for _ in range(MAX_UPLOADS_PER_STUDENT // 5)
    ]
    for holder in holders:
        holder.start()

    for _ in holders:
        ready.acquire(timeout=30)

    _wait_for_temp_files(proxy, MAX_UPLOADS_PER_STUDENT)

    refused = post_upload(proxy, student, {"file": ("one-more.wav", make_wav())})
    other = add_student(proxy.keys_path)
    others_answer = post_upload(proxy, other, {"file": ("mine.wav", make_wav())})
    release.set()
    for holder in holders:
        holder.join(30)

    assert refused.status_code == 429
    assert "wait" in refused.json()["error"]["message"].lower()
    assert others_answer.status_code == 200
    wait_until_no_temp_files(proxy)
    assert post_upload(proxy, student, {"file": ("now.wav", make_wav())}).ok


def test_worker_dying_mid_upload_frees_the_students_slots(proxy_factory, upstream):
    single = proxy_factory(workers=1)
    student = add_student(single.keys_path)
    held = [_start_slow_upload(single.url, student.key) for _ in range(10)]
    _wait_for_temp_files(single, MAX_UPLOADS_PER_STUDENT)

    [worker] = worker_pids(single.process.pid)
    os.kill(worker, signal.SIGKILL)
    for connection in held:
        connection.close()

    answer = _post_when_a_worker_is_back(single, student)
    assert answer.status_code == 200
    assert temp_files(single) == []  # the master deleted the dead worker's files


def _post_when_a_worker_is_back(proxy, student, seconds=20):
    deadline = time.monotonic() + seconds
    while True:
        try:
            return post_upload(proxy, student, {"file": ("after.wav", make_wav())})
        except requests.ConnectionError:
            if time.monotonic() > deadline:
                raise

            time.sleep(0.2)


def test_client_abort_mid_upload_deletes_the_temp_file(proxy, upstream, student):
    held = _start_slow_upload(proxy.url, student.key)
    _wait_for_temp_files(proxy, 1)

    held.close()

    wait_until_no_temp_files(proxy)
    assert upstream.requests() == []


def test_graceful_shutdown_removes_leftover_uploads(proxy_factory):
    stopping = proxy_factory()
    leftover = stopping.data_dir / "temp-uploads" / "left-by-a-crash.upload"
    leftover.write_bytes(b"partial")

    stop_process(stopping.process)

    assert not leftover.exists()


def test_sweep_removes_only_stale_uploads(tmp_path):
    stale, fresh = tmp_path / "stale.upload", tmp_path / "fresh.upload"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    eleven_minutes_ago = time.time() - 11 * 60
    os.utime(stale, (eleven_minutes_ago, eleven_minutes_ago))

    removed = sweep(tmp_path)

    assert removed == 1
    assert not stale.exists() and fresh.exists()


def test_upload_rejects_client_side_key_check_first(proxy, upstream, make_client):
    stranger = make_client(proxy, "nope")

    with pytest.raises(openai.AuthenticationError):
        stranger.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"x"))

    assert upstream.requests() == []


def test_a_worker_dying_while_config_json_is_broken_leaves_the_proxy_up(
    proxy_factory, upstream
):
    running = proxy_factory(workers=1)
    config_path = running.data_dir / "config.json"
    config_path.write_text(config_path.read_text()[:-1])  # a save gone wrong

    [worker] = worker_pids(running.process.pid)
    os.kill(worker, signal.SIGKILL)

    student = add_student(running.keys_path)
    answer = _post_when_a_worker_is_back(running, student)
    assert answer.status_code == 200
    assert running.process.poll() is None
