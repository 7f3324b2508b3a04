"""The scheduler: `Daemon.tick(now)` is one pass; `run()` only sleeps between passes.

One pass: read new jobs-file lines -> record ended jobs -> probe GPUs -> allocate -> launch.
File events (jobs file, exit records, CLI wake-ups) cut the sleep short, so nothing waits for
the fallback polling periods.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from app import intake, tailer, trust
from app.allocator import allocate
from app.dbguard import PassFaults
from app.gpus import GpuProbe, ProbeError
from app.gpus.host import host_snapshot
from app.launch import build_launch
from app.limits import RunLimits, with_oom_vram
from app.models import (
    GpuSnapshot,
    Job,
    JobState,
    Placement,
    Requirement,
    RequirementError,
    RunningJob,
)
from app.paths import StatePaths
from app.pending import PendingQueue
from app.reaper import Reaper
from app.requirements import LlmConfig, RequirementMemo
from app.runners import LaunchError, Runner
from app.runners.common import runner_chores, scheduler_pass
from app.settings import Settings
from app.spool import Spool
from app.store import Store

log = logging.getLogger("gpusched")


@dataclass
class TickReport:
    queued: list[int] = field(default_factory=list)
    started: list[Placement] = field(default_factory=list)
    ended: list[tuple[int, JobState]] = field(default_factory=list)
    gpus: list[GpuSnapshot] | None = None


class Daemon:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        paths: StatePaths,
        probe: GpuProbe,
        runner: Runner,
        runner_id: str,
        base_env: Mapping[str, str] | None = None,
        runner_for: Callable[[str], Runner] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.paths = paths
        self.probe = probe
        self.runner = runner
        self.runner_id = runner_id  # stored per job, so `kill` finds the right tmux server
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.jobs_file = settings.jobs_file.resolve()
        self.commands_file = settings.commands_file.resolve() if settings.commands_file else None
        self.spool = Spool(settings.spool_dir, store) if settings.spool_dir else None
        self.gate = trust.Gate(settings.strict_modes)  # inputs others can change are not read
        self.llm = trust.GuardedLlmConfig(settings.llm_config.resolve(), self.gate)
        self.reaper = Reaper(store, paths, runner, runner_for, runner_id, settings.kill_grace)
        self.limits = RunLimits(settings, store, paths, runner, runner_id, runner_for)
        self.reaper.on_failure = self.limits.after_failure  # retries, OOM requeues
        self.wake = threading.Event()
        self._jobs_dirty = True
        self._last_ingest = float("-inf")
        self._last_session_check = float("-inf")
        self._config_generation: tuple[int, int] | None = None
        self._gpu_count: int | None = None
        self._last_gpus_json = ""
        self._last_probe_error = ""
        self._last_config_error: str | None = None  # None: not reported yet in this run
        self._requirements = RequirementMemo()
        self._pending = PendingQueue(store, with_oom_vram(self._requirement))
        self._policy = settings.policy()
        #: files whose change means new jobs (spool: any event inside its inbox)
        self._input_paths = {str(self.jobs_file), str(self.commands_file)}

    # ---- one pass ----------------------------------------------------------------------------

    def tick(self, now: float) -> TickReport:
        report = TickReport()
        gpus = self._probe(now)
        report.gpus = gpus
        if self._jobs_dirty or now - self._last_ingest >= self.settings.monitor_interval:
            self._jobs_dirty = False
            self._last_ingest = now
            report.queued = self.ingest(now)
        check_sessions = now - self._last_session_check >= self.settings.state_interval
        if check_sessions:
            self._last_session_check = now
        with scheduler_pass(self.runner):  # what can wait for the launches waits (do_chores)
            report.ended = self.reaper.reap(now, check_sessions=check_sessions)
            report.ended += self.limits.enforce(now)  # time limits: killed, GPUs free now
            if self.spool is not None:
                self.spool.sync()  # scripts follow their jobs' states, whoever changed them
            config = self.llm.get()  # once per pass: it stats the file
            self._requeue_unschedulable_on_change(gpus)
            report.started = self._schedule(now, gpus, config)
        return report

    def _probe(self, now: float) -> list[GpuSnapshot] | None:
        try:
            gpus, error = self.probe.snapshot(), ""
        except ProbeError as exc:
            gpus, error = [], str(exc)
        if error:
            if error != self._last_probe_error:  # log a failure once, not every tick
                self._last_probe_error = error
                log.error("GPU probe failed, no new placements: %s", error)
                self.store.log_event("error", f"GPU probe failed: {error}")
                self.store.set_meta({"probe_error": error})
            return None
        if self._last_probe_error:
            self._last_probe_error = ""
            self.store.set_meta({"probe_error": ""})
            log.info("GPU probe recovered")
        # Ids stay physical under --gpu-ids: a jobs-file line may name up to the highest one.
        self._gpu_count = max(g.index for g in gpus) + 1 if gpus else 0
        snapshot = json.dumps([g.__dict__ for g in gpus])
        if snapshot != self._last_gpus_json:
            self._last_gpus_json = snapshot
            self.store.set_meta({"gpus": snapshot, "gpus_at": str(now)})
        return gpus

    # ---- jobs file -> pending jobs ------------------------------------------------------------

    def ingest(self, now: float) -> list[int]:
        """Queue what is new in every input: jobs file, commands file, spool folder."""
        gpu_count = lambda: self._gpu_count  # noqa: E731  # read per line: it may change
        queued = intake.read_jobs(self.store, self.jobs_file, gpu_count, now, self.gate)
        if self.commands_file is not None:
            queued += intake.read_commands(self.store, self.commands_file, now, self.gate)
        if self.spool is not None:
            queued += self.spool.intake(now)
        return queued

    # ---- pending jobs -> placements -> sessions ----------------------------------------------

    def _requeue_unschedulable_on_change(self, gpus: list[GpuSnapshot] | None) -> None:
        """A new llm_config or a different GPU set may make unschedulable jobs placeable."""
        error = self.llm.error or ""
        if error != self._last_config_error:  # reported once per new error, and when fixed
            if error:
                log.error("%s (keeping the last good configuration)", error)
                self.store.log_event("error", f"{error} (keeping the last good configuration)")
            elif self._last_config_error:  # fixed
                self.store.log_event("info", f"{self.llm.path} read again: in use")
            self.store.set_meta({"config_error": error})
        self._last_config_error = error
        if gpus is None:
            return
        generation = (self.llm.generation, len(gpus))
        previous, self._config_generation = self._config_generation, generation
        if previous is None or previous == generation:
            return
        for job in self.store.jobs([JobState.UNSCHEDULABLE]):
            self.store.transition(
                job.id,
                JobState.PENDING,
                when=[JobState.UNSCHEDULABLE],
                detail="re-evaluated after a configuration or GPU change",
                reason="",
                ended_at=None,
            )

    def _schedule(
        self, now: float, gpus: list[GpuSnapshot] | None, config: LlmConfig
    ) -> list[Placement]:
        pending = self._pending.build(config, now)
        for job, reason in pending.invalid:
            self.store.transition(
                job.id,
                JobState.UNSCHEDULABLE,
                when=[JobState.PENDING],
                detail=reason,
                reason=reason,
                ended_at=now,
            )
        queue, jobs_by_id, changes = pending.queue, pending.jobs_by_id, pending.changes
        if not queue:
            self.store.update_pending(changes)
            return []
        needs_ram = pending.prepared.needs_ram  # else the host's RAM is not read
        result = allocate(
            pending.prepared,
            gpus,
            self._running_ledger(config),
            frozenset(self.store.paused()),
            self._policy,
            now,
            probe_error=self._last_probe_error,
            host=host_snapshot(self.settings.fake_gpus) if needs_ram else None,
        )
        for job_id, reason in result.reasons.items():
            if jobs_by_id[job_id].reason != reason:
                changes.setdefault(job_id, {})["reason"] = reason
        self.store.update_pending(changes)
        for job_id, reason in result.unschedulable.items():
            self.store.transition(
                job_id,
                JobState.UNSCHEDULABLE,
                when=[JobState.PENDING],
                detail=reason,
                reason=reason,
                ended_at=now,
            )
            log.warning("job %d unschedulable: %s", job_id, reason)
        started = []
        for placement in result.placements:
            if self._launch(jobs_by_id[placement.job_id], placement, pending.requirement_of, now):
                started.append(placement)
        return started

    def _running_ledger(self, config: LlmConfig) -> list[RunningJob]:
        return [
            RunningJob(
                id=job.id,
                gpus=job.gpus,
                share=job.share if job.share is not None else 1.0,
                vram_mb=job.vram_mb,
                started_at=job.started_at or 0.0,
                ram_mb=declared.ram_mb,
                ramp_up_s=declared.ramp_up_s,
            )
            for job in self.store.jobs([JobState.RUNNING])
            for declared in [self._declared(job, config)]
        ]

    def _declared(self, job: Job, config: LlmConfig) -> Requirement:
        """What a running job declared (RAM, ramp-up), for the ledger."""
        try:
            return self._requirement(config, job)
        except RequirementError:
            return Requirement(1.0)

    def _requirement(self, config: LlmConfig, job: Job) -> Requirement:
        if job.kind == "command":  # its `--llm` counts; its words are the user's shell code
            return self._requirements.get(config, job.script, job.declared, directives=False)
        return self._requirements.get(config, job.args, job.declared)

    def _launch(
        self, job: Job, placement: Placement, requirement_of: dict[int, Requirement], now: float
    ) -> bool:
        script, rewrite = job.script, self.settings.cuda_rewrite
        if self.spool is not None and job.source.startswith("spool:"):
            # Dropped scripts come from tools that select GPUs by CUDA_VISIBLE_DEVICES.
            script, rewrite = str(self.spool.place(job, JobState.RUNNING)), False
        cwd = None
        if job.kind == "command" and self.commands_file is not None:
            cwd = str(self.commands_file.parent)  # commands run where their file is
        req = build_launch(
            job_id=job.id,
            script=script,
            conda_env=job.conda_env,
            args=job.args,
            gpus=placement.gpus,
            paths=self.paths,
            base_env=self.base_env,
            now=now,
            rewrite=rewrite,
            cwd=cwd,
            kind=job.kind,
            log_dir=self.settings.log_dir.resolve() if self.settings.log_dir else None,
        )
        req.exit_file.unlink(missing_ok=True)  # a retried job reuses its id: drop the old record
        gpus_text = ",".join(map(str, placement.gpus))
        # Marked running (launched = 0) BEFORE the session exists: after a crash here the
        # reaper finds no session and no exit record and puts the job back in the queue.
        if not self.store.transition(
            job.id,
            JobState.RUNNING,
            when=[JobState.PENDING],
            now=now,
            detail=f"on GPU {gpus_text} in session {req.session}",
            gpus=gpus_text,
            share=placement.share,
            session=req.session,
            runner=self.runner_id,
            log_path=str(req.log_path),
            command=req.display_command,
            started_at=now,
            launched=0,
            reason="",
            requirement=requirement_of[job.id].amount,
        ):
            return False
        try:
            launched = self.runner.launch(req)
        except LaunchError as exc:
            self._launch_failed(job, str(exc), now)
            return False
        self.store.set_fields(job.id, launched=1, pid=launched.pid)
        current = self.store.job(job.id)
        if current is not None and current.status != JobState.RUNNING:
            # Killed (by the CLI or the dashboard) while the session was being created: the
            # killer found no session yet, so this one is ours to stop.
            log.info("job %d was %s during its launch; stopping it", job.id, current.status)
            self.runner.kill(launched.session)
            return False
        log.info(
            "job %d started on GPU %s: %s (%s)", job.id, gpus_text, req.session, req.display_command
        )
        return True

    def _launch_failed(self, job: Job, error: str, now: float) -> None:
        attempts = job.attempts + 1
        limit = self.settings.max_assign_attempts
        if attempts >= limit:
            detail = f"launch failed {attempts} times, giving up: {error}"
            self.store.transition(
                job.id,
                JobState.FAILED,
                when=[JobState.RUNNING],
                detail=detail,
                reason=detail,
                ended_at=now,
                attempts=attempts,
                launched=0,
            )
            log.error("job %d: %s", job.id, detail)
            return
        wait = self.settings.assign_retry_wait * 2 ** (attempts - 1)
        detail = f"launch failed (attempt {attempts}/{limit}): {error}; retrying in {wait:g}s"
        self.store.unplace(
            job.id, detail, now, reason=detail, attempts=attempts, next_attempt_at=now + wait
        )
        log.warning("job %d: %s", job.id, detail)

    # ---- the loop ------------------------------------------------------------------------------

    def on_path_event(self, path: str) -> None:
        """Called from the watcher thread: flag what changed and cut the sleep short."""
        if path in self._input_paths or (
            self.spool is not None and path.startswith(str(self.spool.inbox) + os.sep)
        ):
            self._jobs_dirty = True
        elif not (
            path.startswith(str(self.paths.exits))
            or path == str(self.paths.wakeup)
            or path == str(self.llm.path)
        ):
            return
        self.wake.set()

    def watched_dirs(self) -> list[Path]:
        """Where input files change (every write counts: a writer may keep the file open)."""
        dirs = [self.jobs_file.parent, self.llm.path.parent]
        if self.commands_file is not None:
            dirs.append(self.commands_file.parent)
        if self.spool is not None:
            dirs.append(self.spool.inbox)
        return list(dict.fromkeys(dirs))

    def quiet_dirs(self) -> list[Path]:
        """Where only finished writes count: the state folder (`wakeup`, and the scheduler's
        own SQLite and log writes, which need no event) and the exit records."""
        return [self.paths.root, self.paths.exits]

    def run(self, stop: threading.Event) -> None:
        self.reaper.reconcile(time.time())
        if self.spool is not None:
            self.spool.recover(time.time())
        faults = PassFaults(self.store.path)  # storage faults: logged once, retried
        with tailer.PathWatcher(self.watched_dirs(), self.on_path_event, self.quiet_dirs()):
            while not stop.is_set():
                self.wake.clear()
                try:
                    self.tick(time.time())
                    runner_chores(self.runner, self.wake)
                    faults.ok(self.store)
                except Exception as exc:  # one bad pass must not stop the scheduler
                    self._jobs_dirty = True  # read the inputs again at the next pass
                    faults.failed(exc)  # raises only for a corrupt database
                self.wake.wait(self.limits.wait_for(self.settings.tick_interval))
        runner_chores(self.runner, None)
        self.limits.close()  # jobs being stopped after their time limit: let them finish dying
