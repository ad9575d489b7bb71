"""A battery of bad inputs and faults thrown at the `llamatrt` command, as a new user and an
attacker would: export, load, generate, chat, diff, bench, build and verify.

Every case must exit non-zero with exactly one `error:` line that names the problem (the case's
needle) and the fix, print no traceback, and leave every file that existed before exactly as it
was (hashed before and after). Each case is prepared in a folder of its own. Most run in this
process through click's CliRunner (the same command and error handling, without a fresh interpreter
importing torch per case); those that need a real process (closed stdin, a mounted full or read-only
disk) and a few of each command's, which prove the installed entry point behaves the same, run it
in subprocesses, beside the others. Each parametrized test then checks one case's result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llamatrt.base.artifact.reader import file_sha256
from tests.safety_helpers import edit_manifest, error_lines, graph_entry, invoke_cli, run_cli, snapshot, tmpfs


@dataclass
class Case:
    """`args` may name {art} (a private copy of the tiny artifact), {hf} (a private copy of its
    checkpoint) and {dir} (the case's own folder, also its working directory)."""

    id: str
    args: list[str]
    needle: str
    setup: Callable[[dict[str, Path]], Any] | None = None
    stdin: bytes | None = b""
    code: int = 1
    needs: tuple[str, ...] = ()  # what the case copies: "art", "hf"
    cwd: str = ""  # the working directory, under the case's folder
    process: bool = False  # run the installed entry point in a subprocess (see the module docstring)

    @property
    def in_process(self) -> bool:
        return not (self.process or self.stdin is None or self.setup in (_full_disk, _read_only))


def _set(path: str, value: Any) -> Callable[[dict[str, Path]], None]:
    """A setup that sets manifest field `path` ("a.b.0.c") of {art}."""

    def change(raw: dict[str, Any]) -> None:
        keys = path.split(".")
        target = raw
        for key in keys[:-1]:
            target = target[int(key)] if key.isdigit() else target[key]
        target[keys[-1]] = value

    return lambda p: edit_manifest(p["art"], change)


def _graph(name: str, key: str, value: Any) -> Callable[[dict[str, Path]], None]:
    return lambda p: edit_manifest(p["art"], lambda raw: graph_entry(raw, name).__setitem__(key, value))


def _weights_bytes(p: dict[str, Path], offset: int, data: bytes, rehash: bool) -> None:
    path = p["art"] / "weights.data"
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))
    if rehash:  # damage the manifest agrees with: only the NaN check can catch it
        edit_manifest(p["art"], lambda m: m["weights"].__setitem__("sha256", file_sha256(path)))


def _flip_byte(p: dict[str, Path]) -> None:
    _weights_bytes(p, 1000, bytes([(p["art"] / "weights.data").read_bytes()[1000] ^ 0xFF]), rehash=False)


def _nan_block(rehash: bool) -> Callable[[dict[str, Path]], None]:
    def setup(p: dict[str, Path]) -> None:
        size = (p["art"] / "weights.data").stat().st_size
        _weights_bytes(p, 0, b"\xff" * min(4 << 20, size), rehash)

    return setup


def _truncate(name: str, keep: float) -> Callable[[dict[str, Path]], None]:
    def setup(p: dict[str, Path]) -> None:
        path = p["art"] / name
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])

    return setup


def _swap_graph(p: dict[str, Path]) -> None:
    """prefill.onnx replaced by another graph (the decode one) with the manifest's size and hash
    updated to match, as an attacker would: only the graph's real IO can tell."""
    art = p["art"]
    shutil.copy(art / "decode.onnx", art / "prefill.onnx")
    size, sha = (art / "prefill.onnx").stat().st_size, file_sha256(art / "prefill.onnx")
    edit_manifest(art, lambda m: graph_entry(m, "prefill").update(bytes=size, sha256=sha))


def _symlink_out(p: dict[str, Path]) -> None:
    outside = p["dir"] / "outside.onnx"
    shutil.copy(p["art"] / "decode.onnx", outside)
    (p["art"] / "decode.onnx").unlink()
    (p["art"] / "decode.onnx").symlink_to(outside)


def _template(source: str) -> Callable[[dict[str, Path]], None]:
    return _set("tokenizer.chat_template", source)


def _hf_config(change: dict[str, Any]) -> Callable[[dict[str, Path]], None]:
    def setup(p: dict[str, Path]) -> None:
        path = p["hf"] / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    return setup


def _hf_drop_tensor(p: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    path = p["hf"] / "model.safetensors"
    state = load_file(str(path))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(path), metadata={"format": "pt"})


def _write_gguf(path: Path, truncate: bool) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((8, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if truncate:
        path.write_bytes(path.read_bytes()[:-300])


def _user_folder(p: dict[str, Path]) -> None:
    (p["dir"] / "mine").mkdir()
    (p["dir"] / "mine" / "thesis.tex").write_text("years of work")


def _full_disk(p: dict[str, Path]) -> Any:
    return tmpfs(p["dir"] / "small", "64k")


def _read_only(p: dict[str, Path]) -> Any:
    return tmpfs(p["dir"] / "ro", "1m", readonly=True)


def _cwd_artifact(p: dict[str, Path]) -> None:
    shutil.copytree(p["art"], p["dir"] / "here")


E = "export"
CASES = [
    # --- export: checkpoints ---
    Case("export-missing-model", [E, "--model", "gpt2-nope", "--out", "{dir}/o"], "not found", process=True),
    Case(
        "export-text-file-model",
        [E, "--model", "{dir}/m.txt", "--out", "{dir}/o"],
        "not a .gguf",
        setup=lambda p: (p["dir"] / "m.txt").write_text("hello"),
    ),
    Case(
        "export-bad-gguf-magic",
        [E, "--model", "{dir}/m.gguf", "--out", "{dir}/o"],
        "bad magic",
        setup=lambda p: (p["dir"] / "m.gguf").write_bytes(b"NOPE" * 64),
    ),
    Case(
        "export-truncated-gguf",
        [E, "--model", "{dir}/m.gguf", "--out", "{dir}/o"],
        "truncated or corrupt",
        setup=lambda p: _write_gguf(p["dir"] / "m.gguf", truncate=True),
    ),
    Case(
        "export-config-not-json",
        [E, "--model", "{hf}", "--out", "{dir}/o"],
        "not valid JSON",
        needs=("hf",),
        setup=lambda p: (p["hf"] / "config.json").write_text("{oops"),
    ),
    Case(
        "export-not-llama",
        [E, "--model", "{hf}", "--out", "{dir}/o"],
        "model_type='gpt2'",
        needs=("hf",),
        setup=_hf_config({"model_type": "gpt2"}),
    ),
    Case(
        "export-sliding-window",
        [E, "--model", "{hf}", "--out", "{dir}/o"],
        "sliding_window=4096",
        needs=("hf",),
        setup=_hf_config({"sliding_window": 4096}),
    ),
    Case(
        "export-missing-tensor",
        [E, "--model", "{hf}", "--out", "{dir}/o"],
        "lacks tensor",
        needs=("hf",),
        setup=_hf_drop_tensor,
    ),
    Case(
        "export-truncated-safetensors",
        [E, "--model", "{hf}", "--out", "{dir}/o"],
        "corrupt or truncated",
        needs=("hf",),
        setup=lambda p: (p["hf"] / "model.safetensors").write_bytes(b"\x10\x00" * 8),
    ),
    Case(
        "export-no-weights",
        [E, "--model", "{hf}", "--out", "{dir}/o"],
        "no *.safetensors",
        needs=("hf",),
        setup=lambda p: (p["hf"] / "model.safetensors").unlink(),
    ),
    # --- export: options ---
    Case(
        "export-chunk-over-cache",
        [E, "--model", "{hf}", "--out", "{dir}/o", "--max-seq-len", "4", "--prefill-chunk", "8"],
        "smaller than the prefill chunk",
        needs=("hf",),
    ),
    Case(
        "export-batch-zero", [E, "--model", "{hf}", "--out", "{dir}/o", "--batch", "0"], "must be >= 1", needs=("hf",)
    ),
    Case(
        "export-chunk-zero",
        [E, "--model", "{hf}", "--out", "{dir}/o", "--prefill-chunk", "0"],
        "must be >= 1",
        needs=("hf",),
    ),
    Case(
        "export-dtype-unknown",
        [E, "--model", "{hf}", "--out", "{dir}/o", "--dtype", "int3"],
        "'int3' is not one of",
        needs=("hf",),
        code=2,
    ),
    Case(
        "export-batch-not-int",
        [E, "--model", "{hf}", "--out", "{dir}/o", "--batch", "two"],
        "'two' is not a valid integer",
        needs=("hf",),
        code=2,
    ),
    Case("export-no-out", [E, "--model", "{hf}"], "Missing option '--out'", needs=("hf",), code=2),
    # --- export: destinations ---
    Case(
        "export-over-artifact-without-force",
        [E, "--model", "{hf}", "--out", "{art}"],
        "pass --force",
        needs=("hf", "art"),
    ),
    Case(
        "export-force-over-user-folder",
        [E, "--model", "{hf}", "--out", "{dir}/mine", "--force"],
        "not a llamatrt artifact",
        needs=("hf",),
        setup=_user_folder,
    ),
    Case(
        "export-force-over-cwd",
        [E, "--model", "{hf}", "--out", ".", "--force"],
        "current directory",
        needs=("hf", "art"),
        setup=_cwd_artifact,
        cwd="here",
    ),
    Case(
        "export-out-is-file",
        [E, "--model", "{hf}", "--out", "{dir}/f"],
        "is a file",
        needs=("hf",),
        setup=lambda p: (p["dir"] / "f").write_text("x"),
    ),
    Case(
        "export-out-under-file",
        [E, "--model", "{hf}", "--out", "{dir}/f/sub"],
        "which is a file",
        needs=("hf",),
        setup=lambda p: (p["dir"] / "f").write_text("x"),
    ),
    Case(
        "export-full-disk",
        [E, "--model", "{hf}", "--out", "{dir}/small/o"],
        "not enough disk space",
        needs=("hf",),
        setup=_full_disk,
    ),
    Case(
        "export-read-only-folder",
        [E, "--model", "{hf}", "--out", "{dir}/ro/o"],
        "cannot write into",
        needs=("hf",),
        setup=_read_only,
    ),
    # --- opening an artifact (through generate) ---
    Case("load-missing", ["generate", "{dir}/nope", "--prompt", "w5"], "does not exist"),
    Case(
        "load-file",
        ["generate", "{dir}/f", "--prompt", "w5"],
        "is a file, not an artifact",
        setup=lambda p: (p["dir"] / "f").write_text("x"),
    ),
    Case("load-no-manifest", ["generate", "{dir}", "--prompt", "w5"], "not an artifact"),
    Case(
        "load-manifest-not-json",
        ["generate", "{art}", "--prompt", "w5"],
        "not valid JSON",
        needs=("art",),
        setup=lambda p: (p["art"] / "manifest.json").write_text("{"),
    ),
    Case(
        "load-format-1",
        ["generate", "{art}", "--prompt", "w5"],
        "format_version=1",
        needs=("art",),
        setup=_set("format_version", 1),
    ),
    Case(
        "load-format-99",
        ["generate", "{art}", "--prompt", "w5"],
        "format_version=99",
        needs=("art",),
        setup=_set("format_version", 99),
    ),
    Case(
        "load-graphs-a-string",
        ["generate", "{art}", "--prompt", "w5"],
        "field graphs",
        needs=("art",),
        setup=_set("graphs", "prefill.onnx"),
    ),
    Case(
        "load-graphs-a-dict",
        ["generate", "{art}", "--prompt", "w5"],
        "field graphs",
        needs=("art",),
        setup=_set("graphs", {"prefill": {}}),
    ),
    Case(
        "load-eos-a-string",
        ["generate", "{art}", "--prompt", "w5"],
        "tokenizer.eos_token_ids",
        needs=("art",),
        setup=_set("tokenizer.eos_token_ids", "2"),
    ),
    Case(
        "load-huge-cache",
        ["generate", "{art}", "--prompt", "w5"],
        "max_cache_len",
        needs=("art",),
        setup=_set("max_cache_len", 10**12),
    ),
    Case(
        "load-batch-disagrees",
        ["generate", "{art}", "--prompt", "w5"],
        "disagrees with the config",
        needs=("art",),
        setup=_set("config.num_kv_heads", 2),
    ),
    Case(
        "load-graph-path-absolute",
        ["generate", "{art}", "--prompt", "w5"],
        "points outside the artifact",
        needs=("art",),
        setup=_graph("decode", "path", "/etc/passwd"),
    ),
    Case(
        "load-graph-path-dotdot",
        ["generate", "{art}", "--prompt", "w5"],
        "points outside the artifact",
        needs=("art",),
        setup=_graph("decode", "path", "../../other/decode.onnx"),
    ),
    Case(
        "load-weights-path-dotdot",
        ["generate", "{art}", "--prompt", "w5"],
        "points outside the artifact",
        needs=("art",),
        setup=_set("weights.file", "../../../etc/passwd"),
    ),
    Case(
        "load-tokenizer-path-dotdot",
        ["generate", "{art}", "--prompt", "w5"],
        "points outside the artifact",
        needs=("art",),
        setup=_set("tokenizer.dir", "../.."),
    ),
    Case(
        "load-graph-symlink-out",
        ["generate", "{art}", "--prompt", "w5"],
        "link out of the artifact",
        needs=("art",),
        setup=_symlink_out,
    ),
    Case(
        "load-flipped-byte",
        ["generate", "{art}", "--prompt", "w5"],
        "does not match its SHA-256",
        needs=("art",),
        setup=_flip_byte,
    ),
    Case(
        "load-nan-block",
        ["generate", "{art}", "--prompt", "w5"],
        "does not match its SHA-256",
        needs=("art",),
        setup=_nan_block(rehash=False),
    ),
    Case(
        "load-nan-block-no-verify",
        ["generate", "{art}", "--prompt", "w5", "--no-verify"],
        "NaN/inf logits",
        needs=("art",),
        setup=_nan_block(rehash=False),
    ),
    Case(
        "load-nan-block-rehashed",
        ["generate", "{art}", "--prompt", "w5"],
        "NaN/inf logits",
        needs=("art",),
        setup=_nan_block(rehash=True),
    ),
    Case(
        "load-truncated-weights",
        ["generate", "{art}", "--prompt", "w5"],
        "truncated or replaced",
        needs=("art",),
        setup=_truncate("weights.data", 0.5),
    ),
    Case(
        "load-truncated-graph",
        ["generate", "{art}", "--prompt", "w5"],
        "truncated or replaced",
        needs=("art",),
        setup=_truncate("model.ort.onnx", 0.5),
    ),
    Case(
        "load-missing-graph",
        ["generate", "{art}", "--prompt", "w5"],
        "decode.onnx is missing",
        needs=("art",),
        setup=lambda p: (p["art"] / "decode.onnx").unlink(),
    ),
    Case(
        "load-swapped-graph",
        ["generate", "{art}", "--prompt", "w5"],
        "a graph from another artifact",
        needs=("art",),
        setup=_swap_graph,
    ),
    Case(
        "load-missing-tokenizer",
        ["generate", "{art}", "--prompt", "w5"],
        "has no tokenizer.json",
        needs=("art",),
        setup=lambda p: shutil.rmtree(p["art"] / "tokenizer"),
    ),
    Case(
        "load-garbage-tokenizer",
        ["generate", "{art}", "--prompt", "w5"],
        "not a readable tokenizer",
        needs=("art",),
        setup=lambda p: (p["art"] / "tokenizer" / "tokenizer.json").write_text("[1, 2"),
    ),
    Case(
        "load-unknown-backend",
        ["generate", "{art}", "--prompt", "w5", "--backend", "tpu"],
        "'tpu' is not one of",
        needs=("art",),
        code=2,
    ),
    Case(
        "load-tensorrt-absent",
        ["generate", "{art}", "--prompt", "w5", "--backend", "tensorrt"],
        "llamatrt build",
        needs=("art",),
    ),
    # --- generate ---
    Case("gen-empty-prompt", ["generate", "{art}", "--prompt", ""], "prompt is empty", needs=("art",)),
    Case("gen-no-prompt", ["generate", "{art}"], "no prompt given", needs=("art",)),
    Case(
        "gen-negative-temperature",
        ["generate", "{art}", "--prompt", "w5", "--temperature", "-1"],
        "temperature",
        needs=("art",),
    ),
    Case("gen-top-p-over-one", ["generate", "{art}", "--prompt", "w5", "--top-p", "1.5"], "top-p", needs=("art",)),
    Case("gen-huge-seed", ["generate", "{art}", "--prompt", "w5", "--seed", str(2**64)], "seed", needs=("art",)),
    Case("gen-negative-seed", ["generate", "{art}", "--prompt", "w5", "--seed", "-3"], "seed", needs=("art",)),
    Case(
        "gen-empty-stop", ["generate", "{art}", "--prompt", "w5", "--stop", ""], "stop string is empty", needs=("art",)
    ),
    Case(
        "gen-ids-out-of-vocab",
        ["generate", "{art}", "--input-ids", "5,999"],
        "outside the vocabulary",
        needs=("art",),
        process=True,
    ),
    Case(
        "gen-ids-malformed", ["generate", "{art}", "--input-ids", "1,x"], "not a comma-separated list", needs=("art",)
    ),
    Case(
        "gen-prompt-over-cache",
        ["generate", "{art}", "--input-ids", ",".join(["5"] * 60)],
        "cache holds 48",
        needs=("art",),
    ),
    Case("gen-invalid-utf8", ["generate", "{art}", "--prompt", "w5 \udcff"], "not valid UTF-8", needs=("art",)),
    Case(
        "gen-zero-new-tokens",
        ["generate", "{art}", "--prompt", "w5", "--max-new-tokens", "0"],
        "max new tokens",
        needs=("art",),
    ),
    Case(
        "gen-template-raises",
        ["generate", "{art}", "--prompt", "w5", "--chat"],
        "refused the conversation",
        needs=("art",),
        setup=_template("{{ raise_exception('no system prompts') }}"),
    ),
    Case(
        "gen-template-syntax",
        ["generate", "{art}", "--prompt", "w5", "--chat"],
        "syntax error at line 1",
        needs=("art",),
        setup=_template("{% for m in messages %}{{ m['content'] }"),
    ),
    Case(
        "gen-template-loops",
        ["generate", "{art}", "--prompt", "w5", "--chat"],
        "ran longer than",
        needs=("art",),
        setup=_template("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    ),
    Case(
        "gen-template-internals",
        ["generate", "{art}", "--prompt", "w5", "--chat"],
        "unsafe",
        needs=("art",),
        setup=_template("{{ cycler.__init__.__globals__.os.system('touch pwned') }}"),
    ),
    Case(
        "gen-template-huge",
        ["generate", "{art}", "--prompt", "w5", "--chat"],
        "too large",
        needs=("art",),
        setup=_template("{{ 'x' * 10**9 }}"),
    ),
    Case(
        "gen-no-template",
        ["generate", "{art}", "--prompt", "w5", "--chat"],
        "no chat template",
        needs=("art",),
        setup=_template(None),
    ),
    # --- chat ---
    Case("chat-stdin-closed", ["chat", "{art}"], "stdin is closed", needs=("art",), stdin=None),
    Case(
        "chat-bad-temperature", ["chat", "{art}", "--temperature", "-2"], "temperature", needs=("art",), stdin=b"w5\n"
    ),
    Case("chat-missing-artifact", ["chat", "{dir}/nope"], "does not exist"),
    # --- diff ---
    Case(
        "diff-report-in-missing-folder",
        ["diff", "{art}", "--report", "{dir}/no/such/dir/r.md"],
        "does not exist",
        needs=("art",),
    ),
    Case(
        "diff-binary-prompts",
        ["diff", "{art}", "--prompts", "{dir}/p.bin"],
        "not UTF-8 text",
        needs=("art",),
        setup=lambda p: (p["dir"] / "p.bin").write_bytes(bytes(range(256))),
    ),
    Case(
        "diff-missing-prompts",
        ["diff", "{art}", "--prompts", "{dir}/none.txt"],
        "cannot read --prompts",
        needs=("art",),
    ),
    Case(
        "diff-empty-prompts",
        ["diff", "{art}", "--prompts", "{dir}/e.txt"],
        "has no prompts",
        needs=("art",),
        setup=lambda p: (p["dir"] / "e.txt").write_text("\n\n"),
    ),
    Case("diff-zero-steps", ["diff", "{art}", "--steps", "0"], "--steps", needs=("art",)),
    Case("diff-not-artifact", ["diff", "{dir}"], "not an artifact", process=True),
    # --- bench ---
    Case("bench-wrong-batch", ["bench", "{art}", "--batch", "1"], "re-export with --batch 1", needs=("art",)),
    Case(
        "bench-over-cache",
        ["bench", "{art}", "--prompt-len", "40", "--new-tokens", "20"],
        "exceed the cache",
        needs=("art",),
    ),
    Case("bench-bad-contexts", ["bench", "{art}", "--contexts", "a,b"], "not a comma-separated list", needs=("art",)),
    Case("bench-missing-artifact", ["bench", "{dir}/nope"], "does not exist", process=True),
    # --- build and verify ---
    Case("build-without-tensorrt", ["build", "{art}"], "TensorRT is not installed", needs=("art",)),
    Case("build-not-artifact", ["build", "{dir}"], "not an artifact", process=True),
    Case(
        "build-unknown-engine", ["build", "{art}", "--engine", "onnx"], "'onnx' is not one of", needs=("art",), code=2
    ),
    Case(
        "verify-flipped-byte",
        ["verify", "{art}"],
        "does not match its SHA-256",
        needs=("art",),
        setup=_flip_byte,
        process=True,
    ),
    Case("verify-not-artifact", ["verify", "{dir}"], "not an artifact"),
]
assert len({c.id for c in CASES}) == len(CASES)


def _prepare(case: Case, root: Path, tiny_artifact: Path) -> tuple[dict[str, Path], Any]:
    folder = root / case.id
    folder.mkdir()
    paths = {"dir": folder}
    if "art" in case.needs:
        paths["art"] = Path(shutil.copytree(tiny_artifact, folder / "art"))
    if "hf" in case.needs:
        paths["hf"] = Path(shutil.copytree(tiny_artifact.parent / "hf", folder / "hf"))
    context = case.setup(paths) if case.setup else None
    return paths, context


def _run(case: Case, paths: dict[str, Path]) -> dict[str, Any]:
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in case.args]
    cwd = paths["dir"] / case.cwd
    before = snapshot(paths["dir"])
    result = invoke_cli(args, cwd, stdin=case.stdin or b"") if case.in_process else run_cli(args, cwd, stdin=case.stdin)
    after = snapshot(paths["dir"])
    leftovers = [p for p in paths["dir"].rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]
    return {"result": result, "before": before, "after": after, "leftovers": leftovers}


@pytest.fixture(scope="module")
def battery(tiny_artifact: Path, tmp_path_factory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("battery")
    outcomes: dict[str, dict[str, Any]] = {}

    def one(case: Case) -> None:
        paths, context = _prepare(case, root, tiny_artifact)
        if hasattr(context, "__enter__"):  # a mount held for the case's run
            with context as mounted:
                outcomes[case.id] = _run(case, paths) if mounted else {"skip": "cannot mount a tmpfs here"}
        else:
            outcomes[case.id] = _run(case, paths)

    with ThreadPoolExecutor(max_workers=1) as pool:  # the subprocesses beside the in-process cases
        done = pool.map(one, [c for c in CASES if not c.in_process])
        for case in CASES:
            if case.in_process:
                one(case)
        list(done)
    return outcomes


def test_the_battery_is_large_and_some_of_it_runs_the_installed_command() -> None:
    assert len(CASES) >= 60
    in_subprocess = {c.args[0] for c in CASES if not c.in_process}
    assert {"export", "generate", "chat", "diff", "bench", "build", "verify"} <= in_subprocess


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_in_one_line_and_loses_nothing(case: Case, battery: dict[str, dict[str, Any]]) -> None:
    outcome = battery[case.id]
    if "skip" in outcome:
        pytest.skip(outcome["skip"])
    result = outcome["result"]
    output = result.stdout + result.stderr
    assert result.returncode == case.code, output
    lines = error_lines(result)
    assert len(lines) == 1, output
    assert case.needle in lines[0], lines[0]
    assert "; " in lines[0] or "see `" in lines[0], f"no fix named: {lines[0]}"
    assert "Traceback" not in output, output
    lost = {p: h for p, h in outcome["before"].items() if outcome["after"].get(p) != h}
    assert not lost, f"changed or removed: {sorted(lost)}"
    assert not outcome["leftovers"], outcome["leftovers"]
    assert not any(Path(p).name == "pwned" for p in outcome["after"])  # no template ran a shell command


def test_invalid_utf8_in_chat_is_one_error_and_the_session_goes_on(tiny_artifact: Path, tmp_path: Path) -> None:
    result = run_cli(["chat", str(tiny_artifact), "--max-new-tokens", "3"], tmp_path, stdin=b"w5 \xff\xfe\nw6\n")
    assert result.returncode == 0, result.stderr
    assert error_lines(result) == ["error: that line is not valid UTF-8 text; type it again"]
    assert result.stdout.strip() != "" and "Traceback" not in result.stderr


def test_nan_logits_are_refused_in_process(tiny_artifact: Path, tmp_path: Path) -> None:
    """The same NaN check without a subprocess: generation raises, it never emits a token."""
    from llamatrt.base.errors import NumericalError
    from llamatrt.runtime.generator import Generator
    from llamatrt.runtime.registry import open_backend

    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    _nan_block(rehash=True)({"art": art})
    with open_backend(art, "torch") as backend, pytest.raises(NumericalError, match="NaN/inf logits"):
        Generator(backend).generate([[5, 6]], max_new_tokens=2)
