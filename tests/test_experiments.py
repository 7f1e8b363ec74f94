"""Fast smoke tests of the char-GPT experiment code (tiny synthetic corpus, a few steps)."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("yaml")

import barrier_ops  # noqa: E402
from barrier_ops.experiments import data as data_mod  # noqa: E402
from barrier_ops.experiments import sweep as sweep_mod  # noqa: E402
from barrier_ops.experiments.config import BarrierConfig, ConfigError, ModelConfig, from_dict, load_config  # noqa: E402
from barrier_ops.experiments.evaluate import evaluate_split, noise_eval  # noqa: E402
from barrier_ops.experiments.model import CharGPT, attach_barrier, measuring, training_loss  # noqa: E402
from barrier_ops.reference import margin_barrier_loss_reference, token_margins_reference  # noqa: E402

from _cases import assert_close  # noqa: E402

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 16}


def _corpus_dir(tmp_path):
    text = "".join(f"the quick brown fox {i} jumps over the lazy dog. " for i in range(60))
    d = tmp_path / "corpus"
    d.mkdir()
    n = len(text)
    (d / "train.txt").write_text(text[: int(0.8 * n)])
    (d / "valid.txt").write_text(text[int(0.8 * n): int(0.9 * n)])
    (d / "test.txt").write_text(text[int(0.9 * n):])
    return str(d)


def _tiny_cfg(tmp_path, **train):
    return from_dict({
        "name": "tiny",
        "data": {"path": _corpus_dir(tmp_path)},
        "model": TINY_MODEL,
        "train": {"steps": 3, "batch_size": 4, "eval_interval": 2, "eval_batches": 1, "warmup_steps": 1,
                  "device": "cpu", "threads": 1, "progress": False, **train},
        "eval": {"sigmas": [0.0, 0.5], "draws": 2, "batches": 2, "batch_size": 4},
        "sweep": {"lambdas": [0.0, 0.05], "seeds": [0]},
    })


def _model(coupling="weights", seed=0, lam=0.5, target_margin=None):
    torch.manual_seed(seed)
    model = CharGPT(11, ModelConfig(**TINY_MODEL))
    attach_barrier(model, BarrierConfig(coupling=coupling, target_margin=target_margin), lam)
    return model


@pytest.mark.parametrize("coupling", ["weights", "identity"])
def test_forward_backward_with_penalty(coupling):
    model = _model(coupling)
    handle = barrier_ops.get_handle(model)
    assert handle.kind == "chargpt" and handle.layer_names == ["blocks.0.attn", "blocks.1.attn"]
    assert handle.coupling == coupling and handle.combine_heads and handle.weight == 0.5
    x = torch.randint(0, 11, (3, 16))
    out = model(x, x)
    assert out.logits.shape == (3, 16, 11)
    assert torch.isfinite(out.penalty) and out.penalty.ndim == 0
    torch.testing.assert_close(out.loss, out.ce + 0.5 * out.penalty)  # the handle added lambda_m * penalty
    training_loss(out, 0.5).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The penalty alone must reach the query projection, and the last layer's W_O (which feeds no
    # later layer) only through the exact coupling A_h = W_Q^h W_O^h.
    model.zero_grad()
    out = model(x, x)
    (out.loss - out.ce).backward()
    assert model.blocks[0].attn.q_proj.weight.grad.abs().sum() > 0
    o_grad = model.blocks[-1].attn.o_proj.weight.grad
    assert (o_grad is not None and o_grad.abs().sum() > 0) == (coupling == "weights")


def test_penalty_is_layer_mean_of_reference_barrier():
    model = _model("weights").double()
    # At the default init (std 0.02) every margin is within 2e-5 of 1 and the penalty ~5e-6 is
    # lost in float32 rounding: scaled attention weights give margins 0.2..1.2 (all in the -log
    # branch, above eps) and a penalty of 0.2, so a 0.01% error of the op fails the check.
    with torch.no_grad():
        for block in model.blocks:
            for proj in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.attn.o_proj):
                proj.weight.mul_(13.0)
    x = torch.randint(0, 11, (2, 16))
    captured = []
    for block in model.blocks:
        block.attn.register_forward_hook(lambda mod, inp, out: captured.append((mod, inp[0])))
    with measuring(model):
        out = model(x)
    assert out.loss is None and len(out.margins) == 2
    expected, margins = [], []
    for attn, h in captured:
        B, T, C = h.shape
        q, k, v = (p(h).view(B, T, attn.n_head, -1).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        H, d = attn.n_head, C // attn.n_head
        A = torch.stack([attn.q_proj.weight[i * d:(i + 1) * d] @ attn.o_proj.weight[:, i * d:(i + 1) * d]
                         for i in range(H)])
        eps = barrier_ops.get_handle(model).eps
        expected.append(margin_barrier_loss_reference(q, k, v, coupling=A, combine_heads=True, eps=eps))
        margins.append(token_margins_reference(q, k, v, coupling=A, combine_heads=True))
    expected = torch.stack(expected).mean().detach()
    assert 0.05 < abs(float(expected)) < 1 and float(margins[0].detach().min()) < 0.5  # the barrier matters
    # The op runs in float32 on q, k, v and A rounded from float64: ~1e-7 relative in practice.
    for layer, (got, want) in enumerate(zip(out.margins, margins)):
        assert_close(got, want, 1e-5, f"layer {layer} margins")
    assert_close(out.penalty, expected, 1e-5, "penalty")


def test_ce_mode_ignores_penalty():
    model = _model(lam=0.0)
    assert not barrier_ops.get_handle(model).enabled  # CE training never computes the barrier
    x = torch.randint(0, 11, (2, 16))
    out = model(x, x)
    assert out.penalty is None and out.loss is out.ce and training_loss(out, 0.0) is out.ce
    with pytest.raises(ValueError, match="attach"):
        training_loss(out, 0.1)
    with measuring(model):  # evaluation still measures the CE model's barrier and margins
        measured = model(x, x)
    assert torch.isfinite(measured.penalty) and len(measured.margins) == 2
    torch.testing.assert_close(measured.loss, measured.ce)  # weight 0 adds nothing
    assert not barrier_ops.get_handle(model).enabled and model(x, x).penalty is None


@pytest.fixture
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_noise_eval_deterministic_given_seed(one_thread):
    model = _model()
    data = torch.randint(0, 11, (500,))
    kw = dict(n_batches=2, batch_size=4, device=torch.device("cpu"))
    a = evaluate_split(model, data, sigma=0.3, seed=7, **kw)["bpc"]
    b = evaluate_split(model, data, sigma=0.3, seed=7, **kw)["bpc"]
    c = evaluate_split(model, data, sigma=0.3, seed=8, **kw)["bpc"]
    clean = evaluate_split(model, data, **kw)["bpc"]
    assert a == b and a != c and a != clean
    res = noise_eval(model, data, sigmas=[0.0, 0.3], draws=2, seed=7, **kw)
    assert res["0"]["bpc"] == clean and res["0"]["ratio"] == 1.0
    assert res["0.3"] == noise_eval(model, data, sigmas=[0.3], draws=2, seed=7, **kw)["0.3"]


def test_margins_and_support_tokens_reported():
    model = _model()
    data = torch.randint(0, 11, (500,))
    r = evaluate_split(model, data, n_batches=2, batch_size=4, device=torch.device("cpu"),
                       with_penalty=True, with_margins=True)
    assert len(r["margins"]) == 2 and len(r["support_pos"]) == 2
    assert r["margins"][0].numel() == 2 * 4 * 16
    assert ((r["support_pos"][0] >= 0) & (r["support_pos"][0] < 16)).all()
    assert ((r["support_pos_excl0"][1] >= 1) & (r["support_pos_excl0"][1] < 16)).all()


def test_sweep_is_resumable(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    cfg = _tiny_cfg(tmp_path, threads=2 if threads == 1 else 1)
    root = str(tmp_path / "sweep")
    rows = sweep_mod.run_sweep(cfg, root, progress=False, log=lambda *a: None)
    assert torch.get_num_threads() == threads  # train() ran with train.threads and put the caller's back
    assert [(r["lambda"], r["seed"]) for r in rows] == [(0.0, 0), (0.05, 0)]
    assert os.path.isfile(os.path.join(root, "results.csv"))
    with open(os.path.join(root, "lam0.05_seed0", "metrics.jsonl")) as f:
        rec = json.loads(f.readline())
    assert {"train_bpc", "val_bpc", "val_penalty", "margin_mean", "margin_min"} <= set(rec)
    assert len(rec["margin_min"]) == 2

    if importlib.util.find_spec("matplotlib") is not None:
        from barrier_ops.experiments.plots import make_all

        paths = make_all(root, str(tmp_path / "figs"), compare=0.05)
        assert len(paths) == 4 and all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in paths)

    trained = []
    monkeypatch.setattr(sweep_mod, "train", lambda cfg, out, progress: trained.append(out))
    sweep_mod.run_sweep(cfg, root, progress=False, log=lambda *a: None)
    assert trained == []  # both finished runs skipped
    os.remove(os.path.join(root, "lam0_seed0", "summary.json"))
    sweep_mod.run_sweep(cfg, root, progress=False, log=lambda *a: None)
    assert trained == [os.path.join(root, "lam0_seed0")]
    assert len(sweep_mod.read_csv(os.path.join(root, "results.csv"))) == 1


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"train\.stepz.*known keys"):
        load_config(str(bad))
    bad.write_text("model:\n  n_layer: two\n")
    with pytest.raises(ConfigError, match=r"model\.n_layer: expected an integer"):
        load_config(str(bad))
    bad.write_text("barrier:\n  coupling: diagonal\n")
    with pytest.raises(ConfigError, match="barrier.coupling"):
        load_config(str(bad))
    bad.write_text("train:\n  lambda: 0.02\n  lr: 3e-3\n")
    cfg = load_config(str(bad), {"train.seed": 4})
    assert cfg.train.lam == 0.02 and cfg.mode == "barrier" and cfg.train.lr == 3e-3 and cfg.train.seed == 4
    with pytest.raises(ConfigError, match="train.lambda must be >= 0"):
        load_config(str(bad), {"train.lambda": -1.0})


def test_data_sources(tmp_path, monkeypatch):
    splits = data_mod.load_splits(_corpus_dir(tmp_path))
    d = data_mod.build_data(splits)
    assert d.vocab.decode(d.val[:5].tolist()) == splits["val"][:5]
    single = tmp_path / "one.txt"
    single.write_text("abcdefghij" * 100)
    s1, s2 = data_mod.load_splits(str(single)), data_mod.load_splits(str(single))
    assert s1 == s2 and [len(s1[k]) for k in ("train", "val", "test")] == [900, 50, 50]
    with pytest.raises(data_mod.CorpusNotFoundError, match="no such file"):
        data_mod.load_splits(str(tmp_path / "nope"))
    monkeypatch.setenv("BARRIER_OPS_DATA_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(data_mod.shutil, "which", lambda name: None)
    with pytest.raises(data_mod.CorpusNotFoundError, match="apt-get install -y bible-kjv"):
        data_mod.load_splits(None)


def test_cli_set_overrides(tmp_path):
    from barrier_ops.experiments.train import build_parser, overrides_from_args

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: x\n")
    args = build_parser().parse_args(["--config", str(cfg_file), "--set", "barrier.coupling=identity",
                                      "--set", "train.lr=1e-3", "--lambda", "0.02"])
    cfg = load_config(args.config, overrides_from_args(args))
    assert cfg.barrier.coupling == "identity" and cfg.train.lr == 1e-3 and cfg.train.lam == 0.02
    args = build_parser().parse_args(["--config", str(cfg_file), "--set", "barrier.coupling"])
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        overrides_from_args(args)


def test_coupling_name_alias_and_target_margin_config(tmp_path):
    cfg = from_dict({"barrier": {"coupling": "exact"}})  # the old experiment name of attach's "weights"
    assert cfg.barrier.coupling == "weights" and cfg.barrier.target_margin is None and cfg.variant == "ce"
    with pytest.raises(ConfigError, match="'weights'.*old name 'exact'"):
        from_dict({"barrier": {"coupling": "exactly"}})
    with pytest.raises(ConfigError, match="target_margin"):
        from_dict({"barrier": {"target_margin": 0.001}})
    cfg = from_dict({"barrier": {"target_margin": 2.0}, "train": {"lambda": 0.1}})
    assert cfg.variant == "target2"
    model = CharGPT(11, ModelConfig(**TINY_MODEL))
    handle = attach_barrier(model, cfg.barrier, 0.1)
    assert handle.target_margin == 2.0 and handle.coupling == "weights"
    barrier_ops.detach(model)
    assert barrier_ops.get_handle(model) is None and model(torch.zeros(1, 4, dtype=torch.long)).penalty is None


def test_grid_plan_order_and_run_names(tmp_path):
    from barrier_ops.experiments.train import run_dir_name

    cfg = from_dict({"sweep": {"seeds": [0, 1], "grid": [
        {"variant": "paper", "lambdas": [0.05, 0.01]},
        {"variant": "target2", "target_margin": 2.0, "lambdas": [0.05, 0.3, 0.1]},
        {"variant": "ce", "lambdas": [0.0]},
    ]}})
    runs = sweep_mod.plan_runs(cfg)
    pairs = [(r.variant, r.lam) for r in runs[::2]]
    assert pairs == [("ce", 0.0), ("paper", 0.05), ("target2", 0.05), ("paper", 0.01), ("target2", 0.3),
                     ("target2", 0.1)]  # CE first, then lambdas interleaved by their position in the lists
    assert [r.seed for r in runs[:4]] == [0, 1, 0, 1]
    assert runs[0].target_margin is None and runs[4].target_margin == 2.0
    assert [r.dir_name for r in runs[:5:2]] == ["lam0_seed0", "lam0.05_seed0", "tm2_lam0.05_seed0"]
    assert run_dir_name(0.0, 3, 2.0) == "lam0_seed3"
    only = sweep_mod.plan_runs(cfg, lambdas=[0.05], seeds=[1], variants=["target2"])
    assert [(r.variant, r.lam, r.seed) for r in only] == [("target2", 0.05, 1)]
    with pytest.raises(ConfigError, match="grid"):
        from_dict({"sweep": {"grid": [{"variant": "paper", "lambdas": []}]}})


def test_paired_and_margin_tables():
    rows = [{"variant": "ce", "lambda": 0.0, "seed": s, "bpc": 2.0 + s, "bpc_sigma0.1": 4.0} for s in (0, 1)]
    rows += [{"variant": "target2", "lambda": 0.3, "seed": s, "bpc": 1.01 * (2.0 + s), "bpc_sigma0.1": 3.96}
             for s in (0, 1)]
    table = sweep_mod.paired_table(rows, ["0.1"])
    assert "| target2 | 0.3 | 2 | +1.0 +- 0.0 | -1.0 +- 0.0 |" in table  # paired by seed: no spread
    for r in rows:
        r.update({"margin_min_l0": 0.9, "margin_median_l0": 1.5, "active_frac_l0": 0.25})
    assert "| target2 | 0.3 | 0 | 0.9 |" in sweep_mod.margin_table(rows) and "25.0%" in sweep_mod.margin_table(rows)


def test_relative_sigmas_and_margin_summary(one_thread):
    from barrier_ops.experiments.evaluate import HIST_EDGES, embedding_rms, margin_summary

    model = _model(lam=0.05, target_margin=2.0)
    data = torch.randint(0, 11, (500,))
    kw = dict(n_batches=1, batch_size=4, device=torch.device("cpu"))
    res = noise_eval(model, data, sigmas=[0.0, 0.1], rel_sigmas=[0.5], draws=1, seed=3, **kw)
    rms = embedding_rms(model)
    assert 0.015 < rms < 0.025  # init std 0.02
    assert res["r0.5"]["sigma"] == pytest.approx(0.5 * rms) and res["0.1"]["sigma"] == 0.1
    assert res["r0.5"]["bpc"] == evaluate_split(model, data, sigma=0.5 * rms, seed=3000, **kw)["bpc"]
    m = torch.tensor([0.0005, 0.5, 0.9, 1.5, 3.0, 2e4])
    s = margin_summary([m], [torch.tensor([0, 0, 5])], 8, target_margin=2.0)["layers"][0]
    assert s["hist_below"] == 1 and s["hist_above"] == 1 and sum(s["hist_counts"]) == 4
    assert len(s["hist_counts"]) == len(HIST_EDGES) - 1
    assert s["active_frac"] == pytest.approx(4 / 6) and s["frac_below_1"] == pytest.approx(3 / 6)
    assert s["support_pos0_frac"] == pytest.approx(2 / 3) and s["min"] == pytest.approx(0.0005)
    assert margin_summary([m], [torch.tensor([1])], 8)["layers"][0]["active_frac"] == 1.0  # -log m: every token
    s1 = margin_summary([m], [torch.tensor([0, 0])], 8, support_pos_excl0=[torch.tensor([1, 3])])["layers"][0]
    assert s1["support_pos_excl0_mean"] == 2.0 and s1["support_pos_excl0_counts"][:4] == [0, 1, 0, 1]


def test_demo_explains_itself(tmp_path, capsys):
    import yaml

    from barrier_ops.experiments import demo

    cfg = _tiny_cfg(tmp_path).to_dict()
    cfg["train"]["lambda"] = cfg["train"].pop("lam")
    cfg["eval"]["rel_sigmas"] = [0.25, 0.5]
    cfg["sweep"]["grid"] = [{"variant": "ce", "lambdas": [0.0]},
                            {"variant": "target2", "target_margin": 2.0, "lambdas": [0.1]}]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    root = tmp_path / "demo"
    demo.main(["--config", str(path), "--root", str(root)])
    out = capsys.readouterr()
    assert "CE + 0.1 x target-margin barrier, m0 = 2" in out.out and "| CE only " in out.out
    assert "x embedding RMS" in out.out and "support token at t = 0" in out.out
    assert f"wrote {root}/results.csv" in out.out
    assert (root / "tm2_lam0.1_seed0" / "summary.json").is_file()
    assert "step 3/3" in out.err  # not a terminal: one plain progress line per evaluation, no bars
    if importlib.util.find_spec("matplotlib") is not None:
        assert (root / "figures" / "margins.png").is_file()
        assert "margins.png: every token's stability margin" in out.out


def test_substitute_chars_rate_pairing_and_errors():
    from barrier_ops.experiments.evaluate import substitute_chars

    x = torch.randint(0, 11, (64, 64), generator=torch.Generator().manual_seed(0))
    a = substitute_chars(x, 0.05, 11, torch.Generator().manual_seed(5))
    changed = a != x
    assert 0.035 < changed.double().mean().item() < 0.065  # 4096 Bernoulli(0.05) draws
    assert ((a >= 0) & (a < 11)).all()
    # Same seed, other characters in the window: the same positions change (seed-paired across models' inputs).
    y = (x + 3) % 11
    assert torch.equal(substitute_chars(y, 0.05, 11, torch.Generator().manual_seed(5)) != y, changed)
    assert not torch.equal(substitute_chars(x, 0.05, 11, torch.Generator().manual_seed(6)), a)
    assert torch.equal(substitute_chars(x, 0.0, 11, torch.Generator().manual_seed(5)), x)
    with pytest.raises(ValueError, match="rate"):
        substitute_chars(x, 1.0, 11, torch.Generator())
    with pytest.raises(ValueError, match="vocab_size"):
        substitute_chars(x, 0.1, 1, torch.Generator())


def test_substitution_eval_deterministic_and_seeded(one_thread):
    from barrier_ops.experiments.evaluate import substitution_eval

    model = _model()
    data = torch.randint(0, 11, (500,))
    kw = dict(n_batches=2, batch_size=4, device=torch.device("cpu"))
    clean = evaluate_split(model, data, **kw)["bpc"]
    res = substitution_eval(model, data, rates=[0.05, 0.3], draws=2, seed=4, **kw)
    assert set(res) == {"s0.05", "s0.3"} and res["s0.3"]["rate"] == 0.3
    draws = [evaluate_split(model, data, sub_rate=0.3, seed=4000 + d, **kw)["bpc"] for d in range(2)]
    assert res["s0.3"]["bpc"] == pytest.approx(sum(draws) / 2) and draws[0] != draws[1] != clean
    assert res["s0.3"]["ratio"] == pytest.approx(res["s0.3"]["bpc"] / clean)
    assert res == substitution_eval(model, data, rates=[0.05, 0.3], draws=2, seed=4, **kw)
    with pytest.raises(ValueError, match="sub_rate"):
        evaluate_split(model, data, sub_rate=-0.1, **kw)
    with pytest.raises(ConfigError, match="sub_rates"):
        from_dict({"eval": {"sub_rates": [0.0]}})


def test_sweep_records_substitution_columns(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    cfg.eval.sub_rates = [0.05]
    cfg.sweep.lambdas = [0.0]
    root = str(tmp_path / "sweep")
    rows = sweep_mod.run_sweep(cfg, root, progress=False, log=lambda *a: None)
    with open(os.path.join(root, "lam0_seed0", "substitution.json")) as f:
        sub = json.load(f)
    assert rows[0]["bpc_sub0.05"] == sub["s0.05"]["bpc"] > rows[0]["bpc"] * 0.5
    assert sweep_mod.collect_all(root)[0]["ratio_sub0.05"] == sub["s0.05"]["ratio"]
    assert "bpc_sub0.05" in sweep_mod.read_csv(os.path.join(root, "results.csv"))[0]
    assert sweep_mod.substitution_for_run(os.path.join(root, "lam0_seed0")) == sub  # reproducible from the checkpoint
