// sd-rest's documentation page: reads /openapi.json and lists every operation with its
// parameters, body fields and responses, with a form to try each one against this server.
// Our own small script, no framework and nothing from a CDN: it works offline.
"use strict";

const KEY_STORE = "sd-rest-api-key";
const METHODS = ["get", "post", "delete", "head", "options"];
const state = { spec: null, key: "" };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// --- the API key ---------------------------------------------------------------------------

function loadKey() {
  state.key = sessionStorage.getItem(KEY_STORE) || localStorage.getItem(KEY_STORE) || "";
  document.getElementById("api-key").value = state.key;
  document.getElementById("remember").checked = Boolean(localStorage.getItem(KEY_STORE));
  showKeyState();
}

function saveKey(event) {
  event.preventDefault();
  state.key = document.getElementById("api-key").value.trim();
  const remember = document.getElementById("remember").checked;
  sessionStorage.removeItem(KEY_STORE);
  localStorage.removeItem(KEY_STORE);
  if (state.key) (remember ? localStorage : sessionStorage).setItem(KEY_STORE, state.key);
  showKeyState();
  loadSpec();
}

function showKeyState() {
  document.getElementById("key-state").textContent = state.key
    ? "requests send Authorization: Bearer …"
    : "no key";
}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

// --- reading the document ------------------------------------------------------------------

function resolve(schema) {
  let seen = 0;
  while (schema && schema.$ref && seen++ < 20) {
    const path = schema.$ref.replace(/^#\//, "").split("/");
    schema = path.reduce((node, part) => (node ? node[part] : undefined), state.spec);
  }
  return schema || {};
}

function refName(schema) {
  return schema && schema.$ref ? schema.$ref.split("/").pop() : null;
}

function describe(schema) {
  // One line: type, bounds, default, choices.
  const name = refName(schema);
  if (name) return name;
  const s = schema || {};
  if (s.anyOf || s.oneOf) {
    return (s.anyOf || s.oneOf).map(describe).join(" or ");
  }
  const words = [];
  if (s.const !== undefined) words.push(JSON.stringify(s.const));
  if (s.enum) words.push(`one of ${s.enum.map((v) => JSON.stringify(v)).join(", ")}`);
  if (s.type) words.push(Array.isArray(s.type) ? s.type.join(" | ") : s.type);
  if (s.type === "array" && s.items) words.push(`of ${describe(s.items)}`);
  if (s.contentMediaType) words.push(`(a file: ${s.contentMediaType})`);
  const low = s.minimum ?? s.exclusiveMinimum;
  const high = s.maximum ?? s.exclusiveMaximum;
  if (low !== undefined || high !== undefined) {
    const open = s.exclusiveMinimum !== undefined ? "(" : "[";
    const close = s.exclusiveMaximum !== undefined ? ")" : "]";
    words.push(`${open}${low ?? ""} … ${high ?? ""}${close}`);
  }
  if (s.multipleOf) words.push(`multiple of ${s.multipleOf}`);
  if (s.not && s.not.enum) words.push(`except ${s.not.enum.join(", ")}`);
  if (s.minLength !== undefined || s.maxLength !== undefined) {
    words.push(`${s.minLength ?? 0}–${s.maxLength ?? "∞"} characters`);
  }
  if (s.pattern) words.push(`matching ${s.pattern}`);
  return words.join(", ") || "any";
}

// --- rendering -----------------------------------------------------------------------------

async function loadSpec() {
  const status = document.getElementById("status");
  status.textContent = "Loading /openapi.json…";
  status.className = "";
  let response;
  try {
    response = await fetch("/openapi.json", { headers: authHeaders() });
  } catch (error) {
    status.textContent = `Could not reach the server: ${error}`;
    status.className = "error";
    return;
  }
  if (response.status === 401) {
    status.textContent = "This server needs its API key: enter it above.";
    status.className = "error";
    return;
  }
  if (!response.ok) {
    status.textContent = `GET /openapi.json answered ${response.status}`;
    status.className = "error";
    return;
  }
  state.spec = await response.json();
  status.textContent = "";
  render();
}

function render() {
  const spec = state.spec;
  document.getElementById("version").textContent = `${spec.info.version} · OpenAPI ${spec.openapi}`;
  document.title = `${spec.info.title} ${spec.info.version} API`;
  const info = document.getElementById("info");
  info.replaceChildren(
    el("p", { text: spec.info.description }),
    el("p", {}, "The document: ", el("a", { href: "/openapi.json", text: "/openapi.json" }))
  );
  const byTag = new Map();
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const method of METHODS) {
      const operation = item[method];
      if (!operation) continue;
      const tag = (operation.tags || ["Other"])[0];
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push({ path, method, operation, shared: item.parameters || [] });
    }
  }
  const order = (spec.tags || []).map((t) => t.name);
  const tags = [...byTag.keys()].sort((a, b) => order.indexOf(a) - order.indexOf(b));
  const toc = document.getElementById("toc");
  const operations = document.getElementById("operations");
  toc.replaceChildren(...tags.map((tag) => el("a", { href: `#tag-${tag}`, text: tag })),
    el("a", { href: "#schemas", text: "Schemas" }));
  operations.replaceChildren();
  for (const tag of tags) {
    const description = (spec.tags || []).find((t) => t.name === tag);
    operations.append(el("h2", { id: `tag-${tag}`, text: tag }));
    if (description && description.description) {
      operations.append(el("p", { className: "summary", text: description.description }));
    }
    for (const entry of byTag.get(tag)) operations.append(renderOperation(entry));
  }
  operations.append(renderSchemas());
  // A link to an operation (#postTextToImage) opens it.
  const target = location.hash && document.getElementById(decodeURIComponent(location.hash.slice(1)));
  if (target && target.tagName === "DETAILS") {
    target.open = true;
    target.scrollIntoView();
  }
}

function renderOperation({ path, method, operation, shared }) {
  const parameters = [...shared, ...(operation.parameters || [])];
  const body = el("div", { className: "body" });
  if (operation.description) body.append(el("p", { text: operation.description }));
  if (parameters.length) {
    body.append(el("h4", { text: "Parameters" }), table(
      ["name", "in", "accepted", "description"],
      parameters.map((p) => [el("code", { text: p.name }), p.in, describe(p.schema) +
        (p.schema && p.schema.default !== undefined ? `, default ${p.schema.default}` : "") +
        (p.required ? ", required" : ""), p.description || ""])
    ));
  }
  const content = operation.requestBody ? operation.requestBody.content : null;
  if (content) {
    const [first] = Object.values(content);
    const schema = resolve(first.schema);
    body.append(el("h4", { text: `Body: ${Object.keys(content).join(", ")}` }));
    if (schema.description) body.append(el("p", { text: schema.description }));
    body.append(table(
      ["field", "accepted", "default", "description"],
      Object.entries(schema.properties || {}).map(([name, field]) => [
        el("code", { text: name }),
        describe(field),
        (schema.required || []).includes(name) ? "required" : JSON.stringify(field.default),
        field.description || "",
      ])
    ));
  }
  body.append(el("h4", { text: "Responses" }));
  for (const [code, response] of Object.entries(operation.responses || {})) {
    const resolved = resolve(response);
    const shown = el("div", {}, el("strong", { text: code }), " ", resolved.description || "");
    for (const [type, media] of Object.entries(resolved.content || {})) {
      // An event stream's schema has one branch per event, its JSON data as contentSchema.
      const events = type === "text/event-stream" ? media.schema.oneOf || [] : null;
      const view = events
        ? events.map((b) => `${b.properties.event.const}: ${describe(b.properties.data.contentSchema)}`).join("\n")
        : JSON.stringify(media.schema, null, 1);
      shown.append(el("details", {}, el("summary", { text: type }), el("pre", { text: view })));
    }
    for (const [name, header] of Object.entries(resolved.headers || {})) {
      shown.append(el("div", { className: "hint" }, `header ${name}: ${header.description || describe(header.schema)}`));
    }
    body.append(shown);
  }
  body.append(tryForm(path, method, parameters, content));
  return el("details", { className: "op", id: operation.operationId },
    el("summary", {}, el("span", { className: `method m-${method}`, text: method }),
      el("span", { className: "path", text: path }),
      el("span", { className: "summary", text: operation.summary || "" })),
    body);
}

function table(headings, rows) {
  return el("table", {},
    el("thead", {}, el("tr", {}, headings.map((h) => el("th", { text: h })))),
    el("tbody", {}, rows.map((row) => el("tr", {}, row.map((cell) => el("td", {}, cell))))));
}

function renderSchemas() {
  const section = el("section", { id: "schemas" }, el("h2", { text: "Schemas" }));
  for (const [name, schema] of Object.entries(state.spec.components.schemas || {})) {
    section.append(el("details", { className: "op", id: `schema-${name}` },
      el("summary", {}, el("span", { className: "path", text: name })),
      el("div", { className: "body" }, el("pre", { text: JSON.stringify(schema, null, 1) }))));
  }
  return section;
}

// --- trying an operation -------------------------------------------------------------------

function isFile(schema) {
  return Boolean(schema && schema.contentMediaType && schema.type === "string");
}

function tryForm(path, method, parameters, content) {
  const inputs = [];
  const form = el("form", { className: "try" }, el("strong", { text: "Try it" }));
  for (const p of parameters) {
    const input = el("input", { type: "text", name: p.name,
      value: p.schema && p.schema.default !== undefined ? String(p.schema.default) : "" });
    inputs.push({ where: p.in, name: p.name, input });
    form.append(el("label", {}, `${p.name} `, el("span", { className: "hint", text: `(${p.in})` })), input);
  }
  let typeSelect = null;
  const fields = [];
  if (content) {
    const types = Object.keys(content);
    typeSelect = el("select", {}, types.map((t) => el("option", { value: t, text: t })));
    form.append(el("label", { text: "Content-Type" }), typeSelect);
    const schema = resolve(content[types[0]].schema);
    for (const [name, field] of Object.entries(schema.properties || {})) {
      const input = isFile(field)
        ? el("input", { type: "file", name })
        : name === "prompt"
          ? el("textarea", { name })
          : el("input", { type: "text", name, placeholder: field.default !== undefined ? `default ${field.default}` : "" });
      fields.push({ name, field, input });
      form.append(el("label", {}, `${name} `, el("span", { className: "hint", text: describe(field) })), input);
    }
  }
  const result = el("div", { className: "result" });
  const stop = el("button", { type: "button", className: "secondary", hidden: true, text: "Stop" });
  form.append(el("p", {}, el("button", { type: "submit", text: "Send" }), " ", stop), result);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    send(path, method, inputs, fields, typeSelect && typeSelect.value, result, stop);
  });
  return form;
}

function numeric(field) {
  const types = [field.type, ...(field.anyOf || []).map((s) => s.type)];
  return types.includes("integer") || types.includes("number");
}

async function send(path, method, inputs, fields, type, result, stop) {
  let url = path;
  const query = new URLSearchParams();
  const headers = { ...authHeaders() };
  for (const { where, name, input } of inputs) {
    const value = input.value;
    if (where === "path") url = url.replace(`{${name}}`, encodeURIComponent(value));
    else if (value === "") continue;
    else if (where === "query") query.append(name, value);
    else if (where === "header") headers[name] = value;
  }
  if ([...query].length) url += `?${query}`;
  let body;
  if (type) {
    const filled = fields.filter(({ input }) => (input.type === "file" ? input.files.length : input.value !== ""));
    if (type === "multipart/form-data") {
      body = new FormData();
      for (const { name, input } of filled) body.append(name, input.type === "file" ? input.files[0] : input.value);
    } else if (type === "application/x-www-form-urlencoded") {
      body = new URLSearchParams(filled.map(({ name, input }) => [name, input.value]));
    } else {
      const doc = {};
      for (const { name, field, input } of filled) {
        doc[name] = numeric(field) && input.value.trim() !== "" && !Number.isNaN(Number(input.value)) ? Number(input.value) : input.value;
      }
      body = JSON.stringify(doc);
      headers["Content-Type"] = "application/json";
    }
  }
  const controller = new AbortController();
  stop.hidden = false;
  stop.onclick = () => controller.abort();
  result.replaceChildren(el("p", { text: `${method.toUpperCase()} ${url} …` }));
  try {
    const response = await fetch(url, { method: method.toUpperCase(), headers, body, signal: controller.signal });
    await show(response, result, method, url);
  } catch (error) {
    if (error.name !== "AbortError") result.append(el("p", { className: "error", text: String(error) }));
    else result.append(el("p", { className: "hint", text: "stopped" }));
  } finally {
    stop.hidden = true;
  }
}

async function show(response, result, method, url) {
  const ok = response.status < 400;
  const line = el("p", {}, el("span", { className: ok ? "status-ok" : "status-bad", text: `${response.status} ${response.statusText}` }));
  if (response.redirected) line.append(` — followed the redirect to ${new URL(response.url).pathname}`);
  const headers = [...response.headers].map(([k, v]) => `${k}: ${v}`).join("\n");
  result.replaceChildren(line, el("details", {}, el("summary", { text: "headers" }), el("pre", { text: headers })));
  const type = response.headers.get("Content-Type") || "";
  if (method === "head" || response.status === 204 || response.status === 304) return;
  if (type.startsWith("image/")) {
    const blob = await response.blob();
    result.append(el("img", { src: URL.createObjectURL(blob), alt: url }));
  } else if (type.startsWith("text/event-stream")) {
    const out = el("pre", {});
    result.append(out);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      out.textContent += decoder.decode(value, { stream: true });
      out.scrollTop = out.scrollHeight;
    }
  } else {
    const text = await response.text();
    let pretty = text;
    try { pretty = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* not JSON */ }
    result.append(el("pre", { text: pretty }));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("key-form").addEventListener("submit", saveKey);
  loadKey();
  loadSpec();
});
