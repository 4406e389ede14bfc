"""From files to documents: plain text with its structure, title and metadata.

Every loader turns one file into one `Document` (a .jsonl file into one per
line) whose `text` is what chunks point into: a citation's character span is
an offset into this text. For .txt and .md the text is the file itself; for
.html, .pdf and .docx it is the extracted text (paragraphs separated by a
blank line), with headings kept as `Section`s and PDF page starts as `pages`.

A file that cannot be used (unreadable, empty, encrypted, too large, a bad
line of a .jsonl) becomes a `Problem` naming it, and the batch goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "SUPPORTED_SUFFIXES",
    "Document",
    "Problem",
    "Section",
    "iter_files",
    "load_file",
    "storable",
    "storable_value",
]

SUPPORTED_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx", ".jsonl")
DEFAULT_MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Section:
    """A heading: where it starts in the document text, its level (1 = top) and its title."""

    start: int
    level: int
    title: str


@dataclass(frozen=True, slots=True)
class Document:
    doc_id: str  # stable across runs: the file's path under the ingested folder, or a .jsonl line's _id
    text: str
    title: str = ""
    source: str = ""  # the file it came from, as ingested (a .jsonl's lines share it)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    sections: tuple[Section, ...] = ()
    pages: tuple[int, ...] = ()  # PDF: the text offset where each page starts (page n at index n-1)

    @property
    def content_hash(self) -> str:
        """What decides whether a re-ingested document changed: its text, title and metadata."""
        payload = json.dumps([self.text, self.title, dict(self.metadata)], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()

    def page_at(self, offset: int) -> int | None:
        """The 1-based page holding a text offset (PDF only)."""
        if not self.pages:
            return None
        page = 1
        for number, start in enumerate(self.pages, start=1):
            if start > offset:
                break
            page = number
        return page


@dataclass(frozen=True, slots=True)
class Problem:
    """A file (or a line of one) that was skipped, and why; or, with `skipped=False`, a warning about a file
    that was read (a damaged PDF that pypdf could still read)."""

    source: str
    reason: str
    line: int | None = None
    skipped: bool = True

    def __str__(self) -> str:
        return f"{self.source}{f':{self.line}' if self.line else ''}: {self.reason}"


_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str) -> str:
    """Text every store and UTF-8 encoder takes: lone surrogates become U+FFFD (one character for one, so
    offsets hold) and NUL characters (which PostgreSQL refuses) are dropped."""
    if _SURROGATE.search(text):
        text = _SURROGATE.sub("\ufffd", text)
    return text.replace("\x00", "") if "\x00" in text else text


def storable_value(value: Any) -> Any:
    """`storable` applied to every string of a JSON-like value, keys included."""
    if isinstance(value, str):
        return storable(value)
    if isinstance(value, Mapping):
        return {storable(str(k)): storable_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable_value(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


class _Skip(Exception):
    """A file that cannot be used; the message says why."""


# --- which files -----------------------------------------------------------------------


def iter_files(path: Path) -> Iterator[tuple[Path, str]]:
    """(file, source name) for a file or every supported file under a folder, in a stable order.

    The source name is the path from the ingested folder, the folder's own name
    included ("docs/guide/setup.md"), so ingesting `./docs` or `/abs/docs`
    names documents alike. Hidden files and folders are skipped.
    """
    if path.is_file():
        yield path, path.name
        return
    base = path.resolve()
    for file in sorted(base.rglob("*")):
        relative = file.relative_to(base)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        if file.suffix.lower() in SUPPORTED_SUFFIXES:
            yield file, f"{base.name}/{relative.as_posix()}"


# --- one file ----------------------------------------------------------------------------


def load_file(
    path: Path,
    source: str | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[Document | Problem]:
    """The documents of one file, or the problems that kept them out (a `Problem` with `skipped=False` is a
    warning about a document that was read).

    `source` names the file in the documents (`doc_id`, `source`, metadata) and problems: default its file
    name; RAG passes the path from the ingested folder (`iter_files`). A .jsonl file gives one document a line.
    """
    source = path.name if source is None else source
    suffix = path.suffix.lower()
    warnings: list[str] = []
    try:
        size = path.stat().st_size
        if suffix not in SUPPORTED_SUFFIXES:
            raise _Skip(f"unsupported file type {suffix or '(none)'}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
        if size > max_bytes:
            raise _Skip(f"too large: {size:,} bytes (the limit is {max_bytes:,}; see rag.max_file_bytes)")
        if size == 0:
            raise _Skip("empty file")
        if suffix == ".jsonl":
            yield from _jsonl(path, source, metadata or {})
            return
        with _library_warnings() as warnings:
            document = _LOADERS[suffix](path, source)
    except _Skip as skip:
        yield Problem(source, str(skip) + (f" ({'; '.join(dict.fromkeys(warnings))})" if warnings else ""))
        return
    except OSError as exc:
        yield Problem(source, f"unreadable: {exc.strerror or exc}")
        return
    for message in dict.fromkeys(warnings):  # read despite them: reported, not skipped
        yield Problem(source, message, skipped=False)
    if not document.text.strip():
        yield Problem(source, "no text in the file (empty, or only images or markup)")
        return
    meta = {"source": source, "file_type": suffix.lstrip("."), **document.metadata, **(metadata or {})}
    yield Document(
        doc_id=source, text=document.text, title=document.title or path.stem, source=source, metadata=meta,
        sections=document.sections, pages=document.pages,
    )  # fmt: skip


class _Collect(logging.Handler):
    """The warnings a reader library logs in this thread (other threads may be reading other files)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(f"{record.name.split('.')[0]}: {record.getMessage()}")


@contextmanager
def _library_warnings() -> Iterator[list[str]]:
    """Collect what pypdf logs (`EOF marker not found`, ...) for the per-file report. With a handler on its
    logger, Python's last-resort handler no longer prints the warnings raw on stderr."""
    collect = _Collect()
    logger = logging.getLogger("pypdf")
    logger.addHandler(collect)
    try:
        yield collect.messages
    finally:
        logger.removeHandler(collect)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise _Skip("unreadable: binary content in a text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Skip(f"unreadable: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _txt(path: Path, source: str) -> Document:
    return Document(source, _read_text(path).replace("\r\n", "\n"))


# --- markdown ------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_FRONT_FIELD = re.compile(r"^([A-Za-z_][\w-]*)\s*:\s*(.*?)\s*$")


def _front_matter(text: str) -> dict[str, Any]:
    """Flat `key: value` fields of a leading `---` block (nested YAML is not read)."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    fields: dict[str, Any] = {}
    for line in match.group(1).splitlines():
        if m := _FRONT_FIELD.match(line):
            fields[m.group(1)] = m.group(2).strip("\"'")
    return fields


def markdown_sections(text: str) -> tuple[Section, ...]:
    """Headings (ATX and setext, not inside code blocks), with their offsets in `text`."""
    from markdown_it import MarkdownIt

    if front := _FRONT_MATTER.match(text):  # not a setext heading: blank it out, keeping the offsets
        text = re.sub(r"[^\n]", " ", front.group(0)) + text[front.end() :]
    tokens = MarkdownIt("commonmark").parse(text)
    line_starts = [0]
    for match in re.finditer("\n", text):
        line_starts.append(match.end())
    sections = []
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and token.map is not None:
            title = tokens[i + 1].content.strip() if i + 1 < len(tokens) else ""
            sections.append(Section(line_starts[token.map[0]], int(token.tag[1:]), title))
    return tuple(sections)


def _md(path: Path, source: str) -> Document:
    text = _read_text(path).replace("\r\n", "\n")
    meta = _front_matter(text)
    sections = markdown_sections(text)
    title = str(meta.pop("title", "")) or next((s.title for s in sections if s.level == 1), "")
    return Document(source, text, title=title, metadata=meta, sections=sections)


# --- HTML ----------------------------------------------------------------------------------

_BLOCK = frozenset(
    [
        "address",
        "article",
        "aside",
        "blockquote",
        "br",
        "dd",
        "div",
        "dl",
        "dt",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hr",
        "li",
        "main",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "table",
        "tbody",
        "td",
        "th",
        "thead",
        "tr",
        "ul",
    ]
)
_HIDDEN = frozenset(["script", "style", "noscript", "template", "head", "svg"])


class _HtmlText(HTMLParser):
    """Visible text as paragraphs, headings as sections (stdlib parser: tolerant of broken markup)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[str] = []
        self.current: list[str] = []
        self.sections: list[tuple[int, int, str]] = []  # (block index, level, title)
        self.heading: int | None = None
        self.hidden = 0
        self.pre = 0
        self.title = ""
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self.in_title = True
        if tag in _HIDDEN:
            self.hidden += 1
        elif tag in _BLOCK:
            self._end_block()
            if tag == "pre":
                self.pre += 1
            if re.fullmatch(r"h[1-6]", tag):
                self.heading = int(tag[1])

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self.in_title = False
        if tag in _HIDDEN:
            self.hidden = max(0, self.hidden - 1)
        elif tag in _BLOCK:
            if self.heading is not None and re.fullmatch(r"h[1-6]", tag):
                text = self._flush_text()
                if text:
                    self.sections.append((len(self.blocks), self.heading, text))
                    self.blocks.append(text)
                self.heading = None
            else:
                self._end_block()
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if self.in_title:
            self.title += data
        if not self.hidden:
            self.current.append(data if self.pre else re.sub(r"\s+", " ", data))

    def _flush_text(self) -> str:
        text = "".join(self.current)
        self.current = []
        return text.strip("\n") if self.pre else text.strip()

    def _end_block(self) -> None:
        text = self._flush_text()
        if text:
            self.blocks.append(text)

    def result(self) -> tuple[str, tuple[Section, ...]]:
        self._end_block()
        starts, offset = [], 0
        for block in self.blocks:
            starts.append(offset)
            offset += len(block) + 2
        sections = tuple(Section(starts[i], level, title) for i, level, title in self.sections)
        return "\n\n".join(self.blocks), sections


def html_text(markup: str) -> tuple[str, str, tuple[Section, ...]]:
    """(title, text, sections) of an HTML page."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    text, sections = parser.result()
    return re.sub(r"\s+", " ", parser.title).strip(), text, sections


def _html(path: Path, source: str) -> Document:
    title, text, sections = html_text(_read_text(path))
    title = title or next((s.title for s in sections if s.level == 1), "")
    return Document(source, text, title=title, sections=sections)


# --- PDF ---------------------------------------------------------------------------------


def _pdf(path: Path, source: str) -> Document:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise _Skip("PDF support needs pypdf: pip install 'keel[text]'") from None
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Skip("encrypted PDF (it needs a password)")
        texts = [(page.extract_text() or "").strip() for page in reader.pages]
        info = reader.metadata
        title = str(info.title or "") if info is not None else ""
    except _Skip:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError) as exc:
        raise _Skip(f"unreadable PDF: {exc}") from None
    except Exception as exc:  # pypdf raises assorted errors on damaged files; the batch must go on
        if "crypt" in str(exc).lower():
            raise _Skip(f"encrypted PDF that cannot be read: {exc}") from None
        raise _Skip(f"unreadable PDF: {type(exc).__name__}: {exc}") from None
    pages, offset = [], 0
    for text in texts:
        pages.append(offset)
        offset += len(text) + 2
    return Document(source, "\n\n".join(texts), title=title.strip(), pages=tuple(pages), metadata={"pages": len(texts)})


# --- DOCX --------------------------------------------------------------------------------


def _docx(path: Path, source: str) -> Document:
    try:
        import docx
        from docx.opc.exceptions import PackageNotFoundError
    except ImportError:
        raise _Skip(".docx support needs python-docx: pip install 'keel[text]'") from None
    try:
        document = docx.Document(str(path))
    except (PackageNotFoundError, ValueError, KeyError) as exc:
        raise _Skip(f"unreadable .docx (damaged, encrypted or not a .docx): {exc}") from None
    except Exception as exc:  # zipfile.BadZipFile and lxml errors on damaged files
        raise _Skip(f"unreadable .docx (damaged, encrypted or not a .docx): {type(exc).__name__}") from None
    blocks: list[str] = []
    sections: list[Section] = []
    offset = 0
    for kind, item in _docx_blocks(document):
        text = item.strip()
        if not text:
            continue
        level = _heading_level(kind)
        if level is not None:
            sections.append(Section(offset, level, text))
        blocks.append(text)
        offset += len(text) + 2
    title = (document.core_properties.title or "").strip()
    title = title or next((s.title for s in sections if s.level == 1), "")
    return Document(source, "\n\n".join(blocks), title=title, sections=tuple(sections))


def _docx_blocks(document: Any) -> Iterator[tuple[str, str]]:
    """(style name, text) of paragraphs and table rows, in document order."""
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    for child in document.element.body.iterchildren():
        tag = child.tag.rsplit("}", 1)[-1]
        if tag == "p":
            paragraph = Paragraph(child, document)
            yield (paragraph.style.name if paragraph.style is not None else ""), paragraph.text
        elif tag == "tbl":
            for row in Table(child, document).rows:
                cells = [cell.text.strip() for cell in row.cells]
                yield "", " | ".join(dict.fromkeys(c for c in cells if c))  # merged cells repeat


def _heading_level(style: str) -> int | None:
    if style == "Title":
        return 1
    match = re.fullmatch(r"Heading (\d)", style)
    return int(match.group(1)) if match else None


# --- JSONL (BEIR corpus layout) ------------------------------------------------------------


def _jsonl(path: Path, source: str, extra: Mapping[str, Any]) -> Iterator[Document | Problem]:
    """One document per line: {"_id", "title", "text"} (BEIR), or "id"; other fields become metadata."""
    seen_any = False
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            seen_any = True
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield Problem(source, f"not a JSON line: {exc}", number)
                continue
            if not isinstance(row, dict):
                yield Problem(source, "a line must be a JSON object", number)
                continue
            doc_id = row.get("_id", row.get("id"))
            text = row.get("text")
            if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or not str(doc_id).strip():
                yield Problem(source, 'no "_id" (or "id") string', number)
                continue
            if not isinstance(text, str) or not text.strip():
                yield Problem(source, f'document {doc_id!s}: no "text"', number)
                continue
            title = row.get("title") if isinstance(row.get("title"), str) else ""
            meta = {k: v for k, v in row.items() if k not in ("_id", "id", "text", "title", "metadata")}
            if isinstance(row.get("metadata"), dict):
                meta.update(row["metadata"])
            meta = {"source": source, **meta, **extra}
            yield Document(str(doc_id), text, title=title or "", source=source, metadata=meta)
    if not seen_any:
        yield Problem(source, "no documents in the file (only blank lines)")


_LOADERS = {
    ".txt": _txt,
    ".md": _md,
    ".markdown": _md,
    ".html": _html,
    ".htm": _html,
    ".pdf": _pdf,
    ".docx": _docx,
}
