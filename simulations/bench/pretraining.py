"""What public pre-training and the federation add: public test and in-domain held-out accuracy of

    (a) the pre-trained model alone (public data only, no school data),
    (b) a centralised, non-private model fine-tuned on the pooled schools from the same pre-training,
    (F) the federation: every school fine-tunes under student-level DP, FedAvg(M), for each
        `--trainable` choice (all | last | norms+head), and
    (c) each school fine-tuning alone under the same DP (the reason to federate),

    python -m simulations.bench.pretraining [--rounds 8] [--trainable all,norms+head] [--alone 3]
        [--central-epochs 3] [--subspace K] [--tail 3] [--interpolate 0.5,0.75] [--local-last]
        [--server-opt avgm|adam|yogi --server-lr 0.01] [--out benchmarks/pretraining.json] [key=value ...]

The start is `model.pretrained` if set, else the cached `model.pretrain=auto` checkpoint (trained if absent).
In one process, like simulations/tune_inprocess.py: each school trains with the same DP planning and
trainer as the ClientApp (σ calibrated so `--rounds` rounds end at privacy.target_epsilon), one after
another; the server step is FedAvgM with uniform school weights (or FedAdam / FedYogi). No Flower, ledger or budget guard, so
its wall time is not the demo's (`fedfer simulate` is). In-domain accuracy is on every school's
held-out students (`synthetic-indomain`, never trained on); per school for (c). Prints a table and
writes JSON with the command and the resolved config.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from privacy.engine import AfterNoise, LossFn
from shared_models.config import ConfigError, load_config
from shared_models.datasets.school_folder import SchoolData, load_school
from shared_models.models import registry
from simulations import synth
from simulations.bench.results import write_result
from simulations.references import INDOMAIN, PUBLIC, Scorer, fedavgm, train_central
from simulations.references import server_step as _server_step
from simulations.references import dp_round as _dp_round
from simulations.references import model_from as _model


def dp_round(model: torch.nn.Module, school: SchoolData, cfg: Mapping[str, Any], seed: int,
             after_noise: AfterNoise | None = None) -> tuple[float, int]:
    """One round of the school's DP-SGD (the ClientApp's planning and trainer); returns (σ, steps)."""
    result = _dp_round(model, school, cfg, seed, after_noise=after_noise)
    return result.noise_multiplier, int(result.steps)


def public_faces(cfg: Mapping[str, Any], root: Path, input_size: int, samples: int
                 ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`samples` faces of the public training split (run.seed picks them) as model inputs, their labels, and
    the split's spec: the public side information of `--subspace` and `--precondition`."""
    from shared_models.datasets import open_benchmark
    from shared_models.transforms import eval_transform

    spec = str(cfg["pretrain.benchmarks"]).split(",")[0].strip()
    public = open_benchmark(spec, data_root=root).as_torch(eval_transform(input_size))
    pick = torch.randperm(len(public), generator=torch.Generator().manual_seed(int(cfg["run.seed"])))[:samples]
    faces = [public[int(i)] for i in pick]
    return torch.stack([f[0] for f in faces]), torch.tensor([int(f[1]) for f in faces]), spec


class PublicSubspace:
    """`--subspace K`: each round's DP steps project their noised gradient onto the top-K directions of the
    public training faces' per-sample gradients at the round's starting model (privacy/public_subspace.py;
    post-processing, no privacy cost). `samples` public faces, drawn once."""

    def __init__(self, cfg: Mapping[str, Any], root: Path, input_size: int, dims: int, samples: int) -> None:
        self.images, self.labels, self.spec = public_faces(cfg, root, input_size, samples)
        self.dims = dims

    def hook(self, model: torch.nn.Module) -> AfterNoise:
        """The projection onto the subspace at `model`'s current weights."""
        from privacy.public_subspace import projection, public_gradient_basis
        from shared_models.training import per_sample_loss

        return projection(public_gradient_basis(model, self.images, self.labels, self.dims, per_sample_loss))

    def energy(self, model: torch.nn.Module, school: SchoolData, students: int = 300) -> dict[str, float]:
        """How much of a school's gradient the subspace at `model` holds: the share of the squared norm of the
        mean of `students` clipped (C = 1) student gradients, and the mean share of each student's, inside it."""
        from privacy.public_subspace import flat_gradient, public_gradient_basis, trained_parameters
        from shared_models.training import FaceDataset, per_sample_loss
        from shared_models.transforms import eval_transform

        basis = public_gradient_basis(model, self.images, self.labels, self.dims, per_sample_loss)
        frames = FaceDataset(school.images, school.labels, eval_transform(int(model.input_size)))
        ids = np.asarray(school.student_ids)
        params, rows = trained_parameters(model), []
        model.eval()
        for student in list(dict.fromkeys(ids.tolist()))[:students]:
            batch = [frames[int(i)] for i in np.flatnonzero(ids == student)]
            x, y = torch.stack([b[0] for b in batch]), torch.tensor([int(b[1]) for b in batch])
            g = flat_gradient(model, x, y, per_sample_loss, params)
            rows.append(g / max(1.0, float(g.norm())))
        grads = torch.stack(rows)
        mean = grads.mean(0)

        def inside(v: torch.Tensor) -> torch.Tensor:
            return (v @ basis.T).norm(dim=-1) ** 2 / v.norm(dim=-1) ** 2

        return {"mean_gradient": round(float(inside(mean)), 4), "per_student": round(float(inside(grads).mean()), 4),
                "students": len(rows), "random_subspace": round(self.dims / mean.numel(), 4)}


class PublicPreconditioner:
    """`--precondition P`: each round's DP steps scale their noised gradient coordinate by coordinate by
    (v + ε)^(-P/2), v the mean square of public training faces' clipped per-sample gradients at the round's
    starting model (side information from public data, as AdaDPS; Li et al. 2022), rescaled to mean 1 and
    clamped to [1/cap, cap]. Applied after the noise, so post-processing: no privacy cost. Measured on the
    default district in session 14 (docs/experiments.md): it lowers the federation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, power: float, cap: float = 10.0,
                 loss_fn: LossFn | None = None) -> None:
        from shared_models.training import per_sample_loss

        self.images, self.labels, self.power, self.cap = images, labels, power, cap
        self.loss_fn = loss_fn or per_sample_loss

    def scale(self, model: torch.nn.Module) -> torch.Tensor:
        """The per-coordinate factor at `model`'s current weights (one vector over the trained parameters)."""
        from privacy.public_subspace import flat_gradient, trained_parameters

        params, total = trained_parameters(model), None
        was_training = model.training
        model.eval()
        try:
            for x, y in zip(self.images, self.labels):
                g = flat_gradient(model, x[None], y.view(1), self.loss_fn, params).double()
                g = g / max(1.0, float(g.norm()))
                total = g ** 2 if total is None else total + g ** 2
        finally:
            model.train(was_training)
        v = total / len(self.labels)
        factor = (v + 1e-3 * v.mean()) ** (-self.power / 2)
        return (factor / factor.mean()).clamp(1.0 / self.cap, self.cap).to(torch.float32)

    def hook(self, model: torch.nn.Module) -> AfterNoise:
        """Multiply each trained parameter's noised gradient by its slice of the factor at `model`."""
        factor = self.scale(model)

        def precondition(params: list[torch.nn.Parameter]) -> None:
            offset = 0
            for p in params:
                n = p.numel()
                if p.grad is not None:
                    p.grad = p.grad * factor[offset:offset + n].view_as(p)
                offset += n

        return precondition


class PublicRehearsal:
    """`--rehearse K`: after the server's step, K plain (non-private) Adam steps on public training faces,
    to hold the public accuracy while the schools move the model towards the classroom. The server holds
    public data only, so this is post-processing of the schools' DP releases: no privacy cost. The momentum
    keeps only the schools' update (as Flower's FedAvgM would), so the rehearsal is not carried forward."""

    def __init__(self, cfg: Mapping[str, Any], images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float,
                 batch: int = 64) -> None:
        self.cfg, self.images, self.labels = cfg, images, labels
        self.steps, self.lr, self.batch = steps, lr, batch
        self.generator = torch.Generator().manual_seed(int(cfg["run.seed"]))

    def __call__(self, global_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]],
                 velocity: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
        from shared_models.training import per_sample_loss

        model = _model(self.cfg, fedavgm(global_state, states, velocity, momentum))
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=self.lr)
        model.train()
        for _ in range(self.steps):
            pick = torch.randint(len(self.labels), (self.batch,), generator=self.generator)
            optimizer.zero_grad()
            per_sample_loss(model, self.images[pick], self.labels[pick]).mean().backward()
            optimizer.step()
        model.eval()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


class ServerAdam:
    """`--server-opt adam|yogi`: FedAdam / FedYogi's server step (Reddi et al. 2021, "Adaptive Federated
    Optimization") on the uniform average of the schools' updates, with bias correction; post-processing of
    the schools' DP releases, so no privacy cost."""

    def __init__(self, lr: float, tau: float, yogi: bool = False, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        self.lr, self.tau, self.yogi, self.betas = lr, tau, yogi, betas
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t = 0

    def __call__(self, global_state: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]],
                 velocity: dict[str, torch.Tensor], momentum: float) -> dict[str, torch.Tensor]:
        self.t += 1
        return _server_step(global_state, states, self._adaptive)

    def _adaptive(self, key: str, delta: torch.Tensor) -> torch.Tensor:
        b1, b2 = self.betas
        m = b1 * self.m.get(key, torch.zeros_like(delta)) + (1 - b1) * delta
        v_old = self.v.get(key, torch.zeros_like(delta))
        v = (v_old - (1 - b2) * delta ** 2 * torch.sign(v_old - delta ** 2) if self.yogi
             else b2 * v_old + (1 - b2) * delta ** 2)
        self.m[key], self.v[key] = m, v
        m_hat, v_hat = m / (1 - b1 ** self.t), v / (1 - b2 ** self.t)
        return self.lr * m_hat / (v_hat.sqrt() + self.tau)


def tail_average(states: list[Mapping[str, torch.Tensor]], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The (weighted) mean of a few models' weights: the last rounds' global models (Polyak averaging of the
    server's iterates), or the start and the federated model (`--interpolate`). Post-processing of what the
    schools released, so no privacy cost; integer buffers are rounded."""
    weights = weights if weights is not None else [1.0 / len(states)] * len(states)
    out = {}
    for key, first in states[0].items():
        mean = sum(w * s[key].double() for w, s in zip(weights, states))
        out[key] = mean.to(first.dtype) if first.is_floating_point() else mean.round().to(first.dtype)
    return out


def score_interpolations(cfg: Mapping[str, Any], start: Mapping[str, torch.Tensor], final: Mapping[str, torch.Tensor],
                         alphas: list[float], score: Scorer) -> dict[str, Any]:
    """Scores of (1 - α)·start + α·final for each α (weight-space ensembling of the pre-trained and the
    fine-tuned model, as WiSE-FT; Wortsman et al. 2022): does it keep the public accuracy the start had?"""
    return {f"{a:g}": score(_model(cfg, tail_average([start, final], [1.0 - a, a])), per_school=True) for a in alphas}


def score_tails(cfg: Mapping[str, Any], kept: list[dict[str, torch.Tensor]], tails: list[int],
                score: Scorer, **kwargs: Any) -> dict[str, Any]:
    """Scores of the average of the last k rounds' models, for each k in `tails` (k <= rounds run)."""
    return {str(k): score(_model(cfg, tail_average(kept[-k:])), **kwargs) for k in tails if k <= len(kept)}


def federate(cfg: Mapping[str, Any], schools: list[SchoolData], start: Mapping[str, torch.Tensor], rounds: int,
             score: Scorer, echo=print, tails: list[int] = (),  # noqa: ANN001
             step_hook: PublicSubspace | PublicPreconditioner | None = None, interpolate: list[float] = (),
             server_step=fedavgm, keep_local: bool = False,  # noqa: ANN001
             lr_at: Callable[[int], float] | None = None) -> dict[str, Any]:
    """The federation, round by round. `keep_local`: also score each school's own model after its last
    round (the global model of the round before plus its own last update: what the school already holds,
    at no privacy cost) on its own held-out students and on the pooled sets. `lr_at(round)`: the schools'
    step size in that round (default: train.lr throughout)."""
    model, local = _model(cfg, start), _model(cfg, start)
    last_local: dict[str, Any] = {}
    velocity: dict[str, torch.Tensor] = {}
    momentum = float(cfg["federation.server_momentum"])
    history, kept, started = [], [], time.perf_counter()
    for rnd in range(1, rounds + 1):
        global_state = {k: v.clone() for k, v in model.state_dict().items()}
        states, sigma = [], 0.0
        after_noise = step_hook.hook(model) if step_hook is not None else None   # from the round's global model
        round_cfg = {**cfg, "train.lr": lr_at(rnd)} if lr_at is not None else cfg
        for index, school in enumerate(schools):
            local.load_state_dict(global_state)
            s, _ = dp_round(local, school, round_cfg, seed=int(cfg["run.seed"]) * 100_000 + rnd * 1000 + index,
                            after_noise=after_noise)
            sigma = max(sigma, s)
            if keep_local and rnd == rounds:
                last_local[synth.school_id(index)] = score(local, school=index)
            states.append({k: v.clone() for k, v in local.state_dict().items()})
        model.load_state_dict(server_step(global_state, states, velocity, momentum))
        kept = (kept + [{k: v.clone() for k, v in model.state_dict().items()}])[-max(tails, default=1):]
        result = score(model, per_school=rnd == rounds)   # the last round also per school: (c)'s comparison
        history.append({"round": rnd, "public": result[PUBLIC]["accuracy"], "indomain": result[INDOMAIN]["accuracy"],
                        "max_sigma": round(sigma, 3), "seconds": round(time.perf_counter() - started, 1)})
        echo(f"    round {rnd}: public {result[PUBLIC]['accuracy']:.3f} in-domain {result[INDOMAIN]['accuracy']:.3f} "
             f"σ ≤ {sigma:.2f} ({history[-1]['seconds']:.0f} s)")
    tail_scores = score_tails(cfg, kept, list(tails), score)
    for k, r in tail_scores.items():
        echo(f"    mean of the last {k} rounds' models: public {r[PUBLIC]['accuracy']:.3f} "
             f"in-domain {r[INDOMAIN]['accuracy']:.3f}")
    blends = score_interpolations(cfg, start, model.state_dict(), list(interpolate), score)
    for a, r in blends.items():
        echo(f"    (1 - {a})·start + {a}·federated: public {r[PUBLIC]['accuracy']:.3f} in-domain {r[INDOMAIN]['accuracy']:.3f}")
    for sid, r in last_local.items():
        echo(f"    {sid}'s own last model: own students {r['own-school']['accuracy']:.3f} "
             f"(global {result['per-school'][int(sid.rsplit('-', 1)[-1])]['accuracy']:.3f}), "
             f"in-domain {r[INDOMAIN]['accuracy']:.3f}, public {r[PUBLIC]['accuracy']:.3f}")
    return {**result, "history": history, "tail_average": tail_scores, "interpolated": blends, "last_local": last_local,
            "seconds": round(time.perf_counter() - started, 1)}


def alone(cfg: Mapping[str, Any], school: SchoolData, index: int, start: Mapping[str, torch.Tensor], rounds: int,
          score: Scorer, tails: list[int] = (),
          step_hook: PublicSubspace | PublicPreconditioner | None = None) -> dict[str, Any]:
    """One school's `rounds` DP rounds on its own model (same σ rule, so the same ε as in the federation);
    `tails`: also the average of its last k rounds' models, the same post-processing the federation gets."""
    model = _model(cfg, start)
    kept, started = [], time.perf_counter()
    for rnd in range(1, rounds + 1):
        dp_round(model, school, cfg, seed=int(cfg["run.seed"]) * 100_000 + rnd * 1000 + index,
                 after_noise=step_hook.hook(model) if step_hook is not None else None)
        kept = (kept + [{k: v.clone() for k, v in model.state_dict().items()}])[-max(tails, default=1):]
    return {**score(model, school=index), "students": school.num_students,
            "tail_average": score_tails(cfg, kept, list(tails), score, school=index),
            "seconds": round(time.perf_counter() - started, 1)}


def central(cfg: Mapping[str, Any], schools: list[SchoolData], start: Mapping[str, torch.Tensor], epochs: int,
            score: Scorer) -> dict[str, Any]:
    """Non-private fine-tuning of every layer on the pooled schools (the ceiling the federation aims at)."""
    model, info = train_central(cfg, schools, start, epochs, seed=int(cfg["run.seed"]))
    return {**score(model), **info}


# ---------------------------------------------------------------------------- main
def _row(label: str, result: Mapping[str, Any]) -> str:
    def cell(m: Mapping[str, Any]) -> str:
        return f"{m['accuracy']:.3f} [{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}]"

    return f"{label:<44} {cell(result[PUBLIC]):>22} {cell(result[INDOMAIN]):>22}"


def _parser() -> argparse.ArgumentParser:
    # the docstring's first paragraph ends in "… accuracy of", its list of (a), (b), (F), (c) follows: show both
    parser = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=None, help="federated rounds (default: federation.rounds)")
    parser.add_argument("--trainable", default="all,norms+head", help="fine-tuning choices for the federation")
    parser.add_argument("--alone", default="3", help="schools that also train alone: 'all' or how many (smallest, "
                                                    "largest, then evenly between); 0: skip (c)")
    parser.add_argument("--central-epochs", type=int, default=3, help="0: skip (b)")
    parser.add_argument("--tail", default="", help="also score the mean of the last k rounds' models, e.g. 3,6")
    parser.add_argument("--interpolate", default="", help="also score (1 - α)·start + α·federated for each α, "
                                                         "e.g. 0.5,0.75 (weight-space ensembling, no privacy cost)")
    parser.add_argument("--subspace", type=int, default=0,
                        help="project every DP step's noised gradient onto the top-K directions of public per-sample "
                             "gradients (privacy/public_subspace.py); 0: off")
    parser.add_argument("--precondition", type=float, default=0.0,
                        help="scale every noised DP gradient by (public gradients' mean square)^(-P/2) per coordinate "
                             "(AdaDPS-style, public faces as for --subspace); 0: off")
    parser.add_argument("--lr-end", type=float, default=None,
                        help="the schools' lr falls from train.lr to this by the last round (cosine); default: constant")
    parser.add_argument("--subspace-samples", type=int, default=512, help="public faces the subspace is found from")
    parser.add_argument("--local-last", action="store_true",
                        help="also score each school's own model after its last round (no privacy cost)")
    parser.add_argument("--server-opt", default="avgm", choices=["avgm", "adam", "yogi"],
                        help="the server's step: FedAvgM (federation.server_momentum) or FedAdam / FedYogi")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam / FedYogi's server learning rate")
    parser.add_argument("--server-tau", type=float, default=1e-3, help="FedAdam / FedYogi's adaptivity τ")
    parser.add_argument("--rehearse", type=int, default=0,
                        help="after each server step, this many plain Adam steps on public training faces (no privacy "
                             "cost: the server holds public data only); 0: off")
    parser.add_argument("--rehearse-lr", type=float, default=2e-4, help="--rehearse's Adam learning rate")
    parser.add_argument("--rehearse-faces", type=int, default=4096, help="public training faces --rehearse draws from")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/pretraining.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(None, args.overrides)
        if args.rehearse > 0 and args.server_opt != "avgm":
            raise ConfigError("--rehearse follows the FedAvgM step: it needs --server-opt avgm")
    except ConfigError as exc:
        print(f"pretraining bench: {exc}", file=sys.stderr)
        return 2
    rounds = int(args.rounds or cfg["federation.rounds"])
    tails = [int(k) for k in args.tail.split(",") if k.strip()]
    cfg["federation.rounds"] = rounds   # σ is calibrated for the rounds that run
    from simulations import pretrain

    torch.set_num_threads(int(cfg["train.threads"]))
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    started = time.perf_counter()
    root = synth.ensure_for_config(cfg)
    data_seconds = time.perf_counter() - started
    path = (Path(str(cfg["model.pretrained"])) if cfg["model.pretrained"]
            else pretrain.ensure_pretrained(cfg, root, echo=lambda s: print("  " + s, flush=True)))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    start = checkpoint["state_dict"]
    schools = [load_school(d) for d in sorted((root / "schools").iterdir()) if d.is_dir()]
    sizes = [s.num_students for s in schools]
    print(f"{len(schools)} schools, students {sizes}; {rounds} rounds at ε {cfg['privacy.target_epsilon']}", flush=True)
    input_size = int(registry.build_from_config(cfg).input_size)
    score = Scorer(root, input_size, int(cfg["evaluation.bootstrap"]))

    subspace = (PublicSubspace(cfg, root, input_size, args.subspace, args.subspace_samples)
                if args.subspace > 0 else None)
    step_hook = (PublicPreconditioner(*public_faces(cfg, root, input_size, args.subspace_samples)[:2], args.precondition)
                 if args.precondition > 0 else subspace)
    rehearsal_faces = public_faces(cfg, root, input_size, args.rehearse_faces)[:2] if args.rehearse > 0 else None
    results: dict[str, Any] = {"pretrained": score(_model(cfg, start), per_school=True)}
    if subspace is not None:
        results["subspace_energy"] = subspace.energy(_model(cfg, start), schools[0])
        print(f"  subspace ({args.subspace} dims) at the start holds {results['subspace_energy']}", flush=True)
    print(_row("(a) pre-trained alone", results["pretrained"]), flush=True)
    if args.central_epochs > 0:
        results["central"] = central(cfg, schools, start, args.central_epochs, score)
        print(_row(f"(b) central non-private, {args.central_epochs} epochs", results["central"]), flush=True)
    for mode in [m.strip() for m in args.trainable.split(",") if m.strip()]:
        print(f"  federation, train.trainable={mode}", flush=True)
        results[f"federated:{mode}"] = _federation(args, {**cfg, "train.trainable": mode}, schools, start, score,
                                                   tails, step_hook, rehearsal_faces)
        print(_row(f"(F) federated DP, trainable={mode}", results[f"federated:{mode}"]), flush=True)
    results["alone"] = _train_alone(cfg, schools, sizes, _alone_picks(sizes, args.alone), start, rounds, score,
                                   tails, step_hook)
    _print_table(results)
    out = write_result(args.out, {
        "config": cfg, "rounds": rounds, "students": sizes, "data_seconds": round(data_seconds, 1),
        "subspace": {"dims": subspace.dims, "samples": len(subspace.labels), "public": subspace.spec} if subspace else None,
        "pretrained": _home_relative({"path": str(path), "provenance": checkpoint.get("provenance")}), "results": results,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "notes": "in-process (tune_inprocess-style): schools train one after another; FedAvgM with uniform weights",
    }, module="simulations.bench.pretraining", argv=argv)
    print(f"wrote {out}")
    return 0


def _federation(args: argparse.Namespace, cfg: Mapping[str, Any], schools: list[SchoolData],
                start: Mapping[str, torch.Tensor], score: Scorer, tails: list[int],
                step_hook: PublicSubspace | PublicPreconditioner | None,
                rehearsal_faces: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, Any]:
    """One federation with the command line's server step, lr schedule and step hook; `rehearsal_faces`
    (public images and labels, read once by the caller) for `--rehearse`."""
    rounds = int(cfg["federation.rounds"])
    server_step = (fedavgm if args.server_opt == "avgm" else
                   ServerAdam(args.server_lr, args.server_tau, yogi=args.server_opt == "yogi"))
    if rehearsal_faces is not None:
        server_step = PublicRehearsal(cfg, *rehearsal_faces, args.rehearse, args.rehearse_lr)
    return federate(cfg, schools, start, rounds, score, echo=lambda s: print(s, flush=True), tails=tails,
                    step_hook=step_hook, interpolate=[float(a) for a in args.interpolate.split(",") if a.strip()],
                    keep_local=args.local_last, server_step=server_step,
                    lr_at=_cosine_lr(float(cfg["train.lr"]), args.lr_end, rounds))


def _cosine_lr(start: float, end: float | None, rounds: int) -> Callable[[int], float] | None:
    """Round r's lr, falling from `start` in round 1 to `end` in the last (None: constant)."""
    if end is None:
        return None
    return lambda r: end + (start - end) * 0.5 * (1 + np.cos(np.pi * (r - 1) / max(1, rounds - 1)))


def _home_relative(value: Any) -> Any:
    """`value` with this machine's home folder written as ~ (the cache paths in a result file)."""
    import json

    return json.loads(json.dumps(value, default=str).replace(str(Path.home()), "~"))


def _alone_picks(sizes: list[int], alone_arg: str) -> list[int]:
    """Indices of the schools that also train alone: 'all', or `alone_arg` of them from smallest to largest."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    count = len(sizes) if alone_arg == "all" else min(int(alone_arg), len(sizes))
    return sorted({order[round(k * (len(order) - 1) / max(count - 1, 1))] for k in range(count)}) if count else []


def _train_alone(cfg: Mapping[str, Any], schools: list[SchoolData], sizes: list[int], picks: list[int],
                 start: Mapping[str, torch.Tensor], rounds: int, score: Scorer, tails: list[int] = (),
                 step_hook: PublicSubspace | PublicPreconditioner | None = None) -> dict[str, Any]:
    """(c): each picked school trains alone with the same privacy settings; its scores by school id."""
    mode = str(cfg["train.trainable"])
    scores: dict[str, Any] = {}
    for i in picks:
        scores[synth.school_id(i)] = alone(cfg, schools[i], i, start, rounds, score, tails, step_hook)
        r = scores[synth.school_id(i)]
        print(_row(f"(c) {synth.school_id(i)} alone ({sizes[i]} students), trainable={mode}", r)
              + f"  own school {r['own-school']['accuracy']:.3f}", flush=True)
    return scores


def _print_table(results: dict[str, Any]) -> None:
    print(f"\n{'setting':<44} {'public test acc [95% CI]':>22} {'in-domain acc [95% CI]':>22}")
    print(_row("(a) pre-trained alone", results["pretrained"]))
    if "central" in results:
        print(_row("(b) central non-private", results["central"]))
    for key in results:
        if key.startswith("federated:"):
            print(_row(f"(F) federated DP, trainable={key.split(':', 1)[1]}", results[key]))
    for sid, r in results["alone"].items():
        print(_row(f"(c) {sid} alone ({r['students']} students)", r))
    _print_own_students(results)


def _print_own_students(results: dict[str, Any]) -> None:
    """Each (c) school's own held-out students: the start, the school alone and every federation (the
    head teacher's question: does my school's model get better by federating?)."""
    if not results["alone"]:
        return
    federations = [key for key in results if key.startswith("federated:")]
    print(f"\n{'own held-out students of':<26} {'start':>7} {'alone':>7} " + " ".join(f"{k[10:]:>10}" for k in federations))
    for sid, r in results["alone"].items():
        index = int(sid.rsplit("-", 1)[-1])
        print(f"{sid + ' (n ' + str(r['own-school']['n']) + ')':<26} {_own(results['pretrained'], index):>7} "
              f"{r['own-school']['accuracy']:>7.3f} " + " ".join(f"{_own(results[k], index):>10}" for k in federations))


def _own(scores: Mapping[str, Any], index: int) -> str:
    """A model's accuracy on school `index`'s held-out students, from its per-school scores ("-" if unscored)."""
    m = (scores.get("per-school") or {}).get(index)
    return f"{m['accuracy']:.3f}" if m else "-"


if __name__ == "__main__":
    sys.exit(main())
