"""Lookup tables of the colormaps featuremaps offers, so drawing needs no matplotlib.

Importing matplotlib costs about 0.3 s of a command's start; the grids only need a
``(256, 3)`` uint8 table per colormap. The tables of :data:`featuremaps.options.REPORT_CMAPS`
are stored here, made exactly as :func:`featuremaps.render.colormap_lut` makes them from
matplotlib; any other colormap name still comes from matplotlib. A test checks that the
stored tables equal matplotlib's; regenerate them with ``python -m featuremaps._colormaps``.
"""

from __future__ import annotations

import base64

import numpy as np

__all__ = ["BUILTIN", "builtin_lut", "from_matplotlib"]

# name -> base64 of the (256, 3) uint8 table, row-major
BUILTIN: dict[str, str] = {
    "viridis": (
        "RAFURAJWRQRXRQVZRgdaRghcRgpdRgteRw1gRw5hRxBjRxFkRxNlSBRnSBZoSBdpSBhqSBpsSBttSBxuSB1vSB9w"
        "SCBxSCFzSCN0SCR1SCV2SCZ3SCh4SCl5Ryp6Ryx6Ry17Ry58Ry99RjB+RjJ+RjN/RjSARTWBRTeBRTiCRDmDRDqD"
        "RDuEQz2EQz6FQj+FQkCGQkGGQUKHQUSHQEWIQEaIP0eIP0iJPkmJPkqJPkyKPU2KPU6KPE+KPFCLO1GLO1KLOlOL"
        "OlSMOVWMOVaMOFiMOFmMN1qMN1uNNlyNNl2NNV6NNV+NNGCNNGGNM2KNM2ONMmSOMmWOMWaOMWeOMWiOMGmOMGqO"
        "L2uOL2yOLm2OLm6OLm+OLXCOLXGOLHGOLHKOLHOOK3SOK3WOKnaOKneOKniOKXmOKXqOKXuOKHyOKH2OJ36OJ3+O"
        "J4COJoGOJoKOJoKOJYOOJYSOJYWOJIaOJIeOI4iOI4mOI4qNIouNIoyNIo2NIY6NIY+NIZCNIZGMIJKMIJKMIJOM"
        "H5SMH5WLH5aLH5eLH5iLH5mKH5qKHpuKHpyJHp2JH56JH5+IH6CIH6GIH6GHH6KHIKOGIKSGIaWFIaaFIqeFIqiE"
        "I6mDJKqDJauCJayCJq2BJ62BKK6AKa9/KrB/LLF+LbJ9LrN8L7R8MbV7MrZ6NLZ5Nbd5N7h4OLl3Orp2O7t1Pbx0"
        "P7xzQL1yQr5xRL9wRsBvSMFuSsFtTMJsTsNrUMRqUsVpVMVoVsZnWMdlWshkXMhjXsliYMpgY8tfZcteZ8xcac1b"
        "bM1abs5YcM9Xc9BWddBUd9FTetFRfNJQf9NOgdNNhNRLhtVJidVIi9ZGjtZFkNdDk9dBldhAmNg+m9k8ndk7oNo5"
        "oto3pds2qNs0qtwyrdwwsN0vst0ttd4ruN4put4ovd8mwN8lwt8jxeAhyOAgyuEfzeEd0OEc0uIb1eIa2OIZ2uMZ"
        "3eMY3+MY4uQY5eQZ5+QZ6uUa7OUb7+Uc8eUd9OYe9uYg+OYh++cj/ecl"
    ),
    "magma": (
        "AAAEAQAFAQEGAQEIAgEJAgILAgINAwMPAwMSBAQUBQQWBgUYBgUaBwYcCAceCQcgCggiCwkkDAkmDQopDgsrEAst"
        "EQwvEg0xEw00FA42FQ44Fg87GA89GRA/GhBCHBBEHRFHHhFJIBFLIRFOIhFQJBJTJRJVJxJYKRFaKhFcLBFfLRFh"
        "LxFjMRFlMxBnNBBpNhBrOBBsOQ9uOw9wPQ9xPw9yQA90Qg91RA92RRB3RxB4SRB4ShB5TBF6ThF7TxJ7URJ8UhN8"
        "VBN9VhR9VxV+WRV+WhZ+XBZ/XRd/Xxh/YBiAYhmAZBqAZRqAZxuAaByBahyBax2BbR2Bbh6BcB+Bch+BcyCBdSGB"
        "diGBeCKBeSKCeyOCfCOCfiSCgCWCgSWBgyaBhCaBhieBiCeBiSiBiymBjCmBjiqBkCqBkSuBkyuAlCyAliyAmC2A"
        "mS2Amy5/nC5/ni9/oC9/oTB+ozB+pTF+pjF9qDJ9qjN9qzN8rTR8rjR7sDV7sjV7szZ6tTZ6tzd5uDd5ujh4vDl4"
        "vTl3vzp3wDp2wjt1xDx1xTx0xz1zyD5zyj5yzD9xzUBxz0Bw0EFv0kJv00Nu1URt1kVs2EVs2UZr20dq3Ehp3klo"
        "30po4Exn4k1m405l5E9k5VBk51Jj6FNi6VRi6lZh61dg7Fhg7Vpf7lte711e8F9e8WBd8mJd8mRc82Vc9Gdc9Glc"
        "9Wtc9mxc9m5c93Bc93Jc+HRc+HZc+Xhd+Xld+Xtd+n1e+n9e+oFf+4Nf+4Vg+4dh/Ilh/Ipi/Ixj/I5k/JBl/ZJm"
        "/ZRn/ZZo/Zhp/Zpq/Ztr/p1s/p9t/qFu/qNv/qVx/qdy/qlz/qp0/qx2/q53/rB4/rJ6/rR7/rZ8/rd+/rl//ruB"
        "/r2C/r+E/sGF/sKH/sSI/saK/siM/sqN/syP/s2Q/s+S/tGU/tOV/tWX/teZ/tia/dqc/dye/d6g/eCh/eKj/eOl"
        "/eWn/eep/emq/eus/Oyu/O6w/PCy/PK0/PS2/Pa4/Pe5/Pm7/Pu9/P2/"
    ),
    "inferno": (
        "AAAEAQAFAQEGAQEIAgEKAgIMAgIOAwIQBAMSBAMUBQQXBgQZBwUbCAUdCQYfCgciCwckDAgmDQgpDgkrEAktEQow"
        "EgoyFAs0FQs3Fgs5GAw8GQw+GwxBHAxDHgxFHwxIIQxKIwxMJAxPJgxRKAtTKQtVKwtXLQtZLwpbMQpcMgpeNApf"
        "NglhOAliOQljOwlkPQllPglmQApnQgpoRApoRQppRwtqSQtqSgxrTAxrTQ1sTw1sUQ5sUg5tVA9tVQ9tVxBuWRBu"
        "WhFuXBJuXRJuXxNuYRNuYhRuZBVuZRVuZxZuaRZuahdubBhubRhubxlucRluchpudBpudRtudxxteBxteh1tfB1t"
        "fR5tfx5sgB9sgiBshCBrhSFrhyFriCJqiiJqjCNpjSNpjyRpkCVokiVokyZnlSZnlydmmCdmmihlmylknSlknypj"
        "oCpjoitioyxhpSxgpi1gqC5fqS5eqy9erTBdrjBcsDFbsTJaszJatDNZtjRYtzVXuTVWujZVvDdUvThTvzlSwDpR"
        "wTpQwztPxDxOxj1Nxz5MyD9LykBKy0FJzEJIzkNHz0RG0EVF0kZE00dD1EhC1UpB10s/2Ew+2U092k4821A73VE6"
        "3lI431M34FU24VY14lc041kz5Fox5Vww5l0v514u6GAt6WEr6mMq62Qp62Yo7Gcm7Wkl7mok72wj724h8G8g8XEf"
        "8XMd8nQc83Yb83gZ9HkY9XsX9X0V9n4U9oAT94IS94QQ+IUP+IcO+IkM+YsL+YwK+Y4J+pAI+pIH+pQH+5YG+5cG"
        "+5kG+5sG+50H/J8H/KEI/KMJ/KUK/KYM/KgN/KoP/KwR/K4S/LAU/LIW/LQY+7Ya+7gd+7of+7wh+74j+sAm+sIo"
        "+sQq+sYt+ccv+cky+cs1+M03+M8699E999NA9tVD9tdG9dlJ9dtM9N1P9N9T9OFW8+Na8+Vd8uZh8uhl8upp8ext"
        "8e1x8e918fF58vJ98vSC8/WG8/aK9PiO9fmS9vqW+Pua+fyd+v2h/P+k"
    ),
    "gray": (
        "AAAAAQEBAgICAwMDBAQEBQUFBgYGBwcHCAgICQkJCgoKCwsLDAwMDQ0NDg4ODw8PEBAQEREREhISExMTFBQUFRUV"
        "FhYWFxcXGBgYGRkZGhoaGxsbHBwcHR0dHh4eHx8fICAgISEhIiIiIyMjJCQkJSUlJiYmJycnKCgoKSkpKioqKysr"
        "LCwsLS0tLi4uLy8vMDAwMTExMjIyMzMzNDQ0NTU1NjY2Nzc3ODg4OTk5Ojo6Ozs7PDw8PT09Pj4+Pz8/QEBAQUFB"
        "QkJCQ0NDRERERUVFRkZGR0dHSEhISUlJSkpKS0tLTExMTU1NTk5OT09PUFBQUVFRUlJSU1NTVFRUVVVVVlZWV1dX"
        "WFhYWVlZWlpaW1tbXFxcXV1dXl5eX19fYGBgYWFhYmJiY2NjZGRkZWVlZmZmZ2dnaGhoaWlpampqa2trbGxsbW1t"
        "bm5ub29vcHBwcXFxcnJyc3NzdHR0dXV1dnZ2d3d3eHh4eXl5enp6e3t7fHx8fX19fn5+f39/gICAgYGBgoKCg4OD"
        "hISEhYWFhoaGh4eHiIiIiYmJioqKi4uLjIyMjY2Njo6Oj4+PkJCQkZGRkpKSk5OTlJSUlZWVlpaWl5eXmJiYmZmZ"
        "mpqam5ubnJycnZ2dnp6en5+foKCgoaGhoqKio6OjpKSkpaWlpqamp6enqKioqampqqqqq6urrKysra2trq6ur6+v"
        "sLCwsbGxsrKys7OztLS0tbW1tra2t7e3uLi4ubm5urq6u7u7vLy8vb29vr6+v7+/wMDAwcHBwsLCw8PDxMTExcXF"
        "xsbGx8fHyMjIycnJysrKy8vLzMzMzc3Nzs7Oz8/P0NDQ0dHR0tLS09PT1NTU1dXV1tbW19fX2NjY2dnZ2tra29vb"
        "3Nzc3d3d3t7e39/f4ODg4eHh4uLi4+Pj5OTk5eXl5ubm5+fn6Ojo6enp6urq6+vr7Ozs7e3t7u7u7+/v8PDw8fHx"
        "8vLy8/Pz9PT09fX19vb29/f3+Pj4+fn5+vr6+/v7/Pz8/f39/v7+////"
    ),
    "RdBu_r": (
        "BTBhBjJkBzRnCDZqCThtCjtwDD1zDT92DkF5D0N7EEV+EUeBEkmEE0yHFE6KFVCNF1KQGFSTGVaWGliZG1qcHFyf"
        "HV+iHmGlH2OoIGWrImesI2mtJGquJmyvJ26wKHCxKnGyK3OzLHW0Lne1L3m1MHq2Mny3M364NIC5NoG6N4O7OIW8"
        "Ooe9O4i+PIq+Poy/P47AQI/BQpHCQ5PDRpXESZfFTJnGT5vHUp3IVp/JWaHKXKPLX6XNYqfOZanPaKvQa6zRbq7S"
        "cbDTdbLUeLTVe7bWfrjXgbrYhLzZh77aisDbjcLckMTdk8belsffmMjgm8ngncvhoMzios3jpc7jp9DkqdHlrNLl"
        "rtPmsdXns9bottfouNjpu9rqvdvqwNzrwt3sxd/sx+DtyuHuzOLvz+Tv0eXw0ubw1Obx1efx1+jx2Onx2uny2+ry"
        "3evy3uvy4Ozz4e3z4+3z5O705u/05/D06fD06vH17PL17fL17/P18PT28vX28/X29fb39vf39/b29/X0+PTy+PPw"
        "+PLv+PHt+fDr+e/p+e7n+e3l+evj+urh+unf+uje+ufc++ba++XY++TW++PU/OLS/ODQ/N/P/N7N/d3L/dzJ/dvH"
        "/dnE/NfC/NW//NO8+9C5+863+8y0+sqx+siv+cas+cSp+cKn+L+k+L2h+Lue97mc97eZ97WW9rOU9rGR9q+O9ayL"
        "9aqJ9aiG9KaD86SB8qF/8Z598Jx775l57pZ37JN065Fy6o5w6Ytu6Ils5oZq5YNo5IBm435k4nti4Xhg33Ze3nNc"
        "3XBZ3G5X22tV2mhT2GVR12NP1mBN1V1M01pK0lhJ0FVIz1JGzk9FzExEy0lCyUdByERAxkE+xT49xDs8wjg6wTY5"
        "vzM4vjA2vS01uyo0uigyuCUxtyIwth8utBwtsxkssRgrrhcqqxYqqBUppRQpohMonxIonBEnmRAnlg8nkw4mkA0m"
        "jQwligslhwokhAkkgQgjfwgjfAcieQYidgUhcwQhcAMgbQIgagEfZwAf"
    ),
    "jet": (
        "AACAAACEAACJAACNAACSAACWAACbAACfAACkAACoAACtAACyAAC2AAC7AAC/AADEAADIAADNAADRAADWAADaAADf"
        "AADjAADoAADtAADxAAD2AAD6AAD/AAD/AAD/AAD/AAH/AAT/AAn/AA3/ABH/ABT/ABn/AB3/ACH/ACT/ACn/AC3/"
        "ADH/ADT/ADn/AD3/AEH/AET/AEn/AE3/AFH/AFT/AFn/AF3/AGH/AGT/AGn/AG3/AHH/AHT/AHn/AH3/AIH/AIX/"
        "AIj/AI3/AJH/AJX/AJn/AJ3/AKH/AKX/AKj/AK3/ALH/ALX/ALn/AL3/AMH/AMX/AMj/AM3/ANH/ANX/ANn/AN3+"
        "AOH7AOX4Auj0Bu3xCfHuDPXrD/nnE/3kFv/hGf/eHP/bH//XI//UJv/RKf/OLP/KMP/HM//ENv/BOf++PP+6QP+3"
        "Q/+0Rv+xSf+tTf+qUP+nU/+kVv+gWv+dXf+aYP+XY/+UZv+Qav+Nbf+KcP+Hc/+Dd/+Aev99ff96gP93g/9zh/9w"
        "iv9tjf9qkP9mlP9jl/9gmv9dnf9aoP9WpP9Tp/9Qqv9Nrf9Jsf9GtP9Dt/9Auv88vv85wf82xP8zx/8wyv8szv8p"
        "0f8m1P8j1/8f2/8c3v8Z4f8W5P8T5/8P6/8M7v8J8fwG9PgC+PUA+/EA/u0A/+oA/+YA/+IA/94A/9sA/9cA/9MA"
        "/9AA/8wA/8gA/8QA/8EA/70A/7kA/7YA/7IA/64A/6sA/6cA/6MA/58A/5wA/5gA/5QA/5EA/40A/4kA/4YA/4IA"
        "/34A/3oA/3cA/3MA/28A/2wA/2gA/2QA/2AA/10A/1kA/1UA/1IA/04A/0oA/0cA/0MA/z8A/zsA/zgA/zQA/zAA"
        "/y0A/ykA/yUA/yIA/x4A/xoA/xYA/xMA+g8A9gsA8QgA7QQA6AAA5AAA3wAA2gAA1gAA0QAAzQAAyAAAxAAAvwAA"
        "uwAAtgAAsgAArQAAqAAApAAAnwAAmwAAlgAAkgAAjQAAiQAAhAAAgAAA"
    ),
}


def builtin_lut(name: str) -> np.ndarray | None:
    """The stored ``(256, 3)`` table of ``name``, or ``None`` if none is stored."""
    data = BUILTIN.get(name)
    if data is None:
        return None
    return np.frombuffer(base64.b64decode(data), dtype=np.uint8).reshape(256, 3).copy()


def from_matplotlib(name: str) -> np.ndarray:
    """The ``(256, 3)`` uint8 table of a matplotlib colormap (imports matplotlib)."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return (cmap(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


if __name__ == "__main__":  # print BUILTIN anew from the installed matplotlib
    import textwrap

    from .options import REPORT_CMAPS

    print("BUILTIN: dict[str, str] = {")
    for cmap_name in REPORT_CMAPS:
        text = base64.b64encode(from_matplotlib(cmap_name).tobytes()).decode("ascii")
        print(f'    "{cmap_name}": (')
        for chunk in textwrap.wrap(text, 88):
            print(f'        "{chunk}"')
        print("    ),")
    print("}")
