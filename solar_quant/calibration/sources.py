"""Calibration source files: format detection and streaming readers.

Formats (auto-detected per file, or forced with `--format`):
  orca    JSONL records `{"system_prompt"?, "question", "response"}`
  alpaca  JSONL records, or one JSON array, `{"instruction", "input"?, "output"}`
  chat    JSONL records `{"messages": [{"role", "content"}, ...]}`
  text    plain prose; documents are separated by two or more blank lines

A reader first streams the whole file once: it validates every record (errors name the file
and line), hashes the bytes and keeps only each record's byte offset. Documents are then read
back one at a time in whatever order sampling asks for, so a large JSONL file is never held
in memory. Only a JSON array (`[...]`, Alpaca's original layout) is loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import math
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

from solar_quant.calibration.templates import ROLES, Conversation
from solar_quant.errors import CalibrationError, OptionError
from solar_quant.options import SourceSpec
from solar_quant.progress import Progress

FORMATS = ("orca", "alpaca", "chat", "text")
TEXT_SUFFIXES = (".txt", ".text", ".md")
MAX_SECTION_BYTES = 1 << 20  # a prose document is cut at a line boundary past 1 MiB, to bound memory
PROGRESS_BYTES = 64 << 20  # files larger than this report indexing progress

Document = Union[str, Conversation]  # prose, or a conversation to render with a template
REQUIRED = {"orca": ("question", "response"), "alpaca": ("instruction", "output"), "chat": ("messages",)}
OPTIONAL = {"orca": ("system_prompt",), "alpaca": ("input",), "chat": ()}


# --- flags ---------------------------------------------------------------------------------

def parse_source_flags(sources: list[str] | None, formats: list[str] | None) -> list[SourceSpec]:
    """`--source FILE[:WEIGHT]` (repeatable) and `--format F` (one per source, or one for all)."""
    formats = list(formats or [])
    if not sources:
        if formats:
            raise OptionError("--format applies to --source files; the bundled set's formats are fixed")
        return []
    for f in formats:
        if f not in ("auto",) + FORMATS:
            raise OptionError(f"--format {f!r}: expected one of auto, {', '.join(FORMATS)}")
    if len(formats) not in (0, 1, len(sources)):
        raise OptionError(f"--format given {len(formats)} times for {len(sources)} --source files; give one for all or one per source")
    if len(formats) == 1:
        formats *= len(sources)
    specs = []
    for i, text in enumerate(sources):
        path, weight = split_weight(text)
        specs.append(SourceSpec(path=path, weight=weight, format=formats[i] if formats else "auto"))
    return specs


def split_weight(text: str) -> tuple[str, float]:
    """'data.jsonl:0.6' -> ('data.jsonl', 0.6); 'data.jsonl' -> ('data.jsonl', 1.0)."""
    path, sep, tail = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        weight = float(tail)
    except ValueError:
        return text, 1.0  # a colon inside the path
    if not (weight > 0 and math.isfinite(weight)):
        raise OptionError(f"--source {text}: weight {tail} must be a positive number")
    return path, weight


# --- record validation -----------------------------------------------------------------------

def _missing(record: dict, fmt: str, where: str) -> None:
    missing = [k for k in REQUIRED[fmt] if k not in record]
    if missing:
        need = " and ".join(REQUIRED[fmt]) + (f"; {', '.join(OPTIONAL[fmt])} optional" if OPTIONAL[fmt] else "")
        raise CalibrationError(f"{where}: record is missing field{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(repr(k) for k in missing)} ({fmt} records need {need}); fix the record or pass --format")
    for k in REQUIRED[fmt] + OPTIONAL[fmt]:
        if k in record and record[k] is not None and not isinstance(record[k], list if k == "messages" else str):
            raise CalibrationError(f"{where}: field {k!r} must be {'a list' if k == 'messages' else 'a string'}, "
                                   f"found {type(record[k]).__name__}")


def _messages(record: dict, where: str) -> Conversation:
    if not isinstance(record["messages"], list):
        raise CalibrationError(f"{where}: field 'messages' must be a list of {{role, content}} objects, "
                               f"found {type(record['messages']).__name__}")
    out = []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise CalibrationError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise CalibrationError(f"{where}: messages[{i}] has role {m['role']!r} / content of type "
                                   f"{type(m['content']).__name__}; expected role system, user or assistant and a string")
        if m["role"] == "system" and i > 0:
            raise CalibrationError(f"{where}: messages[{i}] is a system message after the first turn")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def to_document(record: object, fmt: str, where: str) -> Document | None:
    """A validated record as a conversation; None when its text is empty (filtered out)."""
    if not isinstance(record, dict):
        raise CalibrationError(f"{where}: expected a JSON object, found {type(record).__name__}")
    _missing(record, fmt, where)
    if fmt == "orca":
        system, user, reply = record.get("system_prompt") or "", record["question"] or "", record["response"] or ""
    elif fmt == "alpaca":
        extra = (record.get("input") or "").strip()
        system, user, reply = "", (record["instruction"] or "") + (f"\n\n{extra}" if extra else ""), record["output"] or ""
    else:
        conv = _messages(record, where)
        return conv if any(m["content"].strip() for m in conv if m["role"] != "system") else None
    if not user.strip() or not reply.strip():
        return None
    conv = [{"role": "system", "content": system}] if system.strip() else []
    return conv + [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def detect_format(record: object, where: str) -> str:
    keys = set(record) if isinstance(record, dict) else set()
    if "messages" in keys:
        return "chat"
    if keys & {"question", "response", "system_prompt"}:
        return "orca"
    if keys & {"instruction", "output"}:
        return "alpaca"
    raise CalibrationError(f"{where}: cannot tell the format from the record's keys {sorted(keys)}; expected orca "
                           "(system_prompt, question, response), alpaca (instruction, input, output) or chat (messages); "
                           "pass --format")


# --- readers ---------------------------------------------------------------------------------

def _load_json(line: bytes, where: str) -> object:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{where}: malformed JSON ({e}); fix or remove that line") from None
    except RecursionError:
        raise CalibrationError(f"{where}: JSON nested too deeply to be a record; fix or remove that line") from None


@dataclass
class SourceReader:
    """One indexed source: `count` documents, read back one at a time by `document(i)`."""

    spec: SourceSpec
    path: Path
    format: str = "text"
    sha256: str = ""
    records: int = 0  # records (or prose sections) in the file
    skipped_empty: int = 0  # records whose text was empty
    offsets: array = field(default_factory=lambda: array("q"))
    lengths: array = field(default_factory=lambda: array("q"))
    lines: array = field(default_factory=lambda: array("q"))
    in_memory: list | None = None  # a JSON array's documents

    @property
    def count(self) -> int:
        return len(self.in_memory) if self.in_memory is not None else len(self.offsets)

    def document(self, i: int) -> Document:
        if self.in_memory is not None:
            return self.in_memory[i]
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            raw = f.read(self.lengths[i])
        if self.format == "text":
            return raw.decode("utf-8", errors="replace").strip()
        return to_document(json.loads(raw), self.format, f"{self.path}:{self.lines[i]}")


def _first_nonblank(path: Path) -> tuple[bytes, int]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                return line, lineno
    return b"", 0


def open_source(spec: SourceSpec, log: Callable[[str], None], display: str | None = None) -> SourceReader:
    """Detect the format and index the file (validating every record)."""
    path = Path(spec.path)
    name = display or spec.path
    if not path.is_file():
        raise CalibrationError(f"--source {name}: {'not a file' if path.exists() else 'no such file'}")
    first, lineno = _first_nonblank(path)
    fmt = spec.format
    is_array = first.lstrip().startswith(b"[")
    if fmt == "auto":
        if path.suffix.lower() in TEXT_SUFFIXES or not first.lstrip()[:1] in (b"{", b"["):
            fmt = "text"
        elif not is_array:
            fmt = detect_format(_load_json(first, f"{name}:{lineno}"), f"{name}:{lineno}")
    reader = SourceReader(spec, path, fmt)
    if fmt == "text":
        _index_text(reader, log, name)
    elif is_array:
        _load_array(reader, name)
    else:
        _index_jsonl(reader, log, name)
    log(f"calibration: {name}: {reader.format}, {reader.records} records, {reader.count} usable")
    return reader


def _progress(path: Path, name: str) -> Progress | None:
    size = path.stat().st_size
    return Progress(size, f"calibration: indexing {name} (bytes)", min_interval=5.0) if size > PROGRESS_BYTES else None


def _index_jsonl(reader: SourceReader, log, name: str) -> None:
    digest, progress, offset = hashlib.sha256(), _progress(reader.path, name), 0
    fmt = reader.format
    with open(reader.path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            digest.update(line)
            if line.strip():
                where = f"{name}:{lineno}"
                record = _load_json(line, where)
                reader.records += 1
                if to_document(record, fmt, where) is None:
                    reader.skipped_empty += 1
                else:
                    reader.offsets.append(offset)
                    reader.lengths.append(len(line))
                    reader.lines.append(lineno)
            offset += len(line)
            if progress:
                progress.step(n=len(line))
    reader.sha256 = digest.hexdigest()


def _load_array(reader: SourceReader, name: str) -> None:
    data = reader.path.read_bytes()
    reader.sha256 = hashlib.sha256(data).hexdigest()
    doc = _load_json(data, name)
    if not isinstance(doc, list):
        raise CalibrationError(f"{name}: expected a JSON array of records or one JSON object per line")
    if reader.format == "auto":
        reader.format = detect_format(doc[0], f"{name} record 1") if doc else "alpaca"
    docs = [to_document(rec, reader.format, f"{name} record {i + 1}") for i, rec in enumerate(doc)]
    reader.records = len(docs)
    reader.in_memory = [d for d in docs if d is not None]
    reader.skipped_empty = reader.records - len(reader.in_memory)


def _index_text(reader: SourceReader, log, name: str) -> None:
    """Sections separated by two or more blank lines; a section longer than 1 MiB is cut at a line."""
    digest, progress = hashlib.sha256(), _progress(reader.path, name)
    start = offset = 0
    blanks, has_text = 0, False

    def close(end: int) -> None:
        nonlocal has_text
        if has_text:
            reader.offsets.append(start)
            reader.lengths.append(end - start)
            reader.lines.append(0)
            reader.records += 1
        has_text = False

    with open(reader.path, "rb") as f:
        for line in f:
            digest.update(line)
            if line.strip():
                if blanks >= 2 or offset - start > MAX_SECTION_BYTES:
                    close(offset)
                    start = offset
                blanks, has_text = 0, True
            else:
                blanks += 1
            offset += len(line)
            if progress:
                progress.step(n=len(line))
    close(offset)
    reader.sha256 = digest.hexdigest()
