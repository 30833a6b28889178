"""Configuration policies and the digits recipe (issue #8)."""
import json
import os

import pytest
import torch

import adaperceiver
from adaperceiver import policy as pol

from helpers import randomize_


def test_budget_policy_on_a_hand_built_table():
    cost = {(8, 32, 1): 1.0, (8, 64, 2): 2.0, (16, 64, 2): 3.0, (16, 128, 4): 5.0}
    acc = {(8, 32, 1): 0.80, (8, 64, 2): 0.95, (16, 64, 2): 0.93, (16, 128, 4): 0.96}
    p = pol.BudgetPolicy(cost, acc)
    assert p.best_under(2.5) == (8, 64, 2)
    assert p.best_under(4.0) == (8, 64, 2)            # (16, 64, 2) costs more, is worse
    assert p.best_under(100) == (16, 128, 4)
    assert p.cheapest_within(0.94) == (8, 64, 2)
    assert p.cheapest_within(0.99) == (16, 128, 4)    # none reaches it: the most accurate
    assert p.front() == [(8, 32, 1), (8, 64, 2), (16, 128, 4)]
    with pytest.raises(ValueError, match="budget=0.5"):
        p.best_under(0.5)
    with pytest.raises(ValueError, match="same configurations"):
        pol.BudgetPolicy(cost, {(8, 32, 1): 0.8})


def _small():
    return randomize_(adaperceiver.create_model(
        "adaperceiver_v1_in1k", embed_dim=64, num_heads=2, depth=3, img_size=32, patch_size=8,
        num_classes=5, mask_token_grans=[4, 8], max_latent_tokens=8, mat_dims=[32, 64])).eval()


def test_learned_policy_learns_a_per_sample_rule_and_feeds_a_mixed_batch():
    """Two image groups; a cheap config is right only on group A, an expensive one on both:
    REINFORCE must learn to pick cheap for A and expensive for B."""
    model = _small()
    n = 48
    x = torch.randn(n, 3, 32, 32)
    group_a = torch.arange(n) % 2 == 0
    x[group_a] += 2.0                                    # the policy can tell the groups apart
    cheap, dear = (4, 32, 1), (8, 64, 3)
    configs = [cheap, dear]
    correct = {cheap: group_a.clone(), dear: torch.ones(n, dtype=torch.bool)}
    cost = {cheap: 1.0, dear: 4.0}
    policy = pol.fit_learned_policy(model, x, configs, correct, cost, cost_weight=0.4,
                                    steps=300, seed=0)
    choice = policy.choose(model, x)
    picked = choice["index"]
    assert (picked[group_a] == 0).float().mean() > 0.9
    assert (picked[~group_a] == 1).float().mean() > 0.9
    y = torch.randint(0, 5, (n,))
    res = pol.evaluate_choices(model, x, y, choice, cost)
    # the heterogeneous batch equals running each sample alone with its own config
    for i in (0, 1, 2, 3):
        alone = model(x[i:i + 1], num_tokens=int(choice["num_tokens"][i]),
                      mat_dim=int(choice["mat_dim"][i]), depth=int(choice["depth"][i])).logits
        torch.testing.assert_close(res["logits"][i:i + 1], alone, rtol=1e-5, atol=1e-6)
    want_cost = sum(cost[configs[int(i)]] for i in picked) / n
    assert res["flops"] == pytest.approx(want_cost)


def test_digits_recipe_end_to_end_small(tmp_path):
    """The recipe's whole pipeline on a small model and one epoch: every configuration is
    evaluated, the policies are fitted, table/JSON/plot/checkpoint are written."""
    pytest.importorskip("sklearn")
    from adaperceiver.train.digits import DigitsRecipe, configurations, run_digits
    recipe = DigitsRecipe(epochs=2, batch_size=64, num_exits=1, augment=False, policy_steps=50,
                          model=dict(embed_dim=32, num_heads=1, depth=2, max_latent_tokens=16,
                                     mask_token_grans=[8, 16], mat_dims=[16, 32]))
    logs = []
    summary = run_digits(recipe, out_dir=str(tmp_path), avit=False, log=logs.append)
    assert any("epoch 2/2" in m for m in logs)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint", "digits.json", "digits.txt",
                                            "front.png"]
    cfgs = summary["configs"]
    assert len(cfgs) == 2 * 2 * 2
    assert all(0.0 <= c["test"] <= 1.0 for c in cfgs)
    assert max(c["test"] for c in cfgs) > 0.3          # two epochs already beat chance (0.1)
    table = (tmp_path / "digits.txt").read_text()
    assert "learned per-sample" in table and "MFLOPs" in table
    saved = json.loads((tmp_path / "digits.json").read_text())
    assert saved["largest"]["config"] == [16, 32, 2]
    model = adaperceiver.from_pretrained(tmp_path / "checkpoint")
    assert model.config.img_size == 8 and model.config.in_channels == 1
    assert len(configurations(model.config)) == 8
