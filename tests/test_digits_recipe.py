"""The real digits run of issue #8, end to end (``python -m adaperceiver.train --recipe digits``):
the accuracy targets and the policy target are checked on held-out data, not timed. The run is
the session fixture ``digits_run`` (conftest.py: it trains beside the rest of the suite),
shared with the bf16 agreement test."""
import pytest

pytest.importorskip("sklearn")


@pytest.mark.slow
def test_digits_recipe_meets_its_targets(digits_run):
    summary, out_dir = digits_run
    configs = summary["configs"]
    assert len(configs) == 4 * 3 * 6
    low = [c for c in configs if c["l"] >= 2 and c["test"] <= 0.90]
    assert not low, f"configurations with l >= 2 at or below 90% test accuracy: {low}"
    largest = summary["largest"]
    assert largest["test_accuracy"] > 0.96, largest
    # some policy matches the largest configuration within 1 point at <= 75% of its FLOPs
    ok = [p for p in summary["policies"]
          if p["accuracy"] >= largest["test_accuracy"] - 0.01
          and p["flops"] <= 0.75 * largest["flops"]]
    assert ok, summary["policies"]
    assert summary["avit"] and all(0 < p["flops"] for p in summary["avit"])
    # the table the command printed and saved states what its JSON holds
    line = (f"largest (t={largest['config'][0]}, w={largest['config'][1]}, "
            f"l={largest['config'][2]}): test {100 * largest['test_accuracy']:.1f}%")
    assert line in (out_dir / "digits.txt").read_text()
    assert line in (out_dir / "run.log").read_text()
    assert (out_dir / "front.png").stat().st_size > 10_000
