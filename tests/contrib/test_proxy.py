"""Picking the end user's address from the peer and X-Forwarded-For, and the user agent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from op_celery import ConfigurationError
from op_celery._events import MAX_USER_AGENT_CHARS, normalize_call
from op_celery.contrib._proxy import (
    TrustedProxies,
    clean_user_agent,
    context_from_environ,
    context_from_scope,
    parse_address,
)

PROXY = "10.0.0.5"


def test_by_default_the_peer_is_the_client_and_x_forwarded_for_is_ignored() -> None:
    proxies = TrustedProxies()
    assert proxies.client_ip("198.51.100.9", "203.0.113.7") == "198.51.100.9"
    assert TrustedProxies(0).client_ip("198.51.100.9", "203.0.113.7") == "198.51.100.9"
    assert TrustedProxies([]).client_ip("198.51.100.9", "203.0.113.7") == "198.51.100.9"


def test_x_forwarded_for_is_ignored_when_the_peer_is_not_a_trusted_proxy() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip("198.51.100.9", "203.0.113.7") == "198.51.100.9"


def test_a_trusted_peer_names_the_client_in_x_forwarded_for() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip(PROXY, "203.0.113.7") == "203.0.113.7"


def test_the_right_most_untrusted_hop_is_the_client_not_what_the_client_wrote() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.1"])
    # The client claims 1.1.1.1; the outer proxy 192.0.2.1 appended the real 203.0.113.7.
    forwarded = "1.1.1.1, 203.0.113.7, 192.0.2.1"
    assert proxies.client_ip(PROXY, forwarded) == "203.0.113.7"


def test_when_every_hop_is_trusted_the_left_most_is_the_client() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip(PROXY, "10.1.1.1, 10.2.2.2") == "10.1.1.1"
    assert proxies.client_ip(PROXY, None) == PROXY


def test_several_x_forwarded_for_headers_are_read_in_order() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip(PROXY, ["1.1.1.1", "203.0.113.7, 10.9.9.9"]) == "203.0.113.7"


def test_an_unreadable_hop_in_the_client_position_gives_no_address_rather_than_a_guess() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip(PROXY, "203.0.113.7, unknown") is None
    assert proxies.client_ip(PROXY, "garbage, 203.0.113.7") == "203.0.113.7"
    assert TrustedProxies().client_ip("not-an-ip", None) is None
    assert TrustedProxies().client_ip(None, None) is None
    assert TrustedProxies(["10.0.0.0/8"]).client_ip("", "203.0.113.7") is None


def test_a_hop_count_takes_the_nth_entry_from_the_right() -> None:
    assert TrustedProxies(1).client_ip(PROXY, "1.1.1.1, 203.0.113.7") == "203.0.113.7"
    assert TrustedProxies(2).client_ip(PROXY, "1.1.1.1, 203.0.113.7, 10.0.0.4") == "203.0.113.7"


def test_a_hop_count_ignores_a_header_with_fewer_entries_and_uses_the_peer() -> None:
    assert TrustedProxies(2).client_ip(PROXY, "203.0.113.7") == PROXY
    assert TrustedProxies(1).client_ip(PROXY, None) == PROXY


def test_a_hop_count_works_without_a_peer_address_as_over_a_unix_socket() -> None:
    assert TrustedProxies(1).client_ip(None, "203.0.113.7") == "203.0.113.7"


def test_ports_brackets_and_ipv4_mapped_ipv6_are_read_as_plain_addresses() -> None:
    assert str(parse_address("203.0.113.7:51234")) == "203.0.113.7"
    assert str(parse_address("[2001:db8::1]:443")) == "2001:db8::1"
    assert str(parse_address("[2001:db8::1]")) == "2001:db8::1"
    assert str(parse_address("2001:DB8::1")) == "2001:db8::1"
    assert str(parse_address("::ffff:203.0.113.7")) == "203.0.113.7"
    assert parse_address("[2001:db8::1") is None
    assert parse_address("example.com") is None
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip("::ffff:10.0.0.5", "[2001:db8::7]:80") == "2001:db8::7"


def test_ipv6_proxies_and_a_comma_separated_setting_are_understood() -> None:
    proxies = TrustedProxies("10.0.0.0/8, fd00::/8")
    assert proxies.client_ip("fd00::1", "2001:db8::7, 10.0.0.9") == "2001:db8::7"


@pytest.mark.parametrize("setting", [-1, True, ["10.0.0.0/33"], ["proxy.internal"], [10]])
def test_an_invalid_setting_is_a_configuration_error(setting: object) -> None:
    with pytest.raises(ConfigurationError, match="trusted_proxies"):
        TrustedProxies(setting)  # type: ignore[arg-type]


def test_the_user_agent_is_made_safe_for_delay_instead_of_making_the_view_fail() -> None:
    assert clean_user_agent(None) is None
    assert clean_user_agent("  ") is None
    assert clean_user_agent("Mozilla/5.0\t(X11)\x7f") == "Mozilla/5.0 (X11)"
    long = clean_user_agent("A" * (MAX_USER_AGENT_CHARS + 500))
    assert long is not None and len(long) == MAX_USER_AGENT_CHARS
    normalize_call("track", ("x",), {"user_agent": long})  # accepted by .delay()'s rules


def test_a_wsgi_environ_and_an_asgi_scope_give_the_same_context() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    environ = {
        "REMOTE_ADDR": PROXY,
        "HTTP_X_FORWARDED_FOR": "1.1.1.1, 203.0.113.7",
        "HTTP_USER_AGENT": "UA/1",
    }
    scope = {
        "type": "http",
        "client": (PROXY, 4711),
        "headers": [
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"user-agent", b"UA/1"),
            (b"x-forwarded-for", b"203.0.113.7"),
        ],
    }
    from_environ = context_from_environ(environ, proxies)
    assert from_environ == context_from_scope(scope, proxies)
    assert (from_environ.client_ip, from_environ.user_agent) == ("203.0.113.7", "UA/1")


def test_an_asgi_scope_without_client_or_headers_gives_an_empty_context() -> None:
    context = context_from_scope({"type": "http"}, TrustedProxies())
    assert (context.client_ip, context.user_agent) == (None, None)


def test_op_celery_and_op_celery_contrib_import_with_no_framework_installed() -> None:
    code = textwrap.dedent(
        """
        import sys
        for name in ("django", "flask", "starlette", "fastapi"):
            sys.modules[name] = None  # as if not installed: importing it raises ImportError
        import op_celery
        import op_celery.contrib
        import op_celery.contrib._proxy
        loaded = [m for m in ("django", "flask", "starlette", "fastapi") if sys.modules[m]]
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("module", "framework", "extra"),
    [
        ("django", "django", "django"),
        ("flask", "flask", "flask"),
        ("fastapi", "starlette", "fastapi"),
    ],
)
def test_importing_an_integration_without_its_framework_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, module: str, framework: str, extra: str
) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, f"op_celery.contrib.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"pip install 'op-celery\[{extra}\]'"):
        importlib.import_module(f"op_celery.contrib.{module}")
