"""Run llama.cpp's own convert_hf_to_gguf.py from the user's checkout (llama.cpp is not bundled).

The converter runs as a child process of the current interpreter and writes to a staging name
beside the GGUF asked for; the file appears under its name only once the converter succeeded, and
a failure becomes one line naming the converter's last error line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from .errors import ConverterError, InputNotFoundError, OptionsError, OutputError, OutputExistsError

log = logging.getLogger(__name__)

CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_REQUIREMENTS = "requirements/requirements-convert_hf_to_gguf.txt"
OUTTYPES = ("f16", "bf16", "f32", "q8_0", "auto")


def default_outfile(folder: str | Path, outtype: str) -> Path:
    """Beside the folder, never in it: ``merged`` -> ``merged-f16.gguf`` (``merged.gguf`` for auto)."""
    folder = Path(folder)
    name = folder.name or Path(os.path.abspath(folder)).name or "model"
    return folder.parent / (f"{name}.gguf" if outtype == "auto" else f"{name}-{outtype}.gguf")


def converter_command(folder: str | Path, outfile: str | Path, outtype: str, script: str | Path,
                      python: str = "python3") -> list[str]:
    return [python, str(script), str(folder), "--outfile", str(outfile), "--outtype", outtype]


def check_outfile(outfile: Path, overwrite: bool) -> None:
    if "{" in outfile.name or "}" in outfile.name:
        raise OptionsError(f"--outfile {outfile}: '{{' and '}}' are llama.cpp's name templates, and merge-adapter needs the "
                           "exact name to check the file; name it outright, e.g. merged-f16.gguf")
    if outfile.is_dir():
        raise OutputError(f"--outfile {outfile}: is a folder; name the .gguf file to write")
    if not outfile.parent.is_dir():
        raise OutputError(f"--outfile {outfile}: its folder {outfile.parent} does not exist; create it or name another file")
    if outfile.exists() and not overwrite:
        raise OutputExistsError(f"--outfile {outfile}: exists; pass --overwrite to replace it, or name another file")


# a converter failure's last line, and what usually fixes it
_ERROR_LINE = re.compile(r"^(?:[\w.]*(?:Error|Exception)\b|ERROR:|.*\berror:)")
_HINTS = (
    ("ModuleNotFoundError", "install the converter's requirements: pip install -r {llama_cpp}/" + CONVERTER_REQUIREMENTS),
    ("pre-tokenizer was not recognized", "llama.cpp does not know this tokenizer (its converter recognises the "
                                          "pre-tokenizers of the model families listed in {llama_cpp}/convert_hf_to_gguf_update.py): "
                                          "update the checkout, or convert a model family llama.cpp supports"),
    ("is not supported", "this llama.cpp cannot convert the architecture: update the checkout"),
    ("invalid choice", "this llama.cpp's converter is older: pick another --outtype, or update the checkout"),
)


def last_error_line(lines: list[str]) -> str:
    """The line that says why the converter failed: a traceback's last line, its ERROR log, argparse's error."""
    lines = [line.strip() for line in lines if line.strip()]
    for line in reversed(lines):
        if _ERROR_LINE.match(line):
            return line
    return lines[-1] if lines else "no output"


def _converter_failed(code: int, lines: list[str], script: Path, folder: Path) -> ConverterError:
    line = last_error_line(lines)
    line = line if len(line) <= 300 else line[:297] + "..."
    hint = next((h for pattern, h in _HINTS if pattern in line), "fix that and rerun (-v shows the converter's whole output)")
    status = f"exit {code}" if code >= 0 else f"killed by signal {-code}, as the out-of-memory killer does"
    return ConverterError(f"llama.cpp's {CONVERTER} failed on {folder} ({status}): {line}; "
                          f"{hint.format(llama_cpp=script.parent)}")


def run_converter(folder: str | Path, outfile: str | Path, outtype: str, llama_cpp: str | Path,
                  overwrite: bool = False, echo: Callable[[str], None] | None = None) -> list[str]:
    """Run ``llama_cpp/convert_hf_to_gguf.py`` on ``folder`` with this interpreter; the GGUF appears at
    ``outfile`` only once the converter succeeded (it writes to a staging name beside it first).
    Returns the command that ran; raises :class:`ConverterError` naming the converter's last error line."""
    import subprocess

    folder, outfile = Path(folder), Path(outfile)
    script = Path(llama_cpp) / CONVERTER
    if not Path(llama_cpp).is_dir():
        raise InputNotFoundError(f"--llama-cpp {llama_cpp}: does not exist; pass the root of a llama.cpp checkout "
                                 "(git clone https://github.com/ggml-org/llama.cpp)")
    if not script.is_file():
        raise InputNotFoundError(f"--llama-cpp {llama_cpp}: has no {CONVERTER}; pass the root of a llama.cpp checkout "
                                 "(git clone https://github.com/ggml-org/llama.cpp)")
    if not folder.is_dir():
        raise InputNotFoundError(f"merged folder {folder}: does not exist; pass the folder merge-adapter wrote")
    if outtype not in OUTTYPES:
        raise OptionsError(f"--outtype {outtype}: not one of {', '.join(OUTTYPES)}")
    check_outfile(outfile, overwrite)
    staging = outfile.parent / f".merger-gguf-{os.getpid()}.tmp"
    command = converter_command(folder, staging, outtype, script, sys.executable)
    log.info("converting %s with %s (-v shows its output)", folder, script)
    tail: deque[str] = deque(maxlen=200)
    try:
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as proc:
            try:
                for line in proc.stdout:  # text mode splits tqdm's \r updates into lines too
                    tail.append(line.rstrip("\n"))
                    if echo is not None:
                        echo(line.rstrip("\n"))
                code = proc.wait()
            except BaseException:  # Ctrl-C, SIGTERM: the converter goes too, and its half-written file
                proc.kill()
                proc.wait()
                raise
        if code != 0:
            raise _converter_failed(code, list(tail), script, folder)
        if not staging.is_file():
            raise ConverterError(f"llama.cpp's {CONVERTER} exited 0 but wrote no {staging.name}; rerun with -v to see its output")
        os.replace(staging, outfile)
    finally:
        staging.unlink(missing_ok=True)
    return converter_command(folder, outfile, outtype, script, sys.executable)
