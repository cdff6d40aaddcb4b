"""`adaptnn cost` for adapter models: timm:NAME, torchvision:NAME, hf:PATH and plain timm names."""

import json

import timm  # noqa: F401  (the dev extra installs it: these tests must run in CI, never skip)

from adaptnn.cli import main
from adaptnn.models import resolve_model_name


def test_cost_json_for_a_timm_model(capsys):
    assert main(["cost", "timm:test_resnet", "--json", "--kwargs", "{num_classes: 10}"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factory"] == "timm_staged" and out["kwargs"] == {"arch": "test_resnet", "num_classes": 10}
    assert out["input_size"] == [3, 160, 160]
    assert len(out["exit_macs"]) == 4 and out["exit_macs"] == sorted(out["exit_macs"])
    assert 0 < out["heads_share"] < 0.05


def test_cost_table_for_torchvision_and_plain_timm_names(capsys):
    assert main(["cost", "torchvision:resnet18", "--input_size", "[3,32,32]"]) == 0
    table = capsys.readouterr().out
    assert "torchvision:resnet18, one sample of shape [3, 32, 32]" in table
    assert "heads:" in table and table.count("%") >= 5
    assert resolve_model_name("test_vit") == ("timm_staged", {"arch": "test_vit"})
    assert resolve_model_name("hf:all-MiniLM-L6-v2") == ("hf_staged", {"path": "all-MiniLM-L6-v2"})
    assert resolve_model_name("mecnn_digits") == ("mecnn_digits", {})


def test_cost_rejects_unknown_names_in_one_line(capsys):
    assert main(["cost", "bogus:thing"]) == 2
    assert "unknown model prefix" in capsys.readouterr().err
    assert main(["cost", "definitely_not_a_model"]) == 2
    assert "unknown model 'definitely_not_a_model'" in capsys.readouterr().err
