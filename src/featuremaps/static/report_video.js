/* featuremaps report: a video input as a player with a layer switch.
 *
 * Each entry of DATA.videos carries, per layer, the PCA video that featuremaps.video
 * wrote (the sampled frame beside its PCA picture, one basis over all frames), embedded
 * as a data: URL (WebM). The switch swaps the player's source and keeps the playback
 * position, so the same moment can be compared across layers.
 */
var featuremapsVideo = (function () {
  "use strict";

  const { el } = featuremapsCommon;

  function buildCard(video, i) {
    const card = el("section", "card video-section");
    card.dataset.video = String(i);
    const head = el("header", "section-head");
    head.append(el("h2", "image-name", video.name), el("span", "image-path muted", video.path));
    card.append(head);
    const names = Object.keys(video.layers);
    const label = el("label", "field inline", "Layer ");
    const select = el("select", "video-layer");
    for (const name of names) {
      const o = el("option", null, name);
      o.value = name;
      select.append(o);
    }
    label.append(select);
    const player = el("video", "video-player");
    player.controls = true;
    player.loop = true;
    player.muted = true;
    player.preload = "auto";
    player.setAttribute("playsinline", "");
    player.style.maxWidth = "100%";
    const caption = el("figcaption", "muted small");
    const fig = el("figure", "video-fig");
    fig.append(player, caption);
    card.append(label, fig);

    function show(name) {
      const layer = video.layers[name];
      if (!layer) return;
      const t = player.currentTime || 0;
      const playing = !player.paused;
      player.src = layer.src;
      player.dataset.layer = name;
      player.addEventListener(
        "loadedmetadata",
        () => {
          if (t > 0 && t < player.duration) player.currentTime = t;
          if (playing) player.play().catch(() => {});
        },
        { once: true },
      );
      caption.textContent =
        `input (left) and the PCA of ${name} (right): ${layer.frames} frames at ` +
        `${Number(video.fps).toFixed(3).replace(/\.?0+$/, "")} fps, one PCA basis over the whole video`;
    }
    select.addEventListener("change", () => show(select.value));
    if (names.length) show(names[0]);
    return { card, select, player, show };
  }

  function mount(root, DATA) {
    const videos = DATA.videos || [];
    if (!videos.length) return null;
    const host = root.getElementById("videos") || root.getElementById("main");
    const cards = videos.map((v, i) => buildCard(v, i));
    for (const c of cards) host.append(c.card);
    return { cards };
  }

  const api = { mount, page: null };
  if (typeof featuremapsReport !== "undefined" && featuremapsReport.page) {
    api.page = mount(document, featuremapsReport.page.data);
  }
  return Object.freeze(api);
})();
