"""The HTTP teacher against servers that misbehave (a real server on 127.0.0.1 each): replies that trickle in,
replies larger than max_tokens explains, replies without text, and 429s that say when to come back."""

from __future__ import annotations

import email.utils
import logging
import time

import pytest

from distillery.core.errors import UserError
from distillery.reasoning.teachers import Dropped, OpenAITeacher, reply_byte_cap
from tests.fixtures.http_faults import FaultServer, chat_reply, raw_response, send, trickle

SECRET = "sk-distillery-faults-0123456789"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def serve():
    servers: list[FaultServer] = []

    def start(answer) -> FaultServer:
        servers.append(FaultServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def teacher_for(server: FaultServer, monkeypatch, **options) -> OpenAITeacher:
    monkeypatch.setenv("FAULTS_KEY", SECRET)
    return OpenAITeacher(server.url, "stub", "FAULTS_KEY", **{"timeout_s": 5.0, "retries": 0, **options})


def ask(teacher: OpenAITeacher, max_tokens: int = 64) -> str | Dropped:
    try:
        return teacher.complete(HI, 1, 0.0, max_tokens, 0)[0]
    finally:
        teacher.close()


# ---- the whole request within timeout_s -----------------------------------------------------------------------

def trickled_body(handler, n: int) -> None:
    body = chat_reply("The answer is (a)")
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.flush()
    trickle(handler, body, 0.2)


def trickled_chunks(handler, n: int) -> None:
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for byte in chat_reply("The answer is (a)"):
        handler.wfile.write(b"1\r\n" + bytes([byte]) + b"\r\n")
        handler.wfile.flush()
        time.sleep(0.2)


def trickled_status_line(handler, n: int) -> None:
    trickle(handler, raw_response(chat_reply("The answer is (a)")), 0.2)


@pytest.mark.parametrize("answer", [trickled_body, trickled_chunks, trickled_status_line],
                         ids=["body", "chunked", "status line and headers"])
def test_a_reply_that_trickles_in_is_cut_at_timeout_s_for_the_whole_request(serve, monkeypatch, answer) -> None:
    """A byte every 0.2 s keeps every read under the 1 s timeout; the whole reply would take many seconds."""
    server = serve(answer)
    teacher = teacher_for(server, monkeypatch, timeout_s=1.0, retries=1)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"did not answer after 2 attempt\(s\) \(last: no whole reply within "
                                        r"teacher.timeout_s \(1 s\)\).*raise distill.teacher.timeout_s") as caught:
        ask(teacher)
    assert time.monotonic() - started < 1.0 + 0.5 + 1.0 + 1.0  # two attempts, one backoff, and some slack
    assert server.requests == 2 and SECRET not in str(caught.value)


# ---- the reply's size --------------------------------------------------------------------------------------------

def ten_megabytes(handler, n: int) -> None:
    send(handler, chat_reply("x" * 10_000_000))


def endless_chunks(handler, n: int) -> None:
    """No Content-Length: chunks of text until the client hangs up."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    for chunk in iter_chunks():
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))


def iter_chunks():
    yield b'{"choices": [{"message": {"content": "'
    while True:
        yield b"y" * 65536


@pytest.mark.parametrize("answer", [ten_megabytes, endless_chunks], ids=["content-length", "endless chunks"])
def test_a_reply_larger_than_max_tokens_explains_is_cut_off_and_dropped(serve, monkeypatch, answer) -> None:
    teacher = teacher_for(serve(answer), monkeypatch)
    started = time.monotonic()
    reply = ask(teacher, max_tokens=64)
    assert reply == Dropped("reply too large", f"over {reply_byte_cap(64):,} bytes, the cap for max_tokens 64; "
                                               "the rest was not read")
    assert time.monotonic() - started < 3


def test_a_long_reply_within_the_cap_is_kept_whole(serve, monkeypatch) -> None:
    text = "word " * 2000  # 10,000 characters for 2,048 tokens: plausible, so not cut
    assert ask(teacher_for(serve(lambda handler, n: send(handler, chat_reply(text))), monkeypatch),
               max_tokens=2048) == text


# ---- replies without text -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "detail"), [
    (chat_reply(None, finish_reason="length"), "content null, finish_reason length"),
    (chat_reply("", finish_reason="stop"), "content empty, finish_reason stop"),
    (chat_reply("  \n ", finish_reason="stop"), "content empty, finish_reason stop"),
    (chat_reply(None, reasoning_content="<think>...</think>"),
     "content null, finish_reason stop; the text is in reasoning_content (the server's reasoning parser)"),
], ids=["null", "empty", "blank", "reasoning_content"])
def test_a_reply_without_text_is_a_dropped_sample_that_says_why(serve, monkeypatch, body, detail) -> None:
    assert ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch)) == Dropped("no text", detail)


def test_reasoning_a_server_parsed_out_goes_back_into_the_trace(serve, monkeypatch) -> None:
    """vLLM's --reasoning-parser and DeepSeek's API return the thought in reasoning_content and the answer in
    content: the trace keeps both, as R1 writes them."""
    body = chat_reply("The answer is 42.", reasoning_content="6 * 7 = 42")
    assert ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch)) == \
        "<think>\n6 * 7 = 42\n</think>\n\nThe answer is 42."


def test_a_reply_that_stopped_at_max_tokens_is_marked_cut_off(serve, monkeypatch) -> None:
    from distillery.reasoning.teachers import CutOff

    body = chat_reply("9 * 2 = 18 dollars, but she also pays for feed, so 18 - ", finish_reason="length")
    reply = ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch))
    assert isinstance(reply, CutOff) and reply.endswith("so 18 - ")


# ---- Retry-After ----------------------------------------------------------------------------------------------------

def busy_once(retry_after: str):
    def answer(handler, n: int) -> None:
        if n == 1:
            send(handler, b'{"error": "slow down"}', status=429, headers={"Retry-After": retry_after})
        else:
            send(handler, chat_reply("The answer is (a)"))
    return answer


@pytest.mark.parametrize("retry_after", ["2", "date"], ids=["seconds", "http date"])
def test_retry_after_is_honoured_and_the_wait_logged(serve, monkeypatch, caplog, retry_after) -> None:
    """The backoff alone would wait 0.5 s; the server asks for 2 s (or a date 3 s ahead, whole seconds)."""
    value = email.utils.formatdate(time.time() + 3, usegmt=True) if retry_after == "date" else retry_after
    server = serve(busy_once(value))
    caplog.set_level(logging.INFO, logger="distillery.reasoning.teachers")
    assert ask(teacher_for(server, monkeypatch, retries=1)) == "The answer is (a)"
    waited = server.arrivals[1] - server.arrivals[0]
    assert 1.9 <= waited < 4
    assert "HTTP 429, Retry-After" in caplog.text and "as asked" in caplog.text and SECRET not in caplog.text


def test_a_longer_retry_after_is_cut_to_max_retry_wait_s_and_said_so(serve, monkeypatch, caplog) -> None:
    server = serve(lambda handler, n: send(handler, b"{}", status=429, headers={"Retry-After": "3600"}))
    caplog.set_level(logging.INFO, logger="distillery.reasoning.teachers")
    with pytest.raises(UserError, match=r"after 2 attempt\(s\) \(last: HTTP 429, Retry-After 3600 s\)"):
        ask(teacher_for(server, monkeypatch, retries=1, max_retry_wait_s=1.0))
    assert 0.9 <= server.arrivals[1] - server.arrivals[0] < 2
    assert "waiting 1 s, not the 3600 s asked (distill.teacher.max_retry_wait_s)" in caplog.text


# ---- hostile replies ------------------------------------------------------------------------------------------------

def test_a_lone_surrogate_in_a_reply_is_replaced_not_written_as_invalid_utf8(serve, monkeypatch) -> None:
    """JSON can spell a lone surrogate (\\ud800); written to progress.jsonl it ended distill with a traceback."""
    body = b'{"choices": [{"message": {"content": "ok \\ud800 then"}, "finish_reason": "stop"}]}'
    answer = ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch))
    assert answer == "ok ? then" and answer.encode("utf-8")


def test_a_reply_nested_past_the_recursion_limit_is_a_dropped_sample(serve, monkeypatch) -> None:
    body = b"[" * 50_000  # within the byte cap
    assert ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch)) == Dropped(
        "unreadable reply", "JSON nested past Python's recursion limit")


def test_a_reply_with_a_number_python_cannot_hold_is_a_dropped_sample_not_the_end_of_distill(serve, monkeypatch) -> None:
    """A 5,000-digit integer in any field stopped the stage: 'did not answer in the chat-completions shape'."""
    body = b'{"choices": [{"message": {"content": "ok"}, "finish_reason": "stop", "n": ' + b"9" * 5000 + b"}]}"
    assert ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch)) == Dropped(
        "unreadable reply", "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits")


def test_a_reply_without_text_names_its_finish_reason_cut_short(serve, monkeypatch) -> None:
    """A 60 KB finish_reason went whole into the message and the report."""
    body = b'{"choices": [{"message": {"content": ""}, "finish_reason": {"x": [' + b"1, " * 20000 + b'1]}}]}'
    dropped = ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch))
    assert dropped.reason == "no text" and len(dropped.detail) < 150 and dropped.detail.startswith("content empty")


def test_control_characters_in_a_reply_are_not_trained_on(serve, monkeypatch) -> None:
    """An escape sequence or a NUL in a teacher's text went into distill's train.jsonl; ingest removes them."""
    body = chat_reply("\x1b]52;c;cm0gLXJm\x07\x1b[2J\x00The answer is (a).\n\tDone.")
    assert ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch)) == \
        "]52;c;cm0gLXJm[2JThe answer is (a).\n\tDone."


@pytest.mark.parametrize("url", ["http://[::1", "ftp://example.com/v1", "localhost:8000/v1"])
def test_a_teacher_url_that_is_no_http_url_is_one_message(url: str) -> None:
    """`http://[::1` was an unexpected InvalidURL, exit 1."""
    with pytest.raises(UserError, match=r"distill.teacher.url .* is not (a URL|an http\(s\) URL with a host)"):
        OpenAITeacher(url, "stub", "NO_KEY", timeout_s=5.0, retries=0)


@pytest.mark.parametrize("body", [b"\x1bc\x1b]0;owned\x07 not JSON",
                                  '{"choices": [{"message": {"content": ["\u009b2J \u202edesrever"]}}]}'.encode()],
                         ids=["not the chat shape", "content not text"])
def test_a_reply_in_the_wrong_shape_is_quoted_without_what_acts_on_the_terminal(serve, monkeypatch, body) -> None:
    """The server's text in the message that stops distill was printed raw: ESC c resets the user's terminal, an
    OSC sequence retitles it, a bidi override reverses what follows (valid JSON may hold it, and C1's CSI, raw)."""
    with pytest.raises(UserError) as raised:
        ask(teacher_for(serve(lambda handler, n: send(handler, body)), monkeypatch))
    message = str(raised.value)
    assert not any(char in message for char in "\x1b\x07\u009b\u202e"), message
    assert "not JSON" in message or "desrever" in message


def test_a_retry_after_of_digits_python_cannot_read_as_a_number_is_ignored(serve, monkeypatch) -> None:
    server = serve(busy_once("²"))  # str.isdigit() says yes; float() says no
    assert ask(teacher_for(server, monkeypatch, retries=1)) == "The answer is (a)"


# ---- error statuses: one prompt's, or every request's ---------------------------------------------------------------

CONTEXT_ERROR = (b'{"object": "error", "message": "This model\'s maximum context length is 4096 tokens. However, you '
                 b'requested 9000 tokens \\u001b[31m(8000 in the messages).", "type": "BadRequestError", "code": 400}')


@pytest.mark.parametrize(("status", "body", "detail"), [
    (400, CONTEXT_ERROR, "This model's maximum context length is 4096 tokens. However, you requested 9000 tokens "
                         "(8000 in the messages)."),
    (413, b"<html>Request Entity Too Large</html>", "<html>Request Entity Too Large</html>"),
    (422, b'{"error": {"message": "' + b"flagged " * 60 + b'", "code": "content_filter"}}',
     ("flagged " * 25)[:200] + "..."),
], ids=["400 vLLM", "413 plain", "422 OpenAI, long"])
def test_a_prompt_the_teacher_refuses_is_a_dropped_sample_naming_the_status_and_message(serve, monkeypatch, status,
                                                                                           body, detail) -> None:
    """Not retried (the same request fails the same way), and the stage goes on with the other prompts."""
    server = serve(lambda handler, n: send(handler, body, status=status))
    assert ask(teacher_for(server, monkeypatch, retries=2)) == Dropped(f"refused by the teacher (HTTP {status})", detail)
    assert server.requests == 1


@pytest.mark.parametrize("status", [401, 403, 404])
def test_an_error_that_concerns_every_request_stops_with_one_message(serve, monkeypatch, status) -> None:
    server = serve(lambda handler, n: send(handler, b'{"error": {"message": "no"}}', status=status))
    with pytest.raises(UserError, match=rf"answered HTTP {status}: .*Check teacher.url, teacher.model and the key"):
        ask(teacher_for(server, monkeypatch, retries=2))
    assert server.requests == 1


def test_a_compressed_reply_is_asked_against_and_not_read(serve, monkeypatch) -> None:
    """307 bytes of gzip in gzip in gzip are 4 GB: httpx inflated each chunk whole before the cap was checked (a
    MemoryError, 'a bug'). The request asks for no compression, and a reply compressed anyway is that sample's."""
    import gzip

    seen = []
    bomb = gzip.compress(gzip.compress(b"\0" * (64 << 20)))  # inflated, it would be past the byte cap
    assert len(bomb) < 100_000

    def answer(handler, n: int) -> None:
        seen.append(handler.headers.get("Accept-Encoding"))
        send(handler, bomb, headers={"Content-Encoding": "gzip, gzip"})

    assert ask(teacher_for(serve(answer), monkeypatch)) == Dropped(
        "unreadable reply", "compressed (gzip, gzip) though asked for none; not read")
    assert seen == ["identity"]


def test_a_misshapen_reply_after_good_ones_costs_its_sample_and_first_it_names_the_server(serve, monkeypatch) -> None:
    """One reply of the wrong shape stopped a run whose other replies were fine; from a server that never answered
    in the chat-completions shape it is still one message."""
    def answer(handler, n: int) -> None:
        send(handler, chat_reply("The answer is (a).") if n == 1 else b'{"choices": [{"message": {"content": [1]}}]}')

    teacher = teacher_for(serve(answer), monkeypatch)
    try:
        assert teacher.complete(HI, 1, 0.0, 64, 0) == ["The answer is (a)."]
        dropped = teacher.complete(HI, 1, 0.0, 64, 0)[0]
    finally:
        teacher.close()
    assert dropped.reason == "unreadable reply" and dropped.detail.startswith("answered with a list as choices[0]")
    fresh = teacher_for(serve(lambda handler, n: send(handler, b'{"choices": {"0": 1}}')), monkeypatch)
    with pytest.raises(UserError, match=r"did not answer in the chat-completions shape \(choices\[0\].message.content\)"):
        ask(fresh)
