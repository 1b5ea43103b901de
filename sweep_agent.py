"""The local sweep agent: runs a local sweep's trials one after another, as `wandb agent` runs
the trials of a W&B sweep.

Each trial is a subprocess with the command line `wandb agent` builds (`/usr/bin/env python
train.py --name=value ...`, or the sweep's `command:`), the variables it sets (WANDB_RUN_ID,
WANDB_SWEEP_PARAM_PATH) and W&B in offline mode. Any number of agents may work on one sweep at
once, for example one per GPU; local_sweep.py's database gives each run to exactly one of them.

    python simple_sweep.py --agent SWEEP_ID --count 4
    CUDA_VISIBLE_DEVICES=1 python simple_sweep.py --agent SWEEP_ID

A trial's output goes to saved_models/sweeps/logs/SWEEP_ID/RUN_ID.log. Ctrl-C stops the agent
and sends the running trial SIGTERM, so train.py saves a resumable state. The next agent on the
sweep continues that run first. A second Ctrl-C kills the trial.

When the trial command is the default one and its program is this repository's train.py, a
fork server imports torch, transformers, timm and wandb once, and each trial is a process forked
from it (ForkedTrial) instead of a new interpreter: a new process all the same, with its own
environment, session and output file, without 3 to 4 s of imports per trial. Set
LOCAL_SWEEP_FORK=0 to start every trial as a new interpreter.
"""

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from local_sweep import (FAILED_STATES, SweepStore, process_token, read_results, run_metric, runs_to_stop,
                         wandb_history)

log = logging.getLogger("sweep_agent")
REPO = Path(__file__).resolve().parent

MAX_FAILURES = 3    # consecutive failed runs that stop an agent; wandb 0.31's agent stops after 3 in its first 60 s
POLL_S = 10         # seconds between hyperband checks of a running trial; each check reads its W&B files
TAIL_LINES = 20     # lines of a failed trial's output kept as its error tail
PREEMPTED_CODES = (143, -signal.SIGTERM)  # train.py's exit after SIGTERM, or death by an unhandled SIGTERM


def trial_command(config, params, json_path):
    """Return the argv `wandb agent` runs for these parameters, from the sweep's command template.

    W&B's own functions expand the macros, so `--name=value` uses Python's str() of each value
    (True, False, None, [4, 8]) exactly as the agent does. One thing differs: ${interpreter} is
    the Python running this agent, not the first `python` on PATH. Trials therefore get the
    agent's packages even when no virtual environment is activated.
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    template = sweep_utils.create_sweep_command(list(config.get("command") or sweep_utils.DEFAULT_SWEEP_COMMAND))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(interpreter=[sys.executable], program=[config["program"]], args_json_file=[str(json_path)])
    if os.name != "nt":
        macros["env"] = ["/usr/bin/env"]
    if "${args_json_file}" in template:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(macros["args_json"][0])
    argv = []
    for token in map(str, template):
        if token.startswith("${") and token.endswith("}"):
            argv += [str(part) for part in macros.get(token[2:-1]) or []]
        else:
            argv.append(token)
    return argv


def trial_env(run_id, param_path, wandb_dir, sweep_id):
    """The trial's environment: the agent's, W&B offline, and the run's id and parameter file.

    WANDB_SWEEP_ID is left unset because it would tie the offline run to a sweep that W&B's server
    never saw, and `wandb sync` reported "sweep not found" for such runs (wandb 0.17).
    The run group names the local sweep instead.
    """
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SWEEP_ID"}
    env.update(WANDB_MODE="offline", WANDB_RUN_ID=run_id, WANDB_SWEEP_PARAM_PATH=str(param_path),
               WANDB_DIR=str(wandb_dir))
    env.setdefault("WANDB_RUN_GROUP", f"sweep-{sweep_id}")
    env.setdefault("WANDB_SILENT", "true")  # the trial's log keeps the error, not W&B's run summary
    return env


def forkable_args(argv):
    """Return train.py's arguments when `argv` is `/usr/bin/env PYTHON REPO/train.py ...`, else None."""
    if os.name != "posix" or os.environ.get("LOCAL_SWEEP_FORK", "1") == "0" or len(argv) < 3:
        return None
    if argv[0] != "/usr/bin/env" or argv[1] != sys.executable:
        return None
    return argv[3:] if Path(argv[2]).resolve() == REPO / "train.py" else None


# Modules every train.py trial imports: the fork server imports them once, and trials start with them.
PRELOAD = ["train", "timm", "wandb", "transformers.models.gpt2.modeling_gpt2", "sweep_agent"]
_forkserver = None


def trial_context():
    """Return the multiprocessing context whose fork server imports PRELOAD (about 3.5 s, once)."""
    global _forkserver
    if _forkserver is None:
        import multiprocessing
        _forkserver = multiprocessing.get_context("forkserver")
        _forkserver.set_forkserver_preload(PRELOAD)
    return _forkserver


def run_forked_trial(args, env, log_path):
    """Run train.main(args) in a trial process forked by the fork server; exit with its status."""
    os.setsid()  # Ctrl-C in the terminal reaches the agent only, as with start_new_session
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    out = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.environ.clear()
    os.environ.update(env)
    logging.root.handlers.clear()  # train.main() configures its own
    import train
    train.PROCESS_START = time.time()
    sys.argv = [str(REPO / "train.py"), *args]
    code = train.main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as train.py's own exit, without the final garbage collection


class ForkedTrial:
    """A trial process from the fork server, with the part of subprocess.Popen's interface the agent uses.

    The fork server is a fresh interpreter that has only imported modules. The agent process
    itself is not forked, because a fork of a process that has run torch's OpenMP threads
    hangs at the child's first parallel operation.
    """

    def __init__(self, args, env, log_path):
        self.process = trial_context().Process(target=run_forked_trial, args=(args, env, str(log_path)))
        self.process.start()
        self.pid = self.process.pid

    def poll(self):
        return self.process.exitcode

    def wait(self, timeout=None):
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"trial {self.pid}", timeout)
        return self.process.exitcode

    def send_signal(self, signum):
        if self.process.exitcode is None:
            os.kill(self.pid, signum)


def error_tail(log_path, exit_code):
    """Return the last lines of a trial's output, without W&B's own lines, and the signal that killed it."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, os.path.getsize(log_path) - 65536))
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        text = f"output unreadable: {e}"
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("wandb:")]
    tail = lines[-TAIL_LINES:]
    if exit_code is not None and exit_code < 0:
        tail.append(f"killed by signal {signal.Signals(-exit_code).name}")
    return "\n".join(tail)


class Agent:
    """Runs trials of one local sweep until its count is reached, the sweep is done or Ctrl-C."""

    def __init__(self, sweep_id, store=None, poll_s=POLL_S):
        self.store = store or SweepStore()
        self.sweep_id = sweep_id
        self.config = self.store.sweep_config(sweep_id)
        self.metric = (self.config.get("metric") or {}).get("name", "")
        self.goal = (self.config.get("metric") or {}).get("goal", "minimize")
        self.token = process_token(os.getpid())
        self.wandb_dir = Path(os.environ.get("WANDB_DIR") or os.getcwd())
        self.poll_s = poll_s
        self.proc = None
        self.interrupts = 0
        self.stop_requested = False

    def handle_signal(self, signum, frame):
        # only flags and os.kill here: logging from a signal handler can deadlock on its lock
        self.interrupts += 1
        if self.proc is not None and self.proc.poll() is None:
            if self.interrupts == 1:
                self.proc.send_signal(signal.SIGTERM)
                return
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the trial ended in the meantime

    def run(self, count=None, max_failures=MAX_FAILURES):
        """Run up to `count` trials (None: until the sweep is done); return the exit status."""
        handlers = {s: signal.signal(s, self.handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run(count, max_failures)
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)

    def _run(self, count, max_failures):
        done, failures, failed_runs = 0, [], []
        while (count is None or done < count) and not self.interrupts:
            run = self.store.claim_run(self.sweep_id, self.token)
            if run is None:
                log.info("sweep %s has no runs left to propose (grid exhausted or run_cap reached)", self.sweep_id)
                break
            if self.interrupts:  # Ctrl-C while the engine was proposing: leave the run to the next agent
                self.store.update_run(run.run_id, state="preempted")
                break
            state = self.run_trial(run)
            done += 1
            failures = failures + [run.run_id] if state in FAILED_STATES else []
            if state in FAILED_STATES:
                failed_runs.append(run.run_id)
            if len(failures) >= max_failures:
                self.log_failures(f"stopping the agent: {len(failures)} runs in a row failed", failures)
                return 1
        if self.interrupts:
            log.warning("agent stopped; continue the sweep with: python simple_sweep.py --agent %s", self.sweep_id)
            return 130
        # Another agent's finished run still gives the sweep a result, so only a sweep without one fails.
        if done and len(failed_runs) == done and not any(r.state == "finished" for r in self.store.runs(self.sweep_id)):
            self.log_failures(f"every run of this agent failed ({done} of {done}) and no run of the sweep finished",
                              failed_runs)
            return 1
        return 0

    def log_failures(self, headline, failures):
        """Log the headline with the first failed run's exit status and output tail."""
        first = self.store.run(failures[0])
        log.error("%s. The first, run %s (exit status %s), ended with:\n%s", headline, first.run_id,
                  first.exit_code, first.error_tail)

    def run_trial(self, run):
        """Run one trial to its end and record the outcome; return the run's new state."""
        params_dir = self.wandb_dir / "wandb" / f"sweep-{self.sweep_id}"
        param_path = params_dir / f"config-{run.run_id}.yaml"
        from wandb.sdk.lib import config_util
        config_util.save_config_file_from_dict(str(param_path), {k: {"value": v} for k, v in run.params.items()})
        argv = trial_command(self.config, run.params, params_dir / f"config-{run.run_id}.json")
        log_path = Path(run.log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("run %s started: %s (output: %s)", run.run_id, shlex.join(argv), log_path)
        self.stop_requested = False
        env = trial_env(run.run_id, param_path, self.wandb_dir, self.sweep_id)
        args = None if "command" in self.config else forkable_args(argv)
        try:
            if args is not None:
                self.proc = ForkedTrial(args, env, log_path)
            else:
                with open(log_path, "a") as out:
                    # a session of its own: Ctrl-C in the terminal reaches the agent, which stops the trial cleanly
                    self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                 stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as e:
            self.store.update_run(run.run_id, state="failed", error_tail=f"cannot start {argv[0]}: {e}",
                                  ended=time.time())
            log.error("run %s failed to start: %s", run.run_id, e)
            return "failed"
        self.store.update_run(run.run_id, trial=process_token(self.proc.pid))
        exit_code = self.wait_for_trial(run)
        self.proc = None
        return self.record_outcome(run, exit_code)

    def wait_for_trial(self, run):
        """Wait for the trial's exit; meanwhile report Ctrl-C and apply hyperband."""
        next_check = time.monotonic() + self.poll_s
        reported = 0
        while True:
            try:
                return self.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            if self.interrupts > reported:
                reported = self.interrupts
                if reported == 1:
                    log.warning("Ctrl-C: run %s was sent SIGTERM to save a resumable state and stop; "
                                "press Ctrl-C again to kill it", run.run_id)
                else:
                    log.warning("Ctrl-C again: run %s killed", run.run_id)
            if "early_terminate" in self.config and not self.stop_requested and time.monotonic() >= next_check:
                next_check = time.monotonic() + self.poll_s
                if self.hyperband_stops(run):
                    log.info("hyperband stops run %s: its %s trails the other runs'", run.run_id, self.metric)
                    self.stop_requested = True
                    self.proc.send_signal(signal.SIGTERM)

    def hyperband_stops(self, run):
        """Publish the run's metric history so far and ask the engine whether to stop it."""
        history = wandb_history(run.run_id, self.metric, self.wandb_dir)
        if history is None:
            # NOTE: where `wandb leet inspect` is missing (older wandb), only the checkpoint summary has a
            # history, and train.py rewrites it only when validation improves, so stops come later.
            history = read_results(run.run_id, run.params, self.metric)[2]
        with self.store.transaction():
            self.store.update_run(run.run_id, history=history)
            runs = self.store.runs(self.sweep_id)
        return run.run_id in runs_to_stop(self.config, runs)

    def classify(self, exit_code, status):
        """Map a trial's exit to a run state, as W&B does: non-zero exit failed, killed by a signal crashed."""
        if status == "completed" or (exit_code == 0 and not self.stop_requested):
            return "finished"
        if self.stop_requested:
            return "stopped"
        if exit_code in PREEMPTED_CODES:
            return "preempted"
        return "crashed" if exit_code < 0 else "failed"

    def record_outcome(self, run, exit_code):
        status, summary, history, checkpoint = read_results(run.run_id, run.params, self.metric)
        state = self.classify(exit_code, status)
        if not history and self.metric:
            # no checkpoint (a program other than train.py, or no validation yet): W&B's files, else the last poll
            history = wandb_history(run.run_id, self.metric, self.wandb_dir) or self.store.run(run.run_id).history
        tail = error_tail(run.log_path, exit_code) if state in FAILED_STATES else ""
        self.store.update_run(run.run_id, state=state, exit_code=exit_code, error_tail=tail, summary=summary,
                              history=history, checkpoint=checkpoint, ended=time.time())
        if state == "stopped":
            # hyperband ended the run for good, so the resumable state train.py saved on SIGTERM is not needed
            resume_dir = run.params.get("resume_dir") or "saved_models/resume"
            Path(resume_dir, f"{run.run_id}.pt").unlink(missing_ok=True)
        value = run_metric(self.store.run(run.run_id), self.metric, self.goal) if self.metric else None
        result = f"{self.metric}={value:.4f}" if value is not None else "no result"
        if state in FAILED_STATES:
            log.error("run %s %s (exit status %s); output: %s", run.run_id, state, exit_code, run.log_path)
        else:
            log.info("run %s %s: %s, checkpoint %s", run.run_id, state, result, checkpoint or "none")
        return state


def run_agent(sweep_id, count=None, max_failures=MAX_FAILURES, poll_s=POLL_S, state_dir=None):
    """Run a local agent on a sweep; return the exit status (0 done, 1 failing runs or every run failed, 130 Ctrl-C)."""
    store = SweepStore(state_dir) if state_dir else SweepStore()
    try:
        return Agent(sweep_id, store, poll_s).run(count, max_failures)
    finally:
        store.close()
