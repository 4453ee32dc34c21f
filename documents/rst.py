"""reStructuredText to HTML with docutils, tolerant of Sphinx's markup.

Documentation folders are written for Sphinx, whose roles (``:class:`Session```)
and directives (``.. versionadded::``, ``.. autoclass::``) plain docutils does not
know: it would print them as errors in the text. Here an unknown role keeps its
text, and an unknown directive keeps its content, which is what a reader of the
built documentation sees.
"""

from __future__ import annotations

import io
import re

from docutils import nodes
from docutils.core import publish_parts
from docutils.parsers.rst import Directive, directives, roles

# Sphinx roles whose text reads as code; any other unknown role reads as plain text.
_CODE_ROLES = {"class", "func", "meth", "attr", "mod", "obj", "data", "exc", "paramref", "envvar", "option"}
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.DOTALL)


def _role(name, rawtext, text, lineno, inliner, options=None, content=None):
    # `title <target>` shows its title; `~a.b.C` shows `C`; `!name` shows `name`.
    match = _TARGET.match(text)
    shown = match.group(1) if match and match.group(1) else text
    shown = shown.lstrip("!")
    if name.split(":")[-1] in _CODE_ROLES:
        shown = shown.lstrip(".")  # `.Session`: Sphinx's "find it anywhere"
    if shown.startswith("~"):
        shown = shown[1:].rsplit(".", 1)[-1]
    node = nodes.literal if name.split(":")[-1] in _CODE_ROLES else nodes.inline
    return [node(rawtext, shown)], []


class _AnyOptions(dict):
    """An option spec that accepts every option (their values do not matter for the text)."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str):
        return directives.unchanged


class _Content(Directive):
    """An unknown directive: its arguments as a line of text, then its content parsed as usual."""

    has_content = True
    optional_arguments = 10
    final_argument_whitespace = True
    option_spec = _AnyOptions()

    def run(self) -> list[nodes.Node]:
        container = nodes.container()
        if self.arguments:
            container += nodes.paragraph(text=" ".join(self.arguments))
        if self.content:
            self.state.nested_parse(self.content, self.content_offset, container)
        return [container]


class _Code(Directive):
    """``code-block`` / ``sourcecode`` and friends: the content as a literal block."""

    has_content = True
    optional_arguments = 1
    option_spec = _AnyOptions()

    def run(self) -> list[nodes.Node]:
        text = "\n".join(self.content)
        return [nodes.literal_block(text, text)]


# Directives whose content is only for Sphinx's build (tables of contents, cross-reference anchors).
_DROPPED = {"toctree", "currentmodule", "module", "autosummary", "index", "highlight", "include", "literalinclude"}
_CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput", "ipython", "jupyter-execute"}


class _Dropped(_Content):
    def run(self) -> list[nodes.Node]:
        return []


def _directive(name, language_module, document):
    if name in _DROPPED:
        return _Dropped, []
    if name in _CODE:
        return _Code, []
    known, messages = _original_directive(name, language_module, document)
    return (known or _Content), messages


def _lookup_role(name, language_module, lineno, reporter):
    known, messages = _original_role(name, language_module, lineno, reporter)
    return (known or _role), messages


_original_directive = directives.directive
_original_role = roles.role
# docutils looks both up through these module functions; there is no registry hook for "unknown".
directives.directive = _directive
roles.role = _lookup_role


def to_html(text: str) -> str:
    parts = publish_parts(
        text,
        writer="html5",
        settings_overrides={
            "report_level": 5,  # no error messages in the text
            "halt_level": 5,  # never stop on a markup error
            "warning_stream": io.StringIO(),
            "file_insertion_enabled": False,  # `.. include::` must not read the server's files
            "raw_enabled": False,
            "syntax_highlight": "none",
            "doctitle_xform": False,  # the first heading stays a heading
        },
    )
    return parts["whole"]
