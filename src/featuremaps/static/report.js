/* featuremaps report: draws the embedded channel data. No network, no libraries.
 *
 * Each layer of each image carries an "atlas": a grayscale PNG in which every shown
 * channel is min-max scaled and rounded to one of DATA.levels colour levels, each stored
 * as the index of its colour in a 256-colour lookup table, as the Python renderer draws
 * it. Colouring is a table lookup, so the grid, the enlarged view, the colorbar and the
 * overlay all come from the same numbers. Levels are computed by the shared
 * featuremapsCommon.levelIndex (render.level_index) and mapped to colours through the
 * embedded DATA.level_lut (render.LEVEL_LUT).
 *
 * featuremapsReport.mount(root, DATA, host, opts) draws one report inside `root` (the
 * document, or a notebook explorer's shadow root); everything it touches is found
 * through `root`, so several explorers on one page stay independent.
 */
var featuremapsReport = (function () {
  "use strict";

  const { el, fmt, chip, bytesOf, blobOf, levelIndex, clip01 } = featuremapsCommon;

  function mount(root, DATA, host, opts) {
    opts = opts || {};
    const $ = (id) => root.getElementById(id);

    const LUTS = {};
    for (const [name, b64] of Object.entries(DATA.luts)) LUTS[name] = bytesOf(b64);
    const state = { layer: null, cmap: DATA.cmap, scale: "channel", open: null, alpha: 0.55 };
    const atlases = new Map();
    const inputs = new Map();
    const sections = [];

    // -- small helpers ---------------------------------------------------------------------

    function shapeText(shape) {
      return shape.slice(1).join("×");
    }

    function layerOf(imgIdx, name) {
      return DATA.images[imgIdx].layers[name];
    }

    // -- decoding --------------------------------------------------------------------------

    async function pixelsOf(dataUrl) {
      // createImageBitmap with no colour conversion keeps the stored bytes exact.
      const bmp = await createImageBitmap(blobOf(dataUrl), {
        colorSpaceConversion: "none",
        premultiplyAlpha: "none",
      });
      const canvas = document.createElement("canvas");
      canvas.width = bmp.width;
      canvas.height = bmp.height;
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      ctx.drawImage(bmp, 0, 0);
      return { data: ctx.getImageData(0, 0, bmp.width, bmp.height).data, width: bmp.width };
    }

    function atlasOf(imgIdx, name) {
      const key = imgIdx + "\u0000" + name;
      if (!atlases.has(key)) {
        const L = layerOf(imgIdx, name);
        atlases.set(
          key,
          pixelsOf(L.atlas).then((px) => {
            const maps = [];
            for (let i = 0; i < L.channels.length; i++) {
              const r = Math.floor(i / L.cols);
              const c = i % L.cols;
              const m = new Uint8Array(L.h * L.w);
              for (let y = 0; y < L.h; y++) {
                const row = ((r * L.h + y) * px.width + c * L.w) * 4;
                for (let x = 0; x < L.w; x++) m[y * L.w + x] = px.data[row + x * 4];
              }
              maps.push(m);
            }
            return maps;
          })
        );
      }
      return atlases.get(key);
    }

    function inputOf(imgIdx) {
      if (!inputs.has(imgIdx)) {
        inputs.set(imgIdx, createImageBitmap(blobOf(DATA.images[imgIdx].input)));
      }
      return inputs.get(imgIdx);
    }

    // -- colour ----------------------------------------------------------------------------

    function layerRange(L) {
      return [Math.min(...L.vmin), Math.max(...L.vmax)];
    }

    /** The value range that the colormap spans for shown channel `i`. */
    function rangeOf(L, i) {
      return state.scale === "channel" ? [L.vmin[i], L.vmax[i]] : layerRange(L);
    }

    /** Colour index (0..255) of the level of a fraction f of the colour range (float64). */
    function lutIndex(f) {
      return DATA.level_lut[levelIndex(clip01(f), DATA.levels, false)];
    }

    /** Quantized value (0..255 of the channel's own range) -> colour index. */
    function tableOf(L, i) {
      const t = new Uint8Array(256);
      if (state.scale === "channel") {
        for (let q = 0; q < 256; q++) t[q] = q;
        return t;
      }
      const [lo, hi] = layerRange(L);
      const a = L.vmin[i];
      const b = L.vmax[i];
      for (let q = 0; q < 256; q++) {
        const v = a + (q / 255) * (b - a);
        t[q] = hi > lo ? lutIndex((v - lo) / (hi - lo)) : 0;
      }
      return t;
    }

    /** The colorbar's 256 columns: column q shows the level of q / 255. */
    function colorbarTable() {
      const t = new Uint8Array(256);
      for (let q = 0; q < 256; q++) t[q] = lutIndex(q / 255);
      return t;
    }

    function paint(canvas, map, w, h, table) {
      canvas.width = w;
      canvas.height = h;
      const ctx = canvas.getContext("2d", { willReadFrequently: true });
      const img = ctx.createImageData(w, h);
      const lut = LUTS[state.cmap];
      for (let p = 0; p < w * h; p++) {
        const k = table[map[p]] * 3;
        img.data[p * 4] = lut[k];
        img.data[p * 4 + 1] = lut[k + 1];
        img.data[p * 4 + 2] = lut[k + 2];
        img.data[p * 4 + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
    }

    // -- navigation ------------------------------------------------------------------------

    function buildNav() {
      const nav = $("layer-nav");
      for (const layer of DATA.layers) {
        const li = el("li");
        const b = el("button");
        b.type = "button";
        b.dataset.layer = layer.name;
        b.title = layer.type;
        b.append(el("span", "layer-name", layer.name), el("span", "layer-shape", shapeText(layer.shape)));
        b.addEventListener("click", () => selectLayer(layer.name, true));
        li.append(b);
        nav.append(li);
      }
      const imgNav = $("image-nav");
      DATA.images.forEach((image, i) => {
        const li = el("li");
        const a = el("a", null, image.name);
        a.href = "#img-" + i;
        li.append(a);
        imgNav.append(li);
      });
      const cmapSel = $("cmap-select");
      for (const name of DATA.cmaps) {
        const o = el("option", null, name);
        o.value = name;
        cmapSel.append(o);
      }
      cmapSel.value = state.cmap;
      cmapSel.addEventListener("change", () => {
        state.cmap = cmapSel.value;
        refresh();
      });
      const scaleSel = $("scale-select");
      scaleSel.addEventListener("change", () => {
        state.scale = scaleSel.value;
        refresh();
      });
    }

    function selectLayer(name, updateHash) {
      if (!DATA.layers.some((l) => l.name === name)) return;
      state.layer = name;
      for (const b of root.querySelectorAll("#layer-nav button")) {
        b.classList.toggle("active", b.dataset.layer === name);
      }
      for (const tile of root.querySelectorAll(".pca-tile")) {
        tile.classList.toggle("active", tile.dataset.layer === name);
      }
      if (updateHash && opts.hash) {
        try {
          history.replaceState(null, "", "#layer=" + encodeURIComponent(name));
        } catch (e) {
          /* some browsers refuse on file:// pages; the hash is a convenience */
        }
      }
      refresh();
    }

    function refresh() {
      const jobs = sections.map((s) => renderLayer(s));
      if (state.open) jobs.push(showChannel(state.open.img, state.open.pos));
      return Promise.all(jobs).then(() => {
        host.dataset.layer = state.layer;
        host.dataset.ready = "1";
      });
    }

    // -- image sections --------------------------------------------------------------------

    function buildSection(image, i) {
      const frag = $("tpl-image").content.cloneNode(true);
      const root = frag.querySelector(".image-section");
      root.id = "img-" + i;
      root.dataset.index = String(i);
      root.querySelector(".image-name").textContent = image.name;
      root.querySelector(".image-path").textContent = image.path;
      const input = root.querySelector(".input-img");
      input.src = image.input;
      input.alt = "input: " + image.name;
      root.querySelector(".input-size").textContent =
        image.input_size[1] + "×" + image.input_size[0] + " px";
      fillPredictions(root, image);
      const tiles = root.querySelector(".pca-tiles");
      const inputTile = el("figure", "pca-tile");
      const inputImg = el("img");
      inputImg.src = image.input;
      inputImg.alt = "input";
      inputTile.append(inputImg, el("span", null, "input"));
      tiles.append(inputTile);
      for (const layer of DATA.layers) {
        const L = image.layers[layer.name];
        const b = el("button", "pca-tile");
        b.type = "button";
        b.dataset.layer = layer.name;
        b.title = "show layer " + layer.name;
        if (L.pca) {
          const img = el("img", "pixelated");
          img.src = L.pca;
          img.alt = "PCA of " + layer.name;
          b.append(img);
        } else {
          b.append(el("div", "pca-missing muted", "no PCA"));
        }
        b.append(el("span", null, layer.name));
        b.addEventListener("click", () => selectLayer(layer.name, true));
        tiles.append(b);
      }
      $("images").append(frag);
      return { root, index: i };
    }

    function fillPredictions(root, image) {
      const list = root.querySelector(".pred-list");
      if (!image.predictions) {
        const none = root.querySelector(".pred-none");
        none.textContent = image.predictions_note || "no predictions";
        none.hidden = false;
        return;
      }
      if (image.predictions_note) {
        const note = root.querySelector(".pred-note");
        note.textContent = image.predictions_note;
        note.hidden = false;
      }
      for (const p of image.predictions) {
        const li = el("li");
        const bar = el("div", "pred-bar");
        const fill = el("span");
        fill.style.width = Math.max(0.5, p.probability * 100).toFixed(1) + "%";
        bar.append(fill);
        li.append(
          el("span", "pred-label", p.label),
          el("span", "pred-prob", (p.probability * 100).toFixed(1) + "%"),
          bar
        );
        list.append(li);
      }
    }

    async function renderLayer(section) {
      const { root, index } = section;
      const name = state.layer;
      const L = layerOf(index, name);
      root.querySelector(".layer-title").textContent = name;
      const stride = L.stride ? " · stride " + L.stride[0] : "";
      root.querySelector(".layer-meta").textContent =
        L.type + " · " + shapeText(L.shape) + " (C×H×W)" + stride + (L.note ? " · " + L.note : "");
      const chips = root.querySelector(".layer-stats");
      chips.replaceChildren(
        chip("channels", String(L.channels_total)),
        chip(
          "dead",
          L.dead_count + " of " + L.channels_total + " (" + (L.dead_share * 100).toFixed(1) + "%)",
          L.dead_share > 0
        ),
        chip("min", fmt(L.layer_min)),
        chip("mean", fmt(L.layer_mean)),
        chip("max", fmt(L.layer_max))
      );
      const orderText = DATA.order_text;
      const scaleText =
        state.scale === "channel"
          ? "each map coloured from its own min to its own max"
          : "all maps coloured on the layer's range " + fmt(layerRange(L)[0]) + " … " + fmt(layerRange(L)[1]);
      root.querySelector(".grid-note").textContent =
        L.channels.length + " of " + L.channels_total + " channels, " + orderText + "; " + scaleText + ".";

      const pcaImg = root.querySelector(".pca-img");
      const pcaCap = root.querySelector(".pca-caption");
      if (L.pca) {
        pcaImg.hidden = false;
        pcaImg.src = L.pca;
        pcaCap.textContent = "PCA of the " + L.channels_total + " channels (RGB = components 1, 2, 3)";
      } else {
        pcaImg.hidden = true;
        pcaCap.textContent = "No PCA: " + (L.pca_error || "not available");
      }

      const tbody = root.querySelector(".stats-table tbody");
      const rows = [];
      L.channels.forEach((ch, pos) => {
        const tr = el("tr");
        tr.dataset.pos = String(pos);
        tr.append(
          el("td", null, ch),
          el("td", null, fmt(L.min[pos])),
          el("td", null, fmt(L.mean[pos])),
          el("td", null, fmt(L.max[pos])),
          el("td", "dead", L.dead[pos] ? "dead" : "")
        );
        tr.addEventListener("click", () => showChannel(index, pos));
        rows.push(tr);
      });
      tbody.replaceChildren(...rows);

      const grid = root.querySelector(".grid");
      const maps = await atlasOf(index, name);
      if (state.layer !== name) return; // another layer was chosen meanwhile
      const cells = [];
      L.channels.forEach((ch, pos) => {
        const b = el("button", "cell" + (L.dead[pos] ? " dead" : ""));
        b.type = "button";
        b.dataset.channel = String(ch);
        b.dataset.pos = String(pos);
        b.setAttribute("role", "listitem");
        b.title =
          "channel " + ch + " · min " + fmt(L.min[pos]) + " · mean " + fmt(L.mean[pos]) + " · max " + fmt(L.max[pos]);
        const canvas = el("canvas");
        paint(canvas, maps[pos], L.w, L.h, tableOf(L, pos));
        b.append(canvas, el("span", "cell-label", ch));
        b.addEventListener("click", () => showChannel(index, pos));
        cells.push(b);
      });
      grid.replaceChildren(...cells);
      grid.dataset.layer = name;
    }

    // -- the enlarged channel --------------------------------------------------------------

    const dialog = $("channel-dialog");

    function stat(dl, label, value) {
      const d = el("div");
      d.append(el("dt", null, label), el("dd", null, value));
      dl.append(d);
    }

    async function showChannel(imgIdx, pos) {
      const name = state.layer;
      const L = layerOf(imgIdx, name);
      pos = Math.max(0, Math.min(L.channels.length - 1, pos));
      state.open = { img: imgIdx, pos: pos };
      const ch = L.channels[pos];
      const maps = await atlasOf(imgIdx, name);
      const table = tableOf(L, pos);
      const [lo, hi] = rangeOf(L, pos);

      $("dlg-title").textContent = name + " · channel " + ch;
      $("dlg-sub").textContent =
        DATA.images[imgIdx].name + " · map " + L.h + "×" + L.w + " · " + L.type;
      const big = $("dlg-channel");
      paint(big, maps[pos], L.w, L.h, table);
      big.dataset.channel = String(ch);
      big.dataset.layer = name;
      big.dataset.image = String(imgIdx);

      const bar = $("dlg-colorbar");
      const ident = new Uint8Array(256);
      for (let q = 0; q < 256; q++) ident[q] = q;
      paint(bar, ident, 256, 1, colorbarTable());
      $("cb-min").textContent = fmt(lo);
      $("cb-mid").textContent = fmt((lo + hi) / 2);
      $("cb-max").textContent = fmt(hi);
      bar.dataset.vmin = String(lo);
      bar.dataset.vmax = String(hi);
      const marker = $("cb-mean");
      const f = hi > lo ? (L.mean[pos] - lo) / (hi - lo) : 0;
      marker.style.left = "calc(" + (Math.max(0, Math.min(1, f)) * 100).toFixed(2) + "% - 1px)";
      $("dlg-scale-note").textContent =
        (state.scale === "channel" ? "colours span this channel's own range" : "colours span the layer's range") +
        ", linear · " + state.cmap + "; the black tick marks the mean";

      await drawOverlay(imgIdx, maps[pos], L, table);

      const dl = $("dlg-stats");
      dl.replaceChildren();
      stat(dl, "channel", ch + " (layer has " + L.channels_total + ")");
      stat(dl, "min", fmt(L.min[pos]));
      stat(dl, "mean", fmt(L.mean[pos]));
      stat(dl, "max", fmt(L.max[pos]));
      stat(dl, "dead", L.dead[pos] ? "yes (all zero)" : "no");
      stat(dl, "layer dead share", (L.dead_share * 100).toFixed(1) + "%");
      $("dlg-pos").textContent = pos + 1 + " / " + L.channels.length + " shown";
      $("dlg-prev").disabled = pos === 0;
      $("dlg-next").disabled = pos === L.channels.length - 1;
      for (const c of root.querySelectorAll(".cell.selected")) c.classList.remove("selected");
      const cell = sections[imgIdx].root.querySelector('.cell[data-pos="' + pos + '"]');
      if (cell) cell.classList.add("selected");
      if (!dialog.open) dialog.showModal();
      dialog.dataset.channel = String(ch);
    }

    async function drawOverlay(imgIdx, map, L, table) {
      const photo = await inputOf(imgIdx);
      const canvas = $("dlg-overlay");
      canvas.width = photo.width;
      canvas.height = photo.height;
      const ctx = canvas.getContext("2d");
      ctx.globalAlpha = 1;
      ctx.drawImage(photo, 0, 0);
      const small = document.createElement("canvas");
      paint(small, map, L.w, L.h, table);
      ctx.imageSmoothingEnabled = true;
      ctx.imageSmoothingQuality = "high";
      ctx.globalAlpha = state.alpha;
      ctx.drawImage(small, 0, 0, photo.width, photo.height);
      ctx.globalAlpha = 1;
      canvas.dataset.alpha = String(state.alpha);
    }

    $("dlg-close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => {
      state.open = null;
      for (const c of root.querySelectorAll(".cell.selected")) c.classList.remove("selected");
    });
    dialog.addEventListener("click", (ev) => {
      if (ev.target === dialog) dialog.close(); // a click on the backdrop
    });
    dialog.addEventListener("keydown", (ev) => {
      if (!state.open) return;
      if (ev.key === "ArrowRight") showChannel(state.open.img, state.open.pos + 1);
      if (ev.key === "ArrowLeft") showChannel(state.open.img, state.open.pos - 1);
    });
    $("dlg-prev").addEventListener("click", () => {
      if (state.open) showChannel(state.open.img, state.open.pos - 1);
    });
    $("dlg-next").addEventListener("click", () => {
      if (state.open) showChannel(state.open.img, state.open.pos + 1);
    });
    const alpha = $("dlg-alpha");
    alpha.addEventListener("input", () => {
      state.alpha = Number(alpha.value) / 100;
      if (state.open) showChannel(state.open.img, state.open.pos);
    });

    // -- start -----------------------------------------------------------------------------

    buildNav();
    DATA.images.forEach((image, i) => sections.push(buildSection(image, i)));
    let first = DATA.layers.length ? DATA.layers[0].name : null;
    const m = opts.hash ? /^#layer=(.*)$/.exec(location.hash) : null;
    if (m) {
      try {
        const wanted = decodeURIComponent(m[1]);
        if (DATA.layers.some((l) => l.name === wanted)) first = wanted;
      } catch (e) {
        /* a malformed hash: keep the first layer */
      }
    }
    if (first !== null) selectLayer(first, false);
    return { data: DATA, state, tableOf, colorbarTable, selectLayer, showChannel, refresh };
  }

  const api = { mount, page: null };
  const source = document.getElementById("fm-data");
  if (source && document.body && document.body.classList.contains("report")) {
    api.page = mount(document, JSON.parse(source.textContent), document.body, { hash: true });
  }
  return Object.freeze(api);
})();
