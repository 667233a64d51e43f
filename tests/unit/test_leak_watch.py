"""The secret-leak check of the suite catches a password wherever it shows up."""

from __future__ import annotations

import logging

from tests.support.leaks import LeakWatch, password


def test_leak_watch_finds_a_password_in_logs_answers_and_events() -> None:
    watch = LeakWatch()
    logger = logging.getLogger("leak-canary")
    logger.propagate = False  # the canary must not reach the session's own watch
    logger.addHandler(watch)
    try:
        logger.warning("login failed for %s", password("canary"))
    finally:
        logger.removeHandler(watch)
    watch.answers.append('{"password": "' + password("x") + '"}')
    watch.events.append(password("y").encode())
    kinds = [leak.split(":")[0] for leak in watch.leaks()]
    assert kinds == ["log", "API answer", "event"]


def test_leak_watch_is_quiet_without_passwords() -> None:
    watch = LeakWatch()
    watch.answers.append('{"has_password": true}')
    assert watch.leaks() == []


def test_leak_watch_finds_an_oauth_token_it_was_told_of() -> None:
    from tests.support.leaks import OTHER_SECRETS

    token = "eyJ-canary-token-that-no-log-has"
    watch = LeakWatch()
    watch.logs.append(f"refresh answered {token}")
    watch.events.append(token.encode())
    assert watch.leaks() == []  # unknown strings are not secrets
    OTHER_SECRETS.add(token)
    try:
        assert [leak.split(":")[0] for leak in watch.leaks()] == ["log", "event"]
    finally:
        OTHER_SECRETS.discard(token)
