// Ferrylink web UI: live regions and confirmed actions. No framework, no build step.
"use strict";

const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

function showResult(ok, message) {
  const box = document.getElementById("result");
  box.hidden = false;
  box.className = "result " + (ok ? "ok" : "failed");
  box.textContent = message;
}

// Regions marked data-live="URL" are re-rendered from the server's HTML fragment every
// data-interval ms; replaced only when the fragment changed, so focus and open <details>
// survive quiet polls.
function startLive(region) {
  const url = region.dataset.live;
  const interval = Number(region.dataset.interval || 1500);
  const stamp = document.querySelector(`[data-live-stamp="${region.id}"]`);
  let last = region.innerHTML.trim();
  let timer = null;
  async function poll() {
    clearTimeout(timer);
    try {
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location = "/ui/login?next=" + encodeURIComponent(window.location.pathname);
        return;
      }
      const html = (await response.text()).trim();
      if (response.ok && html !== last) {
        region.innerHTML = html;
        last = html;
      }
      if (stamp) {
        stamp.textContent = response.ok
          ? "Last updated " + new Date().toLocaleTimeString() + "."
          : "Update failed (" + response.status + "); retrying.";
      }
    } catch (error) {
      if (stamp) stamp.textContent = "Server unreachable; retrying.";
    }
    timer = setTimeout(poll, interval);
  }
  region.addEventListener("refresh", poll); // right after an action
  timer = setTimeout(poll, interval);
}

async function act(url, confirmText, body) {
  if (confirmText && !window.confirm(confirmText)) return;
  showResult(true, "Working…");
  let data;
  try {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(body || {}),
    });
    data = await response.json().catch(() => ({ ok: false, message: "HTTP " + response.status }));
    if (!response.ok) data.ok = false;
  } catch (error) {
    data = { ok: false, message: "The server did not answer: " + error };
  }
  showResult(Boolean(data.ok), data.message || data.detail || "done");
  if (data.redirect) window.location = data.redirect;
  document.querySelectorAll("[data-live]").forEach((r) => r.dispatchEvent(new Event("refresh")));
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  event.preventDefault();
  act(button.dataset.action, button.dataset.confirm);
});

document.addEventListener("submit", (event) => {
  const form = event.target.closest("form[data-action-form]");
  if (!form) return;
  event.preventDefault();
  act(form.dataset.actionForm, form.dataset.confirm, Object.fromEntries(new FormData(form)));
});

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-live]").forEach(startLive);
});
