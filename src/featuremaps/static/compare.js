/* featuremaps compare: the CKA table and, on a click, both layers' maps side by side. */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("fm-data").textContent);

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }

  function fmt(v) { return v === null ? "n/a" : v.toFixed(2); }

  function luminance(hex) {
    var r = parseInt(hex.slice(1, 3), 16), g = parseInt(hex.slice(3, 5), 16), b = parseInt(hex.slice(5, 7), 16);
    return 0.299 * r + 0.587 * g + 0.114 * b;
  }

  var table = document.getElementById("heatmap");
  var head = el("thead"), hr = el("tr");
  hr.appendChild(el("th", "corner", "A \\ B"));
  data.layers_b.forEach(function (lb) {
    var th = el("th", null, lb.name);
    th.title = lb.name + " " + lb.shape.join("×");
    hr.appendChild(th);
  });
  head.appendChild(hr);
  table.appendChild(head);
  var body = el("tbody");
  var selected = null;
  data.layers_a.forEach(function (la, i) {
    var tr = el("tr"), th = el("th", null, la.name);
    th.title = la.name + " " + la.shape.join("×");
    tr.appendChild(th);
    data.layers_b.forEach(function (lb, j) {
      var td = el("td"), b = el("button", null, fmt(data.matrix[i][j]));
      var colour = data.colours[i][j];
      b.type = "button";
      b.dataset.i = String(i);
      b.dataset.j = String(j);
      b.style.backgroundColor = colour;
      b.classList.add(luminance(colour) > 140 ? "light" : "dark");
      b.title = "A " + la.name + " × B " + lb.name + ": CKA " +
        (data.matrix[i][j] === null ? "undefined" : data.matrix[i][j].toFixed(4));
      b.setAttribute("aria-label", b.title);
      b.addEventListener("click", function () { show(i, j, b); });
      td.appendChild(b);
      tr.appendChild(td);
    });
    body.appendChild(tr);
  });
  table.appendChild(body);

  function pictureRow(grid, label, pictures, error, which) {
    grid.appendChild(el("div", "row-label", label));
    var n = data.images.length;
    for (var k = 0; k < n; k++) {
      if (pictures[k]) {
        var img = el("img", "pixelated " + which);
        img.src = pictures[k];
        img.alt = label + ", image " + (k + 1);
        grid.appendChild(img);
      } else {
        grid.appendChild(el("div", "err", error || "no picture"));
      }
    }
  }

  var current = null;
  var sharedBox = document.getElementById("shared-basis");
  sharedBox.addEventListener("change", function () {
    if (current) show(current[0], current[1], current[2]);
  });

  function show(i, j, button) {
    var la = data.layers_a[i], lb = data.layers_b[j];
    var joint = data.joint[i + "," + j] || null;
    current = [i, j, button];
    if (selected) selected.classList.remove("selected");
    selected = button;
    button.classList.add("selected");
    var section = document.getElementById("pair");
    section.hidden = false;
    document.getElementById("pair-title").textContent =
      "A " + la.name + " vs B " + lb.name + ": CKA " + fmt(data.matrix[i][j]);
    document.getElementById("pair-sub").textContent =
      "A: " + data.model_a.model + " " + la.name + " " + la.shape.join("×") + " · B: " +
      data.model_b.model + " " + lb.name + " " + lb.shape.join("×");
    var grid = document.getElementById("pair-grid");
    grid.replaceChildren();
    grid.style.setProperty("--n", String(Math.max(1, data.images.length)));
    grid.appendChild(el("div", "row-label", "input"));
    data.images.forEach(function (src, k) {
      var img = el("img", "input");
      img.src = src;
      img.alt = "input image " + (k + 1);
      grid.appendChild(img);
    });
    document.getElementById("shared-field").hidden = !joint;
    var shared = joint !== null && sharedBox.checked;
    document.getElementById("basis-note").textContent = shared
      ? "One PCA basis fitted over both checkpoints' maps of this layer (the same channels), " +
        "one colour scale: a colour means the same direction in both rows."
      : "Each layer's own PCA basis, fitted over the images shown: a colour means the same " +
        "direction within a row, not across the two rows.";
    if (shared) {
      pictureRow(grid, "A " + la.name, joint.a, joint.error, "map-a shared");
      pictureRow(grid, "B " + lb.name, joint.b, joint.error, "map-b shared");
    } else {
      pictureRow(grid, "A " + la.name, la.pictures, la.error, "map-a");
      pictureRow(grid, "B " + lb.name, lb.pictures, lb.error, "map-b");
    }
  }
})();
