/* featuremaps report: relevance per channel, Grad-CAM and a class picker.
 *
 * Drawn only when the report was built with --target, --order relevance or --relevance:
 * each image then carries `relevance.classes`, the target's class first and the other
 * top-5 classes after it, each with, per layer, the per-channel relevance (gradient x
 * activation summed over space, exactly as featuremaps.relevance computed it, to 6
 * significant digits) and a Grad-CAM overlay picture. A static page cannot run the
 * model, so the picker switches between these classes; the search lists every label and
 * says which command embeds another one.
 *
 * It reads the page that featuremapsReport mounted (its sections and `.grid` cells with
 * data-channel) and reorders the grid cells by relevance on one click.
 */
var featuremapsRelevance = (function () {
  "use strict";

  const { el, fmt } = featuremapsCommon;

  function mount(root, DATA, host) {
    const images = DATA.images;
    if (!images.some((im) => im.relevance)) return null;
    const labels = DATA.class_labels || [];
    const listId = "fm-class-labels";
    if (labels.length && !root.getElementById(listId)) {
      const list = el("datalist");
      list.id = listId;
      for (const name of labels) {
        const o = el("option");
        o.value = name;
        list.append(o);
      }
      (root.body || root).append(list);
    }
    const panels = [];
    for (const section of root.querySelectorAll(".image-section")) {
      const i = Number(section.dataset.index);
      if (images[i] && images[i].relevance) panels.push(buildPanel(section, images[i]));
    }
    function refresh() {
      for (const p of panels) p.draw();
    }
    new MutationObserver(refresh).observe(host, {
      attributes: true,
      attributeFilter: ["data-layer"],
    });
    refresh();
    return { panels, refresh };

    function buildPanel(section, image) {
      const classes = image.relevance.classes;
      const state = { cls: 0, ranked: DATA.order_text.startsWith("most relevant") };
      const panel = el("div", "relevance-panel");
      const head = el("div", "relevance-head");
      const picker = el("select", "class-picker");
      picker.setAttribute("aria-label", "class whose relevance is shown");
      classes.forEach((c, k) => {
        const o = el("option", null, c.target.label + " (" + pct(c.target.prob) + ")" + (k === 0 ? " · target" : ""));
        o.value = String(k);
        picker.append(o);
      });
      picker.addEventListener("change", () => {
        state.cls = Number(picker.value);
        draw();
      });
      const search = el("input", "class-search");
      search.type = "search";
      search.placeholder = "search the " + labels.length + " classes";
      search.setAttribute("list", listId);
      search.setAttribute("aria-label", "search class labels");
      const note = el("p", "class-note muted small");
      search.addEventListener("change", () => pick(search.value));
      const orderBtn = el("button", "order-relevance");
      orderBtn.type = "button";
      orderBtn.addEventListener("click", () => {
        state.ranked = !state.ranked;
        draw();
      });
      head.append(el("strong", null, "Relevance to "), picker, search, orderBtn);
      const body = el("div", "relevance-body");
      const bars = el("canvas", "relevance-bars");
      bars.width = 640;
      bars.height = 160;
      const barsCap = el("p", "muted small relevance-caption");
      const camFig = el("figure", "cam-fig");
      const cam = el("img", "cam-img");
      const camCap = el("figcaption", "muted small");
      camFig.append(cam, camCap);
      const left = el("div", "relevance-left");
      left.append(bars, barsCap);
      body.append(left, camFig);
      panel.append(head, note, body);
      const layerPanel = section.querySelector(".layer-panel");
      layerPanel.insertBefore(panel, layerPanel.querySelector(".layer-body"));
      const grid = section.querySelector(".grid");
      new MutationObserver(() => sortGrid()).observe(grid, { childList: true });
      panel.style.margin = "0.5rem 0";
      head.style.display = "flex";
      head.style.gap = "0.5rem";
      head.style.alignItems = "center";
      head.style.flexWrap = "wrap";
      body.style.display = "flex";
      body.style.gap = "1rem";
      body.style.flexWrap = "wrap";
      cam.style.width = "224px";
      left.style.maxWidth = "660px";
      camFig.style.margin = "0";

      function pick(text) {
        const want = text.trim().toLowerCase();
        if (!want) return;
        const k = classes.findIndex((c) => (c.target.label || "").toLowerCase() === want);
        if (k >= 0) {
          state.cls = k;
          picker.value = String(k);
          note.textContent = "";
          draw();
          return;
        }
        const known = labels.find((l) => l.toLowerCase() === want);
        note.textContent = known
          ? "“" + known + "” is not embedded in this report (it holds the target and the top-5 classes). " +
            "Run featuremaps report … --target '" + known + "' to see its relevance."
          : "No class is called “" + text + "”.";
      }

      function layerData() {
        return classes[state.cls].layers[host.dataset.layer || DATA.layers[0].name];
      }

      function sortGrid() {
        const L = layerData();
        if (!L) return;
        const cells = Array.from(grid.children);
        const key = (c) =>
          state.ranked ? -(L.relevance[Number(c.dataset.channel)] ?? -Infinity) : Number(c.dataset.pos);
        const sorted = cells.slice().sort((a, b) => key(a) - key(b) || Number(a.dataset.pos) - Number(b.dataset.pos));
        if (sorted.every((c, k) => c === cells[k])) return; // already in order (no loop)
        grid.replaceChildren(...sorted);
        grid.dataset.order = state.ranked ? "relevance" : "embedded";
        const gridNote = section.querySelector(".grid-note");
        const said = " Shown most relevant to " + classes[state.cls].target.label + " first.";
        gridNote.textContent = gridNote.textContent.replace(/ Shown most relevant to .* first\.$/, "");
        if (state.ranked) gridNote.textContent += said;
      }

      function draw() {
        const L = layerData();
        if (!L) return;
        const c = classes[state.cls];
        drawBars(bars, L.relevance);
        let lo = 0;
        let hi = 0;
        for (const v of L.relevance) {
          if (v === null) continue;
          lo = Math.min(lo, v);
          hi = Math.max(hi, v);
        }
        barsCap.textContent =
          L.relevance.length + " channels in channel order: relevance to " + c.target.label +
          " (gradient × activation summed over space), from " + fmt(lo) + " to " + fmt(hi) +
          "; above the line (red) raises the class score, below (blue) lowers it.";
        cam.src = L.cam;
        cam.alt = "Grad-CAM for " + c.target.label;
        camCap.textContent = "Grad-CAM for " + c.target.label + ", scaled to its maximum";
        orderBtn.textContent = state.ranked ? "Grid: by relevance ✓" : "Order grid by relevance";
        orderBtn.setAttribute("aria-pressed", String(state.ranked));
        panel.dataset.target = String(c.target.index);
        sortGrid();
      }
      return { draw, pick, panel, state };
    }
  }

  function pct(p) {
    return p === null || p === undefined ? "–" : (p * 100).toFixed(1) + "%";
  }

  function drawBars(canvas, values) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, w, h);
    let peak = 0;
    for (const v of values) if (v !== null) peak = Math.max(peak, Math.abs(v));
    const mid = h / 2;
    const step = w / values.length;
    values.forEach((v, i) => {
      if (v === null || peak === 0) return;
      const len = (Math.abs(v) / peak) * (mid - 2);
      ctx.fillStyle = v >= 0 ? "#c0392b" : "#2e6fb7";
      const x = i * step;
      const bw = Math.max(1, step - (step > 3 ? 1 : 0));
      if (v >= 0) ctx.fillRect(x, mid - len, bw, len);
      else ctx.fillRect(x, mid, bw, len);
    });
    ctx.fillStyle = "#444";
    ctx.fillRect(0, mid, w, 1);
  }

  const api = { mount, page: null };
  const source = document.getElementById("fm-data");
  if (source && typeof featuremapsReport !== "undefined" && featuremapsReport.page) {
    const page = featuremapsReport.page;
    api.page = mount(document, page.data, document.body);
  }
  return Object.freeze(api);
})();
