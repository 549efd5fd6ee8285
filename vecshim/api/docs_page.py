"""The `/docs` page: the OpenAPI spec rendered by a small inline script, no external assets."""
from __future__ import annotations

import json

__all__ = ["render_docs_page"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vecshim API</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0; color: #1d2430; background: #f6f7f9; }
header { background: #1d2430; color: #fff; padding: 18px 28px; }
header h1 { margin: 0; font-size: 22px; } header p { margin: 6px 0 0; color: #c9d1dc; max-width: 70em; }
main { padding: 12px 28px 40px; max-width: 1100px; }
h2 { margin: 26px 0 8px; border-bottom: 1px solid #d5dae1; padding-bottom: 4px; }
details.op { background: #fff; border: 1px solid #d5dae1; border-radius: 6px; margin: 8px 0; }
details.op > summary { cursor: pointer; padding: 8px 12px; list-style: none; display: flex; gap: 10px; }
.method { font: bold 12px monospace; color: #fff; border-radius: 4px; padding: 3px 8px; min-width: 38px;
  text-align: center; text-transform: uppercase; }
.get { background: #2f7ed8; } .post { background: #2e9e5b; }
.path { font-family: monospace; font-weight: 600; } .summary { color: #4a5566; }
.body { padding: 4px 16px 12px; border-top: 1px solid #eceff3; }
table { border-collapse: collapse; margin: 6px 0; } td, th { text-align: left; padding: 3px 10px 3px 0;
  vertical-align: top; } th { color: #6b7685; font-weight: 600; font-size: 13px; }
code, .type { font-family: monospace; font-size: 13px; } .type { color: #8a4baf; }
.req { color: #c0392b; font-size: 12px; } .desc { color: #4a5566; }
.tagdesc { font-size: 15px; font-weight: normal; color: #6b7685; }
ul.schema { margin: 2px 0; padding-left: 18px; list-style: none; } a { color: #2f7ed8; }
</style>
</head>
<body>
<header><h1 id="title"></h1><p id="description"></p></header>
<main id="main"></main>
<script type="application/json" id="spec">__SPEC__</script>
<script>
"use strict";
const spec = JSON.parse(document.getElementById("spec").textContent);
const main = document.getElementById("main");
function el(tag, attrs, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const kid of kids) if (kid != null) node.append(kid);
  return node;
}
function refName(ref) { return ref.split("/").pop(); }
function typeOf(s) {
  if (!s) return "any";
  if (s.$ref) return el("a", {href: "#schema-" + refName(s.$ref)}, refName(s.$ref));
  if (s.oneOf) { const out = el("span"); s.oneOf.forEach((o, i) => { if (i) out.append(" | "); out.append(typeOf(o)); }); return out; }
  if (s.type === "array") { const out = el("span", {}, "array of "); out.append(typeOf(s.items)); return out; }
  let t = s.type || "any";
  if (s.enum) t += " (" + s.enum.map(v => JSON.stringify(v)).join(", ") + ")";
  if (s.nullable) t += " | null";
  return t;
}
function schemaTree(s) {
  const list = el("ul", {class: "schema"});
  const required = new Set(s.required || []);
  for (const [name, prop] of Object.entries(s.properties || {})) {
    const item = el("li", {}, el("code", {}, name), " ", el("span", {class: "type"}, typeOf(prop)));
    if (required.has(name)) item.append(" ", el("span", {class: "req"}, "required"));
    if (prop.default !== undefined) item.append(" ", el("span", {class: "desc"}, "default " + JSON.stringify(prop.default)));
    if (prop.description) item.append(" ", el("span", {class: "desc"}, "— " + prop.description));
    if (prop.properties) item.append(schemaTree(prop));
    list.append(item);
  }
  return list;
}
function operation(path, method, op) {
  const box = el("details", {class: "op", id: method + "-" + path});
  box.append(el("summary", {}, el("span", {class: "method " + method}, method),
                el("span", {class: "path"}, path), el("span", {class: "summary"}, op.summary || "")));
  const body = el("div", {class: "body"});
  if (op.description) body.append(el("p", {}, op.description));
  if (op.parameters) {
    const t = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "description")));
    for (const p of op.parameters) t.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in), el("td", {}, p.description || "")));
    body.append(t);
  }
  if (op.requestBody) {
    for (const [type, media] of Object.entries(op.requestBody.content)) body.append(el("p", {}, "Request body ", el("code", {}, type), ": ", el("span", {class: "type"}, typeOf(media.schema))));
  }
  const t = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "description"), el("th", {}, "body")));
  for (const [code, r] of Object.entries(op.responses)) {
    const media = r.content ? Object.values(r.content)[0] : null;
    t.append(el("tr", {}, el("td", {}, el("code", {}, code)), el("td", {}, r.description), el("td", {class: "type"}, media ? typeOf(media.schema) : "")));
  }
  body.append(t);
  box.append(body);
  return box;
}
document.getElementById("title").textContent = spec.info.title + " " + spec.info.version;
document.getElementById("description").textContent = spec.info.description || "";
const tagText = new Map((spec.tags || []).map(t => [t.name, t.description]));
const byTag = new Map((spec.tags || []).map(t => [t.name, []]));
for (const [path, item] of Object.entries(spec.paths)) {
  for (const [method, op] of Object.entries(item)) {
    const tag = (op.tags || ["other"])[0];
    if (!byTag.has(tag)) byTag.set(tag, []);
    byTag.get(tag).push(operation(path, method, op));
  }
}
for (const [tag, ops] of byTag) {
  main.append(el("h2", {}, tag, tagText.get(tag) ? el("span", {class: "tagdesc"}, " — " + tagText.get(tag)) : null));
  ops.forEach(o => main.append(o));
}
main.append(el("h2", {}, "schemas"));
for (const [name, s] of Object.entries(spec.components.schemas)) {
  const box = el("details", {class: "op", id: "schema-" + name, open: ""});
  box.append(el("summary", {}, el("span", {class: "path"}, name), el("span", {class: "type"}, typeOf(s.properties ? {type: s.type} : s))));
  const body = el("div", {class: "body"});
  if (s.description) body.append(el("p", {class: "desc"}, s.description));
  if (s.properties) body.append(schemaTree(s));
  box.append(body);
  main.append(box);
}
// "#id" opens and scrolls to an operation; "?open=id" opens it in place.
const wanted = new URLSearchParams(location.search).get("open") || decodeURIComponent(location.hash.slice(1));
const target = wanted && document.getElementById(wanted);
if (target) { target.open = true; if (location.hash) target.scrollIntoView(); }
</script>
</body>
</html>
"""


def render_docs_page(spec: dict) -> str:
    """The HTML page with `spec` embedded (so it works offline and when saved to a file)."""
    # "</" would end the <script> element early; "<\\/" is the same JSON string.
    return _PAGE.replace("__SPEC__", json.dumps(spec).replace("</", "<\\/"))
