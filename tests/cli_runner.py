"""A fork server for command-line tests: imports forgetkit's command lines once, then runs each
requested command in a forked child process, as ``python -m MODULE ARGS`` or
``python SCRIPT ARGS`` would run it (``__main__`` executed anew, ``sys.argv`` set, an uncaught
exception printed with its traceback and exit status 1, ``SystemExit`` as the interpreter
treats it). The child is a real process with its own exit status, stdout and stderr; only the
~5 s of importing torch, transformers and forgetkit is paid once instead of per command.

Protocol: one JSON object per line on stdin, ``{"module": "forgetkit.train" | "script":
"experiments/pareto.py", "argv": [...], "cwd": "...", "env": {...}, "timeout": 120}``; one
JSON line back per request, ``{"rc": int, "stdout": str, "stderr": str}`` (``rc`` -9 when
killed at the timeout). The parent never runs torch code, so forking it is safe.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback

PRELOAD = ("forgetkit.train.run", "forgetkit.mixsd.targets", "forgetkit.diagnostics.nll",
           "forgetkit.fisher.report", "forgetkit.fisher.render",
           "forgetkit.models.loading", "pandas", "matplotlib.figure", "yaml",
           "transformers.models.llama.modeling_llama", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.tokenization_auto", "safetensors.torch")


def _child(request: dict, out_path: str, err_path: str) -> None:
    for fd, path in ((1, out_path), (2, err_path)):
        handle = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 (the child ends with os._exit)
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    code = 0
    try:
        os.chdir(request.get("cwd") or os.getcwd())
        os.environ.update(request.get("env") or {})
        if "module" in request:
            sys.argv = [request["module"], *request["argv"]]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [request["script"], *request["argv"]]
            runpy.run_path(request["script"], run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # as the interpreter does with an uncaught exception
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _run(request: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        pid = os.fork()
        if pid == 0:
            _child(request, out_path, err_path)
        deadline = time.monotonic() + float(request.get("timeout", 300))
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = -9
                break
            time.sleep(0.01)
        with open(out_path, encoding="utf-8", errors="replace") as out, \
                open(err_path, encoding="utf-8", errors="replace") as err:
            return {"rc": rc, "stdout": out.read(), "stderr": err.read()}


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the imports print goes to stderr, not into the replies
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        if line.strip():
            replies.write(json.dumps(_run(json.loads(line))) + "\n")
            replies.flush()


if __name__ == "__main__":
    serve()
