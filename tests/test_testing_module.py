"""The test doubles live in ``clusterfsm.states.testing``, which production never imports.

``serve`` (and everything it may import lazily: the supervisor, demo, reports) must
start without ``clusterfsm.states.testing`` or ``trio.testing`` (which pulls in
pytest, ~75 ms on every process start). Checked in a fresh interpreter, since this
test process has imported both long ago.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import importlib, pkgutil, sys
import clusterfsm.states
from clusterfsm.states.cli import main  # the serve path's entry point
for info in pkgutil.iter_modules(clusterfsm.states.__path__):
    if info.name != "testing":
        importlib.import_module(f"clusterfsm.states.{info.name}")
leaked = [m for m in ("clusterfsm.states.testing", "trio.testing", "pytest") if m in sys.modules]
print(",".join(leaked))
"""


def test_production_modules_never_import_the_test_doubles() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "", f"imported by production modules: {out.stdout}"


def test_the_test_doubles_are_not_in_the_production_modules() -> None:
    from clusterfsm.states import context, discovery, groupinit, transport

    for module, names in ((transport, ("MemoryNetwork", "MemoryListener", "MemoryTransport")),
                          (groupinit, ("FakeGroup", "fake_initializer")),
                          (context, ("FakePortReservation",)),
                          (discovery, ("MemoryBeaconSocket", "MemoryLinks",
                                       "MemoryDiscoveryNet"))):
        for name in names:
            assert not hasattr(module, name), f"{module.__name__}.{name}"
