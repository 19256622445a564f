"""The typed options: parsing, normalization and the messages of bad values."""

from __future__ import annotations

import json

import pytest

from featuremaps import FeatureMapsError
from featuremaps.options import (
    Device,
    Engine,
    Norm,
    OptionError,
    Order,
    PCAComponents,
    RenderOptions,
    Scale,
    Score,
    check_cmap,
    choices,
    describe_order,
    parse_choice,
    parse_order,
)


def test_enums_compare_equal_to_their_strings():
    assert Norm.LOG == "log" and Scale.LAYER == "layer" and Order.VARIANCE == "variance"
    assert Score("mean") is Score.MEAN and Engine("ray") is Engine.RAY
    assert Device("mps") is Device.MPS and PCAComponents(1) is PCAComponents.GRAY
    assert json.dumps({"n": Norm.SYMLOG}) == '{"n": "symlog"}'


def test_choices_in_words():
    assert choices(Norm) == "linear, log or symlog"
    assert choices(Score) == "max, mean or relevance"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("index", Order.INDEX),
        ("top", Order.TOP),
        ("variance", Order.VARIANCE),
        (" TOP ", Order.TOP),
        ("3,7,12", (3, 7, 12)),
        ("3, 7 ,12", (3, 7, 12)),
        ("5", (5,)),
        ([4, 0], (4, 0)),
        ((1,), (1,)),
        (Order.TOP, Order.TOP),
    ],
)
def test_parse_order(text, expected):
    assert parse_order(text) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("random", "--order 'random': use index"),
        ("3,x", "channel numbers like 3,7,12"),
        ("-1,2", "start at 0"),
        ([1.5], "integers"),
        ([], "empty"),
    ],
)
def test_parse_order_rejects(value, words):
    with pytest.raises(OptionError, match=words):
        parse_order(value)


def test_option_error_is_a_featuremaps_and_value_error():
    with pytest.raises(FeatureMapsError):
        parse_choice(Norm, "x", "--norm")
    with pytest.raises(ValueError, match=r"^--norm 'x': use linear, log or symlog$"):
        parse_choice(Norm, "x", "--norm")


def test_parse_choice_suggests_the_closest():
    with pytest.raises(OptionError, match="Did you mean: symlog"):
        parse_choice(Norm, "symlg", "--norm")
    assert parse_choice(Norm, "LOG", "--norm") is Norm.LOG


def test_describe_order():
    assert describe_order(Order.TOP) == "highest mean first"
    assert describe_order(Order.INDEX) == "by index"
    assert describe_order((3, 7)) == "as listed: 3, 7"


def test_render_options_normalize_strings_to_enums():
    opts = RenderOptions(norm="log", scale="layer", order="2,1", pca=1)  # type: ignore[arg-type]
    assert opts.norm is Norm.LOG and opts.scale is Scale.LAYER
    assert opts.order == (2, 1) and opts.pca is PCAComponents.GRAY
    assert opts.to_json()["order"] == [2, 1] and opts.to_json()["norm"] == "log"
    json.dumps(opts.to_json())
    with pytest.raises(AttributeError):
        opts.norm = Norm.LINEAR  # type: ignore[misc]
    assert opts.replace(order="top").order is Order.TOP


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("norm", "x", r"--norm 'x': use linear, log or symlog"),
        ("scale", "row", r"--scale 'row': use channel or layer"),
        ("pca", 2, r"--pca 2: use 0, 1 or 3"),
        ("max_maps", -3, r"--max-maps -3: use a whole number 1 or more \(or 0 for all\)"),
        ("cols", -2, r"--cols -2: use a whole number 1 or more"),
        ("map_size", -5, r"--map-size -5: use a whole number from 1 to 1024"),
        ("map_size", 4000, r"--map-size 4000: use a whole number from 1 to 1024"),
        ("cmap", "viridsi", r"--cmap 'viridsi': not a matplotlib colormap. Did you mean"),
        ("order", "best", r"--order 'best'"),
    ],
)
def test_render_options_reject_with_the_option_name(field, value, message):
    with pytest.raises(OptionError, match=message):
        RenderOptions(**{field: value})


def test_check_cmap_offered():
    assert check_cmap("magma", offered=("viridis", "magma")) == "magma"
    with pytest.raises(OptionError, match="use viridis or magma"):
        check_cmap("plasma", offered=("viridis", "magma"))


def test_package_exports_the_render_options():
    import featuremaps

    assert featuremaps.RenderOptions is RenderOptions
