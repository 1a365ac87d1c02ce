// The latency-budget dashboard: reads /api/latency (pushed over /api/events, polled when the stream
// fails) and draws plain SVG. Every piece of text goes in through textContent or an SVG attribute,
// never as HTML, so nothing the server sends (engine names, error messages) can become markup.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const TOP = ["asr", "qa", "response"];
  const COLORS = { asr: "var(--asr)", qa: "var(--qa)", response: "var(--response)", other: "var(--other)" };
  const QA_PARTS = ["qa.queue", "qa.tokenize", "qa.infer", "qa.decode", "qa.network"];
  const QA_UNSPLIT = "qa.unsplit"; // a QA call without server timings: it failed or ran out of time
  const QA_COLORS = {
    "qa.queue": "#f778ba", "qa.tokenize": "#ffa657", "qa.infer": "#bc8cff", "qa.decode": "#56d4dd", "qa.network": "#6e7681",
    "qa.unsplit": "rgba(248, 81, 73, 0.55)",
  };
  const STATUS_TEXT = {
    ok: "Within budget", warn: "Close to budget", over: "Over budget", idle: "Waiting for turns",
  };
  const POLL_MS = 1000;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function ms(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (value < 1) return value.toFixed(2) + " ms";
    if (value < 10) return value.toFixed(2) + " ms";
    if (value < 100) return value.toFixed(1) + " ms";
    return value.toFixed(0) + " ms";
  }

  function pct(rate) {
    if (rate === null || rate === undefined) return "–";
    const value = rate * 100;
    return (value > 0 && value < 1 ? value.toFixed(1) : value.toFixed(0)) + " %";
  }

  function statusOf(value, budget) {
    if (value === null || budget === null || budget === undefined) return "none";
    if (value > budget) return "over";
    if (value >= 0.8 * budget) return "warn";
    return "ok";
  }

  function setKpi(id, status) {
    const node = $(id);
    node.classList.remove("ok", "warn", "over");
    if (status === "ok" || status === "warn" || status === "over") node.classList.add(status);
  }

  // -- header and key figures ----------------------------------------------------------------------

  function renderHeader(snap) {
    const verdict = $("verdict");
    verdict.className = "verdict " + snap.status;
    $("verdict-text").textContent = STATUS_TEXT[snap.status] || snap.status;

    const turn = snap.turn;
    const qa = snap.stages.find((row) => row.name === "qa");
    $("turn-p95").textContent = ms(turn.p95_ms);
    $("turn-budget").textContent = "budget " + ms(turn.budget_ms) + " · p99 " + ms(turn.p99_ms);
    setKpi("kpi-turn", turn.status);
    if (qa) {
      $("qa-p95").textContent = ms(qa.p95_ms);
      $("qa-budget").textContent = "budget " + ms(qa.budget_ms) + " · p99 " + ms(qa.p99_ms);
      $("qa-line").textContent = ms(qa.budget_ms);
      setKpi("kpi-qa", qa.status);
    }
    $("over-rate").textContent = pct(snap.over_budget_rate);
    $("over-count").textContent = snap.window_turns
      ? Math.round((snap.over_budget_rate || 0) * snap.window_turns) + " of the last " + snap.window_turns + " turns"
      : "no turns yet";
    const rate = snap.over_budget_rate;
    setKpi("kpi-over", rate === null ? "none" : rate > 0.05 ? "over" : rate > 0.01 ? "warn" : "ok");
    $("turns-per-s").textContent = snap.turns_per_s.toFixed(snap.turns_per_s < 10 ? 1 : 0);
    $("turns-total").textContent = String(snap.turns.total);
    $("errors").textContent = snap.turns.error + (snap.turns.error === 1 ? " error" : " errors");
    setKpi("kpi-turns", (snap.error_rate || 0) > 0.05 ? "over" : snap.turns.error > 0 ? "warn" : "none");
  }

  // -- stage table ---------------------------------------------------------------------------------

  function bullet(row, scale) {
    const width = 400;
    const x = (value) => Math.max(0, Math.min(width, (value / scale) * width));
    const node = svg("svg", { viewBox: "0 0 " + width + " 18", preserveAspectRatio: "none" });
    node.appendChild(svg("rect", { x: 0, y: 7, width: width, height: 4, rx: 2, fill: "var(--grid)" }));
    if (row.p50_ms !== null) {
      const color = row.status === "none" ? (COLORS[row.parent || row.name] || "var(--other)") : "var(--" + row.status + ")";
      node.appendChild(svg("rect", { x: 0, y: 4, width: x(row.p50_ms), height: 10, rx: 2, fill: color, opacity: 0.95 }));
      node.appendChild(svg("rect", {
        x: x(row.p50_ms), y: 4, width: Math.max(0, x(row.p95_ms) - x(row.p50_ms)), height: 10, fill: color, opacity: 0.45,
      }));
      node.appendChild(svg("rect", { x: Math.min(width - 2, x(row.p99_ms)), y: 2, width: 2, height: 14, fill: color }));
    }
    if (row.budget_ms !== null) {
      node.appendChild(svg("line", { x1: x(row.budget_ms), x2: x(row.budget_ms), y1: 0, y2: 18, stroke: "var(--text)", "stroke-width": 2, "stroke-dasharray": "3 2" }));
    }
    return node;
  }

  function renderStages(snap) {
    const body = $("stage-rows");
    const rows = [...snap.stages];
    const budgets = snap.budgets_ms;
    const fragment = document.createDocumentFragment();
    for (const row of rows) {
      const top = row.parent === null;
      const kind = row.name === "turn" ? "turn" : top ? "top" : "child";
      if (!top && row.window === 0) continue; // nested rows appear once the chain reports them
      const tr = el("tr", { class: kind, id: "stage-" + row.name.replace(/\./g, "-"), title: row.description });
      const name = el("td", { class: "name" });
      if (top && row.name !== "turn") {
        const chip = el("span", { class: "chip" });
        chip.style.background = COLORS[row.name] || "var(--other)";
        name.appendChild(chip);
      }
      name.appendChild(document.createTextNode(top ? row.name : row.name.split(".").slice(1).join(".")));
      tr.appendChild(name);
      tr.appendChild(el("td", { class: "num" }, row.budget_ms === null ? "" : ms(row.budget_ms)));
      tr.appendChild(el("td", { class: "num p50 " + statusOf(row.p50_ms, row.budget_ms) }, ms(row.p50_ms)));
      tr.appendChild(el("td", { class: "num p95 " + row.status }, ms(row.p95_ms)));
      tr.appendChild(el("td", { class: "num p99 " + statusOf(row.p99_ms, row.budget_ms) }, ms(row.p99_ms)));
      const overClass = row.over_budget_rate === null ? "" : row.over_budget_rate > 0.05 ? "over" : row.over_budget_rate > 0.01 ? "warn" : "ok";
      tr.appendChild(el("td", { class: "num " + overClass }, row.over_budget_rate === null ? "" : pct(row.over_budget_rate)));
      const parentBudget = row.parent ? budgets[row.parent] : null;
      const reference = row.budget_ms !== null ? row.budget_ms : parentBudget || row.p99_ms || 1;
      const scale = Math.max(reference * 1.6, row.p99_ms || 0) || 1;
      const bar = el("td", { class: "bar" });
      bar.appendChild(bullet(row, scale));
      tr.appendChild(bar);
      fragment.appendChild(tr);
    }
    body.replaceChildren(fragment);
  }

  // -- timelines -----------------------------------------------------------------------------------

  function legend(id, items) {
    const node = $(id);
    node.replaceChildren(...items.map(([label, color, cls]) => {
      const span = el("span");
      const sw = el("i", { class: "sw" + (cls ? " " + cls : "") });
      if (color) sw.style.background = color;
      span.appendChild(sw);
      span.appendChild(document.createTextNode(label));
      return span;
    }));
  }

  function niceMax(value) {
    const exp = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10]) if (step * exp >= value) return step * exp;
    return 10 * exp;
  }

  function stackedChart(container, turns, parts, colorOf, lines, height) {
    const width = Math.max(320, container.clientWidth || 800);
    const pad = { left: 56, right: 96, top: 12, bottom: 24 };
    const node = svg("svg", { viewBox: "0 0 " + width + " " + height, height: height });
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    if (!turns.length) {
      node.appendChild(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "no turns yet"));
      container.replaceChildren(node);
      return;
    }
    const totals = turns.map((turn) => turn.value);
    const top = niceMax(Math.max(...totals, ...lines.map((line) => line.value * 1.15)));
    const y = (value) => pad.top + plotH - (Math.min(value, top) / top) * plotH;
    for (let i = 0; i <= 4; i++) {
      const value = (top * i) / 4;
      node.appendChild(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value), class: "axis" }));
      node.appendChild(svg("text", { x: pad.left - 8, y: y(value) + 4, "text-anchor": "end" }, i === 0 ? "0" : ms(value)));
    }
    const slots = Math.max(turns.length, 30);
    const slot = plotW / slots;
    const barW = Math.max(2, slot * 0.72);
    turns.forEach((turn, index) => {
      const x = pad.left + (slots - turns.length + index) * slot + (slot - barW) / 2;
      let base = 0;
      const group = svg("g");
      const title = svg("title", {}, turn.title);
      group.appendChild(title);
      for (const part of parts) {
        const value = turn.parts[part] || 0;
        if (value <= 0) continue;
        const y0 = y(base), y1 = y(base + value);
        group.appendChild(svg("rect", { x: x, y: y1, width: barW, height: Math.max(0.5, y0 - y1), fill: colorOf(part) }));
        base += value;
      }
      if (turn.flag) {
        group.appendChild(svg("rect", { x: x, y: pad.top + plotH + 3, width: barW, height: 3, fill: turn.flag === "error" ? "var(--over)" : "var(--warn)" }));
      }
      node.appendChild(group);
    });
    if (turns.length) {
      const first = turns[0].label, last = turns[turns.length - 1].label;
      node.appendChild(svg("text", { x: width - pad.right, y: height - 4, "text-anchor": "end" }, "turn " + last + " (latest)"));
      if (turns.length > 1) {
        node.appendChild(svg("text", { x: pad.left + (slots - turns.length) * slot, y: height - 4, "text-anchor": "start" }, "turn " + first));
      }
    }
    for (const line of lines) {
      if (line.value > top) continue;
      node.appendChild(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(line.value), y2: y(line.value), class: line.cls }));
      node.appendChild(svg("text", { x: width - pad.right + 6, y: y(line.value) + 4, style: "fill: " + line.color }, line.label));
    }
    container.replaceChildren(node);
  }

  function stageMap(turn) {
    const map = {};
    for (const stage of turn.stages) map[stage.name] = stage.duration_ms;
    return map;
  }

  function renderTimelines(snap) {
    const turnBudget = snap.budgets_ms.turn;
    const qaBudget = snap.budgets_ms.qa;
    const turns = snap.recent.map((turn) => {
      const map = stageMap(turn);
      const parts = {};
      for (const name of TOP) parts[name] = map[name] || 0;
      parts.other = turn.unattributed_ms;
      const title = "turn " + turn.turn + ": " + ms(turn.total_ms) + " (" + TOP.map((n) => n + " " + ms(map[n])).join(", ") +
        ", hand-offs " + ms(turn.unattributed_ms) + ")" + (turn.error ? " — error: " + turn.error : "");
      return { value: turn.total_ms, parts, label: turn.turn, title, flag: turn.outcome === "within_budget" ? null : turn.outcome === "error" ? "error" : "over" };
    });
    stackedChart($("timeline"), turns, [...TOP, "other"], (part) => COLORS[part], [
      { value: turnBudget, label: "turn " + ms(turnBudget), cls: "budget-line", color: "var(--over)" },
      { value: qaBudget, label: "QA " + ms(qaBudget), cls: "qa-line", color: "var(--qa)" },
    ], 220);
    legend("timeline-legend", [
      ["asr", COLORS.asr], ["qa", COLORS.qa], ["response", COLORS.response], ["hand-offs", COLORS.other],
      ["over budget", "var(--warn)"], ["error", "var(--over)"],
    ]);

    const qaTurns = snap.recent.filter((turn) => turn.stages.some((s) => s.name === "qa")).map((turn) => {
      const map = stageMap(turn);
      const parts = {};
      let children = 0;
      for (const name of QA_PARTS) { parts[name] = map[name] || 0; children += parts[name]; }
      if (children === 0) parts[QA_UNSPLIT] = map.qa || 0;
      const over = (map.qa || 0) > qaBudget;
      const failed = turn.error ? " — error: " + turn.error : "";
      const title = "turn " + turn.turn + ": qa " + ms(map.qa) + " (" + QA_PARTS.map((n) => n.slice(3) + " " + ms(map[n])).join(", ") + ")" + failed;
      return { value: map.qa || 0, parts, label: turn.turn, title, flag: turn.error ? "error" : over ? "over" : null };
    });
    stackedChart($("qa-timeline"), qaTurns, [...QA_PARTS, QA_UNSPLIT], (part) => QA_COLORS[part], [
      { value: qaBudget, label: "budget " + ms(qaBudget), cls: "budget-line", color: "var(--over)" },
    ], 200);
    const qaLegend = QA_PARTS.map((name) => [name.slice(3), QA_COLORS[name]]);
    if (qaTurns.some((turn) => turn.parts[QA_UNSPLIT])) qaLegend.push(["failed (no server timings)", QA_COLORS[QA_UNSPLIT]]);
    legend("qa-legend", qaLegend);
  }

  // -- info ----------------------------------------------------------------------------------------

  function renderInfo(snap) {
    const list = $("info");
    const entries = Object.entries(snap.info);
    if (!entries.length) entries.push(["engine", "not reported"]);
    list.replaceChildren(...entries.flatMap(([key, value]) => [el("dt", {}, key.replace(/_/g, " ")), el("dd", {}, value)]));
    $("foot").textContent = "window: last " + snap.window_turns + " turns · uptime " + Math.round(snap.uptime_s) +
      " s · percentiles exact over the window; /metrics has the same observations as histograms";
  }

  // -- updates -------------------------------------------------------------------------------------

  let last = null;
  function render(snap) {
    last = snap;
    renderHeader(snap);
    renderStages(snap);
    renderTimelines(snap);
    renderInfo(snap);
    document.body.dataset.version = String(snap.version);
  }

  function connection(state, text) {
    $("conn-dot").className = "dot " + state;
    $("conn-text").textContent = text;
  }

  let pollTimer = null;
  async function poll() {
    try {
      const response = await fetch("/api/latency", { cache: "no-store" });
      if (!response.ok) throw new Error(String(response.status));
      render(await response.json());
      if (pollTimer !== null) connection("polling", "polling");
    } catch (err) {
      connection("down", "disconnected");
    }
  }

  function startPolling() {
    if (pollTimer === null) pollTimer = setInterval(poll, POLL_MS);
  }

  function stopPolling() {
    if (pollTimer !== null) { clearInterval(pollTimer); pollTimer = null; }
  }

  function connect() {
    if (!window.EventSource) { startPolling(); return; }
    const source = new EventSource("/api/events");
    source.addEventListener("open", () => { stopPolling(); connection("live", "live"); });
    source.addEventListener("latency", (event) => {
      stopPolling();
      connection("live", "live");
      render(JSON.parse(event.data));
    });
    source.addEventListener("error", () => {
      // EventSource reconnects by itself; poll meanwhile so the page keeps moving.
      connection("polling", "reconnecting · polling");
      startPolling();
    });
  }

  window.addEventListener("resize", () => { if (last) renderTimelines(last); });
  poll();
  connect();
})();
