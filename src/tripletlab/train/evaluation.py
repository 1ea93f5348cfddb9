"""How a :class:`~tripletlab.train.Trainer` scores its model: validation during training (which
picks the saved model) and the final test evaluation (``eval.json``).

An evaluator has ``selection_metric`` (the validation metric that picks the saved model),
``val_metrics`` (the ones logged to metrics.jsonl), ``validate(trainer) -> metrics | None`` and
``test(trainer, result) -> (result, test embeddings | None)`` (which first loads the best weights,
model.safetensors, into the trainer's model); it reads the trainer (its model, splits and
``embed_split``) and changes nothing else in it. :class:`RetrievalEvaluator` serves
labelled data; the explicit-triplet evaluator is in :mod:`tripletlab.train.triplet_file`.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from ..metrics import retrieval_metrics
from ..metrics.evaluate import (
    EvalResult,
    eval_distance,
    evaluate_embeddings,
    validation_threshold,
)
from ..rundir.files import load_weights

__all__ = ["RetrievalEvaluator"]


class RetrievalEvaluator:
    """Retrieval metrics (MAP@R picks the saved model); the test evaluation adds verification
    at a threshold calibrated on validation pairs, and for predefined splits the benchmark
    protocol (test queries against the training items)."""

    selection_metric = "map_at_r"
    val_metrics = ("precision_at_1", "recall_at_4", "r_precision", "map_at_r")

    def validate(self, trainer) -> dict | None:
        """Retrieval metrics of the validation split (None without one)."""
        val = trainer.val_set
        if val is None or len(val) == 0:
            return None
        features = trainer.features
        emb = features.val_embeddings(trainer.model, trainer.device) if features else None
        if emb is not None:  # a frozen backbone: its cached features, the current head
            labels = val.y
        else:
            emb, labels = trainer.embed_split(val)
        try:
            metrics = retrieval_metrics(
                emb, labels, ks=(1, 4), nmi=False, distance=eval_distance(trainer.model_config),
                full_ranking=False,  # every validation: MAP@R only, not the full ranking
            )  # fmt: skip
        except InputError:
            return None
        return per_source(metrics, emb, labels, val.info.get("val_groups"), trainer.model_config)

    def test(self, trainer, result: EvalResult) -> tuple[EvalResult, torch.Tensor]:
        """The evaluation of the best model on the test split, added to ``result``."""
        # the best weights (model.safetensors) into the trainer's module (a custom one too)
        trainer.model.load_state_dict(load_weights(trainer.run_dir / "model.safetensors"))
        dist = eval_distance(trainer.model_config)
        emb, test_y = trainer.embed_split(trainer.test_set)
        best = trainer.state.best
        result = {"split": "test", "distance": dist, **result}
        result["best_val_map_at_r"] = best if best >= 0 else None
        calibration = None
        val, seed = trainer.val_set, trainer.cfg.seed
        if val is not None and len(val) >= 2:
            # the threshold is chosen on validation pairs, never on the test pairs it is scored on
            vemb, val_y = trainer.embed_split(val)
            # all validation identities, the threshold for the target FAR (or best accuracy)
            calibration = validation_threshold(
                vemb,
                val_y,
                dist,
                seed=seed,
                target_far=getattr(trainer.cfg, "target_far", 0.01),
                rule=getattr(trainer.cfg, "threshold_rule", "target-far"),
            )
        post = None
        if val is not None and len(val) >= 2:
            post = postprocess_choice(trainer.cfg.postprocess, vemb, val_y, dist, seed)
        elif trainer.cfg.postprocess != "auto":
            post = postprocess_choice(trainer.cfg.postprocess, None, None, dist, seed)
        if len(test_y) >= 2:
            result.update(
                evaluate_embeddings(
                    emb, test_y, dist, seed=seed, calibration=calibration, postprocess=post
                )
            )
        elif post is not None:
            result["postprocess"] = post
        if trainer.test_info.get("by") == "predefined" and len(trainer.test_set):
            # the benchmark protocol of predefined splits (e.g. Fashion-MNIST): test queries
            # retrieved against the training items
            ref, ref_y = trainer.embed_split(trainer.train_full)
            result["retrieval_test_to_train"] = retrieval_metrics(
                ref,
                ref_y,
                ks=(1, 2, 4, 8),
                distance=dist,
                query_embeddings=emb,
                query_labels=test_y,
                nmi=False,
            )
        if val is not None and val.info.get("val_sources"):  # which validation was used
            result["validation"] = {
                "mode": val.info.get("val_mode"),
                "sources": val.info["val_sources"],
                "selection": "mean map_at_r of the sources"
                if len(val.info["val_sources"]) > 1
                else "map_at_r",
            }
        ver = result.get("verification", {})
        if "threshold" in ver:
            result["threshold"] = ver["threshold"]
        return result, emb


def postprocess_choice(requested: str, vemb, val_y, distance: str, seed: int) -> dict:
    """The post-processing record of a run (``eval.json["postprocess"]`` before the test
    metrics are added): ``auto`` chooses on the validation embeddings
    (:func:`~tripletlab.metrics.postprocess_select.choose_postprocess`); a given spec is kept
    as the user's choice, with its validation MAP@R gain when there is a validation split."""
    from ..metrics.postprocess import parse_postprocess
    from ..metrics.postprocess_select import choose_postprocess, postprocessed_metrics

    if requested == "auto":
        if vemb is None:
            return {"method": "none", "params": {}, "spec": "none", "chosen_by": "default",
                    "skipped": "no validation split to choose on"}  # fmt: skip
        return choose_postprocess(vemb, val_y, distance=distance, seed=seed)
    spec = parse_postprocess(requested)
    out = {"method": spec.method, "params": dict(spec.params), "spec": str(spec),
           "chosen_by": "user"}  # fmt: skip
    if vemb is not None and spec.method != "none":
        try:
            m0 = postprocessed_metrics(vemb, val_y, "none", distance=distance, ks=(1,))
            m1 = postprocessed_metrics(vemb, val_y, spec, distance=distance, ks=(1,))
        except InputError:
            return out
        out["validation_map_at_r_none"] = m0["map_at_r"]
        out["validation_map_at_r"] = m1["map_at_r"]
        out["validation_gain"] = m1["map_at_r"] - m0["map_at_r"]
    return out


def per_source(metrics: dict, emb, labels, groups: dict | None, model_config) -> dict:
    """With validation from several sources (``groups``: source -> class ids, see
    :func:`tripletlab.train.build.add_val_data`): each source's MAP@R (within its classes;
    a source of one class is left out) as ``map_at_r[<source>]``, the pooled one as
    ``map_at_r_pooled`` and ``map_at_r`` (the selection metric) their mean, so a large source
    does not outweigh a small one."""
    if not groups or len(groups) < 2:
        return metrics
    scores = {}
    for name, ids in groups.items():
        keep = torch.isin(labels.cpu(), torch.as_tensor(ids, dtype=labels.dtype))
        if len(torch.unique(labels.cpu()[keep])) < 2:
            continue  # one class: retrieval within it is trivially perfect
        try:
            m = retrieval_metrics(
                emb[keep], labels.cpu()[keep], ks=(1,), nmi=False,
                distance=eval_distance(model_config), full_ranking=False,
            )  # fmt: skip
        except InputError:
            continue
        scores[name] = float(m["map_at_r"])
        metrics[f"map_at_r[{name}]"] = scores[name]
    if scores:
        metrics["map_at_r_pooled"] = metrics["map_at_r"]
        metrics["map_at_r"] = sum(scores.values()) / len(scores)
    return metrics
