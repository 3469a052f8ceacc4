"""What `save_pretrained` leaves and what `from_pretrained` refuses (issue 24): no lock files in a saved folder, damaged
weight files detected by their recorded SHA-256, NaN weights refused, a config with fewer layers than its weights
warned about with the count, absurd depths refused."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch

from reformer_rev import RevFormerConfig, RevFormerForCausalLM
from reformer_rev.safe_io import CHECKSUMS_NAME, CorruptedFileError, read_checksums


def small(**overrides) -> RevFormerForCausalLM:
    torch.manual_seed(0)
    kw = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    return RevFormerForCausalLM(RevFormerConfig(**{**kw, **overrides}))


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "model"
    small().save_pretrained(folder)
    return folder


def test_a_saved_folder_keeps_no_lock_files_and_records_checksums(saved):
    small().save_pretrained(saved)  # a second save into the same folder
    names = {p.name for p in saved.iterdir()}
    assert not {n for n in names if n.startswith(".")}, names  # before: .save.lock and .save.intent stayed
    assert set(read_checksums(saved)) == {"model.safetensors"}
    RevFormerForCausalLM.from_pretrained(saved)


def test_folders_saved_by_earlier_versions_still_load_and_lose_their_lock_files(saved):
    (saved / ".save.lock").touch()
    (saved / ".save.intent").touch()
    (saved / CHECKSUMS_NAME).unlink()  # an earlier version recorded none: nothing to verify
    RevFormerForCausalLM.from_pretrained(saved)
    small().save_pretrained(saved)
    assert not (saved / ".save.lock").exists() and not (saved / ".save.intent").exists()


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return data, n, json.loads(data[8 : 8 + n])


def _rewrite_header(path, edit):
    data, n, header = _header(path)
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(n)  # same length: the data stays where it was
    assert len(raw) == n
    path.write_bytes(data[:8] + raw + data[8 + n :])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[-200] ^= 0xFF
    path.write_bytes(bytes(data))


def _dtype(header):  # F32 -> I32: same sizes, other numbers
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "I32"


def _offsets(header):  # two tensors of the same size swap their data
    same = {}
    for k, v in header.items():
        if k != "__metadata__":
            same.setdefault(tuple(v["shape"]), []).append(k)
    a, b = next(names for names in same.values() if len(names) >= 2)[:2]
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


@pytest.mark.parametrize("damage", ["flipped bytes", "dtype in the header", "offsets in the header"])
def test_damaged_weights_are_refused_naming_the_file(saved, damage):
    weights = saved / "model.safetensors"
    {"flipped bytes": _flip, "dtype in the header": lambda p: _rewrite_header(p, _dtype),
     "offsets in the header": lambda p: _rewrite_header(p, _offsets)}[damage](weights)
    with pytest.raises(CorruptedFileError, match=rf"{weights}: its SHA-256 \w+… differs from the \w+… its save "
                                                 rf"recorded in .*{CHECKSUMS_NAME}"):
        RevFormerForCausalLM.from_pretrained(saved)


def test_nan_weights_are_refused_unless_allowed(tmp_path):
    model = small()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"hold NaN/inf values in 1 tensor\(s\), e.g. \['model.layers.1.mlp.up_proj.weight'\]"):
        RevFormerForCausalLM.from_pretrained(tmp_path / "nan")
    loaded = RevFormerForCausalLM.from_pretrained(tmp_path / "nan", allow_nonfinite_weights=True)
    assert torch.isnan(loaded.model.layers[1].mlp.up_proj.weight[0, 0])


def test_a_config_with_fewer_layers_than_the_weights_warns_with_the_count(saved, caplog):
    config = json.loads((saved / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (saved / "config.json").write_text(json.dumps(config))  # editing the config by hand stays possible
    with caplog.at_level(logging.WARNING):
        model = RevFormerForCausalLM.from_pretrained(saved)
    assert len(model.model.layers) == 1
    assert any("holds the weights of 2 more layer(s) (layers 1-2)" in r.getMessage() for r in caplog.records)


def test_absurd_depths_are_refused_before_anything_is_built():
    with pytest.raises(ValueError, match=r"`num_hidden_layers` \(1000000000\) is beyond what this model can build"):
        RevFormerConfig(num_hidden_layers=10**9)
    assert RevFormerConfig(num_hidden_layers=20000, num_unique_layers=2).num_hidden_layers == 20000  # weight-tied
