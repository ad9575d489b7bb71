"""An artifact (or checkpoint) written by an attacker: opening it runs none of its code, asks
nothing on stdin, reads nothing outside its folder, and its chat template cannot reach Python
internals or hang the process."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from llamatrt.base.errors import InputError, ManifestMismatchError
from llamatrt.runtime.chat_template import TIME_LIMIT_S, ChatTemplate
from tests.safety_helpers import edit_manifest, error_lines, run_cli

EVIL_PY = """
import pathlib
pathlib.Path(__file__).with_name("PWNED").write_text("code from the artifact ran")
from transformers import PreTrainedTokenizerFast
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _plant_remote_code(folder: Path) -> Path:
    """A tokenizer folder whose config asks transformers to import evil.py (which leaves a marker)."""
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    config_path.write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL_PY)
    return folder / "PWNED"


@pytest.mark.slow  # end to end, over 6 s here: `make test` runs it, `make test-fast` does not
def test_an_artifact_with_remote_code_in_its_tokenizer_runs_none_of_it(tiny_artifact: Path, tmp_path: Path) -> None:
    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))
    marker = _plant_remote_code(art / "tokenizer")
    generated = run_cli(["generate", str(art), "--prompt", "w5 w6", "--max-new-tokens", "3"], tmp_path, stdin=b"y\n")
    chatted = run_cli(["chat", str(art), "--max-new-tokens", "3"], tmp_path, stdin=b"y\nw5 w6\n")
    clean = run_cli(["generate", str(tiny_artifact), "--prompt", "w5 w6", "--max-new-tokens", "3"], tmp_path)
    for result in (generated, chatted):
        assert result.returncode == 0, result.stderr
        assert "custom code" not in result.stdout + result.stderr and "[y/N]" not in result.stdout + result.stderr
    assert generated.stdout == clean.stdout != ""  # the planted files changed nothing
    assert not marker.exists()


def test_exporting_a_checkpoint_with_remote_code_runs_none_of_it(tiny_artifact: Path, tmp_path: Path) -> None:
    hf = Path(shutil.copytree(tiny_artifact.parent / "hf", tmp_path / "hf"))
    marker = _plant_remote_code(hf)
    result = run_cli(
        ["export", "--model", str(hf), "--out", str(tmp_path / "out"), "--max-seq-len", "16", "--prefill-chunk", "4"],
        tmp_path,
        stdin=b"y\n",
    )
    assert not marker.exists() and "[y/N]" not in result.stdout + result.stderr
    assert result.returncode == 1 and len(error_lines(result)) == 1 and "Traceback" not in result.stderr
    assert "tokenizer" in error_lines(result)[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["weights", "graph", "tokenizer"])
def test_a_path_out_of_the_artifact_is_refused_even_when_its_file_matches(
    tiny_artifact: Path, tmp_path: Path, where: str
) -> None:
    """The outside files are a copy of the artifact's own, so size and hash agree: only the path rule stops it."""
    from llamatrt.base.artifact.reader import read_manifest

    shutil.copytree(tiny_artifact, tmp_path / "other")
    art = Path(shutil.copytree(tiny_artifact, tmp_path / "art"))

    def point_out(raw: dict) -> None:
        if where == "weights":
            raw["weights"]["file"] = "../other/weights.data"
        elif where == "graph":
            next(g for g in raw["graphs"] if g["name"] == "decode")["path"] = "../other/decode.onnx"
        else:
            raw["tokenizer"]["dir"] = "../other/tokenizer"

    edit_manifest(art, point_out)
    with pytest.raises(ManifestMismatchError, match="points outside the artifact"):
        read_manifest(art)


def test_a_graph_reads_its_weights_through_a_hard_link_but_never_out_of_its_folder(
    tiny_artifact: Path, tmp_path: Path
) -> None:
    """The layerwise tools read a graph with its weights by the reader's rules, not onnx's loader (which
    refuses a weights file with several hard links, as `cp -l` and llamatrt's own twins make): the same
    tensors as onnx reads from the original; a location out of the folder is still refused."""
    import onnx
    from onnx import numpy_helper

    from llamatrt.base.artifact.reader import load_graph_with_weights

    original = Path(shutil.copytree(tiny_artifact, tmp_path / "original"))
    graph = next(p.name for p in original.glob("*.onnx"))
    theirs = onnx.load(str(original / graph))  # (before the link: then onnx refuses the original too)
    linked = tmp_path / "linked"
    linked.mkdir()
    for item in original.iterdir():
        if item.name == "weights.data":
            (linked / item.name).hardlink_to(item)
        elif item.is_file():
            shutil.copy(item, linked / item.name)
    ours = load_graph_with_weights(linked, graph, "graph")
    assert [t.name for t in ours.graph.initializer] == [t.name for t in theirs.graph.initializer]
    for mine, onnx_read in zip(ours.graph.initializer, theirs.graph.initializer, strict=True):
        assert (numpy_helper.to_array(mine) == numpy_helper.to_array(onnx_read)).all()
    outside = onnx.load(str(linked / graph), load_external_data=False)
    for tensor in outside.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../elsewhere.data"
    onnx.save(outside, str(linked / graph))
    with pytest.raises(ManifestMismatchError, match="points outside the artifact"):
        load_graph_with_weights(linked, graph, "graph")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ lipsum.__globals__['os'].system('touch PWNED') }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ self.__init__.__globals__.__builtins__ }}",
        "{% set ns = namespace() %}{{ ns.__class__.__init__.__globals__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
    ],
)
def test_a_template_cannot_reach_python_internals(source: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        text = ChatTemplate(source, {}).render([{"role": "user", "content": "hi"}])
    except InputError as e:
        assert "unsafe" in str(e) or "refused" in str(e) or "failed" in str(e), str(e)
    else:
        assert "class" not in text and "function" not in text and "module" not in text, text  # nothing leaked
    assert not (tmp_path / "PWNED").exists()


def test_a_template_that_loops_forever_is_stopped() -> None:
    forever = "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(InputError, match="ran longer than"):
        ChatTemplate(forever, {}).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - started < TIME_LIMIT_S + 1.5


def test_the_template_renders_as_transformers_renders_it(tiny_artifact: Path) -> None:
    """The bounded sandbox is transformers' environment: the same text for a real template."""
    from transformers import AutoTokenizer

    template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{{ messages | tojson }}"
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_artifact.parent / "hf")
    tokenizer.chat_template = template
    messages = [{"role": "user", "content": " héllo <b> "}, {"role": "assistant", "content": "ok"}]
    theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ours = ChatTemplate(template, {"eos_token": tokenizer.eos_token}).render(messages)
    assert ours == theirs
