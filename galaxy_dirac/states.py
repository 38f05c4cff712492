"""DIRAC job and pilot states and the job state transition table.

The table is DIRAC's (``JobsStateMachine``): the runner, the pilot and the scheduler all reason about jobs in these
terms, and a real DIRAC/DiracX installation enforces the same edges, so behaviour does not change when a site moves
from the embedded scheduler to DiracX.
"""

from __future__ import annotations

SUBMITTING = "Submitting"
RECEIVED = "Received"
CHECKING = "Checking"
STAGING = "Staging"
WAITING = "Waiting"
MATCHED = "Matched"
RESCHEDULED = "Rescheduled"
RUNNING = "Running"
STALLED = "Stalled"
COMPLETING = "Completing"
DONE = "Done"
COMPLETED = "Completed"
FAILED = "Failed"
DELETED = "Deleted"
KILLED = "Killed"

JOB_STATES = (
    SUBMITTING,
    RECEIVED,
    CHECKING,
    STAGING,
    WAITING,
    MATCHED,
    RESCHEDULED,
    RUNNING,
    STALLED,
    COMPLETING,
    DONE,
    COMPLETED,
    FAILED,
    DELETED,
    KILLED,
)

#: States in which the payload has finished; what the runner waits for.
FINAL_STATES = frozenset({DONE, COMPLETED, FAILED, KILLED, DELETED})

#: States in which a payload may be executing somewhere, so a kill must also reach a pilot.
ACTIVE_STATES = frozenset({MATCHED, RUNNING, STALLED, COMPLETING})

#: Allowed next states. Staying in the same state is always allowed (a minor status update).
JOB_TRANSITIONS: dict[str, frozenset[str]] = {
    SUBMITTING: frozenset({RECEIVED, CHECKING, DELETED}),
    RECEIVED: frozenset({CHECKING, WAITING, FAILED, DELETED}),
    CHECKING: frozenset({STAGING, WAITING, RESCHEDULED, FAILED, DELETED}),
    STAGING: frozenset({WAITING, FAILED, KILLED}),
    WAITING: frozenset({MATCHED, RESCHEDULED, DELETED}),
    MATCHED: frozenset({RUNNING, FAILED, RESCHEDULED, KILLED}),
    RESCHEDULED: frozenset({WAITING, RECEIVED, DELETED, FAILED}),
    RUNNING: frozenset({STALLED, DONE, FAILED, RESCHEDULED, COMPLETING, KILLED, RECEIVED}),
    STALLED: frozenset({RUNNING, FAILED, KILLED}),
    COMPLETING: frozenset({DONE, FAILED, COMPLETED, STALLED, KILLED}),
    COMPLETED: frozenset({DONE, FAILED}),
    DONE: frozenset({DELETED}),
    FAILED: frozenset({RESCHEDULED, DELETED}),
    KILLED: frozenset({DELETED}),
    DELETED: frozenset(),
}


def is_allowed(current: str, new: str) -> bool:
    """Whether DIRAC's state machine lets a job move from ``current`` to ``new``."""
    if current == new:
        return current in JOB_TRANSITIONS
    return new in JOB_TRANSITIONS.get(current, frozenset())


# Pilot states (DIRAC PilotStatus).
PILOT_SUBMITTED = "Submitted"
PILOT_WAITING = "Waiting"
PILOT_SCHEDULED = "Scheduled"
PILOT_RUNNING = "Running"
PILOT_DONE = "Done"
PILOT_FAILED = "Failed"
PILOT_DELETED = "Deleted"
PILOT_ABORTED = "Aborted"
PILOT_UNKNOWN = "Unknown"

PILOT_STATES = (
    PILOT_SUBMITTED,
    PILOT_WAITING,
    PILOT_SCHEDULED,
    PILOT_RUNNING,
    PILOT_DONE,
    PILOT_FAILED,
    PILOT_DELETED,
    PILOT_ABORTED,
    PILOT_UNKNOWN,
)
PILOT_WAITING_STATES = frozenset({PILOT_SUBMITTED, PILOT_WAITING, PILOT_SCHEDULED})
PILOT_TRANSIENT_STATES = PILOT_WAITING_STATES | {PILOT_RUNNING}
PILOT_FINAL_STATES = frozenset({PILOT_DONE, PILOT_FAILED, PILOT_DELETED, PILOT_ABORTED})


# Minor statuses that more than one component acts on, spelled as DIRAC spells them. The runner reschedules a job that
# failed with a transfer failure (Galaxy was unreachable for a while); the pilot and the job payload report them.
APP_ERRORS = "Application Finished With Errors"
INPUT_STAGING_FAILED = "Input staging failed"
OUTPUT_STAGING_FAILED = "Output staging failed"
TRANSFER_FAILURES = (INPUT_STAGING_FAILED, OUTPUT_STAGING_FAILED)
OUTPUT_SANDBOX_TOO_LARGE = "Output sandbox too large"
JOB_SCRIPT_INCOMPLETE = "Galaxy job script did not finish"
PAYLOAD_ERROR = "Galaxy job payload error"

#: Exit codes with which the Galaxy job payload (``galaxy_dirac.payload``) reports a failure of its own, never a tool's
#: (a tool's exit code is Galaxy's to judge and travels in the job's results). A DIRAC JobWrapper records the exit code
#: as the job's ApplicationStatus; our pilot turns it into the minor status.
PAYLOAD_EXIT_CODES = {
    81: INPUT_STAGING_FAILED,
    82: OUTPUT_STAGING_FAILED,
    83: OUTPUT_SANDBOX_TOO_LARGE,
    84: JOB_SCRIPT_INCOMPLETE,
    85: PAYLOAD_ERROR,
}
PAYLOAD_EXIT = {minor: code for code, minor in PAYLOAD_EXIT_CODES.items()}
