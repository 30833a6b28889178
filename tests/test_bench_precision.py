"""adaperceiver.bench.precision's table and argument checks (no timing here: benchmarks/ times)."""
import pytest

from adaperceiver.bench import precision


def _result(f16_native):
    return {"ms": {"float32": [100.0, 110.0, 90.0], "bfloat16": [55.0, 60.0, 50.0],
                   "float16": [108.0, 125.0, 99.0]},
            "ratio": {"float32": 1.0, "bfloat16": 0.545, "float16": 1.1364},
            "native": {"float32": True, "bfloat16": True, "float16": f16_native}, "env": {}}


def test_table_flags_a_type_without_hardware_over_the_limit():
    lines = precision.format_table(_result(False), "title").splitlines()
    assert lines[0] == "title"
    row = {ln.split()[0]: ln for ln in lines[3:]}
    assert "computed in float32" in row["float16"] and row["float16"].rstrip().endswith("NO")
    assert "1.136x" in row["float16"] and "99-125" in row["float16"] and " 108 " in row["float16"]
    assert "native" in row["bfloat16"] and "<=" not in row["bfloat16"]   # no target: hardware
    assert "<=" not in row["float32"]


def test_table_has_no_target_where_the_type_is_native():
    row = [ln for ln in precision.format_table(_result(True), "t").splitlines()
           if ln.startswith("float16")][0]
    assert "native" in row and "<=" not in row and "NO" not in row


@pytest.mark.parametrize("kwargs,msg", [
    (dict(precisions=("bfloat16",)), "must include 'float32'"),
    (dict(rounds=0), "rounds=0"),
    (dict(forwards=0), "forwards=0"),
])
def test_compare_rejects_bad_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        precision.compare(**kwargs)


def test_child_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision='float64' is not allowed"):
        precision._forward_ms("float64", 1, 1)
