// Monitoring page of the embedded scheduler: plain JS, no build step, talks to /api/x-embedded/monitoring/*.
// The token is asked once and kept in sessionStorage (this tab only); every call sends it as a Bearer token.
"use strict";

const API = "/api/x-embedded";
const TOKEN_KEY = "galaxy-dirac-wms-token";
const state = { jobsPage: 1, pilotsPage: 1, facets: null, jobsGeneration: 0, acctGeneration: 0 };

function $(sel) { return document.querySelector(sel); }

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat(Infinity)) node.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return node;
}

function showLogin(message) {
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#token").focus();
}

async function api(path, options) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) { showLogin(); throw new Error("no token"); }
  const response = await fetch(path, { ...(options || {}), headers: { Authorization: "Bearer " + token } });
  if (response.status === 401 || response.status === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    const body = await response.json().catch(() => ({}));
    showLogin(body.detail || "token refused");
    throw new Error("unauthorised");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.detail || response.statusText);
  }
  return response;
}
async function getJSON(path) { return (await api(path)).json(); }

function fmtTime(value) { return value ? value.replace("T", " ").replace(/\.\d+/, "").replace("Z", "") : ""; }
function fmtNum(value, digits) {
  if (value == null) return "";
  return Number.isInteger(value) ? String(value) : Number(value).toFixed(digits == null ? 2 : digits);
}
function statusCell(status) { return el("td", { class: "st-" + status }, status); }
function fillRows(tbody, rows) { tbody.replaceChildren(...rows); }

// --- jobs -------------------------------------------------------------------------------------------------------
function jobFilters() {
  const form = new FormData($("#job-filters"));
  const params = new URLSearchParams();
  for (const [k, v] of form.entries()) if (v) params.set(k, v);
  return params;
}

async function loadFacets() {
  const facets = await getJSON(API + "/monitoring/facets");
  state.facets = facets;
  const form = $("#job-filters");
  for (const name of ["status", "site", "owner", "group", "jobgroup"]) {
    const select = form.elements[name];
    const current = select.value;
    select.replaceChildren(el("option", { value: "" }, "(all)"),
      ...facets[name].map(f => el("option", { value: f.value }, `${f.value || "(none)"} (${f.count})`)));
    select.value = current;
  }
  const chips = facets.status.map(f => el("span", {
    class: "chip" + (form.elements.status.value === f.value ? " active" : ""), "data-status": f.value,
    onclick: () => { form.elements.status.value = form.elements.status.value === f.value ? "" : f.value; state.jobsPage = 1; loadJobs(); },
  }, f.value, el("b", {}, f.count)));
  $("#status-chips").replaceChildren(el("span", { class: "chip" }, "All", el("b", {}, facets.total)), ...chips);
}

async function loadJobs() {
  const params = jobFilters();
  params.set("page", state.jobsPage);
  const generation = ++state.jobsGeneration;
  const data = await getJSON(API + "/monitoring/jobs?" + params);
  if (generation !== state.jobsGeneration) return;
  const status = $("#job-filters").elements.status.value;
  for (const chip of document.querySelectorAll("#status-chips .chip[data-status]"))
    chip.classList.toggle("active", chip.dataset.status === status);
  fillRows($("#jobs-table tbody"), data.jobs.map(j => el("tr", { "data-job": j.JobID, onclick: () => openJob(j.JobID) },
    el("td", {}, j.JobID), el("td", {}, j.JobName), statusCell(j.Status), el("td", {}, j.MinorStatus), el("td", {}, j.Site),
    el("td", {}, j.Owner), el("td", {}, j.OwnerGroup), el("td", {}, j.JobGroup), el("td", { class: "num" }, j.RescheduleCounter),
    el("td", {}, fmtTime(j.LastUpdateTime)))));
  const first = (data.page - 1) * data.per_page;
  $("#jobs-range").textContent = data.total ? `${first + 1}–${first + data.jobs.length} of ${data.total}` : "no jobs";
  $("#jobs-prev").disabled = data.page <= 1;
  $("#jobs-next").disabled = first + data.jobs.length >= data.total;
}

function table(headers, rows, id) {
  return el("table", { class: "grid", id: id || "" }, el("thead", {}, el("tr", {}, headers.map(h => el("th", {}, h)))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => c instanceof Node ? c : el("td", {}, c))))));
}

async function openJob(jobId) {
  for (const tr of document.querySelectorAll("#jobs-table tr.selected")) tr.classList.remove("selected");
  const row = document.querySelector(`#jobs-table tr[data-job="${jobId}"]`);
  if (row) row.classList.add("selected");
  const job = await getJSON(`${API}/monitoring/jobs/${jobId}`);
  const attrs = ["Status", "MinorStatus", "ApplicationStatus", "Site", "Owner", "OwnerGroup", "JobGroup", "JobType",
    "SubmissionTime", "StartExecTime", "EndExecTime", "HeartBeatTime", "LastUpdateTime", "RescheduleCounter"];
  const hbKeys = ["CPUConsumed", "WallClockTime", "MemoryUsed", "Vsize", "LoadAverage", "AvailableDiskSpace"];
  const params = Object.entries(job.Parameters).filter(([k]) => k !== "StandardOutput");
  const detail = $("#job-detail");
  detail.replaceChildren(
    el("h3", {}, `Job ${job.JobID} — ${job.JobName}`, " ", el("button", { onclick: () => { detail.hidden = true; } }, "close")),
    el("div", { class: "cols" },
      el("div", {}, el("h4", {}, "Attributes"),
        el("dl", {}, attrs.map(a => [el("dt", {}, a), el("dd", {}, a.endsWith("Time") ? fmtTime(job[a]) : job[a])]))),
      el("div", {}, el("h4", {}, "Status history"), table(["Time (UTC)", "Status", "Minor status", "Application", "Source"],
        job.History.map(h => [fmtTime(h.StatusTime), statusCell(h.Status), h.MinorStatus, h.ApplicationStatus, h.Source]), "job-history"))),
    el("h4", {}, `Heartbeats (${job.HeartBeats.length})`),
    job.HeartBeats.length ? table(["Time (UTC)", ...hbKeys], job.HeartBeats.map(h => [fmtTime(h.HeartBeatTime), ...hbKeys.map(k => fmtNum(h[k]))]))
      : el("p", { class: "muted" }, "no heartbeats"),
    el("h4", {}, "Pilots"),
    job.Pilots.length ? table(["Stamp", "Status", "Site", "CE", "Queue", "Matched at", "Reason"],
      job.Pilots.map(p => [p.PilotStamp, p.Status, p.GridSite, p.DestinationSite, p.Queue, fmtTime(p.MatchTime), p.StatusReason]))
      : el("p", { class: "muted" }, "not matched yet"),
    el("h4", {}, "Sandboxes"),
    el("ul", {}, ["Input", "Output"].flatMap(t => (job.Sandboxes[t] || []).map(p => el("li", {}, `${t}: ${p}`)))),
    (job.Sandboxes.Input || []).length + (job.Sandboxes.Output || []).length ? [] : el("p", { class: "muted" }, "none registered"),
    params.length ? [el("h4", {}, "Parameters"), table(["Name", "Value"], params)] : [],
    job.Parameters.StandardOutput ? [el("h4", {}, "Standard output (tail)"), el("pre", {}, job.Parameters.StandardOutput)] : [],
    el("h4", {}, "JDL"), el("pre", {}, job.JDL),
  );
  detail.hidden = false;
  detail.scrollIntoView({ block: "nearest" });
}

// --- pilots, task queues, SiteDirector ----------------------------------------------------------------------------
async function loadPilots() {
  const summary = await getJSON(API + "/monitoring/pilots/summary");
  const statuses = [...new Set(summary.flatMap(s => Object.keys(s.States)))].sort();
  $("#pilot-summary thead").replaceChildren(el("tr", {}, ["Queue", "CE", "Site", ...statuses, "Total"].map(h => el("th", {}, h))));
  fillRows($("#pilot-summary tbody"), summary.map(s => el("tr", {}, el("td", {}, s.Queue), el("td", {}, s.CE), el("td", {}, s.Site),
    statuses.map(st => el("td", { class: "num" }, s.States[st] || "")), el("td", { class: "num" }, s.Total))));
  const params = new URLSearchParams();
  for (const [k, v] of new FormData($("#pilot-filters")).entries()) if (v) params.set(k, v);
  params.set("page", state.pilotsPage);
  const data = await getJSON(API + "/monitoring/pilots?" + params);
  fillRows($("#pilots-table tbody"), data.pilots.map(p => el("tr", {}, el("td", {}, p.PilotStamp), statusCell(p.Status),
    el("td", {}, p.StatusReason), el("td", {}, p.GridSite), el("td", {}, p.DestinationSite), el("td", {}, p.Queue),
    el("td", { class: "num" }, p.MatchedJobs), el("td", {}, fmtTime(p.SubmissionTime)), el("td", {}, fmtTime(p.LastUpdateTime)))));
  const first = (data.page - 1) * data.per_page;
  $("#pilots-range").textContent = data.total ? `${first + 1}–${first + data.pilots.length} of ${data.total}` : "no pilots";
  $("#pilots-prev").disabled = data.page <= 1;
  $("#pilots-next").disabled = first + data.pilots.length >= data.total;
}

async function loadTaskQueues() {
  const queues = await getJSON(API + "/monitoring/taskqueues");
  const list = v => (v || []).join(", ");
  fillRows($("#tq-table tbody"), queues.map(q => el("tr", {}, [q.TQId, q.Owner, q.OwnerGroup, q.CPUTime, fmtNum(q.Priority),
    list(q.Sites), list(q.BannedSites), list(q.Platforms), list(q.Tags), `${q.MinRAM}–${q.MaxRAM}`, q.WaitingJobs]
    .map(v => el("td", {}, v)))));
}

async function loadSiteDirector() {
  const decisions = await getJSON(API + "/monitoring/sitedirector");
  $("#sd-empty").hidden = decisions.length > 0;
  const keys = [...new Set(decisions.flatMap(d => Object.keys(d)))];
  $("#sd-table thead").replaceChildren(el("tr", {}, keys.map(k => el("th", {}, k))));
  fillRows($("#sd-table tbody"), decisions.map(d => el("tr", {}, keys.map(k => el("td", {},
    typeof d[k] === "object" && d[k] !== null ? JSON.stringify(d[k]) : (k === "DecisionTime" ? fmtTime(d[k]) : d[k]))))));
}

// --- accounting ---------------------------------------------------------------------------------------------------
function accountingURL(format) {
  const form = new FormData($("#acct-form"));
  const params = new URLSearchParams({ since: form.get("since"), bucket: form.get("bucket"), format });
  if (form.get("until")) params.set("until", form.get("until"));
  return `${API}/accounting/${form.get("kind")}?${params}`;
}

async function download(format) {
  const blob = await (await api(accountingURL(format))).blob();
  const link = el("a", { href: URL.createObjectURL(blob), download: `${new FormData($("#acct-form")).get("kind")}.${format}` });
  link.click();
}

async function loadAccounting() {
  $("#acct-error").textContent = "";
  const generation = ++state.acctGeneration;  // a slower earlier answer must not overwrite a newer one
  try {
    // Numbers first, then the image: the server reuses the aggregation it just did.
    const data = await getJSON(accountingURL("json"));
    const png = await (await api(accountingURL("png"))).blob();
    if (generation !== state.acctGeneration) return;
    const img = $("#acct-img");
    if (img.src) URL.revokeObjectURL(img.src);
    img.src = URL.createObjectURL(png);
    const rows = data.table || [];
    const keys = rows.length ? Object.keys(rows[0]) : [];
    $("#acct-table thead").replaceChildren(el("tr", {}, keys.map(k => el("th", {}, k))));
    fillRows($("#acct-table tbody"), rows.map(r => el("tr", {}, keys.map(k => el("td", { class: typeof r[k] === "number" ? "num" : "" },
      typeof r[k] === "number" ? fmtNum(r[k]) : r[k])))));
  } catch (err) { $("#acct-error").textContent = err.message; }
}

// --- wiring -------------------------------------------------------------------------------------------------------
const loaders = { jobs: async () => { await loadFacets(); await loadJobs(); }, pilots: loadPilots,
  taskqueues: loadTaskQueues, sitedirector: loadSiteDirector, accounting: loadAccounting };

function showTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
  for (const s of document.querySelectorAll("section.tab")) s.hidden = s.id !== "tab-" + name;
  state.tab = name;
  loaders[name]().catch(err => console.error(err));
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => showTab(b.dataset.tab));
  $("#login-form").addEventListener("submit", ev => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token").value = "";
    $("#login").hidden = true;
    showTab(state.tab || "jobs");
  });
  $("#logout").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showLogin(); });
  $("#job-filters").addEventListener("change", () => { state.jobsPage = 1; loadJobs().catch(console.error); });
  $("#jobs-prev").addEventListener("click", () => { state.jobsPage--; loadJobs().catch(console.error); });
  $("#jobs-next").addEventListener("click", () => { state.jobsPage++; loadJobs().catch(console.error); });
  $("#pilot-filters").addEventListener("change", () => { state.pilotsPage = 1; loadPilots().catch(console.error); });
  $("#pilots-prev").addEventListener("click", () => { state.pilotsPage--; loadPilots().catch(console.error); });
  $("#pilots-next").addEventListener("click", () => { state.pilotsPage++; loadPilots().catch(console.error); });
  $("#acct-form").addEventListener("submit", ev => { ev.preventDefault(); loadAccounting(); });
  $("#acct-csv").addEventListener("click", ev => { ev.preventDefault(); download("csv").catch(console.error); });
  $("#acct-json").addEventListener("click", ev => { ev.preventDefault(); download("json").catch(console.error); });
  if (sessionStorage.getItem(TOKEN_KEY)) showTab("jobs"); else { state.tab = "jobs"; showLogin(); }
});
