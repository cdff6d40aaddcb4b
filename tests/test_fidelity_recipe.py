"""Issue 12's recipe pieces: the standard ImageNet transforms and the shipped published-recipe configs."""

from __future__ import annotations

import argparse
import statistics
from importlib import resources

import numpy as np
import pytest
import torch
from PIL import Image

from adaptnn.data import DataConfig, build_datasets
from adaptnn.data.transforms import resized_crop_transforms
from adaptnn.errors import ConfigError
from adaptnn.io.checkpoint import load_checkpoint
from adaptnn.models import load_model
from adaptnn.strategies.l2w import L2WLoss
from helpers import load_benchmark

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _gradient_image(h: int, w: int) -> torch.Tensor:
    """A uint8 [3, h, w] image whose red channel grows left to right (shows flips and crops)."""
    x = torch.linspace(0, 255, w).round().to(torch.uint8)
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[0] = x.expand(h, w)
    img[1] = 128
    return img


def test_eval_transform_is_resize_then_center_crop():
    _, eval_tf = resized_crop_transforms(24, MEAN, STD, augment=True)  # resize 27 (24 / 0.875)
    img = _gradient_image(40, 80)
    out = eval_tf(img)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    # the shorter side goes to 27, the long side to 54: the centre crop keeps the middle of the gradient
    red = out[0] * STD[0] + MEAN[0]
    assert red.mean().item() == pytest.approx(0.5, abs=0.03)
    assert (red[:, -1] > red[:, 0]).all()  # never flipped
    assert torch.equal(eval_tf(img), out)  # deterministic
    green = out[1] * STD[1] + MEAN[1]
    assert torch.allclose(green, torch.full_like(green, 128 / 255), atol=1e-3)


def test_train_transform_random_resized_crop_and_flip():
    train_tf, _ = resized_crop_transforms(16, MEAN, STD, augment=True)
    img = _gradient_image(48, 64)
    torch.manual_seed(0)
    outs = [train_tf(img) for _ in range(40)]
    assert all(o.shape == (3, 16, 16) for o in outs)
    red = [o[0] * STD[0] + MEAN[0] for o in outs]
    flipped = sum(bool((r[:, 0] > r[:, -1]).all()) for r in red)
    assert 5 <= flipped <= 35  # about half are mirrored
    spans = [float(r[:, -1].mean() - r[:, 0].mean()) for r in red]
    assert max(abs(s) for s in spans) - min(abs(s) for s in spans) > 0.2  # crops of different widths
    torch.manual_seed(0)
    assert torch.equal(train_tf(img), outs[0])  # seeded


def test_no_augment_makes_train_the_eval_transform():
    train_tf, eval_tf = resized_crop_transforms(16, MEAN, STD, augment=False)
    img = _gradient_image(20, 30)
    assert torch.equal(train_tf(img), eval_tf(img))
    with pytest.raises(ValueError, match="crop <= resize"):
        resized_crop_transforms(32, MEAN, STD, augment=True, resize=16)


def _write_tree(root, size=(40, 30)) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_crop_size_option_builds_imagenet_splits(tmp_path):
    _write_tree(tmp_path)
    cfg = DataConfig(name="image_folder", root=str(tmp_path), val_size=2, image_size=32, crop_size=24)
    splits = build_datasets(cfg)
    assert splits.input_size == (3, 24, 24)
    x, _ = splits.train[0]
    v, _ = splits.val[0]
    t, _ = splits.test[0]
    assert x.shape == v.shape == t.shape == (3, 24, 24)
    assert torch.equal(splits.test[0][0], t)  # evaluation is deterministic
    with pytest.raises(ConfigError, match="crop_size=64 is larger"):
        build_datasets(DataConfig(name="image_folder", root=str(tmp_path), val_size=2, image_size=32, crop_size=64))
    with pytest.raises(ConfigError, match="crop_size must be a positive integer"):
        DataConfig(name="image_folder", crop_size=0)


# ----------------------------------------------------------------------------- shipped configs


def _shipped_configs() -> list[str]:
    return sorted(p.name for p in resources.files("adaptnn").joinpath("configs").iterdir() if p.name.endswith(".yaml"))


@pytest.mark.parametrize("name", _shipped_configs())
def test_every_shipped_config_loads_and_validates(name):
    from adaptnn.runs.config import load_config

    with resources.as_file(resources.files("adaptnn").joinpath("configs", name)) as path:
        cfg = load_config(path)  # strict keys and every value checked; builds the strategy once
    assert cfg.model.name


@pytest.mark.parametrize("strategy", ["joint", "boost", "l2w", "imta"])
def test_msdnet_cifar100_recipes_are_the_published_one(strategy):
    from adaptnn.runs.config import load_config

    with resources.as_file(resources.files("adaptnn").joinpath("configs", f"msdnet_cifar100_{strategy}.yaml")) as p:
        cfg = load_config(p)
    t = cfg.train
    assert (cfg.data.name, cfg.data.val_size, cfg.model.name) == ("cifar100", 5000, "msdnet_cifar100")
    assert (t.optimizer, t.lr, t.momentum, t.nesterov, t.weight_decay, t.weight_decay_norm_bias) == (
        "sgd", 0.1, 0.9, False, 1e-4, True,
    )  # fmt: skip
    assert (t.batch_size, t.epochs, t.lr_schedule, t.lr_milestones, t.lr_gamma, t.warmup_epochs) == (
        64, 300, "multistep", [150, 225], 0.1, 0.0,
    )  # fmt: skip
    assert t.strategy == strategy
    if strategy in ("boost", "imta"):
        assert t.strategy_options["rescale_scope"] == "head_inputs"
    if strategy == "l2w":  # the reference's look-ahead on every step, not adaptnn's cheaper default
        assert t.strategy_options["meta_interval"] == 1


@pytest.mark.parametrize("step", [4, 7])
def test_msdnet_imagenet_recipes(step):
    from adaptnn.runs.config import load_config

    with resources.as_file(resources.files("adaptnn").joinpath("configs", f"msdnet_imagenet_step{step}.yaml")) as p:
        cfg = load_config(p)
    assert cfg.model.name == f"msdnet_imagenet_step{step}"
    assert (cfg.data.name, cfg.data.image_size, cfg.data.crop_size) == ("image_folder", 256, 224)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.lr_milestones) == (256, 90, [30, 60])


# ----------------------------------------------------------------------------- the benchmark's score


def _strategies_benchmark():
    return load_benchmark("strategies")


def test_anchored_mean_accuracy():
    """Mean accuracy over [first, last exit MACs]: the curve anchored at both exits, points outside clipped."""
    bench = _strategies_benchmark()
    result = {
        "exit_macs": [10.0, 20.0, 30.0],
        "anytime_accuracy": [0.5, 0.6, 0.7],
        "budgeted": [  # unsorted on purpose; one point beyond the last exit is ignored
            {"avg_cost": 20.0, "test_accuracy": 0.7},
            {"avg_cost": 12.0, "test_accuracy": 0.6},
            {"avg_cost": 31.0, "test_accuracy": 0.1},
        ],
    }
    # anchored curve: (10, .5) (12, .6) (20, .7) (30, .7): area = 2*.55 + 8*.65 + 10*.7 = 13.3 over width 20
    assert bench.anchored_mean_accuracy(result) == pytest.approx(13.3 / 20, abs=1e-4)
    flat = dict(result, budgeted=[], anytime_accuracy=[0.4, 0.0, 0.8])
    assert bench.anchored_mean_accuracy(flat) == pytest.approx(0.6, abs=1e-4)  # the straight line between anchors


def _fidelity_benchmark():
    return load_benchmark("fidelity")


def test_controlled_table_labels_each_run_by_what_it_changed(tmp_path):
    """``--controlled`` merges reports; a run's label names its recipe switches and strategy options only."""
    import json
    from pathlib import Path

    fidelity = _fidelity_benchmark()
    record = {"exit_test_accuracy": [0.5, 0.7], "raw_head_test_accuracy": [0.5, 0.6], "auc_mean_acc": 0.6,
              "train_time_s": 10.0, "seed": 0}  # fmt: skip
    reports = [
        {"setup": {"train_overrides": {"momentum": 0.9, "min_lr_ratio": 0.0}, "strategy_options": {"joint": {}},
                   "epochs": 3, "train_samples": 100},
         "hardware": {"summary": "cpu", "loadavg": [1.0, 1.0, 1.0]}, "records": [dict(record, strategy="joint")]},
        {"setup": {"train_overrides": {"momentum": 0.9, "min_lr_ratio": 0.0, "nesterov": False},
                   "strategy_options": {"boost": {"rescale_scope": "head_inputs", "r": 0.5}},
                   "epochs": 3, "train_samples": 100},
         "hardware": {"summary": "cpu", "loadavg": [2.0, 1.0, 1.0]}, "records": [dict(record, strategy="boost")]},
    ]  # fmt: skip
    paths = []
    for i, report in enumerate(reports):
        paths.append(str(tmp_path / f"r{i}.json"))
        Path(paths[-1]).write_text(json.dumps(report))
    table = fidelity.controlled(paths)
    assert [r["label"] for r in table["rows"]] == ["defaults", "nesterov=False, r=0.5, rescale_scope=head_inputs"]
    assert [r["report"] for r in table["rows"]] == ["r0", "r1"]
    text = fidelity.controlled_markdown(table)
    assert "| r1 | boost | 0 | nesterov=False, r=0.5, rescale_scope=head_inputs | 60.00 | 50.00 | 70.00 |" in text
    assert [r["report"] for r in fidelity.controlled(paths, seeds=[0], strategies=["boost"])["rows"]] == ["r1"]
    assert fidelity.controlled(paths, seeds=[1])["rows"] == []
    with pytest.raises(SystemExit, match="expected comma-separated int values, got '0,x'"):
        fidelity.split_list("0,x", int)


def test_run_label_names_a_learning_rate_that_does_not_decay():
    fidelity = _fidelity_benchmark()
    setup = {"train_overrides": {"momentum": 0.9, "min_lr_ratio": 1.0}, "strategy_options": {}}
    assert fidelity.run_label(setup, "joint") == "min_lr_ratio=1.0"
    setup["train_overrides"]["min_lr_ratio"] = 0.0
    assert fidelity.run_label(setup, "joint") == "defaults"
    setup["model_kwargs"] = dict(fidelity.MODEL_KWARGS, init="he")  # a model switch is named too
    assert fidelity.run_label(setup, "joint") == "init=he"
    setup["model_kwargs"] = dict(fidelity.MODEL_KWARGS)  # a report from before `init`: He weights
    assert fidelity.run_label(setup, "joint") == "init=he"
    setup["model_kwargs"] = dict(fidelity.MODEL_KWARGS, init="torch_default")  # the default is not a switch
    assert fidelity.run_label(setup, "joint") == "defaults"


def test_resume_keeps_the_records_of_the_same_setup_only(tmp_path):
    import json

    fidelity = _fidelity_benchmark()
    setup = {"epochs": 3, "train_overrides": {"momentum": 0.9}, "seeds": [0, 1]}
    out = tmp_path / "fid"
    assert fidelity.resumed_records(out, setup) == []  # nothing saved yet: train everything
    records = [{"strategy": "joint", "seed": 0, "auc_mean_acc": 0.7}]
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "records": records}))
    assert fidelity.resumed_records(out, dict(setup)) == records
    with pytest.raises(SystemExit, match=r"was made with another setup \(differs in \['epochs'\]\)"):
        fidelity.resumed_records(out, dict(setup, epochs=5))
    out.with_suffix(".json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="is not a fidelity report"):
        fidelity.resumed_records(out, setup)


def _digits_run_args(work_dir) -> argparse.Namespace:
    """What fidelity passes to ``run_strategy``, for a tiny CNN on scikit-learn's digits."""
    return argparse.Namespace(
        model="mecnn_digits", model_kwargs='{"widths": [8, 8, 16, 16]}', epochs=1, batch_size=256, optimizer="sgd",
        lr=0.05, weight_decay=0.0, warmup_epochs=0.0, seed=0, device="cpu", num_workers=0, precision="fp32",
        work_dir=str(work_dir),
    )  # fmt: skip


def test_a_run_cut_short_goes_on_from_its_last_epoch_checkpoint(tmp_path):
    engine = _fidelity_benchmark().engine  # benchmarks/strategies.py, which trains every fidelity run
    splits = build_datasets(DataConfig(name="digits", val_size=200))
    args = _digits_run_args(tmp_path)
    first = engine.run_strategy("joint", {}, splits, splits.train, args)  # the process that was cut short
    assert first["resumed_epochs"] == 0
    args.epochs = 2
    resumed = engine.run_strategy("joint", {}, splits, splits.train, args, resume=True)
    assert resumed["resumed_epochs"] == 1
    assert len(resumed["train_loss"]) == 2 and resumed["train_loss"][0] == first["train_loss"][0]
    fresh = engine.run_strategy("joint", {}, splits, splits.train, args)  # without resume: starts over
    assert fresh["resumed_epochs"] == 0 and len(fresh["train_loss"]) == 2


def test_imta_isc_trains_stage_two_from_the_stage_one_run_of_the_seed(tmp_path):
    fidelity = _fidelity_benchmark()
    splits = build_datasets(DataConfig(name="digits", val_size=200))
    args = _digits_run_args(tmp_path)
    with pytest.raises(SystemExit, match="imta_isc starts from the stage-one imta run of seed 0, expected at"):
        fidelity.stage_two_builder(args)
    stage_one = fidelity.engine.run_strategy("imta", {}, splits, splits.train, args)
    build = fidelity.stage_two_builder(args)
    stage_two = fidelity.engine.run_strategy("imta_isc", {}, splits, splits.train, args, build_model=build)
    assert stage_two["strategy"] == "imta_isc" and len(stage_two["anytime_accuracy"]) == 4
    assert stage_two["exit_macs"][0] == stage_one["exit_macs"][0] < stage_two["exit_macs"][1]
    assert stage_two["exit_macs"][1] > stage_one["exit_macs"][1]  # the ISC module and the wider classifier
    frozen = load_model(tmp_path / "imta" / "checkpoints" / "last.safetensors").state_dict()
    trained = load_checkpoint(tmp_path / "imta_isc" / "checkpoints" / "last.safetensors").model_state
    assert any(key.startswith("segments.0.segment.") for key in trained)
    for key, value in frozen.items():  # stage two left the stage-one weights as they were
        if key.startswith("segments.") and key.endswith("weight"):
            torch.testing.assert_close(trained["segments." + key.split(".", 1)[1].replace(".", ".segment.", 1)], value)


def test_merge_joins_same_setup_reports_and_refuses_conflicts(tmp_path):
    """``--merge`` joins strategies run in parallel processes; a different setup or a repeated run is refused."""
    import json

    fidelity = _fidelity_benchmark()

    def run(strategy: str, seed: int, mean: float, first: float) -> dict:
        return {"strategy": strategy, "seed": seed, "auc_mean_acc": mean, "exit_test_accuracy": [first, 0.8]}

    def report(name: str, records: list, seeds: list, options: dict, **setup_changes) -> str:
        setup = {"epochs": 3, "lr": 0.1, "seeds": seeds, "strategy_options": {k: {} for k in options},
                 "effective_strategy_options": options, **setup_changes}  # fmt: skip
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"command": f"run {name}", "setup": setup, "hardware": {}, "records": records}))
        return str(path)

    a = report("a", [run("joint", 0, 0.70, 0.60), run("boost", 0, 0.74, 0.63), run("joint", 1, 0.71, 0.61)], [0, 1],
               {"joint": {"weights": "uniform"}, "boost": {"r": 0.5}})  # fmt: skip
    b = report("b", [run("boost", 1, 0.70, 0.62), run("imta", 0, 0.72, 0.59)], [0, 1, 2],
               {"boost": {"r": 0.5}, "imta": {"rescale_scope": "head_inputs"}})  # fmt: skip
    merged = fidelity.merge([a, b], "merge")
    assert [(r["strategy"], r["seed"]) for r in merged["records"]] == [
        ("joint", 0), ("boost", 0), ("imta", 0), ("joint", 1), ("boost", 1)
    ]  # fmt: skip
    assert merged["setup"]["seeds"] == [0, 1, 2]
    assert sorted(merged["setup"]["effective_strategy_options"]) == ["boost", "imta", "joint"]
    assert [m["command"] for m in merged["merged_from"]] == ["run a", "run b"]
    boost = next(row for row in merged["summary"] if row["strategy"] == "boost")
    assert boost["median_delta_auc_mean_acc_vs_joint"] == pytest.approx(statistics.median([0.04, -0.01]))
    assert fidelity.verdict(boost).startswith("boost beats joint on the seeds both ran, [0, 1]: mean acc +1.50")
    imta = next(row for row in merged["summary"] if row["strategy"] == "imta")
    assert fidelity.verdict(imta).startswith("imta does not beat joint on the seeds both ran, [0]")  # first exit -1.0

    other_lr = report("c", [run("l2w", 0, 0.7, 0.6)], [0], {"l2w": {}}, lr=0.05)
    with pytest.raises(SystemExit, match=r"another setup than .*a.json \(differs in \['lr'\]\)"):
        fidelity.merge([a, other_lr], "merge")
    again = report("d", [run("boost", 0, 0.7, 0.6)], [0], {"boost": {"r": 0.5}})
    with pytest.raises(SystemExit, match="boost seed 0 is in more than one report"):
        fidelity.merge([a, again], "merge")
    other_r = report("e", [run("boost", 2, 0.7, 0.6)], [2], {"boost": {"r": 0.3}})
    with pytest.raises(SystemExit, match=r"ran boost with effective_strategy_options \{'r': 0.3\}"):
        fidelity.merge([a, other_r], "merge")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="junk.json is not a fidelity report"):
        fidelity.merge([a, str(tmp_path / "junk.json")], "merge")


def test_pairs_trained_on_different_cpu_models_are_named():
    """Two EPYCs of one name but other family/model round floats differently: the summary names such pairs."""
    fidelity = _fidelity_benchmark()

    def lscpu(family: int, model: int) -> dict:
        lines = ["Architecture: x86_64", "Model name:   AMD EPYC", f"CPU family:   {family}", f"Model:        {model}"]
        return {"lscpu": lines, "cuda": None}

    def run(strategy: str, seed: int, hardware: dict) -> dict:
        return {"strategy": strategy, "seed": seed, "auc_mean_acc": 0.7, "exit_test_accuracy": [0.6, 0.8],
                "hardware": hardware}  # fmt: skip

    assert fidelity.engine.cpu_label(lscpu(25, 17)) == "AMD EPYC family 25 model 17"
    assert fidelity.engine.cpu_label({"lscpu": [], "cuda": "NVIDIA H200"}) == "NVIDIA H200"
    rows = fidelity.summarise([
        run("joint", 0, lscpu(25, 17)), run("joint", 1, lscpu(25, 17)),
        run("boost", 0, lscpu(25, 17)), run("boost", 1, lscpu(23, 1)),
    ])  # fmt: skip
    boost = next(row for row in rows if row["strategy"] == "boost")
    assert boost["paired_seeds_across_cpus"] == [1]
    assert fidelity.verdict(boost).endswith("(seeds [1] paired across CPU models)")
    row = {"train_time_s": 10.0, "resumed_epochs": 2, "stage_one_train_time_s": 5.0}
    assert fidelity._train_seconds(row) == "10 (after 2 resumed epochs) + 5 stage one"
    assert fidelity._train_seconds({"train_time_s": 10.0}) == "10"


def test_merge_can_keep_the_records_of_one_cpu_model(tmp_path):
    """``--merge --cpu`` builds a table whose every pair shares one CPU model; a label no record has is refused."""
    import json

    fidelity = _fidelity_benchmark()

    def lscpu(family: int) -> dict:
        return {"lscpu": ["Model name: AMD EPYC", f"CPU family: {family}", "Model: 1"], "cuda": None}

    def run(strategy: str, seed: int, family: int) -> dict:
        return {"strategy": strategy, "seed": seed, "auc_mean_acc": 0.7, "exit_test_accuracy": [0.6, 0.8],
                "hardware": lscpu(family)}  # fmt: skip

    def report(name: str, records: list) -> str:
        setup = {"epochs": 3, "seeds": [0], "strategy_options": {}, "effective_strategy_options": {}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"command": name, "setup": setup, "hardware": {}, "records": records}))
        return str(path)

    a = report("a", [run("joint", 0, 25), run("imta", 0, 25)])
    b = report("b", [run("joint", 0, 23), run("imta", 0, 23), run("l2w", 0, 23)])
    with pytest.raises(SystemExit, match="joint seed 0 is in more than one report"):
        fidelity.merge([a, b], "merge")
    merged = fidelity.merge([a, b], "merge", cpu="AMD EPYC family 23 model 1")
    assert [(r["strategy"], fidelity._cpu(r)) for r in merged["records"]] == [
        ("joint", "AMD EPYC family 23 model 1"), ("l2w", "AMD EPYC family 23 model 1"),
        ("imta", "AMD EPYC family 23 model 1"),
    ]  # fmt: skip
    assert merged["setup"]["cpu"] == "AMD EPYC family 23 model 1"
    merged["hardware"] = {"summary": "AMD EPYC (2 CPUs)", "loadavg": [1.0, 1.0, 1.0]}
    assert fidelity._hardware_line(merged).startswith("Hardware: merged report; records trained on AMD EPYC family 23")
    both = fidelity.merge([a, report("c", [run("l2w", 0, 23)])], "merge")
    both["hardware"] = merged["hardware"]
    assert "trained on AMD EPYC family 23 model 1; AMD EPYC family 25 model 1; the first" in fidelity._hardware_line(
        both
    )
    with pytest.raises(SystemExit, match=r"no record was trained on 'Intel'; the reports' records name \['AMD EPYC"):
        fidelity.merge([a, b], "merge", cpu="Intel")


def test_l2w_weights_reads_what_an_l2w_run_learned_and_refuses_other_runs(tmp_path):
    """``benchmarks/l2w_weights.py`` rebuilds an l2w checkpoint's weight network and reports, per exit, how its
    weights move with the loss; a checkpoint of another strategy gets a one-line refusal."""
    import json

    engine = _fidelity_benchmark().engine
    splits = build_datasets(DataConfig(name="digits", val_size=200))
    args = _digits_run_args(tmp_path)
    built = []  # the weight network the trainer starts from, as it was at set-up
    original_setup = L2WLoss.setup

    def recording_setup(self, model):
        original_setup(self, model)
        built.append({k: v.clone() for k, v in self.weight_net.state_dict().items()})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L2WLoss, "setup", recording_setup)
        engine.run_strategy("l2w", {"meta_interval": 1}, splits, splits.train, args)
    engine.run_strategy("joint", {}, splits, splits.train, args)
    module = load_benchmark("l2w_weights")
    l2w_ckpt = str(tmp_path / "l2w" / "checkpoints" / "last.safetensors")
    out = tmp_path / "weights"
    report = module.main([l2w_ckpt, "--dataset", "digits", "--val_size", "200", "--samples", "96", "--out", str(out)])
    (profile,) = report["profiles"]
    assert profile["epoch"] == 1 and profile["strategy_options"] == {"meta_interval": 1}
    assert len(profile["pearson"]) == len(profile["spearman"]) == len(profile["weight_std"]) == 4
    assert all(-1.0 <= c <= 1.0 for c in profile["pearson"] + profile["spearman"])
    for corr, easy, hard in zip(
        profile["pearson"], profile["mean_weight_easiest_quarter"], profile["mean_weight_hardest_quarter"], strict=True
    ):
        if abs(corr) > 0.5:  # a clear correlation shows in the quarters too
            assert (hard - easy) * corr > 0
    assert json.loads(out.with_suffix(".json").read_text())["profiles"][0]["pearson"] == profile["pearson"]
    assert f"{tmp_path.name}/l2w | 1 | trained | {{'meta_interval': 1}} |" in out.with_suffix(".md").read_text()
    # --weight_net init rebuilds exactly the network the run started from, and weighs the same losses with it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L2WLoss, "setup", recording_setup)
        both = module.main(
            [
                l2w_ckpt,
                "--dataset",
                "digits",
                "--val_size",
                "200",
                "--samples",
                "96",
                "--weight_net",
                "both",
                "--out",
                str(out),
            ]
        )
    assert len(built) == 3  # the run's set-up, then the script's init and trained rebuilds
    at_start, at_rebuild = built[0], built[1]  # the trainer's set-up, then the script's init rebuild
    assert all(torch.equal(at_start[k], at_rebuild[k]) for k in at_start)
    init, trained = both["profiles"]
    assert (init["weight_net"], trained["weight_net"]) == ("init", "trained")
    assert trained["pearson"] == profile["pearson"] and init["mean_loss"] == profile["mean_loss"]
    assert init["weight_std"] != trained["weight_std"]  # a look-ahead every step moved the network
    joint_ckpt = str(tmp_path / "joint" / "checkpoints" / "last.safetensors")
    with pytest.raises(SystemExit, match="is a 'joint' checkpoint without l2w state; expected an l2w run's"):
        module.main([joint_ckpt, "--dataset", "digits", "--val_size", "200", "--out", str(out)])
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="junk.safetensors is not a readable safetensors file"):
        module.main([str(tmp_path / "junk.safetensors"), "--dataset", "digits", "--val_size", "200"])
