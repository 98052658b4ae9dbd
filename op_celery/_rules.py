"""The rules of OpenPanel's ``POST /track`` and of HTTP, as plain functions of one value.

Read from OpenPanel's source at commit ``ed7bddd`` (``packages/validation/src/
track.validation.ts`` and ``event-blocklist.ts``, zod 4.3.6; ``apps/api/src/app.ts`` for the
body parser) and checked against that code run under Node (``tests/data/
openpanel_verdicts.json``). Each function returns ``None`` when the value passes, else the
server's reason in a few words, so `_events` (which raises `InvalidEvent` naming the caller's
argument) and the stand-in server (which answers 400 naming the field) share one rule book.

JavaScript, not Python, decides: lengths are UTF-16 code units (``"😀"`` is 2), the blocklist
is matched on ``toLowerCase()`` and its patterns with ``/i`` outside Unicode mode (which folds
only ASCII letters; ``ſ`` is no ``s``), ``.`` stops at any line terminator, ``$`` is the very
end, numbers are doubles.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "BLOCKED_NAME_FRAGMENTS",
    "MAX_EVENT_NAME_UNITS",
    "MAX_SAFE_INTEGER",
    "PATH_SCAN_PATTERNS",
    "RESERVED_EVENT_NAMES",
    "blocked_name",
    "email_failure",
    "header_failure",
    "js_length",
    "js_trim",
    "poisoned_key",
    "skipped_ip_kind",
]

#: Longest event name, in UTF-16 code units (``MAX_EVENT_LENGTH`` of event-blocklist.ts).
MAX_EVENT_NAME_UNITS: Final = 80
#: Largest integer a JavaScript double holds exactly (``Number.MAX_SAFE_INTEGER``).
MAX_SAFE_INTEGER: Final = 2**53 - 1
#: Event names the server keeps for its sessions (``RESERVED_EVENT_NAMES``).
RESERVED_EVENT_NAMES: Final = ("session_start", "session_end")
#: ``BLOCKED_SUBSTRINGS`` of event-blocklist.ts, in its order: refused anywhere in the
#: lower-cased name.
BLOCKED_NAME_FRAGMENTS: Final = (
    # security scanner domains
    "oastify.com", "burpcollaborator", "interact.sh", "oast.me",
    # SQL injection
    "pg_sleep", "waitfor delay", "xp_dirtree", "load_file(", "extractvalue(",
    "dbms_pipe.receive_message", "union select",
    # command injection
    "nslookup ", "/bin/sleep", "/bin/bash", "cmd.exe", "wget+http", "wget http", "chmod+777",
    "chmod 777",
    # Java / code execution
    "processbuilder", "runtime.getruntime", "java.lang.processbuilder", "eval-stdin.php",
    # path traversal
    "../", "..\\", "%2e%2e", "%u002e%u002e", "/etc/passwd", "/etc/shadow", "win.ini",
    "system.ini",
    # template injection
    "${", "%{",
    # XXE
    "<!doctype", "<!entity", "<xi:include", "xsi:schemalocation",
    # SMTP header injection
    "\r\n", "bcc:",
    # file scans
    "phpinfo.php", "wp-config.php", ".git/config", ".env.backup", ".env.bak", "/vendor/phpunit/",
    # malware, botnets
    "mozi.m", "/setup.cgi?", "/cgi-bin/",
    # Ruby object inspection leaks
    "#<article:0x", "#<video:0x", "#<brand:0x",
    # SQL injection patterns
    "exec master.dbo", "declare @", "' and '", "' or '", "') or ", "')and ",
)  # fmt: skip
_ANY: Final = r"[^\n\r\u2028\u2029]"  # JavaScript's "." without the s flag
#: ``PATH_SCAN_PATTERNS`` of event-blocklist.ts: names that are a scanner's URL paths. ASCII
#: case folding as JavaScript's /i without u; ``\Z`` for its ``$``.
PATH_SCAN_PATTERNS: Final = tuple(
    re.compile(pattern, re.IGNORECASE | re.ASCII)
    for pattern in (
        r"^/[a-z_-]+\.(php|env|yml|yaml|json|xml|config|ini|bak|sql|log)",
        r"^/\.[a-z]",
        r"^/(wp-|wordpress)",
        r"^/phpmyadmin",
        rf"^/{_ANY}+\.php\Z",
    )
)
_FRAGMENT: Final = re.compile("|".join(re.escape(f) for f in BLOCKED_NAME_FRAGMENTS))
#: zod 4's ``z.regexes.email`` (ASCII only, a dotted domain, a TLD of two letters or more).
_EMAIL: Final = re.compile(
    r"(?!\.)(?!" + _ANY + r"*\.\.)[A-Za-z0-9_'+\-.]*[A-Za-z0-9_+-]"
    r"@(?:[A-Za-z0-9][A-Za-z0-9\-]*\.)+[A-Za-z]{2,}"
)
#: An RFC 9110 field value as ``requests`` and Node both take it: VCHAR, obs-text, SP, HTAB,
#: starting with a visible character (``requests`` refuses a leading one Python calls space,
#: ``\x85`` and ``\xa0`` included). Trailing SP/HTAB is allowed: Node strips it, as RFC 9110 says.
_FIELD_VALUE: Final = re.compile(r"[\x21-\x7e\x80-\x84\x86-\x9f\xa1-\xff][\t\x20-\x7e\x80-\xff]*")
_NOT_LATIN_1: Final = re.compile(r"[^\x00-\xff]")
_CONTROL: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def js_length(text: str) -> int:
    """``text.length`` in JavaScript: UTF-16 code units (a character above U+FFFF counts 2)."""
    if text.isascii():
        return len(text)
    return len(text) + sum(1 for char in text if char > "\uffff")


#: What JavaScript's ``String.prototype.trim`` removes: WhiteSpace (tab, VT, FF, space, NBSP,
#: the BOM, every Zs) and LineTerminator. Not Python's ``str.strip()``, which also takes
#: ``\x1c``-``\x1f`` and ``\x85`` and leaves the BOM.
_JS_WHITESPACE: Final = (
    "\t\n\x0b\x0c\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
)


def js_trim(text: str) -> str:
    """``text.trim()`` in JavaScript."""
    return text.strip(_JS_WHITESPACE)


def blocked_name(name: str) -> str | None:
    """Why the server refuses this event name (``isBlockedEventName``, the reserved names)."""
    units = js_length(name)
    if units > MAX_EVENT_NAME_UNITS:
        return f"is {units} UTF-16 code units; OpenPanel allows {MAX_EVENT_NAME_UNITS}"
    if "\n" in name or "\r" in name:
        return "contains a line break, which OpenPanel's blocklist refuses"
    lowered = name.lower()
    found = _FRAGMENT.search(lowered)
    if found is not None:
        return (
            f"contains {found.group()!r}, one of OpenPanel's blocked name fragments "
            "(attack probes are dropped with 400 'Event name contains blocked content'); rename it"
        )
    for pattern in PATH_SCAN_PATTERNS if name.startswith("/") else ():  # each starts ^/
        if pattern.search(name):
            return (
                f"matches OpenPanel's path-scan pattern {pattern.pattern!r} (a scanner's URL "
                "path, dropped with 400 'Event name contains blocked content'); rename it"
            )
    if name in RESERVED_EVENT_NAMES:
        return f"is {name!r}, which OpenPanel reserves for its sessions"
    return None


def email_failure(text: str) -> str | None:
    """Why zod 4's ``z.string().email()`` refuses ``text``."""
    if _EMAIL.fullmatch(text):
        return None
    return (
        "is not an address zod's email rule takes (ASCII only, no '..', a dotted domain "
        "ending in a TLD of 2+ letters; OpenPanel answers 400 'Invalid email address')"
    )


def header_failure(text: str) -> str | None:
    """Why ``text`` cannot be sent as an HTTP header value (latin-1, RFC 9110, ``requests``)."""
    if _FIELD_VALUE.fullmatch(text):
        return None
    bad = _NOT_LATIN_1.search(text)
    if bad is not None:
        return (
            f"holds {bad.group()!r} (U+{ord(bad.group()):04X}), which an HTTP header cannot "
            "carry (headers are latin-1)"
        )
    bad = _CONTROL.search(text)
    if bad is not None:
        return f"holds the control character {bad.group()!r}, which an HTTP header cannot carry"
    if not text:
        return "is empty"
    return "starts with whitespace, which requests refuses to send in a header"


def poisoned_key(key: str, value: object) -> bool:
    """Whether fastify's JSON parser (secure-json-parse) refuses the body for this key."""
    if key == "__proto__":
        return True
    return key == "constructor" and isinstance(value, dict) and "prototype" in value


def skipped_ip_kind(ip: str) -> str | None:
    """The kind of address the server skips as a client IP (``"loopback"``, ``"private"``,
    ``"link-local"``), else None.

    ``isPublicIp`` of ``packages/common/server/get-client-ip.ts``, which tests the text by its
    prefix: 127/8 and ``::1``, 10/8, 172.16/12, 192.168/16, 169.254/16, and IPv6 addresses
    written from ``fc00:``, ``fd00:`` or ``fe80:`` (not all of fc00::/7 and fe80::/10: the
    server takes ``fd12::1`` for public); ``::ffff:`` IPv4-mapped ones by their IPv4 part.
    """
    if ip.startswith("::ffff:"):
        return skipped_ip_kind(ip[7:])
    if ip == "::1" or ip.startswith("127."):
        return "loopback"
    if ip.startswith(("fc00:", "fd00:", "10.", "192.168.")):
        return "private"
    if ip.startswith("172."):
        second = ip.split(".")[1] if ip.count(".") else ""
        if second.isdigit() and 16 <= int(second) <= 31:
            return "private"
    if ip.startswith(("fe80:", "169.254.")):
        return "link-local"
    return None
