"""The exceptions the CLI turns into one line: bad user input, and a run stopped by a signal."""


class UserError(Exception):
    """Bad input (files, configs, checkpoints). The CLI prints `error: <message>` and exits 2, no traceback."""


class Interrupted(Exception):
    """SIGTERM/SIGINT stopped a phase after it checkpointed. It propagates through grid, continual and select
    (no caller can mistake a partial phase for a finished one); the CLI prints the message and exits 0."""

    def __init__(self, phase: str, step: int):
        super().__init__(f"interrupted at step {step} of {phase}; rerun the same command to continue")
        self.phase, self.step = phase, step
