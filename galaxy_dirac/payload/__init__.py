"""The Galaxy job's own payload: what runs on the worker node, under our pilot or under any DIRAC JobWrapper.

A real DIRAC site runs its own pilots and JobWrapper: they unpack the input sandbox, run the JDL's ``Executable`` and
pack the ``OutputSandbox`` patterns, and know nothing of Galaxy. So the job bundle carries everything else itself, in
the standard library only: ``galaxy_dirac_launch.sh`` (the Executable) finds a Python and runs
``galaxy_dirac_payload.pyz`` (this package as one zipapp), which reads ``galaxy_dirac_payload.json`` and

1. puts the node's job directory into the files the bundle rewrote (:data:`PLACEHOLDER`);
2. transport ``galaxy``: pulls the inputs from Galaxy's job files API (retries, resume);
3. sets ``GALAXY_SLOTS`` / ``GALAXY_MEMORY_MB`` from what the slot gives the job;
4. runs the Galaxy job script and packs every file it created or changed under ``work/`` (:data:`WORK_TAR`);
5. transport ``galaxy``: pushes outputs, that archive and one of the outputs' extra files (:data:`EXTRA_TAR`) to
   Galaxy; ``sandbox``: writes one archive with relative members (:data:`RESULTS`: outputs, their extra files and
   the work archive) that the OutputSandbox lists, so whatever tars the sandbox, the runner finds it.

It exits 0 when the job script ran to its end and its results are delivered; a tool's failure is Galaxy's to judge.
A failure of its own exits with one of :data:`galaxy_dirac.states.PAYLOAD_EXIT_CODES` and says why on stderr, which
DIRAC keeps, so a DIRAC job never ends Done without its outputs in Galaxy.
"""

PLACEHOLDER = "@@GALAXY_DIRAC_JOB_DIR@@"
LAUNCHER = "galaxy_dirac_launch.sh"
ZIPAPP = "galaxy_dirac_payload.pyz"
CONFIG = "galaxy_dirac_payload.json"
WORK_TAR = "galaxy_dirac_work.tar"
#: Transport ``galaxy``: the files the job wrote into its outputs' extra files directories (composite, html).
EXTRA_TAR = "galaxy_dirac_extra.tar"
RESULTS = "galaxy_dirac_results.tar"
STDOUT = "galaxy_dirac.out"
#: Transport ``galaxy``: each run of the job pushes under ``<Galaxy working dir>/ATTEMPTS_DIR/<attempt id>/`` (the
#: bundle writes :data:`ATTEMPT` where the id goes) and names its id on stdout after :data:`ATTEMPT_LINE`. Stdout
#: reaches Galaxy in the output sandbox, which only the job's current run can deliver, so the runner installs that
#: run's results and never those of an earlier run a lost node is still finishing.
ATTEMPT = "@@GALAXY_DIRAC_ATTEMPT@@"
ATTEMPTS_DIR = "__galaxy_dirac_attempts"
ATTEMPT_LINE = "galaxy-dirac attempt: "
STDERR = "galaxy_dirac.err"
