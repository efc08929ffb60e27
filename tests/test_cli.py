"""The CLI contract: every command has --help, bad input exits 2 with one line and no output file."""
import pytest

from qtool.cli import main

COMMANDS = ["train", "fuse", "quantize", "qat", "search", "export", "bench", "eval", "demo"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    assert "Usage: qtool " + cmd in capsys.readouterr().out


def _one_line_error(capsys, rc, expect, code=2):
    err = capsys.readouterr().err
    assert rc == code
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and expect in err
    return err


@pytest.mark.parametrize("argv, expect", [
    (["eval", "/no/such/model.onnx"], "model file not found"),
    (["train", "--model", "resnet99", "-o", "{tmp}/m.onnx"], "unknown model"),
    (["train", "--epochs", "0", "-o", "{tmp}/m.onnx"], "--epochs"),
    (["train", "--data", "mnist", "-o", "{tmp}/m.onnx"], "unknown data spec"),
    (["train", "-o", "/no/such/dir/m.onnx"], "output directory does not exist"),
    (["quantize", "{tmp}/in.onnx", "--bits", "w9a8", "-o", "{tmp}/o.onnx"], "bits"),
    (["fuse"], "Missing argument"),
    (["nosuchcommand"], "No such command"),
    (["qat", "/no/such/x.onnx", "-o", "{tmp}/m.onnx"], "model file not found"),
    (["export", "--int8", "--from-search", "{tmp}", "--pick", "0", "-o", "{tmp}/m.onnx"], "no front.json"),
    (["export", "--int8", "--from-search", "{tmp}", "-o", "{tmp}/m.onnx"], "go together"),
])
def test_bad_input_exits_2_with_one_line(argv, expect, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    _one_line_error(capsys, main(argv), expect)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "o.onnx").exists()


def test_garbage_onnx_is_untouched(tmp_path, capsys):
    p = tmp_path / "junk.onnx"
    p.write_bytes(b"\x00\xffgarbage" * 10)
    before = p.read_bytes()
    _one_line_error(capsys, main(["eval", str(p)]), "junk.onnx")
    assert p.read_bytes() == before
