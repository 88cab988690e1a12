"""Bad flag values of gen_descriptions, train, reproduce, export and datasets check (issue 15, items 3 and 4).

Each is refused with one ``error:`` line naming the flag, exit status 2, before any work and before
torch is imported (every command here runs in a fresh interpreter that reports whether torch was
loaded), and nothing is created at the output path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_TIMEOUT

REPO = Path(__file__).resolve().parents[1]

RUN = """
import sys
main = __import__(sys.argv[1], fromlist=["main"]).main
code = main(sys.argv[2:])
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""

HUGE = str(2**70)


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"classname": "dog", "description": "A dog."}) + "\n")
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "data").mkdir()
    return {"{tmp}": str(tmp_path), "{classes}": str(tmp_path / "classes.txt"), "{desc}": str(tmp_path / "d.jsonl"),
            "{afile}": str(tmp_path / "afile"), "{data}": str(tmp_path / "data")}


GEN = ["--classes", "{classes}", "--out", "{tmp}/out/g.jsonl", "--model", "m", "--base-url", "http://127.0.0.1:9/v1",
       "--no-progress"]
TRAIN = ["--descriptions", "{desc}", "--model", "tiny-clip", "--pretrained", "random", "--quiet"]
TRAIN_OUT = ["--out", "{tmp}/out/t.safetensors"]
REPRODUCE = ["protext-cross-dataset", "--root", "{data}", "--pretrained", "random"]
REPRODUCE_OUT = ["--out", "{tmp}/out"]

CASES = [
    # gen_descriptions: numbers out of range, NaN and inf, malformed settings
    ("protext.gen_descriptions", GEN + ["--timeout", "nan"], "--timeout must be a number of seconds above 0"),
    ("protext.gen_descriptions", GEN + ["--timeout", "inf"], "--timeout must be a number of seconds above 0"),
    ("protext.gen_descriptions", GEN + ["--timeout", "0"], "--timeout must be a number of seconds above 0"),
    ("protext.gen_descriptions", GEN + ["--timeout", "1e9"], "--timeout must be a number of seconds above 0"),
    ("protext.gen_descriptions", GEN + ["--concurrency", "1000000"], "--concurrency must be <= 1024"),
    ("protext.gen_descriptions", GEN + ["--max-retries", "-1"], "--max-retries must be >= 0"),
    ("protext.gen_descriptions", GEN + ["--max-retries", "1000"], "--max-retries must be <= 100"),
    ("protext.gen_descriptions", GEN + ["--attempts", "0"], "--attempts must be >= 1"),
    ("protext.gen_descriptions", GEN + ["--attempts", "1000"], "--attempts must be <= 100"),
    ("protext.gen_descriptions", GEN + ["--n-per-query", "1000"], "--n-per-query must be <= 128"),
    ("protext.gen_descriptions", GEN + ["--max-tokens", "0"], "--max-tokens must be >= 1"),
    ("protext.gen_descriptions", GEN + ["--seed", HUGE], "--seed must fit in 64 bits"),
    ("protext.gen_descriptions", GEN + ["--api-key-env", ""], "--api-key-env must name an environment variable"),
    ("protext.gen_descriptions", GEN[:-3] + ["--base-url", "ftp://host/v1", "--no-progress"], "--base-url 'ftp://host/v1' is not an http(s) URL"),
    # train: what the presets' own checks let through, the input files and the output path
    ("protext.train", TRAIN + TRAIN_OUT + ["--lr", "inf"], "--lr must be a finite number"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--loss-weight", "inf"], "--loss-weight must be a finite number"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--lr", "nan"], "--lr must be positive"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--epochs", "1000000000"], "--epochs must be at most"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--n-ctx", "1000"], "--n-ctx must be at most"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--batch-size", "0"], "--batch-size must be at least 1"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--seed", HUGE], "--seed must be between"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--resume", "--overwrite"], "--resume and --overwrite contradict"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--classes", "{tmp}/nope.txt"], "--classes {tmp}/nope.txt: no such file"),
    ("protext.train", ["--descriptions", "{tmp}/nope.jsonl"] + TRAIN[2:] + TRAIN_OUT, "--descriptions {tmp}/nope.jsonl: no such file"),
    ("protext.train", TRAIN + ["--out", "{afile}/t.safetensors"], "--out {afile}/t.safetensors: {afile} is a file"),
    ("protext.train", TRAIN + ["--out", "{tmp}/out/t.pt"], "the file name must end in .safetensors"),
    ("protext.train", TRAIN + TRAIN_OUT + ["--cache-dir", "{afile}"], "--cache-dir {afile} is a file"),
    # reproduce: --workers / --batch-size / --seed bounds and an --out that is a file
    ("protext.reproduce", REPRODUCE + REPRODUCE_OUT + ["--workers", "1000000"], "--workers must be between 0 and"),
    ("protext.reproduce", REPRODUCE + REPRODUCE_OUT + ["--workers", "-1"], "--workers must be between 0 and"),
    ("protext.reproduce", REPRODUCE + REPRODUCE_OUT + ["--batch-size", "0"], "--batch-size must be between 1 and"),
    ("protext.reproduce", REPRODUCE + REPRODUCE_OUT + ["--seed", HUGE], "--seed must be between"),
    ("protext.reproduce", REPRODUCE + ["--out", "{afile}"], "--out {afile} is a file, not a directory"),
    ("protext.reproduce", REPRODUCE + REPRODUCE_OUT + ["--model", "tiny-clip", "--depth", "3"],
     "--depth 3: tiny-clip's text tower has only 2 blocks; pass --depth 2 or less."),
    # export and datasets check: inputs that need no model are checked before torch
    ("protext.export", ["--format", "coop", "{tmp}/nope.safetensors", "{tmp}/out/o.pth"], "{tmp}/nope.safetensors: no such prompt checkpoint"),
    ("protext.datasets.__main__", ["check", "--root", "{data}", "--splits", "{tmp}/nope"], "--splits {tmp}/nope: no such folder"),
]


@pytest.mark.parametrize("module, argv, message", CASES, ids=[f"{m.split('.')[-1]} {' '.join(a[-2:])}" for m, a, _ in CASES])
def test_bad_value_is_one_line_before_torch(module: str, argv: list[str], message: str, inputs: dict[str, str]) -> None:
    def fill(text: str) -> str:
        for key, value in inputs.items():
            text = text.replace(key, value)
        return text

    env = dict(os.environ, OPENAI_API_KEY="sk-test", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", RUN, module, *map(fill, argv)], cwd=inputs["{tmp}"], env=env,
                          capture_output=True, text=True, timeout=TEST_TIMEOUT)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and fill(message) in lines[0], done.stderr
    assert "torch imported: False" in done.stdout
    assert not (Path(inputs["{tmp}"]) / "out").exists()  # nothing created


def test_reproduce_out_in_a_read_only_place_is_one_line(read_only_dir: Path, tmp_path: Path, capsys) -> None:
    from protext.reproduce import main

    (tmp_path / "data").mkdir()
    code = main(["protext-cross-dataset", "--root", str(tmp_path / "data"), "--out", str(read_only_dir / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out {read_only_dir / 'r'}: cannot write in {read_only_dir}"), err
    assert list(read_only_dir.iterdir()) == []
