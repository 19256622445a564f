/* featuremaps report --compare: the second model's PCA picture beside the first's.
 *
 * Each image of a compared report carries `compare.layers[LAYER]`: model B's paired layer
 * and, for a pair of equal width, both PCA pictures drawn in one basis and one colour
 * scale (fitted in Python over the pixels of both maps), or a note saying why not. This
 * script shows the pair of the layer on show, under each image's layer heading.
 */
var featuremapsCompare = (function () {
  "use strict";

  const { el } = featuremapsCommon;

  function mount(root, DATA, host) {
    if (!DATA.images.some((im) => im.compare)) return null;
    const panels = [];
    for (const section of root.querySelectorAll(".image-section")) {
      const image = DATA.images[Number(section.dataset.index)];
      if (!image || !image.compare) continue;
      const panel = el("div", "compare-panel");
      panel.style.display = "flex";
      panel.style.gap = "1rem";
      panel.style.alignItems = "flex-start";
      panel.style.margin = "0.5rem 0";
      const layerPanel = section.querySelector(".layer-panel");
      layerPanel.insertBefore(panel, layerPanel.querySelector(".layer-body"));
      panels.push({ panel, image });
    }
    function figure(src, caption) {
      const f = el("figure");
      f.style.margin = "0";
      const img = el("img", "pixelated");
      img.src = src;
      img.alt = caption;
      img.style.width = "224px";
      f.append(img, el("figcaption", "muted small", caption));
      return f;
    }
    function draw() {
      const name = host.dataset.layer || DATA.layers[0].name;
      for (const { panel, image } of panels) {
        const c = image.compare.layers[name];
        const title = el("p", "small");
        if (!c || !c.pca_a) {
          title.textContent =
            "Compared with " + image.compare.model + ": " + (c ? (c.layer_b ? c.layer_b + ": " : "") + c.note : "no paired layer");
          panel.replaceChildren(title);
          continue;
        }
        title.textContent =
          "One PCA basis over both models (" + c.channels[0] + " channels): the same colour is the same direction in both.";
        panel.replaceChildren(
          figure(c.pca_a, DATA.model + " · " + name),
          figure(c.pca_b, image.compare.model + " (" + image.compare.weights + ") · " + c.layer_b),
          title
        );
        panel.dataset.layer = name;
      }
    }
    new MutationObserver(draw).observe(host, { attributes: true, attributeFilter: ["data-layer"] });
    draw();
    return { draw };
  }

  const api = { mount, page: null };
  if (typeof featuremapsReport !== "undefined" && featuremapsReport.page) {
    api.page = mount(document, featuremapsReport.page.data, document.body);
  }
  return Object.freeze(api);
})();
