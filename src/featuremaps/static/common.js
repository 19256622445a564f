/* featuremaps: helpers shared by the report, the notebook explorer and the viewer.
 *
 * A classic script (no module loader is needed, so it works inline in a file:// page and
 * in a notebook cell): it defines one global, featuremapsCommon. No network, no libraries.
 */
var featuremapsCommon = (function () {
  "use strict";

  /** A new element with a class and text (text is never parsed as markup). */
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  /** A number for people: 4 significant digits, exponent outside 1e-3..1e4; "–" if none. */
  function fmt(v) {
    if (v === null || v === undefined || Number.isNaN(v)) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
    return String(parseFloat(v.toPrecision(4)));
  }

  /** A "label value" pill; `alert` marks it as a warning. */
  function chip(label, value, alert) {
    const c = el("span", alert ? "chip alert" : "chip");
    c.append(document.createTextNode(label + " "), el("b", null, value));
    return c;
  }

  function bytesOf(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  function blobOf(dataUrl) {
    const comma = dataUrl.indexOf(",");
    const mime = dataUrl.slice(5, dataUrl.indexOf(";"));
    return new Blob([bytesOf(dataUrl.slice(comma + 1))], { type: mime });
  }

  /**
   * The colour level of a value s scaled to [0, 1], exactly as featuremaps.render.level_index
   * computes it: floor((levels - 1) * s + 0.5), each step rounded to float32 when `single`
   * (as render does for float32 maps) or in float64 otherwise. NaN gives levels + 1 (the NaN
   * colour's palette index). s must lie in [0, 1]; clip01 first.
   */
  function levelIndex(s, levels, single) {
    if (Number.isNaN(s)) return levels + 1;
    if (single) {
      const f = Math.fround;
      return Math.floor(f(f(f(s) * (levels - 1)) + 0.5));
    }
    return Math.floor(s * (levels - 1) + 0.5);
  }

  function clip01(x) {
    return x < 0 ? 0 : x > 1 ? 1 : x; // NaN stays NaN
  }

  return Object.freeze({ el, fmt, chip, bytesOf, blobOf, levelIndex, clip01 });
})();
