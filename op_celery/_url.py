"""Would JavaScript's ``new URL(text)`` take this string? The WHATWG URL parser, in Python.

OpenPanel checks ``identify``'s ``avatar`` with zod 4's ``z.string().url()``: the string,
trimmed by ``String.prototype.trim``, must be something ``new URL()`` parses without a base.
`url_failure` answers that question and says why not. It follows the URL Standard's basic
parser in every branch that can *fail*; the branches that only record a validation error or
rewrite the URL (percent-encoding, path normalisation) cannot change the verdict and are left
out:

- a scheme (an ASCII letter, then letters, digits, ``+``, ``-``, ``.``) and ``:`` are required;
- a special scheme (``http``, ``https``, ``ws``, ``wss``, ``ftp``) needs a non-empty host, and
  its host must parse: ``[IPv6]``, an IPv4 address in any of the forms WHATWG reads (``0x7f.1``),
  or a domain that UTS 46 maps and that holds no forbidden code point; a port is at most 65535;
- ``file:`` needs a parseable host only in ``file://host/``;
- any other scheme (``mailto:``, ``data:``, ``javascript:``) fails only on an authority
  (``x://host``) whose opaque host holds a forbidden code point or is a bad ``[IPv6]``.

Non-ASCII domains go through the ``idna`` package's UTS 46 table (``idna`` comes with
``requests``); its Unicode version can differ from the one in the JavaScript engine for code
points assigned very recently. The checks were compared with Node's own ``new URL()`` in the
differential table of ``tests/data/openpanel_verdicts.json``.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

__all__ = ["JS_WHITESPACE", "js_trim", "url_failure"]

#: What ``String.prototype.trim`` removes: ECMAScript WhiteSpace and LineTerminator.
JS_WHITESPACE: Final = (
    "\t\n\v\f\r \xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000\ufeff"
)
#: Schemes the URL Standard calls special (``file`` is special too, handled apart).
_SPECIAL: Final = frozenset({"http", "https", "ws", "wss", "ftp"})
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*:")
#: C0 controls and space, stripped from both ends of the input by the URL parser.
_C0_OR_SPACE: Final = "".join(chr(c) for c in range(0x21))
_TAB_OR_NEWLINE: Final = re.compile(r"[\t\n\r]")
_SURROGATE: Final = re.compile(r"[\ud800-\udfff]")
_FORBIDDEN_HOST: Final = frozenset("\x00\t\n\r #/:<>?@[\\]^|")
_FORBIDDEN_DOMAIN: Final = _FORBIDDEN_HOST | frozenset(chr(c) for c in range(0x20)) | {"%", "\x7f"}
_PERCENT_BYTE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")
_WINDOWS_DRIVE: Final = re.compile(r"[A-Za-z][:|]")


def js_trim(text: str) -> str:
    """``text.trim()`` as JavaScript does it (a different set from ``str.strip()``)."""
    return text.strip(JS_WHITESPACE)


def url_failure(text: str) -> str | None:
    """Why ``new URL(text.trim())`` would throw, or ``None`` if it parses."""
    # JavaScript hands the parser a USVString: a lone surrogate becomes U+FFFD.
    value = _SURROGATE.sub("\ufffd", js_trim(text)).strip(_C0_OR_SPACE)
    value = _TAB_OR_NEWLINE.sub("", value)
    scheme_match = _SCHEME.match(value)
    if scheme_match is None:
        return "has no scheme (such as https:), so it is not an absolute URL"
    scheme = scheme_match.group()[:-1].lower()
    rest = value[scheme_match.end() :]
    if scheme == "file":
        return _file_failure(rest)
    if scheme in _SPECIAL:
        authority = re.split(r"[/\\?#]", rest.lstrip("/\\"), maxsplit=1)[0]
        return _authority_failure(authority, special=True)
    if rest.startswith("//"):
        return _authority_failure(re.split(r"[/?#]", rest[2:], maxsplit=1)[0], special=False)
    return None  # an opaque path (mailto:, data:, javascript:) or a path: always parses


def _file_failure(rest: str) -> str | None:
    if len(rest) < 2 or rest[0] not in "/\\" or rest[1] not in "/\\":
        return None
    host = re.split(r"[/\\?#]", rest[2:], maxsplit=1)[0]
    if not host or _WINDOWS_DRIVE.fullmatch(host):
        return None
    return _host_failure(host, special=True)


def _authority_failure(authority: str, *, special: bool) -> str | None:
    at = authority.rfind("@")
    host_port = authority[at + 1 :]
    if at != -1 and not host_port:
        return "has credentials but no host"
    inside_brackets = False
    host, port = host_port, None
    for i, char in enumerate(host_port):
        if char == "[":
            inside_brackets = True
        elif char == "]":
            inside_brackets = False
        elif char == ":" and not inside_brackets:
            host, port = host_port[:i], host_port[i + 1 :]
            if not host:
                return "has a port but no host"
            break
    if not host:
        return "has no host" if special else None
    failure = _host_failure(host, special=special)
    if failure is None and port:
        if not port.isascii() or not port.isdigit():
            return f"has a port that is not a number ({port[:20]!r})"
        if int(port) > 65535:
            return f"has port {port}, above 65535"
    return failure


def _host_failure(host: str, *, special: bool) -> str | None:
    if host.startswith("["):
        if not host.endswith("]"):
            return "has an IPv6 host without its closing ']'"
        return None if _ipv6_parses(host[1:-1]) else "has an IPv6 host that does not parse"
    if not special:
        bad = next((c for c in host if c in _FORBIDDEN_HOST), None)
        return None if bad is None else f"has {bad!r} in its host"
    raw = _PERCENT_BYTE.sub(lambda m: bytes([int(m.group(1), 16)]), host.encode("utf-8"))
    ascii_domain = _domain_to_ascii(raw.decode("utf-8", "replace"))
    if ascii_domain is None:
        return "has a host name that IDNA (UTS 46) refuses"
    bad = next((c for c in ascii_domain if c in _FORBIDDEN_DOMAIN), None)
    if bad is not None:
        return f"has {bad!r} in its host name"
    if _ends_in_number(ascii_domain) and not _ipv4_parses(ascii_domain):
        return "has a host that looks like an IPv4 address but is not one"
    return None


def _domain_to_ascii(domain: str) -> str | None:
    """UTS 46 ToASCII as the URL Standard calls it (no STD3 rules, no DNS length); None: failure."""
    if domain.isascii() and not any(label[:4].lower() == "xn--" for label in domain.split(".")):
        return domain.lower() or None
    import idna  # lazily: only non-ASCII hosts need its tables

    try:
        mapped = unicodedata.normalize("NFC", idna.uts46_remap(domain, False, False))
    except (idna.IDNAError, ValueError):
        return None
    labels = mapped.split(".")
    out = []
    for label in labels:
        text = label
        if label[:4].lower() == "xn--":
            if not label.isascii():
                return None
            try:
                text = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                return None
            if not text:
                return None
        if not _label_valid(text):
            return None
        out.append(label if text.isascii() else "xn--" + text.encode("punycode").decode("ascii"))
    result = ".".join(out)
    return result or None


def _label_valid(label: str) -> bool:
    import idna

    if not label or label.isascii():
        return True
    if unicodedata.normalize("NFC", label) != label or label[:4].lower() == "xn--":
        return False
    if unicodedata.category(label[0]).startswith("M"):
        return False
    try:
        if idna.uts46_remap(label, False, False) != label:
            return False
        for i, char in enumerate(label):
            if char in "\u200c\u200d" and not idna.core.valid_contextj(label, i):
                return False
    except (idna.IDNAError, ValueError):
        return False
    return _bidi_valid(label)


_LTR: Final = frozenset({"L", "EN", "ES", "CS", "ET", "ON", "BN", "NSM"})
_RTL: Final = frozenset({"R", "AL", "AN", "EN", "ES", "CS", "ET", "ON", "BN", "NSM"})


def _bidi_valid(label: str) -> bool:
    """RFC 5893's bidi rule as ada 2.9.2 (Node 20 and 22's URL parser) applies it.

    Only a label holding an R, AL or AN character is checked. Ada's LTR branch does not look at
    the last non-NSM character (``"a\u05d0"`` passes) and its RTL branch does not check the first
    (``"\u0661\u05d0"`` passes): deviations from the RFC that the server's Node has.
    """
    directions = [unicodedata.bidirectional(char) for char in label]
    if not {"R", "AL", "AN"} & set(directions):
        return True
    last = max((i for i, d in enumerate(directions) if d != "NSM"), default=-1)
    if last == -1:
        return False
    if directions[0] == "L":
        return all(d in _LTR for d in directions[:last])
    kept = directions[: last + 1]
    if "EN" in kept and "AN" in kept:
        return False
    return all(d in _RTL for d in kept) and kept[-1] in ("R", "AL", "AN", "EN")


def _ipv4_number(part: str) -> int | None:
    if not part:
        return None
    radix = 10
    if part[:2] in ("0x", "0X"):
        part, radix = part[2:], 16
    elif len(part) > 1 and part[0] == "0":
        part, radix = part[1:], 8
    if not part:
        return 0
    digits = {10: "0123456789", 16: "0123456789abcdefABCDEF", 8: "01234567"}[radix]
    if any(c not in digits for c in part):
        return None
    return int(part, radix)


def _ends_in_number(domain: str) -> bool:
    parts = domain.split(".")
    if parts[-1] == "":
        if len(parts) == 1:
            return False
        parts.pop()
    last = parts[-1]
    if last and last.isascii() and last.isdigit():
        return True
    return _ipv4_number(last) is not None


def _ipv4_parses(domain: str) -> bool:
    parts = domain.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if len(parts) > 4:
        return False
    numbers = [_ipv4_number(part) for part in parts]
    if any(n is None for n in numbers):
        return False
    values = [n for n in numbers if n is not None]
    if any(n > 255 for n in values[:-1]):
        return False
    return bool(values[-1] < 256 ** (5 - len(values)))


def _ipv6_parses(text: str) -> bool:
    """The URL Standard's IPv6 parser, keeping only its verdict."""
    hexdigits, n = "0123456789abcdefABCDEF", len(text)
    piece, compress, i = 0, False, 0
    if text.startswith(":"):
        if not text.startswith("::"):
            return False
        i, piece, compress = 2, 1, True
    while i < n:
        if piece == 8:
            return False
        if text[i] == ":":
            if compress:
                return False
            i, piece, compress = i + 1, piece + 1, True
            continue
        length = 0
        while length < 4 and i < n and text[i] in hexdigits:
            i, length = i + 1, length + 1
        if i < n and text[i] == ".":
            if length == 0 or piece > 6:
                return False
            return _ipv4_in_ipv6(text[i - length :]) and (compress or piece + 2 == 8)
        if i < n and text[i] == ":":
            i += 1
            if i == n:
                return False
        elif i < n:
            return False
        piece += 1
    return compress or piece == 8


def _ipv4_in_ipv6(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(
        part.isascii() and part.isdigit() and (part == "0" or part[0] != "0") and int(part) < 256
        for part in parts
    )
