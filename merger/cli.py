"""merge-adapter: parse, build options, call the API, render, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager

from .errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_VALIDATION_FAILED, MergerError, OptionsError
from .inputs import short
from .options import MergeOptions, load_config_file, option_fields

EXAMPLES = """examples:
  merge-adapter --base ./Llama-2-7b-hf --adapter ./my-lora --out ./merged
  merge-adapter inspect --base ./Llama-2-7b-hf --adapter ./my-lora
  merge-adapter validate ./merged --base ./Llama-2-7b-hf --adapter ./my-lora
  merge-adapter validate ./merged-elsewhere --base ./Llama-2-7b-hf --repair
  merge-adapter --config configs/llama-factory.yaml --base B --adapter A --out O --dtype bfloat16
  merge-adapter demo
  merge-adapter gguf ./merged --llama-cpp ~/llama.cpp --outtype bf16   # convert with llama.cpp, check the GGUF
  merge-adapter gguf ./merged --check ./merged.gguf                      # check a GGUF someone converted

exit codes: 0 merged and validated, 1 validation failed (OUT untouched), 2 bad input or usage
"""

COMMANDS = ("merge", "inspect", "validate", "demo", "gguf")


WRITE_ONLY_OPTIONS = ("overwrite", "max_shard_size", "push_to_hub", "private", "revision", "create_pr")  # meaningless where nothing is written


def _add_option_flags(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group("merge options (also config-file keys and merge_adapter() keywords)")
    for f in option_fields():
        if command in ("inspect", "validate") and f.name in WRITE_ONLY_OPTIONS:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + (f" (default: {f.default})" if f.default not in (None, False) else "")
        if f.type in (bool, "bool"):
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=help_text)
        else:
            kind = int if "int" in str(f.type) else str
            group.add_argument(flag, type=kind, choices=f.metadata.get("choices"), metavar=f.metadata.get("metavar"),
                               default=argparse.SUPPRESS, help=help_text)


def _add_common(parser: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        parser.add_argument("--config", metavar="FILE", help="YAML file of merge options; flags given here override it")
    else:  # a command that takes no merge options
        parser.set_defaults(config=None)
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def build_parser(command: str, config_given: bool = False) -> argparse.ArgumentParser:
    """The parser of ``command``; with ``config_given``, --adapter may come from the config file instead."""
    prog = "merge-adapter" if command == "merge" else f"merge-adapter {command}"
    descriptions = {
        "merge": "Merge a PEFT LoRA adapter into its base model and write a validated checkpoint.",
        "inspect": "Show what a merge would do (rows, tying, operations, problems); writes nothing.",
        "validate": ("Check an existing merged checkpoint (any tool's): its weights against base + adapter, and what "
                     "transformers, vLLM, SGLang, TGI and llama.cpp's converter read; --repair fixes the metadata."),
        "demo": "Build a tiny base and a resized-vocabulary adapter, merge them, show the story. No downloads.",
        "gguf": ("Convert a merged folder to GGUF with llama.cpp's own convert_hf_to_gguf.py (not bundled: without "
                 "--llama-cpp, print the command), then check the GGUF's vocabulary against the folder; exit 1 when a check fails."),
    }
    parser = _Parser(prog=prog, description=descriptions[command], epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "validate":
        parser.add_argument("out", metavar="OUT", help="the merged checkpoint folder to check")
        parser.add_argument("--repair", action="store_true",
                            help="fix the metadata readers need (vocab_size, tie flags, dtype, generation config stop tokens; "
                                 "with --base, tokenizer files) in place, atomically, printing each change; never the weights")
    if command in ("merge", "inspect", "validate"):
        parser.add_argument("--base", metavar="BASE", help="base model folder or Hub id (default: the base_model_name_or_path recorded in the adapter)")
        parser.add_argument("--adapter", metavar="ADAPTER", action="append",
                            required=command in ("merge", "inspect") and not config_given,
                            help="PEFT adapter folder or Hub id; repeat it for a pipeline's stages in training order "
                                 "(--adapter PT --adapter SFT --adapter DPO: each trained on the merge of those before it), "
                                 "merged in one pass" + (" (without it, validate checks only what serving engines "
                                                         "read, not the weights)" if command == "validate" else ""))
    if command == "merge":
        parser.add_argument("--out", required=True, metavar="OUT", help="output folder (written atomically)")
    if command == "demo":
        parser.add_argument("--out", metavar="OUT", help="keep the demo's merged model here (default: a temporary folder)")
    if command == "gguf":
        _add_gguf_arguments(parser)
    parser.set_defaults(command=command)
    _add_common(parser, config=command != "gguf")
    if command != "gguf":
        _add_option_flags(parser, command)
    return parser


def _add_gguf_arguments(parser: argparse.ArgumentParser) -> None:
    from .llama_cpp import CONVERTER, OUTTYPES

    parser.add_argument("dir", metavar="DIR", help="the merged checkpoint folder")
    parser.add_argument("--llama-cpp", metavar="LLAMA_CPP_DIR", help=f"a llama.cpp checkout: run its {CONVERTER} with this "
                        "Python (default: print the command to run, and do nothing else)")
    parser.add_argument("--outtype", choices=OUTTYPES, help="the converter's --outtype (default: auto, which llama.cpp "
                        "makes bf16 for bf16 weights, else f16)")
    parser.add_argument("--outfile", metavar="FILE", help="the GGUF to write (default: DIR-OUTTYPE.gguf beside DIR, DIR.gguf for auto)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --outfile")
    parser.add_argument("--check", metavar="FILE", help="convert nothing: check this existing GGUF against DIR")


def resolve_options(args: argparse.Namespace) -> MergeOptions:
    """defaults < config file < flags given on the command line."""
    values = {}
    if args.config:
        values.update(load_config_file(args.config))
        _inputs_from_config(args, values)
    if hasattr(args, "adapter"):
        _adapter_argument(args)
    names = {f.name for f in option_fields()}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return MergeOptions.from_mapping(values, f"config file {args.config}" if args.config else "options")


CONFIG_INPUTS = ("base", "adapter")  # inputs a config file may name (flags win); not merge options


def _inputs_from_config(args: argparse.Namespace, values: dict) -> None:
    """``base:`` and ``adapter:`` (one folder, or a list of stages) from a config file, where no flag gives them."""
    for name in CONFIG_INPUTS:
        if name not in values:
            continue
        value = values.pop(name)
        if not hasattr(args, name):
            raise OptionsError(f"config file {args.config}: {name} is an input of merge, inspect and validate, not of this command")
        stages = value if isinstance(value, list) else [value]
        if not stages or not all(isinstance(v, str) and v.strip() for v in stages) or (name == "base" and isinstance(value, list)):
            want = "a folder or Hub id" + (", or a list of them (the stages, in training order)" if name == "adapter" else "")
            raise OptionsError(f"config file {args.config}: {name} is {short(value)} but must be {want}")
        if getattr(args, name) is None:
            setattr(args, name, stages if name == "adapter" else value)


def _adapter_argument(args: argparse.Namespace) -> None:
    """--adapter as the API takes it: one folder, or the list of stages when repeated."""
    stages = args.adapter
    if stages is None:
        if args.command != "validate":
            raise OptionsError(f"merge-adapter{'' if args.command == 'merge' else ' ' + args.command}: --adapter is required "
                               "(the PEFT adapter folder; repeat it for stacked stages)")
        return
    args.adapter = stages[0] if len(stages) == 1 else list(stages)


def _configure_logging(args) -> None:
    level = logging.WARNING if args.quiet else logging.INFO
    if args.verbose >= 2:
        level = logging.DEBUG
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:  # our own bar covers the merge; transformers' per-load bars would repeat for every reload
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    for noisy in ("transformers", "peft", "accelerate", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR if args.verbose < 2 else logging.INFO)


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors in the one-line form every other error has."""

    stray: str | None = None  # a first word that is no command (a mistyped one)

    def error(self, message: str):  # noqa: D401 - argparse's hook
        hint = ""
        if self.stray and self.stray in message:
            hint = f" ({self.stray!r} is not a command: {', '.join(COMMANDS)}; without one, merge-adapter merges)"
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}{hint}; see {self.prog} --help\n")


class Interrupted(BaseException):
    """SIGTERM or SIGHUP (docker stop, timeout, a closed terminal): unwinds like Ctrl-C, so the
    staging folder is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _ignore_further_signals() -> None:
    """After the first interrupt the run is unwinding (removing its staging folder, releasing OUT's
    lock): a second Ctrl-C must not cut that short or print a traceback from the exit handlers."""
    import signal

    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            try:
                signal.signal(signum, signal.SIG_IGN)
            except ValueError:  # not the main thread
                pass


def _raise_interrupted(signum, _frame):
    _ignore_further_signals()
    if signum == 2:
        raise KeyboardInterrupt
    raise Interrupted(signum)


@contextmanager
def _signals_unwind():
    import signal

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        signum = getattr(signal, name, None)
        if signum is not None:
            try:
                previous[signum] = signal.signal(signum, _raise_interrupted)
            except ValueError:  # not the main thread (an embedding application): leave signals alone
                pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    as_process = argv is None
    if as_process:  # nothing merger runs may wait for an answer: a library prompt reads end-of-file
        import os

        sys.stdin = open(os.devnull)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "merge"
    parser = build_parser(command, config_given=any(a == "--config" or a.startswith("--config=") for a in argv))
    if argv and not argv[0].startswith("-") and command == "merge":
        parser.stray = argv[0]
    args = parser.parse_args(argv)
    _configure_logging(args)
    if not args.debug:
        import warnings

        warnings.filterwarnings("ignore")
    # what an unexpected failure leaves behind: merges write OUT by one rename, so never half of it
    untouched = "; OUT was not written" if command in ("merge", "demo") else ""
    try:
        with _signals_unwind():
            options = resolve_options(args)
            code = _run(command, args, options)
        if as_process:  # the work is done and committed: a late Ctrl-C must not turn it into a crash
            import signal

            signal.signal(signal.SIGINT, signal.SIG_IGN)
        return code
    except MergerError as exc:
        if args.debug:
            raise
        return _fail(args, str(exc), exc.exit_code, getattr(exc, "report", None))
    except (KeyboardInterrupt, Interrupted) as exc:
        if as_process:  # exiting joins worker threads: another Ctrl-C there would print a traceback
            _ignore_further_signals()
        signum = exc.signum if isinstance(exc, Interrupted) else 2
        where = ("; OUT is as it was, or complete if the merge had already committed it (one rename, never half)"
                 if untouched else "")
        return _fail(args, f"interrupted{where}", 128 + signum)
    except Exception as exc:  # an unexpected failure still gets one line, and never a half-written OUT
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(args, f"unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback){untouched}", EXIT_BAD_INPUT)


MAX_MESSAGE = 2000


def one_line(message: str) -> str:
    """The message as one bounded line: names from inputs (tensor keys, file names) may hold
    newlines or control characters that would forge further lines, or run to megabytes."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[: MAX_MESSAGE + 1])
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _fail(args, message: str, code: int, report=None) -> int:
    """One line on stderr; with --json, the same as a JSON object on stdout."""
    message = one_line(message)
    print(f"error: {message}", file=sys.stderr)
    if args.json:
        payload = {"ok": False, "exit_code": code, "error": message}
        if report is not None:
            payload["validation"] = report.to_dict()
        print(json.dumps(payload, indent=2))
    return code


def _run(command: str, args, options: MergeOptions) -> int:
    from . import api, render

    if command == "demo":
        from .demo import run_demo

        return run_demo(args.out, options, quiet=args.quiet, as_json=args.json)
    if command == "gguf":
        return _run_gguf(args)
    if command == "inspect":
        plan = api.inspect_adapter(args.base, args.adapter, options)
        print(json.dumps(render.plan_dict(plan), indent=2, default=str) if args.json else render.plan_text(plan))
        if plan.problems:  # the plan above lists them all; stderr gets the one a merge would stop on
            from .errors import IncompatibleError

            print(f"error: {IncompatibleError(list(plan.problems))}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return EXIT_OK
    if command == "validate":
        if options.validate == "off":
            raise OptionsError("merge-adapter validate: --validate off would check nothing; use fast (the default) or full")
        return _validate(args, options)
    if args.config:  # the one input only the CLI knows of: OUT must not swallow it either
        from pathlib import Path

        from .commit import check_no_overlap

        check_no_overlap(Path(args.out), {"--config": Path(args.config)})
    result = api.merge_adapter(args.base, args.adapter, args.out, options, quiet=args.quiet)
    if args.json:
        print(json.dumps(render.result_dict(result), indent=2, default=str))
    else:
        if not args.quiet:
            for line in result.plan.stories:
                print(line)
        print(result.summary())
        serving = render.serving_text(result.validation.serving)
        if serving and (not args.quiet or len(serving) > 1):  # quiet still says what a reader will get wrong
            print("\n".join(serving))
    return EXIT_OK


def _run_gguf(args) -> int:
    """Print llama.cpp's conversion command, or run it; then check the GGUF against DIR."""
    import shlex
    from pathlib import Path

    from . import gguf, llama_cpp

    if args.check is not None:
        given = [flag for flag, value in (("--llama-cpp", args.llama_cpp), ("--outfile", args.outfile),
                                          ("--outtype", args.outtype), ("--overwrite", args.overwrite)) if value]
        if given:
            raise OptionsError(f"merge-adapter gguf: --check reads an existing GGUF and {', '.join(given)} convert a new one; "
                               "give one or the other")
        report = gguf.check_gguf(args.check, args.dir)
    else:
        outtype = args.outtype or "auto"
        outfile = Path(args.outfile) if args.outfile else llama_cpp.default_outfile(args.dir, outtype)
        if args.llama_cpp is None:
            if not Path(args.dir).is_dir():
                from .errors import InputNotFoundError

                raise InputNotFoundError(f"merged folder {args.dir}: does not exist; pass the folder merge-adapter wrote")
            command = shlex.join(llama_cpp.converter_command(args.dir, outfile, outtype, f"llama.cpp/{llama_cpp.CONVERTER}"))
            check = shlex.join(["merge-adapter", "gguf", args.dir, "--check", str(outfile)])
            print(json.dumps({"ok": True, "converted": False, "command": command, "check": check}, indent=2)
                  if args.json else f"{command}\n{check}")
            if not args.quiet:
                print(f"llama.cpp is not bundled: run the first command from beside a llama.cpp checkout (git clone "
                      f"https://github.com/ggml-org/llama.cpp; pip install -r llama.cpp/{llama_cpp.CONVERTER_REQUIREMENTS}), "
                      "then the second to check the GGUF; or pass --llama-cpp DIR to have merge-adapter do both", file=sys.stderr)
            return EXIT_OK
        model = gguf.read_model_facts(args.dir)  # a folder or a package that cannot be checked fails before converting
        gguf.import_gguf()
        echo = (lambda line: print(line, file=sys.stderr)) if args.verbose else None
        ran = llama_cpp.run_converter(args.dir, outfile, outtype, args.llama_cpp, overwrite=args.overwrite, echo=echo)
        report = gguf.check_gguf(outfile, args.dir, model)
        report.command = ran
    print(json.dumps(report.to_dict(), indent=2) if args.json else gguf.report_text(report))
    return EXIT_OK if report.ok else EXIT_VALIDATION_FAILED


def _validate(args, options: MergeOptions) -> int:
    """validate OUT [--base B] [--adapter A] [--repair]: repair first (metadata only), then prove."""
    from . import api, render
    from .sources import resolve_base, resolve_folder
    from .validate import ValidationReport

    out = resolve_folder(args.out, "out")
    first = args.adapter[0] if isinstance(args.adapter, list) else args.adapter
    adapter = resolve_folder(first, "adapter") if first else None
    base = resolve_base(args.base, adapter) if adapter else (resolve_folder(args.base, "base") if args.base else None)
    repaired = api.repair_checkpoint(out, base) if args.repair else []
    if adapter is not None:
        report = api.validate_checkpoint(out, base, args.adapter, options.validate, options)
    else:
        from .serving import check_serving

        report = ValidationReport("none")
        report.serving = check_serving(out, base)
    ready = all(row["ok"] for row in report.serving)
    if args.json:
        print(json.dumps({**report.to_dict(), "repaired": repaired, "ready": ready}, indent=2))
    else:
        for line in repaired:
            print(f"repaired: {line}")
        if args.repair and not repaired:
            print("repaired: nothing needed fixing")
        print(render.report_text(report))
    return EXIT_OK if report.ok and ready else EXIT_VALIDATION_FAILED
