"""Tuned values written into params.yaml in place (comments kept), and the command to run next."""

from __future__ import annotations

import io
from pathlib import Path

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.representer import RoundTripRepresenter

from src.config import parse_params
from src.fileio import write_text


class ParamsYamlRepresenter(RoundTripRepresenter):
    """Writes values as params.yaml spells them: `null`, and floats that YAML 1.1 readers (PyYAML) parse."""

    def represent_none(self, data: None):
        return self.represent_scalar("tag:yaml.org,2002:null", "null")

    def represent_float(self, data: float):
        text = repr(data)
        if "e" in text and "." not in text:  # PyYAML reads 1e-05 as a string, 1.0e-05 as a float
            text = text.replace("e", ".0e", 1)
        return self.represent_scalar("tag:yaml.org,2002:float", text)


ParamsYamlRepresenter.add_representer(type(None), ParamsYamlRepresenter.represent_none)
ParamsYamlRepresenter.add_representer(float, ParamsYamlRepresenter.represent_float)


def apply_to_params_file(path: Path, sections: dict[str, dict[str, float]]) -> None:
    """Write tuned values into a params file in place, keeping its comments and layout (atomic write)."""
    rt = YAML()  # round-trip: comments, key order and flow style survive
    rt.Representer = ParamsYamlRepresenter
    rt.width = 4096
    doc = rt.load(path.read_text()) or {}
    for section, values in sections.items():
        if doc.get(section) is None:
            doc[section] = {}
        doc[section].update(values)
    out = io.StringIO()
    rt.dump(doc, out)
    parse_params(yaml.safe_load(out.getvalue()), path)  # never leave a file the stages cannot read
    write_text(path, out.getvalue())


def next_command(sections: dict[str, dict[str, float]], applied: bool) -> str:
    if applied:
        return "params.yaml updated with the best trial; next: dvc repro"
    sets = " ".join(f"-S {s}.{k}={v!r}" for s, values in sections.items() for k, v in values.items())
    return f"next: dvc exp run {sets}\n  (or rerun with --apply to write them into params.yaml, then dvc repro)"
