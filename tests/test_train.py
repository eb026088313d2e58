"""Train, evaluate and predict on tiny synthetic data with a real MLflow sqlite store."""

from __future__ import annotations

import base64
import filecmp
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from src import predict
from src.compare import main as compare_main
from src.config import CLASSES
from src.fileio import write_json
from src.ingest.download import SOURCE_FILE
from src.ingest.rawdata import ISIC_TEST, DataError
from src.ingest.synthetic import make_dataset
from src.learn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from src.learn.explain import check_explainable
from src.learn.inference import (
    ISIC_COLUMNS,
    classify,
    load_from_checkpoint,
    load_trained,
    predict_files,
    probabilities,
)
from src.learn.metrics import balanced_accuracy
from src.learn.shifts import conditions
from src.learn.training import load_train_data
from src.learn.triage import FLAG_COLUMNS
from src.prepare.imaging import load_image
from src.prepare.split import split
from src.tracking.evaluate_run import evaluate
from src.tracking.models import load_from_mlflow
from src.tracking.registry import HEADLINE
from src.tracking.train_run import train
from tests.conftest import clean_environ, make_tiny_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def prepared(tiny_params, synthetic_raw):
    """tiny_params with the split stage run on the synthetic data."""
    split(synthetic_raw, tiny_params.split, tiny_params.data, tiny_params.paths)
    return tiny_params


@pytest.fixture(scope="module")
def trained(synthetic_raw, tmp_path_factory):
    """One training run shared by the tests that only read its results, with colour constancy on so that every path
    that serves the model must apply it, and an ISIC 2018 test set beside HAM10000 for evaluate to score."""
    root = tmp_path_factory.mktemp("trained")
    raw = shutil.copytree(synthetic_raw, root / "raw")
    make_dataset(raw / ISIC_TEST, n_lesions=10, seed=9, duplicates=0)
    params = make_tiny_params(root)
    params = params.model_copy(
        update={
            "paths": params.paths.model_copy(update={"raw": raw}),
            "data": params.data.model_copy(update={"color_constancy": "shades_of_gray"}),
        }
    )
    split(raw, params.split, params.data, params.paths)
    return params, train(params)


def test_train_writes_model_reports_and_mlflow_run(trained):
    params, metrics = trained
    assert 0 <= metrics["val/balanced_accuracy"] <= 1
    ckpt = load_checkpoint(params.paths.models / "best.pt")
    assert ckpt["config"]["model"]["name"] == "test_vit" and ckpt["mlflow_run_id"]
    assert ckpt["config"]["data"]["shades_of_gray_power"] == 6.0
    assert load_trained(params.paths.models / "best.pt")[0].shades_of_gray_power == 6.0
    history = pd.read_csv(params.paths.reports / "train_history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"train/loss", "val/loss", "val/balanced_accuracy", "lr"} <= set(history.columns)
    mlflow.set_tracking_uri(params.tracking.uri)
    run = mlflow.get_run(ckpt["mlflow_run_id"])
    assert run.data.params["train.lr"] == str(params.train.lr)
    assert {"data.split_hash", "git.commit", "data.source"} <= set(run.data.tags)
    steps = MlflowClient().get_metric_history(run.info.run_id, "val/balanced_accuracy")
    assert [m.step for m in steps] == [1, 2]
    assert {d.dataset.name for d in run.inputs.dataset_inputs} == {"train", "val"}


@pytest.fixture(scope="module")
def evaluated(trained):
    """The trained run evaluated and registered once, with every part of the decision rule switched on."""
    params, _ = trained
    decision = {"tta": True, "prior_correction": True}  # so that every path must apply all of them
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(update=decision)})
    return params, evaluate(params)


def test_evaluate_registers_champion_and_predict_matches(evaluated, synthetic_raw):
    params, metrics = evaluated
    assert {"test/balanced_accuracy", "test/macro_roc_auc", "test/melanoma_sensitivity"} <= set(metrics)
    assert {"test/balanced_accuracy_no_correction", "test/balanced_accuracy_no_tta_no_correction"} <= set(metrics)
    for prefix in ("test", "val_served"):  # the served model on test, and on val (what promotion compares)
        low, high = metrics[f"{prefix}/balanced_accuracy_ci_low"], metrics[f"{prefix}/balanced_accuracy_ci_high"]
        assert 0 <= low <= metrics[f"{prefix}/balanced_accuracy"] <= high <= 1
    assert metrics["decision/tta"] == 1.0
    views = {k: metrics[f"decision/val_balanced_accuracy_views_{k}"] for k in (1, 2, 4, 8)}  # fewer TTA views
    assert (
        views[8] == metrics["decision/val_balanced_accuracy_tta"]
        and views[1] == metrics["decision/val_balanced_accuracy_plain"]
    )
    # calibration: a temperature fitted on val (NLL), kept by `auto` only where it lowers val ECE
    temperature = json.loads((params.paths.models / "decision.json").read_text())["temperature"]
    assert temperature == pytest.approx(metrics["decision/temperature"], abs=1e-4)
    fitted = metrics["decision/temperature_fitted"]
    assert fitted != 1.0  # a 2-epoch model is far from calibrated
    lowers_ece = metrics["decision/val_ece_fitted"] < metrics["decision/val_ece_uncalibrated"]
    assert metrics["decision/temperature"] == (fitted if lowers_ece else 1.0)
    assert metrics["decision/val_ece"] <= metrics["decision/val_ece_uncalibrated"]
    assert {"test/ece", "test/ece_uncalibrated", "test/brier", "test/brier_uncalibrated"} <= set(metrics)
    calibration = pd.read_csv(params.paths.reports / "calibration.csv")
    assert set(calibration["probabilities"]) == {"uncalibrated", "calibrated"}
    assert calibration.groupby("probabilities")["count"].sum().tolist() == [metrics["test/images"]] * 2
    for name in (
        "evaluate.json",
        "confusion.csv",
        "roc.csv",
        "confusion_matrix.png",
        "roc_curves.png",
        "reliability.png",
        "explanations.png",
    ):
        assert (params.paths.reports / name).stat().st_size > 0
    confusions = pd.read_csv(params.paths.reports / "confusions.csv")
    predictions = pd.read_csv(params.paths.reports / "predictions.csv")
    assert confusions["count"].sum() == (predictions["dx"] != predictions["predicted"]).sum()
    for name, suffix in (("test", ""), ("val", "_val")):  # the shift report: every condition, and its summary
        table = pd.read_csv(params.paths.reports / f"shift{suffix}.csv")
        assert len(table) == 1 + len(conditions()) and table["shift"].iloc[0] == "clean"
        shifted = table["balanced_accuracy"].iloc[1:]
        assert metrics[f"shift/{name}/score"] == pytest.approx(shifted.mean(), abs=1e-4)
        assert metrics[f"shift/{name}/drop"] == pytest.approx(metrics[f"shift/{name}/clean"] - shifted.mean(), abs=1e-4)
        assert metrics[f"shift/{name}/jpeg_3"] == pytest.approx(
            table.set_index("condition").at["jpeg 3", "balanced_accuracy"], abs=1e-4
        )
        assert (params.paths.reports / f"shift{suffix}.png").stat().st_size > 0
    for name, prefix, suffix in (("test", "test", ""), ("val", "val_served", "_val")):  # results by subgroup
        table = pd.read_csv(params.paths.reports / f"subgroups{suffix}.csv", keep_default_na=False)
        served = pd.read_csv(params.paths.reports / f"predictions{suffix}.csv")
        overall = table.iloc[0]
        assert (overall["images"], overall["lesions"]) == (len(served), served["lesion_id"].nunique())
        for column, key in (("balanced_accuracy", ""), ("ci_low", "_ci_low"), ("ci_high", "_ci_high")):
            assert overall[column] == pytest.approx(metrics[f"{prefix}/balanced_accuracy{key}"], abs=1e-4)
        for grouping, rows in table.iloc[1:].groupby("grouping"):  # every image and lesion in one subgroup
            assert rows[["images", "lesions"]].sum().tolist() == [overall["images"], overall["lesions"]], grouping
        assert metrics[f"subgroup/{name}/sex/male/balanced_accuracy"] == pytest.approx(
            table.set_index(["grouping", "subgroup"]).at[("sex", "male"), "balanced_accuracy"], abs=1e-4
        )
        assert (params.paths.reports / f"subgroups{suffix}.png").stat().st_size > 0
    card = (params.paths.reports / "model_card.md").read_text()  # its numbers are evaluate.json's
    reported = json.loads((params.paths.reports / "evaluate.json").read_text())
    for row, keys in (
        (
            "balanced accuracy",
            [
                f"{p}/balanced_accuracy{k}"
                for p in ("val_served", "test", ISIC_TEST)
                for k in ("", "_ci_low", "_ci_high")
            ],
        ),
        ("macro ROC AUC", [f"{p}/macro_roc_auc" for p in ("val_served", "test", ISIC_TEST)]),
        ("melanoma sensitivity", [f"{p}/melanoma_sensitivity" for p in ("val_served", "test", ISIC_TEST)]),
    ):  # the ISIC 2018 test set (other clinics and devices) in a column of its own
        line = next(line for line in card.splitlines() if line.startswith(f"| {row} |"))
        assert [float(x) for x in re.findall(r"\d+\.\d+", line)] == pytest.approx([reported[k] for k in keys], abs=5e-5)
    assert f"clean {reported['shift/test/clean']:.4f}, mean over shifts {reported['shift/test/score']:.4f}" in card
    assert f"Temperature: {reported['decision/temperature']:.3f} served" in card
    client = MlflowClient(params.tracking.uri)
    name = f"{params.tracking.registered_model}-synthetic"  # trained on synthetic data
    assert not client.search_registered_models(f"name = '{params.tracking.registered_model}'")
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.description == card and card.startswith(f"# Model card: {name} version 1\n")  # the registry page
    run_id = champion.tags["run_id"]
    assert {"model_card.md", "evaluation"} <= {a.path for a in client.list_artifacts(run_id)}
    assert f"| {ISIC_TEST} | {reported[f'{ISIC_TEST}/images']} | 10 |" in card
    if reported["referral/val/coverage"] == 0:  # a 2-epoch model reaches the target on no share of val
        assert "every case is referred: this model decides nothing" in card
    else:
        assert f", on the ISIC 2018 test set {100 * reported[f'referral/{ISIC_TEST}/coverage']:.1f}% at" in card
    assert {"evaluation/subgroups.csv", "evaluation/subgroups_val.csv", f"evaluation/predictions_{ISIC_TEST}.csv"} <= {
        a.path for a in client.list_artifacts(run_id, "evaluation")
    }
    assert str(champion.version) == "1" and champion.tags["promotion"].startswith("first model")
    assert float(champion.tags["test/balanced_accuracy"]) == pytest.approx(metrics["test/balanced_accuracy"], 1e-3)
    assert set(champion.tags) == {
        "run_id",
        "data.source",
        "data.split_hash",
        "git.commit",
        "promotion",
        *HEADLINE,
        "val_served/balanced_accuracy",  # what promotion compared: the served model on val
    }  # the full metrics stay on the run

    # the MLflow model, its pyfunc flavour (what `mlflow models serve` runs) and predict --checkpoint all
    # reproduce evaluate's probabilities (TTA and prior correction included) for the same image files
    expected = pd.read_csv(params.paths.reports / "predictions.csv").head(6)
    files = [synthetic_raw / "images" / f"{image_id}.jpg" for image_id in expected["image_id"]]
    uri = f"models:/{name}@champion"
    from_registry, size = load_from_mlflow(uri, params.tracking.uri)
    from_checkpoint, _ = load_from_checkpoint(params.paths.models / "best.pt")
    explainable, _ = load_from_mlflow(uri, params.tracking.uri, explainable=True)  # eager, from what it carries
    check_explainable(explainable)
    for model in (from_registry, from_checkpoint, explainable):
        frame, failures = classify(model, files, size)
        assert not failures
        for ours, theirs in ISIC_COLUMNS.items():
            np.testing.assert_allclose(frame[ours], expected[theirs], atol=1e-5)
        assert_same_flags(frame, expected)
    # the served model on the val images is the decision fitted there; with the prior correction on, what
    # promotion compares is val scored with offsets fitted on the other half of its lesions
    val = pd.read_csv(params.paths.splits / "val.csv")
    _, val_probs, _ = probabilities(
        from_registry, [synthetic_raw / "images" / f"{i}.jpg" for i in val["image_id"]], size
    )
    assert balanced_accuracy(val["label"].to_numpy(), val_probs) == pytest.approx(
        metrics["decision/val_balanced_accuracy_corrected"], abs=1e-9
    )
    out_of_fold = metrics["decision/val_balanced_accuracy_corrected_out_of_fold"]
    assert metrics["val_served/balanced_accuracy"] == pytest.approx(out_of_fold, abs=1e-9)
    decision = params.paths.models / "decision.json"
    stale = json.loads(decision.read_text()) | {"checkpoint": "another-run:1"}
    decision.write_text(json.dumps(stale))  # a decision made for another model is not applied to this one
    assert not load_from_checkpoint(params.paths.models / "best.pt")[0].served.tta
    images = np.stack([load_image(f, size) for f in files])
    pyfunc = mlflow.pyfunc.load_model(uri)
    encoded = pd.DataFrame({"image": [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]})
    for served in (pyfunc.predict(images), pyfunc.predict(encoded)):  # pixels, or the JPEG files as base64
        assert list(served.columns) == [*CLASSES, *FLAG_COLUMNS]
        np.testing.assert_allclose(served[list(CLASSES)], expected[list(CLASSES)].to_numpy(), atol=1e-5)
        assert_same_flags(served, expected)

    evaluate(params)  # the same model again: not better, so it is challenger and the champion stays
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert str(challenger.version) == "2" and "does not beat champion v1" in challenger.tags["promotion"]
    assert challenger.tags["promotion"].startswith("val_served/balanced_accuracy ")
    assert "scored on this split" in challenger.tags["promotion"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert challenger.description == (params.paths.reports / "model_card.md").read_text()  # each version its own
    assert challenger.description.startswith(f"# Model card: {name} version 2\n")


def assert_same_flags(served: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The triage flags of a served answer are those evaluate wrote for the same images."""
    for flag in ("referred", "out_of_distribution"):
        assert served[flag].astype(bool).tolist() == expected[flag].astype(bool).tolist(), flag
    np.testing.assert_allclose(served["ood_distance"], expected["ood_distance"], rtol=1e-4)


def test_evaluate_fits_the_referral_rule_and_the_guard_on_val(evaluated):
    params, metrics = evaluated
    reports = params.paths.reports
    decision = json.loads((params.paths.models / "decision.json").read_text())
    assert decision["referral_threshold"] == pytest.approx(metrics["referral/threshold"], abs=1e-6)
    splits = (("val", "_val"), ("test", ""), (ISIC_TEST, f"_{ISIC_TEST}"))
    for name, suffix in splits:  # coverage is the share of rows the CSV marks decided
        rows = pd.read_csv(reports / f"predictions{suffix}.csv")
        decided = rows[list(CLASSES)].max(axis=1) >= metrics["referral/threshold"]
        assert (~rows["referred"]).tolist() == decided.tolist()
        assert metrics[f"referral/{name}/coverage"] == pytest.approx(decided.mean())
        assert metrics[f"ood/{name}_flagged"] == pytest.approx(rows["out_of_distribution"].mean())
        assert (rows["out_of_distribution"] == (rows["ood_distance"] > metrics["ood/threshold"])).all()
    assert metrics["ood/val_flagged"] <= 1 - params.evaluate.ood_keep  # the threshold keeps 95% of val
    isic = pd.read_csv(reports / f"predictions_{ISIC_TEST}.csv")  # every image of its 10 lesions, scored
    assert metrics[f"{ISIC_TEST}/images"] == len(isic) and isic["lesion_id"].nunique() == 10
    curve = pd.read_csv(reports / "risk_coverage.csv")
    assert set(curve["split"]) == {"val", "test", ISIC_TEST} and curve["coverage"].between(0, 1).all()
    probes = pd.read_csv(reports / "ood.csv").set_index("name")
    assert {"sklearn_china", "skimage_astronaut", "screenshot", "flat_white"} <= set(probes.index)
    photos = probes[probes["kind"] == "photo"]
    assert metrics["ood/photos_flagged"] == pytest.approx(photos["flagged"].astype(bool).mean())
    assert (reports / "risk_coverage.png").stat().st_size > 0


def test_evaluated_runs_compare_through_their_logged_predictions(evaluated, capsys):
    """The run logs the served model's predictions on test and val; `src.compare` reads them back by run id."""
    params, metrics = evaluated
    run_id = load_checkpoint(params.paths.models / "best.pt")["mlflow_run_id"]
    store = ["-S", f"tracking.uri={params.tracking.uri}", "--json"]
    for name, metric, local in (("test", "test", "predictions.csv"), ("val", "val_served", "predictions_val.csv")):
        assert compare_main([run_id, str(params.paths.reports / local), "--split", name, *store]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["first"] == pytest.approx(metrics[f"{metric}/balanced_accuracy"], abs=1e-9)
        assert result["difference"] == 0 and result["agree"] == 1


def test_a_champion_scored_on_another_split_is_rescored_on_this_one(trained, synthetic_raw, tmp_path):
    """Promotion compares scores on the same images: a champion from another split is loaded and scored again."""
    first, _ = trained
    params = make_tiny_params(tmp_path)
    shutil.copytree(first.paths.models, params.paths.models)
    paths = params.paths.model_copy(update={"raw": synthetic_raw})  # data/raw: the champion is scored from it
    tracking = first.tracking.model_copy(update={"registered_model": "rescored"})  # the run's store, a fresh name
    params = params.model_copy(update={"paths": paths, "tracking": tracking})
    split(synthetic_raw, params.split, params.data, params.paths)
    evaluate(params)
    reseeded = params.model_copy(update={"split": params.split.model_copy(update={"seed": 7})})
    split(synthetic_raw, reseeded.split, reseeded.data, reseeded.paths)  # another test split
    metrics = evaluate(reseeded)

    client = MlflowClient(params.tracking.uri)
    champion = client.get_model_version_by_alias("rescored-synthetic", "champion")
    challenger = client.get_model_version_by_alias("rescored-synthetic", "challenger")
    assert (str(champion.version), str(challenger.version)) == ("1", "2")
    assert champion.tags["data.split_hash"] != challenger.tags["data.split_hash"]
    # the same weights on the same val images score the same: no promotion, and the tag says what was compared
    score = f"{metrics['val_served/balanced_accuracy']:.4f}"
    assert challenger.tags["promotion"] == (
        f"val_served/balanced_accuracy {score} does not beat champion v1 {score} (rescored on this split)"
    )


def test_the_readme_path_ends_with_the_real_model_as_champion_and_predict_uses_it(
    trained, synthetic_raw, tmp_path, monkeypatch
):
    """The README's order: the synthetic try-out first, then real data (here: a HAM10000-layout folder given as
    `data.source: local`). The real model is champion under the real name and predict's default uses it."""
    first, _ = trained
    tracking = first.tracking.model_copy(update={"registered_model": "readme"})  # the run's store, a fresh name
    tryout = make_tiny_params(tmp_path / "tryout")
    shutil.copytree(first.paths.models, tryout.paths.models)
    tryout_paths = tryout.paths.model_copy(update={"raw": synthetic_raw})
    tryout = tryout.model_copy(update={"paths": tryout_paths, "tracking": tracking})
    split(synthetic_raw, tryout.split, tryout.data, tryout.paths)
    evaluate(tryout)  # the try-out's model: champion of readme-synthetic

    real_raw = tmp_path / "ham10000"
    shutil.copytree(synthetic_raw, real_raw)
    write_json(real_raw / SOURCE_FILE, {"source": "local"})  # as the download stage records a folder on disk
    real = make_tiny_params(tmp_path / "real")
    real = real.model_copy(
        update={
            "paths": real.paths.model_copy(update={"raw": real_raw}),
            "data": real.data.model_copy(update={"source": "local"}),
            "train": real.train.model_copy(update={"seed": 7}),  # other weights than the try-out's
            "tracking": tracking,
        }
    )
    split(real_raw, real.split, real.data, real.paths)
    train(real)
    evaluate(real)

    client = MlflowClient(tracking.uri)
    real_run = load_checkpoint(real.paths.models / "best.pt")["mlflow_run_id"]
    champion = client.get_model_version_by_alias("readme", "champion")
    assert champion.run_id == real_run and champion.tags["data.source"] == "local"
    assert client.get_model_version_by_alias("readme-synthetic", "champion").run_id != real_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"tracking": {"uri": tracking.uri, "registered_model": "readme"}})
    )
    expected = pd.read_csv(real.paths.reports / "predictions.csv").head(5)
    files = [str(real_raw / "images" / f"{image_id}.jpg") for image_id in expected["image_id"]]
    assert predict.main([*files, "-o", "submission.csv"]) == 0  # no --model: the champion
    got = pd.read_csv("submission.csv").set_index("image").loc[expected["image_id"]]
    for ours, theirs in ISIC_COLUMNS.items():
        np.testing.assert_allclose(got[ours], expected[theirs], atol=1e-5)
    tryout_expected = pd.read_csv(tryout.paths.reports / "predictions.csv").set_index("image_id")
    assert not np.allclose(got["MEL"], tryout_expected.loc[expected["image_id"], "mel"], atol=1e-3)


def test_predict_reports_unreadable_files_and_goes_on(trained, synthetic_raw, tmp_path):
    params, _ = trained
    good = next((synthetic_raw / "images").glob("*.jpg"))
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    model, size = load_from_checkpoint(params.paths.models / "best.pt")
    out = tmp_path / "sub.csv"
    assert predict_files([good, bad], out, model, size) == 1
    frame = pd.read_csv(out)
    assert list(frame.columns) == ["image", *ISIC_COLUMNS, *FLAG_COLUMNS]
    assert list(frame["image"]) == [good.stem]
    assert frame.loc[0, list(ISIC_COLUMNS)].sum() == pytest.approx(1, abs=1e-5)
    assert predict_files([good, bad], out, model, size, flags=False) == 1  # --isic: exactly a submission
    assert list(pd.read_csv(out).columns) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def test_predict_explain_writes_a_map_per_image(evaluated, synthetic_raw, tmp_path):
    params, _ = evaluated
    files = [str(f) for f in sorted((synthetic_raw / "images").glob("*.jpg"))[:3]]
    champion = f"models:/{params.tracking.registered_model}-synthetic@champion"
    sources = {"checkpoint": ["--checkpoint", str(params.paths.models / "best.pt")], "registry": ["--model", champion]}
    for name, source in sources.items():  # the registered model carries the checkpoint it was exported from
        out = tmp_path / name
        args = [*files, "-o", str(tmp_path / f"{name}.csv"), *source, "--explain", str(out)]
        assert predict.main([*args, "-S", f"tracking.uri={params.tracking.uri}"]) == 0
        assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(f).stem}.png" for f in files)
        assert all(Image.open(p).size[0] > 100 for p in out.iterdir())
    assert filecmp.cmp(tmp_path / "checkpoint.csv", tmp_path / "registry.csv", shallow=False)


def test_predict_in_bf16_runs_the_registered_model_under_autocast(evaluated, synthetic_raw, tmp_path):
    params, _ = evaluated
    files = [str(f) for f in sorted((synthetic_raw / "images").glob("*.jpg"))[:4]]
    champion = f"models:/{params.tracking.registered_model}-synthetic@champion"
    frames = {}
    for precision in ("fp32", "bf16"):  # bf16 takes the eager model the registered one carries (the export cannot)
        out = tmp_path / f"{precision}.csv"
        argv = [*files, "-o", str(out), "--model", champion, "--precision", precision]
        assert predict.main([*argv, "-S", f"tracking.uri={params.tracking.uri}"]) == 0
        frames[precision] = pd.read_csv(out).set_index("image")[list(ISIC_COLUMNS)]
    difference = (frames["bf16"] - frames["fp32"]).abs().to_numpy()
    assert 0 < difference.max() < 0.05  # bf16 arithmetic: close, not the same numbers


def test_predict_without_a_tracking_store_says_so_and_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default params: tracking.uri sqlite:///mlflow.db, which does not exist here
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("")
    Image.new("RGB", (40, 30)).save(tmp_path / "lesion.jpg")
    assert predict.main(["lesion.jpg", "-o", "out.csv"]) == 1
    assert "no MLflow store at mlflow.db" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["lesion.jpg", "params.yaml"]  # no empty store, no half-written CSV


def test_missing_cache_is_a_clear_error(prepared):
    (prepared.paths.cache / "images.npy").unlink()
    with pytest.raises(DataError, match="run `python -m src.split`"):
        load_train_data(prepared)


def test_checkpoint_errors(trained, tmp_path):
    params, _ = trained
    best = params.paths.models / "best.pt"
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(best.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_trained(corrupt)
    other = load_checkpoint(best)
    other["config"]["model"]["name"] = "vit_tiny_patch16_224"
    save_checkpoint(tmp_path / "other.pt", other)
    with pytest.raises(CheckpointError, match="vit_tiny_patch16_224"):
        load_trained(tmp_path / "other.pt")


def _write_params(params, path):
    path.write_text(yaml.safe_dump(params.model_dump(mode="json")))
    return path


def _run_train(params_file, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "src.train", "--params", str(params_file)],
        cwd=cwd,
        env=clean_environ(),  # the params file's tracking store, not one an earlier test left in the environment
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.e2e
def test_killed_training_resumes_and_matches_uninterrupted(prepared, tmp_path):
    # 10 epochs, polled every 50 ms: on an AMD Zen 5 the tiny run went from epoch 1 to the end of 3 inside one poll
    epochs = 10
    slow = prepared.model_copy(update={"train": prepared.train.model_copy(update={"epochs": epochs})})
    # an uninterrupted reference run with the same params, writing elsewhere
    ref = slow.model_copy(
        update={
            "paths": slow.paths.model_copy(update={"models": tmp_path / "ref_models", "reports": tmp_path / "ref_rep"}),
        }
    )
    (tmp_path / "ref_rep").mkdir()
    (tmp_path / "ref_rep" / "split.json").write_text((slow.paths.reports / "split.json").read_text())
    params_file = _write_params(slow, tmp_path / "params.yaml")
    proc = _run_train(params_file, REPO)
    last = slow.paths.models / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(last)["epoch"]
    assert 1 <= killed_at < epochs
    with pytest.raises(CheckpointError, match="training has not finished; .* resumes it"):
        evaluate(slow)
    resumed = _run_train(params_file, REPO)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err.decode()[-2000:]
    assert f"resuming from epoch {killed_at}" in err.decode()
    history = pd.read_csv(slow.paths.reports / "train_history.csv")
    assert list(history["epoch"]) == list(range(1, epochs + 1))

    reference = subprocess.run(
        [sys.executable, "-m", "src.train", "--params", str(_write_params(ref, tmp_path / "ref.yaml"))],
        cwd=REPO,
        env=clean_environ(),
        capture_output=True,
    )
    assert reference.returncode == 0, reference.stderr.decode()[-2000:]
    expected = pd.read_csv(tmp_path / "ref_rep" / "train_history.csv")
    cols = ["train/loss", "val/loss", "val/balanced_accuracy"]
    np.testing.assert_allclose(history[cols].to_numpy(), expected[cols].to_numpy(), rtol=1e-5)
    a = load_checkpoint(slow.paths.models / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "ref_models" / "best.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_progressive_resizing_keeps_a_model_at_the_final_size_that_evaluate_and_predict_use(prepared, synthetic_raw):
    """Early epochs at 16 px, the last at data.image_size (32): the kept checkpoint is a plain 32 px model, loaded
    by load_trained as evaluate and predict load it (evaluate itself is left out to keep this test short)."""
    params = prepared.model_copy(
        update={
            "model": prepared.model.model_copy(update={"patch_size": 8}),  # 2x2 tokens early, 4x4 at the end
            "train": prepared.train.model_copy(update={"epochs": 3, "progressive_size": 16, "ema_decay": 0.9}),
        }
    )
    train(params)
    history = pd.read_csv(params.paths.reports / "train_history.csv")
    assert list(history["train/image_size"]) == [16, 16, 32]
    best = load_checkpoint(params.paths.models / "best.pt")
    assert best["epoch"] == 3 and best["config"]["data"]["image_size"] == 32
    assert best["model"]["backbone.pos_embed"].shape[1] == 1 + 4 * 4
    mlflow.set_tracking_uri(params.tracking.uri)
    steps = MlflowClient().get_metric_history(best["mlflow_run_id"], "train/image_size")
    assert [(m.step, m.value) for m in steps] == [(1, 16), (2, 16), (3, 32)]
    model, size = load_from_checkpoint(params.paths.models / "best.pt")
    assert size == 32
    files = sorted((synthetic_raw / "images").glob("*.jpg"))[:3]
    _, probs, failures = probabilities(model, files, size)
    assert not failures and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
