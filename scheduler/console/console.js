// Kiln's console: keyboard on the approvals page. ←/→ (or ↑/↓) choose an option of the first
// approval, `a` approves it, `r` moves to the reason for rejecting. Keys typed into a field are
// the field's. The forms work without this script.
"use strict";
document.addEventListener("keydown", (e) => {
  if (e.altKey || e.ctrlKey || e.metaKey || e.target.closest("textarea, select, input[type=text], input[type=search], input[type=password]")) {
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

// Live views: a page whose <main> has data-live follows the farm over Server-Sent Events
// (/console/events: `order`, `job` and, for the operator, `device` changes) and fetches itself again when something it shows
// changes, swapping in the new <main>: no polling, no reload. An order or job page follows its
// own; the lists and the overview, any (at most one fetch a second). What the operator was
// doing survives the swap: the options chosen, the text typed, the field in focus.
(() => {
  const main = document.querySelector("main[data-live]");
  if (!main || !window.EventSource) {
    return;
  }
  const follows = {
    order: (kind, c) => kind === "order" && (!c.id || c.id === main.dataset.order),
    orders: (kind) => kind === "order",
    approvals: (kind) => kind === "order",
    job: (kind, c) => (kind === "job" && c.id === main.dataset.job) || (kind === "order" && !c.id),
    jobs: (kind) => kind !== "device",
    fleet: () => true,
    overview: () => true,
  }[main.dataset.live] || (() => false);
  const keep = () => {
    const kept = { checked: [], values: {}, focus: document.activeElement && document.activeElement.id };
    main.querySelectorAll("input[type=radio]:checked").forEach((r) => {
      kept.checked.push([r.form ? r.form.getAttribute("action") : "", r.name, r.value]);
    });
    main.querySelectorAll("textarea[id], input[type=text][id], input[type=search][id]").forEach((f) => {
      kept.values[f.id] = f.value;
    });
    return kept;
  };
  const restore = (kept) => {
    kept.checked.forEach(([action, name, value]) => {
      main.querySelectorAll(`input[type=radio][name="${CSS.escape(name)}"]`).forEach((r) => {
        if ((r.form ? r.form.getAttribute("action") : "") === action) {
          r.checked = r.value === value;
        }
      });
    });
    Object.entries(kept.values).forEach(([id, value]) => {
      const f = document.getElementById(id);
      if (f) {
        f.value = value;
      }
    });
    const focused = kept.focus && document.getElementById(kept.focus);
    if (focused) {
      focused.focus();
    }
  };
  let busy = false;
  let again = false;
  let last = 0;
  const refresh = async () => {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    const wait = last + 1000 - Date.now();
    if (wait > 0) {
      await new Promise((done) => setTimeout(done, wait));
    }
    last = Date.now();
    try {
      const r = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
      if (r.ok) {
        const doc = new DOMParser().parseFromString(await r.text(), "text/html");
        const fresh = doc.querySelector("main");
        if (fresh) {
          const kept = keep();
          main.innerHTML = fresh.innerHTML;
          restore(kept);
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
  ["order", "job", "device"].forEach((kind) => {
    events.addEventListener(kind, (e) => {
      if (follows(kind, JSON.parse(e.data || "{}"))) {
        refresh();
      }
    });
  });
  // Whenever the stream opens (at first, and after a dropped connection is made again) what
  // changed since the page was made is fetched: the changes before it opened were not heard.
  // The page says it is listening (data-events="open" on <html>).
  events.addEventListener("open", () => {
    document.documentElement.dataset.events = "open";
    refresh();
  });
  events.addEventListener("error", () => {
    document.documentElement.dataset.events = "closed";
  });
})();
