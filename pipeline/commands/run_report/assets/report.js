// The sample browser of `distill report`. Each dataset's rows are in chunk files (data/<stem>-0000.js, ...) and its
// index (problem, model and label of every row, which the filters run on) in data/<stem>-index.js. They are <script>
// files that hand their data to `distillReport`, loaded when needed: a page opened from file:// may not fetch() the
// files beside it, but it may load their scripts. The filter is kept in the URL hash, so a link opens it filtered:
// index.html#browser=graded&label=correct&model=M&problem=ID&page=2
"use strict";

const PAGE_SIZE = 20;
const config = JSON.parse(document.getElementById("browser-sources").textContent);
const sources = Object.fromEntries(config.sources.map((source) => [source.name, source]));
const scripts = {};  // file -> Promise of its loading
const indexes = {};  // dataset name -> {problems, models, labels, rows: [[problem, model, label], ...]}
const chunks = {};  // dataset name -> chunk number -> rows

window.distillReport = {
  indexLoaded(name, index) { indexes[name] = index; },
  chunkLoaded(name, chunk, rows) { (chunks[name] ||= {})[chunk] = rows; },
};

const controls = Object.fromEntries(["source", "label", "model", "problem", "previous", "next"].map(
  (name) => [name, document.getElementById(`browser-${name}`)]));
const status = document.getElementById("browser-status");
const samples = document.getElementById("browser-samples");
let state = readHash();
let renders = 0;  // a render that a newer one overtook while it waited for files shows nothing

function readHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  return {
    source: params.get("browser") || (config.sources[0] || {}).name || "",
    label: params.get("label") || "",
    model: params.get("model") || "",
    problem: params.get("problem") || "",
    page: Math.max(1, parseInt(params.get("page"), 10) || 1),
  };
}

function writeHash() {
  const params = new URLSearchParams({browser: state.source});
  for (const key of ["label", "model", "problem"]) if (state[key]) params.set(key, state[key]);
  if (state.page > 1) params.set("page", state.page);
  history.replaceState(null, "", `#${params}`);
}

function loadScript(file) {
  scripts[file] ||= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = file;
    script.onload = resolve;
    script.onerror = () => reject(new Error(`cannot load ${file} (is the data/ folder beside index.html?)`));
    document.head.appendChild(script);
  });
  return scripts[file];
}

function element(tag, className, ...children) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

function setOptions(select, values, chosen, anyText) {
  const options = [new Option(anyText, "")];
  // a value asked for in the URL stays choosable even where no row has it (and then nothing matches)
  const all = chosen && !values.includes(chosen) ? [...values, chosen] : values;
  options.push(...all.map((value) => new Option(value, value)));
  select.replaceChildren(...options);
  select.value = chosen;
}

async function render() {
  const thisRender = ++renders;
  controls.source.value = state.source;
  const source = sources[state.source];
  if (!source) {
    status.textContent = config.sources.length ? `no dataset named ${state.source}` : "No dataset with samples.";
    samples.replaceChildren();
    return;
  }
  await loadScript(`${source.files}-index.js`);
  const index = indexes[source.name];
  setOptions(controls.label, index.labels, state.label, "any");
  setOptions(controls.model, index.models, state.model, "any");
  controls.problem.value = state.problem;
  const needle = state.problem.toLowerCase();
  const matching = [];
  index.rows.forEach(([problem, model, label], row) => {
    if (state.label && index.labels[label] !== state.label) return;
    if (state.model && index.models[model] !== state.model) return;
    if (needle && !index.problems[problem].toLowerCase().includes(needle)) return;
    matching.push(row);
  });
  const pages = Math.max(1, Math.ceil(matching.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages);
  const shown = matching.slice((state.page - 1) * PAGE_SIZE, state.page * PAGE_SIZE);
  const needed = new Set(shown.map((row) => Math.floor(row / config.rowsPerChunk)));
  await Promise.all([...needed].map((chunk) => loadScript(`${source.files}-${String(chunk).padStart(4, "0")}.js`)));
  if (thisRender !== renders) return;
  samples.replaceChildren(...shown.map((row) => sampleElement(
    chunks[source.name][Math.floor(row / config.rowsPerChunk)][row % config.rowsPerChunk])));
  const first = (state.page - 1) * PAGE_SIZE + 1;
  status.textContent = `${matching.length} of ${index.rows.length} samples match` +
    (matching.length ? `; showing ${first}–${first + shown.length - 1}, page ${state.page} of ${pages}` : "");
  Object.assign(status.dataset, {matching: matching.length, shown: shown.length, ready: "true"});
  controls.previous.disabled = state.page <= 1;
  controls.next.disabled = state.page >= pages;
}

function sampleElement(row) {
  const label = row.label ?? "ungraded";
  const article = element("article", `sample label-${label}`,
    element("h4", null, `${row.id} · sample ${row.sample} · ${row.model} `, element("span", "label", label)),
    element("details", "prompt", element("summary", null, "prompt"),
      ...(row.prompt || []).map((message) => element("div", null, element("div", "role", message.role),
        element("pre", null, message.content)))),
    element("div", "role", "completion"),
    ...completionElements(row.completion),
    element("dl", null,
      element("dt", null, "extracted"), element("dd", "extracted", row.extracted || "–"),
      element("dt", null, "gold"), element("dd", "gold", row.answer ?? "–"),
      element("dt", null, "label"), element("dd", null, label),
      element("dt", null, "finish"), element("dd", null, row.finish ?? "–")));
  Object.assign(article.dataset, {label, model: row.model, id: row.id, sample: row.sample});
  return article;
}

function completionElements(text) {
  // The reasoning between <think> and </think> folds away; with no <think> it began in the prompt (a think prefix),
  // with no </think> it never ended.
  const open = text.indexOf("<think>");
  let close = text.indexOf("</think>");
  if (open < 0 && close < 0) return [element("pre", "answer", text)];
  const start = open >= 0 && (close < 0 || open < close) ? open + "<think>".length : 0;
  if (close < start) close = -1;
  const thinking = text.slice(start, close < 0 ? text.length : close);
  const summary = `<think> ${thinking.length} characters` + (close < 0 ? ", never closed" : " </think>");
  return [
    start > 0 && open > 0 ? element("pre", "before", text.slice(0, open)) : null,
    element("details", "think", element("summary", null, summary), element("pre", null, thinking)),
    close >= 0 ? element("pre", "answer", text.slice(close + "</think>".length)) : null,
  ].filter(Boolean);
}

function update(change) {
  Object.assign(state, change);
  writeHash();
  render();
}

controls.source.replaceChildren(...config.sources.map(
  (source) => new Option(`${source.title}: ${source.rows} rows`, source.name)));
controls.source.addEventListener("change", () => update({source: controls.source.value, label: "", model: "",
                                                          page: 1}));
controls.label.addEventListener("change", () => update({label: controls.label.value, page: 1}));
controls.model.addEventListener("change", () => update({model: controls.model.value, page: 1}));
controls.problem.addEventListener("input", () => update({problem: controls.problem.value.trim(), page: 1}));
controls.previous.addEventListener("click", () => update({page: state.page - 1}));
controls.next.addEventListener("click", () => update({page: state.page + 1}));
window.addEventListener("hashchange", () => {
  if (new URLSearchParams(location.hash.slice(1)).has("browser")) {  // not a jump to a section
    state = readHash();
    render();
  }
});
render().then(() => {
  if (new URLSearchParams(location.hash.slice(1)).has("browser")) document.getElementById("samples").scrollIntoView();
}, (error) => { status.textContent = String(error); });
