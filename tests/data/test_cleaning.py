"""Normalization, PII redaction, the harmful-content blocklist and language identification."""

import pytest

from pipeline.data.harmful import BlocklistFilter, HarmfulConfig
from pipeline.data.language import LanguageConfig, LanguageFilter
from pipeline.data.normalize import NormalizeConfig, normalize_text
from pipeline.data.pii import PIIConfig, luhn_valid, redact_pii

PII = PIIConfig()


def test_normalize_defaults():
    raw = "Caf\u00c3\u00a9  menu\u200b\r\n\r\n\r\n\r\nＦｕｌｌ\x07width\t\ttext  \n"
    assert normalize_text(raw, NormalizeConfig()) == "Café menu\n\nFullwidth text"


def test_normalize_optional_lowercase_and_special_chars_are_off_by_default():
    text = "Hello World © 2024 #1!"
    assert normalize_text(text, NormalizeConfig()) == text
    assert normalize_text(text, NormalizeConfig(lowercase=True, remove_special_chars=True)) == "hello world 2024 1!"


BOOK = """It is a truth universally acknowledged, that a single man in possession
of a good fortune, must be in want of a wife. However little known the
feelings or views of such a man may be on his first entering a
neighbourhood, this truth is so well fixed in the minds of the
surrounding families, that he is considered the rightful property."""


def test_hard_wrapped_paragraphs_are_joined_so_that_line_rules_judge_sentences():
    """A text file wrapped at a fixed width (a book, an RFC, a README) became fragments: C4 kept
    only its lines that happen to end a sentence, stitched together (a probe on markdown files).
    Each wrapped paragraph is now one line; lists, headings, code, dialogs and short lines are
    kept line for line."""
    from pipeline.data.quality import C4Config, c4_filter

    joined = " ".join(BOOK.split("\n"))
    assert normalize_text(BOOK + "\n\n" + BOOK, NormalizeConfig()) == joined + "\n\n" + joined
    kept = c4_filter(normalize_text(BOOK, NormalizeConfig()), C4Config(min_sentences=1))
    assert kept.keep and kept.text == joined  # the whole paragraph, not its last line
    assert c4_filter(normalize_text(BOOK, NormalizeConfig(unwrap_paragraphs=False)), C4Config(min_sentences=1)).text \
        == "surrounding families, that he is considered the rightful property."  # what C4 kept before
    unchanged = [
        "Hello, how are you doing today my friend?\nI am doing very well, thank you for asking me.\n"
        "What have you been working on lately, then?\nMostly on a language model that reads news.",  # a dialog
        "- the first item of a list that is long enough to wrap\n- the second item of that list, also long\n"
        "- and a third item of the same list, just as long",
        "## A heading that is long enough to be mistaken for text\nbody text that follows it on the next line\n"
        "and one more line of that body text, long as well",
        "```python\nresult = compute_something_long(argument_one, argument_two)\n"
        "another_result = compute_more(argument_three, argument_four)\n```",
        # a page's menu and headline above its text: joined, C4 would keep them with the sentence
        "Home About Contact Privacy Policy Terms of Service Blog\nLatest News From The World Of Technology Today\n"
        "The first sentence of the article itself ends here.",
        "Roses are red,\nViolets are blue,\nSugar is sweet", "two lines of wrapped text that are long enough\n"
        "to be joined but a paragraph of two is kept",
    ]
    for text in unchanged:
        assert normalize_text(text, NormalizeConfig()) == text, text


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Mail john.doe+news@example.co.uk today.", "Mail <EMAIL> today.", "email"),
        ("Call +44 20 7946 0018 now.", "Call <PHONE> now.", "phone"),
        ("Call (555) 123-4567 now.", "Call <PHONE> now.", "phone"),
        ("Call 555-123-4567 now.", "Call <PHONE> now.", "phone"),
        ("Call 020 7946 0018 now.", "Call <PHONE> now.", "phone"),
        ("Server 192.168.1.254 is down.", "Server <IP_ADDRESS> is down.", "ip_address"),
        ("Host 2001:db8::8a2e:370:7334 replied.", "Host <IP_ADDRESS> replied.", "ip_address"),
        ("Host fe80::1 replied.", "Host <IP_ADDRESS> replied.", "ip_address"),
        ("Card 4111 1111 1111 1111 was used.", "Card <CREDIT_CARD> was used.", "credit_card"),
        ("Card 5500-0000-0000-0004 was used.", "Card <CREDIT_CARD> was used.", "credit_card"),
    ],
)
def test_pii_is_redacted(text, expected, kind):
    out, counts = redact_pii(text, PII)
    assert out == expected
    assert counts[kind] == 1 and sum(counts.values()) == 1


@pytest.mark.parametrize(
    "text",
    [
        "In 2004, profits rose 76% to $1.13bn (£600m) from $639m.",
        "The match kicked off at 10:30:45 on 12/03/2005 in front of 45,000 fans.",
        "Version 3.11.7 fixed 1,234 bugs; see section 4.2.1.",
        "The number 4111 1111 1111 1112 fails the Luhn check.",
        "The 999.1.1.1 address is not an IP address.",
        "Scores were 12 34 56 and 1998 2004 2005.",
        "Use std::vector and a::b in C++.",
    ],
)
def test_non_pii_is_left_alone(text):
    out, counts = redact_pii(text, PII)
    assert out == text, counts
    assert sum(counts.values()) == 0


def test_pii_kinds_can_be_switched_off():
    text = "a@b.com and 10.0.0.1"
    out, counts = redact_pii(text, PIIConfig(email=False))
    assert out == "a@b.com and <IP_ADDRESS>" and counts["email"] == 0
    assert redact_pii(text, PIIConfig(enabled=False))[0] == text


def test_luhn():
    assert luhn_valid("4111111111111111")
    assert not luhn_valid("4111111111111112")
    assert not luhn_valid("123")


def test_blocklist_default_and_extra_terms(tmp_path):
    f = BlocklistFilter(HarmfulConfig())
    assert f.check("A perfectly ordinary sentence about gardens.") == (True, None)
    keep, detail = f.check("Visit our ONLINE   CASINO tonight")
    assert not keep and "online casino" in detail
    assert f.check("Pornographically is not a listed word")[0]  # whole words only
    custom = tmp_path / "list.txt"
    custom.write_text("# comment\nbanana\n")
    g = BlocklistFilter(HarmfulConfig(blocklist_path=str(custom), extra_terms=["kiwi"], min_hits=2))
    assert g.check("banana")[0]  # one hit < min_hits
    assert not g.check("banana and kiwi")[0]


def test_blocklist_bad_config():
    with pytest.raises(ValueError, match="harmful.blocklist_path"):
        HarmfulConfig(blocklist_path="/does/not/exist.txt")
    with pytest.raises(ValueError, match="harmful.min_hits"):
        HarmfulConfig(min_hits=0)


def test_language_filter():
    lf = LanguageFilter(LanguageConfig())
    keep, lang, score = lf.check("The government announced a new plan to improve the railway network across the country.")
    assert keep and lang == "en" and score > 0.9
    keep, lang, _ = lf.check("Le gouvernement a annoncé un nouveau plan pour améliorer le réseau ferroviaire du pays.")
    assert not keep and lang == "fr"
    short = LanguageFilter(LanguageConfig(min_chars=50))
    assert short.check("Bonjour")[:2] == (True, "und")
    assert LanguageFilter(LanguageConfig(allowed=["fr"])).check("Le gouvernement a annoncé un nouveau plan ferroviaire.")[0]
    with pytest.raises(ValueError, match="language.min_score"):
        LanguageConfig(min_score=2)
