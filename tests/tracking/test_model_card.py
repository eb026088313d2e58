"""The model card: its numbers are the run's, it says what is missing, and it fits in a registry description."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd

from src.config import CLASSES, Params
from src.learn.referral import REFER_ALL
from src.learn.subgroups import subgroup_table
from src.tracking.model_card import RunFacts, guard_line, model_card, referral_line
from src.tracking.registry import fit_description


def split_frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = np.arange(n) % len(CLASSES)
    return pd.DataFrame(
        {
            "lesion_id": [f"L{seed}_{i // 2}" for i in range(n)],
            "image_id": [f"I{seed}_{i}" for i in range(n)],
            "dx": [CLASSES[k] for k in label],
            "label": label,
            "sex": rng.choice(["male", "female"], n),
            "age": rng.integers(1, 18, n) * 5.0,
        }
    )


def run_facts(**changes) -> RunFacts:
    params = Params()
    metrics = {
        "val_served/balanced_accuracy": 0.71234,
        "val_served/balanced_accuracy_ci_low": 0.65,
        "val_served/balanced_accuracy_ci_high": 0.77,
        "test/balanced_accuracy": 0.75678,
        "test/balanced_accuracy_ci_low": 0.70011,
        "test/balanced_accuracy_ci_high": 0.80999,
        "test/macro_roc_auc": 0.9321,
        "test/melanoma_sensitivity": 0.61,
        "test/melanoma_specificity": 0.95,
        "decision/temperature": 1.234,
        "decision/temperature_fitted": 1.234,
        "decision/val_ece_uncalibrated": 0.081,
        "decision/val_ece": 0.032,
        "test/ece": 0.04,
        "test/ece_uncalibrated": float("nan"),
    }
    splits = {name: split_frame(n, k) for k, (name, n) in enumerate((("train", 140), ("val", 42), ("test", 42)))}
    test = splits["test"]
    subgroups = subgroup_table(test, np.eye(len(CLASSES))[test["label"]])
    facts = RunFacts(
        config={
            "model": params.model.model_dump(mode="json"),
            "train": params.train.model_dump(mode="json"),
            "data": {"image_size": 224, "split_hash": "abc", "shades_of_gray_power": None},
        },
        best_epoch=17,
        metrics=metrics,
        provenance={"git.commit": "0123abc", "git.dirty": "false", "data.source": "dataverse"},
        decision={"tta": True, "temperature": 1.234, "offsets": [0.0] * len(CLASSES)},
        splits=splits,
        subgroups=subgroups,
        run_id="run42",
        registered={"name": "hmnist-vit", "version": 3, "promoted": True},
    )
    return dataclasses.replace(facts, **changes)


def metric_row(card: str, name: str) -> list[str]:
    row = next(line for line in card.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in row.strip("|").split("|")][1:]


def test_the_card_prints_the_runs_numbers():
    facts = run_facts()
    card = model_card(facts)
    assert card.startswith("# Model card: hmnist-vit version 3\n")
    val, test = metric_row(card, "balanced accuracy")
    assert re.fullmatch(r"0\.7123 \(95% CI 0\.6500-0\.7700\)", val)
    low, high = map(float, re.search(r"CI ([\d.]+)-([\d.]+)", test).groups())
    assert (float(test.split()[0]), low, high) == (0.7568, 0.7001, 0.8100)
    assert metric_row(card, "macro ROC AUC") == ["n/a", "0.9321"]  # val's is missing: said, not invented
    assert "test: n/a uncalibrated, 0.0400 served" in card  # NaN is n/a
    assert "timm `deit_small_patch16_224` at 224 px" in card and "epoch 17 kept" in card
    assert "pretrained `deit_small_patch16_224` weights" in card
    assert "`git checkout 0123abc && dvc repro`" in card and "uncommitted" not in card
    assert "Not a medical device. Not for diagnosis" in card and "non-dermoscopic" in card
    assert "| test | 42 | 21 | 6 | 6 | 6 | 6 | 6 | 6 | 6 |" in card  # images, lesions, then per class
    assert "test holds df 6 images (6 lesions), vasc 6 images (6 lesions)" in card
    assert "Test-time augmentation (mean over flips and 90-degree rotations): yes, 8 views." in card
    assert "Prior-correction logit offsets: none." in card
    assert "| overall | all | 42 | 21 | 1.000 (1.000-1.000) |" in card
    assert "## Robustness (acquisition shifts, test)\nNot run" in card


def test_the_card_reports_shifts_offsets_and_an_unregistered_model():
    shifts = {"shift/test/clean": 0.7, "shift/test/score": 0.6, "shift/test/drop": 0.1, "shift/test/worst": 0.4}
    facts = run_facts(registered=None, provenance={"git.commit": "0123abc", "git.dirty": "true"})
    facts = dataclasses.replace(
        facts,
        metrics=facts.metrics | shifts,
        decision={"tta": False, "temperature": 1.0, "offsets": [0.5, 0, 0, 0, -0.25, 0, 0]},
        config=facts.config | {"model": facts.config["model"] | {"pretrained": False}},
        subgroups=None,
    )
    card = model_card(facts)
    assert card.startswith("# Model card: run run42\n") and "not registered" in card
    assert "clean 0.7000, mean over shifts 0.6000 (drop 0.1000), worst condition 0.4000" in card
    assert "akiec +0.500, bcc +0.000" in card and "mel -0.250" in card
    assert "trained from scratch" in card and "uncommitted changes" in card
    assert "## Results by subgroup (test)\nNot computed." in card


def test_a_long_card_is_cut_to_fit_the_registry_by_its_longest_sections():
    card = model_card(run_facts())
    assert fit_description(card, "model_card.md in run run42", limit=len(card)) == card  # fits: unchanged
    limit = len(card) - 10
    cut = fit_description(card, "model_card.md in run run42", limit=limit)
    assert len(cut) <= limit and "## Known limitations" in cut and cut.startswith("# Model card")
    assert "left out: Results by subgroup (test)); the full text is model_card.md in run run42" in cut
    assert len(fit_description(card, "there", limit=300)) <= 300
    assert fit_description(card * 2, "there", limit=None) == card * 2  # SQLite: no limit to fit


def test_the_card_says_when_the_guard_lets_the_probe_images_through():
    # a from-scratch ViT-Tiny's guard flagged 0 of 16 photographs on HAM10000: its flag must not be read as a check
    guard = {"ood/threshold": 20.0, "ood/val_flagged": 0.05, "ood/test_flagged": 0.05, "ood/generated_flagged": 1.0}
    strong = guard_line(guard | {"ood/photos_flagged": 1.0})
    weak = guard_line(guard | {"ood/photos_flagged": 0.0})
    assert "0% of the non-dermoscopy photographs" in weak and "do not rely on its flag" in weak
    assert "100% of the non-dermoscopy photographs" in strong and "do not rely" not in strong


def test_the_card_scores_the_isic_2018_test_set_where_evaluate_did():
    isic = {
        "isic2018_test/balanced_accuracy": 0.6512,
        "isic2018_test/balanced_accuracy_ci_low": 0.6,
        "isic2018_test/balanced_accuracy_ci_high": 0.7,
        "isic2018_test/macro_roc_auc": 0.9,
    }
    referral = {"referral/target": 0.9, "referral/val/decided_balanced_accuracy": 0.91, "referral/val/coverage": 0.4}
    referral |= {"referral/test/decided_balanced_accuracy": 0.92, "referral/test/coverage": 0.38}
    referral |= {"referral/isic2018_test/decided_balanced_accuracy": 0.8, "referral/isic2018_test/coverage": 0.25}
    facts = run_facts()
    card = model_card(dataclasses.replace(facts, metrics=facts.metrics | isic | referral))
    assert "| metric | val (served) | test | ISIC 2018 test |" in card
    assert metric_row(card, "balanced accuracy")[2] == "0.6512 (95% CI 0.6000-0.7000)"
    assert metric_row(card, "melanoma sensitivity") == ["n/a", "0.6100", "n/a"]
    assert "on test 38.0% at 0.9200, on the ISIC 2018 test set 25.0% at 0.8000 (reports/risk_coverage.csv)" in card
    assert "| metric | val (served) | test |\n" in model_card(facts) and "ISIC" not in model_card(facts)


def test_the_card_says_when_the_referral_rule_decides_nothing():
    # a from-scratch model reached no 0.90 on any share of val: every case referred, no "0.0% decided at 0.0000"
    referral = {"referral/target": 0.9, "referral/val/coverage": 0.0, "referral/val/decided_balanced_accuracy": 0.0}
    line = referral_line(referral | {"referral/test/coverage": 0.0}, float(np.float32(REFER_ALL)))  # as stored
    assert "every case is referred" in line and "0.0000" not in line
    assert "decided on val 35.0% at 0.9100" in referral_line(
        referral
        | {
            "referral/val/coverage": 0.35,
            "referral/val/decided_balanced_accuracy": 0.91,
            "referral/test/coverage": 0.3,
            "referral/test/decided_balanced_accuracy": 0.92,
        },
        0.8,
    )
