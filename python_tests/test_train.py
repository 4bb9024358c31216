"""python -m cram_ext.train: a short CPU run learns and routes less, resume is exact, the
routing baselines route as they say, and the analysis recovers a known power law."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import assert_same_state

from cram_ext import analysis, checkpoint, train

TINY = ["--device", "cpu", "--no-progress", "--d-model", "32", "--heads", "2", "--seq-len", "48",
        "--num-stores", "4", "--num-queries", "2", "--num-keys", "24", "--num-recurring-pairs", "6",
        "--batch-size", "16", "--eval-examples", "64", "--log-every", "5"]


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_loss_falls_and_routing_drops(tmp_path):
    """Training smoke test: the loss falls and utilization ends below its start, and every
    output file the entry point promises is there."""
    args = train.build_parser().parse_args(
        TINY + ["--steps", "150", "--eval-every", "50", "--router-warmup", "20", "--out", str(tmp_path)])
    summary = train.run(args)
    records = read(tmp_path / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, "the loss did not fall"
    assert summary["utilization_end"] < summary["utilization_start"], "utilization did not drop"
    for r in records:
        assert {"step", "loss", "utilization", "attn_flop_fraction"} <= r.keys() or "retrieval_acc" in r
    assert any("retrieval_acc" in r for r in records)
    for key in ("utilization_start", "utilization_end", "reduction", "retrieval_acc", "retrieval_acc_novel",
                "retrieval_acc_recurring", "gamma", "transition_step", "wall_s", "transfer"):
        assert key in summary
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 150
    assert (tmp_path / "utilization.png").stat().st_size > 0
    assert (tmp_path / "checkpoint.pt").exists()


def test_routing_breakdown(tmp_path):
    """The breakdown's token kinds partition every sequence, the counts are the task's, and
    its routed counts add up to the model's utilization."""
    args = train.build_parser().parse_args(
        TINY + ["--steps", "30", "--eval-every", "30", "--router-warmup", "5", "--no-transfer", "--out", str(tmp_path)])
    train.run(args)
    b = analysis.routing_breakdown(tmp_path, examples=32)
    kinds = ("novel_query", "recurring_query", "store", "after_query", "other")
    assert sum(b[k]["tokens_per_seq"] for k in kinds) == pytest.approx(48)
    assert b["novel_query"]["tokens_per_seq"] + b["recurring_query"]["tokens_per_seq"] == pytest.approx(2)
    assert b["store"]["tokens_per_seq"] == pytest.approx(4)
    assert sum(b[k]["routed_per_seq"] for k in kinds) == pytest.approx(48 * b["utilization"])
    assert all(0.0 <= b[k]["routed_fraction"] <= 1.0 for k in kinds)


def test_router_lr_scale(tmp_path):
    """--router-lr-scale scales the router's learning rate: at 0 the router's parameters keep
    their initial values past the warm-up; at 1 they train."""
    def run(scale, out):
        train.run(train.build_parser().parse_args(
            TINY + ["--steps", "12", "--eval-every", "12", "--router-warmup", "2", "--no-transfer",
                    "--router-lr-scale", scale, "--out", str(tmp_path / out)]))
        return torch.load(tmp_path / out / "checkpoint.pt", weights_only=False)["model"]

    frozen, trained = run("0", "frozen"), run("1", "trained")
    router = [k for k in frozen if k.endswith(("router_weight", "router_bias"))]
    assert router
    init_bias = train.ROUTED_DEFAULTS["router_bias_init"]
    for k in router:
        assert torch.equal(frozen[k], torch.full_like(frozen[k], init_bias if k.endswith("bias") else 0.0)), k
        assert not torch.equal(trained[k], frozen[k]), f"{k} did not train at scale 1"


@pytest.mark.parametrize("target", ["predict", "loss"])
def test_resume_is_exact(tmp_path, target):
    """20 steps, stop, resume to 40: the same weights and the same logged losses as 40 steps
    in one go (target="loss": step 20's router loss reads step 19's probe labels)."""
    common = TINY + ["--eval-every", "20", "--ckpt-every", "20", "--no-transfer", "--router-warmup", "5",
                     "--target", target]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train.run(train.build_parser().parse_args(common + ["--steps", "40", "--out", str(whole)]))
    train.run(train.build_parser().parse_args(common + ["--steps", "20", "--out", str(split)]))
    train.run(train.build_parser().parse_args(common + ["--steps", "40", "--out", str(split), "--resume"]))
    a = torch.load(whole / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(split / "checkpoint.pt", weights_only=False)["model"]
    assert_same_state(a, b, "after resume")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(read(whole / "metrics.jsonl")) == strip(read(split / "metrics.jsonl"))


def old_lr_at(step, args):
    """The learning rate the trainer set by hand before it had a torch scheduler (cram_ext.optim)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


@pytest.mark.parametrize("flags", [[], ["--warmup", "7", "--min-lr-ratio", "0.1", "--lr", "0.0021"],
                                   ["--warmup", "0", "--steps", "13"], ["--warmup", "90", "--steps", "60"]])
def test_scheduler_is_the_old_formula(flags):
    """WarmupCosine sets, at every step, exactly (bitwise) the learning rate of the formula the
    trainer used before, times each group's --router-lr-scale."""
    from cram_ext.models.build import build_model
    from cram_ext.optim import WarmupCosine, make_optimizer
    from cram_ext.tasks import make_task
    from cram_ext.train_args import routed_options

    args = train.build_parser().parse_args(TINY + ["--steps", "60", "--router-lr-scale", "0.3"] + flags)
    net, _ = build_model(args, make_task(args).model_config(), routed_options(args))
    optimizer = make_optimizer(net, args)
    scheduler = WarmupCosine.from_args(optimizer, args)
    for step in range(args.steps + 1):
        want = old_lr_at(step, args)
        assert [g["lr"] for g in optimizer.param_groups] == [want * 1.0, want * 0.3], step
        assert scheduler.get_last_lr() == [want, want * 0.3]
        optimizer.step()
        scheduler.step()


def test_resume_restores_the_scheduler(tmp_path):
    """The checkpoint holds the scheduler's position; a checkpoint from before it did (no
    "scheduler", no "initial_lr" in the optimizer's groups) resumes exactly too; a resumption
    with more --steps follows the new total's schedule from the resumed step on."""
    common = TINY + ["--eval-every", "10", "--ckpt-every", "10", "--no-transfer", "--router-warmup", "5",
                     "--warmup", "5", "--router-lr-scale", "0.5"]
    whole, old, grown = tmp_path / "whole", tmp_path / "old", tmp_path / "grown"
    train.run(train.build_parser().parse_args(common + ["--steps", "20", "--keep-checkpoints", "--out", str(whole)]))
    state = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert state["scheduler"] == {"last_epoch": 20} and state["step"] == 19
    lrs = [r["lr"] for r in read(whole / "metrics.jsonl") if "lr" in r]
    args20 = train.build_parser().parse_args(common + ["--steps", "20"])
    assert lrs == [old_lr_at(s, args20) for s in (0, 5, 10, 15)]

    old.mkdir()  # the run `whole` as it was at its step-10 checkpoint, written by the trainer of before
    for name in ("config.json", "metrics.jsonl"):
        (old / name).write_bytes((whole / name).read_bytes())
    state = torch.load(whole / "checkpoint-10.pt", weights_only=True)
    assert state.pop("scheduler") == {"last_epoch": 10}
    for group in state["optimizer"]["param_groups"]:
        del group["initial_lr"]
        group["lr"] = 1.0  # the old trainer saved the last step's; the schedule's must win
    torch.save(state, old / "checkpoint.pt")
    train.run(train.build_parser().parse_args(common + ["--steps", "20", "--out", str(old), "--resume"]))
    assert_same_state(torch.load(whole / "checkpoint.pt", weights_only=True)["model"],
                      torch.load(old / "checkpoint.pt", weights_only=True)["model"], "resumed old checkpoint")
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(read(whole / "metrics.jsonl")) == strip(read(old / "metrics.jsonl"))

    train.run(train.build_parser().parse_args(common + ["--steps", "10", "--out", str(grown)]))
    train.run(train.build_parser().parse_args(common + ["--steps", "30", "--out", str(grown), "--resume"]))
    args30 = train.build_parser().parse_args(common + ["--steps", "30"])
    logged = {r["step"]: r["lr"] for r in read(grown / "metrics.jsonl") if "lr" in r}
    assert logged == {s: old_lr_at(s, args20 if s < 10 else args30) for s in range(0, 30, 5)} and len(logged) == 6
    final = torch.load(grown / "checkpoint.pt", weights_only=True)
    assert final["scheduler"] == {"last_epoch": 30}
    assert [g["lr"] for g in final["optimizer"]["param_groups"]] == [old_lr_at(30, args30) * s for s in (1.0, 0.5)]


@pytest.mark.parametrize("routing, expected", [("dense", 1.0), ("none", 0.0), ("static", 0.25)])
def test_routing_baselines(tmp_path, routing, expected):
    args = train.build_parser().parse_args(
        TINY + ["--steps", "3", "--eval-every", "3", "--no-transfer", "--routing", routing, "--budget", "0.25",
                "--out", str(tmp_path)])
    summary = train.run(args)
    assert summary["utilization_end"] == pytest.approx(expected, abs=1e-6)
    assert all(r["utilization"] == pytest.approx(expected, abs=1e-6) for r in read(tmp_path / "metrics.jsonl")
               if "utilization" in r)


def test_mqar_task_runs(tmp_path):
    args = train.build_parser().parse_args(
        ["--task", "mqar", "--device", "cpu", "--no-progress", "--steps", "4", "--eval-every", "2", "--seq-len", "64",
         "--num-kv-pairs", "4", "--vocab-size", "128", "--d-model", "32", "--heads", "2", "--batch-size", "8",
         "--eval-examples", "16", "--out", str(tmp_path)])
    summary = train.run(args)
    assert 0.0 <= summary["retrieval_acc"] <= 1.0 and summary["transfer"]["retrieval_acc"] >= 0.0


@pytest.mark.parametrize("kv, table", [(32, 16), (8, 16), (16, 16)])
def test_mqar_transfer_variant_fits_the_recurring_table(kv, table):
    """Twice the pairs may need more recurring pairs than the fixed table holds (32 pairs, half
    recurring: 32 from a table of 16); the variant keeps as many as the table has."""
    from cram_ext.tasks import make_task, transfer_variant
    args = train.build_parser().parse_args(
        ["--task", "mqar", "--seq-len", "256", "--num-kv-pairs", str(kv), "--num-recurring-pairs", str(table),
         "--vocab-size", "1024"])
    variant = transfer_variant(args)
    assert variant["num_kv_pairs"] == min(2 * kv, 64)
    batch = make_task(args, **variant).eval_batch(4, 1, torch.device("cpu"))
    recurring_per_example = (batch["recurring"] & (batch["labels"] != -100)).sum(1)
    assert int(recurring_per_example.max()) == min(round(0.5 * variant["num_kv_pairs"]), table)


def test_power_law_analysis():
    steps = [0, 100, 200, 400, 800, 1600, 3200]
    util = [1.0] + [3.0 * s**-0.43 for s in steps[1:]]
    t = analysis.transition_step(steps, util)
    assert t == next(s for s, u in zip(steps, util) if u <= math.sqrt(util[0] * util[-1]))
    fit = analysis.power_law_fit(steps, util, t)
    assert fit.gamma == pytest.approx(0.43, rel=1e-9) and fit.a == pytest.approx(3.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0) and not fit.poor
    assert fit.gamma_ci95[0] == pytest.approx(0.43, abs=1e-6) and fit.gamma_ci95[1] == pytest.approx(0.43, abs=1e-6)
    # Noise around the law widens the interval, which still holds the true exponent; a curve
    # that is no power law (flat after a drop, then up) is called a poor fit.
    g = torch.Generator().manual_seed(0)
    noisy = [u * math.exp(0.1 * torch.randn((), generator=g).item()) for u in util]
    fit = analysis.power_law_fit(steps, noisy, t)
    assert fit.gamma_ci95[0] < 0.43 < fit.gamma_ci95[1] and fit.gamma_ci95[1] - fit.gamma_ci95[0] > 0.01
    assert analysis.power_law_fit(steps, [1.0, 0.1, 0.02, 0.5, 0.02, 0.5, 0.02], 100).poor
    assert analysis.transition_step(steps, [0.5] * len(steps)) is None


@pytest.mark.parametrize("attention", ["routed", "sdpa"])
def test_language_model_task_runs(tmp_path, attention):
    """--task lm with the plain transformer: bits per byte fall from log2(256) and the
    summary and config record what the run used (the corpus' Python version too)."""
    args = train.build_parser().parse_args(
        ["--task", "lm", "--model", "transformer", "--attention", attention, "--device", "cpu", "--no-progress",
         "--steps", "30", "--eval-every", "15", "--seq-len", "32", "--d-model", "32", "--heads", "2", "--layers", "2",
         "--batch-size", "8", "--eval-examples", "16", "--router-warmup", "10", "--target", "loss",
         "--out", str(tmp_path)])
    s = train.run(args)
    assert s["quality"] == "eval_bpb" and 0 < s["eval_bpb"] < 7.5 and "transfer" not in s
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["data"]["source"] == "python stdlib" and cfg["model_config"]["attention"] == attention
    bpb = [r["eval_bpb"] for r in read(tmp_path / "metrics.jsonl") if "eval_bpb" in r]
    assert bpb[-1] < bpb[0]


@pytest.mark.parametrize("bad, match", [(["--eval-every", "0"], "positive"), (["--steps", "-1"], "positive"),
                                        (["--task", "srcd", "--model", "transformer"], "--model cram"),
                                        (["--attention", "sdpa"], "--model transformer"),
                                        # the message named only --model, which was right here
                                        (["--task", "mqar", "--model", "transformer", "--attention", "sdpa",
                                          "--routing", "dense"], "--routing learned"),
                                        (["--init-like-dense"], "--model transformer --attention routed")])
def test_bad_flags_are_refused_up_front(tmp_path, bad, match):
    args = train.build_parser().parse_args(TINY + ["--out", str(tmp_path)] + bad)
    with pytest.raises(ValueError, match=match):
        train.run(args)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_router_warmup_longer_than_the_run_warns(tmp_path, capsys):
    train.run(train.build_parser().parse_args(TINY + ["--steps", "3", "--eval-every", "3", "--no-transfer",
                                                      "--out", str(tmp_path)]))
    assert "the router never trains" in capsys.readouterr().err


def test_redundancy_probe_reads_kept_checkpoints(tmp_path):
    """--keep-checkpoints keeps one file per checkpoint; the probe reports, per checkpoint and
    layer, fractions in [0, 1] that grow with the tolerance."""
    from cram_ext import probe

    train.run(train.build_parser().parse_args(
        ["--task", "mqar", "--model", "transformer", "--attention", "sdpa", "--device", "cpu", "--no-progress",
         "--steps", "20", "--ckpt-every", "10", "--keep-checkpoints", "--eval-every", "10", "--seq-len", "32",
         "--num-kv-pairs", "4", "--vocab-size", "64", "--d-model", "32", "--heads", "2", "--layers", "2",
         "--batch-size", "8", "--eval-examples", "16", "--no-transfer", "--out", str(tmp_path)]))
    assert (tmp_path / "checkpoint-10.pt").exists() and (tmp_path / "checkpoint-20.pt").exists()
    assert probe.main([str(tmp_path), "--examples", "32", "--tol", "0.1", "0.5"]) == 0
    result = json.loads((tmp_path / "probe.json").read_text())
    assert [s["step"] for s in result["steps"]] == [10, 20]
    for s in result["steps"]:
        assert len(s["layers"]) == 2
        for layer in s["layers"]:
            assert 0.0 <= layer["0.1"] <= layer["0.5"] <= 1.0
    # A routed run's layer output is the semantic memory's at unrouted tokens: refused.
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_config"]["attention"] = "routed"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.RunError, match="dense"):
        probe.probe_run(tmp_path, [0.1])


def test_load_run_and_mqar_breakdown(tmp_path):
    """cram_ext.load_run rebuilds a transformer run's model (routing as in the trainer's last
    evaluation, on the same examples); the MQAR breakdown's kinds cover every token of every layer."""
    import cram_ext

    args = train.build_parser().parse_args(
        ["--task", "mqar", "--model", "transformer", "--device", "cpu", "--no-progress", "--steps", "6",
         "--eval-every", "3", "--seq-len", "32", "--num-kv-pairs", "4", "--vocab-size", "64", "--d-model", "32",
         "--heads", "2", "--layers", "2", "--batch-size", "8", "--eval-examples", "16", "--no-transfer",
         "--target", "loss", "--router-warmup", "2", "--out", str(tmp_path)])
    s = train.run(args)
    model, cfg = cram_ext.load_run(tmp_path)
    assert isinstance(model, cram_ext.TransformerLM) and not model.training and cfg["target"] == "loss"
    b = analysis.routing_breakdown(tmp_path, examples=16)
    assert len(b["layers"]) == 2 and b["utilization"] == b["layers"][0]["utilization"]
    kinds = ("novel_query", "recurring_query", "context_key", "context_value", "other")
    for layer in b["layers"]:
        assert sum(layer[k]["tokens_per_seq"] for k in kinds) == pytest.approx(32)
        assert sum(layer[k]["routed_per_seq"] for k in kinds) == pytest.approx(32 * layer["utilization"])
    assert s["utilization_end"] == pytest.approx(sum(layer["utilization"] for layer in b["layers"]) / 2, abs=1e-6)


def test_init_like_dense_shares_the_dense_models_draws():
    """--init-like-dense: the routed TransformerLM's parameters that the dense one has are the dense
    run's (same seed), the random state after the build is the dense run's, and without the flag
    they are not (the router's draws come first)."""
    from cram_ext.models.build import build_model

    def built(*flags):
        args = train.build_parser().parse_args(["--task", "mqar", "--model", "transformer", *flags])
        torch.manual_seed(3)
        shape = {"vocab_size": 40, "max_len": 32}
        net, _ = build_model(args, shape, {})
        return net.state_dict(), torch.random.get_rng_state()

    dense, dense_rng = built("--attention", "sdpa")
    like, like_rng = built("--init-like-dense")
    plain, _ = built()
    assert dense.keys() < like.keys()
    assert all(torch.equal(dense[k], like[k]) for k in dense)
    assert torch.equal(dense_rng, like_rng)
    assert not all(torch.equal(dense[k], plain[k]) for k in dense if k.endswith("weight"))


def test_layer_memory_flag(tmp_path):
    """--memory alone is the gated scan, --memory metaplastic the metaplastic memory, inside each
    RoutedAttention; a run whose config.json holds the flag's older on/off value (true) resumes
    under --memory."""
    parser = train.build_parser()
    assert parser.parse_args(["--memory"]).memory == "scan"
    assert parser.parse_args(["--no-memory"]).memory is False
    args = parser.parse_args(
        ["--task", "lm", "--model", "transformer", "--layers", "1", "--d-model", "32", "--heads", "2", "--seq-len",
         "32", "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--eval-examples", "4", "--device", "cpu",
         "--no-progress", "--router-warmup", "1", "--memory", "metaplastic", "--out", str(tmp_path)])
    train.run(args)
    model, _ = checkpoint.load_run(tmp_path)
    assert type(model.blocks[0].attn.memory).__name__ == "MetaplasticMemory"
    assert checkpoint.mismatches({"memory": True}, {"memory": "scan"}) == []
    assert checkpoint.mismatches({"memory": True}, {"memory": "metaplastic"}) == ["--memory: 'scan' -> 'metaplastic'"]
