"""Small files of every supported format, made by the tests themselves."""

from __future__ import annotations

import io

import docx
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject


def pdf(pages: list[list[str]], outline: list[tuple[str, int]] = (), password: str | None = None) -> bytes:
    """A PDF whose page i shows the lines ``pages[i]`` in Helvetica; ``outline``: (title, page index) bookmarks."""
    writer = PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
    )
    for lines in pages:
        page = writer.add_blank_page(612, 792)
        shown = b" T* ".join(
            b"(" + line.encode("latin-1").replace(b"(", b"\\(").replace(b")", b"\\)") + b") Tj" for line in lines
        )
        stream = DecodedStreamObject()
        stream.set_data(b"BT /F1 12 Tf 14 TL 72 720 Td " + shown + b" ET")
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
    for title, index in outline:
        writer.add_outline_item(title=title, page_number=index)
    if password:
        writer.encrypt(password)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_file(title: str, sections: list[tuple[str, list[str]]], table: list[list[str]] | None = None) -> bytes:
    document = docx.Document()
    document.add_heading(title, level=1)
    for heading, paragraphs in sections:
        document.add_heading(heading, level=2)
        for paragraph in paragraphs:
            document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for r, row in enumerate(table):
            for c, value in enumerate(row):
                grid.cell(r, c).text = value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


HTML = """<!doctype html><html><head><title>Gardening guide</title><style>p{color:red}</style>
<script>var secret = "never indexed";</script></head>
<body><nav>Home | About | Contact</nav>
<h1>Gardening guide</h1><p>Plants need light.</p>
<h2>Watering</h2><p>Water tomatoes <b>deeply</b> twice a week.</p>
<ul><li>Mornings are best.</li><li>Avoid the leaves.</li></ul>
<h2>Soil</h2><p>Loam holds water well.</p><pre>ph = 6.5
drainage = "good"</pre>
<footer>Copyright nobody</footer></body></html>"""
