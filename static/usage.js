// The usage page: asks for a proxy key, reads /api/usage (and /api/class for
// a teacher key) and draws the figures. No library, nothing from elsewhere.
"use strict";

const STORAGE_KEY = "proxy-usage-key";
const ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
const numbers = new Intl.NumberFormat();
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const formatNumber = (value) => (value == null ? "–" : numbers.format(value));
// Chart axis labels have little room: "25M" rather than "25,000,154".
const compactNumbers = new Intl.NumberFormat(undefined, { notation: "compact" });
const formatCompact = (value) => compactNumbers.format(value);
const TIME_FORMAT = { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" };
const formatTime = (text) => (text ? new Date(text).toLocaleString([], TIME_FORMAT) : "never");

function parseDay(text) {
  const [year, month, day] = text.split("-").map(Number);
  return new Date(year, month - 1, day);
}

const formatDay = (text) =>
  parseDay(text).toLocaleDateString([], { month: "short", day: "numeric" });

async function fetchJson(path, key) {
  const separator = path.includes("?") ? "&" : "?";
  const response = await fetch(`${path}${separator}tz=${encodeURIComponent(ZONE)}`, {
    headers: { Authorization: `Bearer ${key}` },
    cache: "no-store",
  });
  if (!response.ok) {
    throw new Error(await readError(response));
  }
  return response;
}

async function readError(response) {
  if (response.status === 401) {
    return "That key is not valid for this proxy. Check it for typos, or ask your teacher for your key.";
  }
  try {
    const body = await response.json();
    return body.error.message;
  } catch {
    return `The proxy answered ${response.status}. Try again in a moment.`;
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function showUsage(key) {
  showError("");
  const mine = await (await fetchJson("/api/usage", key)).json();
  const isTeacher = mine.role === "admin";
  const classReport = isTeacher ? await (await fetchJson("/api/class", key)).json() : null;

  $("key-form").hidden = true;
  $("sign-out").hidden = false;
  $("who").hidden = false;
  $("who").textContent = isTeacher
    ? `${mine.name} · teacher view of the whole class`
    : `${mine.name} · ${mine.email}`;
  document.querySelector("h1").textContent = isTeacher ? "Class usage" : "Your OpenAI usage";
  if (isTeacher) {
    renderClass(classReport, key);
  } else {
    renderStudent(mine);
  }
}

function renderStudent(report) {
  for (const cell of document.querySelectorAll("[data-period]")) {
    cell.textContent = formatNumber(report.periods[cell.dataset.period][cell.dataset.figure]);
  }
  $("disabled-note").hidden = !report.disabled;
  $("expired-note").hidden = !report.expired;
  $("expired-day").textContent = report.expires ?? "";
  renderBudget(report.budget);
  fillTable($("student-models"), MODEL_COLUMNS, report.models, "No requests yet.");
  fillTable($("recent"), RECENT_COLUMNS, report.recent, "No requests yet.");
  // Shown before drawing: a hidden box has no width to draw the chart at.
  $("student-view").hidden = false;
  drawChart($("student-chart"), report.days);
}

function renderBudget(budget) {
  let shown = false;
  for (const [name, part] of Object.entries(budget)) {
    const card = $(`budget-${name}`);
    if (!card) continue;
    card.hidden = part.limit == null;
    if (part.limit == null) continue;
    shown = true;
    const share = part.limit > 0 ? part.remaining / part.limit : 0;
    card.classList.toggle("low", share < 0.1);
    card.querySelector(".big").textContent = formatNumber(part.remaining);
    card.querySelector(".meter span").style.width = `${Math.round(share * 100)}%`;
    const resets = part.resets_at ? ` · resets ${formatTime(part.resets_at)}` : "";
    card.querySelector(".small").textContent =
      `of ${formatNumber(part.limit)} tokens${resets}`;
  }
  $("budget").hidden = !shown;
}

const MODEL_COLUMNS = [
  { name: "model", title: "Model" },
  { name: "requests", title: "Requests", number: true },
  { name: "prompt_tokens", title: "Prompt", number: true },
  { name: "completion_tokens", title: "Completion", number: true },
  { name: "total_tokens", title: "Tokens", number: true },
];

const RECENT_COLUMNS = [
  { name: "date", title: "Time", show: formatTime },
  { name: "endpoint", title: "Endpoint", show: (value) => value.replace(/^\/v1\//, "") },
  { name: "model", title: "Model", show: (value) => value ?? "–" },
  { name: "total_tokens", title: "Tokens", number: true },
  { name: "status", title: "Status", number: true, bad: (row) => row.status >= 400 },
];

const budgetLeft = (row) => {
  // No budget for people whose key is no longer in keys.json.
  if (!row.budget) return null;
  const left = [row.budget.daily.remaining, row.budget.total.remaining].filter((v) => v != null);
  return left.length ? Math.min(...left) : null;
};

const CLASS_COLUMNS = [
  { name: "name", title: "Name" },
  { name: "email", title: "E-mail" },
  { name: "requests", title: "Requests", number: true },
  { name: "tokens_today", title: "Tokens today", number: true },
  { name: "total_tokens", title: "Tokens in total", number: true },
  {
    name: "budget_left",
    title: "Budget left",
    number: true,
    value: budgetLeft,
    show: (value) => (value == null ? "no limit" : formatNumber(value)),
  },
  { name: "last_seen", title: "Last seen", show: formatTime },
];

function fillTable(table, columns, rows, emptyText) {
  table.replaceChildren();
  const head = table.createTHead().insertRow();
  for (const column of columns) {
    const th = document.createElement("th");
    th.textContent = column.title;
    th.dataset.column = column.name;
    if (column.number) th.className = "num";
    head.append(th);
  }
  const body = table.createTBody();
  if (!rows.length) {
    const cell = body.insertRow().insertCell();
    cell.colSpan = columns.length;
    cell.className = "empty";
    cell.textContent = emptyText;
    return;
  }
  for (const row of rows) {
    const line = body.insertRow();
    for (const column of columns) {
      const value = column.value ? column.value(row) : row[column.name];
      const cell = line.insertCell();
      cell.textContent = column.show ? column.show(value) : column.number ? formatNumber(value) : value;
      cell.dataset.column = column.name;
      if (column.number) cell.classList.add("num");
      if (column.bad && column.bad(row)) cell.classList.add("bad");
    }
  }
}

function renderClass(report, key) {
  const rows = report.students;
  $("class-students").textContent = formatNumber(rows.length);
  $("class-requests").textContent = formatNumber(report.totals.requests);
  $("class-tokens").textContent = formatNumber(report.totals.total_tokens);
  makeSortable($("class-table"), CLASS_COLUMNS, rows, "total_tokens");
  fillTable($("class-models"), MODEL_COLUMNS, report.models, "No requests yet.");
  $("download-csv").onclick = () => downloadCsv(key);
  $("class-view").hidden = false;
  drawChart($("class-chart"), report.days);
}

function makeSortable(table, columns, rows, firstColumn) {
  let sortBy = firstColumn;
  let descending = true;
  const valueOf = (row, name) => {
    const column = columns.find((c) => c.name === name);
    return column.value ? column.value(row) : row[name];
  };
  const draw = () => {
    // A stable sort: ties keep the proxy's order, as in the CSV download.
    const direction = descending ? -1 : 1;
    const sorted = [...rows].sort(
      (a, b) => direction * compare(valueOf(a, sortBy), valueOf(b, sortBy)),
    );
    fillTable(table, columns, sorted, "No students in keys.json yet.");
    for (const th of table.tHead.rows[0].cells) {
      const title = th.textContent;
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = title;
      button.onclick = () => {
        descending = th.dataset.column === sortBy ? !descending : th.classList.contains("num");
        sortBy = th.dataset.column;
        draw();
      };
      th.replaceChildren(button);
      if (th.dataset.column === sortBy) {
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
      }
    }
  };
  draw();
}

function compare(a, b) {
  // Empty values (no limit, never seen) sort below every real one.
  if (a == null || b == null) return (a == null ? -1 : 0) + (b == null ? 1 : 0);
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b));
}

async function downloadCsv(key) {
  try {
    const blob = await (await fetchJson("/api/class.csv", key)).blob();
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `class-usage-${new Date().toISOString().slice(0, 10)}.csv`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  } catch (error) {
    alert(error.message);
  }
}

function drawChart(box, days) {
  // Drawn at the box's own width so labels keep their size on a phone.
  const width = Math.max(box.clientWidth, 280);
  const height = width < 500 ? 180 : 220;
  const left = 56;
  const bottom = 24;
  const top = 12;
  const most = Math.max(1, ...days.map((day) => day.total_tokens));
  const step = (width - left) / days.length;
  const scale = (height - top - bottom) / most;
  const svg = svgElement("svg", {
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-label": "Tokens per day",
  });
  svg.append(svgElement("line", { class: "axis", x1: left, x2: width, y1: top, y2: top }));
  svg.append(svgLabel(formatCompact(most), left - 6, top + 4, "end"));
  svg.append(svgLabel("0", left - 6, height - bottom, "end"));
  days.forEach((day, index) => {
    const barHeight = Math.max(day.total_tokens * scale, 1);
    const bar = svgElement("rect", {
      class: day.total_tokens ? "bar" : "bar zero",
      x: left + index * step + 1,
      y: height - bottom - barHeight,
      width: Math.max(step - 2, 1),
      height: barHeight,
      "data-date": day.date,
      "data-tokens": day.total_tokens,
    });
    const tip = svgElement("title", {});
    tip.textContent = `${formatDay(day.date)}: ${formatNumber(day.total_tokens)} tokens, ${formatNumber(day.requests)} requests`;
    bar.append(tip);
    svg.append(bar);
    const fromEnd = days.length - 1 - index;
    if (fromEnd % (width < 500 ? 14 : 7) === 0) {
      const anchor = fromEnd === 0 ? "end" : "middle";
      const x = fromEnd === 0 ? width : left + index * step + step / 2;
      svg.append(svgLabel(formatDay(day.date), x, height - 6, anchor));
    }
  });
  svg.append(svgElement("line", { class: "axis", x1: left, x2: width, y1: height - bottom, y2: height - bottom }));
  box.replaceChildren(svg);
}

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [attribute, value] of Object.entries(attributes)) {
    element.setAttribute(attribute, value);
  }
  return element;
}

function svgLabel(text, x, y, anchor) {
  const label = svgElement("text", { x, y, "text-anchor": anchor });
  label.textContent = text;
  return label;
}

function signOut() {
  sessionStorage.removeItem(STORAGE_KEY);
  location.reload();
}

async function submitKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  try {
    await showUsage(key);
    if ($("remember").checked) sessionStorage.setItem(STORAGE_KEY, key);
    $("key").value = "";
  } catch (error) {
    showError(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("zone").textContent = ZONE;
  $("key-form").addEventListener("submit", submitKey);
  $("sign-out").addEventListener("click", signOut);
  const remembered = sessionStorage.getItem(STORAGE_KEY);
  if (remembered) {
    $("remember").checked = true;
    showUsage(remembered).catch((error) => {
      sessionStorage.removeItem(STORAGE_KEY);
      showError(error.message);
    });
  }
});
