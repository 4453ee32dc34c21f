"""Source bytes to text in reading order, in sections under their headings (PDF pages kept).

One parser per format, each a well-kept library: pypdf, python-docx,
BeautifulSoup with lxml (HTML, and Markdown and reStructuredText once
rendered to HTML by markdown-it-py and docutils). Anything that goes wrong
becomes ``Unreadable`` with a reason the document's owner can act on.

Parsing runs in a child process bounded in memory and time (documents/sandbox.py):
a file that would need more fails with that reason, and the worker goes on. A DOCX
(a zip) is refused before anything in it is inflated if it would unpack to too much
(a zip bomb); a PDF, before its pages are loaded, if it declares too many.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import PurePath

from bs4 import BeautifulSoup, Comment, NavigableString, Tag
from django.conf import settings

from documents import sandbox


class Unreadable(Exception):
    """The file cannot be turned into text; ``str(exc)`` says why, for its owner."""


@dataclass(frozen=True)
class Section:
    """Text under one heading path (outermost first); ``page`` is the PDF page, from 1."""

    text: str
    heading: tuple[str, ...] = ()
    page: int | None = None


@dataclass(frozen=True)
class Parsed:
    title: str
    mime_type: str
    sections: list[Section]


# The formats, by file name extension.
MIME_TYPES = {
    ".pdf": "application/pdf",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".html": "text/html",
    ".htm": "text/html",
    ".md": "text/markdown",
    ".markdown": "text/markdown",
    ".rst": "text/x-rst",
    ".txt": "text/plain",
    ".text": "text/plain",
}
SUPPORTED = "PDF, DOCX, HTML, Markdown, reStructuredText or plain text"


def mime_type_for(name: str) -> str | None:
    return MIME_TYPES.get(PurePath(name).suffix.lower())


@dataclass(frozen=True)
class Limits:
    """The settings that bound one parse, read in the caller (the child reads no settings)."""

    max_chars: int
    max_pdf_pages: int
    max_unpacked_bytes: int
    max_compression_ratio: float

    @classmethod
    def from_settings(cls) -> Limits:
        return cls(
            max_chars=settings.DOCUMENTS_MAX_CHARS,
            max_pdf_pages=settings.DOCUMENTS_MAX_PDF_PAGES,
            max_unpacked_bytes=settings.DOCUMENTS_MAX_UNPACKED_BYTES,
            max_compression_ratio=settings.DOCUMENTS_MAX_COMPRESSION_RATIO,
        )


def parse(data: bytes, name: str) -> Parsed:
    """``data``, the content of the file called ``name``, as sections of text.

    The parsing runs in a child process with at most DOCUMENTS_PARSE_MEMORY_MB of memory
    for at most DOCUMENTS_PARSE_SECONDS; beyond either it is ``Unreadable``, saying which.
    """
    mime_type = mime_type_for(name)
    if mime_type is None:
        raise Unreadable(f"“{PurePath(name).suffix or name}” files are not supported: upload {SUPPORTED}.")
    if not data:
        raise Unreadable("The file is empty.")
    memory_mb, seconds = settings.DOCUMENTS_PARSE_MEMORY_MB, settings.DOCUMENTS_PARSE_SECONDS
    try:
        outcome = sandbox.run(parse_here, data, name, Limits.from_settings(), memory_mb=memory_mb, seconds=seconds)
    except sandbox.TimedOut as exc:
        raise Unreadable(f"Reading the file took longer than {exc.seconds:g} s: split it into smaller files.") from exc
    except sandbox.OutOfMemory as exc:
        raise Unreadable(
            f"Reading the file needed more than {exc.memory_mb} MB of memory: split it into smaller files."
        ) from exc
    except sandbox.Crashed as exc:
        raise Unreadable(f"Reading the file {exc}: it may be damaged.") from exc
    return outcome.get()


def parse_here(data: bytes, name: str, limits: Limits) -> Parsed:
    """``parse`` in this process, with no bound on its memory or time: only for ``sandbox.run``."""
    mime_type = mime_type_for(name)
    stem = PurePath(name).stem
    if mime_type == "application/pdf":
        title, sections = _pdf(data, limits)
    elif mime_type.endswith("wordprocessingml.document"):
        title, sections = _docx(data, limits)
    else:
        text = _decode(data)
        if mime_type == "text/html":
            title, sections = _html(text)
        elif mime_type == "text/markdown":
            title, sections = _markdown(text)
        elif mime_type == "text/x-rst":
            title, sections = _rst(text)
        else:
            title, sections = "", _plain(text)
    sections = [s for s in sections if s.text.strip()]
    if not sections:
        ocr = " (a scanned PDF needs OCR first)" if mime_type == "application/pdf" else ""
        raise Unreadable(f"No text was found in the file{ocr}.")
    if sum(len(s.text) for s in sections) > limits.max_chars:
        raise Unreadable(f"The file holds more than {limits.max_chars:,} characters of text.")
    return Parsed(title=(title or stem).strip()[:300], mime_type=mime_type, sections=sections)


def _decode(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise Unreadable("The file is binary, not text.")
    for encoding in ("utf-8-sig", "utf-16") if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ("utf-8-sig",):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    # Not UTF-8: Latin-1 decodes anything, so only accept it for text that looks like text.
    text = data.decode("latin-1")
    if sum(c.isprintable() or c.isspace() for c in text) < 0.95 * len(text):
        raise Unreadable("The file is binary, not text.")
    return text


# --- PDF ---------------------------------------------------------------------------------


def _pdf(data: bytes, limits: Limits) -> tuple[str, list[Section]]:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise Unreadable("The PDF is password-protected: upload it without the password.")
        _check_page_count(_pdf_declared_pages(reader), limits)
        pages = reader.pages
        _check_page_count(len(pages), limits)  # the page tree may hold more pages than its root says
        headings = _pdf_outline(reader)
        sections = [
            Section(text=page.extract_text() or "", heading=headings.get(number, ()), page=number)
            for number, page in enumerate(pages, start=1)
        ]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except (Unreadable, MemoryError):
        raise
    except (PdfReadError, Exception) as exc:  # noqa: BLE001 - pypdf raises many kinds on broken files
        raise Unreadable(f"The PDF could not be read ({exc.__class__.__name__}): it may be damaged.") from exc
    return str(title), sections


def _pdf_declared_pages(reader) -> int:
    """The page count the document's root declares (/Root /Pages /Count): read without building
    any page object, so a PDF of a million pages is refused before they are loaded."""
    try:
        return int(reader.trailer["/Root"]["/Pages"]["/Count"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0  # no usable count: the pages themselves are counted next


def _check_page_count(pages: int, limits: Limits) -> None:
    if pages > limits.max_pdf_pages:
        raise Unreadable(f"The PDF has {pages} pages; at most {limits.max_pdf_pages} are read: split it.")


def _pdf_outline(reader) -> dict[int, tuple[str, ...]]:
    """Page number -> the bookmark path in force on it (bookmarks are a PDF's headings)."""
    starts: list[tuple[int, tuple[str, ...]]] = []

    def walk(items, path: tuple[str, ...]) -> None:
        last: tuple[str, ...] = path
        for item in items:
            if isinstance(item, list):
                walk(item, last)
                continue
            try:
                page = reader.get_destination_page_number(item) + 1
            except Exception:  # noqa: BLE001 - a broken bookmark is only a missing heading
                continue
            last = (*path, str(item.title).strip())
            starts.append((page, last))

    try:
        walk(reader.outline, ())
    except Exception:  # noqa: BLE001
        return {}
    starts.sort(key=lambda start: start[0])
    headings: dict[int, tuple[str, ...]] = {}
    current: tuple[str, ...] = ()
    index = 0
    for number in range(1, len(reader.pages) + 1):
        while index < len(starts) and starts[index][0] <= number:
            current = starts[index][1]
            index += 1
        headings[number] = current
    return headings


# --- DOCX --------------------------------------------------------------------------------


def _docx(data: bytes, limits: Limits) -> tuple[str, list[Section]]:
    import docx
    from docx.table import Table

    _check_archive(data, "DOCX", limits)
    try:
        document = docx.Document(io.BytesIO(data))
    except MemoryError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, Exception) as exc:  # noqa: BLE001
        raise Unreadable(f"The DOCX file could not be read ({exc.__class__.__name__}): it may be damaged.") from exc
    builder = _SectionBuilder()
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            for row in block.rows:
                cells = [cell.text.strip() for cell in row.cells]
                builder.add(" | ".join(c for c in dict.fromkeys(cells) if c))
            builder.end_paragraph()
            continue
        style = (block.style.name if block.style is not None else "") or ""
        level = _docx_heading_level(style)
        if level:
            builder.heading(level, block.text)
        else:
            builder.add(block.text)
            builder.end_paragraph()
    title = document.core_properties.title or builder.first_heading
    return title, builder.sections()


def _check_archive(data: bytes, kind: str, limits: Limits) -> None:
    """Refuse a zip (``kind``: the format, for the message) that would unpack to more than the
    limits allow, before anything in it is inflated for its parser.

    The central directory gives each member's sizes; a forged one can understate them, and
    zipfile then inflates a whole member before cutting it to the stated size. So each member is
    also inflated here, a bounded piece at a time, and refused as soon as it outgrows its
    stated size: what the parser reads afterwards is at most what was checked.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise Unreadable(f"The {kind} file could not be read ({exc.__class__.__name__}): it may be damaged.") from exc
    total = sum(member.file_size for member in members)
    if total > limits.max_unpacked_bytes:
        raise Unreadable(
            f"The {kind} file unpacks to {total / 1e6:,.0f} MB; at most {limits.max_unpacked_bytes / 1e6:,.0f} MB "
            "are read: split it into smaller files."
        )
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if ratio > limits.max_compression_ratio:
            raise Unreadable(
                f"A part of the {kind} file ({member.filename}) is compressed {ratio:,.0f} times, more than the "
                f"{limits.max_compression_ratio:g} times allowed (a zip bomb looks like this): save it again "
                "without it."
            )
    for member in members:
        if member.flag_bits & 0x1 or member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise Unreadable(f"The {kind} file is encrypted or compressed in a way its editors do not write.")
        if _unpacked_size(data, member, member.file_size) != member.file_size:
            raise Unreadable(f"The {kind} file is damaged: a part of it is not the size its archive says.")


def _unpacked_size(data: bytes, member: zipfile.ZipInfo, most: int) -> int:
    """The size ``member`` really inflates to, counted up to ``most`` + 1 at most (-1: unreadable)."""
    header = data[member.header_offset : member.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return -1
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    start = member.header_offset + 30 + name_length + extra_length
    compressed = memoryview(data)[start : start + member.compress_size]
    if len(compressed) < member.compress_size:
        return -1
    if member.compress_type == zipfile.ZIP_STORED:
        return len(compressed)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = position = 0
    step = 1 << 20  # at most this much out per call: a forged member never costs more at once
    try:
        while not inflater.eof and size <= most:
            if inflater.unconsumed_tail:
                piece = inflater.unconsumed_tail
            else:
                piece = compressed[position : position + step]
                position += len(piece)
            out = inflater.decompress(piece, step)
            size += len(out)
            if not piece and not out:
                return -1  # the data ended before the stream did
    except zlib.error:
        return -1
    return size


def _docx_heading_level(style: str) -> int:
    if style == "Title":
        return 1
    match = re.fullmatch(r"Heading (\d)", style)
    return int(match.group(1)) if match else 0


# --- HTML, Markdown, reStructuredText ------------------------------------------------------

_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
# Elements that start a new paragraph of text.
_BLOCKS = {
    "address", "article", "aside", "blockquote", "br", "dd", "details", "div", "dl", "dt", "figcaption",
    "figure", "form", "hr", "li", "main", "ol", "p", "pre", "section", "summary", "table", "tbody", "td",
    "th", "thead", "tr", "ul", "caption",
}  # fmt: skip
# Never text a reader sees, or page furniture repeated on every page of a site.
_SKIPPED = {"script", "style", "noscript", "template", "nav", "footer", "head", "svg", "button", "form", "iframe"}


def _html(text: str) -> tuple[str, list[Section]]:
    soup = BeautifulSoup(text, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    builder = _SectionBuilder()
    _walk(soup.body or soup, builder, preformatted=False)
    return title or builder.first_heading, builder.sections()


def _walk(node: Tag, builder: _SectionBuilder, preformatted: bool) -> None:
    for child in node.children:
        if isinstance(child, Comment):
            continue
        if isinstance(child, NavigableString):
            builder.add(str(child) if preformatted else re.sub(r"\s+", " ", str(child)), joined=True)
            continue
        if not isinstance(child, Tag) or child.name in _SKIPPED:
            continue
        if child.name in _HEADINGS:
            builder.heading(_HEADINGS[child.name], child.get_text(" ", strip=True).rstrip("¶").strip())
        elif child.name in _BLOCKS:
            builder.end_paragraph()
            _walk(child, builder, preformatted or child.name == "pre")
            builder.end_paragraph()
        else:
            _walk(child, builder, preformatted)


def _markdown(text: str) -> tuple[str, list[Section]]:
    from markdown_it import MarkdownIt

    # Raw HTML inside Markdown is kept as text to parse, never rendered anywhere.
    return _html(MarkdownIt("commonmark").enable("table").render(text))


def _rst(text: str) -> tuple[str, list[Section]]:
    from documents import rst

    # docutils titles a document with no title of its own "<string>" (its source's name): the first
    # heading names it better (doctitle_xform is off, so the title is a heading).
    title, sections = _html(rst.to_html(text))
    first = next((section.heading[0] for section in sections if section.heading), "")
    return first if title in ("", "<string>") else title, sections


def _plain(text: str) -> list[Section]:
    builder = _SectionBuilder()
    for paragraph in re.split(r"\n\s*\n", text):
        builder.add(paragraph.strip("\n"))
        builder.end_paragraph()
    return builder.sections()


class _SectionBuilder:
    """Collects paragraphs under the heading path in force, one ``Section`` per run of the same path."""

    def __init__(self) -> None:
        self.path: list[str] = []
        self.paragraph: list[str] = []
        self.paragraphs: list[str] = []
        self.done: list[Section] = []
        self.first_heading = ""

    def add(self, text: str, joined: bool = False) -> None:
        if text:
            self.paragraph.append(text)
        if not joined:
            self.paragraph.append("\n")

    def end_paragraph(self) -> None:
        text = "".join(self.paragraph).strip()
        text = re.sub(r"[ \t]+\n", "\n", text)
        if text:
            self.paragraphs.append(text)
        self.paragraph = []

    def heading(self, level: int, text: str) -> None:
        self.end_paragraph()
        self._end_section()
        if not text:
            return
        self.first_heading = self.first_heading or text
        self.path = [*self.path[: level - 1], text]

    def _end_section(self) -> None:
        if self.paragraphs:
            self.done.append(Section(text="\n\n".join(self.paragraphs), heading=tuple(self.path)))
        self.paragraphs = []

    def sections(self) -> list[Section]:
        self.end_paragraph()
        self._end_section()
        return self.done
