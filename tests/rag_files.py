"""Real files of every supported type, written by the tests themselves (no binary fixtures in git)."""

from __future__ import annotations

import json
from pathlib import Path


def write_pdf(path: Path, pages: list[str], *, title: str = "") -> Path:
    """A minimal but valid PDF with one Helvetica text line per page (pypdf extracts it back)."""
    objects: list[bytes] = []
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objects.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    kids = " ".join(f"{i} 0 R" for i in page_ids)
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
            f" /Contents {page_ids[i] + 1} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    info_id = len(objects) + 1
    objects.append(f"<< /Title ({title}) >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info {info_id} 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    )
    path.write_bytes(bytes(out))
    return path


def write_encrypted_pdf(path: Path, source: Path, password: str = "secret") -> Path:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter()
    for page in PdfReader(source).pages:
        writer.add_page(page)
    writer.encrypt(user_password=password, owner_password=password)
    with path.open("wb") as handle:
        writer.write(handle)
    return path


def write_docx(path: Path) -> Path:
    import docx

    document = docx.Document()
    document.core_properties.title = "Travel policy"
    document.add_heading("Travel policy", level=1)
    document.add_paragraph("Employees book trains for trips under four hours.")
    document.add_heading("Hotels", level=2)
    document.add_paragraph("Hotels are capped at 180 euros a night in capitals.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "City"
    table.cell(0, 1).text = "Cap"
    table.cell(1, 0).text = "Paris"
    table.cell(1, 1).text = "180"
    document.save(str(path))
    return path


HTML = """<!doctype html><html><head><title>Release notes</title><style>p {color: red}</style>
<script>var hidden = "never indexed";</script></head><body>
<nav>Home | Docs</nav>
<h1>Release notes</h1>
<p>Version 2 adds   hybrid search &amp; reranking.</p>
<h2>Upgrading</h2>
<p>Run the migration before starting the server.</p>
<pre>keel migrate
  --all</pre>
</body></html>"""

MARKDOWN = """---
title: Handbook
team: platform
---
# Handbook

Welcome to the handbook.

## Keys

To rotate a key, revoke it and create a new one.

```sh
# not a heading: a comment in a code block
keel keys create --name team-a
```

### Budgets

Budgets are set per key, in USD per day or per month.
"""


def write_corpus(folder: Path) -> Path:
    """A small folder of every text format, plus a BEIR-style .jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "handbook.md").write_text(MARKDOWN)
    (folder / "notes.txt").write_text("Plain notes.\n\nThe office opens at nine and closes at six.\n")
    (folder / "release.html").write_text(HTML)
    write_pdf(folder / "report.pdf", ["Quarterly revenue grew by 12 percent.", "Costs fell in the second half."],
              title="Quarterly report")  # fmt: skip
    write_docx(folder / "travel.docx")
    rows = [
        {"_id": "d1", "title": "Statins", "text": "Statins lower LDL cholesterol and cardiovascular risk."},
        {"_id": "d2", "title": "Aspirin", "text": "Aspirin reduces the risk of a second heart attack.", "year": 2019},
    ]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
