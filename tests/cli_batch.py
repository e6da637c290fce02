"""Run several ``train.py`` command lines in one process (for the one-line-error tests).

``python cli_batch.py CASES.json`` where the file holds ``[{"args": [...], "cwd": "..."}, ...]`` (``"entry":
"attack"``: the case is an ``attack.py`` command line);
prints one JSON line ``[{"code": int, "stderr": str}, ...]``. Each case goes through the real entry
point (``unlearn.cli.main``) with a fresh Hydra state, so exit codes and stderr are what a user sees;
only the interpreter start-up (torch, Hydra) is shared.
"""
import contextlib
import io
import json
import os
import sys


def run_case(args, cwd, entry="train"):
    from hydra.core.global_hydra import GlobalHydra

    if entry == "attack":
        from unlearn.attacks.run import main
    else:
        from unlearn.cli import main

    GlobalHydra.instance().clear()
    old_cwd, old_argv = os.getcwd(), sys.argv
    err = io.StringIO()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [str(os.path.join(os.path.dirname(__file__), "..", f"{entry}.py")), *args]
        with contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception as e:  # a traceback is what the test must not see: record it as one
                import traceback

                err.write("Traceback (most recent call last):\n" + traceback.format_exc())
                code = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return {"code": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(open(sys.argv[1]).read())
    print(json.dumps([run_case(c["args"], c["cwd"], c.get("entry", "train")) for c in cases]))
