"""Transfer-learning baseline: fine-tuning (metalearn/algorithms/finetune.py), pre-training
(metalearn/transfer/pretrain.py), the runner and its ablation/CLI plumbing.

Fast tests use a random float64 conv4 and uint8 noise images; the `slow` ones train on real Omniglot."""
import json

import pytest
import torch

from metalearn.algorithms.finetune import FineTune, episode_generator
from metalearn.config import load_config
from metalearn.data import fixed_episodes
from metalearn.errors import MetalearnError
from metalearn.evaluation import evaluate
from metalearn.models import Conv4
from metalearn.transfer.pretrain import ImageBatches, augment

from conftest import REPO

PRESET = str(REPO / "experiments" / "configs" / "pretrain_omniglot.yaml")

SETTINGS = {
    "head": dict(blocks=0),
    "top2-adam-wd": dict(blocks=2, optimizer="adam", weight_decay=0.05),
    "all-cosine-proto": dict(blocks=4, head="cosine", head_init="prototype"),
    "top1-lora": dict(blocks=1, lora_rank=2, lora_alpha=4.0),
    "all-lora-zero": dict(blocks=4, lora_rank=1, head_init="zero"),
}


def make_model(seed=0, classes=30):
    torch.manual_seed(seed)
    m = Conv4(1, classes, hidden=8).double()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return m


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (20, 10, 1, 28, 28), generator=g, dtype=torch.uint8)


def episodes(count=6, batch_size=6, shots=2, seed=1):
    return list(fixed_episodes(images(), 5, shots, 3, count=count, seed=seed, batch_size=batch_size,
                               dtype=torch.float64))


@pytest.mark.parametrize("kw", SETTINGS.values(), ids=SETTINGS.keys())
def test_batched_fine_tuning_equals_one_episode_at_a_time(kw):
    """Logits of every query example after fine-tuning: batched path == per-episode reference, float64."""
    model = make_model()
    ft = FineTune(model, inner_lr=0.2, inner_steps=4, **kw)
    batch = episodes()[0]
    fast, hs, hq = ft.batched_adapt(batch, steps=4, lr=0.2)
    batched = ft._batched_predict(fast, hq, batch.num_tasks)
    for t in range(batch.num_tasks):
        ref = ft.predict(ft.adapt_episode(batch.support.task(t), batch.ways, steps=4, lr=0.2), batch.query.x[t])
        torch.testing.assert_close(batched[t], ref, rtol=1e-10, atol=1e-10)
    # fine-tuning moved the logits (the comparison is not between two untouched heads)
    still = ft.predict(ft.adapt_episode(batch.support.task(0), batch.ways, steps=0, lr=0.2), batch.query.x[0])
    assert (still - batched[0]).abs().max() > 1e-3
    loop = FineTune(model, inner_lr=0.2, inner_steps=4, execution="loop", **kw)
    assert torch.equal(ft.evaluate_batch(batch), loop.evaluate_batch(batch))
    assert torch.equal(ft.take_support(), loop.take_support())


@pytest.mark.parametrize("execution", ["loop", "batched"])
def test_frozen_layers_stay_bit_identical(execution):
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ft = FineTune(model, inner_lr=0.5, inner_steps=5, blocks=1, execution=execution)
    ft.evaluate_batch(episodes()[0])
    for n, p in model.named_parameters():  # the pre-trained weights themselves never move
        assert torch.equal(p, before[n]), n
    fast = ft.adapt_episode(episodes()[0].support.task(0), 5, steps=5, lr=0.5)
    moved = {n for n in before if not n.startswith("head.") and not torch.equal(fast[n], before[n])}
    assert moved and all(n.startswith("features.3.") for n in moved)  # only the unfrozen top block
    lora = FineTune(model, inner_lr=0.5, inner_steps=5, blocks=2, lora_rank=2, execution=execution)
    fast = lora.adapt_episode(episodes()[0].support.task(0), 5, steps=5, lr=0.5)
    for n in before:  # LoRA: every base tensor frozen except the unfrozen blocks' 1-dim ones (biases, BatchNorm)
        if not n.startswith("head.") and (before[n].dim() >= 2 or not n.startswith(("features.2.", "features.3."))):
            assert torch.equal(fast[n], before[n]), n
    merged = lora.lora.merge(fast)
    assert not torch.equal(merged["features.3.conv.weight"], before["features.3.conv.weight"])
    assert torch.equal(merged["features.1.conv.weight"], before["features.1.conv.weight"])


@pytest.mark.parametrize("execution", ["loop", "batched"])
def test_no_leakage_between_episodes(execution):
    """Each episode starts from the same weights and its own fresh head: alone == inside a batch, any order,
    any batch size; evaluating twice gives the same result."""
    model = make_model()
    ft = FineTune(model, inner_lr=0.3, inner_steps=3, blocks=2, execution=execution)
    imgs = images()

    def run(batch_size):
        res = evaluate(ft, imgs, ways=5, shots=2, query_shots=3, episodes=7, seed=4, inner_steps=3, inner_lr=0.3,
                       batch_size=batch_size, dtype=torch.float64)
        return res.accuracies, ft.take_support().tolist()

    whole = run(7)
    assert run(1) == whole and run(3) == whole and run(7) == whole
    batch = next(fixed_episodes(imgs, 5, 2, 3, count=7, seed=4, batch_size=7, dtype=torch.float64))
    rev = torch.arange(6, -1, -1)
    from metalearn.types import Examples, TaskBatch
    flipped = TaskBatch(Examples(batch.support.x[rev], batch.support.y[rev]),
                        Examples(batch.query.x[rev], batch.query.y[rev]),
                        batch.ways, batch.shots, batch.query_shots)
    assert ft.evaluate_batch(flipped).tolist() == whole[0][::-1]


def test_fresh_head_is_seeded_by_the_episode_only():
    model = make_model()
    ft = FineTune(model, inner_lr=0.1, inner_steps=1)
    b = episodes()[0]
    z = torch.zeros(1, ft.feature_dim(), dtype=torch.float64)
    h0 = ft.fresh_head(z, b.support.y[0], 5, episode_generator(b.support.x[0], b.support.y[0], 0))
    again = ft.fresh_head(z, b.support.y[0], 5, episode_generator(b.support.x[0].clone(), b.support.y[0], 0))
    other = ft.fresh_head(z, b.support.y[1], 5, episode_generator(b.support.x[1], b.support.y[1], 0))
    seeded = ft.fresh_head(z, b.support.y[0], 5, episode_generator(b.support.x[0], b.support.y[0], 1))
    assert torch.equal(h0["head.weight"], again["head.weight"]) and torch.equal(h0["head.bias"], again["head.bias"])
    assert not torch.equal(h0["head.weight"], other["head.weight"])
    assert not torch.equal(h0["head.weight"], seeded["head.weight"])
    bound = 1 / ft.feature_dim() ** 0.5
    assert h0["head.weight"].shape == (5, ft.feature_dim()) and h0["head.weight"].abs().max() <= bound


def test_non_transductive_scoring_and_adapted_sizes():
    model = make_model()
    full = FineTune(model, inner_lr=0.3, inner_steps=2, blocks=4)
    acc = full.evaluate_batch(episodes()[0], transductive=False)
    assert acc.shape == (6,) and full.take_support().shape == (6,)
    lora = FineTune(model, inner_lr=0.3, inner_steps=2, blocks=4, lora_rank=1)
    D = model.head.weight.shape[1]
    body = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("head."))
    assert full.adapted_size(5)["parameters"] == body + 5 * D + 5
    assert lora.adapted_size(5)["parameters"] < full.adapted_size(5)["parameters"]
    assert lora.adapted_size(5)["body_full"] == body


def test_finetune_is_an_adapter_and_bad_settings_are_errors():
    """Fine-tuning is an evaluation-time adapter: declared not meta-trained, so there is no meta-step to run."""
    from metalearn.algorithms.registry import capabilities
    from metalearn.engine import Engine

    model = make_model()
    assert not capabilities("finetune").meta_trained
    with pytest.raises(MetalearnError, match="not meta-trained"):
        Engine(FineTune(model, inner_lr=0.1, inner_steps=1)).meta_step(episodes()[0])
    with pytest.raises(MetalearnError, match="blocks=5"):
        FineTune(model, inner_lr=0.1, inner_steps=1, blocks=5)
    for bad, match in [("transfer.head=knn", "transfer.head"), ("transfer.optimizer=rmsprop", "transfer.optimizer"),
                       ("transfer.pretrain.augment=[solarize]", "augment"), ("transfer.blocks=-1", "transfer.blocks")]:
        with pytest.raises(MetalearnError, match=match):
            load_config(None, ["outer.algorithm=finetune", bad])
    with pytest.raises(MetalearnError, match="head_init=zero"):
        load_config(None, ["transfer.head=cosine", "transfer.head_init=zero"])


def test_image_batches_cover_each_epoch_and_resume_exactly():
    b = ImageBatches(10, 4, seed=3)
    first = torch.cat([b.next() for _ in range(5)])  # 20 indices = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))
    state = b.state_dict()
    ahead = [b.next() for _ in range(4)]
    c = ImageBatches(10, 4, seed=99)
    c.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(ahead, [c.next() for _ in range(4)]))


def test_augment_crop_and_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    flipped = augment(x, ["flip"], g)
    for i in range(6):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(-1))
    cropped = augment(x, ["crop"], g)
    assert cropped.shape == x.shape
    for i in range(6):  # a shifted window of the zero-padded image: some shift reproduces it
        xp = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        assert any(torch.equal(cropped[i], xp[:, dy:dy + 16, dx:dx + 16]) for dy in range(5) for dx in range(5))


# --- real data: pre-train + fine-tune, CLI, ablation ---------------------------------------------
def _cfg(tmp_path, *extra):
    return load_config(PRESET, [
        f"tracking.out_dir={tmp_path}", "tracking.name=run", "tracking.progress=false", "model.hidden=32",
        "eval.val_every=0", "threads=2", *extra])


@pytest.mark.slow
def test_short_pretraining_then_fine_tuning_beats_chance_on_omniglot(tmp_path, omniglot, data_root, cache_dir):
    """300 pre-training steps (hidden 32), head-only fine-tuning, 100 fixed 5-way 1-shot test episodes:
    the 95% CI's lower end must clear chance (20%) by 25 points (measured: 74.7 ± 2.6%)."""
    from metalearn.transfer import pretrain

    cfg = _cfg(tmp_path, f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}",
               "transfer.pretrain.steps=300", "eval.episodes=100")
    summary = pretrain(cfg)
    ev = summary["eval"]
    assert ev["mean"] - ev["ci95"] > 0.20 + 0.25, ev["mean"]
    assert ev["support_mean"] >= ev["mean"]  # fitted the support set at least as well as the query set
    saved = json.loads((tmp_path / "run" / "eval-test.json").read_text())
    assert saved["eval"]["accuracies"] == ev["accuracies"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/accuracy"] for r in rows if "train/accuracy" in r]
    assert len(train) == 6 and train[-1] > train[0]  # logged every 50 steps, and it learned
    assert rows[-1]["test/accuracy"] == ev["mean"]


@pytest.mark.slow
def test_cli_pretrain_eval_and_ablation_share_the_initial_weights(tmp_path, omniglot, data_root, cache_dir, capsys):
    from metalearn.ablate import load_ablation, run_ablation
    from metalearn.cli import main

    common = [f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}", "model.hidden=16",
              "transfer.pretrain.steps=20", "eval.episodes=10", "tracking.progress=false", "eval.inner_steps=5"]
    assert main(["pretrain", PRESET, *common, f"tracking.out_dir={tmp_path}",
                 "tracking.name=cli"]) == 0
    out = capsys.readouterr().out
    assert "support accuracy" in out and (tmp_path / "cli" / "checkpoint.pt").is_file()
    assert main(["train", PRESET, *common, f"tracking.out_dir={tmp_path}", "tracking.name=via-train"]) == 0
    via_train = json.loads((tmp_path / "via-train" / "eval-test.json").read_text())["eval"]
    via_pretrain = json.loads((tmp_path / "cli" / "eval-test.json").read_text())["eval"]
    assert via_train["accuracies"] == via_pretrain["accuracies"]
    assert main(["eval", str(tmp_path / "cli"), "--episodes", "5", "--ways", "3", "--no-progress",
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval"]["ways"] == 3  # a fresh head of any width
    assert main(["pretrain", PRESET, *common, "transfer.blocks=9",
                 f"tracking.out_dir={tmp_path}", "tracking.name=bad"]) == 2
    assert "transfer.blocks=9" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    spec = tmp_path / "abl.yaml"
    spec.write_text(f"description: blocks\nbase: {PRESET}\n"
                    "overrides: [" + ", ".join(common) + "]\n"
                    "vary:\n  transfer.blocks: [0, 4]\n  inner.lora_rank: [0, 2]\n")
    report = run_ablation(load_ablation(spec, seeds=1, out_dir=tmp_path / "abl"), progress=False)
    inits = sorted(p.name for p in (tmp_path / "abl" / "abl").iterdir() if p.name.startswith("_init"))
    assert len(inits) == 1  # four cells, one pre-training run
    table = (tmp_path / "abl" / "abl" / "table.md").read_text()
    assert "support accuracy (%)" in table and "adapted parameters" in table
    sizes = {(c["values"]["transfer.blocks"], c["values"]["inner.lora_rank"]): c["adapted_parameters"]
             for c in report["cells"]}
    assert sizes[(0, 0)] == sizes[(0, 2)] < sizes[(4, 2)] < sizes[(4, 0)]
    for c in report["cells"]:
        assert 0 <= c["mean"] <= 1 and 0 <= c["support_mean"] <= 1


@pytest.mark.slow
def test_maml_initialisation_then_fine_tuning(tmp_path, omniglot, data_root, cache_dir):
    from metalearn.transfer import run_transfer

    cfg = _cfg(tmp_path, f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}", "model.hidden=16",
               "transfer.init=maml", "outer.iterations=5", "outer.meta_batch_size=2", "inner.steps=1",
               "eval.episodes=10", "eval.inner_steps=5", "checkpoint.every=0")
    summary = run_transfer(cfg)
    assert "_init-maml-" in summary["init"] and summary["step"] == 5
    assert (tmp_path / "run" / "eval-test.json").is_file() and summary["eval"]["episodes"] == 10


@pytest.mark.slow
def test_interrupted_pretraining_resumes_bit_identically(tmp_path, omniglot, data_root, cache_dir, monkeypatch):
    """SIGINT at step 7 of 16 (augmentation on): checkpoint, stop; --resume ends with the same weights as an
    uninterrupted run."""
    import signal

    from metalearn.checkpoint import load_checkpoint
    from metalearn.transfer import pretrain

    extra = [f"data.root={data_root / 'omniglot'}", f"data.cache_dir={cache_dir}", "model.hidden=16",
             "transfer.pretrain.steps=16", "transfer.pretrain.batch_size=16", "transfer.pretrain.augment=[crop]",
             "checkpoint.every=5", "tracking.log_every=4"]
    whole = pretrain(_cfg(tmp_path / "a", *extra), final_eval=False)
    calls = {"n": 0}
    original = ImageBatches.next

    def next_with_signal(self):
        calls["n"] += 1
        if calls["n"] == 7:
            signal.raise_signal(signal.SIGINT)
        return original(self)

    monkeypatch.setattr(ImageBatches, "next", next_with_signal)
    cut = pretrain(_cfg(tmp_path / "b", *extra), final_eval=False)
    assert cut["interrupted"] == "SIGINT" and cut["step"] == 7
    monkeypatch.setattr(ImageBatches, "next", original)
    resumed = pretrain(_cfg(tmp_path / "b", *extra), resume=True, final_eval=False)
    assert resumed["step"] == whole["step"] == 16
    a, b = load_checkpoint(tmp_path / "a" / "run"), load_checkpoint(tmp_path / "b" / "run")
    for n in a["model"]:
        assert torch.equal(a["model"][n], b["model"][n]), n
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 16]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fine_tuning_rule_with_weight_decay_equals_torch_optim(optimizer):
    """Head-only fine-tuning = torch.optim.SGD / Adam(betas 0.9, 0.999) with weight_decay on the same fresh head."""
    model = make_model()
    ft = FineTune(model, inner_lr=0.05, inner_steps=4, optimizer=optimizer, weight_decay=0.1)
    sup = episodes()[0].support.task(2)
    fast = ft.adapt_episode(sup, 5, steps=4, lr=0.05)
    with torch.no_grad():
        z = ft.embed(dict(model.named_parameters()), sup.x)
    head = ft.fresh_head(z, sup.y, 5, episode_generator(sup.x, sup.y, 0))
    w = {n: t.clone().requires_grad_(True) for n, t in head.items()}
    opt = (torch.optim.SGD(w.values(), lr=0.05, weight_decay=0.1) if optimizer == "sgd"
           else torch.optim.Adam(w.values(), lr=0.05, betas=(0.9, 0.999), weight_decay=0.1))
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(z @ w["head.weight"].t() + w["head.bias"], sup.y).backward()
        opt.step()
    for n in w:
        torch.testing.assert_close(fast[n], w[n].detach(), rtol=1e-12, atol=1e-12)
