"""``python -m protext.gen_descriptions`` against a real HTTP server speaking the OpenAI protocol.

Every run goes through the real ``openai`` client to ``tests/fake_openai_server.py`` on 127.0.0.1.
The fake answers depend only on (prompt, sample index), so the expected file content is known exactly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from protext import gen_descriptions as gen
from protext.descriptions import read_descriptions
from protext.descriptions.generation import unique_classes
from protext.descriptions.llm_client import clean_descriptions, split_sentences
from protext.descriptions.queries import ATTRIBUTE_TEMPLATES, CUPL_STYLE_QUERIES, format_query
from protext.gen_descriptions import main


def load_classnames(spec: str) -> list[str]:
    """The class list a generation uses: the shared reader, then one entry per class."""
    return unique_classes(gen._classes(spec))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import SHARED, TEST_TIMEOUT, reap, sigkill  # noqa: E402
from fake_openai_server import FakeOpenAIServer, expected_descriptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["gauzy", "cracked", "apple", "car_side", "Egyptian cat", "umbrella"]
N = 5  # samples per prompt: the fake's answers 0..4 cover filler, a duplicate and a refusal
SECRET = "sk-test-DO-NOT-LEAK-4f1c9a"


@pytest.fixture()
def classes_file(tmp_path: Path) -> Path:
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(CLASSES) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return SECRET


def expected_pairs(classes: list[str] = CLASSES, n: int = N) -> set[tuple[str, str, str]]:
    """(classname, prompt, description) of a complete run with --seed 0."""
    return {
        (c, format_query(t, c), d)
        for c in classes
        for t in CUPL_STYLE_QUERIES
        for d in expected_descriptions(format_query(t, c), n)
    }


def rows(path: Path) -> list[dict]:
    """Every line must parse on its own."""
    return [json.loads(line) for line in path.read_bytes().decode("utf-8").split("\n") if line]


def triples(path: Path) -> list[tuple[str, str, str]]:
    return [(r["classname"], r["prompt"], r["description"]) for r in rows(path)]


def args_for(server: FakeOpenAIServer, classes: Path, out: Path, *extra: str) -> list[str]:
    # A client timeout no healthy answer comes near, however loaded the machine: a healthy request
    # never times out, so counts of requests and retries are those of the faults alone. (A later
    # --timeout in ``extra`` wins; only a test of timeouts passes one, and it counts at least.)
    return [
        "--classes", str(classes), "--out", str(out), "--base-url", server.url, "--model", "fake-model",
        "--n-per-query", str(N), "--seed", "0", "--concurrency", "4", "--timeout", str(TEST_TIMEOUT),
        "--max-retries", "4", "--no-progress", *extra,
    ]


# -- clean runs and resuming -------------------------------------------------------------------------


def test_clean_run_writes_expected_lines_and_rerun_is_a_noop(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "llm_data" / "fake.jsonl"
    with FakeOpenAIServer() as server:
        assert main(args_for(server, classes_file, out)) == 0
        got = triples(out)
        assert len(got) == len(set(got)) == len(expected_pairs()) == len(CLASSES) * len(CUPL_STYLE_QUERIES) * 3
        assert set(got) == expected_pairs()
        assert {r["model"] for r in rows(out)} == {"fake-model"}
        assert list(read_descriptions(out)) == CLASSES  # every class, in class-list order
        summary = capsys.readouterr().out
        assert f"classes complete: {len(CLASSES)}/{len(CLASSES)}" in summary
        assert f"descriptions written: {len(got)} (30 units; 0 of 30 units were already cached)" in summary
        assert "tokens: 600 prompt +" in summary  # 30 requests x 20 prompt tokens, as the server reported

        first = server.log[0]["body"]
        assert first["model"] == "fake-model" and first["n"] == N and first["seed"] == 0
        assert first["max_tokens"] == 60 and first["temperature"] == 0.99
        assert first["messages"][0]["role"] == "system" and first["messages"][1]["role"] == "user"
        assert len(server.log) == 30

        before = out.read_bytes()
        assert main(args_for(server, classes_file, out)) == 0
        assert out.read_bytes() == before and len(server.log) == 30  # nothing asked, nothing written
        assert "0 units; 30 of 30 units were already cached" in capsys.readouterr().out


def test_fault_storm_ends_complete_without_duplicates(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    storm = ["429", "500", "malformed", "empty", "hang", "429", "429", "500", "malformed", "empty", "500", "hang"]
    out = tmp_path / "storm.jsonl"
    with FakeOpenAIServer(faults=storm) as server:
        # A "hang" is never answered, so its request times out whatever --timeout is; the short one
        # here only keeps the test quick. Faults are drawn one per request in arrival order, so each
        # is drawn exactly as often as listed. Budgets above the storm's totals (8 transport faults,
        # 4 unusable answers), so even one unlucky request that draws every fault recovers.
        code = main(args_for(server, classes_file, out, "--max-retries", "9", "--attempts", "5", "--timeout", "2"))
        counts = server.counts()
    report = capsys.readouterr().out
    assert code == 0, report
    assert counts["429"] == 3 and counts["500"] == 3 and counts["hang"] == 2
    assert counts["malformed"] == 2 and counts["empty"] == 2
    got = triples(out)
    assert len(got) == len(set(got)) and set(got) == expected_pairs()
    assert f"classes complete: {len(CLASSES)}/{len(CLASSES)}" in report
    # 3 x 429 + 3 x 500 + 2 timeouts at least; a healthy answer slowed past 2 s by a loaded machine
    # is one more timeout and retry, never a lost or doubled unit (checked above)
    retries = re.search(r"retries: (\d+) by the client", report)
    assert retries and int(retries.group(1)) >= 8, report
    assert "4 re-asked unusable answers" in report  # 2 malformed bodies + 2 empty choice lists


def test_failed_class_is_reported_then_resumed(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d.jsonl"
    broken = {"cracked": "500", "apple": "malformed", "umbrella": "empty"}

    def rule(prompt: str) -> Optional[str]:
        return next((fault for name, fault in broken.items() if name in prompt), None)

    with FakeOpenAIServer(fault_rule=rule) as server:
        code = main(args_for(server, classes_file, out, "--max-retries", "1", "--attempts", "2"))
        report = capsys.readouterr().out
        assert code == 1
        assert "classes complete: 3/6" in report and "FAILED classes: 3" in report
        assert "cracked: InternalServerError: Error code: 500 - The server had an error" in report
        assert "apple: unparsable response body (JSONDecodeError) after 2 attempts" in report
        assert "umbrella: empty choices list after 2 attempts" in report
        healthy = {t for t in expected_pairs() if t[0] not in broken}
        assert set(triples(out)) == healthy

        server.fault_rule = None
        sent_before = len(server.log)
        assert main(args_for(server, classes_file, out)) == 0
        assert len(server.log) - sent_before == 3 * len(CUPL_STYLE_QUERIES)  # only the failed units
        got = triples(out)
        assert len(got) == len(set(got)) and set(got) == expected_pairs()


@pytest.mark.parametrize(
    "quirk, note",
    [
        ({"refuse_n": True}, "server refuses n=5: sending 5 single-choice requests"),
        ({"ignore_n": True}, "server ignored n=5 (returned 1): sending single-choice requests"),
        ({"reasoning": True}, "server rejects max_tokens: sending max_completion_tokens instead"),
    ],
)
def test_server_quirks_fall_back_and_give_the_same_file(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, quirk: dict, note: str) -> None:
    out = tmp_path / "d.jsonl"
    with FakeOpenAIServer(**quirk) as server:
        assert main(args_for(server, classes_file, out)) == 0
        bodies = [e["body"] for e in server.log if e["outcome"] == "answer"]
    captured = capsys.readouterr()
    assert note in captured.err and note in captured.out
    got = triples(out)
    assert len(got) == len(set(got)) and set(got) == expected_pairs()
    if "reasoning" in quirk:
        assert all("max_tokens" not in b and b["max_completion_tokens"] == 60 and "temperature" not in b for b in bodies)
    else:
        singles = [b for b in bodies if "n" not in b]
        assert len(singles) >= len(bodies) - 4 and sorted({b["seed"] for b in singles}) == [0, 1, 2, 3, 4]


# -- SIGKILL at any moment -------------------------------------------------------------------------------


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    classes = [f"class {i:02d}" for i in range(12)]
    classes_file.write_text("\n".join(classes) + "\n")
    with FakeOpenAIServer() as server:
        whole = tmp_path / "whole.jsonl"
        assert main(args_for(server, classes_file, whole, "--concurrency", "2")) == 0

        killed = tmp_path / "killed.jsonl"
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "protext.gen_descriptions", *args_for(server, classes_file, killed, "--concurrency", "2")]
        stderr = tmp_path / "stderr.txt"
        # No timing: the server answers 20 of the run's 60 requests, then holds every later one
        # unanswered, so the run is mid-way, and stays there, when the kill comes. A worker asks for
        # its next unit only after writing its last, so units are on disk by then.
        server.hold_from(len(server.log) + 20)
        with open(stderr, "wb") as err_fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err_fh)
        try:
            if not server.wait_held(timeout=TEST_TIMEOUT):
                raise AssertionError(f"the run never reached request 21: {stderr.read_text()}")
            sigkill(proc)
        finally:
            reap(proc)
        server.release()
        partial = triples(killed)
        assert 0 < len(partial) < len(triples(whole)), "killed mid-way"
        assert set(partial) <= set(triples(whole))

        # A kill can also land inside a write: append a cut-off unit like the one it would leave.
        torn = b'{"classname": "class 99", "description": "Half a line", "prompt": "q", "part": 1, "parts": 3}\n{"class'
        with open(killed, "ab") as fh:
            fh.write(torn)
        with pytest.warns(UserWarning, match=r"killed\.jsonl: cutting off incomplete last unit"):
            assert main(args_for(server, classes_file, killed, "--concurrency", "2")) == 0
    resumed = triples(killed)
    assert len(resumed) == len(set(resumed)) == len(triples(whole))
    assert set(resumed) == set(triples(whole)) == expected_pairs(classes)
    assert read_descriptions(killed).keys() == read_descriptions(whole).keys()
    assert b"Half a line" not in killed.read_bytes()


# -- the API key stays secret ------------------------------------------------------------------------------


def test_api_key_is_sent_but_never_written_or_printed(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "d.jsonl"
    with FakeOpenAIServer(api_key=SECRET) as server:
        assert main(args_for(server, classes_file, out, "--verbose")) == 0
        assert {e["auth"] for e in server.log} == {f"Bearer {SECRET}"}
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert SECRET.encode() not in out.read_bytes()

    # A wrong key, named through --api-key-env: the server echoes it in its 401 message.
    monkeypatch.setenv("MY_LLM_KEY", "sk-wrong-key-also-secret-77")
    with FakeOpenAIServer(api_key=SECRET) as server:
        code = main(args_for(server, classes_file, tmp_path / "e.jsonl", "--api-key-env", "MY_LLM_KEY", "--verbose"))
        assert server.log[0]["auth"] == "Bearer sk-wrong-key-also-secret-77"
    captured = capsys.readouterr()
    assert code == 2
    assert "STOPPED: AuthenticationError: Error code: 401 - Incorrect API key provided: ***." in captured.out
    assert "sk-wrong-key-also-secret-77" not in captured.out + captured.err
    assert SECRET not in captured.out + captured.err


def test_missing_key_without_base_url_is_a_clear_error(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    code = main(["--classes", str(classes_file), "--out", str(tmp_path / "d.jsonl"), "--model", "gpt-x", "--no-progress"])
    assert code == 2
    assert "$OPENAI_API_KEY is not set" in capsys.readouterr().err


# -- offline templates backend ---------------------------------------------------------------------------


def test_templates_backend_needs_no_server(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    out = tmp_path / "templates.jsonl"
    argv = ["--classes", str(classes_file), "--out", str(out), "--backend", "templates", "--no-progress"]
    assert main(argv) == 0
    got = read_descriptions(out)
    assert list(got) == CLASSES
    assert all(len(v) == len(ATTRIBUTE_TEMPLATES) for v in got.values())
    assert got["car_side"][0] == "A photo of a car side, recognisable by its overall shape."
    assert got["apple"][1] == "An apple has a characteristic colour and texture."
    assert {r["model"] for r in rows(out)} == {"templates"}
    assert "requests:" not in capsys.readouterr().out
    before = out.read_bytes()
    assert main(argv) == 0 and out.read_bytes() == before


def test_other_model_in_out_file_is_refused(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d.jsonl"
    assert main(["--classes", str(classes_file), "--out", str(out), "--backend", "templates", "--no-progress"]) == 0
    before = out.read_bytes()
    with FakeOpenAIServer() as server:
        assert main(args_for(server, classes_file, out)) == 2
        assert server.log == []
    assert "already holds descriptions from model(s) ['templates'], not 'fake-model'" in capsys.readouterr().err
    assert out.read_bytes() == before


# -- bad input: clear errors, nothing lost ------------------------------------------------------------------


def test_malformed_line_in_out_file_stops_before_any_request(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d.jsonl"
    out.write_bytes(b'{"classname": "gauzy", "description": "A gauzy veil.", "model": "fake-model"}\nnot json\n')
    before = out.read_bytes()
    with FakeOpenAIServer() as server:
        assert main(args_for(server, classes_file, out)) == 2
        assert server.log == []
    assert f"{out}:2: malformed JSON" in capsys.readouterr().err
    assert out.read_bytes() == before


def test_another_run_on_the_same_file_is_refused(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "d.jsonl"
    with open(out, "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code = main(["--classes", str(classes_file), "--out", str(out), "--backend", "templates", "--no-progress"])
    assert code == 2 and "being written by another gen_descriptions run" in capsys.readouterr().err
    assert out.read_bytes() == b""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--classes", "nosuchdataset", "--out", "x.jsonl", "--backend", "templates"], "--classes: nosuchdataset: no such file, and not a built-in class list"),
        (["--classes", "{classes}", "--out", "x.jsonl"], "--model is required with --backend openai"),
        (["--classes", "{classes}", "--out", "x.jsonl", "--model", "m", "--concurrency", "0", "--base-url", "http://127.0.0.1:9/v1"], "--concurrency must be >= 1, got 0"),
        (["--classes", "{classes}", "--out", "x.jsonl", "--model", "m", "--queries", "{prompts}"], "prompts.txt:2: a template needs exactly one '{}'"),
        (["--classes", "{bad_json}", "--out", "x.jsonl", "--backend", "templates"], "--classes: bad.json: expected a JSON list of class names"),
    ],
)
def test_bad_arguments_name_the_culprit(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, argv: list, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("What does a {} look like?\nDescribe a thing.\n")
    (tmp_path / "bad.json").write_text('{"dog": 1}')
    subst = {"{classes}": str(classes_file), "{prompts}": "prompts.txt", "{bad_json}": "bad.json"}
    assert main([subst.get(a, a) for a in argv] + ["--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_custom_prompt_file(tmp_path: Path, classes_file: Path) -> None:
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["Tell me how a {} looks.", "Tell me how a {} looks."]))
    out = tmp_path / "d.jsonl"
    with FakeOpenAIServer() as server:
        assert main(args_for(server, classes_file, out, "--queries", str(prompts))) == 0
        assert len(server.log) == len(CLASSES)  # the duplicate template is asked once
    assert {r["prompt"] for r in rows(out) if r["classname"] == "apple"} == {"Tell me how an apple looks."}


# -- class lists ---------------------------------------------------------------------------------------------


def test_class_lists_from_files_and_builtin(tmp_path: Path) -> None:
    split = tmp_path / "split_zhou_Fake.json"
    split.write_text(json.dumps({
        "train": [["b/1.jpg", 1, "banded"], ["a/1.jpg", 0, "car_side"]],
        "val": [["c/1.jpg", 2, "cracked"]],
        "test": [["a/2.jpg", 0, "car_side"]],
    }))
    assert load_classnames(str(split)) == ["car_side", "banded", "cracked"]
    split.write_text(json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]]}))
    with pytest.raises(gen.GenerationError, match="label 0 is named both 'x' and 'y'"):
        load_classnames(str(split))
    split.write_text(json.dumps({"train": [["a.jpg", 0, "x"], ["b.jpg", 2, "y"]]}))
    with pytest.raises(gen.GenerationError, match=r"labels \[1\] have no entries"):
        load_classnames(str(split))

    assert load_classnames(str(SHARED / "classnames" / "dtd.json"))[:2] == ["banded", "blotchy"]
    with pytest.warns(UserWarning, match="listed more than once.*missile"):
        imagenet = load_classnames("imagenet")
    assert len(imagenet) == 998 and imagenet[:2] == ["tench", "goldfish"]


# -- import subcommand ---------------------------------------------------------------------------------------


def test_import_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = SHARED / "cupl" / "texture_prompts_full.json"
    out = tmp_path / "llm_data" / "dtd_cupl.jsonl"
    assert main(["import", str(src), "--out", str(out), "--classes", str(SHARED / "classnames" / "dtd.json")]) == 0
    printed = capsys.readouterr().out
    assert "imported 2820 descriptions of 47 classes" in printed and "(75 repeats, kept as samples)" in printed
    got = read_descriptions(out)
    raw = json.loads(src.read_text())
    every = {k: [d.strip() for d in v if d.strip()] for k, v in raw.items()}
    assert len(got) == 47 and got == every
    assert len(rows(out)) == sum(len(v) for v in every.values()) == 2820

    before = out.read_bytes()
    assert main(["import", str(src), "--out", str(out)]) == 2
    assert "already holds descriptions; refusing to overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before

    cars = tmp_path / "cars.jsonl"
    code = main(["import", str(SHARED / "cupl/original-keys/cars_prompts_full.json"), "--out", str(cars),
                 "--classes", str(SHARED / "classnames/cars.json")])
    err = capsys.readouterr().err
    assert code == 2 and "no descriptions for 196 of 196 classes" in err and "nothing written" in err
    assert "'2000 AM General Hummer SUV'" in err and not cars.exists()


# -- response cleaning and prompts -----------------------------------------------------------------------------


def test_clean_descriptions() -> None:
    answers = [
        "Sure! A gauzy fabric is thin, e.g. chiffon. It is often white.",
        "As an AI language model, I cannot see images, but gauze is thin.",
        "<think>The user wants a sentence.</think>The **banded** texture shows stripes",
        "Here are some features:\n1. A dog has four legs.\n2. A dog has fur.\n- A dog has FUR.",
        '  "A cracked surface has many fine lines."  ',
        "Certainly, a tench is a greenish fish. More text.",
        "", None, "Yes.", "I'm sorry, but I can't help with that.",
        "a gauzy  fabric is thin, e.g. chiffon.",
    ]
    assert clean_descriptions(answers) == [
        "A gauzy fabric is thin, e.g. chiffon.",
        "The banded texture shows stripes.",
        "A dog has four legs.",
        "A dog has fur.",
        "A cracked surface has many fine lines.",
        "A tench is a greenish fish.",
    ]
    assert split_sentences("Dr. No owns a cat. It is black! Is it? yes") == ["Dr. No owns a cat.", "It is black!", "Is it? yes"]


def test_format_prompt_articles() -> None:
    assert format_query("What does a {} look like?", "apple") == "What does an apple look like?"
    assert format_query("A {} is here.", "Egyptian_cat") == "An Egyptian cat is here."
    assert format_query("a photo of a {}.", "unicorn") == "a photo of a unicorn."
    assert format_query("Describe {}.", "car_side") == "Describe car side."


def test_help_explains_every_flag() -> None:
    for parser in (gen.build_parser(), gen.build_import_parser()):
        text = parser.format_help()
        for action in parser._actions:
            assert action.help, f"{action.option_strings or action.dest} has no help"
            for flag in action.option_strings:
                assert flag in text


# -- every flag changes what a successful run does (issue 8) ------------------------------------------------


def test_sampling_flags_reach_the_server(tmp_path: Path, classes_file: Path) -> None:
    runs = {
        "defaults": [],
        "tuned": ["--temperature", "0.5", "--max-tokens", "33", "--system-prompt", "Be brief.", "--seed", "7"],
        "bare": ["--temperature", "default", "--system-prompt", ""],
    }
    bodies = {}
    with FakeOpenAIServer() as server:
        for name, extra in runs.items():
            out = tmp_path / f"{name}.jsonl"
            start = len(server.log)
            assert main(args_for(server, classes_file, out, *extra)) == 0
            bodies[name] = [e["body"] for e in server.log[start:]]
    first = {name: b[0] for name, b in bodies.items()}
    assert first["defaults"]["temperature"] == 0.99 and first["defaults"]["max_tokens"] == 60
    assert first["tuned"]["temperature"] == 0.5 and first["tuned"]["max_tokens"] == 33
    assert first["tuned"]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert all(b["seed"] == 7 for b in bodies["tuned"])
    assert "temperature" not in first["bare"] and [m["role"] for m in first["bare"]["messages"]] == ["user"]
    # The seed changes the samples: the fake answers by (query, seed + index).
    tuned = {(r["classname"], r["description"]) for r in rows(tmp_path / "tuned.jsonl")}
    assert tuned == {(c, d) for c in CLASSES for t in CUPL_STYLE_QUERIES
                     for d in expected_descriptions(format_query(t, c), N, seed=7)}
    assert tuned.isdisjoint({(c, d) for c, _, d in triples(tmp_path / "defaults.jsonl")})


def test_concurrency_limits_requests_in_flight(tmp_path: Path, classes_file: Path) -> None:
    with FakeOpenAIServer(delay=0.01) as server:
        assert main(args_for(server, classes_file, tmp_path / "d.jsonl", "--concurrency", "1")) == 0
        assert server.max_in_flight == 1
    assert set(triples(tmp_path / "d.jsonl")) == expected_pairs()


def test_old_flag_spellings_still_work_with_a_one_line_warning(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    queries = tmp_path / "q.txt"
    queries.write_text("Tell me how a {} looks.\n")
    with FakeOpenAIServer() as server:
        argv = args_for(server, classes_file, tmp_path / "d.jsonl", "--prompts", str(queries), "--n-per-prompt", "1")
        assert main(argv) == 0
        assert {e["body"].get("n", 1) for e in server.log} == {1} and len(server.log) == len(CLASSES)
    err = capsys.readouterr().err.splitlines()
    assert "warning: --prompts is deprecated; use --queries" in err
    assert "warning: --n-per-prompt is deprecated; use --n-per-query" in err
    assert {r["prompt"] for r in rows(tmp_path / "d.jsonl") if r["classname"] == "apple"} == {"Tell me how an apple looks."}


def test_verbose_logs_requests_and_no_progress_hides_the_bar(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with FakeOpenAIServer() as server:
        base = args_for(server, classes_file, tmp_path / "a.jsonl")
        base.remove("--no-progress")
        assert main([*base, "--verbose"]) == 0
        assert "HTTP Request: POST" in capsys.readouterr().err
        for out, extra, bar in (("b", [], True), ("c", ["--no-progress"], False)):
            terminal = Terminal()
            monkeypatch.setattr(sys, "stderr", terminal)
            argv = args_for(server, classes_file, tmp_path / f"{out}.jsonl")
            argv.remove("--no-progress")
            assert main([*argv, *extra]) == 0
            monkeypatch.undo()
            monkeypatch.setenv("OPENAI_API_KEY", SECRET)
            assert ("classes:" in terminal.getvalue()) is bar, terminal.getvalue()


def test_import_flags_model_and_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "c.json"
    src.write_text(json.dumps({"dog": ["A dog.", "A dog."]}))
    out = tmp_path / "d.jsonl"
    assert main(["import", str(src), "--out", str(out), "--model", "gpt-3"]) == 0
    assert {r["model"] for r in rows(out)} == {"gpt-3"}
    assert "(1 repeats, kept as samples)" in capsys.readouterr().out
    src.write_text(json.dumps({"owl": ["An owl."]}))
    assert main(["import", str(src), "--out", str(out)]) == 2
    assert main(["import", str(src), "--out", str(out), "--overwrite"]) == 0
    assert read_descriptions(out) == {"owl": ["An owl."]}


def test_help_imports_neither_torch_nor_the_llm_client() -> None:
    code = (
        "import sys\n"
        "from protext.gen_descriptions import main\n"
        "for argv in (['--help'], ['import', '--help']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        "heavy = sorted(m for m in ('torch', 'open_clip', 'openai', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=TEST_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert "--queries" in done.stdout and "--dataset" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY []"


# -- fail fast, leave nothing behind, one class per name (issue 9) ------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_base_url_stops_at_once_naming_the_url(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    def no_client(*args, **kwargs):
        raise AssertionError("no request may be tried against a closed port")

    monkeypatch.setattr(openai, "AsyncOpenAI", no_client)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    out = tmp_path / "d.jsonl"
    argv = ["--classes", str(classes_file), "--out", str(out), "--base-url", url, "--model", "m", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --base-url {url}: cannot connect to 127.0.0.1:") and "Connection refused" in err
    assert not out.exists()  # no 0-byte file left


def test_connection_lost_after_the_check_is_fatal_and_names_the_url() -> None:
    import asyncio

    import openai

    from protext.descriptions.llm_client import DescriptionSampler, FatalAPIError, SamplingSettings

    url = f"http://127.0.0.1:{closed_port()}/v1"

    async def ask() -> None:
        client = openai.AsyncOpenAI(api_key="x", base_url=url, max_retries=0, timeout=TEST_TIMEOUT)
        try:
            await DescriptionSampler(client, SamplingSettings(model="m"))("What does a dog look like?", 2)
        finally:
            await client.close()

    with pytest.raises(FatalAPIError, match=rf"cannot connect to {url}/ \(APIConnectionError"):
        asyncio.run(ask())


def test_failed_generation_leaves_no_empty_out_file(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "d.jsonl"
    with FakeOpenAIServer(api_key="sk-the-right-one") as server:
        assert main(args_for(server, classes_file, out)) == 2  # 401: the run stops before any unit
    assert "STOPPED: AuthenticationError" in capsys.readouterr().out
    assert not out.exists()


def test_class_names_differing_in_case_are_one_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    listed = tmp_path / "classes.txt"
    listed.write_text("beagle\nBeagle\ntabby_cat\ntabby cat\n")
    out = tmp_path / "d.jsonl"
    with FakeOpenAIServer() as server:
        with pytest.warns(UserWarning, match=r"share one set of descriptions: \['Beagle \(as beagle\)', 'tabby cat \(as tabby_cat\)'\]"):
            assert main(args_for(server, listed, out)) == 0
        assert len(server.log) == 2 * len(CUPL_STYLE_QUERIES)
        assert list(read_descriptions(out)) == ["beagle", "tabby_cat"]
        # The same classes spelled otherwise are already done: nothing is asked again.
        listed.write_text("BEAGLE\nTabby Cat\n")
        assert main(args_for(server, listed, out)) == 0
        assert len(server.log) == 2 * len(CUPL_STYLE_QUERIES)
    assert "0 units; 10 of 10 units were already cached" in capsys.readouterr().out


def test_unwritable_out_and_importing_onto_the_source_are_error_lines(tmp_path: Path, classes_file: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["--classes", str(classes_file), "--out", str(blocker / "d.jsonl"), "--backend", "templates", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: --out: cannot create the folder of {blocker / 'd.jsonl'}")
    argv[3] = str(tmp_path)
    assert main(argv) == 2
    assert f"error: --out: {tmp_path} is a directory" in capsys.readouterr().err

    src = tmp_path / "cupl.json"
    src.write_text('{"dog": ["A dog."]}')
    before = src.read_bytes()
    assert main(["import", str(src), "--out", str(src), "--overwrite"]) == 2
    assert f"error: --out {src} is the file being imported" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_generation_is_a_library_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from protext.descriptions import GenConfig, generate

    monkeypatch.delenv("OPENAI_API_KEY")
    out = tmp_path / "pets.jsonl"
    report = generate(GenConfig(classes=["beagle", "tabby cat"], out=out, backend="templates", progress=False))
    assert (report.classes_complete, report.units_written, report.descriptions_written) == (2, 14, 14)
    assert read_descriptions(out)["beagle"][0] == "A photo of a beagle, recognisable by its overall shape."


def test_builtin_class_list_by_dataset_name_needs_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from protext.classlists import read_classes

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing named 'dtd' here: the list comes from the package
    out = tmp_path / "dtd_templates.jsonl"
    assert main(["--classes", "dtd", "--out", str(out), "--backend", "templates", "--no-progress"]) == 0
    got = read_descriptions(out)
    assert len(got) == 47 and list(got) == read_classes("dtd")
