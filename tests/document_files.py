"""Small files of every supported format, made by the tests themselves."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib

import docx
from pypdf import PdfWriter
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject, NumberObject


def pdf(
    pages: list[list[str]],
    outline: list[tuple[str, int]] = (),
    password: str | None = None,
    declared_pages: int | None = None,
) -> bytes:
    """A PDF whose page i shows the lines ``pages[i]`` in Helvetica; ``outline``: (title, page index) bookmarks.

    ``declared_pages``: the page count its root claims (/Root /Pages /Count), true or not.
    """
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
    if declared_pages is not None:
        writer.root_object["/Pages"][NameObject("/Count")] = NumberObject(declared_pages)
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


def docx_bomb(megabytes: int) -> bytes:
    """A real DOCX whose body holds ``megabytes`` MB of blank space: legal XML, deflated ~1000 times.

    Written a megabyte at a time, so making it costs no memory."""
    base = docx_file("Bomb", [("Part", ["A short paragraph."])])
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(base)) as source,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as bomb,
    ):
        for member in source.infolist():
            body = source.read(member)
            if member.filename != "word/document.xml":
                bomb.writestr(member, body)
                continue
            head, tail = body.split(b"<w:body>", 1)
            with bomb.open("word/document.xml", "w") as part:
                part.write(head + b"<w:body>")
                blank = b" " * 2**20
                for _ in range(megabytes):
                    part.write(blank)
                part.write(tail)
    return out.getvalue()


def understated(archive: bytes, name: str, size: int) -> bytes:
    """``archive`` with the member ``name``'s uncompressed size forged to ``size`` in both its headers,
    and its CRC to that of its first ``size`` bytes (so zipfile's own check of what it cuts passes)."""
    data = bytearray(archive)
    with zipfile.ZipFile(io.BytesIO(archive)) as source:
        member = source.getinfo(name)
        with source.open(member) as part:
            crc = zlib.crc32(part.read(size))
    local = member.header_offset
    struct.pack_into("<LLL", data, local + 14, crc, member.compress_size, size)
    central = data.index(b"PK\x01\x02")  # the directory entries, until this member's
    while data[central + 46 : central + 46 + len(name)] != name.encode():
        central = data.index(b"PK\x01\x02", central + 4)
    struct.pack_into("<LLL", data, central + 16, crc, member.compress_size, size)
    return bytes(data)


HTML = """<!doctype html><html><head><title>Gardening guide</title><style>p{color:red}</style>
<script>var secret = "never indexed";</script></head>
<body><nav>Home | About | Contact</nav>
<h1>Gardening guide</h1><p>Plants need light.</p>
<h2>Watering</h2><p>Water tomatoes <b>deeply</b> twice a week.</p>
<ul><li>Mornings are best.</li><li>Avoid the leaves.</li></ul>
<h2>Soil</h2><p>Loam holds water well.</p><pre>ph = 6.5
drainage = "good"</pre>
<footer>Copyright nobody</footer></body></html>"""
