"""clusterfsm's cluster bootstrap: a declared machine (``clusterfsm.states.machine``) that takes N
ranks from discovery to a ready MLX distributed group, and the parts it runs on.

The embedding API is :func:`clusterfsm.states.api.bootstrap_cluster`.
"""
