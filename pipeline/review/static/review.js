// tag2mask review: range sliders, overlay opacity and class toggles, keyboard review.
"use strict";

function setupRanges() {
  document.querySelectorAll("fieldset.range").forEach((box) => {
    const lo = box.querySelector(".lo"), hi = box.querySelector(".hi"), out = box.querySelector("output");
    const show = () => { out.textContent = `${(+lo.value).toFixed(3)} – ${(+hi.value).toFixed(3)}`; };
    [lo, hi].forEach((input) => input.addEventListener("input", () => {
      input.dataset.active = "1";
      if (+lo.value > +hi.value) { (input === lo ? hi : lo).value = input.value; }
      show();
    }));
  });
  const form = document.getElementById("filters");
  if (!form) return;
  // Picking a class brings its score and pixel-share sliders: apply at once.
  const cat = form.querySelector("select[name=cat]");
  cat.addEventListener("change", () => form.requestSubmit());
  form.addEventListener("submit", () => {
    // Only the sliders a user moved (or that were already set) become URL parameters.
    form.querySelectorAll("fieldset.range input[type=hidden]").forEach((h) => h.remove());
    form.querySelectorAll("fieldset.range input[type=range]").forEach((input) => {
      if (input.dataset.active === "1") {
        const h = document.createElement("input");
        h.type = "hidden"; h.name = input.dataset.name; h.value = input.value;
        form.appendChild(h);
      }
    });
    form.querySelectorAll("select, input[type=checkbox]").forEach((el) => {
      if (!el.value || (el.type === "checkbox" && !el.checked)) el.disabled = true;
    });
  });
}

async function decide(page, decision) {
  const note = document.getElementById("note");
  const resp = await fetch("/api/decision", {
    method: "POST", headers: {"Content-Type": "application/json"},
    body: JSON.stringify({image_id: page.dataset.id, decision, note: note ? note.value : ""}),
  });
  const badge = document.getElementById("decision");
  if (!resp.ok) { badge.textContent = "not saved: " + (await resp.text()); return; }
  const body = await resp.json();
  badge.textContent = body.decision;
  badge.className = "decision " + body.decision;
  const c = body.counts;
  document.getElementById("counts").textContent =
    `accepted ${c.accept} · rejected ${c.reject} · needs fix ${c.needs_fix}`;
}

function setupImagePage() {
  const page = document.getElementById("image-page");
  if (!page) return;
  const overlay = document.getElementById("overlay"), opacity = document.getElementById("opacity");
  if (opacity && overlay) opacity.addEventListener("input", () => { overlay.style.opacity = opacity.value; });
  document.querySelectorAll("input.toggle").forEach((box) => box.addEventListener("change", () => {
    document.querySelectorAll(`img.mask[data-label="${box.dataset.label}"]`)
      .forEach((img) => { img.style.visibility = box.checked ? "visible" : "hidden"; });
  }));
  document.querySelectorAll("button.decide-btn").forEach((b) =>
    b.addEventListener("click", () => decide(page, b.dataset.decision)));
  const keys = {a: "accept", r: "reject", f: "needs_fix"};
  document.addEventListener("keydown", (ev) => {
    if (ev.target.matches("input:not([type=range]):not([type=checkbox]), textarea") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if ((ev.key === "j" || ev.key === "ArrowRight") && page.dataset.next) { location.href = page.dataset.next; }
    else if ((ev.key === "k" || ev.key === "ArrowLeft") && page.dataset.prev) { location.href = page.dataset.prev; }
    else if (keys[ev.key]) { ev.preventDefault(); decide(page, keys[ev.key]); }
  });
}

function setupTimes() {
  document.querySelectorAll("td.time").forEach((td) => {
    td.textContent = new Date(+td.dataset.t * 1000).toISOString().replace("T", " ").slice(0, 19);
  });
}

document.addEventListener("DOMContentLoaded", () => { setupRanges(); setupImagePage(); setupTimes(); });
