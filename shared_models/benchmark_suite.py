"""Score a model on a list of benchmark specs: the evaluation node's job, and the server's when the
federation has no evaluation node (same code either way).

Metrics travel in a Flower MetricRecord, which holds flat numbers and lists: `flatten_metrics` turns
{benchmark: metric dict} into `<benchmark>.<metric>` keys and `unflatten_metrics` turns them back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

LIST_METRICS = ("per_class_recall", "confusion")


def parse_specs(specs: str) -> list[str]:
    return [s.strip() for s in specs.split(",") if s.strip()]


def spec_name(spec: str) -> str:
    """`fer2013=/x/y.csv` -> `fer2013`; `synthetic-rafdb` -> `synthetic-rafdb`."""
    return spec.split("=", 1)[0].strip()


def evaluate_benchmarks(model: nn.Module, specs: str, data_root: Path | None, cfg: Mapping[str, Any],
                        cache: dict | None = None, ensure_synthetic: bool = False) -> dict[str, dict[str, Any]]:
    """Evaluate `model` on every benchmark in `specs` (comma-separated); returns {name: metrics}."""
    from shared_models.benchmarks import open_benchmark
    from shared_models.evaluation import evaluate_model
    from shared_models.transforms import eval_transform

    if ensure_synthetic and data_root is not None and any(spec_name(s).startswith("synthetic-") for s in parse_specs(specs)):
        from simulations import synth

        synth.ensure_public(data_root, synth.params_from_config(cfg))
    cache = {} if cache is None else cache
    results: dict[str, dict[str, Any]] = {}
    for spec in parse_specs(specs):
        key = (spec, str(data_root), int(model.input_size))
        if key not in cache:
            bench = open_benchmark(spec, data_root=data_root)
            cache[key] = bench.as_torch(eval_transform(model.input_size))
        results[spec_name(spec)] = evaluate_model(model, cache[key], n_boot=int(cfg["evaluation.bootstrap"]),
                                                  seed=int(cfg["run.seed"]))
    return results


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    flat: dict[str, Any] = {"num-examples": int(sum(int(m.get("n", 0)) for m in results.values()))}
    for bench, metrics in results.items():
        for name, value in metrics.items():
            if name == "confusion":
                flat[f"{bench}.confusion"] = [int(v) for row in value for v in row]
            elif name == "per_class_recall":
                # a class absent from the benchmark has no recall: NaN on the wire, None again after unflatten
                flat[f"{bench}.per_class_recall"] = [float("nan") if v is None else float(v) for v in value]
            elif isinstance(value, bool):
                continue
            elif isinstance(value, (int, float)):
                flat[f"{bench}.{name}"] = value
            elif value is None:
                flat[f"{bench}.{name}"] = float("nan")
    return flat


def unflatten_metrics(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if "." not in key:
            continue
        bench, name = key.rsplit(".", 1)
        results.setdefault(bench, {})[name] = list(value) if isinstance(value, (list, tuple)) else value
    for metrics in results.values():
        for name, value in metrics.items():
            if isinstance(value, float) and value != value:
                metrics[name] = None
        if "per_class_recall" in metrics:
            metrics["per_class_recall"] = [None if v != v else v for v in metrics["per_class_recall"]]
        if "confusion" in metrics:
            flat_cm = metrics["confusion"]
            k = int(round(len(flat_cm) ** 0.5))
            metrics["confusion"] = [flat_cm[i * k:(i + 1) * k] for i in range(k)]
    return results
