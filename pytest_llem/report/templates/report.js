(function () {
  "use strict";
  var table = document.getElementById("cases");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var search = document.getElementById("case-filter");
  var outcome = document.getElementById("outcome-filter");
  var shown = document.getElementById("case-count");

  function cellKey(row, column, numeric) {
    var cell = row.cells[column];
    var raw = cell.getAttribute("data-v");
    if (raw === null) { raw = cell.textContent.trim(); }
    if (!numeric) { return raw.toLowerCase(); }
    return raw === "" ? null : parseFloat(raw);
  }

  function sortBy(th) {
    var column = th.cellIndex;
    var numeric = th.getAttribute("data-type") === "num";
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (other) {
      other.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var keyed = rows.map(function (row, index) {
      return { row: row, key: cellKey(row, column, numeric), index: index };
    });
    keyed.sort(function (a, b) {
      // Missing values sort last whichever the direction.
      if (a.key === null || b.key === null) {
        return a.key === b.key ? a.index - b.index : (a.key === null ? 1 : -1);
      }
      var order = a.key < b.key ? -1 : (a.key > b.key ? 1 : 0);
      return (ascending ? order : -order) || a.index - b.index;
    });
    keyed.forEach(function (item) { body.appendChild(item.row); });
  }

  function applyFilter() {
    var text = search ? search.value.trim().toLowerCase() : "";
    var want = outcome ? outcome.value : "";
    var count = 0;
    rows.forEach(function (row) {
      var visible = (!text || row.textContent.toLowerCase().indexOf(text) !== -1) &&
        (!want || row.getAttribute("data-outcome") === want);
      row.hidden = !visible;
      if (visible) { count += 1; }
    });
    if (shown) { shown.textContent = count + " of " + rows.length + " cases"; }
  }

  Array.prototype.forEach.call(table.querySelectorAll("th button"), function (button) {
    button.addEventListener("click", function () { sortBy(button.parentNode); });
  });
  if (search) { search.addEventListener("input", applyFilter); }
  if (outcome) { outcome.addEventListener("change", applyFilter); }
  applyFilter();

  // Tell a reader (and the browser test) that the page rendered as the record said it would.
  var expectedCases = parseInt(table.getAttribute("data-cases"), 10);
  var expectedCharts = parseInt(document.body.getAttribute("data-charts"), 10);
  var charts = document.querySelectorAll("svg.chart").length;
  if (rows.length === expectedCases && charts === expectedCharts) {
    document.documentElement.setAttribute("data-rendered", "true");
    document.title = "pytest-llem report: " + rows.length + " cases, " + charts + " charts";
  }
}());
