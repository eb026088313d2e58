from pathlib import Path

import pytest
import yaml

from src.config import ConfigError, Params, apply_overrides, flatten, load_params

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert params.split.val_fraction + params.split.test_fraction < 1
    assert params.tracking.uri == "sqlite:///mlflow.db"


def test_repository_params_state_the_defaults():
    # params.yaml is the documented set of defaults: a default changed in one place only would run `dvc repro`
    # with the old value while the docs (and `Params()`) say the new one.
    assert load_params(REPO / "params.yaml").model_dump() == Params().model_dump()


def test_repository_params_name_every_key():
    # `dvc exp run -S section.key=value` (every profile's command) can only set a key params.yaml already has:
    # model.stem was missing, and the from-scratch profile's command failed with "Key 'stem' is not in struct"
    written = yaml.safe_load((REPO / "params.yaml").read_text())

    def in_file(key: str) -> bool:
        node = written
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert [key for key in flatten(Params()) if not in_file(key)] == []


def test_unknown_key_names_key_and_allowed_values(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, "train:\n  learning_rate: 0.1\n"))
    message = str(err.value)
    assert "params.yaml" in message and "train.learning_rate" in message and "lr" in message


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="trian"):
        load_params(write(tmp_path, "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("split:\n  val_fraction: -0.1\n", "split.val_fraction"),
        ("split:\n  val_fraction: 0.5\n  test_fraction: 0.45\n", "sum"),
        ("data:\n  source: ftp\n", "kaggle"),
        ("data:\n  source: local\n", "local_path"),
        ("train:\n  lr: -1\n", "train.lr"),
        ("model:\n  stem: conv\n", "model.stem: conv replaces"),
        ("tune:\n  lr: [0.1, 0.001]\n", "lower bound"),
        ("tune:\n  weight_decay: [0.0, 0.1]\n", "log scale"),
        ("train:\n  progressive_size: 224\n", r"train.progressive_size \(224\) must be below data.image_size"),
        ("train:\n  progressive_size: 8\n", "train.progressive_size"),
        ("train:\n  epochs: 3\n  progressive_size: 128\n  progressive_final_epochs: 3\n", "progressive_final_epochs"),
        ("train:\n  progressive_final_epochs: 0\n", "train.progressive_final_epochs"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_params(write(tmp_path, text))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="YAML"):
        load_params(write(tmp_path, "train: [unclosed\n"))


def test_overrides_apply_and_validate():
    params = apply_overrides(Params(), ["train.lr=0.01", "model.name=test_vit", "train.augment.flips=false"])
    assert params.train.lr == 0.01 and params.model.name == "test_vit" and not params.train.augment.flips
    with pytest.raises(ConfigError, match="train.epochs"):
        apply_overrides(Params(), ["train.epochs=0"])
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(Params(), ["lr"])


def test_flatten_gives_dotted_keys():
    flat = flatten(Params())
    assert flat["train.augment.flips"] is True and flat["model.name"] == "deit_small_patch16_224"
