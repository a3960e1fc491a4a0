// longcat-tuner web UI: plain JavaScript, no framework, no build step.
// The forms are generated from the JSON schemas served at /api/schema; every write carries the
// X-Longcat-Tuner header the server requires; the session cookie (set on the first page load) authenticates.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
// Marks a <video> once its metadata decoded, so a test (or a person in devtools) can see it is playable.
const markLoaded = (event) => { event.target.dataset.loaded = "1"; };

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
};

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (method !== "GET") options.headers["X-Longcat-Tuner"] = "1";
  if (body instanceof FormData) options.body = body;
  else if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = { detail: text }; }
  if (!response.ok && response.status !== 422) {
    throw new Error(`${response.status}: ${detailText(data && data.detail)}`);
  }
  return { status: response.status, data };
}

// A 4xx answer's `detail`: a message, or a list of `{loc, msg}` (msg already names the key).
function detailText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((item) => (item && item.msg) || JSON.stringify(item)).join("; ");
  return JSON.stringify(detail);
}

function banner(message) {
  const node = $("#banner");
  node.textContent = message || "";
  node.hidden = !message;
}

const fmt = {
  num: (v, digits = 4) => (v === null || v === undefined ? "-" : Number(v).toPrecision(digits)),
  secs: (v) => {
    if (v === null || v === undefined) return "-";
    v = Math.round(v);
    const h = Math.floor(v / 3600), m = Math.floor((v % 3600) / 60), s = v % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
  },
  time: (t) => new Date(t * 1000).toLocaleString(),
};

// ---------------------------------------------------------------------------------------------
// Tabs
// ---------------------------------------------------------------------------------------------
function showTab() {
  const name = (location.hash || "#config").slice(1);
  for (const section of document.querySelectorAll(".tab")) section.hidden = section.id !== `tab-${name}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === name);
  if (name === "runs") { refreshRuns(); pollGpu(); }
  if (name === "gallery") refreshGallery();
  if (name === "preview") { refreshLoras(); refreshModels(); refreshPreviews(); }
}

// ---------------------------------------------------------------------------------------------
// Schema-driven forms
// ---------------------------------------------------------------------------------------------
const state = { schema: null, info: null, pathFields: { config: [], dataset: [] }, plannedFields: [] };

function resolveRef(schema, root) {
  if (schema && schema.$ref) {
    const name = schema.$ref.split("/").pop();
    return { ...root.$defs[name], ...Object.fromEntries(Object.entries(schema).filter(([k]) => k !== "$ref")) };
  }
  return schema;
}

// Reduce a property schema to {kind, nullable, options, ...} for choosing a widget.
function describe(prop, root) {
  prop = resolveRef(prop, root);
  let nullable = false;
  let variants = [prop];
  if (prop.anyOf) {
    variants = prop.anyOf.map((v) => resolveRef(v, root)).filter((v) => v.type !== "null");
    nullable = variants.length < prop.anyOf.length;
  }
  const base = variants.length === 1 ? { ...prop, ...variants[0] } : prop;
  const types = variants.map((v) => v.type);
  let kind = "text";
  if (base.const !== undefined) kind = "const";
  else if (base.enum) kind = "enum";
  else if (types.length === 1 && types[0] === "boolean") kind = "boolean";
  else if (types.length === 1 && (types[0] === "integer" || types[0] === "number")) kind = types[0];
  else if (types.length === 1 && types[0] === "array") kind = "array";
  else if (types.length === 1 && types[0] === "object" && base.properties) kind = "object";
  else if (types.length > 1 && types.includes("integer") && types.includes("string")) kind = "int-or-text";
  return { kind, nullable, base, itemType: base.items && base.items.type };
}

function buildField(key, prop, root, value, { required = false, readonly = false, path = false, planned = false } = {}) {
  const info = describe(prop, root);
  const { kind, nullable, base } = info;
  const id = `f-${Math.random().toString(36).slice(2, 9)}`;
  let input;
  if (kind === "object") {
    const fieldset = el("fieldset", { class: "nested", "data-key": key, "data-kind": "object" }, el("legend", { text: key }));
    const nestedRoot = root;
    for (const [subKey, subProp] of Object.entries(base.properties)) {
      fieldset.append(buildField(subKey, subProp, nestedRoot, value ? value[subKey] : undefined));
    }
    if (base.description) fieldset.append(el("div", { class: "help", text: base.description }));
    return fieldset;
  }
  if (kind === "boolean") {
    input = el("input", { type: "checkbox", id });
    input.checked = value !== undefined && value !== null ? Boolean(value) : Boolean(base.default);
  } else if (kind === "enum") {
    input = el("select", { id });
    if (nullable) input.append(el("option", { value: "", text: "(none)" }));
    for (const option of base.enum) input.append(el("option", { value: option, text: String(option) }));
    const current = value !== undefined ? value : base.default;
    input.value = current === null || current === undefined ? "" : String(current);
  } else if (kind === "const") {
    input = el("input", { type: "text", id, readonly: true, value: String(base.const) });
  } else {
    const type = kind === "integer" || kind === "number" ? "number" : "text";
    input = el("input", { type, id, step: kind === "number" ? "any" : kind === "integer" ? "1" : null });
    let current = value !== undefined ? value : base.default;
    if (kind === "array" && Array.isArray(current)) current = current.join(", ");
    input.value = current === null || current === undefined ? "" : String(current);
    if (nullable) input.placeholder = "empty";
    if (kind === "array") input.placeholder = "comma-separated";
    if (path) input.classList.add("path");
  }
  if (readonly) input.readOnly = true;
  input.dataset.key = key;
  input.dataset.kind = kind;
  input.dataset.nullable = nullable ? "1" : "";
  input.dataset.itemType = info.itemType || "";
  input.dataset.required = required ? "1" : "";
  // A key the memory plan chooses is written only when the loaded config had it or the user changes it.
  input.dataset.planned = planned ? "1" : "";
  input.dataset.given = value !== undefined ? "1" : "";
  if (planned) {
    const mark = () => { input.dataset.given = "1"; };
    input.addEventListener("change", mark);
    input.addEventListener("input", mark);
  }
  const label = el("label", { for: id, class: "key", title: base.description || "" }, key, required ? el("span", { class: "req", text: " *" }) : null);
  const help = el("div", { class: "help", text: base.description || "" });
  const error = el("div", { class: "field-error", "data-error-for": key });
  return el("div", { class: `field field-${kind}`, "data-field": key }, label, input, help, error);
}

// Read a generated form back into a plain object (keys left empty fall back to the schema default).
function readForm(container) {
  const out = {};
  for (const node of container.children) {
    if (node.matches("fieldset.nested")) {
      out[node.dataset.key] = readForm(node);
      continue;
    }
    const input = node.querySelector && node.querySelector(":scope > input, :scope > select");
    if (!input || !input.dataset.key) continue;
    const { key, kind, nullable, itemType } = input.dataset;
    if (input.dataset.planned && !input.dataset.given) continue; // left to the memory plan
    if (kind === "boolean") { out[key] = input.checked; continue; }
    const raw = input.value.trim();
    if (raw === "") {
      if (nullable) out[key] = null;
      continue;
    }
    if (kind === "integer" || kind === "number") out[key] = Number(raw);
    else if (kind === "int-or-text") out[key] = /^\d+$/.test(raw) ? Number(raw) : raw;
    else if (kind === "array") {
      const items = raw.split(",").map((s) => s.trim()).filter(Boolean);
      out[key] = itemType === "number" || itemType === "integer" ? items.map(Number) : items;
    } else out[key] = raw;
  }
  return out;
}

// Headings placed before the first key of each group (the schema lists keys in this order); a key
// missing from the schema just means no heading, never a missing field.
const CONFIG_SECTIONS = {
  model_family: "Model", lora_rank: "LoRA", data_backend_config: "Data", flow_schedule_shift: "Objective",
  learning_rate: "Optimisation", gradient_checkpointing: "Memory", validation_step_interval: "Validation",
  output_dir: "Checkpoints and logging",
};

function buildConfigForm(config) {
  const root = state.schema.config;
  const form = $("#config-form");
  form.replaceChildren();
  const required = new Set(root.required || []);
  for (const [key, prop] of Object.entries(root.properties)) {
    if (CONFIG_SECTIONS[key]) form.append(el("h3", { class: "section", text: CONFIG_SECTIONS[key] }));
    const managed = key === "data_backend_config"; // the server writes it next to config.json
    const value = managed ? state.info.datasets_path : config[key];
    form.append(buildField(key, prop, root, value, {
      required: required.has(key) && !managed,
      readonly: managed,
      path: state.pathFields.config.includes(key),
      planned: state.plannedFields.includes(key),
    }));
  }
}

// Keys a start-frame (conditioning) dataset does not use: its images are resized to the bucket of the
// clip they start (that dataset's resolution and crop), they have no captions and no frames of their own.
const UNUSED_BY_START_FRAMES = new Set([
  "is_i2v", "caption_strategy", "instance_prompt", "resolution", "crop", "crop_style", "cache_dir_text",
  "conditioning_data", "repeats", "video",
]);

function datasetCard(entry) {
  const root = state.schema.dataset;
  const required = new Set(root.required || []);
  const body = el("div", { class: "form-grid" });
  for (const [key, prop] of Object.entries(root.properties)) {
    const field = buildField(key, prop, root, entry[key], {
      required: required.has(key), path: state.pathFields.dataset.includes(key),
    });
    if (UNUSED_BY_START_FRAMES.has(key)) field.classList.add("unused-for-start-frames");
    body.append(field);
  }
  const card = el("div", { class: "card dataset" },
    el("div", { class: "toolbar" },
      el("h3", { text: entry.id || "new dataset" }),
      el("span", { class: "grow" }),
      el("button", { type: "button", onclick: () => { card.remove(); scheduleValidate(); } }, "Remove")),
    el("div", { class: "errors card-errors" }),
    el("p", { class: "muted start-frames-note", text: "Start frames: each image is resized and cropped to the bucket of the clip it starts, "
      + "by that clip dataset's resolution and crop, so only the folder and its cache are set here." }),
    body);
  const update = () => {
    const values = readForm(body);
    $("h3", card).textContent = values.id || "new dataset";
    card.classList.toggle("conditioning", values.dataset_type === "conditioning");
  };
  body.addEventListener("input", update);
  body.addEventListener("change", update);
  update();
  return card;
}

function buildDatasets(datasets) {
  const list = $("#datasets-form");
  list.replaceChildren(...datasets.map(datasetCard));
}

function readDatasets() {
  return [...document.querySelectorAll("#datasets-form .dataset")].map((card) => readForm($(".form-grid", card)));
}

function collectConfig() {
  return { config: readForm($("#config-form")), datasets: readDatasets() };
}

function setSaveState(text, kind) {
  for (const node of document.querySelectorAll(".save-state")) {
    node.textContent = text;
    node.className = `save-state ${kind}`;
  }
}

function showErrors(errors) {
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll(".field.invalid")) node.classList.remove("invalid");
  for (const node of document.querySelectorAll(".card-errors")) node.textContent = "";
  const general = [];
  const cards = [...document.querySelectorAll("#datasets-form .dataset")];
  for (const error of errors) {
    const [file, ...rest] = error.loc;
    let container = null, key = null;
    if (file === "config" && rest.length) { container = $("#config-form"); key = rest[0]; }
    if (file === "datasets" && rest.length >= 2) {
      const card = cards[Number(rest[0])];
      container = card && $(".form-grid", card);
      key = rest[rest.length - 1];
      const field = card && container.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
      const hidden = field && card.classList.contains("conditioning") && field.closest(".unused-for-start-frames");
      if (card && (!field || hidden)) {
        $(".card-errors", card).textContent += `${rest.slice(1).join(".")}: ${error.msg} `;
        continue;
      }
    }
    const target = container && container.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
    if (target) {
      target.textContent = error.msg;
      target.parentElement.classList.add("invalid");
    } else {
      general.push(`${error.loc.join(".")}: ${error.msg}`);
    }
  }
  $("#config-general-errors").replaceChildren(...general.map((text) => el("div", { text })));
  // Problems of the other page block saving too: say where they are.
  const configProblems = errors.filter((e) => e.loc[0] === "config").length;
  const datasetProblems = errors.length - configProblems;
  $("#datasets-general-errors").textContent = configProblems ? `${configProblems} problem(s) on the Config page block saving.` : "";
  if (datasetProblems) $("#config-general-errors").append(el("div", { text: `${datasetProblems} problem(s) on the Datasets page block saving.` }));
}

let validateTimer = null;
function scheduleValidate() {
  clearTimeout(validateTimer);
  setSaveState("unsaved changes", "muted");
  validateTimer = setTimeout(async () => {
    try {
      const { data } = await api("POST", "/api/config/validate", collectConfig());
      showErrors(data.errors);
    } catch (err) { banner(err.message); }
  }, 350);
}

async function saveConfig() {
  clearTimeout(validateTimer);
  try {
    const { status, data } = await api("PUT", "/api/config", collectConfig());
    showErrors(data.errors || []);
    if (status === 200) setSaveState(`saved ${new Date().toLocaleTimeString()}`, "ok");
    else setSaveState(`not saved: ${data.errors.length} problem(s)`, "bad");
    if (status === 200) $("#preview-model").placeholder = readForm($("#config-form")).pretrained_model_name_or_path || "";
  } catch (err) { banner(err.message); }
}

function addI2VTemplate() {
  // The guide's image-to-video layout: <root>/clips/x.mp4 (+ x.txt caption) paired with
  // <root>/start-frames/x.png. Add it once for the training set and once for the eval split.
  const root = prompt("Folder holding clips/ and start-frames/ (add the eval split's folder separately):", state.info.cwd);
  if (!root) return;
  const base = root.replace(/\/+$/, "");
  const id = base.split("/").pop() || "videos";
  const entries = [
    { id, dataset_type: "video", is_i2v: true, instance_data_dir: `${base}/clips`, caption_strategy: "textfile", cache_dir_vae: `${base}/cache/video`, conditioning_data: [`${id}-cond`] },
    { id: `${id}-cond`, dataset_type: "conditioning", instance_data_dir: `${base}/start-frames`, caption_strategy: null, cache_dir_vae: `${base}/cache/start-frames` },
  ];
  for (const entry of entries) $("#datasets-form").append(datasetCard(entry));
  scheduleValidate();
}

async function importConfig(event) {
  event.preventDefault();
  const path = $("#config-import-path").value.trim();
  if (!path) return;
  try {
    const { data } = await api("GET", `/api/config/import?path=${encodeURIComponent(path)}`);
    buildConfigForm(data.config);
    buildDatasets(data.datasets);
    $("#config-import-state").textContent = `loaded ${data.source} (${data.datasets.length} datasets); press Save to use it`;
    scheduleValidate();
  } catch (err) { $("#config-import-state").textContent = err.message; }
}

async function loadConfigPage() {
  const [{ data: schema }, { data: info }, { data: saved }] = await Promise.all([
    api("GET", "/api/schema"), api("GET", "/api/info"), api("GET", "/api/config"),
  ]);
  state.schema = schema;
  state.info = info;
  state.pathFields = schema.path_fields;
  state.plannedFields = schema.planned_fields || [];
  // The preview form starts from the schema's sampling defaults (the same as `longcat-tuner sample`).
  for (const key of ["frames", "steps", "guidance", "resolution", "seed"]) {
    $(`#preview-${key}`).value = schema.sampling.properties[key].default;
  }
  if (saved.detail) { // a saved file the server cannot read: say so, and do not offer to overwrite it
    banner(detailText(saved.detail));
    setSaveState("the saved config cannot be read: fix the file, then reload", "bad");
    for (const button of document.querySelectorAll(".save-config")) button.disabled = true;
    return;
  }
  $("#config-path").textContent = saved.config_path;
  $("#datasets-path").textContent = saved.datasets_path;
  buildConfigForm(saved.config || {});
  buildDatasets(saved.datasets || []);
  setSaveState(saved.saved ? "saved" : "not saved yet", "muted");
  $("#preview-model").placeholder = saved.config.pretrained_model_name_or_path || "checkpoint folder";
}

// ---------------------------------------------------------------------------------------------
// Dataset check
// ---------------------------------------------------------------------------------------------
async function runCheck() {
  $("#check-report").replaceChildren();
  try {
    const { data } = await api("POST", "/api/checks");
    pollCheck(data.id);
  } catch (err) { $("#check-state").textContent = err.message; }
}

async function pollCheck(id) {
  const { data } = await api("GET", `/api/checks/${id}`);
  $("#check-state").textContent = data.status;
  $("#check-log").textContent = data.log.join("\n");
  if (data.status === "running" || data.status === "stopping") { setTimeout(() => pollCheck(id), 1000); return; }
  if (data.report) renderCheckReport(data.report);
  else $("#check-report").replaceChildren(el("div", { class: "errors", text: "check failed; see the output below" }));
  $("#check-log").parentElement.open = data.status !== "completed";
}

// Renders the JSON of `longcat-tuner check --json` (data/backends.py `plan_summary`).
function renderCheckReport(report) {
  const out = [];
  const blocking = report.blocking || [];
  out.push(el("div", { class: `card ${blocking.length ? "bad" : "ok"}`, id: "check-summary" },
    blocking.length ? el("strong", { text: "Training could not start:" }) : el("strong", { text: "Ready to train." }),
    el("span", { text: ` ${report.train_items} training items, ${report.eval_items} eval items.` }),
    blocking.length ? el("ul", {}, blocking.map((text) => el("li", { text }))) : null));
  for (const ds of report.datasets || []) {
    const samples = ds.samples || [];
    const problems = [...(ds.skipped || []).map((p) => ({ ...p, label: "skipped" })), ...(ds.warnings || []).map((p) => ({ ...p, label: "warning" }))];
    const card = el("div", { class: "card check-dataset", "data-dataset": ds.id },
      el("h3", {}, `${ds.id} `, el("span", { class: "status", text: ds.role }), " ",
        el("span", { class: "muted", text: ds.is_i2v ? `I2V clips + start frames from ${ds.conditioning_data.join(", ")}` : ds.dataset_type })),
      el("div", { class: "stats" },
        stat("usable", ds.items), stat("scanned", ds.scanned), stat("skipped", (ds.skipped || []).length), stat("repeats", ds.repeats)));
    const buckets = Object.entries(ds.buckets || {});
    if (buckets.length) {
      card.append(el("h4", { text: "buckets (frames x height x width)" }), el("table", { class: "table compact" }, el("tbody", {},
        buckets.map(([name, count]) => el("tr", {}, el("td", {}, el("code", { text: name })), el("td", { text: `${count} items` }))))));
    }
    if (samples.length) {
      card.append(el("h4", { text: samples.length < ds.items ? `pairs (first ${samples.length})` : "pairs" }));
      card.append(el("div", { class: "thumbs" }, samples.map((sample) => el("figure", {},
        sample.start_frame
          ? el("img", { src: `/api/image?size=200&path=${encodeURIComponent(sample.start_frame)}`, alt: sample.start_frame, title: sample.start_frame, loading: "lazy" })
          : el("div", { class: "noimg", text: "no start frame (text-to-video)" }),
        el("figcaption", {}, el("code", { text: sample.key }), ` ${sample.bucket}`, el("div", { class: "muted", text: sample.caption || "(empty caption)" }))))));
    }
    if (problems.length) {
      card.append(el("h4", { text: "skipped files and warnings" }), el("ul", { class: "skipped" },
        problems.map((p) => el("li", { class: p.label }, el("strong", { text: `${p.label}: ` }), el("code", { text: p.path }), ` ${p.reason}`))));
    }
    out.push(card);
  }
  if ((report.conditioning || []).length) {
    out.push(el("div", { class: "card" }, el("h3", { text: "start frames without a clip" }), el("ul", { class: "skipped" },
      report.conditioning.map((p) => el("li", {}, el("code", { text: `${p.dataset_id}: ${p.path}` }), ` ${p.reason}`)))));
  }
  $("#check-report").replaceChildren(...out);
}

function stat(label, value) {
  return el("div", {}, el("span", { class: "label", text: label }), el("span", { text: String(value ?? "-") }));
}

// ---------------------------------------------------------------------------------------------
// Runs: list, start/stop/resume, live progress over server-sent events
// ---------------------------------------------------------------------------------------------
const live = { id: null, source: null, history: [], losses: [], validations: [], log: [], partial: null, status: null, alive: false };

async function refreshRuns() {
  let runs;
  try { runs = (await api("GET", "/api/runs")).data; } catch (err) { banner(err.message); return; }
  const body = $("#runs-table tbody");
  body.replaceChildren(...runs.map((run) => el("tr", { class: run.id === live.id ? "selected" : "", "data-run": run.id },
    el("td", {}, el("a", { href: "#runs", onclick: () => selectRun(run.id) }, run.id)),
    el("td", {}, el("span", { class: `status ${run.status}`, text: run.status })),
    el("td", { class: "run-step", text: run.step === null ? "-" : `${run.step} / ${run.total_steps ?? "?"}` }),
    el("td", { class: "run-loss", text: fmt.num(run.loss) }),
    el("td", {}, el("code", { text: run.output_dir || "" })),
    el("td", {}, el("button", { onclick: () => selectRun(run.id) }, "watch")))));
  if (!live.id && runs.length) selectRun(runs[0].id);
  fillGalleryRuns(runs);
}

async function startRun() {
  try {
    const { data } = await api("POST", "/api/runs", {});
    await refreshRuns();
    selectRun(data.id);
  } catch (err) { banner(err.message); }
}

async function stopRun() {
  $("#run-stop").disabled = true; // one SIGTERM: a second would interrupt the checkpoint being written
  try { await api("POST", `/api/runs/${live.id}/stop`); } catch (err) { banner(err.message); }
}

async function resumeRun() {
  try {
    const { data } = await api("POST", `/api/runs/${live.id}/resume`);
    await refreshRuns();
    selectRun(data.id);
  } catch (err) { banner(err.message); }
}

function selectRun(id) {
  if (live.source) live.source.close();
  Object.assign(live, { id, source: null, history: [], losses: [], validations: [], log: [], partial: null, status: null, alive: false });
  $("#run-detail").hidden = false;
  $("#run-id").textContent = id;
  // Until the stream reports the status, neither button may act on a run that may have ended.
  $("#run-stop").disabled = true;
  $("#run-resume").disabled = true;
  const gallery = $("#gallery-run");
  if ([...gallery.options].some((o) => o.value === id)) gallery.value = id;
  $("#run-log").textContent = "";
  $("#run-message").textContent = "";
  for (const key of ["step", "loss", "speed", "eta", "mem", "plan"]) $(`#stat-${key}`).textContent = "-";
  $("#stat-validations").textContent = "0";
  drawLoss();
  const source = new EventSource(`/api/runs/${encodeURIComponent(id)}/events`);
  live.source = source;
  // Each (re)connection replays the run's events from its start: begin from a clean slate.
  source.onopen = () => Object.assign(live, { history: [], losses: [], validations: [], log: [], partial: null });
  source.addEventListener("train", (msg) => onTrainEvent(JSON.parse(msg.data)));
  // A resumed run: the earlier runs' losses up to its checkpoint, drawn in grey before its own.
  source.addEventListener("history", (msg) => { live.history = JSON.parse(msg.data).points; drawLoss(); });
  source.addEventListener("log", (msg) => {
    const { lines, partial } = JSON.parse(msg.data);
    live.log.push(...lines);
    live.log = live.log.slice(-300);
    live.partial = partial; // the progress bar line still being redrawn
    const pre = $("#run-log");
    pre.textContent = live.log.concat(partial ? [partial] : []).join("\n");
    pre.scrollTop = pre.scrollHeight;
  });
  source.addEventListener("status", (msg) => { showRunStatus(JSON.parse(msg.data)); refreshRuns(); });
  source.addEventListener("done", () => { source.close(); refreshRuns(); });
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) live.source = null; };
}

function showRunStatus(run) {
  const node = $("#run-status");
  node.textContent = run.status;
  node.className = `status ${run.status}`;
  $("#run-message").textContent = run.message || "";
  // Stop only while the trainer runs: not once it wrote its end event (it may still be saving), not after.
  $("#run-stop").disabled = !run.alive || !["starting", "running"].includes(run.status);
  live.status = run.status;
  live.alive = run.alive;
  pollGpu();
  // Resuming needs the process gone (it still writes its checkpoint after the `end` event).
  $("#run-resume").disabled = run.alive || run.status === "completed";
  if (run.peak_mem_gib !== null && run.peak_mem_gib !== undefined) $("#stat-mem").textContent = `${fmt.num(run.peak_mem_gib, 3)} GiB`;
}

// GPU memory and utilisation (GET /api/system/gpu reads nvidia-smi) while the selected run trains.
let gpuTimer = null, gpuWasTraining = false;
async function pollGpu() {
  clearTimeout(gpuTimer);
  const training = live.alive && ["starting", "running", "stopping"].includes(live.status);
  // Read once, then every 3 s while a run trains, and once more when it stops (the memory it gave back).
  if (!training && !gpuWasTraining && $("#stat-gpu").dataset.state) return;
  gpuWasTraining = training;
  let data;
  try { data = (await api("GET", "/api/system/gpu")).data; } catch (err) { data = { available: false, gpus: [], message: `no GPU: ${err.message}` }; }
  showGpu(data);
  if (training && !$("#tab-runs").hidden) gpuTimer = setTimeout(pollGpu, 3000);
}

function showGpu(data) {
  const node = $("#stat-gpu");
  node.dataset.state = data.available ? "gpu" : "none";
  node.title = data.message || data.gpus.map((g) => `GPU ${g.index}: ${g.name}`).join("\n");
  if (!data.available) { node.textContent = "no GPU"; return; }
  const gib = (mib) => (mib === null || mib === undefined ? "?" : (mib / 1024).toFixed(1));
  node.textContent = data.gpus.map((g) => `${gib(g.memory_used_mib)} / ${gib(g.memory_total_mib)} GiB` +
    (g.utilization_pct === null || g.utilization_pct === undefined ? "" : ` · ${Math.round(g.utilization_pct)}%`)).join("; ");
}

// The run's memory plan (`memory_plan` event): predicted speed and peak when the planner chose, the settings
// and the reason on hover.
function showPlan(plan) {
  const node = $("#stat-plan");
  const who = plan.revised ? "auto, revised after running out of memory" : plan.source === "auto" ? "auto" : "as configured";
  node.textContent = plan.predicted_step_s !== null && plan.predicted_step_s !== undefined
    ? `${fmt.num(plan.predicted_step_s, 3)} s/step, ${fmt.num(plan.predicted_peak_gib, 3)} GiB (${who})`
    : who;
  node.title = [plan.describe, plan.reason].filter(Boolean).join("\n");
}

function onTrainEvent(event) {
  if (event.event === "step") {
    if (event.loss !== null && event.loss !== undefined) live.losses.push([event.step, event.loss]);
    $("#stat-step").textContent = `${event.step} / ${event.total_steps ?? "?"}`;
    $("#stat-loss").textContent = fmt.num(event.loss);
    const row = document.querySelector(`#runs-table tr[data-run="${CSS.escape(live.id)}"]`);
    if (row) {
      $(".run-step", row).textContent = $("#stat-step").textContent;
      $(".run-loss", row).textContent = fmt.num(event.loss);
    }
    $("#stat-speed").textContent = event.s_per_step ? `${fmt.num(event.s_per_step, 3)} s` : "-";
    $("#stat-eta").textContent = fmt.secs(event.eta_s);
    if (event.peak_mem_gib !== null && event.peak_mem_gib !== undefined) $("#stat-mem").textContent = `${fmt.num(event.peak_mem_gib, 3)} GiB`;
    drawLoss();
  } else if (event.event === "validation") {
    live.validations.push(event);
    $("#stat-validations").textContent = String(live.validations.length);
    if (galleryRun() === live.id) renderGallery(live.id, live.validations);
  } else if (event.event === "error") {
    $("#run-message").textContent = event.message;
  } else if (event.event === "end") {
    $("#run-stop").disabled = true; // the run is over; the process may still be writing its files
  } else if (event.event === "start") {
    $("#stat-step").textContent = `0 / ${event.total_steps ?? "?"}`;
  } else if (event.event === "memory_plan") {
    showPlan(event);
  }
}

// Labels of `count + 1` evenly spaced ticks from y0 to y1, all with the same number of decimals: as many
// as the tick spacing needs, and more until neighbours differ (a loss that moves in its 4th digit must
// not label every tick "0.123").
function yTickLabels(y0, y1, count = 4) {
  const values = Array.from({ length: count + 1 }, (_, i) => y0 + ((y1 - y0) * i) / count);
  const spacing = Math.abs(y1 - y0) / count || Math.abs(y0) || 1;
  let labels = [];
  for (let digits = Math.max(0, -Math.floor(Math.log10(spacing))); digits <= 15; digits++) {
    labels = values.map((v) => v.toFixed(digits));
    if (new Set(labels).size === labels.length) break;
  }
  return labels;
}

function drawLoss() {
  const canvas = $("#loss-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 900, height = canvas.clientHeight || 260;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const points = live.history.concat(live.losses);
  const own = live.history.length; // points before this index come from the runs this one resumed
  canvas.dataset.points = String(live.losses.length);
  canvas.dataset.history = String(own);
  const pad = { left: 60, right: 16, top: 16, bottom: 30 };
  ctx.strokeStyle = "#c9ced6";
  ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
  ctx.fillStyle = "#5b6472";
  ctx.font = "12px system-ui, sans-serif";
  if (!points.length) {
    ctx.fillText("waiting for the first step…", pad.left + 12, pad.top + 24);
    return;
  }
  const steps = points.map((p) => p[0]), losses = points.map((p) => p[1]);
  const x0 = Math.min(...steps), x1 = Math.max(...steps, x0 + 1);
  let y0 = Math.min(...losses), y1 = Math.max(...losses);
  if (y1 - y0 < 1e-9) { y0 -= 0.5 * Math.abs(y0 || 1); y1 += 0.5 * Math.abs(y1 || 1); }
  const px = (s) => pad.left + ((s - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const py = (l) => pad.top + (1 - (l - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  const labels = yTickLabels(y0, y1, 4);
  canvas.dataset.yLabels = labels.join("|");
  labels.forEach((text, i) => ctx.fillText(text, 6, py(y0 + ((y1 - y0) * i) / 4) + 4));
  ctx.fillText(`step ${x0}`, pad.left, height - 10);
  ctx.fillText(`step ${x1}`, width - pad.right - 60, height - 10);
  ctx.strokeStyle = "#9bb7e0";
  ctx.lineWidth = 1;
  ctx.beginPath();
  points.forEach(([s, l], i) => (i ? ctx.lineTo(px(s), py(l)) : ctx.moveTo(px(s), py(l))));
  ctx.stroke();
  // Exponential moving average: raw diffusion losses are noisy (random sigma per step).
  ctx.strokeStyle = "#1f5fbf";
  ctx.lineWidth = 2;
  ctx.beginPath();
  let ema = losses[0];
  points.forEach(([s, l], i) => {
    ema = i ? 0.9 * ema + 0.1 * l : l;
    i ? ctx.lineTo(px(s), py(ema)) : ctx.moveTo(px(s), py(ema));
  });
  ctx.stroke();
  points.forEach(([s, l], i) => {
    ctx.fillStyle = i < own ? "#a3a9b3" : "#1f5fbf";
    ctx.fillRect(px(s) - 1.5, py(l) - 1.5, 3, 3);
  });
  if (own) {
    const at = px(points[own - 1][0]);
    ctx.strokeStyle = "#a3a9b3";
    ctx.setLineDash([4, 4]);
    ctx.beginPath();
    ctx.moveTo(at, pad.top);
    ctx.lineTo(at, height - pad.bottom);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = "#5b6472";
    ctx.fillText(`resumed at step ${points[own - 1][0]}`, Math.min(at + 6, width - pad.right - 130), pad.top + 14);
  }
}

// ---------------------------------------------------------------------------------------------
// Validation gallery
// ---------------------------------------------------------------------------------------------
function galleryRun() { return $("#gallery-run").value; }

function fillGalleryRuns(runs) {
  const select = $("#gallery-run");
  const current = live.id || select.value || (runs[0] && runs[0].id) || "";
  select.replaceChildren(...runs.map((run) => el("option", { value: run.id, text: `${run.id} (${run.status})` })));
  select.value = current;
}

async function refreshGallery() {
  if (!$("#gallery-run").options.length) await refreshRuns();
  const id = galleryRun();
  if (!id) { $("#gallery").replaceChildren(el("p", { class: "muted", text: "No runs yet." })); return; }
  if (id === live.id && live.source) { renderGallery(id, live.validations); return; }
  const { data } = await api("GET", `/api/runs/${encodeURIComponent(id)}?events=validation`);
  renderGallery(id, data.events);
}

// The start frame a validation video began from: named by the event, or found by the server in the
// run's eval split (GET /api/runs/{id}/start-frame); text-to-video samples have none.
function startFrameImage(runId, item) {
  const src = item.start_frame
    ? `/api/image?size=320&path=${encodeURIComponent(item.start_frame)}`
    : `/api/runs/${encodeURIComponent(runId)}/start-frame?size=320&video=${encodeURIComponent(item.video)}`;
  const box = el("div", { class: "start-frame" }, el("span", { class: "label", text: "start frame" }));
  box.append(el("img", { src, alt: "start frame", loading: "lazy",
    onload: (event) => { event.target.dataset.loaded = "1"; },
    onerror: () => box.replaceChildren(el("span", { class: "label", text: "start frame" }), el("div", { class: "noimg", text: "no start frame" })) }));
  return box;
}

function renderGallery(runId, validations) {
  const out = [];
  for (const validation of [...validations].reverse()) {
    const items = validation.items || [];
    out.push(el("div", { class: "card validation" },
      el("h3", { text: `step ${validation.step}` + (validation.heldout_loss !== undefined && validation.heldout_loss !== null ? ` · held-out loss ${fmt.num(validation.heldout_loss)}` : "") }),
      el("div", { class: "videos" }, items.map((item) => el("figure", {},
        el("div", { class: "pair" },
          startFrameImage(runId, item),
          el("div", {}, el("span", { class: "label", text: "generated" }),
            el("video", { src: `/api/runs/${encodeURIComponent(runId)}/files/${item.video.split("/").map(encodeURIComponent).join("/")}`, controls: true, loop: true, muted: true, preload: "metadata", playsinline: true, onloadedmetadata: markLoaded }))),
        el("figcaption", {},
          el("div", { text: item.prompt || "(empty prompt)" }),
          el("div", { class: "muted", title: "PSNR of the first generated frames after the start frame against it: a drop means the opening drifts away from the start frame",
            text: `early-frame drift (frames 1-${item.early_frames || 4} vs start frame) ${item.early_frame_drift_psnr === null || item.early_frame_drift_psnr === undefined ? "-" : `${fmt.num(item.early_frame_drift_psnr, 3)} dB`}` })))))));
  }
  if (!out.length) out.push(el("p", { class: "muted", text: "No validation yet for this run." }));
  $("#gallery").replaceChildren(...out);
}

// ---------------------------------------------------------------------------------------------
// Preview
// ---------------------------------------------------------------------------------------------
const preview = { upload: null, current: null };

async function refreshPreviews() {
  let previews;
  try { previews = (await api("GET", "/api/previews")).data; } catch (err) { banner(err.message); return; }
  $("#preview-history").replaceChildren(...previews.map((p) => el("li", {},
    el("span", { class: `status ${p.status}`, text: p.status }), " ",
    el("span", { text: `${fmt.time(p.started)} · ${p.request.prompt}` }),
    el("span", { class: "muted", text: ` · ${p.request.frames} frames, ${p.request.steps} steps${p.request.model ? `, model ${p.request.model.split("/").slice(-2).join("/")}` : ""}${p.request.lora ? `, LoRA ${p.request.lora.split("/").slice(-3).join("/")}` : ", no LoRA"}` }), " ",
    p.video ? el("button", { type: "button", onclick: () => showPreviewVideo(p.video) }, "show") : null)));
  $("#preview-history-box").hidden = !previews.length;
}

function showPreviewVideo(src) {
  $("#preview-output").replaceChildren(el("video", { id: "preview-video", src, controls: true, autoplay: true, loop: true, muted: true, playsinline: true, onloadedmetadata: markLoaded }));
}

async function refreshLoras() {
  try {
    const { data } = await api("GET", "/api/loras");
    const select = $("#preview-lora");
    const current = select.value;
    select.replaceChildren(el("option", { value: "", text: "base model (no LoRA)" }),
      ...data.map((lora) => el("option", { value: lora.path, title: lora.path,
        text: lora.run ? `run ${lora.run} / ${lora.name}` : `${lora.run_dir.split("/").slice(-2).join("/")} / ${lora.name}` })));
    select.value = [...select.options].some((o) => o.value === current) ? current : "";
  } catch (err) { banner(err.message); }
}

// The model field suggests the base model and every full fine-tune (model_type: full) found: a fine-tune's
// output_dir samples its DiT with the base model's text encoder and VAE (recorded in its base_model.json).
async function refreshModels() {
  try {
    const { data } = await api("GET", "/api/models");
    $("#preview-models").replaceChildren(...data.map((model) => el("option", { value: model.path,
      label: model.kind === "base" ? "base model (saved config)"
        : `full fine-tune${model.run ? ` of run ${model.run}` : ""}${model.step != null ? `, step ${model.step}` : ""}` })));
  } catch (err) { banner(err.message); }
}

async function uploadStartFrame() {
  const file = $("#preview-file").files[0];
  preview.upload = null;
  $("#preview-error").textContent = "";
  if (!file) return;
  const form = new FormData();
  form.append("file", file);
  try {
    const { data } = await api("POST", "/api/uploads", form);
    preview.upload = data.id;
    const thumb = $("#preview-thumb");
    thumb.src = `/api/uploads/${data.id}`;
    thumb.hidden = false;
    thumb.dataset.upload = data.id;
  } catch (err) { $("#preview-error").textContent = err.message; }
}

async function runPreview(event) {
  event.preventDefault();
  $("#preview-error").textContent = "";
  if (!preview.upload) { $("#preview-error").textContent = "choose a start frame first"; return; }
  const body = {
    upload: preview.upload,
    prompt: $("#preview-prompt").value,
    model: $("#preview-model").value.trim() || null,
    lora: $("#preview-lora-path").value.trim() || $("#preview-lora").value || null, // a typed path wins
    frames: Number($("#preview-frames").value),
    steps: Number($("#preview-steps").value),
    guidance: Number($("#preview-guidance").value),
    resolution: $("#preview-resolution").value.trim(),
    seed: Number($("#preview-seed").value),
    fast: $("#preview-fast").checked,
  };
  try {
    const { status, data } = await api("POST", "/api/previews", body);
    if (status === 422) { $("#preview-error").textContent = detailText(data.detail); return; }
    $("#preview-output").replaceChildren();
    $("#preview-run").disabled = true;
    pollPreview(data.id);
  } catch (err) { $("#preview-error").textContent = err.message; }
}

async function cancelPreview() {
  try { await api("POST", `/api/previews/${preview.current}/stop`); } catch (err) { banner(err.message); }
}

async function pollPreview(id) {
  let data;
  try { data = (await api("GET", `/api/previews/${id}`)).data; } catch (err) { banner(err.message); return; }
  const bar = $("#preview-progress");
  $("#preview-state").textContent = `preview ${data.id}: ${data.status}` + (data.progress ? ` (step ${data.progress.done}/${data.progress.total})` : "");
  $("#preview-log").textContent = (data.messages || data.log).slice(-12).join("\n");
  bar.hidden = data.status !== "running";
  $("#preview-cancel").hidden = data.status !== "running";
  preview.current = data.id;
  if (data.progress) { bar.max = data.progress.total; bar.value = data.progress.done; } else bar.removeAttribute("value");
  if (data.status === "running" || data.status === "stopping") { setTimeout(() => pollPreview(id), 1000); return; }
  $("#preview-run").disabled = false;
  if (data.video) showPreviewVideo(data.video);
  refreshPreviews();
}

// ---------------------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", async () => {
  window.addEventListener("hashchange", showTab);
  $("#config-form").addEventListener("input", scheduleValidate);
  $("#config-form").addEventListener("change", scheduleValidate);
  $("#datasets-form").addEventListener("input", scheduleValidate);
  $("#datasets-form").addEventListener("change", scheduleValidate);
  for (const button of document.querySelectorAll(".save-config")) button.addEventListener("click", saveConfig);
  $("#dataset-add").addEventListener("click", () => { $("#datasets-form").append(datasetCard({})); scheduleValidate(); });
  $("#dataset-add-i2v").addEventListener("click", addI2VTemplate);
  $("#check-run").addEventListener("click", runCheck);
  $("#config-import").addEventListener("submit", importConfig);
  $("#run-start").addEventListener("click", startRun);
  $("#run-stop").addEventListener("click", stopRun);
  $("#run-resume").addEventListener("click", resumeRun);
  $("#gallery-run").addEventListener("change", refreshGallery);
  $("#preview-file").addEventListener("change", uploadStartFrame);
  $("#preview-form").addEventListener("submit", runPreview);
  $("#preview-cancel").addEventListener("click", cancelPreview);
  window.addEventListener("resize", drawLoss);
  try {
    await loadConfigPage();
  } catch (err) { banner(`could not load the UI: ${err.message}`); }
  showTab();
  document.body.dataset.ready = "1";
});
