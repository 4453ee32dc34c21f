"""Each format parsed from files the tests make; bad files refused with a reason the owner can act on."""

import pytest

from documents.parsing import Unreadable, parse
from documents.splitting import extracted_text, split
from tests import document_files


def texts(parsed) -> list[tuple[tuple[str, ...], str]]:
    return [(s.heading, s.text) for s in parsed.sections]


def test_pdf_text_comes_out_per_page_with_its_page_number_and_bookmark_headings():
    data = document_files.pdf(
        [["Installing the pump", "Unscrew the lid first."], ["Cleaning the filter", "Rinse it weekly."]],
        outline=[("Installation", 0), ("Maintenance", 1)],
    )
    parsed = parse(data, "manual.pdf")
    assert parsed.mime_type == "application/pdf"
    assert [s.page for s in parsed.sections] == [1, 2]
    assert [s.heading for s in parsed.sections] == [("Installation",), ("Maintenance",)]
    assert "Unscrew the lid first." in parsed.sections[0].text
    assert "Rinse it weekly." in parsed.sections[1].text
    assert "Rinse" not in parsed.sections[0].text


def test_docx_keeps_headings_above_their_paragraphs_and_reads_tables():
    data = document_files.docx_file(
        "Travel policy",
        [("Flights", ["Book economy for trips under six hours."]), ("Hotels", ["Stay within 2 km of the office."])],
        table=[["City", "Nightly cap"], ["Paris", "180 EUR"]],
    )
    parsed = parse(data, "policy.docx")
    assert parsed.title == "Travel policy"
    sections = texts(parsed)
    assert (("Travel policy", "Flights"), "Book economy for trips under six hours.") in sections
    assert sections[-1][0] == ("Travel policy", "Hotels")
    assert "Stay within 2 km of the office." in sections[-1][1]
    assert "Paris | 180 EUR" in sections[-1][1]


def test_html_in_reading_order_under_headings_without_scripts_or_page_furniture():
    parsed = parse(document_files.HTML.encode(), "guide.html")
    assert parsed.title == "Gardening guide"
    sections = texts(parsed)
    assert sections[0] == (("Gardening guide",), "Plants need light.")
    assert sections[1][0] == ("Gardening guide", "Watering")
    assert sections[1][1] == "Water tomatoes deeply twice a week.\n\nMornings are best.\n\nAvoid the leaves."
    assert sections[2][0] == ("Gardening guide", "Soil")
    assert 'ph = 6.5\ndrainage = "good"' in sections[2][1]  # preformatted text keeps its lines
    everything = extracted_text(parsed.sections)
    for furniture in ("never indexed", "color:red", "Home | About", "Copyright"):
        assert furniture not in everything


def test_markdown_headings_lists_and_code():
    text = "# Deploying\n\nIntro.\n\n## With Docker\n\n- build the image\n- run it\n\n```sh\ndocker compose up\n```\n"
    parsed = parse(text.encode(), "deploy.md")
    assert texts(parsed) == [
        (("Deploying",), "Intro."),
        (("Deploying", "With Docker"), "build the image\n\nrun it\n\ndocker compose up"),
    ]


def test_restructuredtext_with_sphinx_roles_and_directives_reads_as_built_docs():
    text = """Sessions
========

The :class:`.Session` keeps objects; see :ref:`the guide <session_guide>`.

.. versionadded:: 2.0
   Sessions are context managers.

.. toctree::
   :maxdepth: 2

   other

Committing
----------

.. code-block:: python

    session.commit()

Call :meth:`~sqlalchemy.orm.Session.commit` at the end.
"""
    parsed = parse(text.encode(), "session.rst")
    assert parsed.title == "Sessions"  # its first heading, not docutils' "<string>"
    sections = texts(parsed)
    assert sections[0][0] == ("Sessions",)
    assert "The Session keeps objects; see the guide." in sections[0][1]
    assert "Sessions are context managers." in sections[0][1]
    assert "maxdepth" not in sections[0][1] and "other" not in sections[0][1]
    assert sections[1][0] == ("Sessions", "Committing")
    assert "session.commit()" in sections[1][1]
    assert "Call commit at the end." in sections[1][1]
    assert "System Message" not in extracted_text(parsed.sections)


def test_plain_text_paragraphs():
    parsed = parse(b"First paragraph\nstill first.\n\n\nSecond one.", "notes.txt")
    assert parsed.title == "notes"
    assert [s.text for s in parsed.sections] == ["First paragraph\nstill first.\n\nSecond one."]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("report.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage", "could not be read"),
        ("empty.pdf", b"", "empty"),
        ("blank.pdf", document_files.pdf([[]]), "No text was found"),
        ("secret.pdf", document_files.pdf([["classified"]], password="hunter2"), "password-protected"),
        ("broken.docx", b"PK\x03\x04 not really a zip", "could not be read"),
        ("junk.txt", bytes(range(256)) * 40, "binary"),
        ("empty.md", b"   \n\n  ", "No text was found"),
        ("program.exe", b"MZ\x90\x00", "not supported"),
        ("noext", b"hello", "not supported"),
    ],
)
def test_bad_files_are_refused_with_a_reason(name, data, reason):
    with pytest.raises(Unreadable, match=reason):
        parse(data, name)


def test_a_file_with_too_much_text_is_refused(settings):
    settings.DOCUMENTS_MAX_CHARS = 1000
    with pytest.raises(Unreadable, match="more than 1,000 characters"):
        parse(b"word " * 500, "long.txt")


def test_chunks_fit_the_token_budget_overlap_and_point_into_the_extracted_text(settings):
    settings.DOCUMENTS_CHUNK_TOKENS, settings.DOCUMENTS_CHUNK_OVERLAP = 60, 15
    sentences = [f"Sentence number {i} talks about topic {i % 7} in some detail." for i in range(80)]
    text = "# Guide\n\n" + " ".join(sentences[:40]) + "\n\n## Part two\n\n" + " ".join(sentences[40:])
    parsed = parse(text.encode(), "guide.md")
    pieces = list(split(parsed.sections))
    full = extracted_text(parsed.sections)
    assert len(pieces) > 6
    for piece in pieces:
        assert piece.token_count <= 60
        assert full[piece.char_start : piece.char_end] == piece.text
        assert piece.text.endswith("detail.")  # ends at a sentence boundary
    assert {p.heading for p in pieces} == {"Guide", "Guide › Part two"}
    same_section = [(a, b) for a, b in zip(pieces, pieces[1:], strict=False) if a.heading == b.heading]
    assert all(b.char_start < a.char_end for a, b in same_section)  # consecutive chunks overlap
    # No chunk crosses from one section into the next.
    assert not any("Part two" in p.text for p in pieces)
