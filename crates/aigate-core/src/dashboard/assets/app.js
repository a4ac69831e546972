// aigate dashboard: fills the server-rendered page shell from /dashboard/api. No framework, no
// build step: the DOM is built with el() (text nodes only, never innerHTML with data) and charts
// are drawn by uPlot (vendored beside this file).
"use strict";

(() => {
  const body = document.body.dataset;
  const page = body.page;
  const gw = body.gateway;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const main = document.getElementById("main");
  const RANGES = ["1h", "24h", "7d", "30d"];
  const GRANULARITY = { "1h": "minute", "24h": "hour", "7d": "hour", "30d": "day" };
  const RANGE_MS = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3, "30d": 30 * 86400e3 };
  const COLORS = { blue: "#2563eb", green: "#15803d", red: "#b91c1c", amber: "#b45309", violet: "#7c3aed", grey: "#475569" };

  // ---- helpers -------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat(Infinity)) {
      if (c === undefined || c === null || c === false) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  class ApiError extends Error {}

  async function api(path, opts = {}) {
    const headers = Object.assign({ "x-csrf-token": csrf }, opts.headers || {});
    const resp = await fetch("/dashboard/api" + path, Object.assign({}, opts, { headers, credentials: "same-origin" }));
    if (resp.status === 401) {
      location.href = "/dashboard/login?next=" + encodeURIComponent(location.pathname + location.search);
      throw new ApiError("Your session ended; log in again.");
    }
    const text = await resp.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (!resp.ok) {
      throw new ApiError((data && data.error && data.error.message) || ("HTTP " + resp.status));
    }
    return data;
  }

  const nf = new Intl.NumberFormat("en-US");
  const fmtInt = (n) => (n === null || n === undefined ? "–" : nf.format(Math.round(n)));
  const fmtPct = (x) => (x === null || x === undefined || Number.isNaN(x) ? "–" : (x * 100).toFixed(x > 0 && x < 0.001 ? 3 : 1) + " %");
  const fmtMs = (x) => (x === null || x === undefined ? "–" : x >= 1000 ? (x / 1000).toFixed(2) + " s" : x.toFixed(x < 10 ? 2 : 0) + " ms");
  function fmtUsd(x) {
    if (x === null || x === undefined) return "–";
    if (x === 0) return "$0";
    if (Math.abs(x) < 0.01) return "$" + x.toPrecision(2);
    return "$" + x.toFixed(2);
  }
  const pad = (n) => String(n).padStart(2, "0");
  // Local time as 2026-12-03 14:05:09: unambiguous in every locale.
  function fmtTime(ms) {
    const d = new Date(ms);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  const WIDTH_MS = { minute: 60e3, hour: 3600e3, day: 86400e3 };
  // The analytics answer lists the buckets that have requests; charts want every bucket of the range.
  function fillBuckets(a) {
    const w = WIDTH_MS[a.granularity] || 3600e3;
    const have = new Map(a.buckets.map((b) => [b.start_ms, b]));
    const out = [];
    for (let t = Math.floor(a.from_ms / w) * w; t < a.to_ms; t += w) {
      out.push(have.get(t) || { start_ms: t, requests: 0, cache_hits: 0, errors: 0, tokens_in: 0, tokens_out: 0, cost_usd: 0, saved_usd: 0, p50_ms: null, p95_ms: null, p99_ms: null });
    }
    return out;
  }
  const gwPath = (g, suffix = "") => "/dashboard/gateways/" + encodeURIComponent(g) + suffix;
  const gwApi = (g, suffix = "") => "/gateways/" + encodeURIComponent(g) + suffix;

  function params() { return new URLSearchParams(location.search); }
  function currentRange() {
    const r = params().get("range");
    return RANGES.includes(r) ? r : "24h";
  }

  const present = (nodes) => nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false);
  function setMain(...children) {
    main.replaceChildren(...present(children));
  }
  // Replaces the page's last element (its "Loading…" line) with the content.
  function fill(...children) {
    main.lastChild.replaceWith(...present(children));
  }

  // Thumb icons drawn as SVG (Material Design icon path, Apache 2.0): an emoji needs a font the
  // machine may not have.
  const THUMB = "M1 21h4V9H1v12zm22-11c0-1.1-.9-2-2-2h-6.31l.95-4.57.03-.32c0-.41-.17-.79-.44-1.06L14.17 1 7.59 7.59C7.22 7.95 7 8.45 7 9v10c0 1.1.9 2 2 2h9c.83 0 1.54-.5 1.84-1.22l3.02-7.05c.09-.23.14-.47.14-.73v-2z";
  function thumb(down) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("width", "20");
    svg.setAttribute("height", "20");
    svg.setAttribute("aria-hidden", "true");
    if (down) svg.setAttribute("transform", "rotate(180)");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", THUMB);
    path.setAttribute("fill", "currentColor");
    svg.append(path);
    return svg;
  }

  function errorBox(err) {
    return el("p", { class: "error", role: "alert" }, String(err.message || err));
  }

  function rangeLinks(active) {
    return el("nav", { class: "ranges", "aria-label": "Time range" },
      RANGES.map((r) => {
        const p = params();
        p.set("range", r);
        return el("a", { href: "?" + p.toString(), "aria-current": r === active ? "true" : null }, r);
      }));
  }

  function stat(label, value, extra) {
    return el("div", { class: "stat" }, el("dt", {}, label), el("dd", {}, value, extra ? el("small", {}, " " + extra) : null));
  }

  function table(headers, rows, opts = {}) {
    return el("div", { class: "table-wrap" },
      el("table", { class: opts.class || "" },
        opts.caption ? el("caption", {}, opts.caption) : null,
        el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, rows)));
  }

  // The base URL a client points its SDK at, and copy-paste snippets.
  function baseUrl(g) {
    if (g === body.defaultGateway) return location.origin + "/v1";
    return location.origin + "/v1/" + encodeURIComponent(body.account) + "/" + encodeURIComponent(g) + "/openai";
  }

  function snippets(g, authentication, compact) {
    const url = baseUrl(g);
    const auth = authentication;
    const py = [
      "from openai import OpenAI",
      "",
      `client = OpenAI(base_url="${url}"` + (auth ? `,\n                default_headers={"cf-aig-authorization": "Bearer <gateway token>"})` : ")"),
      'print(client.chat.completions.create(model="gpt-4o-mini",',
      '      messages=[{"role": "user", "content": "Hello"}]).choices[0].message.content)',
    ].join("\n");
    const node = [
      'import OpenAI from "openai";',
      "",
      `const client = new OpenAI({ baseURL: "${url}"` + (auth ? `,\n  defaultHeaders: { "cf-aig-authorization": "Bearer <gateway token>" } });` : " });"),
      'const r = await client.chat.completions.create({ model: "gpt-4o-mini",',
      '  messages: [{ role: "user", content: "Hello" }] });',
      "console.log(r.choices[0].message.content);",
    ].join("\n");
    const curl = [
      `curl ${url}/chat/completions \\`,
      '  -H "Authorization: Bearer $OPENAI_API_KEY" \\',
      auth ? '  -H "cf-aig-authorization: Bearer <gateway token>" \\' : null,
      '  -H "Content-Type: application/json" \\',
      `  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'`,
    ].filter(Boolean).join("\n");
    const code = [el("h4", {}, "Python"), el("pre", { class: "snippet" }, py),
      el("h4", {}, "Node"), el("pre", { class: "snippet" }, node),
      el("h4", {}, "curl"), el("pre", { class: "snippet" }, curl)];
    return el("section", { class: "empty", "aria-label": "Getting started" },
      el("h3", {}, "No requests yet"),
      el("p", {}, "Point an OpenAI SDK at this gateway: its base URL is ", el("code", { class: "base-url" }, url)),
      compact ? el("details", {}, el("summary", {}, "Python, Node and curl snippets"), code) : code);
  }

  // ---- charts (uPlot) ------------------------------------------------------------------------

  function chart(container, title, buckets, series, opts = {}) {
    const xs = buckets.map((b) => b.start_ms / 1000);
    const data = [xs, ...series.map((s) => buckets.map(s.value))];
    const width = Math.max(240, container.clientWidth || 600);
    const u = new uPlot({
      title: opts.sparkline ? undefined : title,
      width,
      height: opts.height || 220,
      legend: { show: !opts.sparkline },
      cursor: opts.sparkline ? { show: false } : {},
      axes: opts.sparkline ? [{ show: false }, { show: false }] : [{}, {
        values: (u, vals) => vals.map((v) => (opts.format ? opts.format(v) : v)),
        size: 64,
        // Counts have whole-number ticks.
        incrs: opts.format === fmtInt ? [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 1e5, 1e6, 1e7] : undefined,
      }],
      scales: { x: { time: true } },
      series: [{}, ...series.map((s) => ({
        label: s.label,
        stroke: s.color,
        width: 2,
        fill: s.fill ? s.color + "22" : undefined,
        value: (u, v) => (v === null || v === undefined ? "–" : opts.format ? opts.format(v) : fmtInt(v)),
        // Latency has no value in a bucket without requests: mark each point so a lone one shows.
        points: { show: !!s.points, size: 5 },
      }))],
    }, data, container);
    container.setAttribute("role", "img");
    container.setAttribute("aria-label", title + (opts.sparkline ? "" : ": hover for values"));
    return u;
  }

  // ---- overview ------------------------------------------------------------------------------

  async function overview() {
    const range = currentRange();
    setMain(el("h1", {}, "Overview"), rangeLinks(range), el("p", { class: "muted", role: "status" }, "Loading…"));
    let data;
    try { data = await api("/overview?range=" + range); } catch (e) { fill(errorBox(e)); return; }
    const grid = el("div", { class: "cards" });
    fill(el("p", { class: "muted" }, `Last ${range}, ${fmtTime(data.from_ms)} to ${fmtTime(data.to_ms)}.`), grid);
    for (const g of data.gateways) {
      const t = g.analytics.totals;
      const spark = el("div", { class: "spark" });
      const card = el("section", { class: "card gateway-card", "aria-labelledby": "gw-" + g.name },
        el("header", {},
          el("h2", { id: "gw-" + g.name }, el("a", { href: gwPath(g.name) + "?range=" + range }, g.name)),
          el("span", { class: "badge badge-" + g.cache_mode, title: "cache mode" }, "cache " + g.cache_mode)),
        el("dl", { class: "stats" },
          stat("Requests", fmtInt(t.requests)),
          stat("Cache hit rate", fmtPct(t.hit_rate)),
          stat("Tokens", fmtInt(t.tokens_in + t.tokens_out)),
          stat("Cost", fmtUsd(t.cost_usd)),
          stat("Saved", fmtUsd(t.saved_usd)),
          stat("Error rate", fmtPct(t.error_rate)),
          stat("p95 latency", fmtMs(t.p95_ms))),
        t.requests > 0 ? spark : snippets(g.name, g.authentication, true),
        el("nav", { class: "card-links", "aria-label": g.name + " pages" },
          el("a", { href: gwPath(g.name, "/logs") }, "Logs"),
          el("a", { href: gwPath(g.name, "/tail") }, "Live tail"),
          el("a", { href: gwPath(g.name, "/report") }, "Report"),
          el("a", { href: gwPath(g.name, "/settings") }, "Settings")));
      grid.append(card);
      if (t.requests > 0) {
        chart(spark, g.name + " requests and cache hits", fillBuckets(g.analytics), [
          { label: "Requests", color: COLORS.blue, value: (b) => b.requests, fill: true },
          { label: "From cache", color: COLORS.green, value: (b) => b.cache_hits },
        ], { sparkline: true, height: 56 });
      }
    }
  }

  // ---- gateway: charts, breakdown, before / after ---------------------------------------------

  async function gateway() {
    const range = currentRange();
    const charts = el("div", { class: "charts" });
    const breakdown = el("section", { class: "card", "aria-labelledby": "breakdown-h" });
    const compare = el("section", { class: "card", "aria-labelledby": "compare-h" });
    const cache = el("section", { class: "card", id: "cache-top", "aria-labelledby": "cache-top-h" });
    setMain(el("h1", {}, gw), rangeLinks(range), el("p", { class: "muted", role: "status", id: "status" }, "Loading…"), charts, cache, breakdown, compare);
    renderCacheTop(cache, range);
    const to = Date.now();
    const from = to - RANGE_MS[range];
    let a;
    try {
      a = await api(gwApi(gw, "/analytics") + `?from=${from}&to=${to}&granularity=${GRANULARITY[range]}`);
    } catch (e) { document.getElementById("status").replaceWith(errorBox(e)); return; }
    const t = a.totals;
    document.getElementById("status").replaceWith(el("dl", { class: "stats wide" },
      stat("Requests", fmtInt(t.requests)), stat("Served from cache", fmtInt(t.cache_hits), fmtPct(t.hit_rate)),
      stat("Tokens in / out", fmtInt(t.tokens_in) + " / " + fmtInt(t.tokens_out)), stat("Cost", fmtUsd(t.cost_usd)),
      stat("Saved", fmtUsd(t.saved_usd)), stat("Errors", fmtInt(t.errors), fmtPct(t.error_rate)),
      stat("p50 / p95 / p99", `${fmtMs(t.p50_ms)} / ${fmtMs(t.p95_ms)} / ${fmtMs(t.p99_ms)}`)));
    if (t.requests === 0) {
      charts.append(snippets(gw, body.authentication === "true"));
    } else {
      const specs = [
        ["Requests", [{ label: "Requests", color: COLORS.blue, value: (b) => b.requests, fill: true }, { label: "Served from cache", color: COLORS.green, value: (b) => b.cache_hits }], fmtInt],
        ["Tokens", [{ label: "Input", color: COLORS.violet, value: (b) => b.tokens_in }, { label: "Output", color: COLORS.amber, value: (b) => b.tokens_out }], fmtInt],
        ["Cost and savings (USD)", [{ label: "Cost", color: COLORS.red, value: (b) => b.cost_usd }, { label: "Saved", color: COLORS.green, value: (b) => b.saved_usd }], fmtUsd],
        ["Errors", [{ label: "Errors", color: COLORS.red, value: (b) => b.errors, fill: true }], fmtInt],
        ["Latency", [{ label: "p50", color: COLORS.blue, value: (b) => b.p50_ms, points: true }, { label: "p95", color: COLORS.amber, value: (b) => b.p95_ms, points: true }, { label: "p99", color: COLORS.red, value: (b) => b.p99_ms, points: true }], fmtMs],
      ];
      for (const [title, series, format] of specs) {
        const box = el("div", { class: "card chart" });
        charts.append(box);
        chart(box, title, fillBuckets(a), series, { format });
      }
    }
    renderBreakdown(breakdown, from, to, GRANULARITY[range]);
    renderCompare(compare, range);
  }

  // The requests that repeat most (this server's cache index): `aigate cache top`.
  async function renderCacheTop(section, range) {
    section.append(el("h2", { id: "cache-top-h" }, "Cache"));
    let t;
    try {
      t = await api(gwApi(gw, "/cache/top") + `?since=${encodeURIComponent(range)}&limit=20`);
    } catch (e) { section.append(errorBox(e)); return; }
    const s = t.totals;
    section.append(el("dl", { class: "stats" },
      stat("Entries", fmtInt(s.entries)), stat("Bytes", fmtInt(s.bytes)), stat("Hit rate", fmtPct(s.hit_rate)),
      stat("Saved", fmtUsd(s.saved_usd)), stat("A longer TTL would add", fmtInt(s.expired_misses) + " hits")));
    if (t.entries.length === 0) { section.append(el("p", { class: "muted" }, "No cached requests in this period.")); return; }
    const rows = t.entries.map((e) => el("tr", {},
      el("td", {}, fmtInt(e.hits)), el("td", {}, fmtInt(e.misses)), el("td", {}, fmtInt(e.bytes)),
      el("td", {}, e.age_s === null ? "–" : fmtMs(e.age_s * 1000)), el("td", {}, fmtUsd(e.saved_usd)),
      el("td", {}, e.model || "–"), el("td", {}, e.endpoint), el("td", { class: "preview" }, e.preview || ""),
      el("td", {}, el("code", { title: e.key }, e.key.slice(0, 12)))));
    section.append(table(["Hits", "Misses", "Bytes", "Age", "Saved", "Model", "Endpoint", "Prompt", "Key"], rows, { class: "numeric", caption: "Most repeated requests" }));
  }

  function renderBreakdown(section, from, to, granularity) {
    const by = el("select", { id: "group-by" }, ["model", "provider", "metadata"].map((v) => el("option", { value: v }, v === "metadata" ? "metadata key…" : v)));
    const key = el("input", { id: "meta-key", type: "text", placeholder: "e.g. user_id", hidden: true, "aria-label": "Metadata key" });
    const out = el("div", {});
    const load = async () => {
      key.hidden = by.value !== "metadata";
      if (by.value === "metadata" && !key.value.trim()) { out.replaceChildren(el("p", { class: "muted" }, "Enter a metadata key.")); return; }
      const group = by.value === "metadata" ? "metadata." + key.value.trim() : by.value;
      try {
        const a = await api(gwApi(gw, "/analytics") + `?from=${from}&to=${to}&granularity=${granularity}&group_by=${encodeURIComponent(group)}`);
        // Each group carries its figures flattened beside its name.
        const rows = a.groups.map((g) => el("tr", {},
          el("th", { scope: "row" }, g.group === null ? "(none)" : g.group), el("td", {}, fmtInt(g.requests)),
          el("td", {}, fmtPct(g.hit_rate)), el("td", {}, fmtInt(g.tokens_in + g.tokens_out)),
          el("td", {}, fmtUsd(g.cost_usd)), el("td", {}, fmtUsd(g.saved_usd)),
          el("td", {}, fmtPct(g.error_rate)), el("td", {}, fmtMs(g.p95_ms))));
        out.replaceChildren(rows.length ? table([group, "Requests", "Hit rate", "Tokens", "Cost", "Saved", "Error rate", "p95"], rows, { class: "numeric breakdown" })
          : el("p", { class: "muted" }, "No requests in this range."));
      } catch (e) { out.replaceChildren(errorBox(e)); }
    };
    by.addEventListener("change", load);
    key.addEventListener("change", load);
    section.append(el("h2", { id: "breakdown-h" }, "Breakdown"),
      el("div", { class: "controls" }, el("label", { for: "group-by" }, "Break down by"), by, key), out);
    load();
  }

  // datetime-local values in local time <-> Unix ms.
  const toLocalInput = (ms) => { const d = new Date(ms - new Date(ms).getTimezoneOffset() * 60e3); return d.toISOString().slice(0, 16); };
  const fromLocalInput = (v) => new Date(v).getTime();

  function renderCompare(section, range) {
    // The inputs hold whole minutes and a window is [from, to): the default "after" ends at the
    // next whole minute so that it includes the requests of the current one.
    const end = Math.ceil(Date.now() / 60e3) * 60e3;
    const span = RANGE_MS[range];
    const inputs = {
      bf: el("input", { type: "datetime-local", id: "before-from", value: toLocalInput(end - 2 * span) }),
      bt: el("input", { type: "datetime-local", id: "before-to", value: toLocalInput(end - span) }),
      af: el("input", { type: "datetime-local", id: "after-from", value: toLocalInput(end - span) }),
      at: el("input", { type: "datetime-local", id: "after-to", value: toLocalInput(end) }),
    };
    const out = el("div", { "aria-live": "polite" });
    const run = async (ev) => {
      if (ev) ev.preventDefault();
      const windows = [[inputs.bf.value, inputs.bt.value], [inputs.af.value, inputs.at.value]].map(([f, t]) => [fromLocalInput(f), fromLocalInput(t)]);
      try {
        const [b, a] = await Promise.all(windows.map(([f, t]) => {
          const gran = t - f > 20 * 86400e3 ? "day" : "hour";
          return api(gwApi(gw, "/analytics") + `?from=${f}&to=${t}&granularity=${gran}`);
        }));
        const rows = [
          ["Requests", (s) => s.requests, fmtInt, 0],
          ["p50 latency", (s) => s.p50_ms, fmtMs, -1],
          ["p95 latency", (s) => s.p95_ms, fmtMs, -1],
          ["p99 latency", (s) => s.p99_ms, fmtMs, -1],
          ["Error rate", (s) => s.error_rate, fmtPct, -1],
          ["Cache hit rate", (s) => s.hit_rate, fmtPct, 1],
          ["Upstream calls", (s) => s.requests - s.cache_hits, fmtInt, 0],
          ["Cost", (s) => s.cost_usd, fmtUsd, -1],
          ["Saved", (s) => s.saved_usd, fmtUsd, 1],
        ].map(([label, get, fmt, better]) => {
          const x = get(b.totals), y = get(a.totals);
          let change = "–", cls = "";
          if (x !== null && y !== null && x !== undefined && y !== undefined) {
            const d = y - x;
            change = x !== 0 ? (d >= 0 ? "+" : "") + ((d / Math.abs(x)) * 100).toFixed(1) + " %" : d === 0 ? "0" : "new";
            if (better !== 0 && d !== 0) cls = (d > 0) === (better > 0) ? "better" : "worse";
          }
          return el("tr", {}, el("th", { scope: "row" }, label), el("td", {}, fmt(x)), el("td", {}, fmt(y)), el("td", { class: cls }, change));
        });
        out.replaceChildren(table(["Measure", "Before", "After", "Change"], rows, { class: "numeric compare" }));
      } catch (e) { out.replaceChildren(errorBox(e)); }
    };
    const field = (id, label, input) => el("div", { class: "field" }, el("label", { for: id }, label), input);
    section.append(el("h2", { id: "compare-h" }, "Before / after"),
      el("p", { class: "muted" }, "Compare two time windows, e.g. the day before a rollout stage and the day after."),
      el("form", { class: "controls compare-form", onsubmit: run },
        el("fieldset", {}, el("legend", {}, "Before"), field("before-from", "From", inputs.bf), field("before-to", "To", inputs.bt)),
        el("fieldset", {}, el("legend", {}, "After"), field("after-from", "From", inputs.af), field("after-to", "To", inputs.at)),
        el("button", { type: "submit" }, "Compare")), out);
    run();
  }

  // ---- logs explorer -------------------------------------------------------------------------

  const FILTERS = [
    ["status", "Status", "number", "e.g. 429"],
    ["success", "Success", "bool"],
    ["cached", "Cached", "bool"],
    ["provider", "Provider", "text", "openai"],
    ["model", "Model", "text", "gpt-4o-mini"],
    ["min_cost", "Min cost (USD)", "number", ""],
    ["max_cost", "Max cost (USD)", "number", ""],
    ["min_tokens", "Min tokens", "number", ""],
    ["max_tokens", "Max tokens", "number", ""],
    ["min_duration_ms", "Min duration (ms)", "number", ""],
    ["max_duration_ms", "Max duration (ms)", "number", ""],
    ["event_id", "Event id", "text", ""],
    ["from", "From", "text", "RFC 3339 or Unix ms"],
    ["to", "To", "text", "RFC 3339 or Unix ms"],
  ];

  function filterQuery(p) {
    const q = new URLSearchParams();
    for (const [k, v] of p) if (k !== "cursor" && k !== "limit" && v !== "") q.append(k, v);
    return q;
  }

  async function logs() {
    const p = params();
    const form = el("form", { class: "filters", id: "filters", role: "search", "aria-label": "Filter logs" });
    for (const [name, label, type, placeholder] of FILTERS) {
      const id = "f-" + name;
      const input = type === "bool"
        ? el("select", { id, name }, el("option", { value: "" }, "any"), el("option", { value: "true" }, "yes"), el("option", { value: "false" }, "no"))
        : el("input", { id, name, type: type === "number" ? "text" : type, inputmode: type === "number" ? "decimal" : null, placeholder });
      input.value = p.get(name) || "";
      form.append(el("div", { class: "field" }, el("label", { for: id }, label), input));
    }
    const metaEntry = [...p.entries()].find(([k]) => k.startsWith("metadata."));
    const mk = el("input", { id: "f-meta-key", type: "text", placeholder: "key", value: metaEntry ? metaEntry[0].slice(9) : "" });
    const mv = el("input", { id: "f-meta-value", type: "text", placeholder: "value", value: metaEntry ? metaEntry[1] : "" });
    form.append(el("div", { class: "field" }, el("label", { for: "f-meta-key" }, "Metadata key"), mk),
      el("div", { class: "field" }, el("label", { for: "f-meta-value" }, "= value"), mv),
      el("div", { class: "field buttons" }, el("button", { type: "submit" }, "Filter"), el("a", { href: location.pathname, class: "button secondary" }, "Clear")));
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const q = new URLSearchParams();
      for (const [name] of FILTERS) { const v = form.elements[name].value.trim(); if (v) q.set(name, v); }
      if (mk.value.trim()) q.set("metadata." + mk.value.trim(), mv.value);
      location.search = q.toString();
    });
    const results = el("div", { "aria-live": "polite" }, el("p", { class: "muted", role: "status" }, "Loading…"));
    const dialog = deleteDialog();
    const deleteBtn = el("button", { type: "button", class: "danger", onclick: () => dialog.open() }, "Delete matching records…");
    setMain(el("h1", {}, "Logs"), el("details", { class: "card", open: true }, el("summary", {}, "Filters"), form), results,
      el("div", { class: "actions" }, deleteBtn), dialog.node);
    const q = filterQuery(p);
    if (p.get("cursor")) q.set("cursor", p.get("cursor"));
    q.set("limit", "50");
    try {
      const page = await api(gwApi(gw, "/logs") + "?" + q.toString());
      results.replaceChildren(renderLogTable(page.records));
      if (page.records.length === 0 && !p.toString()) results.append(snippets(gw, body.authentication === "true"));
      const nav = el("nav", { class: "pager", "aria-label": "Result pages" });
      if (p.get("cursor")) { const f = filterQuery(p); nav.append(el("a", { href: "?" + f.toString() }, "← First page")); }
      if (page.next_cursor) { const n = filterQuery(p); n.set("cursor", page.next_cursor); nav.append(el("a", { href: "?" + n.toString(), rel: "next" }, "Next page →")); }
      results.append(nav);
    } catch (e) { results.replaceChildren(errorBox(e)); }
  }

  function renderLogTable(records) {
    if (!records.length) return el("p", { class: "muted" }, "No records match.");
    const rows = records.map((r) => el("tr", { class: r.success ? "" : "failed" },
      el("td", {}, el("a", { href: gwPath(gw, "/logs/" + encodeURIComponent(r.id)) }, fmtTime(r.created_at_ms))),
      el("td", {}, r.status), el("td", {}, el("span", { class: "cache cache-" + r.cache_status.toLowerCase() }, r.cache_status)),
      el("td", {}, r.provider), el("td", {}, r.requested_model || r.served_model || "–"),
      el("td", { class: "num" }, fmtInt((r.tokens_in || 0) + (r.tokens_out || 0))),
      el("td", { class: "num" }, fmtUsd(r.cost_usd)), el("td", { class: "num" }, fmtMs(r.duration_ms)),
      el("td", {}, r.event_id || "")));
    return table(["Time", "Status", "Cache", "Provider", "Model", "Tokens", "Cost", "Duration", "Event id"], rows, { class: "logs" });
  }

  function deleteDialog() {
    const msg = el("p", {});
    const result = el("p", { role: "status" });
    const confirmBtn = el("button", { type: "button", class: "danger", id: "confirm-delete" }, "Delete");
    const cancel = el("button", { type: "button", class: "secondary" }, "Cancel");
    const node = el("dialog", { "aria-labelledby": "del-h" }, el("h2", { id: "del-h" }, "Delete records"), msg, result,
      el("div", { class: "actions" }, cancel, confirmBtn));
    cancel.addEventListener("click", () => node.close());
    confirmBtn.addEventListener("click", async () => {
      const q = filterQuery(params());
      try {
        const r = await api(gwApi(gw, "/logs") + "?" + q.toString(), { method: "DELETE" });
        result.textContent = `Deleted ${fmtInt(r.deleted)} records.`;
        confirmBtn.disabled = true;
        setTimeout(() => location.reload(), 800);
      } catch (e) { result.replaceChildren(errorBox(e)); }
    });
    return {
      node,
      open() {
        const q = filterQuery(params());
        const desc = q.toString() ? [...q.entries()].map(([k, v]) => `${k} = ${v}`).join(", ") : "no filter: every record of the gateway";
        msg.textContent = `Delete every record of ${gw} matching: ${desc}? This cannot be undone.`;
        result.textContent = "";
        confirmBtn.disabled = false;
        node.showModal();
      },
    };
  }

  // ---- one record ----------------------------------------------------------------------------

  async function logRecord() {
    const id = body.logId;
    setMain(el("p", {}, el("a", { href: gwPath(gw, "/logs") }, "← Logs")), el("p", { class: "muted", role: "status" }, "Loading…"));
    let r;
    try { r = await api(gwApi(gw, "/logs/" + encodeURIComponent(id))); } catch (e) { fill(errorBox(e)); return; }
    const dl = (pairs) => el("dl", { class: "kv" }, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [el("dt", {}, k), el("dd", {}, v === null || v === "" ? "–" : v)]));
    // Shown only when the record has something to say (no route, step or breaker for most).
    const some = (v) => v === null || v === undefined ? undefined : String(v);
    const meta = r.metadata && Object.keys(r.metadata).length
      ? dl(Object.entries(r.metadata).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)]))
      : el("p", { class: "muted" }, "No metadata.");
    fill(
      el("h1", {}, "Request ", el("code", {}, r.id)),
      el("div", { class: "grid2" },
        el("section", { class: "card" }, el("h2", {}, "Request"), dl([
          ["Time", fmtTime(r.created_at_ms)], ["Status", String(r.status) + (r.success ? " (success)" : " (failed)")],
          ["Cache", r.cache_status], ["Route", some(r.route)], ["Step", some(r.step)],
          ["Attempts", some(r.attempts)], ["Breaker", some(r.breaker)], ["Provider", r.provider], ["Path", r.path], ["Model asked", r.requested_model],
          ["Model served", r.served_model], ["Stream", r.stream ? "yes" : "no"], ["Event id", r.event_id],
          ["User agent", r.user_agent], ["Error", r.error]])),
        el("section", { class: "card" }, el("h2", {}, "Timing"), dl([
          ["Total", fmtMs(r.duration_ms)], ["Time to first byte", fmtMs(r.ttfb_ms)],
          ["Upstream", fmtMs(r.upstream_ms)], ["Gateway overhead", fmtMs(r.overhead_ms)]]),
          el("h2", {}, "Tokens and cost"), dl([
            ["Input tokens", fmtInt(r.tokens_in)], ["Output tokens", fmtInt(r.tokens_out)],
            ["Cached input tokens", fmtInt(r.cached_tokens_in)], ["Reasoning tokens", fmtInt(r.reasoning_tokens)],
            ["Cost", fmtUsd(r.cost_usd) + (r.custom_cost ? " (set by the caller)" : "")], ["Saved", fmtUsd(r.saved_usd)]])),
        el("section", { class: "card" }, el("h2", {}, "Metadata"), meta),
        el("section", { class: "card" }, el("h2", {}, "Feedback"), feedbackForm(r))),
      el("section", { class: "card" }, el("h2", {}, "Request body"), bodyView(r.request)),
      el("section", { class: "card" }, el("h2", {}, "Response body"), bodyView(r.response)));
  }

  function bodyView(b) {
    if (!b) return el("p", { class: "muted" }, "Not stored: turn on log bodies in this gateway's Settings to keep them.");
    const size = el("p", { class: "muted" }, fmtInt(b.bytes) + " bytes" + (b.kind === "events" ? `, ${b.events.length} events` : ""));
    if (b.kind === "binary") return [size, el("p", {}, "Binary data, not shown.")];
    if (b.kind === "events") {
      return [size, el("ol", { class: "events" }, b.events.map((e) => el("li", {}, e.event ? el("div", { class: "event-name" }, "event: " + e.event) : null, el("pre", { class: "body" }, e.data))))];
    }
    return [size, el("pre", { class: "body", tabindex: "0" }, b.text)];
  }

  function feedbackForm(r) {
    let feedback = r.feedback;
    const status = el("p", { role: "status", class: "muted" });
    const up = el("button", { type: "button", class: "thumb", "aria-label": "Thumbs up", "aria-pressed": String(feedback === 1) }, thumb(false));
    const down = el("button", { type: "button", class: "thumb", "aria-label": "Thumbs down", "aria-pressed": String(feedback === -1) }, thumb(true));
    const score = el("input", { id: "score", type: "text", inputmode: "decimal", value: r.score === null || r.score === undefined ? "" : String(r.score) });
    const send = async (patch) => {
      try {
        await api(gwApi(gw, "/logs/" + encodeURIComponent(r.id)), { method: "PATCH", headers: { "content-type": "application/json" }, body: JSON.stringify(patch) });
        status.textContent = "Saved.";
      } catch (e) { status.replaceChildren(errorBox(e)); }
    };
    const set = (v) => { feedback = v; up.setAttribute("aria-pressed", String(v === 1)); down.setAttribute("aria-pressed", String(v === -1)); send({ feedback: v }); };
    up.addEventListener("click", () => set(1));
    down.addEventListener("click", () => set(-1));
    const form = el("form", { class: "controls", onsubmit: (ev) => {
      ev.preventDefault();
      const v = Number(score.value);
      if (score.value.trim() === "" || !Number.isFinite(v)) { status.textContent = "The score must be a number."; return; }
      send({ score: v });
    } }, el("label", { for: "score" }, "Score"), score, el("button", { type: "submit" }, "Save score"));
    return [el("div", { class: "controls" }, up, down), form, status];
  }

  // ---- live tail -----------------------------------------------------------------------------

  function tail() {
    const MAX_ROWS = 200;
    let paused = false;
    let held = [];
    let controller = null;
    const status = el("p", { role: "status", class: "muted", id: "tail-status" }, "Connecting…");
    const tbody = el("tbody", {});
    const pause = el("button", { type: "button", id: "pause", "aria-pressed": "false" }, "Pause");
    const errorsOnly = el("input", { type: "checkbox", id: "errors-only" });
    const row = (r) => el("tr", { class: r.success ? "" : "failed" },
      el("td", {}, el("a", { href: gwPath(gw, "/logs/" + encodeURIComponent(r.id)) }, new Date(r.created_at_ms).toLocaleTimeString("en-GB", { hour12: false }))),
      el("td", {}, r.status), el("td", {}, r.cache_status), el("td", {}, r.provider), el("td", {}, r.requested_model || "–"),
      el("td", { class: "num" }, fmtInt((r.tokens_in || 0) + (r.tokens_out || 0))), el("td", { class: "num" }, fmtUsd(r.cost_usd)),
      el("td", { class: "num" }, fmtMs(r.duration_ms)), el("td", {}, r.error || ""));
    const show = (records) => {
      for (const r of records) tbody.prepend(row(r));
      while (tbody.children.length > MAX_ROWS) tbody.lastChild.remove();
    };
    const connect = async () => {
      if (controller) controller.abort();
      controller = new AbortController();
      const q = new URLSearchParams({ gateway: gw });
      if (errorsOnly.checked) q.set("errors", "true");
      try {
        const resp = await fetch("/dashboard/api/tail?" + q.toString(), { signal: controller.signal, credentials: "same-origin" });
        if (resp.status === 401) { location.href = "/dashboard/login?next=" + encodeURIComponent(location.pathname); return; }
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        status.textContent = "Live: new requests appear at the top" + (errorsOnly.checked ? " (errors only)." : ".");
        const reader = resp.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            const line = buf.slice(0, i).trim();
            buf = buf.slice(i + 1);
            if (!line) continue;
            const rec = JSON.parse(line);
            if (rec.lagged) { status.textContent = `Skipped ${rec.lagged} records (the page fell behind).`; continue; }
            if (paused) { held.push(rec); if (held.length > MAX_ROWS) held.shift(); status.textContent = `Paused: ${held.length} new records held.`; }
            else show([rec]);
          }
        }
        status.textContent = "The server ended the tail; reload to reconnect.";
      } catch (e) {
        if (e.name !== "AbortError") status.textContent = "Tail disconnected: " + e.message;
      }
    };
    pause.addEventListener("click", () => {
      paused = !paused;
      pause.textContent = paused ? "Resume" : "Pause";
      pause.setAttribute("aria-pressed", String(paused));
      if (!paused) { show(held); held = []; status.textContent = "Live: new requests appear at the top."; }
      else status.textContent = "Paused.";
    });
    errorsOnly.addEventListener("change", () => { tbody.replaceChildren(); held = []; connect(); });
    setMain(el("h1", {}, "Live tail"),
      el("div", { class: "controls" }, pause, el("label", { class: "check" }, errorsOnly, " Errors only")), status,
      el("div", { class: "table-wrap" }, el("table", { class: "logs", id: "tail" },
        el("thead", {}, el("tr", {}, ["Time", "Status", "Cache", "Provider", "Model", "Tokens", "Cost", "Duration", "Error"].map((h) => el("th", { scope: "col" }, h)))), tbody)));
    connect();
  }

  // ---- report --------------------------------------------------------------------------------

  async function report() {
    const since = ["24h", "7d", "30d"].includes(params().get("since")) ? params().get("since") : "7d";
    const links = el("nav", { class: "ranges", "aria-label": "Report period" }, ["24h", "7d", "30d"].map((s) =>
      el("a", { href: "?since=" + s, "aria-current": s === since ? "true" : null }, "last " + s)));
    setMain(el("h1", {}, "Rollout report"), links, el("p", { class: "muted", role: "status" }, "Loading…"));
    let r;
    try { r = await api(gwApi(gw, "/report") + "?since=" + since); } catch (e) { fill(errorBox(e)); return; }
    const go = r.verdict === "go";
    const names = { hit_rate: "Cache hit rate", error_rate: "Error rate", p95_ms: "p95 latency", requests: "Requests" };
    const fmtCheck = (name, v) => (v === null || v === undefined ? "–" : name.endsWith("rate") ? fmtPct(v) : name === "p95_ms" ? fmtMs(v) : fmtInt(v));
    const checks = r.checks.length
      ? table(["Check", "Measured", "Threshold", "Result"], r.checks.map((c) => el("tr", {},
        el("th", { scope: "row" }, names[c.name] || c.name), el("td", {}, fmtCheck(c.name, c.value)),
        el("td", {}, c.op + " " + fmtCheck(c.name, c.threshold)), el("td", { class: c.ok ? "better" : "worse" }, c.ok ? "pass" : "fail"))), { class: "numeric" })
      : el("p", { class: "muted" }, "No thresholds are set: add a [gateways." + gw + ".report] section (min_hit_rate, max_error_rate, max_p95_ms, min_requests).");
    const shadow = r.shadow ? el("section", { class: "card" }, el("h2", {}, "Shadow mode: what the cache would have done"), el("dl", { class: "stats" },
      stat("Would-be hits", fmtInt(r.shadow.would_be_hits)), stat("Would-be hit rate", fmtPct(r.shadow.would_be_hit_rate)),
      stat("Would-be savings", fmtUsd(r.shadow.would_be_saved_usd), fmtPct(r.shadow.would_be_saved_pct)))) : null;
    fill(
      el("p", { class: "muted" }, `${fmtTime(r.from_ms)} to ${fmtTime(r.to_ms)}, cache mode ${r.cache_mode}.`),
      el("div", { class: "verdict " + (go ? "go" : "no-go"), id: "verdict", role: "status" }, go ? "GO" : "NO-GO"),
      el("section", { class: "card" }, el("h2", {}, "Checks"), checks),
      el("section", { class: "card" }, el("h2", {}, "Figures"), el("dl", { class: "stats" },
        stat("Requests", fmtInt(r.requests)), stat("Cache hits", fmtInt(r.cache_hits), fmtPct(r.hit_rate)),
        stat("Upstream calls", fmtInt(r.upstream_calls)), stat("Errors", fmtInt(r.errors), fmtPct(r.error_rate)),
        stat("p50 / p95", fmtMs(r.p50_ms) + " / " + fmtMs(r.p95_ms)), stat("Cost", fmtUsd(r.cost_usd)),
        stat("Saved", fmtUsd(r.saved_usd), fmtPct(r.saved_pct)), stat("Without the gateway", fmtUsd(r.cost_without_gateway_usd)))),
      shadow, await compareSection(since));
  }

  // A canary (or any other gateway) against this one over the same window: `aigate report --compare`.
  async function compareSection(since) {
    const section = el("section", { class: "card", "aria-labelledby": "canary-h" });
    let names = [];
    try { names = (await api("/overview?range=24h")).gateways.map((g) => g.name).filter((n) => n !== gw); } catch (e) { /* the form stays empty */ }
    const chosen = params().get("compare");
    const select = el("select", { id: "compare-with", name: "compare" }, names.map((n) => el("option", { value: n, selected: n === chosen ? "" : null }, n)));
    section.append(el("h2", { id: "canary-h" }, "Compare with another gateway"),
      el("p", { class: "muted" }, "A canary against this gateway over the same period: go when its error rate and p95 stay within the margins."),
      el("form", { class: "controls", method: "get" }, el("input", { type: "hidden", name: "since", value: since }),
        el("label", { for: "compare-with" }, "Candidate"), select, el("button", { type: "submit" }, "Compare")));
    if (!chosen) return section;
    let c;
    try { c = await api(gwApi(gw, "/report") + `?since=${since}&compare=${encodeURIComponent(chosen)}`); } catch (e) { section.append(errorBox(e)); return section; }
    const labels = { requests: ["Requests", fmtInt], p50_ms: ["p50 latency", fmtMs], p95_ms: ["p95 latency", fmtMs], p99_ms: ["p99 latency", fmtMs],
      error_rate: ["Error rate", fmtPct], hit_rate: ["Cache hit rate", fmtPct], upstream_calls: ["Upstream calls", fmtInt], cost_usd: ["Cost", fmtUsd], saved_usd: ["Saved", fmtUsd] };
    const rows = c.changes.map((x) => {
      const [label, fmt] = labels[x.metric] || [x.metric, String];
      // Rates change in points, as the CLI prints them; the rest in per cent.
      const sign = (v) => (v >= 0 ? "+" : "");
      const change = x.metric.endsWith("_rate")
        ? (x.difference === null || x.difference === undefined ? "–" : sign(x.difference) + (x.difference * 100).toFixed(1) + " pt")
        : (x.change_pct === null || x.change_pct === undefined ? "–" : sign(x.change_pct) + x.change_pct.toFixed(1) + " %");
      return el("tr", {}, el("th", { scope: "row" }, label), el("td", {}, fmt(x.baseline)), el("td", {}, fmt(x.candidate)), el("td", {}, change));
    });
    const go = c.verdict === "go";
    section.append(
      el("div", { class: "verdict " + (go ? "go" : "no-go"), id: "compare-verdict", role: "status" }, (go ? "GO" : "NO-GO") + " for " + chosen),
      table(["Measure", gw, chosen, "Change"], rows, { class: "numeric compare-gateways" }),
      el("ul", { class: "checks" }, c.checks.map((k) => el("li", { class: k.ok ? "better" : "worse" }, (k.ok ? "ok: " : "fail: ") + k.message))));
    return section;
  }

  // ---- settings ------------------------------------------------------------------------------

  async function settings() {
    setMain(el("h1", {}, "Settings"), el("p", { class: "muted", role: "status" }, "Loading…"));
    let s;
    try { s = await api(gwApi(gw, "/settings")); } catch (e) { fill(errorBox(e)); return; }
    renderSettings(s, []);
  }

  function renderSettings(s, warnings, message) {
    const ro = !s.editable;
    const mode = el("select", { id: "cache-mode", name: "cache_mode", disabled: ro },
      [["on", "on: serve hits"], ["shadow", "shadow: count would-be hits, answer from upstream"], ["off", "off"]].map(([v, l]) => el("option", { value: v }, l)));
    mode.value = s.cache_mode;
    const ttl = el("input", { id: "cache-ttl", name: "cache_ttl", type: "text", value: s.cache_ttl, disabled: ro });
    const logsOn = el("input", { id: "logs-enabled", type: "checkbox", checked: s.logs_enabled, disabled: ro });
    const bodies = el("input", { id: "log-bodies", type: "checkbox", checked: s.log_bodies, disabled: ro });
    const rl = s.rate_limit;
    const rlOn = el("input", { id: "rl-on", type: "checkbox", checked: !!rl, disabled: ro });
    const rlLimit = el("input", { id: "rl-limit", type: "text", inputmode: "numeric", value: rl ? rl.limit : "100", disabled: ro });
    const rlPeriod = el("input", { id: "rl-period", type: "text", value: rl ? rl.period : "1m", disabled: ro });
    const rlTech = el("select", { id: "rl-technique", disabled: ro }, el("option", { value: "sliding" }, "sliding"), el("option", { value: "fixed" }, "fixed"));
    rlTech.value = rl ? rl.technique : "sliding";
    const status = el("div", { role: "status", id: "settings-status" },
      message ? el("p", { class: "ok" }, message) : null, warnings.map((w) => el("p", { class: "warning" }, w)));
    const field = (id, label, input, hint) => el("div", { class: "field" }, el("label", { for: id }, label), input, hint ? el("small", { class: "muted" }, hint) : null);
    const check = (input, label) => el("label", { class: "check" }, input, " " + label);
    const form = el("form", { class: "card settings", id: "settings-form" },
      ro ? el("p", { class: "warning", id: "read-only" }, "Read-only: " + s.read_only_reason) : null,
      el("fieldset", {}, el("legend", {}, "Cache"), field("cache-mode", "Cache mode", mode), field("cache-ttl", "TTL", ttl, "60s to 30d, e.g. 1h")),
      el("fieldset", {}, el("legend", {}, "Logs"), check(logsOn, "Log every request"), check(bodies, "Keep request and response bodies")),
      el("fieldset", {}, el("legend", {}, "Rate limit"), check(rlOn, "Limit requests"),
        field("rl-limit", "Requests", rlLimit), field("rl-period", "Per", rlPeriod, "e.g. 60s, 1h"), field("rl-technique", "Technique", rlTech)),
      el("div", { class: "actions" }, el("button", { type: "submit", disabled: ro }, "Save")),
      s.config_path ? el("p", { class: "muted" }, "Saved to ", el("code", {}, s.config_path), ", keeping its comments, and applied at once.") : null,
      status);
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const wanted = {
        cache_mode: mode.value, cache_ttl: ttl.value.trim(), logs_enabled: logsOn.checked, log_bodies: bodies.checked,
        rate_limit: rlOn.checked ? { limit: Number(rlLimit.value), period: rlPeriod.value.trim(), technique: rlTech.value } : null,
      };
      if (wanted.rate_limit && !(Number.isInteger(wanted.rate_limit.limit) && wanted.rate_limit.limit > 0)) {
        status.replaceChildren(errorBox(new Error("Requests must be a whole number above zero."))); return;
      }
      try {
        const r = await api(gwApi(gw, "/settings"), { method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify(wanted) });
        renderSettings(r.settings, r.warnings, "Saved and applied.");
      } catch (e) { status.replaceChildren(errorBox(e)); }
    });
    const purgeDialog = el("dialog", { "aria-labelledby": "purge-h" });
    const purgeResult = el("p", { role: "status" });
    const purgeConfirm = el("button", { type: "button", class: "danger", id: "confirm-purge" }, "Purge");
    purgeDialog.append(el("h2", { id: "purge-h" }, "Purge the cache"),
      el("p", {}, `Remove every cached answer of ${gw}? The next identical requests go to the provider.`), purgeResult,
      el("div", { class: "actions" }, el("button", { type: "button", class: "secondary", onclick: () => purgeDialog.close() }, "Cancel"), purgeConfirm));
    purgeConfirm.addEventListener("click", async () => {
      try {
        const r = await api(gwApi(gw, "/cache"), { method: "DELETE" });
        purgeResult.textContent = `Purged ${fmtInt(r.purged)} entries.`;
        purgeConfirm.disabled = true;
      } catch (e) { purgeResult.replaceChildren(errorBox(e)); }
    });
    const audit = s.audit.length
      ? table(["Time", "Change", "From", "To", "By"], s.audit.map((a) => el("tr", {},
        el("td", {}, fmtTime(a.at_ms)), el("td", {}, a.action), el("td", {}, a.from === undefined ? "" : a.from), el("td", {}, a.to), el("td", {}, a.by))), { class: "audit" })
      : el("p", { class: "muted" }, "No changes made from the dashboard yet.");
    setMain(el("h1", {}, "Settings"), form,
      el("section", { class: "card" }, el("h2", {}, "Cache"), el("p", {}, "Empty this gateway's cache, on every replica that shares its store."),
        el("button", { type: "button", class: "danger", id: "purge", onclick: () => { purgeResult.textContent = ""; purgeConfirm.disabled = false; purgeDialog.showModal(); } }, "Purge cache…")),
      el("section", { class: "card" }, el("h2", {}, "Audit log"), audit), purgeDialog);
  }

  // ---- start ---------------------------------------------------------------------------------

  const select = document.getElementById("gateway-select");
  if (select) {
    select.addEventListener("change", () => {
      const suffix = { logs: "/logs", log: "/logs", tail: "/tail", report: "/report", settings: "/settings" }[page] || "";
      location.href = gwPath(select.value, suffix);
    });
  }
  const pages = { overview, gateway, logs, log: logRecord, tail, report, settings };
  if (pages[page]) {
    Promise.resolve(pages[page]()).catch((e) => setMain(errorBox(e)));
  }
})();
