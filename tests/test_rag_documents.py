"""Loaders: every format to text with structure, and every bad file reported by name."""

from __future__ import annotations

import json
from pathlib import Path

from keel.text.documents import Document, Problem, html_text, iter_files, load_file, markdown_sections
from rag_files import HTML, MARKDOWN, write_corpus, write_docx, write_encrypted_pdf, write_pdf


def one(path: Path, **kwargs: object) -> Document:
    items = list(load_file(path, path.name, **kwargs))  # type: ignore[arg-type]
    assert len(items) == 1 and isinstance(items[0], Document), items
    return items[0]


def problem(path: Path, **kwargs: object) -> Problem:
    items = list(load_file(path, path.name, **kwargs))  # type: ignore[arg-type]
    assert len(items) == 1 and isinstance(items[0], Problem), items
    return items[0]


def test_markdown_keeps_the_file_text_headings_and_front_matter(tmp_path: Path) -> None:
    path = tmp_path / "handbook.md"
    path.write_text(MARKDOWN)
    doc = one(path)
    assert doc.text == MARKDOWN
    assert doc.title == "Handbook"
    assert doc.metadata["team"] == "platform" and doc.metadata["file_type"] == "md"
    assert [(s.level, s.title) for s in doc.sections] == [(1, "Handbook"), (2, "Keys"), (3, "Budgets")]
    for section in doc.sections:  # offsets point at the heading line itself
        assert doc.text[section.start :].lstrip("#").strip().startswith(section.title)


def test_markdown_headings_inside_code_blocks_are_not_sections() -> None:
    sections = markdown_sections("# A\n\n```\n# not\n```\n\nSetext\n------\n")
    assert [s.title for s in sections] == ["A", "Setext"]


def test_html_text_skips_scripts_styles_and_keeps_headings() -> None:
    title, text, sections = html_text(HTML)
    assert title == "Release notes"
    assert "never indexed" not in text and "color" not in text
    assert "Version 2 adds hybrid search & reranking." in text  # entities decoded, spaces collapsed
    assert "keel migrate\n  --all" in text  # <pre> keeps its layout
    assert [(s.level, s.title) for s in sections] == [(1, "Release notes"), (2, "Upgrading")]
    for section in sections:
        assert text[section.start : section.start + len(section.title)] == section.title


def test_pdf_pages_and_title(tmp_path: Path) -> None:
    doc = one(write_pdf(tmp_path / "r.pdf", ["First page text.", "Second page text."], title="Report"))
    assert doc.title == "Report"
    assert "First page text." in doc.text and "Second page text." in doc.text
    assert doc.metadata["pages"] == 2
    second = doc.text.index("Second")
    assert doc.page_at(0) == 1 and doc.page_at(second) == 2


def test_encrypted_pdf_is_reported(tmp_path: Path) -> None:
    plain = write_pdf(tmp_path / "plain.pdf", ["Secret numbers."])
    found = problem(write_encrypted_pdf(tmp_path / "locked.pdf", plain))
    assert found.source == "locked.pdf" and "encrypted" in found.reason


def test_damaged_pdf_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage")
    assert "unreadable" in problem(path).reason or "no text" in problem(path).reason


def test_docx_headings_paragraphs_and_tables(tmp_path: Path) -> None:
    doc = one(write_docx(tmp_path / "travel.docx"))
    assert doc.title == "Travel policy"
    assert [(s.level, s.title) for s in doc.sections] == [(1, "Travel policy"), (2, "Hotels")]
    assert "capped at 180 euros" in doc.text and "Paris | 180" in doc.text


def test_not_a_docx_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "fake.docx"
    path.write_bytes(b"\xd0\xcf\x11\xe0 an OLE file, as Word writes an encrypted document")
    assert "unreadable .docx" in problem(path).reason


def test_empty_binary_and_too_large_files_are_reported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert problem(empty).reason == "empty file"
    blank = tmp_path / "blank.md"
    blank.write_text("\n\n   \n")
    assert "no text" in problem(blank).reason
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\x00\x00\x00data")
    assert "binary" in problem(binary).reason
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in problem(latin).reason
    big = tmp_path / "big.txt"
    big.write_text("x" * 2000)
    assert "too large" in problem(big, max_bytes=1000).reason


def test_jsonl_one_document_per_line_and_bad_lines_reported(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    lines = [
        json.dumps({"_id": "a", "title": "A", "text": "alpha", "year": 2020, "metadata": {"lang": "en"}}),
        "{not json",
        json.dumps({"_id": "b"}),
        json.dumps(["a", "list"]),
        "",
        json.dumps({"id": 7, "text": "seven"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    items = list(load_file(path, "corpus.jsonl", metadata={"batch": "x"}))
    docs = [i for i in items if isinstance(i, Document)]
    problems = [i for i in items if isinstance(i, Problem)]
    assert [d.doc_id for d in docs] == ["a", "7"]
    assert docs[0].metadata == {"source": "corpus.jsonl", "year": 2020, "lang": "en", "batch": "x"}
    assert [(p.line, p.reason.split(":")[0]) for p in problems] == [
        (2, "not a JSON line"), (3, 'document b'), (4, "a line must be a JSON object"),
    ]  # fmt: skip


def test_unsupported_suffix_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "sheet.xlsx"
    path.write_bytes(b"PK")
    assert "unsupported file type .xlsx" in problem(path).reason


def test_folder_walk_is_sorted_skips_hidden_and_names_from_the_folder(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "docs")
    (corpus / ".hidden.md").write_text("# secret")
    (corpus / "sub").mkdir()
    (corpus / "sub" / "deep.txt").write_text("deep")
    (corpus / "image.png").write_bytes(b"\x89PNG")
    names = [source for _, source in iter_files(corpus)]
    assert names == sorted(names)
    assert "docs/sub/deep.txt" in names and "docs/handbook.md" in names
    assert not any(".hidden" in n or n.endswith(".png") for n in names)


def test_content_hash_changes_with_text_title_or_metadata() -> None:
    base = Document("a", "text", title="t", metadata={"k": 1})
    assert base.content_hash == Document("a", "text", title="t", metadata={"k": 1}).content_hash
    assert base.content_hash != Document("a", "text!", title="t", metadata={"k": 1}).content_hash
    assert base.content_hash != Document("a", "text", title="u", metadata={"k": 1}).content_hash
    assert base.content_hash != Document("a", "text", title="t", metadata={"k": 2}).content_hash
