"""`python -m local up|down|status|top`: run the serving stack on this machine.

`up` stays in the foreground: it starts the replicas and nginx, prints the endpoint, the API
key and ready-to-paste examples, and stops everything on Ctrl-C, SIGTERM (`down`) or SIGHUP
(a second one kills what is left at once). Errors meant for the user (nginx missing, a port
in use, a replica that fails) are printed without a traceback and exit with 2.

`up --stack Pulumi.<name>.yaml` (or just `<name>`) serves every model of that stack under its
served name, the sim engine unless `--engine transformers`, behind one nginx that routes by the
request's `model` field, and runs the stack's balancing method and autoscaling section.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from components.policies.balancing import LbMethod, LoadBalancingConfig
from local import cleanup
from local.autoscaler import stack_config, stack_file, start_autoscaling
from local.cluster import (
    REPO_ROOT,
    LocalCluster,
    policy_label,
    recorded_alive,
    stop_recorded,
)
from local.models import LocalModel, models_from_stack
from local.procs import LocalModeError, log_tail, owns, read_state

DEFAULT_WORKDIR = REPO_ROOT / ".local-run"
"""Fixed (git-ignored) so that `down` and `status` find what `up` recorded."""
SIM_TIMEOUT = 120.0
MODEL_TIMEOUT = 1800.0
"""A real model is downloaded (once) and loaded by every replica: allow for a slow link."""
EXIT_USER_ERROR = 2
DEFAULT_REPLICAS = 3
"""Replicas without --replicas and without autoscaling (which starts at minReplicas)."""
PROMPT = "Say hello in five words."
EXAMPLE_MAX_TOKENS = 32
"""The examples' max_tokens: an answer in about a second (the sim engine writes max_tokens
words; without it, the server's default of 256 streams for about 10 s)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args))
    except LocalModeError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start replicas behind nginx and wait for Ctrl-C")
    up.add_argument("--replicas", type=int, default=None,
                    help=f"server processes per model (default {DEFAULT_REPLICAS}; with --stack "
                         "the stack's replicas; with autoscaling minReplicas)")
    up.add_argument("--engine", choices=("sim", "transformers"), default=None,
                    help="default: sim, or transformers when --model is given; with --stack, "
                         "transformers loads each model's id")
    up.add_argument("--model", default=None,
                    help="Hugging Face id or local directory, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    up.add_argument("--policy", choices=get_args(LbMethod), default=None,
                    help="nginx balancing method (default least_conn, or the stack's)")
    up.add_argument("--session-header", default=None,
                    help="header hashed by --policy session_hash (default X-Session-ID)")
    up.add_argument("--port", type=int, default=8080, help="nginx port (default 8080)")
    up.add_argument("--first-port", type=int, default=8000,
                    help="port of replica 1; the others follow (default 8000)")
    up.add_argument("--api-key", default=None, help="bearer key (default: a generated one)")
    up.add_argument("--workers", type=int, default=1, help="nginx worker_processes (default 1)")
    up.add_argument("--max-output-tokens", type=int, default=512,
                    help="sizes nginx's read timeout (default 512)")
    up.add_argument("--timeout", type=float, default=None,
                    help=f"readiness deadline in s (default {SIM_TIMEOUT:.0f} for sim, "
                         f"{MODEL_TIMEOUT:.0f} with a model)")
    up.add_argument("--nginx", default=None, help="nginx binary (default: PATH, /usr/sbin)")
    up.add_argument("--tls", action="store_true",
                    help="serve HTTPS only, with a self-signed certificate (needs openssl)")
    up.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help="logs, nginx prefix and state.json (default .local-run/)")
    up.add_argument("--autoscale", action="store_true",
                    help="run Prometheus and the stack's scaling rule (docs/autoscaling.md)")
    up.add_argument("--stack", default=None,
                    help="Pulumi.<stack>.yaml or a stack name: serve its models (routed by "
                         "the request's model field), with its balancing method and "
                         "autoscaling section (implies --autoscale when it enables it)")
    up.add_argument("--prometheus-port", type=int, default=9090,
                    help="port of the local Prometheus (default 9090)")
    up.add_argument("--time-factor", type=float, default=1.0,
                    help="run polling, windows and periods this many times faster (default 1)")
    up.add_argument("--profile", default=None,
                    help="sim latency profile: a name in server/profiles/ (cpu-sim, "
                         "h200-llama8b, ...) or a path to a profile file")
    up.add_argument("--time-dilation", type=float, default=None,
                    help="multiply every modelled duration by this (default with --profile: "
                         "the smallest that keeps the SSE event rate within this machine's "
                         "headroom, local/headroom.yaml; else 1)")
    up.set_defaults(run=_up)

    down = sub.add_parser("down", help="stop the cluster that `up` started")
    down.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    down.set_defaults(run=_down)

    status = sub.add_parser("status", help="show what runs")
    status.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    status.set_defaults(run=_status)

    top = sub.add_parser("top", help="live view of a running `up` (q or Ctrl-C quits)")
    top.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    top.add_argument("--interval", type=float, default=1.0, help="refresh every s (default 1)")
    top.add_argument("--window", type=float, default=30.0,
                     help="rolling window of rates and percentiles, s (default 30)")
    top.add_argument("--frames", type=int, default=None, help="stop after this many frames")
    top.set_defaults(run=_top)
    return parser


# --- up ---------------------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    scaling_cfg = stack = None
    models: tuple[LocalModel, ...] | None = None
    if args.stack is not None:
        stack = stack_config(stack_file(args.stack))
        models = _stack_models(args, stack)
    if args.autoscale or stack is not None:
        cfg = stack if stack is not None else stack_config(None)
        if args.autoscale or cfg.autoscaling.enabled:
            scaling_cfg = cfg
    if scaling_cfg is not None and models is not None and len(models) > 1:
        if args.autoscale:
            raise LocalModeError(f"--autoscale scales one model; the stack serves {len(models)} "
                                 f"({', '.join(m.served_name for m in models)})")
        _say(f"note: the stack's autoscaling is not run: local autoscaling scales one model, "
             f"this stack serves {len(models)}")
        scaling_cfg = None
    if args.replicas is None and models is None:
        args.replicas = (scaling_cfg.autoscaling.min_replicas if scaling_cfg
                         else DEFAULT_REPLICAS)
    if args.time_factor <= 0:
        raise LocalModeError(f"--time-factor must be positive, got {args.time_factor}")
    sim_env, dilation_note = _sim_profile_env(args, models)
    cluster = _cluster(args, models, stack, sim_env)
    cluster.supervisor_markers = ["local", "up"]
    engine = cluster.engine
    timeout = args.timeout if args.timeout is not None else (
        SIM_TIMEOUT if engine == "sim" else MODEL_TIMEOUT)
    # SIGINT, SIGTERM (`down`, a service manager) and SIGHUP stop it in order; a second one
    # kills whatever is left at once (local/cleanup.py). The stops unwind last in, first out,
    # and runs every step even when one is interrupted: the autoscaler, then Prometheus, then
    # the cluster (registered first, so nothing can skip it), then the final sweep.
    stops = contextlib.ExitStack()
    stops.enter_context(cleanup.supervised())
    stops.callback(_stop_cluster, cluster)
    try:
        *starts, last = _layout(cluster)
        for line in starts:
            _say(line)
        _say(f"{last} and nginx on :{args.port} (logs in {args.workdir})")
        cluster.start(timeout=timeout)
        if scaling_cfg is not None:
            prometheus, scaler = start_autoscaling(
                cluster, scaling_cfg, port=args.prometheus_port, time_factor=args.time_factor,
                on_event=_say)
            stops.callback(prometheus.close)
            stops.callback(scaler.stop)
        _say(banner(cluster))
        if dilation_note:
            _say(dilation_note)
        if scaling_cfg is not None:
            _say(f"autoscaling: {scaler.policy.min_replicas}-{scaler.policy.max_replicas} "
                 f"replicas; Prometheus {prometheus.url}; queries: "
                 + "; ".join(f"{t.query} target {t.threshold:g}/replica"
                             for t in scaler.policy.triggers)
                 + f"; decisions in {cluster.workdir}/autoscaler.jsonl")
        return _supervise(cluster)
    except KeyboardInterrupt:
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):  # every step ran; the sweep did too
            stops.close()


def _stop_cluster(cluster: LocalCluster) -> None:
    if not cluster.running:
        return
    _say("stopping (replicas drain in-flight requests; Ctrl-C again to kill)")
    try:
        cluster.stop()
    except KeyboardInterrupt:  # only outside supervised(): a second signal kills, not raises
        _say("killed")
        raise
    _say("killed" if len(cleanup.received()) > 1 else "stopped")


def _sim_profile_env(args: argparse.Namespace, models: tuple[LocalModel, ...] | None = None
                     ) -> tuple[dict[str, str], str]:
    """The replicas' LLM_SIM_* environment for --profile / --time-dilation, and a note for the
    banner saying which profile runs and why at that dilation."""
    if args.profile is None and args.time_dilation is None:
        return {}, ""
    if (args.engine or ("transformers" if args.model else "sim")) != "sim":
        raise LocalModeError("--profile and --time-dilation apply to the sim engine only")
    if args.time_dilation is not None and not args.time_dilation > 0:
        raise LocalModeError(f"--time-dilation must be positive, got {args.time_dilation}")
    from local import dilation
    from server.engines.profile import ProfileError, load_profile

    env: dict[str, str] = {}
    note = ""
    try:
        profile = load_profile(args.profile) if args.profile is not None else None
    except ProfileError as exc:
        raise LocalModeError(f"--profile: {exc}") from None
    replicas = args.replicas if models is None else sum(m.replicas for m in models)
    factor = args.time_dilation
    if profile is not None:
        env["LLM_SIM_PROFILE"] = profile.ref
        env["LLM_MAX_CONCURRENCY"] = str(profile.scheduler.admission_slots)
        headroom = dilation.load_headroom()
        rate = dilation.full_batch_event_rate(profile, replicas)
        budget = dilation.TARGET_SHARE * headroom.for_this_machine()
        if factor is None:
            factor = dilation.pick_dilation(profile, replicas, headroom)
            why = "chosen" if factor > 1 else "none needed"
        else:
            why = "as given"
        note = (f"  profile   {profile.describe()}\n"
                f"  time      dilated {factor:g}x ({why}): {replicas} replicas at full batch "
                f"emit {rate:,.0f} SSE events/s undilated, {rate / factor:,.0f} dilated; this "
                f"machine's budget is {budget:,.0f}/s ({dilation.TARGET_SHARE:.0%} of "
                f"{headroom.for_this_machine():,.0f}, `{headroom.command}` on "
                f"{headroom.cores} cores, {headroom.date}). Divide measured times by {factor:g}.")
    elif factor is not None:
        note = f"  time      dilated {factor:g}x (as given). Divide measured times by {factor:g}."
    if factor is not None and factor != 1:
        env["LLM_SIM_TIME_DILATION"] = repr(float(factor))
    return env, note


def _stack_models(args: argparse.Namespace, cfg: Any) -> tuple[LocalModel, ...]:
    if args.model is not None:
        raise LocalModeError("--model and --stack do not go together: the stack names its "
                             "models (add --engine transformers to load each one's id)")
    try:
        return models_from_stack(cfg, engine=args.engine or "sim", replicas=args.replicas)
    except ValueError as exc:
        raise LocalModeError(f"{args.stack}: {exc}") from None


def _cluster(args: argparse.Namespace, models: tuple[LocalModel, ...] | None = None,
             stack: Any = None, sim_env: dict[str, str] | None = None) -> LocalCluster:
    """Build the cluster, turning argument problems into LocalModeError (exit 2).
    With `models` (from a stack), the stack's balancing policy unless --policy is given."""
    engine = args.engine or ("transformers" if args.model else "sim")
    serving: dict[str, Any] = (
        {"models": models} if models is not None
        else {"replicas": args.replicas, "engine": engine, "model": args.model})
    try:
        policy = stack.load_balancing if stack is not None else LoadBalancingConfig()
        overrides = {k: v for k, v in (("method", args.policy),
                                       ("session_header", args.session_header)) if v}
        if overrides:
            policy = LoadBalancingConfig.model_validate(
                policy.model_dump() | overrides)
        return LocalCluster(
            **serving, policy=policy, port=args.port,
            first_replica_port=args.first_port, api_key=args.api_key, workdir=args.workdir,
            # nginx's read timeout is max_output_tokens x per-token seconds: dilated time
            # stretches every token.
            max_output_tokens=math.ceil(args.max_output_tokens * max(1.0, float(
                (sim_env or {}).get("LLM_SIM_TIME_DILATION", 1)))), on_progress=_say,
            workers=args.workers, nginx=args.nginx, tls=args.tls, server_env=sim_env,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise LocalModeError(f"invalid balancing policy: {problems}") from None
    except ValueError as exc:
        raise LocalModeError(str(exc)) from None


def _supervise(cluster: LocalCluster) -> int:
    """Wait for Ctrl-C/SIGTERM; report replicas that die, give up if nginx dies."""
    reported: set[int] = set()
    while True:
        time.sleep(0.5)
        if cluster.nginx_pid is None:
            _say(f"error: nginx exited; see {cluster.workdir}/nginx/error.log")
            return 1
        for index, replica_pid in enumerate(cluster.replica_pids):
            if replica_pid is None and index not in reported:
                reported.add(index)
                log = cluster.replica_logs[index]
                _say(f"warning: replica {index + 1} exited; nginx routes around it. "
                     f"Last lines of {log}:\n{log_tail(log)}")


def _layout(cluster: LocalCluster) -> list[str]:
    """One line per model: its replicas' engine and ports."""
    lines, port = [], cluster.first_replica_port
    for model in cluster.models:
        name = f" of {model.served_name}" if len(cluster.models) > 1 else ""
        lines.append(f"starting {model.replicas} {model.engine} replica(s){name} on :{port}"
                     f"-{port + model.replicas - 1}")
        port += model.replicas
    return lines


def banner(cluster: LocalCluster) -> str:
    """Endpoint, key and examples; every snippet is meant to be pasted as printed."""
    body = json.dumps({"model": cluster.model_name, "stream": True,
                       "max_tokens": EXAMPLE_MAX_TOKENS,
                       "messages": [{"role": "user", "content": PROMPT}]})
    cacert = (f"--cacert {shlex.quote(str(cluster.tls_certificate))} "
              if cluster.tls_certificate else "")
    curl = (f"curl -N {cacert}{cluster.endpoint}/chat/completions \\\n"
            f"  -H {shlex.quote('Authorization: Bearer ' + cluster.api_key)} \\\n"
            "  -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}")
    http_client = (", http_client=httpx.Client(verify=ssl.create_default_context("
                   f"cafile={str(cluster.tls_certificate)!r}))" if cluster.tls_certificate else "")
    python = "\n".join([
        *(["import ssl", "import httpx"] if http_client else []),
        "from openai import OpenAI",
        f"client = OpenAI(base_url={cluster.endpoint!r}, api_key={cluster.api_key!r}"
        f"{http_client})",
        f"stream = client.chat.completions.create(model={cluster.model_name!r}, stream=True,",
        f"    max_tokens={EXAMPLE_MAX_TOKENS}, messages=[{{'role': 'user', 'content': {PROMPT!r}}}])",
        "for chunk in stream:",
        "    if chunk.choices:",
        "        print(chunk.choices[0].delta.content or '', end='', flush=True)",
        "print()",
    ])
    return "\n".join([
        "",
        (f"ready: {cluster.replicas} {cluster.engine} replica(s) behind nginx "
         f"({policy_label(cluster.policy)})"),
        f"  endpoint  {cluster.endpoint}",
        f"  api key   {cluster.api_key}",
        *([f"  model     {cluster.model_name}"] if len(cluster.model_names) == 1 else [
            f"  models    {', '.join(cluster.model_names)} (routed by the request's model; "
            f"first is the default)"]),
        f"  logs      {cluster.workdir}",
        "",
        "# stream a chat completion with curl:",
        curl,
        "",
        _python_intro(),
        f"{shlex.quote(_interpreter())} - <<'EOF'",
        python,
        "EOF",
        "",
        "Ctrl-C here (or `python -m local down`) stops everything.",
    ])


def _interpreter() -> str:
    """The Python running local mode (`.venv/bin/python` from the checkout), relative to the
    working directory when it lies below it, so the snippet pastes as printed."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return str(executable)


def _python_intro() -> str:
    if importlib.util.find_spec("openai") is not None:
        return f"# or with the openai package, installed in {_interpreter()}:"
    return f"# or with the openai package (first: {_interpreter()} -m pip install openai):"


# --- down, status -----------------------------------------------------------------------------


def _down(args: argparse.Namespace) -> int:
    workdir = args.workdir.resolve()
    if not stop_recorded(workdir, on_progress=_say):
        _say(f"no local cluster recorded in {workdir}; nothing to stop")
        return 0
    _say("stopped")
    return 0


def _status(args: argparse.Namespace) -> int:
    """Exit 0 when a recorded cluster runs, 1 otherwise (usable in scripts)."""
    workdir = args.workdir.resolve()
    state = read_state(workdir)
    if state is None or not recorded_alive(state):
        _say(f"no local cluster running from {workdir}")
        return 1
    models = state.get("models") or [state["model"]]
    _say(f"endpoint {state['endpoint']}  model{'s' if len(models) > 1 else ''} "
         f"{', '.join(models)}  policy {state['policy']}")
    prom = state.get("prometheus")
    if prom:
        running = "running" if owns(prom["pid"], prom["markers"]) else "stopped"
        _say(f"  prometheus {prom['url']}  pid {prom['pid']}  {running}")
    nginx = state.get("nginx")
    _say(f"  nginx      pid {nginx['pid'] if nginx else '-'}  "
         f"{'running' if nginx and owns(nginx['pid'], nginx['markers']) else 'stopped'}")
    for replica in state.get("replicas", []):
        running = replica.get("pid") and owns(replica["pid"], replica["markers"])
        model = f"  {replica['model']}" if len(models) > 1 and replica.get("model") else ""
        _say(f"  replica {replica['index'] + 1}  :{replica['port']}  pid "
             f"{replica.get('pid') or '-'}  {'running' if running else 'stopped'}{model}")
    return 0


def _top(args: argparse.Namespace) -> int:
    from local.top import run  # rich is needed only here

    if args.interval <= 0 or args.window <= 0:
        raise LocalModeError("--interval and --window must be positive seconds")
    return run(args.workdir.resolve(), interval=args.interval, window=args.window,
               max_frames=args.frames)


def _say(message: str) -> None:
    try:
        print(message, flush=True)  # flush: works (and orders well with stderr) without a TTY
    except OSError:  # the terminal closed (SIGHUP): stopping in order matters more than saying so
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process


if __name__ == "__main__":
    sys.exit(main())
