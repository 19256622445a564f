"""What the command line says when something is wrong: one line, the right exit code,
nothing loaded before the output is known to be writable, nothing half-written.

Each test is named after the failure it provokes (issue 9: output errors, numbers out of
range, code that raises, markup in user text, Ctrl-C, a second run into a busy folder).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featuremaps._files import LOCK_NAME, output_lock
from featuremaps.cli import main

SLOW_MODEL = textwrap.dedent(
    """
    import os
    import time

    import torch
    from torch import nn


    class Slow(nn.Module):
        '''Sleeps before the conv of its SLOW_AT-th forward, after touching SLOW_MARKER.'''

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == int(os.environ.get("SLOW_AT", "0")):
                open(os.environ["SLOW_MARKER"], "w").close()
                time.sleep(float(os.environ.get("SLOW_SECONDS", "60")))
            return self.conv(x)


    def make() -> nn.Module:
        torch.manual_seed(0)
        return Slow()


    def loud() -> nn.Module:
        raise RuntimeError("the factory could not find its config")


    def touching() -> nn.Module:
        open(os.environ["LOADED_MARKER"], "w").close()
        return make()
    """
)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding ``slowmodel.py`` and three small photos, as the current folder."""
    (tmp_path / "slowmodel.py").write_text(SLOW_MODEL)
    rng = np.random.default_rng(0)
    for i in range(3):
        arr = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _fm(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "featuremaps", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before its slow forward: {out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the slow forward never started")
        time.sleep(0.05)


def _run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``featuremaps ARGS`` run in this process."""
    try:
        main(args)
        code: int = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_one_line_error(err: str, needle: str) -> None:
    assert err.startswith("error: "), repr(err)  # no blank first line
    assert needle in err, err
    assert "Traceback" not in err and "unexpected" not in err


# -- the output location, checked before the model is loaded ------------------------------


def test_out_that_is_a_file_is_refused_before_the_model_loads(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (work / "taken").write_text("a file")
    monkeypatch.setenv("LOADED_MARKER", str(work / "loaded"))
    code, _, err = _run_main(
        ["run", "slowmodel:touching", "img0.png", "--layers", "conv", "--out", "taken"], capsys
    )
    assert code == 1
    _assert_one_line_error(err, "taken: it is a file")
    assert not (work / "loaded").exists()
    assert (work / "taken").read_text() == "a file"


def test_out_under_a_file_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "taken").write_text("a file")
    code, _, err = _run_main(
        ["run", "slowmodel:make", "img0.png", "--layers", "conv", "--out", "taken/sub"], capsys
    )
    assert code == 1
    _assert_one_line_error(err, "a part of the path is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out_folder_is_refused(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ro = work / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = _run_main(
            ["run", "slowmodel:make", "img0.png", "--layers", "conv", "--out", "ro"], capsys
        )
    finally:
        ro.chmod(0o700)
    assert code == 1
    _assert_one_line_error(err, "permission denied")


def test_unwritable_out_folder_is_refused_even_as_root(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe file that proves --out takes a file fails as a read-only folder makes it."""
    import tempfile

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setenv("LOADED_MARKER", str(work / "loaded"))
    monkeypatch.setattr(tempfile, "mkstemp", denied)
    code, _, err = _run_main(
        ["run", "slowmodel:touching", "img0.png", "--layers", "conv", "--out", "ro"], capsys
    )
    assert code == 1
    _assert_one_line_error(err, "--out ro: permission denied; choose a folder you can write to")
    assert not (work / "loaded").exists()
    assert not (work / "ro").exists()  # made by the run, empty, removed


def test_full_disk_is_one_line_naming_the_file(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import featuremaps.pipeline

    def full(img: object, path: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(featuremaps.pipeline, "save_image", full)
    code, _, err = _run_main(
        ["run", "slowmodel:make", "img0.png", "--layers", "conv", "--out", "o"], capsys
    )
    assert code == 1
    _assert_one_line_error(err, f"cannot write {Path('o') / 'img0' / 'input.png'}")
    assert "the disk is full" in err
    assert not (work / "o").exists()  # the run made it, wrote nothing, removed it


def test_os_error_outside_the_library_is_one_line(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import featuremaps.pipeline

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    monkeypatch.setattr(featuremaps.pipeline, "run", denied)
    code, _, err = _run_main(["run", "slowmodel:make", "img0.png"], capsys)
    assert code == 1
    _assert_one_line_error(err, "/some/where: permission denied")


def test_report_out_that_is_a_folder_is_refused_before_the_model_loads(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (work / "folder.html").mkdir()
    monkeypatch.setenv("LOADED_MARKER", str(work / "loaded"))
    code, _, err = _run_main(
        ["report", "slowmodel:touching", "img0.png", "--layers", "conv", "-o", "folder.html"],
        capsys,
    )
    assert code == 1
    _assert_one_line_error(err, "it is a folder; give a file name")
    assert not (work / "loaded").exists()


# -- numbers out of range: usage errors, before anything runs --------------------------------

RANGE_CASES = [
    (["--cols", "-2"], "--cols"),
    (["--cols", "0"], "--cols"),
    (["--max-maps", "-3"], "--max-maps"),
    (["--map-size", "-5"], "--map-size"),
    (["--map-size", "4000"], "--map-size"),
    (["--pca", "2"], "--pca"),
    (["--norm", "cubic"], "linear"),
    (["--scale", "global"], "channel"),
    (["--device", "tpu"], "cuda"),
]


@pytest.mark.parametrize(("extra", "needle"), RANGE_CASES)
def test_number_or_choice_out_of_range_is_a_usage_error(
    work: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    code, _, err = _run_main(["run", "slowmodel:make", "img0.png", "--out", "o", *extra], capsys)
    assert code == 2
    assert needle in err and "Invalid value" in err and "Traceback" not in err
    assert not (work / "o").exists()


def test_report_max_maps_out_of_range_is_a_usage_error(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_main(["report", "slowmodel:make", "img0.png", "--max-maps", "-1"], capsys)
    assert code == 2 and "--max-maps" in err


def test_bad_order_names_the_choices_including_variance(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_main(
        ["run", "slowmodel:make", "img0.png", "--out", "o", "--order", "loudest"], capsys
    )
    assert code == 1
    _assert_one_line_error(err, "variance")
    assert not (work / "o").exists()


def test_variance_order_runs(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    code, _, err = _run_main(
        ["run", "slowmodel:make", "img0.png", "--layers", "conv", "--order", "variance"], capsys
    )
    assert code == 0, err
    manifest = json.loads((work / "featuremaps-out" / "manifest.json").read_text())
    assert manifest["render"]["order"] == "variance"


# -- code and model errors ---------------------------------------------------------------------


def test_factory_that_raises_names_the_spec_and_the_exception(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_main(["run", "slowmodel:loud", "img0.png", "--out", "o"], capsys)
    assert code == 1
    _assert_one_line_error(err, "'slowmodel:loud'")
    assert "RuntimeError: the factory could not find its config" in err


def test_real_bug_is_reported_as_unexpected(
    work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import featuremaps.pipeline

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(featuremaps.pipeline, "run", bug)
    code, _, err = _run_main(["run", "slowmodel:make", "img0.png"], capsys)
    assert code == 1
    assert err.startswith("unexpected error: ZeroDivisionError: division by zero")
    assert "please report it" in err


def test_errors_have_no_blank_first_line_in_a_subprocess(work: Path) -> None:
    proc = _fm("run", "slowmodel:make", "missing.png", cwd=work)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert err.startswith("error: image 'missing.png'"), repr(err)
    assert err.count("\n") == 1


def test_zero_usable_images_is_an_error(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (work / "empty").mkdir()
    code, _, err = _run_main(["run", "slowmodel:make", "empty", "--out", "o"], capsys)
    assert code == 1
    _assert_one_line_error(err, "holds no images")
    code, _, err = _run_main(["run", "slowmodel:make", "nothing*.png", "--out", "o"], capsys)
    assert code == 1
    _assert_one_line_error(err, "matches no file")
    assert not (work / "o").exists()


# -- user text is never markup -------------------------------------------------------------------


def test_markup_in_layer_name_is_printed_plainly(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run_main(
        ["run", "slowmodel:make", "img0.png", "--layers", "[/x]", "--out", "o"], capsys
    )
    assert code == 1
    _assert_one_line_error(err, "[/x]")
    assert "MarkupError" not in err


def test_markup_in_image_folder_is_printed_plainly(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = work / "[bold]a["
    folder.mkdir()
    (work / "img0.png").rename(folder / "x].png")  # the path holds "[/x]", a closing tag
    code, out, err = _run_main(
        ["run", "slowmodel:make", str(folder), "--layers", "conv", "--out", "o"], capsys
    )
    assert code == 0, err
    assert str(folder / "x].png") in out
    assert (work / "o" / "x_" / "conv.png").is_file()


def test_markup_in_report_path_is_printed_plainly(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run_main(
        ["report", "slowmodel:make", "img0.png", "--layers", "conv", "-o", "[red]r[/].html"],
        capsys,
    )
    assert code == 0, err
    assert "wrote [red]r[/].html" in out
    assert (work / "[red]r[/].html").is_file()
    assert not (work / LOCK_NAME).exists()


# -- one run per output folder ---------------------------------------------------------------------


def test_report_into_a_locked_folder_fails_naming_the_holder(
    work: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with output_lock(work / "busy", "featuremaps atlas (test)"):
        code, _, err = _run_main(
            ["report", "slowmodel:make", "img0.png", "--layers", "conv", "-o", "busy/r.html"],
            capsys,
        )
    assert code == 1
    _assert_one_line_error(err, f"pid {os.getpid()}: featuremaps atlas (test)")
    assert not (work / "busy" / "r.html").exists()


@pytest.mark.slow
def test_second_run_into_the_same_folder_fails_at_once_naming_the_holder(work: Path) -> None:
    marker = work / "slow-started"
    env = {"SLOW_AT": "1", "SLOW_MARKER": str(marker), "SLOW_SECONDS": "60"}
    args = ["run", "slowmodel:make", "--layers", "conv", "-o", "o"]
    first = _fm(*args, "img0.png", cwd=work, env=env)
    try:
        _wait_for(marker, first)
        start = time.monotonic()
        second = _fm(*args, "img1.png", cwd=work)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 1
        assert err.startswith("error: o is in use by another featuremaps run")
        assert f"pid {first.pid}: featuremaps run" in err
        assert time.monotonic() - start < 60  # it did not wait for the first run
    finally:
        first.kill()
        first.communicate()
    # The lock of a process that is gone is taken over.
    done = _fm(*args, "img1.png", cwd=work)
    _, err = done.communicate(timeout=120)
    assert done.returncode == 0, err
    assert not (work / "o" / LOCK_NAME).exists()


# -- Ctrl-C --------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_during_a_forward_says_how_many_images_were_written(work: Path) -> None:
    import json

    marker = work / "slow-started"
    env = {"SLOW_AT": "2", "SLOW_MARKER": str(marker), "SLOW_SECONDS": "60"}
    args = ["run", "slowmodel:make", "img0.png", "img1.png", "img2.png"]
    proc = _fm(*args, "--layers", "conv", "-o", "o", "--save-activations", cwd=work, env=env)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err == "interrupted: 1 of 3 images written to o\n"
    files = sorted(p.relative_to(work / "o").as_posix() for p in (work / "o").rglob("*"))
    image = ["img0", "img0/conv.png", "img0/input.png", "img0/pca_panel.png"]
    assert files == [*image, "manifest.json"]  # no part of img1, no activations spool
    manifest = json.loads((work / "o" / "manifest.json").read_text())
    assert [e["key"] for e in manifest["images"]] == ["img0"]
    assert manifest["interrupted"] == {"images_written": 1, "images_given": 3}
