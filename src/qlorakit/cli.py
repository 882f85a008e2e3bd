"""``qlorakit``: one subcommand per verb.

    qlorakit train [RECIPE.yaml] [key=value ...]     fine-tune (no arguments: the default recipe)
    qlorakit train --resume RUN_DIR                  continue from the latest checkpoint
    qlorakit train --nproc N ...                     train data parallel in N processes (torchrun)
    qlorakit generate RUN_DIR "prompt"               one answer from the tuned model
    qlorakit chat RUN_DIR                            a terminal chat with the tuned model
    qlorakit plan [RECIPE.yaml] [key=value ...]      predicted memory and time of a run
    qlorakit data inspect|check FILE...              look at and check training data
    qlorakit eval RUN_DIR                            base vs tuned on every suite, with a gate
    qlorakit export RUN_DIR --format ...             merged, PEFT, GGUF and Ollama exports
    qlorakit serve --adapter NAME=RUN_DIR            an OpenAI-compatible server
    qlorakit recipe                                  every recipe key with its default and meaning
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["main", "USER_ERRORS", "number_arg"]

# subcommands implemented in their own packages: name -> "module:function(argv) -> int"
DELEGATED = {
    "data": "qlorakit.data.cli:data_main",
    "eval": "qlorakit.eval.cli:eval_main",
    "export": "qlorakit.export.cli:export_main",
    "serve": "qlorakit.serve.cli:serve_main",
    "plan": "qlorakit.train.plan:plan_main",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input: printed as one clear line, exit code 2."""
    from .config import RecipeError
    from .data import DataError
    from .lora import AdapterError
    from .models import ModelError
    from .train import CheckpointError, RunError, TrainError
    from .train.distributed import DistributedError

    errs: list[type[BaseException]] = [RecipeError, DataError, ModelError, AdapterError, TrainError, RunError,
                                       CheckpointError, DistributedError]
    for mod, name in (("qlorakit.export", "ExportError"), ("qlorakit.eval.cli", "EvalError")):
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue  # that package does not define one
    return tuple(errs)


USER_ERRORS = _user_errors


def _quiet_libraries(verbose: bool) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="qlorakit: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    # bitsandbytes reports an optional CPU kernel package it could not import; it is not needed here
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qlorakit train", description="Fine-tune a LoRA adapter on a 4-bit base.")
    p.add_argument("items", nargs="*", help="an optional RECIPE.yaml, then key=value overrides (e.g. train.lr=1e-4)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint (or, "
                   "when its training finished and the evaluation after it did not, run that evaluation)")
    p.add_argument("--nproc", type=number_arg(int, 1), default=1, metavar="N",
                   help="train data parallel in N processes on this machine (through torchrun; the same as "
                   "'torchrun --nproc-per-node N -m qlorakit train ...'): a step then takes N x train.grad_accum "
                   "micro-batches, and the cores and the memory budget are shared among the processes")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    _quiet_libraries(a.verbose)
    from .config import load_recipe
    from .train import train
    from .train.distributed import launch, world_from_env

    path = None
    overrides = list(a.items)
    if overrides and "=" not in overrides[0]:
        path = overrides.pop(0)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"expected key=value overrides after the recipe, got {bad}")
    if a.resume and path:
        p.error("--resume takes the recipe from the run folder; give only key=value overrides")
    group = world_from_env()
    if a.nproc > 1:
        if group.active:
            p.error(f"--nproc {a.nproc}: this process is already one of {group.world} started by torchrun")
        from .train.loop import check_output_dir, resumed_recipe

        # a bad override, run folder or output_dir fails here, once, before any process starts
        if a.resume:
            resumed_recipe(a.resume, overrides)
        else:
            check_output_dir(load_recipe(path, overrides))
        again = [*a.items, *(["--resume", a.resume] if a.resume else []), *(["-v"] if a.verbose else [])]
        return launch(a.nproc, ["train", *again])
    if not group.main:  # one process of several: the first one reports
        logging.getLogger("qlorakit").setLevel(logging.ERROR)
    if a.resume:
        train(resume=a.resume, overrides=overrides)
    else:
        train(load_recipe(path, overrides))
    return 0


def number_arg(kind: type, low: float, *, above: bool = False, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: a ``kind`` number >= ``low`` (> with ``above``) and <= ``high``."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if value != value or (value <= low if above else value < low) or (high is not None and value > high):
            rng = f"{'>' if above else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise argparse.ArgumentTypeError(f"expected a value {rng}, got {text}")
        return value

    return parse


def _sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=number_arg(int, 1), default=max_new_tokens)
    p.add_argument("--temperature", type=number_arg(float, 0.0), default=0.0, help="0: greedy")


def _generate(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qlorakit generate", description="Answer one prompt with the tuned model.")
    p.add_argument("run_dir")
    p.add_argument("prompt")
    _sampling_args(p, 128)
    p.add_argument("--top-p", type=number_arg(float, 0.0, above=True, high=1.0), default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--base", action="store_true", help="answer with the base model (adapter off)")
    p.add_argument("--raw", action="store_true", help="complete the prompt as plain text, no chat template")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    _quiet_libraries(a.verbose)
    import contextlib

    from .lora import adapters_disabled
    from .models import chat_prompt, generate
    from .train import RunError, load_run

    loaded, _ = load_run(a.run_dir)
    prompt = a.prompt if a.raw else chat_prompt(loaded.tokenizer, [{"role": "user", "content": a.prompt}])
    n_prompt = len(loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    context = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0)
    if context and n_prompt >= context:
        raise RunError(f"the prompt has {n_prompt} tokens (chat template included); the model reads at most "
                       f"{context}, and an answer needs room after the prompt: shorten the prompt")
    ctx = adapters_disabled(loaded.model) if a.base else contextlib.nullcontext()
    with ctx:
        out = generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens=a.max_new_tokens,
                       temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    print(out.text.strip())
    return 0


def _chat(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qlorakit chat", description="Chat with the tuned model in the terminal.")
    p.add_argument("run_dir")
    _sampling_args(p, 256)
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    _quiet_libraries(a.verbose)
    from .models import chat_prompt, generate_stream
    from .train import load_run

    loaded, _ = load_run(a.run_dir)
    history: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the tuned model. Empty line or Ctrl-D to quit, /reset to start over.")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            break
        if line.strip() == "/reset":
            history = history[:1] if a.system else []
            continue
        history.append({"role": "user", "content": line})
        print("model> " if interactive else "", end="", flush=True)
        reply = ""
        for piece in generate_stream(loaded.model, loaded.tokenizer, chat_prompt(loaded.tokenizer, history),
                                     max_new_tokens=a.max_new_tokens, temperature=a.temperature):
            reply += piece
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


def _recipe(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="qlorakit recipe", description="Every recipe key, its default and meaning.")
    p.add_argument("--yaml", action="store_true", help="print the default recipe as YAML")
    a = p.parse_args(argv)
    from .config import Recipe, describe_recipe, dump_recipe

    if a.yaml:
        print(dump_recipe(Recipe()), end="")
        return 0
    for key, default, help_ in describe_recipe():
        print(f"{key} = {default}\n    {help_}")
    return 0


LOCAL: dict[str, Callable[[list[str]], int]] = {
    "train": _train, "generate": _generate, "chat": _chat, "recipe": _recipe,
}


def _dispatch(cmd: str, argv: list[str]) -> int:
    if cmd in LOCAL:
        return LOCAL[cmd](argv)
    mod, _, fn = DELEGATED[cmd].partition(":")
    try:
        func = getattr(importlib.import_module(mod), fn)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("qlorakit"):
            print(f"qlorakit {cmd}: not available in this version", file=sys.stderr)
            return 2
        raise
    return int(func(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = sorted(set(LOCAL) | set(DELEGATED))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 0
    if argv[0] == "--version":
        from . import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    # bitsandbytes warns at import about an optional CPU kernel package that is not needed here
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if cmd not in commands:
        import difflib

        close = difflib.get_close_matches(cmd, commands, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(f"qlorakit: unknown command {cmd!r}{hint} (commands: {', '.join(commands)})", file=sys.stderr)
        return 2
    try:
        return _dispatch(cmd, rest)
    except _user_errors() as e:
        who = f" (process {os.environ['RANK']})" if os.environ.get("RANK", "0") != "0" else ""  # under torchrun
        print(f"qlorakit {cmd}{who}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qlorakit {cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
