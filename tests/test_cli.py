import subprocess
import sys

from rimlens.cli import main


def test_demo_writes_png(tmp_path):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    png = tmp_path / "demo_lens.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_usage_error_exit_code_2(capsys):
    assert main(["demo", "--seed", "notanint"]) == 2
    assert main(["no-such-command"]) == 2


def test_console_script_no_traceback():
    r = subprocess.run([sys.executable, "-m", "rimlens.cli", "demo", "--seed", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
