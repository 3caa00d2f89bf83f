"""The command line of the application: its own options, a log file, and output that appears whole or not at all.

Usage (from the repository root; ``-m`` is a bundle folder from ``python -m msa2net.export deploy_bundle``
or a folder holding exactly one, as in a MAP)::

    python deploy/app -i <dicom folder> -o <output folder> -m <bundle folder> [options]

Options besides the SDK's (``-i``, ``-o``, ``-m``, ``-l``, ``-w`` and their ``HOLOSCAN_*_PATH`` variables):

* ``--allow-input-mismatch``: run a series whose modality or body part differs from what the bundle
  declares (research use only; the mismatch is logged);
* ``--derive-missing-uids``: process a series whose Study/Series/SOP Instance UIDs are blank, with
  derived UIDs stated in the SEG and the log;
* ``--series-number N``: Series Number of the SEG (default 9001);
* ``--log-file PATH``: where everything the run prints goes (default: a new file under
  ``<temp dir>/msa2net-deploy/``).

Everything the SDK, Holoscan and the operators print goes to the log file. The terminal gets one line:
on success the files written (exit status 0), on failure the problem and the log's path (exit status 1).
The results are written to a staging folder next to the output folder and moved into it only when the
run succeeded, so a failed run leaves no output folder (or, where it existed, adds nothing to it).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["main"]

_SDK_PATH_OPTIONS = {"-i": "input", "--input": "input", "-o": "output", "--output": "output", "-m": "model", "--model": "model"}
_SDK_ENV = {"input": "HOLOSCAN_INPUT_PATH", "output": "HOLOSCAN_OUTPUT_PATH", "model": "HOLOSCAN_MODEL_PATH"}
_SDK_DEFAULTS = {"input": "input", "output": "output", "model": "models"}


def parse_options(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """This application's options, and the remaining arguments for the SDK (``argv[0]`` kept)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--allow-input-mismatch", action="store_true")
    parser.add_argument("--derive-missing-uids", action="store_true")
    parser.add_argument("--series-number", type=int, default=None)
    parser.add_argument("--log-file", type=Path, default=None)
    ours, rest = parser.parse_known_args(list(argv[1:]))
    return ours, [argv[0], *rest]


def sdk_paths(sdk_argv: Sequence[str]) -> dict[str, str]:
    """Input, output and model paths as the SDK resolves them: arguments, else ``HOLOSCAN_*_PATH``, else defaults."""
    paths = {k: os.environ.get(v) or _SDK_DEFAULTS[k] for k, v in _SDK_ENV.items()}
    args = list(sdk_argv[1:])
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in _SDK_PATH_OPTIONS:
            paths[_SDK_PATH_OPTIONS[name]] = value or (args[i + 1] if i + 1 < len(args) else "")
    return paths


def _with_output(sdk_argv: Sequence[str], output: Path) -> list[str]:
    """``sdk_argv`` with its output option (if any) replaced by ``-o output``."""
    out, skip = [sdk_argv[0]], False
    for arg in sdk_argv[1:]:
        if skip:
            skip = False
            continue
        name, eq, _ = arg.partition("=")
        if _SDK_PATH_OPTIONS.get(name) == "output":
            skip = not eq
            continue
        out.append(arg)
    return [*out, "-o", str(output)]


def default_log_file() -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    return Path(tempfile.gettempdir()) / "msa2net-deploy" / f"{stamp}-{os.getpid()}.log"


@contextmanager
def output_to(log_file: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (Python and native code alike) to ``log_file``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def _bundle_package_importable(model_path: str) -> None:
    """Make the ``msa2net`` package that the exported bundle ships importable, unless one is installed."""
    try:
        import msa2net  # noqa: F401
    except ImportError:
        from bundle import find_bundle

        sys.path.append(str(find_bundle(model_path)))


def _one_line(err: BaseException) -> str:
    """The first line of the error; MONAI's "applying transform ..." wrappers give way to the error they wrap."""
    while err.__cause__ is not None and str(err).startswith("applying transform"):
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    known = ("InputError", "SeriesGeometryError", "FileNotFoundError", "NotADirectoryError", "ValueError")
    return text if type(err).__name__ in known else f"{type(err).__name__}: {text}"


def run(argv: Sequence[str]) -> tuple[list[str], Path]:
    """Run the application; returns the names written to the output folder and that folder. Raises on failure."""
    ours, sdk_argv = parse_options(argv)
    paths = sdk_paths(sdk_argv)
    for key in ("input", "model"):
        if not Path(paths[key]).exists():
            raise FileNotFoundError(f"{paths[key]}: {key} path not found.")
    output = Path(paths["output"]).absolute()
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output}: the output path exists and is not a folder.")
    stage_parent = output.parent if output.parent.is_dir() else Path(tempfile.gettempdir())
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=stage_parent))
    try:
        _bundle_package_importable(paths["model"])
        from app import MSA2NetSegApp, Options

        options = Options(
            allow_input_mismatch=ours.allow_input_mismatch,
            derive_missing_uids=ours.derive_missing_uids,
            **({"series_number": ours.series_number} if ours.series_number is not None else {}),
        )
        sys.argv = _with_output(sdk_argv, staging)
        app = MSA2NetSegApp()
        app.options = options
        app.run()
        written = sorted(p.name for p in staging.iterdir())
        if not written:
            raise RuntimeError("the application finished without writing anything.")
        output.mkdir(parents=True, exist_ok=True)
        for name in written:
            os.replace(staging / name, output / name)
        return written, output
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    """``python deploy/app ...``: exit status 0 with one line naming the files, else 1 with one line naming the problem."""
    argv = list(sys.argv if argv is None else argv)
    ours, _ = parse_options(argv)
    log_file = (ours.log_file or default_log_file()).absolute()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output_to(log_file):
            try:
                written, output = run(argv)
            except BaseException:  # the log gets the traceback; the terminal one line
                import traceback

                traceback.print_exc()
                raise
    except SystemExit as err:
        if err.code in (0, None):
            raise
        print(f"msa2net deploy: the command line was refused (details: {log_file})", file=sys.stderr)
        sys.exit(1)
    except BaseException as err:
        print(f"msa2net deploy: {_one_line(err)} (details: {log_file})", file=sys.stderr)
        sys.exit(1)
    print(f"msa2net deploy: wrote {', '.join(written)} to {output} (log: {log_file})")
