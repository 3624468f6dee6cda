"""clusterfsm: an MLX distributed group brought up by a declared state machine on trio.

The repository keeps the framework in ``fsm/`` and the cluster machine in ``states/``
(the design card's layout); this package is their one installed home, so the import
names are ``clusterfsm.fsm`` and ``clusterfsm.states`` and never collide with another
distribution's top-level ``fsm`` or ``states``. ``clusterfsm/fsm`` and
``clusterfsm/states`` are symbolic links to those folders: one copy of the code, and
every tool (mypy, ruff, pytest, setuptools) sees ordinary package paths.
"""
