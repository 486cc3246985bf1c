// Kiln's console: keyboard on the approvals page. ←/→ (or ↑/↓) choose an option of the first
// approval, `a` approves it, `r` moves to the reason for rejecting. Keys typed into a field are
// the field's. The forms work without this script.
"use strict";
document.addEventListener("keydown", (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey || e.target.closest("textarea, input[type=text], input[type=password]")) {
    return;
  }
  const form = document.querySelector("form.approve");
  if (!form) {
    return;
  }
  const radios = Array.from(form.querySelectorAll("input[type=radio]"));
  let i = Math.max(0, radios.findIndex((r) => r.checked));
  if (e.key === "ArrowRight" || e.key === "ArrowDown" || e.key === "ArrowLeft" || e.key === "ArrowUp") {
    const step = e.key === "ArrowRight" || e.key === "ArrowDown" ? 1 : -1;
    i = Math.min(radios.length - 1, Math.max(0, i + step));
    radios[i].checked = true;
    radios[i].focus();
  } else if (e.key === "a") {
    form.requestSubmit();
  } else if (e.key === "r") {
    const reason = form.closest(".approval").querySelector("form.reject textarea");
    reason.focus();
  } else {
    return;
  }
  e.preventDefault();
});

// Live views: a page whose <main> has data-live follows the orders' changes over Server-Sent
// Events (/console/events) and fetches itself again when one it shows changes (an order page,
// its own order; the orders list, any), swapping in the new <main>: no polling, no reload.
(() => {
  const main = document.querySelector("main[data-live]");
  if (!main || !window.EventSource) {
    return;
  }
  let busy = false;
  let again = false;
  const refresh = async () => {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      const r = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) {
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        const fresh = doc.querySelector("main");
        if (fresh) {
          main.innerHTML = fresh.innerHTML;
        }
      }
    } finally {
      busy = false;
      if (again) {
        again = false;
        refresh();
      }
    }
  };
  const events = new EventSource("/console/events");
  events.addEventListener("order", (e) => {
    const change = JSON.parse(e.data || "{}");
    if (!main.dataset.order || !change.id || change.id === main.dataset.order) {
      refresh();
    }
  });
  // After a dropped connection EventSource reconnects; what changed meanwhile is fetched then
  // (not at the first open: the page was just served).
  let opened = false;
  events.addEventListener("open", () => {
    if (opened) {
      refresh();
    }
    opened = true;
  });
})();
