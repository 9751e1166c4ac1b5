"""The command line's parser: every run flag generated from the config schema
(:mod:`apam_gossip.config`: each key a flag such as ``--optim.lr``, plus short aliases such
as ``--lr``), one-line errors with a 'did you mean', and the config a run's flags make."""

from __future__ import annotations

import argparse
import sys
from typing import Any, NoReturn

from .. import __version__
from ..config import ConfigError, RunConfig, load_config, merge, nest, schema_fields
from ..errors import UserError
from .common import PROG


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{PROG}: error: {message}{self._suggestion(message)} "
                  f"(see '{self.prog} --help')\n")

    def _suggestion(self, message: str) -> str:
        """'did you mean --lr?' for an unrecognized or misspelt flag."""
        import difflib

        if not message.startswith("unrecognized arguments:"):
            return ""
        known = {o for parser in self._all_parsers() for act in parser._actions
                 for o in act.option_strings}
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                flag = word.split("=")[0]
                # a known flag with an extra word (--lr-rate: --lr) before a look-alike
                # (difflib alone offered --simulate)
                prefixes = [k for k in known if flag.startswith((k + "-", k + "."))]
                near = [max(prefixes, key=len)] if prefixes else \
                    difflib.get_close_matches(flag, sorted(known), n=1, cutoff=0.7)
                if near:
                    return f"; did you mean {near[0]}?"
        return ""

    def _all_parsers(self) -> list[argparse.ArgumentParser]:
        out: list[argparse.ArgumentParser] = [self]
        for act in self._actions:
            if isinstance(act, argparse._SubParsersAction):
                out += list(act.choices.values())
        return out


def _slow(text: str) -> tuple[int, float]:
    try:
        w, f = text.split("=")
        return int(w), float(f)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid --slow value {text!r}: use WORKER=FACTOR, e.g. --slow 0=10") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid list {text!r}: give numbers separated by commas, e.g. 1,1,4") from None


def _json_value(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {text!r}: give JSON, e.g. '[[0, 1, 5.0, 1.0]]'") from None


class _SetKey(argparse.Action):
    """Stores a flag's value under its config key (``ns._cfg``) and remembers which
    flag set it (``ns._flag``), so an error about the key can name the flag typed."""

    def __init__(self, option_strings, dest, key: str, const_value: Any = None, **kw) -> None:
        self.key, self.const_value = key, const_value
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, ns, values, option_string=None) -> None:
        value = self.const_value if self.nargs == 0 else values
        ns._cfg = {**getattr(ns, "_cfg", {}), self.key: value}
        ns._flag = {**getattr(ns, "_flag", {}), self.key: option_string}


_GROUPS = {"data": "data", "optim": "optimizer", "network": "emulated network"}
_HETEROGENEITY = ("slowdown", "straggler_prob", "straggler_factor")
_SINGLE_RUN_KEYS = ("checkpoint", "checkpoint_every_s")  # compare runs several


def _default_text(v: Any) -> str:
    if v is None or v == ():
        return ""
    if isinstance(v, bool):
        return " (default: on)" if v else " (default: off)"
    return f" (default: {v:g})" if isinstance(v, float) else f" (default: {v})"


def _add_run_flags(p: argparse.ArgumentParser, with_mode: bool = True,
                   single_run: bool = True) -> None:
    """The flags of a run, generated from the config schema (:mod:`apam_gossip.config`):
    every key is a flag (``--optim.lr``), plus its short aliases (``--lr``). ``single_run``
    adds those that only make sense for one run (--checkpoint, --resume, --save-model),
    which compare does not take."""

    groups: dict[str, Any] = {}

    def group(title: str):
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        return groups[title]

    p.add_argument("--config", metavar="FILE", help="TOML or JSON config; flags override it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config as TOML and exit")
    for spec in schema_fields():
        if spec.path == "mode" and not with_mode:
            continue
        if spec.path in _SINGLE_RUN_KEYS and not single_run:
            continue
        section = spec.path.split(".")[0] if "." in spec.path else ""
        title = _GROUPS.get(section) or ("heterogeneity" if spec.path in _HETEROGENEITY
                                         else "run")
        g = group(title)
        names = [spec.flag, *spec.flags]
        help_text = spec.help + _default_text(spec.default)
        ann = str(spec.annotation)
        if spec.is_bool:
            g.add_argument(*names, action=_SetKey, key=spec.path, nargs=0, const_value=True,
                           default=argparse.SUPPRESS, help=help_text)
            g.add_argument("--no-" + spec.flag[2:], action=_SetKey, key=spec.path, nargs=0,
                           const_value=False, default=argparse.SUPPRESS,
                           help=f"turn {spec.flag} off")
            continue
        kw: dict[str, Any] = {"action": _SetKey, "key": spec.path,
                              "default": argparse.SUPPRESS, "help": help_text}
        if spec.choices:
            kw["choices"] = spec.choices
        elif spec.path == "network.links":
            kw.update(type=_json_value, metavar="JSON")
        elif "tuple" in ann:
            kw.update(type=_floats, metavar="X,X,...")
        elif "int" in ann:
            kw.update(type=int, metavar="N")
        elif "float" in ann:
            kw.update(type=float, metavar="X")
        else:
            kw["metavar"] = {"data.data_dir": "DIR", "checkpoint": "PATH",
                             "topology": "FILE_OR_NAME"}.get(spec.path, "TEXT")
        g.add_argument(*names, **kw)
    h = group("heterogeneity")
    h.add_argument("--slow", type=_slow, action="append", metavar="WORKER=FACTOR",
                   help="make a worker FACTOR times slower (repeatable), e.g. --slow 0=10; "
                   "sets slowdown")
    o = group("optimizer")
    o.add_argument("--amsgrad-variant", choices=("practical", "paper"),
                   help="practical: Adam bias correction (= torch Adam(amsgrad=True)); "
                   "paper: the APAM paper's update; sets optim.bias_correction")
    out = group("output")
    out.add_argument("--output", "-o", metavar="PATH",
                     help="RunResult JSON path (default runs/<time>-<mode>-<model>-<dataset>"
                     ".json)")
    out.add_argument("--quiet", "-q", action="store_true",
                     help="no progress bar or eval lines")
    out.add_argument("--log", action="append", metavar="SPEC",
                     help="write the metrics as the run goes (repeatable): "
                     "tensorboard:DIR (a TensorBoard event file) or jsonl:PATH (one JSON "
                     "object per line)" + ("" if single_run else "; one per mode: DIR/<mode>, "
                                           "PATH-<mode>.jsonl"))
    if not single_run:
        return
    out.add_argument("--save-model", metavar="PATH", help="also save the final model: a "
                     "state_dict plus what rebuilds it; apam_gossip.load_model(PATH) returns "
                     "the nn.Module")
    out.add_argument("--resume", metavar="PATH", help="continue the run saved in this "
                     "checkpoint, with the settings saved in it")


def _overrides(a: argparse.Namespace) -> tuple[dict[str, Any], dict[str, str]]:
    """The config keys the flags set (flat dotted keys) and, per key, the flag used."""
    values: dict[str, Any] = dict(getattr(a, "_cfg", {}))
    flags: dict[str, str] = dict(getattr(a, "_flag", {}))
    if "epochs" in values and "steps" in values:
        raise UserError(f"{flags['epochs']} and {flags['steps']} both set the budget; give one")
    if "epochs" in values:
        values["steps"] = None  # epochs given: a config file's steps must not win
    if a.amsgrad_variant is not None:
        values["optim.bias_correction"] = a.amsgrad_variant == "practical"
        flags["optim.bias_correction"] = "--amsgrad-variant"
    if a.slow:
        factors: dict[int, float] = dict(a.slow)
        n = values.get("workers")
        if n is not None and max(factors) >= n:
            raise UserError(f"--slow names worker {max(factors)} but --workers is {n} "
                            "(workers are numbered from 0)")
        if min(factors) < 0:
            raise UserError(f"--slow names worker {min(factors)}: workers are numbered from 0")
        values["slowdown"] = [factors.get(i, 1.0) for i in range(max(factors) + 1)]
        flags["slowdown"] = "--slow"
    return values, flags


def _given(a: argparse.Namespace) -> list[str]:
    """The flags given on the command line that shape the run (config keys, --config,
    --slow, --amsgrad-variant)."""
    _, flags = _overrides(a)
    extra = ["--config"] if getattr(a, "config", None) else []
    return extra + sorted(set(flags.values()))


def _ignored_flags(a: argparse.Namespace, cfg, modes: list[str]) -> list[str]:
    """Flags given on the command line that have no effect on a run of ``cfg`` in any of
    ``modes``, each with the reason (one warning line names them all; the table is
    :func:`~apam_gossip.config.ignored_settings`, which the loop API shares)."""
    from ..config import ignored_settings

    _, flags = _overrides(a)
    return [f"{flags[k]} ({why})" for k, why in ignored_settings(flags, modes, cfg.optim, cfg)]


def _warn_ignored(a: argparse.Namespace, cfg, modes: list[str]) -> None:
    ignored = _ignored_flags(a, cfg, modes)
    if ignored:
        print(f"{PROG}: warning: ignored: {'; '.join(ignored)}", file=sys.stderr)


def _build_config(a: argparse.Namespace, base: dict[str, Any] | None = None):
    """The run's config: ``base`` (the demo's), the --config file, then the flags. An
    invalid value that came from a flag is reported with the flag's name."""
    import re


    values, flags = _overrides(a)
    over = merge(base or {}, nest(values))
    try:
        if a.config:
            return load_config(a.config, over)
        return RunConfig.from_dict(over)
    except ConfigError as e:
        key = re.sub(r"\[\d+\]$", "", e.key or "")
        if e.problem and key in flags and not e.problem.startswith("is not a config key"):
            which = f" ({e.key})" if e.key != key else ""  # an element: slowdown[3]
            raise UserError(f"{flags[key]}{which} {e.problem}") from None
        raise


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Asynchronous distributed training: centralized APAM "
                "(async AMSGrad master/worker) and decentralized gossip (AD-PSGD).")

    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    t = sub.add_parser("train", help="train a model", description="Train a model.",
                       usage=f"{PROG} train [options]")
    _add_run_flags(t)
    c = sub.add_parser("compare", help="run several modes on the same model, data, seed "
                       "and budget; print a table and plot accuracy curves",
                       description="Run centralized, decentralized and the sequential "
                       "reference on the same model, data, seed and sample budget.",
                       usage=f"{PROG} compare [options]")
    _add_run_flags(c, with_mode=False, single_run=False)
    c.add_argument("--modes", default="centralized,decentralized,sequential",
                   help="comma-separated modes to run, of centralized, decentralized, "
                   "sequential, allreduce, dpsgd and syncps (default: "
                   "centralized,decentralized,sequential)")
    c.add_argument("--target", type=float, default=0.9,
                   help="the test metric to reach, for the time-to-target column (accuracy: a "
                   "fraction in (0, 1]; a lower-is-better metric is reached at or below it)")
    c.add_argument("--plot", metavar="PNG", help="plot path (default: next to --output)")
    c.add_argument("--results", nargs="+", metavar="JSON",
                   help="no runs: compare these finished runs' result files (train, "
                   "compare, or a loop-API job's init(result=...))")
    g = sub.add_parser("topology", help="describe (and draw) a gossip topology",
                       description="Load or generate a topology, validate it for N workers, "
                       "print degrees and the spectral gap of its expected gossip matrix.")
    g.add_argument("spec", metavar="FILE_OR_NAME")
    g.add_argument("--workers", type=int, help="number of workers (default: the file's "
                   "node count; required for generated topologies)")
    g.add_argument("--seed", type=int, default=0, help="seed for random topologies")
    g.add_argument("--png", metavar="PATH", help="also draw the graph to this PNG file")
    b = sub.add_parser("bench", help="benchmarks: a cluster PROFILE (every mode, table and "
                       "plots), or a micro-benchmark (transport, pairwise, shm-pairwise, "
                       "master, scaling, contention)",
                       description="apam-gossip bench PROFILE.toml runs every mode of a "
                       "cluster profile (see launch/*.toml). Micro-benchmarks: 'transport' "
                       "compares shared memory with MPI on a training run; 'pairwise' times "
                       "one MPI pairwise average against a ping-pong; 'shm-pairwise' one "
                       "shared-memory pairwise average against a memcpy; 'master' the APAM "
                       "master's update rate against the memory-bandwidth bound; 'scaling' "
                       "homogeneous throughput from 1 to --max-workers workers; 'contention' "
                       "the per-batch time of 1 to --max-workers workers computing at once "
                       "(the simulator's contention curve).")
    b.add_argument("what", metavar="PROFILE|transport|pairwise|shm-pairwise|master|scaling|"
                   "contention")
    b.add_argument("--smoke", action="store_true", help="PROFILE: the quick [smoke] variant")
    b.add_argument("--modes", help="PROFILE: comma-separated bench modes (default the "
                   "profile's; any other, e.g. decentralized-int8, runs on the same "
                   "cluster); transport: centralized,decentralized")
    b.add_argument("--output", "-o", metavar="PATH", help="PROFILE: result JSON (PNGs next to "
                   "it; default runs/bench-<profile>-<time>.json)")
    b.add_argument("--quiet", "-q", action="store_true")
    b.add_argument("--workers", type=int, help="transport: workers (default 4); with "
                   "--simulate: simulate this many (as `simulate --workers`)")
    b.add_argument("--repeats", type=int, default=3, help="transport: alternations")
    b.add_argument("--train-args", default="--model lenet5 --dataset fashion-mnist "
                   "--train-limit 12000 --test-limit 500 --epochs 1 --evals 1",
                   help="transport: flags for each 'apam-gossip train' run (one string); "
                   "contention: the model and data (default LeNet5 on Fashion-MNIST)")
    b.add_argument("--max-workers", type=int, help="scaling, contention: largest N (default: "
                   "the cores)")
    b.add_argument("--seconds", type=float, default=1.0, help="contention: seconds of "
                   "gradients at each N in each of 3 rounds (the N alternate in a round)")
    b.add_argument("--size-mb", type=float, default=4.0, help="pairwise, shm-pairwise, "
                   "master: model size (MB of float32; 100 = a 25M-parameter model)")
    b.add_argument("--reps", type=int, default=30, help="pairwise, shm-pairwise: repetitions")
    b.add_argument("--shards", help="master: the update rate of a sharded master's work, "
                   "K processes stepping their slices at once, for each K given (e.g. 1,2)")
    la = sub.add_parser("launch", help="start your own training script on N ranks (the "
                        "loop API: apam_gossip.init, DistributedOptimizer)",
                        description="Run `mpirun -n N python SCRIPT ARGS` with settings that "
                        "work out of the box (root, oversubscription, a private segment "
                        "folder), like horovodrun or bfrun.",
                        usage=f"{PROG} launch -n N [-H HOST:SLOTS,...] [--hostfile H] "
                        "[--timeout S] SCRIPT [ARGS ...]",
                        epilog="mpirun's and horovodrun's spellings work too: -np N, "
                        "-hostfile H, -host/--host HOSTS.")
    la.add_argument("-n", "--np", type=int, help="number of ranks (default: the sum of "
                    "-H's slots)")
    la.add_argument("-H", "--host", dest="hosts", metavar="HOST:SLOTS,...",
                    help="hosts and their slots, as horovodrun -H / mpirun --host "
                    "(e.g. node1:4,node2:4)")
    la.add_argument("--hostfile", help="an OpenMPI hostfile (several hosts)")
    la.add_argument("--timeout", type=float, help="stop the whole job after this many "
                    "seconds")
    la.add_argument("script", metavar="SCRIPT")
    la.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    b.add_argument("--simulate", action="store_true", help="PROFILE: simulate every mode "
                   "instead of running it (see 'simulate')")
    sm = sub.add_parser("simulate", help="predict a cluster PROFILE at any number of workers "
                        "(discrete-event simulation of the real algorithms)",
                        description="Simulate every mode of a cluster profile on a virtual "
                        "clock: the real model, data and optimizer run in event order "
                        "(math mode), or only the timing (--timing-only). Writes the same "
                        "JSON and plots as bench.",
                        usage=f"{PROG} simulate PROFILE [--workers N] [--timing-only] "
                        "[options]")
    sm.add_argument("what", metavar="PROFILE")
    for parser in (b, sm):
        parser.add_argument("--timing-only", action="store_true",
                            help="simulate: no math, throughput and staleness only (fast, "
                            "up to 10,000 workers)")
        parser.add_argument("--gradient-ms", type=float, help="simulate: one gradient's "
                            "time at full speed (default: the profile's [simulate] "
                            "gradient_ms, else timed on this machine)")
        parser.add_argument("--gradient-cv", type=float, help="simulate: the spread of "
                            "gradient times, a coefficient of variation (default: "
                            "[simulate] gradient_cv, else 0.1; 0 = none)")
        parser.add_argument("--master-ms", type=float, help="simulate: the master's time "
                            "per update (default: [simulate] master_update_ms, else timed "
                            "on this machine; `bench master` measures it)")
    sm.add_argument("--workers", dest="sim_workers", type=int, help="simulate this many "
                    "workers (the profile's per-worker settings repeat)")
    sm.add_argument("--scale", metavar="N,N,...", help="the scale study: every mode at each "
                    "of these worker counts (speed-up over all-reduce; a table and a PNG)")
    sm.add_argument("--model-params", type=int, help="time the transfers and the "
                    "optimizer steps as for a model of this many parameters (e.g. "
                    "25000000; needs --gradient-ms); math mode still trains the "
                    "profile's model")
    sm.add_argument("--smoke", action="store_true", help="the profile's [smoke] variant")
    for parser in (b, sm):
        parser.add_argument("--seeds", type=int, default=1, help="PROFILE: run every mode "
                            "with this many seeds (the profile's, +1, ...); the table shows "
                            "mean±sd")
    sm.add_argument("--modes", help="comma-separated bench modes (default the profile's; "
                    "any other, e.g. decentralized-int8, on the same cluster)")
    sm.add_argument("--output", "-o", metavar="PATH", help="result JSON (PNGs next to it)")
    sm.add_argument("--quiet", "-q", action="store_true")
    b.set_defaults(sim_workers=None)
    d = sub.add_parser("demo", help="a short real run on the embedded digits data",
                       description="APAM with 4 workers (one 4x slower) on scikit-learn's "
                       "real 8x8 digits; under a minute on 2 cores.")
    _add_run_flags(d)
    return p




_LAUNCH_SPELLINGS = {"-np": "--np", "-host": "--host", "-hostfile": "--hostfile"}
_LAUNCH_VALUED = {"-n", "--np", "-H", "--host", "--hostfile", "--timeout"}


def launch_spellings(argv: list[str]) -> list[str]:
    """``launch``'s options as mpirun and horovodrun users type them (``-np 4``, which
    argparse would read as ``-n p``; ``-host``, ``-hostfile``), in argparse's spelling.
    Only the options before the script are touched; the script's own are left as they
    are."""
    if not argv or argv[0] != "launch":
        return argv
    out, i = [argv[0]], 1
    while i < len(argv):
        t = _LAUNCH_SPELLINGS.get(argv[i], argv[i])
        if not t.startswith("-"):  # the script: the rest is its own
            return out + argv[i:]
        out.append(t)
        if t in _LAUNCH_VALUED and i + 1 < len(argv):
            out.append(argv[i + 1])
            i += 1
        i += 1
    return out
