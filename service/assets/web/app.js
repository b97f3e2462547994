// promptserve's web page: list tasks, send images to /v1/classify, draw each task's top-k as bars.
"use strict";

const $ = (selector) => document.querySelector(selector);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return `${response.status} ${body.code || ""}: ${body.detail || body.error || JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function authHeaders() {
  const token = $("#token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function loadTasks() {
  // with a classify token set, the task list needs it too
  const [ready, listing] = await Promise.all([fetch("/readyz"), fetch("/v1/tasks", { headers: authHeaders() })]);
  if (ready.ok) {
    const backbone = (await ready.json()).backbone || {};
    $("#server").textContent = `ready · ${backbone.model || ""} ${backbone.pretrained || ""}`;
  }
  if (!listing.ok) return showError(await errorMessage(listing));
  const { tasks } = await listing.json();
  const list = $("#tasks");
  list.replaceChildren(...tasks.map((task) => element("li", {},
    element("label", {},
      Object.assign(element("input", { type: "checkbox", value: task.name, "data-task": task.name }), { checked: true }),
      ` ${task.name} `,
      element("span", { class: "muted" }, `${task.method} · ${task.num_classes} classes · v${task.version}`)))));
  if (!tasks.length) list.append(element("li", { class: "muted" }, "no tasks yet: upload a bundle"));
}

function selectedTasks() {
  return [...document.querySelectorAll("#tasks input:checked")].map((box) => box.value);
}

async function classify(files) {
  showError("");
  const tasks = selectedTasks();
  if (!tasks.length) return showError("select at least one task");
  const query = new URLSearchParams(tasks.map((task) => ["tasks", task]));
  query.set("top_k", $("#top-k").value || "3");
  const form = new FormData();
  for (const file of files) form.append("images", file, file.name);
  const response = await fetch(`/v1/classify?${query}`, { method: "POST", body: form, headers: authHeaders() });
  if (!response.ok) return showError(await errorMessage(response));
  const { results } = await response.json();
  $("#results").replaceChildren(...results.map((result, i) => imageCard(files[i], result)));
}

function imageCard(file, result) {
  return element("article", { class: "image", "data-filename": result.filename },
    element("img", { src: URL.createObjectURL(file), alt: result.filename }),
    element("div", { class: "answers" },
      element("h3", { style: "grid-column: 1 / -1" }, result.filename),
      ...result.answers.map(answerBars)));
}

function answerBars(answer) {
  return element("div", { class: "answer", "data-task": answer.task },
    element("h4", {}, `${answer.task} `, element("span", { class: "muted" }, `v${answer.version}`)),
    ...answer.predictions.map(({ label, probability }) => {
      const percent = (100 * probability).toFixed(1);
      return element("div", { class: "bar", "data-label": label, "data-probability": probability },
        element("span", {}, label),
        element("span", { class: "track" }, element("span", { class: "fill", style: `display:block;width:${percent}%` })),
        element("span", { class: "pct" }, `${percent}%`));
    }));
}

function setUpDrop() {
  const drop = $("#drop");
  const pick = $("#file");
  pick.addEventListener("change", () => pick.files.length && classify([...pick.files]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const files = [...event.dataTransfer.files].filter((file) => file.type.startsWith("image/"));
    if (files.length) classify(files);
  });
}

setUpDrop();
loadTasks().catch((error) => showError(String(error)));
$("#token").addEventListener("change", () => { showError(""); loadTasks().catch((error) => showError(String(error))); });
