"""Column names and Arrow schemas shared by the stages. One place, so stages agree on names."""

from __future__ import annotations

import pyarrow as pa

# Document columns.
DOC_ID = "doc_id"
SOURCE = "source"
PATH = "path"
TEXT = "text"
LABEL = "label"
STATUS = "status"  # one of STATUS_* below
REASON = "reason"  # why a document was dropped or quarantined (null when kept)
DETAIL = "detail"  # free-text detail for the reason (e.g. the measured value)
RAW_EXCERPT = "raw_excerpt"  # start of an unparseable record, for quarantine
N_CHARS_RAW = "n_chars_raw"
N_CHARS = "n_chars"
LANG = "lang"
LANG_SCORE = "lang_score"
PII_EMAIL = "pii_email"
PII_PHONE = "pii_phone"
PII_IP = "pii_ip_address"
PII_CREDIT_CARD = "pii_credit_card"
PII_COLUMNS = (PII_EMAIL, PII_PHONE, PII_IP, PII_CREDIT_CARD)
SPLIT = "split"
CLUSTER_ID = "cluster_id"
REPRESENTATIVE = "representative"
SIMILARITY = "similarity"
CONTENT_HASH = "content_hash"

# Packed-sequence columns.
INPUT_IDS = "input_ids"

STATUS_KEPT = "kept"
STATUS_DROPPED = "dropped"
STATUS_QUARANTINED = "quarantined"

DOCS_SCHEMA = pa.schema(
    [
        (DOC_ID, pa.string()),
        (SOURCE, pa.string()),
        (PATH, pa.string()),
        (LABEL, pa.string()),
        (TEXT, pa.large_string()),
        (STATUS, pa.string()),
        (REASON, pa.string()),
        (DETAIL, pa.string()),
        (RAW_EXCERPT, pa.string()),
        (N_CHARS_RAW, pa.int64()),
        (N_CHARS, pa.int64()),
        (LANG, pa.string()),
        (LANG_SCORE, pa.float32()),
        (PII_EMAIL, pa.int32()),
        (PII_PHONE, pa.int32()),
        (PII_IP, pa.int32()),
        (PII_CREDIT_CARD, pa.int32()),
        (CLUSTER_ID, pa.string()),
        (REPRESENTATIVE, pa.string()),
        (SIMILARITY, pa.float32()),
        (SPLIT, pa.string()),
    ]
)

REMOVED_SCHEMA = pa.schema(
    [
        (DOC_ID, pa.string()),
        (SOURCE, pa.string()),
        (PATH, pa.string()),
        (STATUS, pa.string()),
        (REASON, pa.string()),
        (DETAIL, pa.string()),
        (CLUSTER_ID, pa.string()),
        (REPRESENTATIVE, pa.string()),
        (SIMILARITY, pa.float32()),
        (RAW_EXCERPT, pa.string()),
    ]
)


def docs_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with any subset of DOCS_SCHEMA's columns) -> a table with the full schema."""
    columns = {name: [row.get(name) for row in rows] for name in DOCS_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=DOCS_SCHEMA)
