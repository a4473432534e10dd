"""Train the learned compositional detector (``compositional_detector=learned``) for each embedder.

Run: ``python -m bench.train_detector [--embedders static minilm ...] [--aggregate max]``. For each embedder it
searches every prompt of the training split (``tests/data/routing``) as the router does (with the index
aggregate given, default the gateway's), computes the detector's
domain-free features (:data:`loragate.router.compositional.FEATURES`), fits a standardised logistic
regression (scikit-learn; its regularisation C by 5-fold cross-validation on the training split), and
picks the decision threshold on the training split's out-of-fold probabilities (the one with the best
F1). The held-out split is never looked at here. Writes ``router/detector_models.json`` (or ``--out``),
which the gateway loads; ``bench/bench_routing.py`` reports precision and recall on both splits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tqdm import tqdm

from bench.labelled import Searched, best_f1, load_set, make_tier, precision_recall, search_all
from loragate.router.compositional import DETECTOR_MODELS, FEATURES, DetectorModel, model_key, probe_features
from loragate.router.embedder import make_backend
from loragate.router.index import AGGREGATES, CENTROID

C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
SEED = 0


def matrix(searched: Sequence[Searched]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray([probe_features(s.probe, s.candidates, s.parts) for s in searched],
                   dtype=np.float64)
    y = np.asarray([s.prompt.compositional for s in searched], dtype=np.int64)
    return x, y


def fit(x: np.ndarray, y: np.ndarray, embedder: str) -> tuple[DetectorModel, dict[str, float]]:
    """The model and what choosing it saw (cross-validated on the training split only)."""
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=SEED)
    best: tuple[float, float, np.ndarray] | None = None
    for c in C_GRID:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
        oof = cross_val_predict(pipeline, x, y, cv=folds, method="predict_proba")[:, 1]
        loss = -float(np.mean(y * np.log(oof + 1e-12) + (1 - y) * np.log(1 - oof + 1e-12)))
        if best is None or loss < best[0]:
            best = (loss, c, oof)
    assert best is not None
    loss, c, oof = best
    threshold, _, _ = best_f1(y, oof)
    scaler, logistic = StandardScaler().fit(x), LogisticRegression(C=c, max_iter=5000)
    logistic.fit(scaler.transform(x), y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    model = DetectorModel(embedder, tuple(map(float, scaler.mean_)), tuple(map(float, scale)),
                          tuple(map(float, logistic.coef_[0])), float(logistic.intercept_[0]), threshold)
    cv_precision, cv_recall = precision_recall(oof >= threshold, y)
    return model, {"C": c, "cv_log_loss": loss, "cv_precision": cv_precision, "cv_recall": cv_recall}


async def train(embedders: Sequence[str], aggregate: str = CENTROID) -> dict[str, dict[str, object]]:
    labelled = load_set()
    models: dict[str, dict[str, object]] = {}
    for name in tqdm(embedders, desc="embedders", unit="embedder"):
        tier = await make_tier(make_backend(name), labelled.records, aggregate=aggregate)
        x, y = matrix(await search_all(tier, labelled))
        await tier.embedder.close()
        model, chosen = fit(x, y, name)
        models[model_key(name, aggregate)] = {**model.to_json(), "training": {
            "split": "tests/data/routing", "index_aggregate": aggregate, "prompts": len(y),
            "compositional": int(y.sum()), **chosen}}
        print(f"{model_key(name, aggregate)}: C={chosen['C']} threshold={model.threshold:.3f} out-of-fold precision "
              f"{chosen['cv_precision']:.2f} recall {chosen['cv_recall']:.2f} (training split only)")
    return models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedders", nargs="+", default=["static", "minilm"],
                        help="embedder backends to train a model for (default: %(default)s)")
    parser.add_argument("--aggregate", choices=AGGREGATES, default=CENTROID,
                        help="the index aggregate the features are read with (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DETECTOR_MODELS, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    models = asyncio.run(train(args.embedders, args.aggregate))
    existing = json.loads(args.out.read_text())["models"] if args.out.exists() else {}
    payload = {"about": "The learned compositional detector's models, one per embedder; written by "
                        "`python -m bench.train_detector` from the training split tests/data/routing only.",
               "features": list(FEATURES), "models": {**existing, **models}}
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
