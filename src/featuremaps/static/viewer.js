/* featuremaps viewer: talks to the local server's /api; plain DOM, no libraries. */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const state = {
    config: null,
    imageId: null,
    capture: null, // summary of the current capture
    compareId: null, // capture of the second model on the same image, when asked for
    compareModel: null,
    cmpSeq: 0,
    layer: null,
    layerInfo: null,
    grid: null, // metadata of the shown grid
    channel: null,
    tab: "channels",
    alpha: 0.55,
    gridUrl: null,
    seq: 0,
    labels: null, // the ImageNet class names, loaded when a classifier is captured
    target: null, // the class index whose relevance is shown
    relevance: null, // the shown layer's relevance (GET .../relevance/{index})
    relSeq: 0,
    visSeq: 0,
  };
  const POLL_MS = 200;
  const POLL_LIMIT = 3000; // 10 minutes at most

  // -- helpers ---------------------------------------------------------------------------

  const { el, fmt } = featuremapsCommon; // static/common.js, shared with the report

  async function api(url, options) {
    const r = await fetch(url, options);
    if (!r.ok) {
      let detail = r.status + " " + r.statusText;
      try {
        const body = await r.json();
        if (body && body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (e) {
        /* not JSON */
      }
      const err = new Error(detail);
      err.status = r.status;
      throw err;
    }
    return r;
  }

  function query(params) {
    return new URLSearchParams(params).toString();
  }

  function captureUrl(path, params) {
    return "/api/captures/" + encodeURIComponent(state.capture.capture_id) + path + (params ? "?" + query(params) : "");
  }

  function view() {
    return {
      cmap: $("cmap-select").value,
      norm: $("norm-select").value,
      order: $("order-select").value,
      scale: $("scale-select").value,
      max_maps: $("max-select").value,
    };
  }

  // -- status ----------------------------------------------------------------------------

  function status(text, opts) {
    const bar = $("status-bar");
    opts = opts || {};
    bar.hidden = false;
    bar.classList.toggle("error", !!opts.error);
    bar.classList.toggle("busy", !!opts.busy);
    $("status-text").textContent = text;
    $("progress-fill").style.width = ((opts.fraction || 0) * 100).toFixed(0) + "%";
    bar.dataset.state = opts.error ? "error" : opts.busy ? "busy" : "idle";
  }

  function fail(err) {
    status("Error: " + err.message, { error: true });
  }

  // -- configuration ---------------------------------------------------------------------

  /** Drop ?token=... from the address bar once the server has set its cookie. */
  function forgetToken() {
    const params = new URLSearchParams(location.search);
    if (!params.has("token")) return;
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }

  async function loadConfig() {
    forgetToken();
    state.config = await (await api("/api/config")).json();
    const list = $("model-list");
    for (const m of state.config.models) {
      const o = el("option");
      o.value = m.name;
      o.label = m.pretrained ? "pretrained weights available" : "random weights (pretrained not cached)";
      list.append(o);
    }
    $("model-input").value = state.config.default_model;
    fillSelect($("cmap-select"), state.config.cmaps);
    // the view options come from the server (featuremaps.options): a new one shows up here
    fillSelect($("norm-select"), state.config.norms);
    fillSelect($("order-select"), state.config.orders, state.config.order_labels);
    fillSelect($("scale-select"), state.config.scales, SCALE_LABELS);
    syncWeights();
  }

  const SCALE_LABELS = { channel: "per channel", layer: "shared by layer" };

  function fillSelect(select, values, labels) {
    select.replaceChildren();
    for (const v of values) {
      const o = el("option", null, (labels && labels[v]) || v);
      o.value = v;
      select.append(o);
    }
  }

  function syncWeights(ev) {
    const compare = !!ev && ev.target === $("compare-input");
    const name = $(compare ? "compare-input" : "model-input").value.trim();
    if (!name) return;
    const m = state.config && state.config.models.find((x) => x.name === name);
    const sel = $(compare ? "compare-weights" : "weights-select");
    const pretrained = !m || m.pretrained || name.startsWith("timm:");
    sel.options[0].textContent = pretrained ? "pretrained" : "pretrained (needs a download)";
    sel.value = m && !m.pretrained ? "none" : "DEFAULT";
  }

  // -- images ----------------------------------------------------------------------------

  function imageChosen(result, label) {
    state.imageId = result.image_id;
    const thumb = $("image-thumb");
    thumb.src = "/api/images/" + encodeURIComponent(result.image_id) + "/thumb.jpg";
    thumb.alt = label;
    thumb.hidden = false;
    thumb.title = label + " · " + result.width + "×" + result.height;
    $("capture-button").disabled = false;
    document.body.dataset.image = result.image_id;
    status("Image ready: " + label + " (" + result.width + "×" + result.height + "). Press Capture.");
  }

  async function pickSample(name, button) {
    try {
      const result = await (await api("/api/samples/" + encodeURIComponent(name), { method: "POST" })).json();
      for (const b of document.querySelectorAll(".chip-button")) b.classList.remove("active");
      button.classList.add("active");
      imageChosen(result, name);
    } catch (err) {
      fail(err);
    }
  }

  async function upload(file) {
    if (!file) return;
    const limit = state.config ? state.config.max_upload_bytes : Infinity;
    if (file.size > limit) {
      fail(new Error("the file is " + (file.size / 1e6).toFixed(1) + " MB; the limit is " + (limit / 1e6).toFixed(1) + " MB"));
      return;
    }
    status("Uploading " + file.name + " …", { busy: true, fraction: 0.3 });
    try {
      const r = await api("/api/images", {
        method: "POST",
        headers: { "Content-Type": file.type || "application/octet-stream" },
        body: file,
      });
      for (const b of document.querySelectorAll(".chip-button")) b.classList.remove("active");
      document.querySelector(".chip-button.upload").classList.add("active");
      imageChosen(await r.json(), file.name);
    } catch (err) {
      fail(err);
    }
  }

  // -- jobs ------------------------------------------------------------------------------

  /** Poll a job until it is done; `show(job)` reports each step. Throws on an error. */
  async function pollJob(job, show) {
    for (let i = 0; job.status !== "done" && job.status !== "error" && i < POLL_LIMIT; i++) {
      show(job);
      await new Promise((r) => setTimeout(r, POLL_MS));
      job = await (await api("/api/jobs/" + encodeURIComponent(job.job_id))).json();
    }
    if (job.status === "error") throw new Error(job.message);
    if (job.status !== "done") throw new Error("the job is still running; try again later");
    return job;
  }

  async function postJson(url, payload) {
    return (await api(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload) })).json();
  }

  // -- capture ---------------------------------------------------------------------------

  async function startCapture(ev) {
    ev.preventDefault();
    if (!state.imageId) return;
    const button = $("capture-button");
    button.disabled = true;
    const seq = ++state.seq;
    try {
      const body = JSON.stringify({
        model: $("model-input").value.trim(),
        weights: $("weights-select").value,
        image_id: state.imageId,
        compare_model: $("compare-input").value.trim() || null,
        compare_weights: $("compare-weights").value,
      });
      let job = await (await api("/api/captures", { method: "POST", headers: { "Content-Type": "application/json" }, body })).json();
      job = await pollJob(job, (j) => {
        const frac = Math.max(0, j.step - 1) / j.steps;
        status("Step " + j.step + "/" + j.steps + ": " + j.phase + " … " + j.elapsed.toFixed(1) + " s", {
          busy: true,
          fraction: frac + 0.5 / j.steps,
        });
      });
      if (seq !== state.seq) return;
      state.compareId = job.compare_id || null;
      state.compareModel = state.compareId ? $("compare-input").value.trim() : null;
      await loadCapture(job.capture_id, job.elapsed);
    } catch (err) {
      fail(err);
    } finally {
      button.disabled = false;
    }
  }

  async function loadCapture(captureId, elapsed) {
    const summary = await (await api("/api/captures/" + encodeURIComponent(captureId))).json();
    state.capture = summary;
    state.channel = null;
    state.target = null;
    state.relevance = null;
    $("relevance-view").hidden = true;
    $("order-relevance").hidden = true;
    setRelevanceOrderOption(false);
    $("welcome").hidden = true;
    $("input-card").hidden = false;
    $("input-img").src = captureUrl("/input.png");
    $("input-meta").textContent =
      summary.model + " · " + summary.weights + " · " + summary.input_size[1] + "×" + summary.input_size[0] + " px · " + summary.preprocess;
    const preds = $("pred-list");
    preds.replaceChildren();
    $("pred-none").hidden = !!summary.predictions;
    $("pred-none").textContent = summary.predictions_note || "";
    for (const p of summary.predictions || []) {
      const li = el("li");
      const bar = el("div", "pred-bar");
      const fill = el("span");
      fill.style.width = Math.max(0.5, p.probability * 100).toFixed(1) + "%";
      bar.append(fill);
      const label = el("span", "pred-label", p.label);
      label.title = "show the relevance of each channel to " + p.label;
      label.dataset.index = String(p.index);
      label.setAttribute("role", "button");
      label.tabIndex = 0;
      label.addEventListener("click", () => pickClass(p.index));
      label.addEventListener("keydown", (ev) => ev.key === "Enter" && pickClass(p.index));
      li.dataset.index = String(p.index);
      li.append(label, el("span", "pred-prob", (p.probability * 100).toFixed(1) + "%"), bar);
      preds.append(li);
    }
    setupClassPicker(summary);
    renderLayerList();
    status(
      "Captured " + summary.model + " in " + (elapsed || 0).toFixed(1) + " s · " + summary.layers.length +
        " layers with spatial maps. Click a layer, then a channel.",
      { fraction: 1 }
    );
    document.body.dataset.capture = summary.capture_id;
    const first = summary.stages.length ? summary.stages[0] : summary.layers[0].name;
    await selectLayer(first);
  }

  function renderLayerList() {
    const list = $("layer-list");
    const filter = $("layer-filter").value.trim().toLowerCase();
    const stagesOnly = $("stages-only").checked;
    const items = [];
    let n = 0;
    for (const layer of state.capture.layers) {
      if (stagesOnly && !layer.stage && !filter) continue;
      if (filter && !layer.name.toLowerCase().includes(filter)) continue;
      n++;
      const li = el("li");
      const b = el("button", layer.stage ? "stage" : "");
      b.type = "button";
      b.dataset.layer = layer.name;
      b.title = layer.type + (layer.stride ? " · stride " + layer.stride[0] : "");
      b.append(el("span", "layer-name", layer.name), el("span", "layer-shape", layer.shape.slice(1).join("×")));
      b.classList.toggle("active", layer.name === state.layer);
      b.addEventListener("click", () => selectLayer(layer.name));
      li.append(b);
      items.push(li);
    }
    list.replaceChildren(...items);
    $("layer-count").textContent = n + " / " + state.capture.layers.length;
  }

  // -- a layer ---------------------------------------------------------------------------

  async function selectLayer(name) {
    state.layer = name;
    state.channel = null;
    for (const b of document.querySelectorAll("#layer-list button")) b.classList.toggle("active", b.dataset.layer === name);
    $("layer-view").hidden = false;
    $("channel-detail").hidden = true;
    $("channel-empty").hidden = false;
    $("grid-selected").hidden = true;
    try {
      const info = await (await api(captureUrl("/layer", { layer: name }))).json();
      if (state.layer !== name) return;
      state.layerInfo = info;
      $("layer-title").textContent = name;
      $("layer-meta").textContent =
        info.type + " · " + info.shape.join("×") + " (C×H×W)" + (info.stride ? " · stride " + info.stride[0] : "");
      const chips = $("layer-chips");
      const chip = (label, value, alert) => {
        const c = el("span", alert ? "chip alert" : "chip");
        c.append(document.createTextNode(label + " "), el("b", null, value));
        return c;
      };
      chips.replaceChildren(
        chip("channels", String(info.channels)),
        chip("dead", info.dead_count + " of " + info.channels + " (" + (info.dead_share * 100).toFixed(1) + "%)", info.dead_count > 0),
        chip("min", fmt(info.layer_min)),
        chip("mean", fmt(info.layer_mean)),
        chip("max", fmt(info.layer_max))
      );
      state.relevance = null;
      if (state.target !== null) await loadRelevance();
      await refreshView();
      for (const l of state.capture.layers) if (l.name === name) l.captured = true;
    } catch (err) {
      fail(err);
    }
  }

  async function refreshView() {
    if (state.tab === "channels") await loadGrid();
    else loadPca();
    if (state.channel !== null) await selectChannel(state.channel);
  }

  async function loadGrid() {
    const name = state.layer;
    const v = view();
    const img = $("grid-img");
    const params = Object.assign({ layer: name, map_size: mapSize() }, v);
    if (v.order === "relevance") params.target = state.target;
    const r = await api(captureUrl("/grid.png", params));
    const meta = JSON.parse(r.headers.get("X-Featuremaps-Grid"));
    const blob = await r.blob();
    if (state.layer !== name) return;
    if (state.gridUrl) URL.revokeObjectURL(state.gridUrl);
    state.gridUrl = URL.createObjectURL(blob);
    state.grid = meta;
    await new Promise((resolve) => {
      img.onload = resolve;
      img.onerror = resolve;
      img.src = state.gridUrl;
    });
    img.dataset.layer = name;
    img.dataset.cmap = v.cmap;
    img.dataset.channels = JSON.stringify(meta.channels);
    img.dataset.boxes = JSON.stringify(meta.boxes);
    const info = state.layerInfo;
    const orderText =
      v.order === "relevance" ? "most relevant to " + targetName() + " first" : (state.config.order_labels || {})[v.order] || v.order;
    img.dataset.order = v.order;
    $("order-relevance").classList.toggle("active", v.order === "relevance");
    const scaleText =
      v.scale === "channel"
        ? "each map coloured from its own min to its own max"
        : "all maps share the range " + fmt(meta.vmin[0]) + " … " + fmt(meta.vmax[0]);
    $("grid-note").textContent =
      meta.channels.length + " of " + info.channels + " channels, " + orderText + "; " + scaleText + " (" + v.norm + ", " + v.cmap + "). Click a channel to enlarge it.";
    placeSelection();
  }

  /** Pixels per map so that the grid about fills the pane (the server rounds to an integer factor). */
  function mapSize() {
    const width = $("channels-pane").clientWidth || 600;
    const shape = state.layerInfo ? state.layerInfo.shape : [64, 8, 8];
    const k = Math.min(Number($("max-select").value), shape[0]);
    const cols = Math.max(1, Math.ceil(Math.sqrt(k)));
    const side = Math.floor((width - 2 * cols - 4) / cols);
    return Math.max(16, Math.min(192, side));
  }

  function loadPca() {
    const name = state.layer;
    $("pca-img").src = captureUrl("/pca.png", { layer: name, size: 448 });
    $("pca-overlay").src = captureUrl("/pca.png", { layer: name, mode: "overlay" });
    $("pca-img").dataset.layer = name;
    loadComparePca(name);
  }

  // The second model's map of the same layer, both drawn in one PCA basis fitted over both.
  async function loadComparePca(name) {
    const box = $("pca-compare");
    const seq = ++state.cmpSeq;
    if (!state.compareId) {
      box.hidden = true;
      return;
    }
    const base = "/compare/" + encodeURIComponent(state.compareId);
    try {
      const info = await (await api(captureUrl(base, { layer: name }))).json();
      if (seq !== state.cmpSeq) return;
      box.hidden = false;
      const note = info.joint
        ? "Side by side in one PCA basis fitted over both maps: a colour means the same direction in A and B."
        : info.note;
      $("pca-compare-note").textContent = note;
      $("pca-joint-a").src = captureUrl(base + "/pca.png", { layer: name, side: "a", size: 448 });
      $("pca-joint-a-cap").textContent = "A: " + info.model_a + " · " + info.channels_a + " channels";
      const hasB = info.channels_b !== null;
      $("pca-joint-b").hidden = !hasB;
      $("pca-joint-b-cap").textContent = hasB ? "B: " + info.model_b + " · " + info.channels_b + " channels" : "";
      if (hasB) $("pca-joint-b").src = captureUrl(base + "/pca.png", { layer: name, side: "b", size: 448 });
      $("pca-joint-a").dataset.joint = $("pca-joint-b").dataset.joint = info.joint ? "1" : "0";
    } catch (err) {
      if (seq === state.cmpSeq) fail(err);
    }
  }

  function boxAt(ev) {
    const img = $("grid-img");
    if (!state.grid || !img.naturalWidth) return -1;
    const rect = img.getBoundingClientRect();
    const x = ((ev.clientX - rect.left) * img.naturalWidth) / rect.width;
    const y = ((ev.clientY - rect.top) * img.naturalHeight) / rect.height;
    return state.grid.boxes.findIndex((b) => x >= b[0] && x < b[2] && y >= b[1] && y < b[3]);
  }

  function placeBox(node, i) {
    const img = $("grid-img");
    if (i < 0 || !state.grid) {
      node.hidden = true;
      return;
    }
    const s = img.clientWidth / img.naturalWidth;
    const b = state.grid.boxes[i];
    node.style.left = b[0] * s + "px";
    node.style.top = b[1] * s + "px";
    node.style.width = (b[2] - b[0]) * s + "px";
    node.style.height = (b[3] - b[1]) * s + "px";
    node.hidden = false;
  }

  function placeSelection() {
    const i = state.grid && state.channel !== null ? state.grid.channels.indexOf(state.channel) : -1;
    placeBox($("grid-selected"), i);
  }

  // -- a channel -------------------------------------------------------------------------

  function loaded(img, url) {
    return new Promise((resolve) => {
      img.onload = resolve;
      img.onerror = resolve;
      img.src = url;
    });
  }

  async function selectChannel(ch) {
    state.channel = ch;
    const name = state.layer;
    const v = view();
    placeSelection();
    try {
      const info = await (await api(captureUrl("/channel", { layer: name, channel: ch, norm: v.norm }))).json();
      if (state.layer !== name || state.channel !== ch) return;
      $("channel-empty").hidden = true;
      $("channel-detail").hidden = false;
      $("channel-title").textContent = name + " · channel " + ch;
      const big = $("channel-img");
      await Promise.all([
        loaded(big, captureUrl("/channel.png", { layer: name, channel: ch, cmap: v.cmap, norm: v.norm, size: 448 })),
        loaded($("colorbar-img"), "/api/colorbar.png?" + query({ cmap: v.cmap })),
        loaded($("overlay-img"), captureUrl("/overlay.png", { layer: name, channel: ch, cmap: v.cmap, norm: v.norm, alpha: state.alpha })),
      ]);
      big.dataset.channel = String(ch);
      big.dataset.layer = name;
      const labels = $("cb-labels");
      labels.replaceChildren(...[info.ticks[0], info.ticks[2], info.ticks[4]].map((t) => el("span", null, fmt(t))));
      labels.dataset.vmin = String(info.vmin);
      labels.dataset.vmax = String(info.vmax);
      const marker = $("cb-mean");
      const f = info.vmax > info.vmin ? (info.mean - info.vmin) / (info.vmax - info.vmin) : 0;
      marker.hidden = info.norm !== "linear";
      marker.style.left = "calc(" + (Math.max(0, Math.min(1, f)) * 100).toFixed(2) + "% - 1px)";
      $("channel-scale-note").textContent =
        "colours span this channel's range, " + info.norm + " · " + v.cmap + (info.norm === "linear" ? "; the black tick marks the mean" : "");
      const dl = $("channel-stats");
      dl.replaceChildren();
      const stat = (label, value) => {
        const d = el("div");
        d.append(el("dt", null, label), el("dd", null, value));
        dl.append(d);
      };
      stat("min", fmt(info.min));
      stat("mean", fmt(info.mean));
      stat("max", fmt(info.max));
      stat("dead", info.dead ? "yes (all zero)" : "no");
      stat("map", info.shape.join("×"));
      stat("channel", ch + " (layer has " + state.layerInfo.channels + ")");
      if (state.relevance && state.relevance.layer === name) {
        const rank = state.relevance.order.indexOf(ch) + 1;
        stat("relevance to " + state.relevance.target.label, fmt(state.relevance.channels[ch]) + " (rank " + rank + ")");
      }
      $("channel-pane").dataset.channel = String(ch);
      showCachedVisualization(name, ch);
    } catch (err) {
      fail(err);
    }
  }

  // -- relevance to a class --------------------------------------------------------------

  function targetName() {
    const r = state.relevance;
    if (r) return r.target.label + " (" + r.target.index + ")";
    return state.labels && state.target !== null ? state.labels[state.target] : "the class";
  }

  function setRelevanceOrderOption(on) {
    const sel = $("order-select");
    let opt = sel.querySelector('option[value="relevance"]');
    if (on && !opt) {
      opt = el("option", null, "most relevant to the class first");
      opt.value = "relevance";
      sel.append(opt);
    }
    if (!on && opt) {
      if (sel.value === "relevance") sel.value = sel.options[0].value;
      opt.remove();
    }
  }

  async function setupClassPicker(summary) {
    const card = $("class-card");
    card.hidden = false;
    $("class-results").replaceChildren();
    $("class-current").hidden = true;
    const search = $("class-search");
    search.value = "";
    search.disabled = !summary.classifier;
    card.dataset.classifier = summary.classifier ? "1" : "0";
    if (!summary.classifier) {
      $("class-note").textContent =
        "Relevance to a class needs an ImageNet classifier (1000 classes); " + summary.model +
        " is not one. In Python, featuremaps.relevance takes a callable target for any model.";
      return;
    }
    $("class-note").textContent = summary.pretrained
      ? "Click a prediction above, or search the 1000 ImageNet classes: the viewer shows which channels of each layer drive that class, and where."
      : "Random weights: relevance to a class can be computed but means little. Search a class to see it anyway.";
    if (!state.labels) state.labels = (await (await api("/api/labels")).json()).labels;
  }

  function searchClasses() {
    const list = $("class-results");
    const q = $("class-search").value.trim().toLowerCase();
    if (!q || !state.labels) {
      list.replaceChildren();
      return;
    }
    const hits = [];
    const asIndex = /^\d+$/.test(q) ? Number(q) : -1;
    for (let i = 0; i < state.labels.length && hits.length < 12; i++) {
      if (i === asIndex || state.labels[i].toLowerCase().includes(q)) hits.push(i);
    }
    list.replaceChildren(
      ...hits.map((i) => {
        const li = el("li");
        const b = el("button", i === state.target ? "picked" : "", state.labels[i] + "  · " + i);
        b.type = "button";
        b.dataset.index = String(i);
        b.addEventListener("click", () => pickClass(i));
        li.append(b);
        return li;
      })
    );
    if (!hits.length) list.replaceChildren(el("li", "muted small", "no class matches " + JSON.stringify(q)));
  }

  async function pickClass(index) {
    if (!state.capture) return;
    const seq = ++state.relSeq;
    const cid = state.capture.capture_id;
    try {
      const name = state.labels ? state.labels[index] : "class " + index;
      let job = await postJson(captureUrl("/relevance"), { target: index, layer: state.layer });
      job = await pollJob(job, (j) =>
        status("Relevance to " + name + ": step " + j.step + "/" + j.steps + ", " + j.phase + " … " + j.elapsed.toFixed(1) + " s", {
          busy: true,
          fraction: j.step / j.steps,
        })
      );
      if (seq !== state.relSeq || !state.capture || state.capture.capture_id !== cid) return;
      state.target = Number(job.result_id);
      for (const li of document.querySelectorAll("#pred-list li")) li.classList.toggle("picked", li.dataset.index === job.result_id);
      for (const b of document.querySelectorAll("#class-results button")) b.classList.toggle("picked", b.dataset.index === job.result_id);
      setRelevanceOrderOption(true);
      $("order-relevance").hidden = false;
      await loadRelevance();
      status("Relevance to " + targetName() + " computed in " + job.elapsed.toFixed(1) + " s. Press “Order by relevance” to rank the grid.", { fraction: 1 });
      if ($("order-select").value === "relevance") await refreshView();
      else if (state.channel !== null) await selectChannel(state.channel);
    } catch (err) {
      fail(err);
    }
  }

  async function loadRelevance() {
    const name = state.layer;
    const index = state.target;
    const r = await (await api(captureUrl("/relevance/" + index, { layer: name }))).json();
    if (state.layer !== name || state.target !== index) return;
    state.relevance = r;
    const t = r.target;
    $("relevance-view").hidden = false;
    $("relevance-view").dataset.target = String(t.index);
    $("relevance-view").dataset.layer = name;
    $("relevance-title").textContent = "Relevance to " + t.label + " (class " + t.index + ")";
    $("relevance-meta").textContent =
      "p = " + (t.prob * 100).toFixed(1) + "% · logit " + fmt(t.score) + " · layer sum: +" + fmt(r.positive) + " / " + fmt(r.negative);
    $("class-current").hidden = false;
    $("class-current").textContent = "Showing: " + t.label + " (class " + t.index + ", p " + (t.prob * 100).toFixed(1) + "%)";
    const finite = r.channels.filter((v) => v !== null);
    const top = Math.max(1e-30, ...finite.map(Math.abs));
    const bars = (ids) =>
      ids.map((ch) => {
        const v = r.channels[ch];
        const li = el("li");
        li.dataset.channel = String(ch);
        li.dataset.value = String(v);
        li.title = "channel " + ch + ": relevance " + v;
        const bar = el("div", "bar");
        const fill = el("span");
        fill.style.width = ((Math.abs(v) / top) * 100).toFixed(2) + "%";
        bar.append(fill);
        li.append(el("span", null, "#" + ch), bar, el("span", "val", fmt(v)));
        li.addEventListener("click", () => selectChannel(ch));
        return li;
      });
    const pos = r.order.filter((ch) => r.channels[ch] > 0).slice(0, 10);
    const neg = r.order.filter((ch) => r.channels[ch] < 0).reverse().slice(0, 6);
    $("relevance-pos").replaceChildren(...bars(pos));
    $("relevance-neg").replaceChildren(...bars(neg));
    const cam = (kind, id, max) => {
      $(id).src = captureUrl("/relevance/" + index + "/cam.png", { layer: name, kind: kind, cmap: "jet", alpha: 0.5 });
      $(id).dataset.layer = name;
      $(id + "-range").textContent = "(0 … " + fmt(max) + ")";
    };
    cam("gradcam", "cam-gradcam", r.gradcam_max);
    cam("layercam", "cam-layercam", r.layercam_max);
    $("cam-colorbar").src = "/api/colorbar.png?" + query({ cmap: "jet" });
  }

  async function orderByRelevance() {
    if (state.target === null) return;
    $("order-select").value = "relevance";
    if (state.tab !== "channels") document.querySelector('.tab[data-tab="channels"]').click();
    else await refreshView();
  }

  // -- feature visualization -------------------------------------------------------------

  const visDone = {}; // "layer\u0000channel\u0000steps\u0000size" -> result id, in this page

  function visKey(layer, ch) {
    return [layer, ch, $("vis-steps").value, $("vis-size").value].join("\u0000");
  }

  function showCachedVisualization(layer, ch) {
    const id = visDone[visKey(layer, ch)];
    $("vis-status").textContent = "";
    if (id) showVisualization(id, layer, ch);
    else $("vis-result").hidden = true;
  }

  async function showVisualization(id, layer, ch) {
    const meta = await (await api("/api/visualizations/" + encodeURIComponent(id))).json();
    if (state.layer !== layer || state.channel !== ch) return;
    await Promise.all([
      loaded($("vis-img"), "/api/visualizations/" + encodeURIComponent(id) + "/image.png"),
      loaded($("vis-channel"), captureUrl("/overlay.png", { layer: layer, channel: ch, cmap: $("cmap-select").value, norm: $("norm-select").value, alpha: state.alpha })),
    ]);
    $("vis-img").dataset.objective = meta.objective;
    $("vis-caption").textContent =
      meta.objective + " · " + meta.steps + " steps at " + meta.size + " px, seed " + meta.seed + " · channel mean " + fmt(meta.value) + " · " + meta.seconds.toFixed(1) + " s";
    $("vis-result").hidden = false;
  }

  async function runVisualization() {
    if (!state.capture || state.channel === null) return;
    const layer = state.layer;
    const ch = state.channel;
    const seq = ++state.visSeq;
    const button = $("vis-button");
    button.disabled = true;
    const steps = Number($("vis-steps").value);
    const size = Number($("vis-size").value);
    try {
      let job = await postJson("/api/visualize", { capture_id: state.capture.capture_id, layer: layer, channel: ch, steps: steps, size: size });
      job = await pollJob(job, (j) => {
        if (seq === state.visSeq) $("vis-status").textContent = "Step " + j.step + "/" + j.steps + ": " + j.phase + " … " + j.elapsed.toFixed(1) + " s";
      });
      visDone[[layer, ch, steps, size].join("\u0000")] = job.result_id;
      if (seq !== state.visSeq || state.layer !== layer || state.channel !== ch) return;
      $("vis-status").textContent = "Done in " + job.elapsed.toFixed(1) + " s.";
      await showVisualization(job.result_id, layer, ch);
    } catch (err) {
      if (seq === state.visSeq) $("vis-status").textContent = "Error: " + err.message;
    } finally {
      button.disabled = false;
    }
  }

  // -- wiring ----------------------------------------------------------------------------

  function wire() {
    $("capture-form").addEventListener("submit", startCapture);
    $("model-input").addEventListener("change", syncWeights);
    $("compare-input").addEventListener("change", syncWeights);
    for (const b of document.querySelectorAll(".sample")) b.addEventListener("click", () => pickSample(b.dataset.sample, b));
    $("file-input").addEventListener("change", (ev) => upload(ev.target.files[0]));
    $("layer-filter").addEventListener("input", () => state.capture && renderLayerList());
    $("stages-only").addEventListener("change", () => state.capture && renderLayerList());
    for (const id of ["cmap-select", "norm-select", "order-select", "scale-select", "max-select"]) {
      $(id).addEventListener("change", () => state.layer && refreshView().catch(fail));
    }
    for (const tab of document.querySelectorAll(".tab")) {
      tab.addEventListener("click", () => {
        state.tab = tab.dataset.tab;
        for (const t of document.querySelectorAll(".tab")) {
          t.classList.toggle("active", t === tab);
          t.setAttribute("aria-selected", String(t === tab));
        }
        $("channels-pane").hidden = state.tab !== "channels";
        $("pca-pane").hidden = state.tab !== "pca";
        $("channel-pane").hidden = state.tab !== "channels";
        $("channel-controls").hidden = state.tab !== "channels";
        $("view-body").classList.toggle("pca-mode", state.tab === "pca");
        if (state.layer) refreshView().catch(fail);
      });
    }
    const grid = $("grid-img");
    grid.addEventListener("click", (ev) => {
      const i = boxAt(ev);
      if (i >= 0) selectChannel(state.grid.channels[i]);
    });
    grid.addEventListener("mousemove", (ev) => {
      const i = boxAt(ev);
      placeBox($("grid-hover"), i);
      if (i >= 0 && state.layerInfo) {
        const ch = state.grid.channels[i];
        const li = state.layerInfo;
        grid.title = "channel " + ch + " · min " + fmt(li.min[ch]) + " · mean " + fmt(li.mean[ch]) + " · max " + fmt(li.max[ch]);
      }
    });
    grid.addEventListener("mouseleave", () => ($("grid-hover").hidden = true));
    window.addEventListener("resize", placeSelection);
    $("class-search").addEventListener("input", searchClasses);
    $("order-relevance").addEventListener("click", () => orderByRelevance().catch(fail));
    $("vis-button").addEventListener("click", runVisualization);
    for (const id of ["vis-steps", "vis-size"]) {
      $(id).addEventListener("change", () => state.channel !== null && showCachedVisualization(state.layer, state.channel));
    }
    $("alpha-input").addEventListener("change", () => {
      state.alpha = Number($("alpha-input").value) / 100;
      if (state.channel !== null) selectChannel(state.channel);
    });
    document.addEventListener("keydown", (ev) => {
      if (state.channel === null || !state.grid || ev.target.matches("input, select")) return;
      const i = state.grid.channels.indexOf(state.channel);
      if (ev.key === "ArrowRight" && i < state.grid.channels.length - 1) selectChannel(state.grid.channels[i + 1]);
      if (ev.key === "ArrowLeft" && i > 0) selectChannel(state.grid.channels[i - 1]);
    });
    const hint = $("drop-hint");
    document.addEventListener("dragover", (ev) => {
      ev.preventDefault();
      hint.hidden = false;
    });
    document.addEventListener("dragleave", (ev) => {
      if (ev.relatedTarget === null) hint.hidden = true;
    });
    document.addEventListener("drop", (ev) => {
      ev.preventDefault();
      hint.hidden = true;
      if (ev.dataTransfer.files.length) upload(ev.dataTransfer.files[0]);
    });
  }

  wire();
  loadConfig()
    .then(() => {
      document.body.dataset.ready = "1";
    })
    .catch(fail);
})();
