// Markdown to DOM nodes, for model output. Safe by construction: every piece of text becomes
// a text node (never parsed as HTML), only a fixed set of elements is created, and links
// keep only http(s) and mailto targets. Covers what chat models write: paragraphs, headings,
// lists, block quotes, fenced code, rules, and inline code, bold, italic and links.

const SAFE_URL = /^(https?:|mailto:)/i;

function node(tag, children = [], props = {}) {
  const element = document.createElement(tag);
  Object.assign(element, props);
  element.append(...children);
  return element;
}

// Inline spans, in priority order; each pattern's first group is the content.
const INLINE = [
  { re: /`([^`]+)`/, make: (m) => node("code", [m[1]]) },
  { re: /\[([^\]]+)\]\(([^)\s]+)\)/, make: (m) => link(m[1], m[2]) },
  { re: /\*\*([^*]+)\*\*|__([^_]+)__/, make: (m) => node("strong", inline(m[1] ?? m[2])) },
  { re: /\*([^*\s][^*]*)\*|\b_([^_\s][^_]*)_\b/, make: (m) => node("em", inline(m[1] ?? m[2])) },
];

function link(text, url) {
  if (!SAFE_URL.test(url)) return document.createTextNode(`${text} (${url})`);
  return node("a", inline(text), { href: url, rel: "noopener noreferrer nofollow", target: "_blank" });
}

export function inline(text) {
  let best = null;
  for (const rule of INLINE) {
    const match = rule.re.exec(text);
    if (match && (best === null || match.index < best.match.index)) best = { rule, match };
  }
  if (best === null) return [document.createTextNode(text)];
  const { rule, match } = best;
  return [
    document.createTextNode(text.slice(0, match.index)),
    rule.make(match),
    ...inline(text.slice(match.index + match[0].length)),
  ];
}

const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

function listBlock(lines, start) {
  const ordered = /\d/.test(LIST_ITEM.exec(lines[start])[1]);
  const items = [];
  let i = start;
  for (; i < lines.length; i++) {
    const match = LIST_ITEM.exec(lines[i]);
    if (match && /\d/.test(match[1]) === ordered) items.push(node("li", inline(match[2])));
    else if (lines[i].trim() && items.length && /^\s+/.test(lines[i])) items[items.length - 1].append(" ", ...inline(lines[i].trim()));
    else break;
  }
  return { element: node(ordered ? "ol" : "ul", items), next: i };
}

function block(lines, i) {
  const line = lines[i];
  const fence = /^\s*(```|~~~)\s*([\w+-]*)/.exec(line);
  if (fence) {
    const body = [];
    let j = i + 1;
    while (j < lines.length && !lines[j].trim().startsWith(fence[1])) body.push(lines[j++]);
    const code = node("code", [body.join("\n")]);
    if (fence[2]) code.dataset.language = fence[2];
    return { element: node("pre", [code]), next: j + 1 };
  }
  const heading = /^(#{1,6})\s+(.*)$/.exec(line);
  if (heading) return { element: node(`h${heading[1].length + 2 > 6 ? 6 : heading[1].length + 2}`, inline(heading[2])), next: i + 1 };
  if (/^\s*([-*_])(\s*\1){2,}\s*$/.test(line)) return { element: node("hr"), next: i + 1 };
  if (LIST_ITEM.test(line)) return listBlock(lines, i);
  if (/^\s*>/.test(line)) {
    const quoted = [];
    let j = i;
    while (j < lines.length && /^\s*>/.test(lines[j])) quoted.push(lines[j++].replace(/^\s*>\s?/, ""));
    return { element: node("blockquote", render(quoted)), next: j };
  }
  const text = [];
  let j = i;
  while (j < lines.length && lines[j].trim() && !(j > i && startsBlock(lines[j]))) text.push(lines[j++].trim());
  return { element: node("p", inline(text.join(" "))), next: j };
}

function startsBlock(line) {
  return /^\s*(```|~~~|#{1,6}\s|>)/.test(line) || LIST_ITEM.test(line);
}

function render(lines) {
  const out = [];
  for (let i = 0; i < lines.length;) {
    if (!lines[i].trim()) { i++; continue; }
    const { element, next } = block(lines, i);
    out.push(element);
    i = next;
  }
  return out;
}

// A DocumentFragment holding the rendered text.
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  fragment.append(...render(String(text).replace(/\r\n?/g, "\n").split("\n")));
  return fragment;
}
