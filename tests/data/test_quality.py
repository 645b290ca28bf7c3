"""One test per quality rule: a tiny document that breaks exactly that rule, and its reason."""

import pytest

from pipeline.data.quality import (
    C4Config, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig, QualityConfig, c4_filter,
    check_quality, fineweb_filter, gopher_quality, gopher_repetition,
)

GOOD = (
    "The committee met on Tuesday to review the annual budget and the plans for the new library.\n\n"
    "Members agreed that the building should open next spring, and that the costs must be kept low.\n\n"
    "The chair said the public will be able to comment on the design before work starts in March.\n\n"
    "A final vote is expected at the next meeting, which will be held in the town hall.\n\n"
    "Residents have been asking for a larger library with study rooms for many years now."
)

ALL_OFF = dict(enabled=False)


def only(**families):
    """A QualityConfig with every family off except the ones given."""
    cfg = dict(
        gopher_quality=GopherQualityConfig(**ALL_OFF), gopher_repetition=GopherRepetitionConfig(**ALL_OFF),
        c4=C4Config(**ALL_OFF), fineweb=FineWebConfig(**ALL_OFF),
    )
    cfg.update(families)
    return QualityConfig(**cfg)


def test_good_document_passes_all_paper_defaults():
    res = check_quality(GOOD, QualityConfig())
    assert res.keep, res
    assert res.text == GOOD


GQ = GopherQualityConfig()


@pytest.mark.parametrize(
    "text, cfg, reason",
    [
        ("Too short to be a document.", GQ, "gopher_quality:min_words"),
        (" ".join(["word"] * 60), GopherQualityConfig(max_words=50), "gopher_quality:max_words"),
        (" ".join(["a", "an", "of", "to"] * 15), GQ, "gopher_quality:min_avg_word_length"),
        (" ".join(["incomprehensibilities"] * 60), GQ, "gopher_quality:max_avg_word_length"),
        ("the and " + " ".join(["#tag word"] * 30), GQ, "gopher_quality:hash_ratio"),
        ("the and " + " ".join(["wait... there"] * 30), GQ, "gopher_quality:ellipsis_ratio"),
        ("\n".join(["- the item and more words here"] * 12), GQ, "gopher_quality:bullet_lines_ratio"),
        ("\n".join(["the story goes on and on and then", "it stops here for now..."] * 6), GopherQualityConfig(max_symbol_word_ratio=None),
         "gopher_quality:ellipsis_lines_ratio"),
        ("the and " + " ".join(["123 456 789 word"] * 15), GQ, "gopher_quality:alpha_words_ratio"),
        (" ".join(["house garden river mountain"] * 15), GQ, "gopher_quality:min_stop_words"),
    ],
)
def test_gopher_quality_rules(text, cfg, reason):
    res = gopher_quality(text, cfg)
    assert res is not None and res.reason == reason, res
    assert check_quality(text, only(gopher_quality=cfg)).reason == reason


GR = GopherRepetitionConfig()
UNIQUE = [f"Sentence number {i} talks about a different topic entirely, item {i}." for i in range(10)]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("\n\n".join(["The same paragraph again."] * 4 + UNIQUE[:4]), "gopher_repetition:dup_para_frac"),
        ("\n\n".join(["A long repeated paragraph that is much longer than the others " * 3] * 2 + UNIQUE[:3]),
         "gopher_repetition:dup_para_char_frac"),
        ("\n".join(["Same line."] * 4 + UNIQUE[:5]), "gopher_repetition:dup_line_frac"),
        ("\n".join(["A long line repeated, long enough to dominate the characters of the text " * 2] * 2 + UNIQUE[:6]),
         "gopher_repetition:dup_line_char_frac"),
        (" ".join(["buy now"] * 10 + UNIQUE[:2]), "gopher_repetition:top_2gram_frac"),
    ],
)
def test_gopher_repetition_rules(text, reason):
    res = gopher_repetition(text, GR)
    assert res is not None and res.reason == reason, res


@pytest.mark.parametrize("n", [3, 4])
def test_gopher_top_ngram_rule_per_size(n):
    text = " ".join(f"w{i} " + " ".join(["alpha", "beta", "gamma", "delta"][: n]) for i in range(20))
    cfg = GopherRepetitionConfig(top_ngram_max_frac={n: GR.top_ngram_max_frac[n]}, dup_ngram_max_frac={})
    res = gopher_repetition(text, cfg)
    assert res is not None and res.reason == f"gopher_repetition:top_{n}gram_frac", res
    assert gopher_repetition(GOOD, cfg) is None


def test_gopher_duplicate_ngram_rule():
    # a 6-word phrase repeated, separated by unique filler so no single 2-4-gram dominates
    text = " ".join(f"filler{i} the quick brown fox jumped over" for i in range(12))
    cfg = GopherRepetitionConfig(top_ngram_max_frac={})
    res = gopher_repetition(text, cfg)
    assert res is not None and res.reason == "gopher_repetition:dup_5gram_frac", res
    assert gopher_repetition(GOOD, cfg) is None


def test_repetition_ngram_rules_skip_short_documents():
    text = "What is it like to be a robot\nWhat is it like to be a human?"
    assert gopher_repetition(text, GR) is not None
    assert gopher_repetition(text, GopherRepetitionConfig(ngram_rules_min_words=50)) is None


C4 = C4Config()


@pytest.mark.parametrize(
    "text, reason",
    [
        (GOOD + "\n\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "c4:lorem_ipsum"),
        (GOOD + "\n\nfunction f() { return 1; }", "c4:curly_bracket"),
        ("Only one sentence here that ends well.\nno punctuation here at all", "c4:min_sentences"),
        ("short line\nanother one", "c4:no_lines_left"),
    ],
)
def test_c4_rules(text, reason):
    res = c4_filter(text, C4)
    assert not res.keep and res.reason == reason, res


def test_c4_removes_javascript_policy_and_unterminated_lines():
    text = ("Please enable JavaScript in your browser to view this page properly.\n"
            "This site uses cookies to improve your experience of the site.\n"
            "Menu Home About Contact\n" + GOOD)
    res = c4_filter(text, C4)
    assert res.keep
    assert "JavaScript" not in res.text and "cookies" not in res.text and "Menu" not in res.text
    assert res.text == GOOD


FW = FineWebConfig()


@pytest.mark.parametrize(
    "text, cfg, reason",
    [
        ("\n".join(f"line number {i} without any punctuation at the end of it" for i in range(10)), FW,
         "fineweb:line_punct_ratio"),
        ("\n".join([f"Tiny {i}." for i in range(14)] + [GOOD]), FW, "fineweb:short_line_ratio"),
        (GOOD + "\nThis exact line is repeated in the text.\nThis exact line is repeated in the text.", FW,
         "fineweb:char_duplicates_ratio"),
        ("\n".join(f"Word{i} here." for i in range(20)), FineWebConfig(max_short_line_ratio=None), "fineweb:new_line_ratio"),
    ],
)
def test_fineweb_rules(text, cfg, reason):
    res = fineweb_filter(text, cfg)
    assert res is not None and res.reason == reason, res


def test_rules_can_be_switched_off():
    short = "Too short to be a document."
    assert check_quality(short, only(gopher_quality=GopherQualityConfig(min_words=None, min_stop_words=None))).keep
    assert check_quality(short, only()).keep
