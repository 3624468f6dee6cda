"""What the ``serve`` path does at start-up, and what it leaves for later.

Every rank pays its imports before it can join a group (docs/performance.md,
"Start-up"), so work that only some runs need is done where those runs need it. Each
test here fails if such work moves back to start-up. The imports are checked in a
fresh interpreter: this test process has imported everything long ago.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import attrs

import clusterfsm.states

#: What ``clusterfsm serve`` imports before its machine runs (as bench/startup.py).
SERVE_PATH = ("clusterfsm.states.cli", "clusterfsm.states.serve", "clusterfsm.states.api")

#: Modules the serve path must not import at start-up, and who needs them instead.
DEFERRED = {
    "tomllib": "config_from_toml: only a start from a TOML file reads one",
    "clusterfsm.states.initledger": "the init ledger: made on first use, by jaccl only",
    "clusterfsm.states.doctor": "clusterfsm doctor",
    "clusterfsm.states.supervisor": "clusterfsm serve --supervise",
    "clusterfsm.states.demo": "clusterfsm demo",
    "clusterfsm.states.tracereport": "clusterfsm trace",
    "clusterfsm.states.htmlreport": "clusterfsm report",
    "clusterfsm.states.rdma": "the jaccl plan check, in idle",
}

PROBE = f"""
import sys
for name in {SERVE_PATH!r}:
    __import__(name)
import tokenize
print(",".join(m for m in {sorted(DEFERRED)!r} if m in sys.modules))
# tokenize's token regex is compiled on its first use (functools.cache): by
# inspect.signature on a builtin, which attrs asks of every converter.
print(tokenize._compile.cache_info().currsize)
"""


def _probe() -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.splitlines()


def test_the_serve_path_leaves_deferred_modules_for_later() -> None:
    leaked, _ = _probe()
    assert leaked == "", {name: DEFERRED[name] for name in leaked.split(",")}


def test_the_serve_path_never_tokenizes_a_signature() -> None:
    """``converter=tuple`` made attrs call ``inspect.signature(tuple)``, which tokenizes
    the builtin's text signature: ~2 ms of every start, for nothing."""
    _, compiled = _probe()
    assert compiled == "0"


def test_no_attrs_field_converts_with_a_builtin() -> None:
    """The same rule for every module, checked on the classes: a converter is a Python
    function (``inspect.signature`` then reads its annotations, no tokenizing)."""
    offenders = []
    for info in pkgutil.iter_modules(clusterfsm.states.__path__):
        if info.name == "testing":
            continue
        module = importlib.import_module(f"clusterfsm.states.{info.name}")
        for name, value in vars(module).items():
            if not (inspect.isclass(value) and attrs.has(value)
                    and value.__module__ == module.__name__):
                continue
            for field in attrs.fields(value):
                converter = field.converter
                if converter is not None and (inspect.isbuiltin(converter)
                                              or isinstance(converter, type)):
                    offenders.append(f"{module.__name__}.{name}.{field.name}")
    assert offenders == []


def test_output_line_patterns_are_compiled_on_first_match() -> None:
    """A rank prints lines and never parses one: their patterns are text until a
    reader (a supervisor, the demo) matches the first line."""
    import re

    from clusterfsm.states import lines

    compiled = [f"{name}.{attr}" for name, cls in vars(lines).items() if inspect.isclass(cls)
                for attr, value in vars(cls).items() if isinstance(value, re.Pattern)]
    assert compiled == []
