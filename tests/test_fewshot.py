"""Few-shot linear evaluation (issue 25), in one process: the fit equals scikit-learn's ridge, the L2 weight is the
best held-out grid point, the draw is seeded and stable, the features are the model's, the metrics reach every
writer and the curves, and the standalone command reads exports and timm names and refuses bad input in one line.
The multi-rank checks are in test_fewshot_ranks.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeClassifier

from pretrain.config import BatchPlan, ConfigError, LogConfig, load_config
from pretrain.config import main as config_main
from pretrain.data import EvalTransform
from pretrain.data.decode import image_bytes, read_shard
from pretrain.downstream.backbone import export_files, save_backbone
from pretrain.fewshot.__main__ import main
from pretrain.fewshot.evaluate import FewShot, draw_id, metric_values
from pretrain.fewshot.features import Embedder, embed, input_of
from pretrain.fewshot.ridge import (
    DEFAULT_L2,
    L2_GRID,
    STD_EPS,
    choose_alpha,
    fewshot_fit,
    holdout_shots,
    pm_one_targets,
    predict,
    ridge,
    standardize,
)
from pretrain.fewshot.sets import Samples, draw_shots, first_positions
from pretrain.fewshot.spec import parse_set, parse_sets, parse_shots
from pretrain.models.vit import create_vit
from pretrain.train.metrics import Metrics, format_line
from pretrain.train.plot import plot, read_rows


def blobs(classes: int, per_class: int, dim: int, seed: int, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters around random centres, shots of a class consecutive: (features (N, D), labels (N,))."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * rng.uniform(0.5, 3.0, size=dim)  # unequal feature scales
    y = np.repeat(np.arange(classes), per_class)
    return centres[y] + spread * rng.normal(size=(len(y), dim)), y


def sklearn_predict(x: np.ndarray, y: np.ndarray, test: np.ndarray, alpha: float) -> np.ndarray:
    """scikit-learn's closed-form ridge (±1 one-vs-all targets, unregularised intercept) on features standardised
    as documented (fit set's mean, population std + STD_EPS)."""
    m, s = x.mean(axis=0), x.std(axis=0) + STD_EPS
    clf = RidgeClassifier(alpha=alpha, fit_intercept=True, solver="cholesky").fit((x - m) / s, y)
    return clf.predict((test - m) / s)


@pytest.mark.parametrize("dim,spread", [(24, 2.0), (300, 6.0)])  # 42 samples: primal (N >= D) and dual (N < D)
def test_predictions_and_accuracy_equal_sklearn_ridge(dim, spread):
    x, y = blobs(6, 12, dim, seed=dim, spread=spread)
    keep = np.arange(len(y)) % 12 < 12 - 2 * y  # unbalanced (12, 10, ..., 2 per class): the intercept matters
    x, y = x[keep], y[keep]
    tx, ty = blobs(6, 40, dim, seed=dim, spread=spread)  # same centres (same seed), other noise draws below
    tx = tx + np.random.default_rng(7).normal(size=tx.shape)
    preds = predict(x, y, tx, 6, L2_GRID)
    for alpha, ours in zip(L2_GRID, preds, strict=True):
        theirs = sklearn_predict(x, y, tx, alpha)
        np.testing.assert_array_equal(ours, theirs)
        assert (ours == ty).mean() == (theirs == ty).mean()
    assert len({(p == ty).mean() for p in preds}) > 1  # the grid matters on this data: the check has teeth


def test_primal_and_dual_solutions_agree():
    x, y = blobs(5, 8, 40, seed=1)  # N == D: both forms apply
    xs, labels, t = standardize(x, x), torch.as_tensor(y), pm_one_targets(y, 5).numpy()
    for alpha in (2.0**-6, 1.0, 2.0**10):
        wp, bp = ridge(xs, labels, 5, "primal").weights(alpha)
        wd, bd = ridge(xs, labels, 5, "dual").weights(alpha)
        np.testing.assert_allclose(wp.numpy(), wd.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(bp.numpy(), bd.numpy(), atol=1e-6, rtol=0)
        xc, tc = xs.numpy() - xs.numpy().mean(0), t - t.mean(0)  # the textbook solution, centred
        direct = np.linalg.solve(xc.T @ xc + alpha * np.eye(40), xc.T @ tc)
        np.testing.assert_allclose(wp.numpy(), direct, atol=1e-6, rtol=0)
        np.testing.assert_allclose(bp.numpy(), t.mean(0) - xs.numpy().mean(0) @ direct, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_chosen_alpha_is_the_best_heldout_grid_point_and_refit_equals_sklearn(k):
    x, y = blobs(8, k, 64, seed=k, spread=3.0)
    shot = np.tile(np.arange(k), 8)
    h = holdout_shots(k)
    held = shot >= k - h
    acc = {a: (sklearn_predict(x[~held], y[~held], x[held], a) == y[held]).mean() for a in L2_GRID}
    best = max(acc.values())
    tied = [a for a in L2_GRID if acc[a] == best]
    gap = min(abs(np.log2(a) - 10) for a in tied)  # ties: the one nearest 2^10 (then the larger)
    want = max(a for a in tied if abs(np.log2(a) - 10) == gap)
    alpha, heldout = choose_alpha(x, y, shot, k, 8)
    assert alpha == want and heldout == pytest.approx(acc, abs=0)
    tx, ty = blobs(8, 30, 64, seed=k, spread=3.0)
    res = fewshot_fit(x, y, shot, k, tx, ty, 8)
    theirs = sklearn_predict(x, y, tx, want)
    np.testing.assert_array_equal(res.predictions, theirs)
    assert res.accuracy == (theirs == ty).mean() and res.alpha == want


def test_one_shot_uses_the_fixed_l2_weight():
    x, y = blobs(4, 1, 16, seed=0)
    assert holdout_shots(1) == 0 and choose_alpha(x, y, np.zeros(4, int), 1, 4) == (DEFAULT_L2, {})
    assert [holdout_shots(k) for k in (2, 5, 10, 25)] == [1, 1, 2, 5]


def test_set_and_shot_syntax():
    s = parse_set("in1k=/d/train-wds|/d/val-wds@train")
    assert (s.name, s.train, s.train_split, s.test, s.test_split) == (
        "in1k",
        "/d/train-wds",
        "train",
        "/d/val-wds",
        "train",
    )
    s = parse_set("c100=http://host/c100/@trainval")
    assert (s.train, s.train_split, s.test, s.test_split, s.separate_test) == (
        "http://host/c100/",
        "trainval",
        "http://host/c100/",
        "val",
        False,
    )
    assert parse_set("/data/pets-wds", default_name="pets-wds").name == "pets-wds"
    assert [x.name for x in parse_sets("a=/x\n  b=/y")] == ["a", "b"] and parse_sets("") == []
    assert parse_shots("1, 5,10,25") == (1, 5, 10, 25)
    for bad in ("/x", "a=/x a=/y", "=x"):
        with pytest.raises(ConfigError):
            parse_sets(bad)
    for bad in ("0,1", "5,1", "1,1", "x", ""):
        with pytest.raises(ConfigError, match="fewshot.shots"):
            parse_shots(bad)


def test_config_section_is_off_by_default_and_refuses_bad_values(capsys):
    cfg = load_config("configs/vit_l16_i21k.yaml")
    assert cfg.fewshot.sets == "" and cfg.fewshot.shots == "1,5,10,25" and "fewshot" in cfg.to_dict()
    with pytest.raises(ConfigError, match="fewshot.every_steps"):
        load_config(None, ["fewshot.every_steps=-1"])
    assert config_main(["configs/tiny_digits.yaml", "fewshot.shots=10,5"]) == 2
    assert config_main(["configs/tiny_digits.yaml", "fewshot.sets=/no/name"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "fewshot.shots" in err[0] and "NAME=TRAIN" in err[1]


def test_draw_is_seeded_nested_and_independent_of_the_rest():
    labels = np.random.default_rng(0).integers(0, 5, size=300)
    d = draw_shots(labels, 5, 10, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(d.per_class, draw_shots(labels, 5, 10, 3).per_class, strict=True))
    assert any(
        not np.array_equal(a, b) for a, b in zip(d.per_class, draw_shots(labels, 5, 10, 4).per_class, strict=True)
    )
    p5, y5, i5 = d.shots(5)
    p1, _, _ = d.shots(1)
    assert set(p1) <= set(p5) and all(labels[p] == c for p, c in zip(p5, y5, strict=True))
    assert list(i5[:5]) == [0, 1, 2, 3, 4] and d.short_classes(10) == 0


def test_features_are_the_models_head_input_in_position_order(digits_shards):
    torch.manual_seed(0)
    model = create_vit("vit_test_patch4", num_classes=10, img_size=32).eval()
    setup = FewShot([parse_set(f"digits={digits_shards}")], (1, 2))
    (s,) = setup.sets
    samples = Samples(s.test, first_positions(s.test, 13))
    e = Embedder(
        lambda x: input_of(model.head, model, x.float() / 127.5 - 1), 32, 0.875, 4, torch.device("cpu"), setup.io
    )
    with torch.no_grad():
        feats, labels, kept = embed(e, samples)
    t = EvalTransform(32, 0.875)
    raw = [r for url in s.test.urls for _, r in read_shard(url)][:13]
    images = torch.stack([t(image_bytes(r)[0]) for r in raw]).float() / 127.5 - 1
    with torch.no_grad():
        want = model.forward_head(model.forward_features(images), pre_logits=True)  # final-norm class token
    assert kept.all() and feats.shape == (13, 64)
    np.testing.assert_allclose(feats, want.numpy(), atol=1e-5)
    assert list(labels) == [int(r.members["cls"]) for r in raw]


def test_fewshot_end_to_end_on_digits_and_a_fresh_setup_draws_the_same(digits_shards):
    torch.manual_seed(0)
    model = create_vit("vit_test_patch4", num_classes=10, img_size=32).eval()
    a = FewShot([parse_set(f"digits={digits_shards}")], (1, 5), seed=1)
    e = Embedder(lambda x: input_of(model.head, model, x.float() / 127.5 - 1), 32, 0.875, 16, torch.device("cpu"), a.io)
    with torch.no_grad():
        (r,) = a.run(e)
        (again,) = a.run(e)  # a second evaluation: same shots
    b = FewShot([parse_set(f"digits={digits_shards}")], (1, 5), seed=1)  # as after a resume: a new object
    assert r.draw_id == again.draw_id == draw_id(b.draw(b.sets[0]))
    assert r.shots[5].accuracy == again.shots[5].accuracy
    assert draw_id(FewShot([parse_set(f"digits={digits_shards}")], (1, 5), seed=2).draw(b.sets[0])) != r.draw_id
    assert r.train_images == 50 and r.test_images == 50 and set(r.shots) == {1, 5}
    assert all(0.0 <= v.accuracy <= 1.0 for v in r.shots.values()) and r.shots[1].alpha == DEFAULT_L2
    assert set(metric_values([r])) == {"digits/1shot", "digits/5shot", "digits/draw"}


def test_metrics_reach_the_line_jsonl_tensorboard_and_wandb(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.train.wandb_log import WandbLogger

    m = Metrics(
        tmp_path,
        LogConfig(tensorboard=True),
        BatchPlan(micro_batch=4, accum_steps=1, world_size=1),
        total_steps=2,
        rank=0,
        device=torch.device("cpu"),
        flops_per_image=1.0,
    )
    logged = []
    m.wandb = WandbLogger.__new__(WandbLogger)
    m.wandb.run = type(
        "Run", (), {"log": lambda self, v, step: logged.append((step, v)), "finish": lambda self: None}
    )()
    values = {"digits/1shot": 0.25, "digits/10shot": 0.875, "digits/draw": "abc123", "time_s": 1.5}
    assert m.log_fewshot(7, values) == values and m.log_fewshot(8, {}) == {}
    m.close()
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["kind"] == "fewshot" and row["step"] == 7 and row["digits/10shot"] == 0.875
    assert logged == [(7, {"fewshot/digits/1shot": 0.25, "fewshot/digits/10shot": 0.875, "fewshot/time_s": 1.5})]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"fewshot/digits/1shot", "fewshot/digits/10shot"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("fewshot/digits/10shot")[0].value == 0.875
    assert format_line("fewshot", 7, values) == "fewshot step 7 | digits/1shot 25.0% | digits/10shot 87.5% | 1.5 s"


def test_curves_get_a_fewshot_panel(tmp_path):
    from PIL import Image

    rows = [{"kind": "train", "step": s, "loss": 2.0 / s, "lr": 1e-3, "images_per_s": 100.0} for s in (1, 2, 3, 4)]
    rows += [{"kind": "fewshot", "step": s, "digits/1shot": 0.1 * s, "digits/10shot": 0.2 * s} for s in (2, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in read_rows(tmp_path, "fewshot")] == [2, 4]
    with Image.open(plot(tmp_path, tmp_path / "with.png")) as im:
        assert im.size[0] == 2000  # four panels (loss, lr, throughput, few-shot)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    with Image.open(plot(tmp_path, tmp_path / "without.png")) as im:
        assert im.size[0] == 1500


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A timm-layout export of vit_test_patch4 at initialisation, head dropped."""
    torch.manual_seed(0)
    model = create_vit("vit_test_patch4", num_classes=0, img_size=32)
    out = tmp_path_factory.mktemp("fewshot_export") / "timm"
    save_backbone(model, out, export_files(model, "vit_test_patch4", [], (0.5,) * 3, (0.5,) * 3, 0.875))
    return out


def test_standalone_prints_a_table_and_writes_json(export_dir, digits_shards, tmp_path, capsys):
    args = ["--weights", str(export_dir), "--data", f"digits={digits_shards}", "--shots", "1,2", "--no-progress"]
    assert main([*args, "--json", str(tmp_path / "r.json"), "--precision", "fp32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "vit_test_patch4 (final-norm class token, 64-d)" in out[0]
    assert out[1] == "| set | classes | test images | 1-shot | 2-shot |" and out[3].startswith("| digits | 10 | 50 | ")
    res = json.loads((tmp_path / "r.json").read_text())["sets"]["digits"]
    assert (
        res["train_images"] == 20
        and res["shots"]["1"]["l2"] == DEFAULT_L2
        and len(res["shots"]["2"]["heldout"]) == len(L2_GRID)
    )
    assert out[3] == f"| digits | 10 | 50 | {res['shots']['1']['accuracy']:.1%} | {res['shots']['2']['accuracy']:.1%} |"


def test_standalone_reads_a_timm_model_name_with_local_weights(digits_shards, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    args = ["--timm", "vit_tiny_patch16_224", "--weights", str(tmp_path / "w.safetensors"), "--no-progress"]
    assert main([*args, "--data", f"digits={digits_shards}", "--shots", "1", "--max-test-images", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "timm vit_tiny_patch16_224 (192-d)" in out[0] and out[3].startswith("| digits | 10 | 8 | ")


def test_standalone_bad_input_exits_2_with_one_line(export_dir, digits_shards, tmp_path, capsys):
    data = f"digits={digits_shards}"
    cases = [
        (["--weights", str(tmp_path / "nope"), "--data", data], "does not exist"),
        (["--weights", str(export_dir), "--data", "d=" + str(tmp_path / "nope")], "does not exist"),
        (["--weights", str(export_dir), "--data", data, "--shots", "5,1"], "--shots"),
        (["--weights", str(tmp_path), "--data", data], "config.json"),
        (["--weights", str(export_dir), "--data", f"digits={digits_shards}@nosplit"], "no split 'nosplit'"),
        (["--timm", "vit_nope_patch1", "--weights", str(export_dir / "model.safetensors"), "--data", data], "--timm"),
    ]
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], (argv, err)


@pytest.mark.parametrize("recipe", ["vit_b16_i21k", "vit_l16_i21k", "vit_h14_i21k"])
def test_recipes_commented_example_is_a_valid_section(recipe):
    import yaml

    text = open(f"configs/{recipe}.yaml").read()
    block = text[text.index("# fewshot:") :]
    section = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))["fewshot"]
    cfg = load_config(f"configs/{recipe}.yaml", [f"fewshot.{k}={v}" for k, v in section.items()])
    assert [s.name for s in parse_sets(cfg.fewshot.sets)] == ["imagenet", "cifar100", "pets"]
    assert cfg.fewshot.shots == "1,5,10,25" and cfg.fewshot.every_steps == 5000


def test_planner_prices_one_evaluation_at_the_recipes_interval():
    from pretrain.fewshot.ridge import fit_flops
    from pretrain.plan import FEWSHOT_SETS, PEAK_FP64_FLOPS, parse_args, plan

    argv = ["--model", "vit_large_patch16", "--samples", "14.2M", "--epochs", "90", "--gpus", "64"]
    rows = {r.what: r for r in plan(parse_args(argv))}
    row = rows["few-shot evaluation every 5,000 steps (52,094 images)"]
    img_s = float(rows["images/s per H100"].value.replace(",", ""))
    flops = sum(fit_flops(c, (1, 5, 10, 25), 1024, t) for c, t in FEWSHOT_SETS)
    each = 52_094 / (3 * img_s * 64) + 52_094 / (422.5 * 10 * 64) + flops / (PEAK_FP64_FLOPS["H100"] * 0.25)
    share = each / (5000 * 4096 / (img_s * 64))
    assert row.value == f"{each:,.1f} s each, {share:.2%} of training time" and share < 0.02
    assert row.source.startswith("derived:") and f"{flops / 1e9:,.0f} GFLOP" in row.source
