"""The agent's Markdown -> ``formatted_body`` (SPEC §5, Answers): CommonMark by markdown-it-py
with raw HTML as text, then nh3 keeps only the HTML the Matrix spec suggests clients permit."""

from __future__ import annotations

import nh3
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml

# The spec's "HTML tags to permit" (m.room.message msgtypes), less img: a client loads only
# mxc:// images, and a model's image links point elsewhere (they are rendered as links).
TAGS = {
    "del",
    "s",
    "strike",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "blockquote",
    "p",
    "a",
    "ul",
    "ol",
    "sup",
    "sub",
    "li",
    "b",
    "i",
    "u",
    "strong",
    "em",
    "code",
    "hr",
    "br",
    "div",
    "table",
    "thead",
    "tbody",
    "tr",
    "th",
    "td",
    "caption",
    "pre",
    "span",
    "details",
    "summary",
}
ATTRIBUTES = {
    "a": {"href", "target"},
    "ol": {"start"},
    "code": {"class"},
    "span": {"data-mx-bg-color", "data-mx-color", "data-mx-spoiler"},
}
URL_SCHEMES = {"https", "http", "ftp", "mailto", "magnet"}

# html=False: raw HTML in an answer is text, never markup. Tables and strikethrough are the
# GFM extensions models use most, and every Matrix client renders them.
_parser = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])


def _image_as_link(renderer, tokens, idx, options, env) -> str:
    """An image becomes a link to it, named by its alt text (see TAGS: no ``img``)."""
    token = tokens[idx]
    alt = renderer.renderInlineAsText(token.children or [], options, env) or "image"
    return f'<a href="{escapeHtml(str(token.attrGet("src") or ""))}">{escapeHtml(alt)}</a>'


_parser.add_render_rule("image", _image_as_link)


def _keep_language_class(tag: str, attribute: str, value: str) -> str | None:
    """Only a code block's ``language-*`` class survives (clients highlight by it)."""
    if attribute == "class":
        return value if tag == "code" and value.startswith("language-") else None
    return value


def render(markdown: str) -> str | None:
    """Sanitized HTML for ``markdown``; None when it is plain text, so the message is sent
    without a ``formatted_body`` (as clients expect of unformatted text)."""
    rendered = _parser.render(markdown)
    if rendered == f"<p>{escapeHtml(markdown)}</p>\n":
        return None
    return nh3.clean(
        rendered,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        attribute_filter=_keep_language_class,
        link_rel=None,
        url_relative="deny",
    ).strip()
