// The outbox dashboard: figures from GET /api/v1/admin/summary (the delivery funnel
// among them), the senders from GET /api/v1/whatsapp/senders and the newest messages with
// their delivery from GET /api/v1/whatsapp/messages (all polled), a live tail of the
// WebSocket feed, retry, cancel, pause and resume buttons. No build step, no library.
// Every string from the server reaches the page as a text node or an attribute value
// set through the DOM, never parsed as markup.
"use strict";

(() => {
  const TOKEN_KEY = "outbox.adminToken";
  const POLL_MS = 3000;
  const EVENT_REFRESH_MS = 500; // after a feed event, refresh the figures this soon
  const TAIL_MAX = 200;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const STABLE_MS = 5000; // a socket open this long resets the backoff
  const STATUSES = ["pending", "in_flight", "sent", "error", "cancelled"];
  const DELIVERIES = ["accepted", "delivered", "read", "failed"];
  const BADGES = new Set(["queued", "failed", "retrying", ...STATUSES, ...DELIVERIES]);
  const MESSAGES = "/api/v1/whatsapp/messages";
  const MESSAGE_ROWS = 20;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const SENDERS = "/api/v1/whatsapp/senders";

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let pollTimer = null;
  let soonTimer = null;
  let socket = null;
  let reconnectTimer = null;
  let backoff = BACKOFF_MIN_MS;
  let lastEventId = null;
  let running = false;

  // DOM helpers -------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function badge(word) {
    const known = BADGES.has(word) ? word : "";
    return el("span", { class: `badge ${known}` }, word ?? "");
  }

  function time(iso) {
    if (!iso) return "";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleTimeString();
  }

  function number(n) {
    return typeof n === "number" ? n.toLocaleString() : "–";
  }

  // A span of seconds, as a person reads it.
  function duration(seconds) {
    if (typeof seconds !== "number") return "–";
    if (seconds < 60) return `${seconds.toFixed(1)} s`;
    if (seconds < 3600) return `${(seconds / 60).toFixed(1)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  // A provider's error: a string, or an object such as Meta's {code, title, details}.
  function errorText(error) {
    if (error === null || error === undefined) return "";
    if (typeof error !== "object") return String(error);
    const parts = [error.code, error.title ?? error.message, error.details].filter(
      (part) => part !== null && part !== undefined && part !== "");
    return parts.length ? parts.join(" · ") : JSON.stringify(error);
  }

  function notice(text, bad) {
    const node = $("notice");
    node.textContent = text;
    node.className = bad ? "notice bad" : "notice";
    node.hidden = !text;
  }

  // Token -------------------------------------------------------------------------------

  function askForToken(reason) {
    stop();
    token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("main").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = reason || "";
    setFeed("idle", "feed: not connected");
    $("token-input").focus();
  }

  class AuthProblem extends Error {}

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token}` };
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let answer = null;
    try {
      answer = await response.json();
    } catch {
      answer = null;
    }
    const message = answer && answer.error ? answer.error.message : `HTTP ${response.status}`;
    if (response.status === 401) {
      askForToken(`Token refused: ${message}. Enter an admin token.`);
      throw new AuthProblem(message);
    }
    if (response.status === 403) {
      askForToken("This token is not an admin token. Enter an admin token.");
      throw new AuthProblem(message);
    }
    if (!response.ok) throw new Error(message);
    return answer;
  }

  // Figures -----------------------------------------------------------------------------

  async function refresh() {
    clearTimeout(pollTimer);
    clearTimeout(soonTimer);
    soonTimer = null;
    if (!running) return;
    await Promise.all([refreshSummary(), refreshSenders(), refreshMessages()]);
    if (running) pollTimer = setTimeout(refresh, POLL_MS);
  }

  async function refreshSummary() {
    try {
      render(await api("GET", "/api/v1/admin/summary"));
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
      $("updated").className = "muted";
    } catch (error) {
      if (error instanceof AuthProblem) return;
      $("updated").textContent = `summary unavailable: ${error.message}`;
      $("updated").className = "error";
    }
  }

  async function refreshSenders() {
    const problem = $("senders-error");
    try {
      const answer = await api("GET", SENDERS);
      if (!running) return;
      renderSenders(answer.senders || []);
      problem.hidden = true;
    } catch (error) {
      if (error instanceof AuthProblem) return;
      problem.textContent = `senders unavailable: ${error.message}`;
      problem.hidden = false;
    }
  }

  async function refreshMessages() {
    const problem = $("messages-error");
    const state = $("delivery-filter").value;
    let path = `${MESSAGES}?limit=${MESSAGE_ROWS}`;
    if (state) path += `&delivery=${encodeURIComponent(state)}`;
    try {
      const answer = await api("GET", path);
      if (!running || $("delivery-filter").value !== state) return;
      renderMessages(answer.messages || []);
      problem.hidden = true;
    } catch (error) {
      if (error instanceof AuthProblem) return;
      problem.textContent = `messages unavailable: ${error.message}`;
      problem.hidden = false;
    }
  }

  function refreshSoon() {
    if (soonTimer === null && running) soonTimer = setTimeout(refresh, EVENT_REFRESH_MS);
  }

  function render(summary) {
    renderCounts(summary.counts || {});
    renderThroughput(summary.throughput || []);
    renderLatency(summary.provider_latency || []);
    renderFailures(summary.recent_failures || []);
    renderWaiting(summary.waiting || []);
    renderFunnel(summary.delivery_funnel || null);
  }

  function renderCounts(counts) {
    for (const status of STATUSES) {
      const row = counts[status] || { count: 0 };
      $(`count-${status}`).textContent = number(row.count) + (row.capped ? "+" : "");
      let detail = "";
      if (status === "pending") {
        detail = `due now ${number(row.due_now)}`;
        if (row.oldest) detail += ` · oldest due ${time(row.oldest)}`;
      } else if (status === "in_flight") {
        detail = `lease expired ${number(row.due_now)}`;
      } else if (row.oldest) {
        detail = `oldest kept ${new Date(row.oldest).toLocaleString()}`;
      }
      $(`detail-${status}`).textContent = detail;
    }
  }

  function renderThroughput(rows) {
    const chart = $("throughput-chart");
    chart.replaceChildren();
    const width = 600, height = 140, top = 10;
    const peak = Math.max(1, ...rows.map((r) => r.sent + r.failed));
    const slot = width / Math.max(rows.length, 1);
    chart.append(svg("line", { class: "axis", x1: 0, y1: top + height, x2: width, y2: top + height }));
    chart.append(svg("text", { x: 2, y: top + 8 }, `${peak}/min`));
    let sent = 0, failed = 0;
    rows.forEach((row, i) => {
      sent += row.sent;
      failed += row.failed;
      const x = i * slot + 1, w = Math.max(slot - 2, 1);
      const hs = (row.sent / peak) * height, hf = (row.failed / peak) * height;
      const group = svg("g", { "data-minute": row.minute });
      group.append(svg("title", {}, `${time(row.minute)}: ${row.sent} sent, ${row.failed} failed`));
      if (hs > 0) group.append(svg("rect", { class: "sent", x, y: top + height - hs, width: w, height: hs }));
      if (hf > 0) group.append(svg("rect", { class: "failed", x, y: top + height - hs - hf, width: w, height: hf }));
      chart.append(group);
    });
    timeAxis(chart, top + height);
    $("throughput-total").textContent = `· last hour: ${number(sent)} sent, ${number(failed)} failed`;
  }

  function renderLatency(rows) {
    const chart = $("latency-chart");
    chart.replaceChildren();
    const latest = rows.length ? rows[rows.length - 1] : null;
    $("latency-figures").textContent = latest
      ? `${time(latest.minute)}: p50 ${latest.p50_ms} ms · p95 ${latest.p95_ms} ms · ` +
        `p99 ${latest.p99_ms} ms · max ${latest.max_ms} ms (${number(latest.calls)} calls)`
      : "No provider calls in the last hour.";
    if (!rows.length) return;
    const width = 600, height = 140, top = 10;
    const peak = Math.max(1, ...rows.map((r) => Number(r.p95_ms) || 0));
    const end = Date.now();
    const x = (iso) => width - ((end - new Date(iso).getTime()) / 3600000) * width;
    const y = (ms) => top + height - ((Number(ms) || 0) / peak) * height;
    chart.append(svg("line", { class: "axis", x1: 0, y1: top + height, x2: width, y2: top + height }));
    chart.append(svg("text", { x: 2, y: top + 8 }, `${peak} ms`));
    timeAxis(chart, top + height);
    for (const key of ["p50_ms", "p95_ms"]) {
      const kind = key.slice(0, 3);
      const points = rows.map((r) => `${x(r.minute).toFixed(1)},${y(r[key]).toFixed(1)}`);
      chart.append(svg("polyline", { class: kind, points: points.join(" ") }));
      for (const row of rows) {
        const dot = svg("circle", { class: `${kind} dot`, cx: x(row.minute), cy: y(row[key]), r: 2.5 });
        dot.append(svg("title", {}, `${time(row.minute)}: ${kind} ${row[key]} ms, ${row.calls} calls`));
        chart.append(dot);
      }
    }
  }

  function timeAxis(chart, baseline) {
    chart.append(svg("text", { x: 0, y: baseline + 10 }, "−60 min"));
    chart.append(svg("text", { x: 600, y: baseline + 10, "text-anchor": "end" }, "now"));
  }

  function actionButton(label, method, path, done) {
    return el("button", {
      type: "button",
      onclick: async (event) => {
        event.target.disabled = true;
        try {
          const view = await api(method, path);
          notice(`${done} ${view.task_id}: now ${view.status}`);
        } catch (error) {
          if (!(error instanceof AuthProblem)) notice(`${label} failed: ${error.message}`, true);
        }
        event.target.disabled = false;
        refresh();
      },
    }, label);
  }

  const messagePath = (id) => `/api/v1/whatsapp/messages/${encodeURIComponent(id)}`;
  const retryButton = (id) => actionButton("Retry", "POST", `${messagePath(id)}/retry`, "Requeued");
  const cancelButton = (id) => actionButton("Cancel", "DELETE", messagePath(id), "Cancelled");

  // Senders -----------------------------------------------------------------------------
  // Rows are kept per sender and updated in place, so that a pause reason being typed
  // survives the polls; a row's buttons are rebuilt only when its state changes.

  const senderPath = (id) => `${SENDERS}/${encodeURIComponent(id)}`;
  // The columns after the sender's id, each from its view (never its settings, which
  // hold the credentials' {"set": …}).
  const SENDER_CELLS = [
    ["provider", (s) => s.provider],
    ["state", (s) => s.state],
    ["reason", (s) => pauseText(s.paused)],
    ["rate_limit", (s) => rate(s.rate_limit)],
    ["effective_rate", (s) => effectiveRate(s)],
    ["pending", (s) => number(s.pending)],
    ["in_flight", (s) => number(s.in_flight)],
  ];
  const NUMBER_CELLS = new Set(["rate_limit", "effective_rate", "pending", "in_flight"]);

  function rate(perSecond) {
    return typeof perSecond === "number" ? `${perSecond.toLocaleString()}/s` : "unlimited";
  }

  // The rate the dispatchers keep to now (one decimal: it climbs back continuously), and
  // "learned" when a sender without a limit got one from a provider's throttle.
  function effectiveRate(sender) {
    const now = sender.effective_rate;
    if (typeof now !== "number") return "unlimited";
    const text = rate(Math.round(now * 10) / 10);
    return typeof sender.rate_limit === "number" ? text : `${text} learned`;
  }

  // Why the effective rate is not the limit (null: it is).
  function rateNote(sender) {
    const now = sender.effective_rate;
    if (typeof now !== "number") return null;
    if (typeof sender.rate_limit !== "number") {
      return "No rate_limit: a provider's throttle set this one, its rate measured then";
    }
    if (now < sender.rate_limit) {
      return "Below the limit after a provider's throttle: climbing back by 10 % of the limit per second";
    }
    return null;
  }

  function pauseText(paused) {
    if (!paused) return "";
    let text = paused.reason ?? "";
    if (paused.code) text += ` [${paused.code}]`;
    if (paused.until) text += ` · until ${time(paused.until)}`;
    if (paused.since) text += ` · since ${time(paused.since)}`;
    return text;
  }

  function senderButton(sender, label, action, bodyOf, done) {
    return el("button", {
      type: "button",
      onclick: async (event) => {
        event.target.disabled = true;
        try {
          const view = await api("POST", `${senderPath(sender.id)}/${action}`, bodyOf());
          notice(`${done} ${view.id}: now ${view.state}`);
        } catch (error) {
          if (!(error instanceof AuthProblem)) notice(`${label} ${sender.id} failed: ${error.message}`, true);
        }
        event.target.disabled = false;
        refresh();
      },
    }, label);
  }

  // Every sender can be paused and resumed, `default` too; its settings are the
  // environment's, which the page says.
  function senderActions(sender) {
    const actions = [];
    if (sender.state === "paused") {
      actions.push(senderButton(sender, "Resume", "resume", () => undefined, "Resumed"));
    } else {
      const reason = el("input", {
        class: "pause-reason",
        placeholder: "reason (optional)",
        maxlength: 500,
        spellcheck: "false",
        "aria-label": `Reason to pause ${sender.id}`,
      });
      const body = () => (reason.value.trim() ? { reason: reason.value.trim() } : undefined);
      actions.push(reason, senderButton(sender, "Pause", "pause", body, "Paused"));
    }
    if (sender.source === "environment") {
      actions.push(el("span", { class: "muted source",
        title: "Its settings come from OUTBOX_PROVIDER: change them there" }, "environment"));
    }
    return actions;
  }

  function senderRow(sender) {
    return el("tr", { "data-sender-id": sender.id },
      el("td", { class: "id" }, sender.id),
      ...SENDER_CELLS.map(([key]) =>
        el("td", { "data-key": key, class: NUMBER_CELLS.has(key) ? "number" : "" })),
      el("td", { "data-key": "actions" }));
  }

  function updateSenderRow(row, sender) {
    for (const [key, text] of SENDER_CELLS) {
      const cell = row.querySelector(`td[data-key="${key}"]`);
      if (key === "state") {
        const state = sender.state === "paused" ? "paused" : "active";
        if (cell.textContent !== sender.state) cell.replaceChildren(el("span", { class: `badge ${state}` }, sender.state));
      } else {
        const value = String(text(sender) ?? "");
        if (cell.textContent !== value) cell.textContent = value;
      }
    }
    const effective = row.querySelector('td[data-key="effective_rate"]');
    const note = rateNote(sender);
    effective.classList.toggle("reduced", note !== null);
    if (note === null) effective.removeAttribute("title");
    else if (effective.title !== note) effective.title = note;
    const look = `${sender.source}/${sender.state}`;
    if (row.dataset.look !== look) {
      row.dataset.look = look;
      row.dataset.state = sender.state;
      row.querySelector('td[data-key="actions"]').replaceChildren(...senderActions(sender));
    }
  }

  function renderSenders(senders) {
    const body = $("senders").tBodies[0];
    const existing = new Map([...body.rows].map((row) => [row.dataset.senderId, row]));
    const rows = senders.map((sender) => {
      const row = existing.get(sender.id) || senderRow(sender);
      updateSenderRow(row, sender);
      return row;
    });
    // Moved only when the list changed: a moved row would lose the focus of its input.
    const same = rows.length === body.rows.length && rows.every((row, i) => body.rows[i] === row);
    if (!same) body.replaceChildren(...rows);
  }

  function renderFailures(rows) {
    $("failures").tBodies[0].replaceChildren(
      ...rows.map((row) =>
        el("tr", { "data-task-id": row.task_id },
          el("td", {}, time(row.finished_at)),
          el("td", { class: "id" }, row.task_id),
          el("td", {}, row.user_id),
          el("td", {}, row.to),
          el("td", {}, row.type),
          el("td", {}, `${row.attempts}/${row.max_attempts}`),
          el("td", { class: "error-text" }, row.last_error ?? "", row.last_outcome ? ` (${row.last_outcome})` : ""),
          el("td", {}, retryButton(row.task_id)))),
    );
    $("failures-empty").hidden = rows.length > 0;
  }

  function renderWaiting(rows) {
    $("waiting").tBodies[0].replaceChildren(
      ...rows.map((row) =>
        el("tr", { "data-task-id": row.task_id },
          el("td", {}, time(row.next_attempt_at)),
          el("td", { class: "id" }, row.task_id),
          el("td", {}, row.user_id),
          el("td", {}, row.to),
          el("td", {}, row.type),
          el("td", {}, `${row.attempts}/${row.max_attempts}`),
          el("td", {}, cancelButton(row.task_id)))),
    );
    $("waiting-empty").hidden = rows.length > 0;
  }

  // Delivery --------------------------------------------------------------------------

  const DELIVERY_MARKS = { accepted: "✓", delivered: "✓✓", read: "✓✓", failed: "✗" };

  // A message's delivery as a small badge ("✓✓ read"), its times and error in the title;
  // nothing before the provider accepted it.
  function deliveryBadge(delivery) {
    if (!delivery) return el("span", { class: "muted" }, "–");
    const state = DELIVERIES.includes(delivery.state) ? delivery.state : "";
    const lines = [];
    if (delivery.provider_sent_at) lines.push(`sent by the provider ${time(delivery.provider_sent_at)}`);
    if (delivery.delivered_at) lines.push(`delivered ${time(delivery.delivered_at)}`);
    if (delivery.read_at) lines.push(`read ${time(delivery.read_at)}`);
    if (delivery.failed_at) lines.push(`failed ${time(delivery.failed_at)}`);
    if (delivery.error) lines.push(errorText(delivery.error));
    const attrs = { class: `badge delivery ${state}`, "data-delivery": delivery.state ?? "" };
    if (lines.length) attrs.title = lines.join("\n");
    return el("span", attrs, `${DELIVERY_MARKS[state] ?? ""} ${delivery.state ?? ""}`.trim());
  }

  function renderMessages(rows) {
    $("messages").tBodies[0].replaceChildren(
      ...rows.map((row) =>
        el("tr", { "data-task-id": row.task_id },
          el("td", {}, time(row.created_at)),
          el("td", { class: "id" }, row.task_id),
          el("td", {}, row.to),
          el("td", {}, row.sender),
          el("td", {}, badge(row.status)),
          el("td", { class: "delivery-cell" }, deliveryBadge(row.delivery)))),
    );
    $("messages-empty").hidden = rows.length > 0;
  }

  const count = (n) => el("span", { class: "count" }, number(n));

  function share(part, whole) {
    if (!whole) return null;
    return el("span", { class: "share" }, `${Math.round((part / whole) * 100)} %`);
  }

  function renderFunnel(funnel) {
    const rows = (funnel && funnel.senders) || [];
    $("funnel").tBodies[0].replaceChildren(
      ...rows.map((row) =>
        el("tr", { "data-sender": row.sender },
          el("td", { class: "id" }, row.sender),
          el("td", { class: "number", "data-key": "accepted" }, count(row.accepted)),
          el("td", { class: "number", "data-key": "delivered" }, count(row.delivered), share(row.delivered, row.accepted)),
          el("td", { class: "number", "data-key": "read" }, count(row.read), share(row.read, row.accepted)),
          el("td", { class: "number", "data-key": "failed" }, count(row.failed), share(row.failed, row.accepted)),
          el("td", { class: "number", "data-key": "to_delivered" }, duration(row.median_seconds_to_delivered)),
          el("td", { class: "number", "data-key": "to_read" }, duration(row.median_seconds_to_read)))),
    );
    $("funnel-empty").hidden = rows.length > 0;
    $("funnel-window").textContent = funnel && funnel.capped
      ? `per sender, the newest ${number(funnel.cap)} accepted, since ${new Date(funnel.since).toLocaleString()}`
      : "last 24 hours, per sender";
  }

  async function lookup(event) {
    event.preventDefault();
    const id = $("lookup-input").value.trim();
    const result = $("lookup-result");
    result.replaceChildren(el("p", { class: "muted" }, "looking…"));
    try {
      const view = await api("GET", messagePath(id));
      const actions = [];
      if (view.status === "error" || view.status === "cancelled") actions.push(retryButton(view.task_id));
      if (view.status === "pending") actions.push(cancelButton(view.task_id));
      result.replaceChildren(
        el("p", {}, el("span", { class: "id" }, view.task_id), " ", badge(view.status),
          ` to ${view.to}, ${view.type}, attempts ${view.attempts}/${view.max_attempts} `,
          el("span", { class: "delivery-cell" }, deliveryBadge(view.delivery)),
          view.delivery && view.delivery.error
            ? el("span", { class: "error" }, ` — ${errorText(view.delivery.error)}`) : null,
          view.last_error ? el("span", { class: "error" }, ` — ${view.last_error}`) : null,
          " ", ...actions),
        el("ol", {}, ...view.history.map((a) =>
          el("li", {}, `#${a.attempt} ${a.outcome} at ${time(a.finished_at || a.started_at)}`,
            a.error ? ` — ${a.error}` : ""))),
      );
    } catch (error) {
      if (!(error instanceof AuthProblem)) result.replaceChildren(el("p", { class: "error" }, error.message));
    }
  }

  // Live feed ---------------------------------------------------------------------------

  function setFeed(state, text) {
    const node = $("feed-state");
    node.dataset.state = state;
    node.textContent = text;
  }

  function addEvent(event) {
    const data = (event && event.data) || {};
    if (typeof data.event_id === "number") lastEventId = data.event_id;
    const tail = $("tail");
    tail.prepend(
      el("li", { "data-event-id": data.event_id ?? "", "data-message-id": data.message_id ?? "",
                 "data-sender": data.sender ?? "" },
        el("span", {}, time(data.timestamp)),
        el("span", {}, event.event ?? "?"),
        data.status ? badge(data.status) : null,
        el("span", { class: "id" }, data.message_id ?? data.sender ?? ""),
        data.message_id == null && data.reason ? el("span", {}, data.reason) : null,
        data.attempt !== undefined && data.attempt !== null ? el("span", {}, `attempt ${data.attempt}`) : null,
        data.error ? el("span", { class: "error" }, errorText(data.error)) : null),
    );
    while (tail.children.length > TAIL_MAX) tail.lastElementChild.remove();
  }

  function connect() {
    reconnectTimer = null;
    if (!running) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let url = `${scheme}//${location.host}/ws/whatsapp/`;
    // Resume after a drop: the feed replays what was missed, with no gap.
    if (lastEventId !== null) url += `?since=${lastEventId}`;
    setFeed("connecting", "feed: connecting…");
    // The token travels as a subprotocol, not in the URL that proxies log.
    let ws;
    try {
      ws = new WebSocket(url, ["outbox", `bearer.${token}`]);
    } catch (error) {
      askForToken("This token cannot be sent to the feed. Enter an admin token.");
      return;
    }
    let openedAt = null;
    socket = ws;
    ws.onopen = () => {
      openedAt = Date.now();
      setFeed("live", "feed: live");
    };
    ws.onmessage = (message) => {
      let event;
      try {
        event = JSON.parse(message.data);
      } catch {
        return;
      }
      addEvent(event);
      refreshSoon();
    };
    ws.onclose = (close) => {
      if (socket !== ws) return; // closed on purpose
      socket = null;
      if (close.code === 4401) {
        askForToken(`The feed refused the token: ${close.reason || "unauthorized"}.`);
        return;
      }
      if (close.code === 4410) lastEventId = null; // missed events were purged: start live
      if (openedAt !== null && Date.now() - openedAt > STABLE_MS) backoff = BACKOFF_MIN_MS;
      const wait = backoff * (0.8 + Math.random() * 0.4);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      const why = close.reason ? `${close.code} ${close.reason}` : `${close.code}`;
      setFeed("down", `feed: disconnected (${why}), reconnecting in ${Math.round(wait / 1000)} s`);
      reconnectTimer = setTimeout(connect, wait);
    };
  }

  // Start and stop ----------------------------------------------------------------------

  function start() {
    running = true;
    $("login").hidden = true;
    $("main").hidden = false;
    $("forget").hidden = false;
    refresh();
    connect();
  }

  function stop() {
    running = false;
    clearTimeout(pollTimer);
    clearTimeout(soonTimer);
    clearTimeout(reconnectTimer);
    soonTimer = null;
    if (socket) {
      const ws = socket;
      socket = null;
      ws.close(1000, "dashboard closed");
    }
    backoff = BACKOFF_MIN_MS;
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      token = $("token-input").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token-input").value = "";
      start();
    });
    $("forget").addEventListener("click", () => askForToken(""));
    $("lookup-form").addEventListener("submit", lookup);
    $("messages-form").addEventListener("submit", (event) => event.preventDefault());
    $("delivery-filter").addEventListener("change", () => {
      $("messages").tBodies[0].replaceChildren();
      refreshMessages();
    });
    if (token) start();
    else askForToken("");
  });
})();
