"""The benchmark's clients: small chats, concurrent streams, one upload."""

import asyncio
import json
import re
import time

import aiohttp

TIMESTAMP = re.compile(rb"t=(\d+\.\d+);")
CHAT_BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi"}]}
).encode()
# Every wait has an end: a stuck proxy fails the run instead of hanging it.
WORKLOAD_SECONDS = 120


def percentile(values, fraction):
    if not values:
        return None

    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def send_chats(url, keys, count, concurrency):
    """W1 client: `count` small chat completions, `concurrency` at a time."""
    latencies, usage, failures = [], [0, 0, 0], 0
    next_index = iter(range(count))
    deadline = time.monotonic() + WORKLOAD_SECONDS
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def work(session):
        nonlocal failures
        for index in next_index:
            if time.monotonic() > deadline:
                return

            headers = {
                "Authorization": f"Bearer {keys[index % len(keys)]}",
                "Content-Type": "application/json",
            }
            started = time.perf_counter()
            try:
                async with session.post(url, data=CHAT_BODY, headers=headers) as answer:
                    body = await answer.read()
                    ok = answer.status == 200
            except aiohttp.ClientError:
                ok = False

            latencies.append(time.perf_counter() - started)
            if not ok:
                failures += 1
                continue

            reported = json.loads(body)["usage"]
            usage[0] += reported["prompt_tokens"]
            usage[1] += reported["completion_tokens"]
            usage[2] += reported["total_tokens"]

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(work(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started

    return {
        "latencies": latencies,
        "usage": usage,
        "failures": failures,
        "elapsed": elapsed,
    }


async def open_streams(url, keys, streams, chunks, interval_ms, ask_usage):
    """W2 client: `streams` concurrent streams; record each chunk's delay."""
    body = {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "Say hi"}],
    }
    if ask_usage:
        body["stream_options"] = {"include_usage": True}

    payload = json.dumps(body).encode()
    results = []
    timeout = aiohttp.ClientTimeout(total=WORKLOAD_SECONDS)
    connector = aiohttp.TCPConnector(limit=streams)

    async def one(session, index):
        # Starts are spread over one chunk interval: real students' streams
        # are not in phase, and the delay figures are about the proxy.
        await asyncio.sleep(interval_ms / 1000 * index / streams)
        headers = {
            "Authorization": f"Bearer {keys[index % len(keys)]}",
            "Content-Type": "application/json",
            "x-fake-chunks": str(chunks),
            "x-fake-interval-ms": str(interval_ms),
            "x-fake-timestamps": "1",
        }
        results.append(await read_stream(session, url, payload, headers))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, n) for n in range(streams)))

    return results


async def read_stream(session, url, payload, headers):
    record = {"delays": [], "first": None, "done": False, "usage": None, "ok": False}
    started = time.time()
    try:
        async with session.post(url, data=payload, headers=headers) as answer:
            record["ok"] = answer.status == 200
            async for line in answer.content:
                now = time.time()
                match = TIMESTAMP.search(line)
                if match:
                    record["delays"].append(now - float(match[1]))
                    if record["first"] is None:
                        record["first"] = now - started
                elif line.startswith(b"data: [DONE]"):
                    record["done"] = True
                elif b'"usage":{' in line:
                    record["usage"] = json.loads(line[5:])["usage"]
    except (TimeoutError, aiohttp.ClientError):
        record["ok"] = False

    return record


async def upload(url, keys, paths):
    """W3 client: transcription uploads of `paths` at once, one key each in turn.

    Returns the wall time of the whole batch and every answer's status.
    """
    timeout = aiohttp.ClientTimeout(total=WORKLOAD_SECONDS)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        started = time.perf_counter()
        statuses = await asyncio.gather(
            *(
                _upload_one(session, url, keys[number % len(keys)], path)
                for number, path in enumerate(paths)
            )
        )

    return {"seconds": time.perf_counter() - started, "statuses": statuses}


async def _upload_one(session, url, key, path):
    with open(path, "rb") as file:
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("file", file, filename="lesson.mp3", content_type="audio/mpeg")
        headers = {"Authorization": f"Bearer {key}"}
        async with session.post(url, data=form, headers=headers) as answer:
            await answer.read()
            return answer.status
