"""PII redaction: e-mail addresses, phone numbers, IPv4/IPv6 addresses and credit-card numbers.

``redact_pii(text, cfg) -> (text, counts)`` replaces each match by a tag such as ``<EMAIL>`` and
counts matches per kind. Credit-card candidates must pass the Luhn checksum and IP candidates must
parse with ``ipaddress``, which keeps ordinary numbers (years, prices, times, versions) intact.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

EMAIL_RE = re.compile(r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
IPV4_RE = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])")
IPV6_RE = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|(?:\d{1,3}\.){3}\d{1,3})(?![\w:])")
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){1,4}"  # international, +44 20 7946 0018
    r"|\(\d{3}\)\s?\d{3}[.-]\d{4}"  # (555) 123-4567
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 555-123-4567, 555.123.4567
    r"|0\d{2,4}[\s-]\d{3,4}[\s-]?\d{3,4}"  # national trunk prefix, 020 7946 0018
    r")(?![\w])"
)

TAGS = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>"}


@dataclass(frozen=True, kw_only=True)
class PIIConfig:
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip_address: bool = True
    credit_card: bool = True


def luhn_valid(digits: str) -> bool:
    """Luhn (mod 10) checksum, as used by payment card numbers (ISO/IEC 7812)."""
    if not digits.isdigit() or not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _is_ipv6(candidate: str) -> bool:
    groups = [g for g in candidate.split(":") if g]
    # "a::b" or "std::map" parse or nearly parse as IPv6; real addresses have a long group or many groups
    if candidate.count(":") < 2 or not (len(groups) >= 4 or any(len(g) >= 3 for g in groups)):
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _phone_digits_ok(match: str) -> bool:
    return 7 <= sum(c.isdigit() for c in match) <= 15


def redact_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    counts = {kind: 0 for kind in TAGS}
    if not cfg.enabled:
        return text, counts

    def sub(kind: str, pattern: re.Pattern, accept, s: str) -> str:
        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return TAGS[kind]

        return pattern.sub(repl, s)

    # Order matters: e-mails first (they contain digits and dots), cards before phones (a card
    # number would otherwise look like a long phone number), IPs before phones.
    if cfg.email:
        text = sub("email", EMAIL_RE, None, text)
    if cfg.credit_card:
        text = sub("credit_card", CARD_RE, lambda s: luhn_valid(re.sub(r"[ -]", "", s)), text)
    if cfg.ip_address:
        text = sub("ip_address", IPV4_RE, None, text)
        text = sub("ip_address", IPV6_RE, _is_ipv6, text)
    if cfg.phone:
        text = sub("phone", PHONE_RE, _phone_digits_ok, text)
    return text, counts
