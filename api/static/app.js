// Worklist: keyboard navigation (j/k, arrows, Enter) and a refresh that swaps the table
// body in place, so new studies appear without reloading the page. No framework.
"use strict";
(function () {
  const table = document.getElementById("worklist");
  if (!table) return;
  const rows = () => Array.from(table.querySelectorAll("tr.study"));
  const open = (row) => { if (row && row.dataset.href) window.location.href = row.dataset.href; };
  table.addEventListener("click", (e) => {
    if (e.target.closest("a")) return;
    open(e.target.closest("tr.study"));
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.matches("input, select, textarea")) return;
    const all = rows();
    if (!all.length) return;
    const at = all.indexOf(document.activeElement);
    if (e.key === "j" || e.key === "ArrowDown") { all[Math.min(at + 1, all.length - 1)].focus(); e.preventDefault(); }
    else if (e.key === "k" || e.key === "ArrowUp") { all[Math.max(at - 1, 0)].focus(); e.preventDefault(); }
    else if (e.key === "Enter" && at >= 0) { open(all[at]); }
  });
  const seconds = Number(table.dataset.refreshSeconds || 0);
  if (!seconds) return;
  setInterval(async () => {
    if (document.hidden || table.contains(document.activeElement)) return;
    try {
      const resp = await fetch(window.location.href, { credentials: "same-origin" });
      if (!resp.ok || resp.redirected) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.querySelector("#worklist tbody");
      if (fresh) table.querySelector("tbody").replaceWith(fresh);
    } catch (err) { /* offline for a moment: try again next time */ }
  }, seconds * 1000);
})();
