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
