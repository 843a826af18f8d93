"""Metrics against hand-computed values; the bootstrap CI; evaluate_model on tiny stand-in models."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import pytest

from shared_models.metrics import bootstrap_accuracy_ci, classification_report, confusion_matrix

# y_true 0 0 0 1 1 2 ; y_pred 0 0 1 1 2 2 ; 4 classes, class 3 absent
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_report_matches_hand_computed_values():
    report = classification_report(Y_TRUE, Y_PRED, num_classes=4, n_boot=200, seed=1)
    assert report["confusion"] == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert report["n"] == 6
    assert report["accuracy"] == pytest.approx(4 / 6) and report["war"] == report["accuracy"]
    assert report["per_class_recall"][:3] == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert report["per_class_recall"][3] is None  # no true sample of class 3
    assert report["uar"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    # F1: class0 2*2/(4+0+1)=0.8, class1 2/(2+1+1)=0.5, class2 2/(2+1+0)=2/3; class 3 neither true nor predicted
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report["accuracy_ci_low"] <= report["accuracy"] <= report["accuracy_ci_high"]
    json.dumps(report, allow_nan=False)  # strictly JSON-serialisable


def test_macro_f1_counts_a_predicted_but_absent_class_as_zero():
    report = classification_report([0, 0, 1, 1], [0, 0, 1, 2], num_classes=3, n_boot=0)
    # class0 F1 1, class1 2/(2+0+1)=2/3, class2 predicted once but never true: F1 0
    assert report["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report["uar"] == pytest.approx((1 + 0.5) / 2)  # UAR only over classes present in y_true
    assert report["accuracy_ci_low"] is None and report["accuracy_ci_high"] is None


def test_confusion_rows_are_true_columns_predicted():
    cm = confusion_matrix([2, 2, 0], [1, 1, 0], 3)
    assert cm[2, 1] == 2 and cm[1, 2] == 0 and cm[0, 0] == 1


def test_bootstrap_ci_contains_accuracy_is_seeded_and_matches_index_resampling():
    rng = np.random.default_rng(3)
    n = 300
    y_true = rng.integers(0, 7, n)
    y_pred = np.where(rng.random(n) < 0.62, y_true, (y_true + 1) % 7)
    a = classification_report(y_true, y_pred, 7, n_boot=2000, seed=5)
    b = classification_report(y_true, y_pred, 7, n_boot=2000, seed=5)
    assert a == b
    assert a["accuracy_ci_low"] < a["accuracy"] < a["accuracy_ci_high"]
    # the binomial shortcut is the same distribution as resampling indices
    correct = (y_true == y_pred).astype(float)
    idx = np.random.default_rng(11).integers(0, n, (4000, n))
    low, high = np.percentile(correct[idx].mean(axis=1), [2.5, 97.5])
    assert a["accuracy_ci_low"] == pytest.approx(low, abs=0.01)
    assert a["accuracy_ci_high"] == pytest.approx(high, abs=0.01)
    # width close to the normal approximation 2 * 1.96 * sqrt(p(1-p)/n)
    p = a["accuracy"]
    assert a["accuracy_ci_high"] - a["accuracy_ci_low"] == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.15)


def test_bootstrap_edge_cases():
    assert bootstrap_accuracy_ci(10, 10, n_boot=100) == (1.0, 1.0)
    assert bootstrap_accuracy_ci(0, 10, n_boot=100) == (0.0, 0.0)
    with pytest.raises(ValueError):
        bootstrap_accuracy_ci(11, 10)


@pytest.mark.parametrize("y_true, y_pred, message", [
    ([0, 1], [0], "y_true has 2 entries but y_pred has 1"),
    ([0, 5], [0, 1], "y_true holds class 5, outside 0..3"),
    ([0, 1], [0, -1], "y_pred holds class -1"),
    ([], [], "no predictions to score"),
    ([[0, 1]], [[0, 1]], "one-dimensional"),
])
def test_bad_inputs_are_clear_errors(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        classification_report(y_true, y_pred, 4)


# -- evaluate_model ---------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from shared_models.evaluation import evaluate_model  # noqa: E402


class Out(NamedTuple):
    logits: torch.Tensor
    aux: dict


class EncodedLabels(Dataset):
    """Sample i is an image filled with the value labels[i]; clips repeat it over T frames."""

    def __init__(self, labels, num_classes, frames: int = 0):
        self.items = list(labels)
        self.num_classes = num_classes
        self.labels = tuple(f"c{i}" for i in range(num_classes))
        self.frames = frames

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        value = float(self.items[i])
        shape = (self.frames, 3, 4, 4) if self.frames else (3, 4, 4)
        return torch.full(shape, value), self.items[i]


class Decoder(nn.Module):
    """logits_c = -(mean(x) - c)^2 : predicts the encoded value; `boost` adds to chosen logits."""

    def __init__(self, classes, named_output=True, boost=None):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.classes = classes
        self.named_output = named_output
        self.boost = boost or {}
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        mean = x.flatten(1).mean(dim=1, keepdim=True) * self.scale
        logits = -(mean - torch.arange(self.classes, dtype=torch.float32)) ** 2
        for cls, amount in self.boost.items():
            logits[:, cls] += amount
        return Out(logits, {}) if self.named_output else logits


def test_evaluate_model_named_and_plain_outputs_restores_mode():
    data = EncodedLabels([0, 1, 2, 3, 4, 5, 6, 6, 3], 7)
    for named in (True, False):
        model = Decoder(7, named_output=named)
        model.train()
        report = evaluate_model(model, data, batch_size=4, n_boot=100)
        assert report["accuracy"] == 1.0 and report["n"] == 9 and report["labels"] == list(data.labels)
        assert model.training and not any(model.seen_training)  # ran in eval mode, mode restored


def test_evaluate_model_restricts_argmax_to_the_benchmark_classes():
    data = EncodedLabels([0, 1, 2, 6], 7)
    model = Decoder(8, boost={7: 1000.0})  # an FER8 model that always screams "contempt"
    report = evaluate_model(model, data, n_boot=0)
    assert report["accuracy"] == 1.0 and report["model_classes"] == 8 and len(report["confusion"]) == 7


def test_evaluate_model_with_fewer_model_classes_counts_missing_classes_as_errors():
    data = EncodedLabels([0, 1, 7, 7], 8)  # FER8 benchmark, FER7 model
    report = evaluate_model(Decoder(7), data, n_boot=0)
    assert report["accuracy"] == 0.5 and report["per_class_recall"][7] == 0.0 and report["model_classes"] == 7


def test_evaluate_model_on_clips_averages_frames_unless_temporal():
    data = EncodedLabels([1, 2, 3], 4, frames=5)
    frame_model = Decoder(4)
    assert evaluate_model(frame_model, data, n_boot=0)["accuracy"] == 1.0

    class Temporal(Decoder):
        temporal = True

        def forward(self, x):
            assert x.ndim == 5
            return super().forward(x)

    assert evaluate_model(Temporal(4), data, n_boot=0)["accuracy"] == 1.0


def test_evaluate_model_skips_unreadable_samples_and_refuses_empty():
    class WithHoles(EncodedLabels):
        skipped = 1

        def __getitem__(self, i):
            return None if i == 1 else super().__getitem__(i)

    report = evaluate_model(Decoder(3), WithHoles([0, 1, 2], 3), n_boot=0)
    assert report["n"] == 2 and report["skipped"] == 1

    class Empty(EncodedLabels):
        def __getitem__(self, i):
            return None

    with pytest.raises(ValueError, match="nothing to score"):
        evaluate_model(Decoder(3), Empty([0, 1], 3))
