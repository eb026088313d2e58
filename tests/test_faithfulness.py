"""`python -m src.faithfulness` on a tiny split and checkpoint: the table printed and written, and a clear error."""

from __future__ import annotations

import pandas as pd
import yaml

from src.faithfulness import main
from src.learn.checkpoint import save_checkpoint
from src.learn.faithfulness import REFERENCES
from src.learn.model import build_model
from src.prepare.split import split


def test_the_command_measures_each_method_on_a_balanced_subset(tiny_params, synthetic_raw, tmp_path, capsys):
    params = tiny_params.model_copy(update={"model": tiny_params.model.model_copy(update={"patch_size": 8})})
    split(synthetic_raw, params.split, params.data, params.paths)
    model = build_model(params.model, params.data.image_size)
    config = {"model": params.model.model_dump(mode="json"), "data": params.data.model_dump(mode="json")}
    save_checkpoint(params.paths.models / "best.pt", {"model": model.state_dict(), "config": config})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json")))

    argv = ["--params", str(params_file), "--images", "7", "--steps", "4", "--methods", "rollout", "grad_cam"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(params.paths.reports / "faithfulness.csv")
    assert table["method"].tolist() == ["rollout", "grad_cam", *REFERENCES]
    assert (table["images"] == 7).all() and (table["steps"] == 4).all()
    assert "deletion AUC (lower better)" in out and "most faithful: " in out and "grad_cam" in out
    assert out.strip().endswith(str(params.paths.reports / "faithfulness.csv"))

    bigger = {**config, "data": {**config["data"], "image_size": 64}}  # a model trained at another size
    save_checkpoint(tmp_path / "other.pt", {"model": build_model(params.model, 64).state_dict(), "config": bigger})
    assert main([*argv[:2], "--checkpoint", str(tmp_path / "other.pt"), "-o", str(tmp_path / "x.csv")]) == 1
    assert "images are 32 px but the model was trained at 64 px" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
