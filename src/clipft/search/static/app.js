// clipft search page: plain JS over the JSON API (/api/indexes, /api/search, /api/similar, /api/duplicates).
"use strict";

const $ = (sel) => document.querySelector(sel);
let indexes = [];  // [{index, model, images, root}]

function setStatus(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("error", isError);
}

async function getJSON(url) {
  const resp = await fetch(url);
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || resp.statusText);
  return body;
}

function card(hit, indexNo, withScore) {
  const node = $("#card-template").content.firstElementChild.cloneNode(true);
  node.dataset.id = hit.id;
  node.dataset.path = hit.path;
  node.dataset.index = indexNo;
  const img = node.querySelector("img");
  img.src = `/thumb/${hit.id}?index=${indexNo}`;
  img.alt = hit.path;
  node.querySelector(".score").textContent = withScore ? hit.score.toFixed(3) : "";
  const link = node.querySelector(".path");
  link.textContent = hit.path;
  link.href = `/image/${hit.id}?index=${indexNo}`;
  const more = (ev) => { ev.preventDefault(); similar(hit.id, indexNo, true); };
  node.querySelector("a.more").addEventListener("click", more);
  node.querySelector(".more-button").addEventListener("click", more);
  return node;
}

function columns() {
  const main = $("#columns");
  main.replaceChildren();
  return indexes.map((ix) => {
    const col = document.createElement("section");
    col.className = "column";
    col.dataset.index = ix.index;
    const h = document.createElement("h2");
    h.textContent = `${ix.model} (${ix.images} images)`;
    const took = document.createElement("span");
    took.className = "took";
    h.append(" ", took);
    const grid = document.createElement("div");
    grid.className = "grid";
    col.append(h, grid);
    main.append(col);
    return {col, grid, took};
  });
}

async function showResults(label, urlFor) {
  setStatus(`${label} ...`);
  const cols = columns();
  try {
    const answers = await Promise.all(indexes.map((ix) => getJSON(urlFor(ix.index))));
    answers.forEach((a, i) => {
      cols[i].took.textContent = `${a.took_ms} ms`;
      cols[i].grid.replaceChildren(...a.results.map((h) => card(h, indexes[i].index, true)));
    });
    setStatus(`${label}: ${answers[0].results.length} results`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function k() { return encodeURIComponent($("#k").value || "24"); }

function search(q, push) {
  if (push) history.pushState({}, "", `/?q=${encodeURIComponent(q)}`);
  document.title = `${q} - clipft search`;
  return showResults(`"${q}"`, (i) => `/api/search?q=${encodeURIComponent(q)}&k=${k()}&index=${i}`);
}

function similar(id, from, push) {
  if (push) history.pushState({}, "", `/?similar=${id}&index=${from}`);
  return showResults(`more like #${id}`, (i) => `/api/similar/${id}?k=${k()}&index=${from}&target=${i}`);
}

async function duplicates(threshold, push) {
  if (push) history.pushState({}, "", `/?duplicates=${threshold}`);
  setStatus("finding near-duplicates ...");
  const cols = columns();
  try {
    const answers = await Promise.all(indexes.map((ix) => getJSON(`/api/duplicates?threshold=${threshold}&index=${ix.index}`)));
    answers.forEach((a, i) => {
      cols[i].took.textContent = `${a.groups.length} groups at ${a.threshold}`;
      cols[i].grid.className = "groups";
      cols[i].grid.replaceChildren(...a.groups.map((g) => {
        const row = document.createElement("div");
        row.className = "group";
        row.append(...g.map((h) => card(h, indexes[i].index, false)));
        return row;
      }));
    });
    setStatus(`near-duplicates at cosine >= ${threshold}`);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function fromURL() {
  const p = new URLSearchParams(location.search);
  if (p.get("q")) { $("#q").value = p.get("q"); return search(p.get("q"), false); }
  if (p.get("similar")) return similar(p.get("similar"), p.get("index") || 0, false);
  if (p.get("duplicates")) { $("#threshold").value = p.get("duplicates"); return duplicates(p.get("duplicates"), false); }
  columns();
}

$("#search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("#q").value.trim();
  if (q) search(q, true); else setStatus("type something to search for", true);
});
$("#dup-form").addEventListener("submit", (ev) => { ev.preventDefault(); duplicates($("#threshold").value, true); });
window.addEventListener("popstate", fromURL);

getJSON("/api/indexes").then((body) => {
  indexes = body.indexes;
  const total = indexes.map((ix) => `${ix.images} images (${ix.model})`).join(" | ");
  setStatus(`${indexes[0].root}: ${total}`);
  fromURL();
}).catch((err) => setStatus(err.message, true));
