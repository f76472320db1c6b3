// chronoray console: live refresh, the CRON preview, confirmations.
// Loaded from /ui/static (the CSP allows no inline script); every HTML it
// inserts was rendered and escaped by the server.
"use strict";

const FRAGMENT = { "X-Console-Fragment": "1" };

async function fetchFragment(url) {
  const response = await fetch(url, { headers: FRAGMENT, credentials: "same-origin" });
  if (response.status === 401) {
    window.location.assign("/ui/login");
    return null;
  }
  return response.ok ? response.text() : null;
}

function poll(element) {
  const url = element.dataset.poll;
  const every = Number(element.dataset.pollMs || 2000);
  const tick = async () => {
    if (!document.hidden) {
      try {
        const html = await fetchFragment(url);
        if (html !== null) element.innerHTML = html;
      } catch (_) {
        // the server is away for a moment: try again on the next tick
      }
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

function preview(form) {
  const into = document.getElementById(form.dataset.previewInto);
  const cron = form.querySelector("[name=cron]");
  const zone = form.querySelector("[name=timezone]");
  let timer = null;
  const show = async () => {
    if (!cron.value.trim()) return;
    const query = new URLSearchParams({ cron: cron.value, timezone: zone.value || "UTC" });
    const html = await fetchFragment(form.dataset.preview + "?" + query);
    if (html !== null) into.innerHTML = html;
  };
  const later = () => {
    clearTimeout(timer);
    timer = setTimeout(show, 250);
  };
  cron.addEventListener("input", later);
  zone.addEventListener("input", later);
  if (cron.value.trim()) show();
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll("[data-poll]").forEach(poll);
  document.querySelectorAll("form[data-preview]").forEach(preview);
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
