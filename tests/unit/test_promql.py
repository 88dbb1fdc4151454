"""The PromQL condition splitter the metrics test uses to evaluate alert expressions."""

from __future__ import annotations

import pytest

from tests.integration.promql import _CMP, operands, split_top


@pytest.mark.parametrize(
    "expr, expected",
    [
        ('up{job="asyncps-worker"} == 0', ['up{job="asyncps-worker"}', "0"]),
        ("increase(x_total[5m]) > 0", ["increase(x_total[5m])", "0"]),
        (
            "max by (shard) (histogram_quantile(0.99, sum by (shard, le) (rate(h_bucket[5m])))) > max by (shard) (b)",
            [
                "max by (shard) (histogram_quantile(0.99, sum by (shard, le) (rate(h_bucket[5m]))))",
                "max by (shard) (b)",
            ],
        ),
        ("(time() - t) > 3 * i and v > c", ["time() - t", "3 * i", "v", "c"]),
        ("a >= bool on(shard) group_left b", ["a", "b"]),
        ('x{a!="1",b=~"x|y"} != 2 or (y < 1 unless z)', ['x{a!="1",b=~"x|y"}', "2", "y", "1", "z"]),
        ('rate(m{l=">"}[1m])', ['rate(m{l=">"}[1m])']),
        ("operand_total and_more", ["operand_total and_more"]),  # identifiers containing and/or are not operators
    ],
)
def test_operands(expr, expected):
    assert operands(expr) == expected


def test_comparison_inside_brackets_is_not_top_level():
    assert split_top('sum(a > 1) + f{x="<"}', _CMP) == ['sum(a > 1) + f{x="<"}']


def test_unbalanced_expression_is_an_error():
    with pytest.raises(ValueError):
        operands("sum(a > 1")
