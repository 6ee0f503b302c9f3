"""Reading usage out of stream events, as plain Python."""

from metering import Meter


def test_usage_null_chunks_are_relayed_and_record_nothing():
    meter = Meter(strip_usage_chunk=True)

    relayed = [
        meter.read_event(b'data: {"choices":[{"delta":{}}],"usage":null}\n\n'),
        meter.read_event(b'data: {"choices": [], "usage": null}\n\n'),
    ]

    assert relayed == [True, True]
    assert meter.total_tokens is None


def test_usage_is_read_whatever_the_spacing_around_the_colon():
    meter = Meter(strip_usage_chunk=True)
    event = (
        b'data: {"choices": [], "usage" : {"prompt_tokens": 9,'
        b' "completion_tokens": 5, "total_tokens": 14}}\n\n'
    )

    relayed = meter.read_event(event)

    assert relayed is False
    assert (meter.prompt_tokens, meter.completion_tokens, meter.total_tokens) == (
        9,
        5,
        14,
    )


def test_the_word_usage_in_content_is_not_mistaken_for_usage():
    meter = Meter()
    event = (
        b'data: {"choices":[{"delta":{"content":"\\"usage\\": 5"}}],"usage":null}\n\n'
    )

    assert meter.read_event(event) is True
    assert meter.total_tokens is None
