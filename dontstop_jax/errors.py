"""The exceptions the CLI turns into one line: bad user input, a run stopped by a signal, and a fault of another
process. The exit statuses a scheduler reads (docs/scale/preemption.md): 0 done, 1 fault, 2 bad input, 75 stopped."""

EXIT_FAULT, EXIT_USER, EXIT_INTERRUPTED = 1, 2, 75  # 75: EX_TEMPFAIL, "try again later" (a rerun continues)


class UserError(Exception):
    """Bad input (files, configs, checkpoints). The CLI prints `error: <message>` and exits 2, no traceback."""


class Fault(Exception):
    """Not the user's input: another process of the run failed or stopped answering. One line, exit 1."""


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped a phase after it checkpointed. It propagates through grid, continual and select
    (no caller can mistake a partial phase for a finished one); the CLI prints the message and exits 75, so a
    scheduler's restart policy reruns it."""

    def __init__(self, phase: str, step: int):
        super().__init__(f"interrupted at step {step} of {phase}; rerun the same command to continue")
        self.phase, self.step = phase, step
