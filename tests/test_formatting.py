"""The one set of number formatters: a missing number (None, NaN, inf) prints as '-' (or nothing for an
interval), except where a measured NaN must show."""

from __future__ import annotations

import math

from forgetscale import formatting as f


def test_missing_numbers_print_as_a_dash():
    for x in (None, math.nan, math.inf):
        assert f.num(x) == f.fixed(x) == f.signed(x) == f.pct(x) == "-"
    assert f.interval(1.0, None) == "none" and f.ci_suffix(math.nan, 1.0) == "" and f.bracket(None, 2) == "[-, 2]"


def test_the_formats():
    assert f.num(1234.5678) == "1235" and f.num(5.6e-05) == "5.6e-05" and f.num(3) == "3"
    assert f.fixed(2.5) == "2.5000" and f.fixed(2.5, 2) == "2.50" and f.signed(0.25, 3) == "+0.250"
    assert f.pct(0.12345) == "12.35%" and f.pct(0.5, 0) == "50%"
    assert f.interval(1, 2) == "[1.0000, 2.0000]" and f.ci_suffix(0.1, 0.2) == " [0.1, 0.2]"


def test_measured_and_stored_values_keep_nan_visible():
    assert f.measured(None) == "-" and f.measured(math.nan) == "nan" and f.measured(2.0) == "2"
    assert f.cell(None) == "-" and f.cell(math.nan) == "nan" and f.cell(12345) == "12,345" and f.cell("x") == "x"
    assert f.cell(0.123456, 5) == "0.12346"
