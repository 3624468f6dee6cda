"""Process exit codes shared by every ``clusterfsm`` command.

0 success; 1 the machine ended in an error state (the state and error type are
printed); 2 bad usage or configuration; 130 interrupted before ready.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
