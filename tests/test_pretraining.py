"""Public pre-training, then private fine-tuning: what trains, and the checkpoint the federation starts from."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from shared_models.models import registry


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["hafnet", "sfer_mdfae"])
def test_freezing_leaves_exactly_the_chosen_parameters_trainable(name: str) -> None:
    model = registry.build(name, preset="dp")
    names = [n for n, _ in model.named_parameters()]
    outside = {n for n in names if not n.startswith("backbone.")}
    norms = {f"{m}.{p}" for m, module in model.named_modules() if isinstance(module, (nn.GroupNorm, nn.LayerNorm))
             for p, _ in module.named_parameters(recurse=False)}
    if name == "hafnet":
        last = {n for n in names if n.startswith("backbone.layer4.")}
    else:   # IR50 dp preset: units (1, 2, 2, 1) -> the last stage is body unit 5
        last = {n for n in names if n.startswith("backbone.body.5.")}
    assert last and outside and norms - outside

    counts = registry.freeze_for_finetuning(model, "last")
    assert _trainable(model) == outside | last
    assert counts == {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
    registry.freeze_for_finetuning(model, "norms+head")
    assert _trainable(model) == outside | norms
    assert not any(".conv" in n and n.startswith("backbone.") for n in _trainable(model))
    registry.freeze_for_finetuning(model, "all")
    assert _trainable(model) == set(names)
    with pytest.raises(ValueError, match="train.trainable must be one of"):
        registry.freeze_for_finetuning(model, "first")


def test_frozen_parameters_do_not_move_under_dp_sgd() -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from shared_models.config import load_config

    cfg = load_config(overrides=["train.trainable=norms+head", "model.preset=dp"])
    model = registry.build_from_config(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = GradSampleModule(model)
    optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), noise_multiplier=1.0, max_grad_norm=1.0,
                            expected_batch_size=4)
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    optimizer.zero_grad()
    registry.per_sample_loss(wrapped, wrapped(x), y).mean().backward()
    optimizer.step()
    wrapped._close()
    for n, p in model.named_parameters():
        moved = not torch.equal(before[n], p.detach())
        assert moved == p.requires_grad, n


TINY = ["federation.schools=1", "data.students_per_school=2", "data.frames_per_student=2", "data.public_students=2",
        "data.public_frames=7", "data.public_train_students=4", "data.public_train_frames=7", "data.heldout_students=1",
        "data.image_size=32", "pretrain.batch_size=8", "pretrain.epochs=1", "evaluation.bootstrap=10", "model.preset=dp"]


def test_simulate_pretrains_once_and_builds_the_schools_beside_it(tmp_path, monkeypatch, capsys) -> None:
    """model.pretrain=auto in `fedfer simulate`: the public part first; the checkpoint's path is named before
    it is trained (the run directory's config records it; Flower starts meanwhile), then pre-training (one
    thread) with the schools built in a child process on the other core; a second run finds the checkpoint
    and builds nothing."""
    from fedfer.commands.simulate import _pretrain_auto, _pretrain_now
    from shared_models.config import load_config
    from simulations import synth

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(overrides=[*TINY, "federation.schools=2", f"data.root={tmp_path / 'data'}"])
    code, pending = _pretrain_auto(cfg)
    assert code == 0 and pending is not None
    assert cfg["model.pretrained"] == str(pending.path) and not pending.path.exists()
    assert _pretrain_now(cfg, pending) == 0
    printed = capsys.readouterr().out
    assert "in the background while pre-training" in printed and "schools built" in printed
    first = cfg["model.pretrained"]
    assert registry.pretrained_provenance(first)["format"] == "fedfer-pretrained/1"
    for school in ("school-00", "school-01"):   # the child finished every school before _pretrain_now returned
        assert (tmp_path / "data" / "schools" / school / "school.json").is_file()
    assert synth.ensure_for_config(cfg, echo=lambda line: pytest.fail(f"rebuilt: {line}")) == tmp_path / "data"

    again = load_config(overrides=[*TINY, "federation.schools=2", f"data.root={tmp_path / 'data'}"])
    assert _pretrain_auto(again) == (0, None) and again["model.pretrained"] == first
    printed = capsys.readouterr().out
    assert "pre-trained model (cached)" in printed and "background" not in printed


def test_pretrain_writes_a_checkpoint_that_model_pretrained_loads_with_provenance(tmp_path, capsys) -> None:
    from fedfer.cli import main
    from server.run import start_or_resume
    from shared_models.config import load_config

    out = tmp_path / "public.pt"
    data = tmp_path / "data"
    assert main(["pretrain", "--data-root", str(data), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"pre-trained checkpoint: {out}" in printed and "synthetic-indomain" in printed
    # outside a deployment folder the next step is the simulation's (`--for deploy`: tests below)
    assert f"next: fedfer simulate model.pretrained={out}\n" in printed
    # the same folder with other settings is refused, not rebuilt over (a deployment's schools may read it)
    manifest = (data / "manifest.json").read_bytes()
    assert main(["pretrain", "--data-root", str(data), "--out", str(tmp_path / "other.pt"), *TINY,
                 "federation.schools=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other settings (schools: was" in err, err
    assert (data / "manifest.json").read_bytes() == manifest and not (tmp_path / "other.pt").exists()

    provenance = registry.pretrained_provenance(out)
    assert provenance["format"] == "fedfer-pretrained/1" and provenance["epochs"] == 1
    assert provenance["images"] == 4 * 7 and provenance["steps"] == 4   # 28 train_ faces, batches of 8
    assert [d["spec"] for d in provenance["data"]] == ["synthetic-rafdb:train"]
    assert provenance["data"][0]["split"] == "train" and len(provenance["data"][0]["fingerprint"]) == 64
    assert provenance["config"]["model.preset"] == "dp" and len(provenance["inputs_hash"]) == 16
    saved = torch.load(out, weights_only=True)["state_dict"]

    cfg = load_config(overrides=[*TINY, f"model.pretrained={out}", f"run.root={tmp_path / 'runs'}",
                                 f"data.root={data}"])
    start = start_or_resume(cfg)
    for name, tensor in start.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    events = [json.loads(line) for line in start.run.events_path.read_text().splitlines()]
    loaded = next(e for e in events if e["event"] == "pretrained")
    assert loaded["matched"] == len(saved) and loaded["missing"] == 0
    assert loaded["provenance"]["weights_sha256"] == provenance["weights_sha256"]

    other = load_config(overrides=[*TINY, f"model.pretrained={out}", "model.preset=cpu",
                                   f"run.root={tmp_path / 'runs'}"])
    with pytest.raises(ValueError, match="pre-trained for model.preset=dp, the run builds model.preset=cpu"):
        start_or_resume(other)


def test_pretrain_copies_the_checkpoint_the_cache_holds_for_the_same_inputs(tmp_path, monkeypatch, capsys) -> None:
    """The deployment trial's `fedfer pretrain --out data/pretrained.pt` retrained for minutes the checkpoint the
    demo had cached under the same inputs hash; now it copies it (scored, as a trained one is) unless --retrain."""
    from fedfer.cli import main
    from simulations import pretrain

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data = tmp_path / "data"
    assert main(["pretrain", "--data-root", str(data), *TINY]) == 0   # no --out: into the cache
    cached = registry.pretrained_provenance(next((tmp_path / "cache" / "fedfer" / "pretrained").glob("*.pt")))
    capsys.readouterr()

    trained = []
    real = pretrain._train_with_threads
    monkeypatch.setattr(pretrain, "_train_with_threads", lambda *a, **k: trained.append(1) or real(*a, **k))
    out = tmp_path / "deploy" / "pretrained.pt"
    assert main(["pretrain", "--data-root", str(data), "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert not trained and "not trained again; --retrain trains it anew" in printed, printed
    assert "synthetic-indomain" in printed   # scored like a checkpoint trained now
    copied = registry.pretrained_provenance(out)
    assert copied["weights_sha256"] == cached["weights_sha256"] and copied["inputs_hash"] == cached["inputs_hash"]
    assert set(copied["evaluation"]) == {"synthetic-fer2013", "synthetic-indomain"}

    assert main(["pretrain", "--data-root", str(data), "--out", str(out), "--retrain", *TINY]) == 0
    assert trained == [1] and "not trained again" not in capsys.readouterr().out


def test_data_synth_prints_a_row_for_every_school(tmp_path, capsys) -> None:
    """`fedfer data synth` printed its manifest as JSON cut at 2,000 characters: from ten schools on it stopped
    mid-school, mid-string. Now the table `synth.summary` makes: every school, then the public split."""
    from fedfer.cli import main

    assert main(["data", "synth", "--out", str(tmp_path / "data"), *TINY, "federation.schools=12"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("school-", "public"))]
    assert rows == [f"school-{i:02d}" for i in range(12)] + ["public"], out


def test_simulate_does_not_say_it_builds_schools_that_are_built(tmp_path, monkeypatch, capsys) -> None:
    """`fedfer simulate model.name=sfer_mdfae` after the default demo: the schools were cached, yet it printed
    "building the 10 schools in the background while pre-training" and, 750 s later, "schools built"."""
    from fedfer.commands.simulate import _pretrain_auto, _pretrain_now
    from shared_models.config import load_config
    from simulations import synth

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = load_config(overrides=[*TINY, "federation.schools=2", f"data.root={tmp_path / 'data'}"])
    synth.ensure_for_config(cfg, echo=lambda line: None)   # every school built before the run
    assert synth.schools_built(cfg)
    started = []
    monkeypatch.setattr(synth, "start_building_schools", lambda cfg: started.append(cfg))
    code, pending = _pretrain_auto(cfg)
    assert code == 0 and pending is not None and _pretrain_now(cfg, pending) == 0
    printed = capsys.readouterr().out
    assert not started and "building" not in printed and "schools built" not in printed, printed
    assert "pre-trained model: " in printed


@pytest.fixture
def pretrain_without_training(monkeypatch, tmp_path, capsys):
    """`fedfer pretrain` with the training replaced by a provenance: what is under test is the closing line."""
    from simulations import pretrain

    monkeypatch.setattr(pretrain, "data_specs", lambda cfg, root: [])
    monkeypatch.setattr(pretrain, "cached_checkpoint", lambda cfg, root, data=None: tmp_path / "cache.pt")
    monkeypatch.setattr(pretrain, "reuse_cached", lambda *a, **k: None)
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: {"images": 1, "epochs": 1, "steps": 1, "final_loss": 1.0,
                                                               "seconds": 0.0, "inputs_hash": "x"})

    def run(folder, *args: str) -> str:
        from fedfer.cli import main

        monkeypatch.chdir(folder)
        assert main(["pretrain", "--benchmark", "fer2013:train=/nowhere.csv", "--no-evaluate",
                     "--out", "data/pretrained.pt", *args]) == 0
        return capsys.readouterr().out.strip().splitlines()[-1]
    return run


@pytest.mark.parametrize("given", [[], ["--for", "simulate"]])
def test_pretrain_next_line_for_a_simulation(pretrain_without_training, tmp_path, given) -> None:
    assert pretrain_without_training(tmp_path, *given) == "next: fedfer simulate model.pretrained=data/pretrained.pt"


def test_pretrain_next_line_in_the_deployment_trial_before_init(pretrain_without_training, tmp_path) -> None:
    # docs/deployment.md's trial pre-trains before `fedfer deploy init`: the next step is the deployment, and the
    # checkpoint must be named absolute (the ServerApp runs in deploy/coordinator/), never `fedfer simulate`
    line = pretrain_without_training(tmp_path, "--for", "deploy")
    assert line == (f"next: fedfer deploy init --coordinator HOST, add the schools and the evaluator, then give every "
                    f"run -c 'model.pretrained=\"{tmp_path / 'data' / 'pretrained.pt'}\"' (docs/deployment.md)")


@pytest.mark.parametrize("given", [[], ["--for", "deploy"]])
def test_pretrain_next_line_where_a_deployment_exists(pretrain_without_training, tmp_path, given) -> None:
    # a folder that holds a deployment: the next step is its `flwr run`, with its keyring
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "deployment.json").write_text("{}")
    line = pretrain_without_training(tmp_path, *given)
    assert line == (f"next: flwr run . fedfer --stream -c 'privacy.keyring=\"{tmp_path / 'deploy' / 'keys'}\" "
                    f"model.pretrained=\"{tmp_path / 'data' / 'pretrained.pt'}\"' with the run's other settings "
                    "(docs/deployment.md §3)")


def test_pretrain_for_simulate_keeps_the_simulate_line_in_a_deployment_folder(pretrain_without_training, tmp_path) -> None:
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "deployment.json").write_text("{}")
    assert pretrain_without_training(tmp_path, "--for", "simulate").startswith("next: fedfer simulate ")
