// jobvisor dashboard: polls /ui/api/state and renders it.
// Every value from the server goes into the page through textContent or an attribute,
// never through innerHTML: job types, error codes and ids are data, not markup.
// The operator token lives in sessionStorage (this tab only) and travels only in the
// Authorization header, which browsers never attach on their own, so other sites cannot
// make this page act.
"use strict";

(() => {
  const TOKEN_KEY = "jobvisor.operatorToken";
  const CONFIRM_MS = 5000;
  let token = sessionStorage.getItem(TOKEN_KEY) || "";
  let state = null;
  let lastOk = 0;
  let timer = null;
  let inFlight = false;
  let armed = null; // {key, until}: a destructive action waiting for its second click

  const $ = (id) => document.getElementById(id);

  // --- DOM helpers ------------------------------------------------------------------------
  function h(tag, attrs, ...kids) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "text") el.textContent = String(v);
      else if (k === "class") el.className = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const kid of kids.flat()) {
      if (kid === null || kid === undefined || kid === false) continue;
      el.append(kid instanceof Node ? kid : String(kid));
    }
    return el;
  }

  function svg(tag, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    return el;
  }

  // A table cell that carries its column name, shown as a label in the narrow layout.
  function td(label, content, cls) {
    return h("td", { "data-label": label, class: cls || null }, content);
  }

  function emptyRow(tbody, columns, text) {
    tbody.replaceChildren(h("tr", { class: "empty" },
      h("td", { colspan: columns, text })));
  }

  // --- formatting -------------------------------------------------------------------------
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let v = Number(n);
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 || v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " " + units[i];
  }

  function fmtDuration(s) {
    if (s === null || s === undefined || Number.isNaN(Number(s))) return "–";
    s = Math.max(0, Number(s));
    if (s < 1) return s === 0 ? "0s" : "<1s";
    if (s < 60) return Math.round(s) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + Math.floor(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
  }

  // Ages are measured against the supervisor's clock, so a browser whose clock is off
  // still shows how long ago something happened.
  function serverNow() {
    const t = state ? Date.parse(state.generated_at) : NaN;
    return Number.isNaN(t) ? Date.now() : t + (Date.now() - lastOk);
  }

  function secondsSince(iso) {
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : Math.max(0, (serverNow() - t) / 1000);
  }

  function when(iso) {
    if (!iso) return "–";
    const ago = secondsSince(iso);
    return h("time", { datetime: iso, title: iso, text: fmtDuration(ago) + " ago" });
  }

  function num(n) {
    return n === null || n === undefined ? "–" : Number(n).toLocaleString("en");
  }

  // Text first, colour second: every state reads the same in greyscale.
  const STATE_MARK = { running: "●", starting: "◐", backoff: "↻", stopping: "■", fatal: "✗" };
  function stateBadge(s) {
    return h("span", { class: "state state-" + s, text: (STATE_MARK[s] || "?") + " " + s });
  }

  // --- talking to the supervisor -----------------------------------------------------------
  function authHeaders() {
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function say(text, kind) {
    const m = $("message");
    m.textContent = text;
    m.className = "message " + (kind || "info");
    m.hidden = !text;
  }

  let pending = false; // a refresh asked for while one was running (after an action)

  async function refresh() {
    if (inFlight) { pending = true; return; }
    inFlight = true;
    pending = false;
    clearTimeout(timer);
    try {
      const resp = await fetch("/ui/api/state", {
        headers: authHeaders(), cache: "no-store", credentials: "omit",
      });
      if (resp.status === 401 && token) {
        setToken("");
        say("The operator token was refused; the page is read-only again.", "error");
        pending = true;
      } else if (resp.status === 401 || resp.status === 403) {
        const body = await resp.json().catch(() => ({}));
        showLocked(true);
        $("locked").textContent = body.error ? "Locked: " + body.error + "." :
          "This dashboard needs the operator token.";
      } else if (!resp.ok) {
        throw new Error("HTTP " + resp.status);
      } else {
        showLocked(false);
        state = await resp.json();
        lastOk = Date.now();
        render(state);
      }
    } catch (err) {
      $("overall").textContent = "✗ supervisor unreachable";
      $("overall").className = "badge bad";
    } finally {
      inFlight = false;
      renderFreshness();
      if (pending) refresh();
      else schedule();
    }
  }

  function schedule() {
    clearTimeout(timer);
    if (document.hidden) return; // no polling from background tabs; resumes on return
    const every = ((state && state.refresh_s) || 2) * 1000;
    timer = setTimeout(refresh, every);
  }

  async function act(path, what) {
    say(what + "…", "info");
    let body = {};
    try {
      const resp = await fetch(path, {
        method: "POST", cache: "no-store", credentials: "omit",
        headers: { ...authHeaders(), "Content-Type": "application/json" }, body: "{}",
      });
      body = await resp.json().catch(() => ({}));
      if (resp.ok) say(what + ": " + (body.result || "done") + ".", "ok");
      else say(what + " refused: " + (body.error || "HTTP " + resp.status) + ".", "error");
    } catch (err) {
      say(what + " failed: the supervisor did not answer.", "error");
    }
    armed = null;
    refresh();
  }

  // A button for an action; destructive ones ask for a second click within a few seconds.
  function actionButton(label, path, what, confirm) {
    if (!state || !state.operator) return null;
    const key = path;
    const isArmed = armed && armed.key === key && Date.now() < armed.until;
    const btn = h("button", {
      type: "button", class: "act-btn" + (isArmed ? " armed" : ""),
      "aria-label": isArmed ? "Confirm: " + what : what,
      text: isArmed ? "Confirm " + label.toLowerCase() : label,
    });
    btn.addEventListener("click", () => {
      if (confirm && !(armed && armed.key === key && Date.now() < armed.until)) {
        armed = { key, until: Date.now() + CONFIRM_MS };
        btn.textContent = "Confirm " + label.toLowerCase();
        btn.classList.add("armed");
        btn.setAttribute("aria-label", "Confirm: " + what);
        setTimeout(() => { if (armed && armed.key === key && Date.now() >= armed.until) render(state); },
          CONFIRM_MS + 50);
        return;
      }
      act(path, what);
    });
    return btn;
  }

  // --- rendering ----------------------------------------------------------------------------
  function render(s) {
    document.body.classList.toggle("is-operator", !!s.operator);
    $("host").textContent = s.supervisor.host + " · pid " + s.supervisor.pid + " · up " +
      fmtDuration(s.supervisor.uptime_s) + (s.supervisor.draining ? " · draining" : "");
    const ov = $("overall");
    ov.textContent = s.health.ok ? "✓ healthy" : "✗ degraded";
    ov.className = "badge " + (s.health.ok ? "ok" : "bad");
    renderAuth(s);
    renderChecks(s);
    renderQueues(s);
    renderPlan(s);
    renderModels(s);
    renderChildren(s);
    renderRunning(s);
    renderFailures(s);
    renderBatches(s);
    renderAudit(s);
  }

  function renderFreshness() {
    const f = $("freshness");
    if (!lastOk) { f.textContent = ""; return; }
    const age = (Date.now() - lastOk) / 1000;
    f.textContent = age > 10 ? "⚠ stale: last update " + fmtDuration(age) + " ago" :
      "updated " + new Date(lastOk).toLocaleTimeString("en-GB");
  }

  function renderAuth(s) {
    const form = $("token-form");
    form.hidden = !s.actions_enabled && s.mode !== "token";
    $("operator").hidden = !s.operator;
    $("token").hidden = !!s.operator;
    $("unlock").hidden = !!s.operator;
    const hint = !s.actions_enabled ? "Actions are disabled: no operator token is configured." :
      s.operator ? "Retry and cancel act at once on the job with this id." :
        "Unlock actions with the operator token to retry or cancel.";
    $("by-id-hint").textContent = hint;
    $("job-form").hidden = !s.operator;
  }

  function renderChecks(s) {
    $("checks").replaceChildren(...s.health.checks.map((c) => h("li",
      { class: c.ok ? "ok" : "bad" },
      h("span", { class: "mark", text: c.ok ? "✓ ok" : "✗ failing" }),
      h("strong", { text: c.name }), " ", h("span", { class: "muted", text: c.detail }))));
    if (s.db_error) {
      $("checks").append(h("li", { class: "bad" }, h("span", { class: "mark", text: "✗ failing" }),
        h("strong", { text: "dashboard_reads" }), " ", h("span", { class: "muted", text: s.db_error })));
    }
  }

  function sparkline(series, name) {
    const W = 160, H = 30, P = 2;
    const values = series.filter((v) => v !== null);
    const max = Math.max(1, ...values);
    const step = (W - 2 * P) / Math.max(1, series.length - 1);
    const peak = values.length ? Math.max(...values) : 0;
    const latest = values.length ? values[values.length - 1] : null;
    const label = name + ": jobs per minute over the last 5 minutes; " +
      (values.length ? "latest " + latest.toFixed(1) + ", peak " + peak.toFixed(1) : "no data yet");
    const el = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": label, class: "spark" });
    const title = svg("title");
    title.textContent = label;
    el.append(title);
    el.append(svg("line", { x1: P, x2: W - P, y1: H - P, y2: H - P, class: "axis" }));
    let points = [];
    const flush = () => {
      if (points.length === 1) points.push([points[0][0] + 1, points[0][1]]);
      if (points.length) el.append(svg("polyline", { points: points.map((p) => p.join(",")).join(" ") }));
      points = [];
    };
    series.forEach((v, i) => {
      if (v === null) { flush(); return; }
      points.push([(P + i * step).toFixed(1), (H - P - (v / max) * (H - 2 * P)).toFixed(1)]);
    });
    flush();
    return el;
  }

  function renderQueues(s) {
    const tbody = $("queue-rows");
    if (!s.types.length) return emptyRow(tbody, 7, "No job types yet.");
    tbody.replaceChildren(...s.types.map((t) => h("tr", { "data-type": t.name },
      td("Type", [h("strong", { text: t.name }),
        t.paused ? h("span", { class: "tag warn", text: "⏸ drained" }) : null]),
      td("Queued", num(t.queue.queued), "num q-queued"),
      td("Running", num(t.queue.leased), "num q-leased"),
      td("Failed", num(t.queue.failed), "num q-failed"),
      td("Done", num(t.queue.completed), "num q-completed"),
      td("Lag", fmtDuration(t.queue.lag_s), "num q-lag"),
      td("Jobs/min", h("span", { class: "rate" },
        h("span", { class: "rate-num", text: t.per_minute === null ? "–" : t.per_minute.toFixed(1) }),
        sparkline(t.chart, t.name)), "span"),
    )));
  }

  function meter(label, used, total, extra) {
    const pct = total ? Math.round((100 * used) / total) : 0;
    return h("div", { class: "cap" },
      h("div", { class: "cap-label" }, h("strong", { text: label }), " ",
        h("span", { text: extra })),
      h("meter", { min: 0, max: total || 1, value: used, "aria-label": label + " in use " + pct + "%" }),
      h("span", { class: "small muted", text: pct + "% in use" }));
  }

  // One model server on our GPUs: its loaded models hold memory (already "in use" on the
  // GPU meters); models it unloaded keep their memory off the GPU budget.
  function modelServer(m) {
    const sized = (list) => list.map((x) => x.name + " " + fmtBytes(x.size_vram)).join(", ");
    let state;
    let detail;
    if (!m.counted) {
      state = h("span", { class: "tag", text: "not read" });
      detail = m.error || "";
    } else if (!m.reachable) {
      state = h("span", { class: "tag warn", text: "unreachable" });
      detail = (m.error || "no answer") + " · loaded models unknown";
    } else {
      state = h("span", { class: "tag info", text: "reachable" });
      detail = m.models.length + " loaded" + (m.models.length ? ": " + sized(m.models) : "") +
        " · holding " + fmtBytes(m.held_bytes);
    }
    const kept = m.counted ? h("span", { class: "small muted block model-reserved", text:
      m.reserved.length ? fmtBytes(m.reserved_bytes) + " kept for unloaded models: " + sized(m.reserved) :
        "nothing kept for unloaded models" }) : null;
    return h("div", { class: "cap model-server", "data-url": m.url },
      h("div", { class: "cap-label" }, h("strong", { text: "Model server" }), " ",
        h("span", { text: m.url }), state),
      h("span", { class: "small model-loaded", text: detail }), kept);
  }

  function renderPlan(s) {
    const cap = $("capacity");
    const r = s.capacity.readings;
    const res = s.capacity.reserve;
    const parts = [];
    if (!r) {
      parts.push(h("p", { class: "muted", text: "No readings yet: the first plan is on its way." }));
    } else {
      parts.push(meter("RAM", r.memory_total - r.memory_available, r.memory_total,
        fmtBytes(r.memory_available) + " free of " + fmtBytes(r.memory_total) +
        " · reserve " + fmtBytes(res.memory)));
      if (r.gpus.length) {
        for (const g of r.gpus) {
          parts.push(meter("GPU " + g.index, g.total_bytes - g.free_bytes, g.total_bytes,
            (g.name || g.vendor || "") + " · " + fmtBytes(g.free_bytes) + " free of " +
            fmtBytes(g.total_bytes) + " · reserve " + fmtBytes(res.gpu_memory)));
        }
      } else {
        parts.push(h("div", { class: "cap" }, h("strong", { text: "GPU" }), " ",
          h("span", { text: "none found (GPU types get their min only)" })));
      }
      parts.push(h("div", { class: "cap" }, h("strong", { text: "CPUs" }), " ",
        h("span", { text: String(r.cpu_count) })));
      for (const m of r.model_servers || []) parts.push(modelServer(m));
    }
    cap.replaceChildren(...parts);

    const tbody = $("plan-rows");
    if (!s.types.length) return emptyRow(tbody, 7, "Nothing planned.");
    tbody.replaceChildren(...s.types.map((t) => {
      const st = t.settings;
      const short = t.plan.running < t.plan.processes;
      const procs = h("span", {},
        h("span", { class: "plan-count", text: t.plan.running + " running / " + t.plan.processes + " planned" }),
        short ? h("span", { class: "tag warn", text: "▲ starting" }) : null,
        st ? h("span", { class: "small muted block", text: "min " + st.min + ", max " + st.max }) : null);
      const perJob = st ? "RAM " + fmtBytes(st.memory_per_job) + (st.gpu_memory_per_job ?
        " · GPU " + fmtBytes(st.gpu_memory_per_job) : "") + " · ×" + st.concurrency + " per process" : "–";
      let action = null;
      if (st) {
        action = t.paused ?
          actionButton("Resume", "/ui/api/types/" + encodeURIComponent(t.name) + "/resume", "resume " + t.name, false) :
          actionButton("Drain", "/ui/api/types/" + encodeURIComponent(t.name) + "/pause", "drain " + t.name, true);
      }
      return h("tr", { "data-type": t.name },
        td("Type", h("strong", { text: t.name })),
        td("Priority", st ? String(st.priority) : "–", "num"),
        td("Processes", procs, "span"),
        td("Per job", perJob, "span"),
        td("Why", t.plan.reason, "reason span"),
        td("Restarts", num(t.plan.restarts), "num"),
        td("Actions", action, "act"));
    }));
  }

  function renderModels(s) {
    const tbody = $("model-rows");
    const models = s.models || [];
    if (!models.length) return emptyRow(tbody, 10, "No model endpoint called yet.");
    const secs = (v) => v === null ? "–" : (v < 10 ? v.toFixed(2) : v.toFixed(0)) + " s";
    tbody.replaceChildren(...models.map((m) => h("tr",
      { "data-endpoint": m.endpoint, "data-model": m.model },
      td("Endpoint", m.endpoint),
      td("Model", m.model),
      td("Limit", h("span", {}, h("span", { class: "m-limit", text: String(m.limit) }),
        h("span", { class: "small muted block", text: m.fixed ? "fixed" : "adaptive, max " + m.max_limit })), "num"),
      td("In flight", String(m.in_flight), "num m-inflight"),
      td("Latency", secs(m.latency_s), "num"),
      td("Baseline", secs(m.baseline_s), "num"),
      td("Queue share", m.wait_share === null ? "–" : Math.round(m.wait_share * 100) + "%", "num"),
      td("Requests", num(m.requests), "num"),
      td("Busy", num(m.busy), "num"),
      td("Timeouts", num(m.timeouts), "num"))));
  }

  function renderChildren(s) {
    const tbody = $("child-rows");
    if (!s.workers.length) return emptyRow(tbody, 10, "No children.");
    tbody.replaceChildren(...s.workers.map((w) => h("tr",
      { "data-type": w.job_type, "data-slot": w.slot, class: "child state-row-" + w.state },
      td("Type", w.job_type),
      td("Slot", String(w.slot), "num"),
      td("PID", w.pid === null ? "–" : String(w.pid), "num c-pid"),
      td("State", stateBadge(w.state), "c-state"),
      td("Uptime", w.pid === null ? "–" : fmtDuration(w.uptime_s), "num"),
      td("Restarts", num(w.restarts), "num c-restarts"),
      td("Memory", fmtBytes(w.rss_bytes), "num"),
      td("CPU", (w.cpu_seconds || 0).toFixed(1) + " s", "num"),
      td("In flight", num(w.inflight), "num"),
      td("Last exit", w.last_exit === null ? "–" : String(w.last_exit), "num"))));
  }

  function renderRunning(s) {
    const tbody = $("running-rows");
    if (s.db_error) return emptyRow(tbody, 6, "Not available: the database did not answer.");
    if (!s.running.length) return emptyRow(tbody, 6, "No job is running.");
    tbody.replaceChildren(...s.running.map((j) => h("tr", { "data-job": j.id },
      td("Job", "#" + j.id, "num"),
      td("Type", j.job_type),
      td("Attempt", j.attempts + "/" + j.max_attempts, "num"),
      td("Running for", j.started_at ? fmtDuration(secondsSince(j.started_at)) : "–", "num"),
      td("Progress", j.progress === null ? "–" : Math.round(j.progress * 100) + "%", "num"),
      td("Actions", j.cancel_requested ? h("span", { class: "tag", text: "cancel requested" }) :
        actionButton("Cancel", "/ui/api/jobs/" + j.id + "/cancel", "cancel job #" + j.id, true), "act"))));
  }

  function renderFailures(s) {
    const tbody = $("failure-rows");
    if (s.db_error) return emptyRow(tbody, 6, "Not available: the database did not answer.");
    if (!s.failures.length) return emptyRow(tbody, 6, "No failed jobs.");
    tbody.replaceChildren(...s.failures.map((f) => h("tr", { "data-job": f.id },
      td("Job", "#" + f.id, "num"),
      td("Type", f.job_type),
      td("Error code", h("code", { text: f.error_code || "–" }), "span"),
      td("Attempts", f.attempts + "/" + f.max_attempts, "num"),
      td("When", when(f.finished_at)),
      td("Actions", actionButton("Retry", "/ui/api/jobs/" + f.id + "/retry", "retry job #" + f.id, false), "act"))));
  }

  function renderBatches(s) {
    const box = $("batch-list");
    if (s.db_error) {
      box.replaceChildren(h("p", { class: "muted", text: "Not available: the database did not answer." }));
      return;
    }
    if (s.batches === null) {
      box.replaceChildren(h("p", { class: "muted", text: "Batches are not available in this database yet." }));
      return;
    }
    if (!s.batches.length) {
      box.replaceChildren(h("p", { class: "muted", text: "No batches." }));
      return;
    }
    box.replaceChildren(...s.batches.map((b) => {
      const done = b.completed + b.failed + b.cancelled;
      const pct = b.total ? Math.floor((100 * done) / b.total) : 100;
      const label = "Batch " + b.id;
      return h("div", { class: "batch", "data-batch": b.id },
        h("div", { class: "batch-head" }, h("strong", { text: label }),
          h("span", { class: "tag" + (b.finished_at ? "" : " info"),
            text: b.finished_at ? "✓ finished" : "… open" })),
        h("progress", { max: Math.max(1, b.total), value: done, "aria-label": label + " " + pct + "% done" }),
        h("div", { class: "small", text: num(done) + " / " + num(b.total) + " (" + pct + "%) · " +
          num(b.completed) + " completed · " + num(b.failed) + " failed · " + num(b.cancelled) + " cancelled" }),
        h("div", { class: "small muted" }, "created ", when(b.created_at),
          b.finished_at ? [" · finished ", when(b.finished_at)] : null));
    }));
  }

  function renderAudit(s) {
    const sec = $("audit");
    sec.hidden = !s.operator;
    if (!s.operator) return;
    const tbody = $("audit-rows");
    if (!s.audit || !s.audit.length) return emptyRow(tbody, 5, "No actions yet.");
    tbody.replaceChildren(...s.audit.map((a) => h("tr", {},
      td("When", when(a.at)), td("Action", a.action), td("Target", a.target),
      td("Result", a.result), td("From", a.client))));
  }

  function showLocked(locked) {
    $("locked").hidden = !locked;
    $("main").hidden = locked;
    if (locked) {
      $("token-form").hidden = false;
      $("operator").hidden = true;
      $("token").hidden = false;
      $("unlock").hidden = false;
      $("overall").textContent = "locked";
      $("overall").className = "badge";
    }
  }

  function setToken(value) {
    token = value;
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  // --- wiring -------------------------------------------------------------------------------
  function init() {
    $("token-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      $("token").value = "";
      if (!value) return;
      setToken(value);
      say("Checking the token…", "info");
      refresh().then(() => { if (token) say("Actions unlocked for this tab.", "ok"); });
    });
    $("lock").addEventListener("click", () => {
      setToken("");
      say("Locked: the page is read-only.", "info");
      refresh();
    });
    $("job-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const id = $("job-id").value.trim();
      const which = ev.submitter && ev.submitter.dataset.act;
      if (!/^[0-9]{1,18}$/.test(id)) { say("A job id is a number.", "error"); return; }
      if (which === "retry" || which === "cancel") {
        act("/ui/api/jobs/" + id + "/" + which, which + " job #" + id);
      }
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    setInterval(renderFreshness, 1000);
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
