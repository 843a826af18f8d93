"""`fedfer deploy …`: credentials, registration and start commands for a real federation
(one Flower SuperLink at the coordinator, one SuperNode per school, one evaluation node).

    fedfer deploy init --coordinator fl.district.example [--san 10.0.0.5 …] [--dir deploy]
    fedfer deploy school-key --state-dir /srv/fedfer/lincoln-state      # at the school: its own keys
    fedfer deploy school-key --state-dir DIR --new-ledger-key            # at the school: hand its ledger to a new key
    fedfer deploy school-key --state-dir DIR --recover-ledger-key        # at the school: its ledger key is LOST
    fedfer deploy restore-ledger --state-dir DIR --school NAME --from RUNS   # at the school: its ledger.jsonl is LOST
    fedfer deploy add-school lincoln-high --data-dir /srv/fer/lincoln \
        [--ledger-key signing_key.pub --node-key supernode.pub --state-dir /srv/fedfer/lincoln-state]
    fedfer deploy evaluator --benchmark fer2013=/srv/public/fer2013.csv
    fedfer deploy status | register NAME | revoke NAME | rotate NAME [--ledger-key PUB [--recovered]] | renew-cert | up
    fedfer deploy set-budget NAME EPSILON                                # a school raised (or lowered) its budget
    fedfer deploy scripts                                                # start scripts written again after an upgrade

Secure by default: TLS (own CA, EC P-384) and SuperNode authentication (ECDSA P-384 node keys
registered with `flwr supernode register`) are on; `--insecure` turns both off, loudly.
The work is done by server/deploy/ (commands, layout, credentials, local) and server/processes.py;
this module only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from server.deploy.commands import (INSECURE_WARNING, DeployError, add_node, default_flwr_home, deployment_status,
                                    init_deployment, make_school_keys, recover_school_ledger_key, register_pending,
                                    renew_certificate, revoke_node, rewrite_start_scripts, rotate_ledger_key,
                                    rotate_node, rotate_school_ledger_key, set_school_budget)


# ------------------------------------------------------------------------------------ argparse
def _home(args: argparse.Namespace) -> Path:
    return Path(args.flwr_home).expanduser().resolve() if args.flwr_home else default_flwr_home()


def _cmd_init(args: argparse.Namespace) -> int:
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    dep = init_deployment(Path(args.dir), args.coordinator, args.san, port=args.port, bind=args.bind,
                          connection=args.connection, insecure=args.insecure, executor=args.executor,
                          flwr_home=_home(args), force=args.force)
    print(f"deployment in {dep.root}")
    if not dep.insecure:
        print(f"  CA            {dep.ca_cert}   (keep {dep.ca_key} offline once nodes are issued)")
        print(f"  SuperLink     {dep.superlink_cert}  SANs: {', '.join(dep.sans)}")
    print(f"  start         {dep.coordinator_dir / 'start-superlink.sh'}   (listens on {dep.bind}:{dep.port})")
    print(f"  Flower CLI    connection '{dep.connection}' in {_home(args) / 'config.toml'}")
    print(f"  then          fedfer deploy add-school NAME --data-dir PATH --dir {args.dir}")
    print(f"  run           flwr run . {dep.connection} --stream -c 'privacy.keyring=\"{dep.keyring}\"'")
    return 0


def _print_node(dep: Any, name: str, message: str) -> None:
    folder = dep.node_dir(name)
    entry = dep.nodes[name]
    print(f"{entry.role} '{name}' in {folder}")
    if entry.auth_key:
        print(f"  node key      the school's own, {entry.auth_key} on its machine  {entry.fingerprint}")
    elif entry.fingerprint:
        print(f"  node key      {folder / 'supernode'} (0600)  {entry.fingerprint}")
    from server.processes import format_node_config

    print(f"  node-config   {folder / 'node-config.toml'}: " + format_node_config(entry.node_config))
    if entry.role == "school":
        print(f"  ledger key    {dep.keyring / (name + '.pub')} (server keyring)")
    print(f"  {message}")
    print(f"  start         {folder / 'start.sh'}   (copy the folder to the site; runtime port {entry.runtime_port})")


def _cmd_add_school(args: argparse.Namespace) -> int:
    dep, message = add_node(Path(args.dir), args.name, "school", data_dir=Path(args.data_dir), state_dir=args.state_dir,
                            budget=args.budget, runtime_port=args.runtime_port, flwr_home=_home(args), unit=args.unit,
                            delta=args.delta, max_round_epsilon=args.max_round_epsilon,
                            declared=args.declared_students if args.declared_students is not None else args.declared_images,
                            ledger_key=Path(args.ledger_key) if args.ledger_key else None,
                            node_key=Path(args.node_key) if args.node_key else None)
    _print_node(dep, args.name, message)
    if args.ledger_key:
        print(f"  signing key   the school's own (public half from {args.ledger_key}); none was made here")
    else:
        print(f"  signing key   made here, in {dep.node_dir(args.name)}: delete the folder once it is at the school "
              "(or let the school make its own keys: `fedfer deploy school-key`, then --ledger-key and --node-key)")
    return 0


def _cmd_school_key(args: argparse.Namespace) -> int:
    if args.new_ledger_key:
        return _new_ledger_key(Path(args.state_dir))
    if args.recover_ledger_key:
        return _recover_ledger_key(Path(args.state_dir), Path(args.lost_key) if args.lost_key else None)
    if args.lost_key:
        raise DeployError("--lost-key goes with --recover-ledger-key")
    keys = make_school_keys(Path(args.state_dir), new_node_key=args.new_node_key)
    state = Path(args.state_dir).expanduser().absolute()
    print(f"ledger signing key  {state / 'signing_key.pem'} (0600, stays here; key id {keys.ledger_key_id})")
    print(f"SuperNode key       {state / 'supernode'} (0600, stays here; {keys.node_fingerprint}"
          + (", new)" if keys.new_node_key else ", kept)"))
    if args.new_node_key:   # the ledger key is unchanged: the coordinator has its public half already
        print(f"  send {keys.node_public} to the coordinator, who runs (the SuperLink running):")
        print("  fedfer deploy rotate NAME --node-key supernode.pub")
        print("  then start this node's start.sh again, or in a one-machine trial `fedfer deploy up` (a SuperNode "
              "running on the old key stops at the rotation, and `deploy up` with it; one started before it cannot "
              "connect)")
        if (state / "supernode.old").exists():
            print(f"  the previous key is kept as {state / 'supernode.old'} (0600): if the coordinator cannot rotate, "
                  "move it back to supernode; delete it once the rotation is done")
    else:
        print(f"  send {keys.ledger_public} and {keys.node_public} to the coordinator, who runs:")
        print(f"  fedfer deploy add-school NAME --ledger-key {keys.ledger_public.name} --node-key {keys.node_public.name} "
              f"--state-dir {state} --data-dir PATH --declared-students N …")
    return 0


def _new_ledger_key(state_dir: Path) -> int:
    rot = rotate_school_ledger_key(state_dir)
    state = state_dir.expanduser().absolute()
    print(f"ledger signing key  {state / 'signing_key.pem'} (0600, stays here): new key {rot.new_key_id}, "
          f"the retired key {rot.old_key_id} is deleted (its public half is kept in {state / 'signing_key.retired'}: "
          f"the ledger starts under it)")
    if rot.transition_line:
        print(f"  {state / 'ledger.jsonl'} line {rot.transition_line}: key transition {rot.old_key_id} → "
              f"{rot.new_key_id}, signed by the retired key; the lifetime ε goes on under the new key")
    print(f"  send {rot.public} to the coordinator, who runs:")
    # the ledger names the school (its school-id is the coordinator's NAME); a school with no ledger yet cannot say
    print(f"  fedfer deploy rotate {rot.school or 'NAME'} --ledger-key {rot.public.name}")
    print("  a running node signs with the new key from its next round (the retired key can sign nothing more); "
          "the server refuses the school until the coordinator has it")
    return 0


def _recover_ledger_key(state_dir: Path, lost_key: Path | None) -> int:
    rec = recover_school_ledger_key(state_dir, lost_key)
    state = state_dir.expanduser().absolute()
    print(f"ledger signing key  {state / 'signing_key.pem'} (0600, stays here): new key {rec.new_key_id}, replacing "
          f"the lost key {rec.lost_key_id} (its public half is kept in {state / 'signing_key.retired'}: the ledger "
          f"starts under it)")
    print(f"  {state / 'ledger.jsonl'} line {rec.recovery_line}: key recovery {rec.lost_key_id} (lost) → "
          f"{rec.new_key_id}, signed by the new key; it carries ε {rec.epsilon:.3f} on, so the lifetime budget "
          f"runs on")
    print(f"  send {rec.public} to the coordinator, who checks it is this school's and runs:")
    print(f"  fedfer deploy rotate {rec.school or 'NAME'} --ledger-key {rec.public.name} --recovered")
    print("  start the node once it has (the server refuses a recovery not approved yet, and stops selecting the "
          "school for the rest of that run)")
    return 0


def _cmd_restore_ledger(args: argparse.Namespace) -> int:
    from privacy.accounting import AccountingError
    from privacy.ledger import LedgerError
    from privacy.ledger_restore import restore_ledger

    state = Path(args.state_dir).expanduser().absolute()
    try:
        done = restore_ledger(state, Path(args.runs).expanduser(), args.school)
    except (LedgerError, AccountingError) as exc:
        raise DeployError(str(exc)) from None
    print(f"ledger restored     {done.ledger}: {done.entries} entries from the coordinator's copies of "
          f"{len(done.runs)} run{'s' if len(done.runs) != 1 else ''} ({', '.join(done.runs)}), in the anchor's order, "
          f"each verified with the school's own key")
    print(f"  lifetime ε {done.epsilon:.3f} at δ {done.delta:g}; head {done.head[:12]}… (the anchor's)"
          + ("; the accountant was rebuilt from it" if done.accountant_rebuilt else "; the accountant agrees"))
    print(f"  recorded in {state / 'ledger-restore.json'} (the audit names the restore); the node can start again")
    return 0


def _cmd_evaluator(args: argparse.Namespace) -> int:
    dep, message = add_node(Path(args.dir), args.name, "evaluator", data_dir=args.data_dir, benchmarks=args.benchmark,
                            runtime_port=args.runtime_port, flwr_home=_home(args))
    _print_node(dep, args.name, message)
    # the coordinator sees only these names, so it cannot tell public data from a school's faces: it is told
    from shared_models.datasets import canonical_name

    names = ",".join(dict.fromkeys(canonical_name(spec.split("=", 1)[0].split(":", 1)[0]) for spec in args.benchmark))
    print(f"  best round    only benchmarks declared public choose checkpoints/best.pt: if these hold public data "
          f"only (never a school's faces), run with -c 'evaluation.public_benchmarks=\"{names}\"'")
    return 0


def _cmd_renew_cert(args: argparse.Namespace) -> int:
    dep = renew_certificate(Path(args.dir), args.san)
    print(f"new SuperLink certificate {dep.superlink_cert}, SANs {', '.join(dep.sans)}; restart the SuperLink")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    print(register_pending(Path(args.dir), args.name, _home(args)))
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    print(revoke_node(Path(args.dir), args.name, _home(args)))
    return 0


def _cmd_scripts(args: argparse.Namespace) -> int:
    written, gone = rewrite_start_scripts(Path(args.dir))
    for path in written:
        print(f"wrote {path}")
    if gone:
        print(f"  not here (their folders went to the schools): {', '.join(gone)}; run this where a copy of the "
              "deployment holds their folder, or send each school a new start.sh")
    print("  restart what runs on the old scripts to use the new ones")
    return 0


def _cmd_set_budget(args: argparse.Namespace) -> int:
    print(set_school_budget(Path(args.dir), args.name, args.budget))
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    if args.recovered and not args.ledger_key:
        raise DeployError("--recovered goes with --ledger-key (the school's new ledger key after a lost one)")
    if args.ledger_key:   # the ledger key only; the SuperNode key is rotated on its own (--node-key)
        print(rotate_ledger_key(Path(args.dir), args.name, Path(args.ledger_key), recovered=args.recovered))
        return 0
    print(rotate_node(Path(args.dir), args.name, _home(args), Path(args.node_key) if args.node_key else None))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    info = deployment_status(Path(args.dir), _home(args))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(f"deployment {info['dir']}: SuperLink {info['coordinator']} "
              f"({'running' if info['superlink_running'] else 'not running'} here), connection '{info['connection']}'"
              + (", INSECURE" if info["insecure"] else ""))
        if "certificate" in info:
            print(f"  certificate expires {info['certificate']['expires']}, SANs {', '.join(info['certificate']['sans'])}")
        print(f"  {'node':<20} {'role':<10} {'status':<11} {'flower':<12} {'node id':<22} key")
        for row in info["nodes"]:
            print(f"  {row['name']:<20} {row['role']:<10} {row['status']:<11} {row.get('flower', '-'):<12} "
                  f"{str(row['node_id'] or '-'):<22} {row['fingerprint'] or '-'}"
                  + (" (the school's own)" if row["node_key"] == "school's own" else ""))
        for problem in info["problems"]:
            print(f"  PROBLEM: {problem}")
    return 1 if info["problems"] else 0


def _cmd_up(args: argparse.Namespace) -> int:
    """Start the SuperLink and every node of the deployment on this machine (a one-machine trial)."""
    from server.deploy.layout import Deployment
    from server.deploy.local import LocalFederation

    import signal

    def _terminate(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt   # `kill` stops everything like Ctrl-C does (LocalFederation.__exit__)

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)   # also when started in the background (SIGINT ignored there)
    dep = Deployment.load(Path(args.dir).resolve())
    # starting takes 20-60 s (the SuperLink, then each node until Flower names its id): say so before, not after
    nodes = sum(1 for entry in dep.nodes.values() if entry.status != "revoked")   # what start_all starts
    print(f"starting: SuperLink 127.0.0.1:{dep.port} + {nodes} node(s) (under a minute); "
          f"logs in {dep.root / 'logs'}", flush=True)
    code = 0
    with LocalFederation(dep, log_dir=dep.root / "logs", flwr_home=_home(args)) as fed:
        fed.start_all()
        print(f"running: SuperLink 127.0.0.1:{dep.port} + {len(fed.nodes)} node(s); logs in {dep.root / 'logs'}; "
              "Ctrl-C stops all", flush=True)
        try:
            while all(p.alive() for p in fed.supervisor.processes):
                time.sleep(1)
            dead = [p.name for p in fed.supervisor.processes if not p.alive()]
            print(f"stopped: {', '.join(dead)} exited; stopping the rest", file=sys.stderr)
            code = 1
        except KeyboardInterrupt:
            # each process gets a grace period to stop: 10-20 s without a word looked hung
            print(f"stopping: the SuperLink and {nodes} node(s) (up to half a minute)", flush=True)
    # after LocalFederation stopped them: a Ctrl-C or kill otherwise ended without a word on what it stopped
    print(f"stopped: the SuperLink and {nodes} node(s) of {dep.root}", flush=True)
    return code


def _wrap(handler):  # one-line errors, exit 2
    def run(args: argparse.Namespace) -> int:
        from server.deploy.credentials import CredentialError
        from server.deploy.layout import LayoutError
        from server.processes import DeploymentError

        try:
            return handler(args)
        except (DeployError, CredentialError, LayoutError, DeploymentError) as exc:
            print(f"fedfer deploy: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        except OSError as exc:   # a path the user named is unusable in a way the checks did not foresee
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"fedfer deploy: {where}{exc.strerror or exc}", file=sys.stderr)
            return 2
    return run


def add_commands(sub: argparse._SubParsersAction) -> None:
    deploy = sub.add_parser("deploy", help="credentials, registration and start commands for a real federation",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = deploy.add_subparsers(dest="deploy_command", metavar="STEP")
    _add_init(dsub)
    _add_node_steps(dsub)
    _add_maintenance_steps(dsub)
    deploy.set_defaults(func=lambda args: (deploy.print_help(), 2)[1])


def _common(p: argparse.ArgumentParser) -> None:
    """Options every step takes: where the deployment lives and which Flower CLI home to update."""
    p.add_argument("--dir", default="deploy", help="deployment directory (default: deploy/)")
    p.add_argument("--flwr-home", default=None, help="Flower CLI home with config.toml (default: $FLWR_HOME or ~/.flwr)")


def _add_init(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser("init", help="CA, SuperLink certificate, coordinator start script, Flower CLI connection")
    p.add_argument("--coordinator", required=True, help="host name or address the schools dial")
    p.add_argument("--san", action="append", default=[], metavar="NAME", help="extra host name/address for the certificate (repeat)")
    p.add_argument("--port", type=int, default=None, help="SuperLink port (default 9093)")
    p.add_argument("--bind", default=None, help="address the SuperLink listens on (default 0.0.0.0; 127.0.0.1 for a loopback coordinator)")
    p.add_argument("--connection", default=None, help="Flower CLI connection name (default 'fedfer')")
    p.add_argument("--executor", choices=("warm", "flower"), default="warm",
                   help="warm: one warm ClientApp executor per node (fast rounds, default); flower: a fresh process per message")
    p.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (test networks only)")
    p.add_argument("--force", action="store_true", help="overwrite an existing deployment (new CA)")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_init))


def _add_node_steps(dsub: argparse._SubParsersAction) -> None:
    """The steps that create a node: a school, the evaluation node."""
    p = dsub.add_parser("add-school", help="a school's node key, ledger key, node-config, registration and start script")
    p.add_argument("name")
    p.add_argument("--data-dir", required=True, help="the school's data folder, as a path on the school's machine")
    p.add_argument("--state-dir", default=None, help="the school's state folder (default: <node folder>/state)")
    # the school's privacy policy, written into its node-config; no run-config can weaken it
    p.add_argument("--budget", type=float, default=None, help="lifetime ε budget (default: privacy.budget of fedfer's defaults)")
    p.add_argument("--unit", choices=("student", "image"), default=None, help="privacy unit (default: privacy.unit)")
    p.add_argument("--delta", type=float, default=None, help="δ of every ε (default: privacy.delta); < 1/declared size")
    p.add_argument("--max-round-epsilon", type=float, default=None,
                   help="largest ε one round may spend (default: privacy.max_round_epsilon)")
    p.add_argument("--declared-students", type=int, default=None,
                   help="the public size the school declares (default: its labels.csv's student count to two "
                        "significant figures, if the data folder is readable here)")
    p.add_argument("--declared-images", type=int, default=None, help="the same for --unit image")
    p.add_argument("--runtime-port", type=int, default=None, help="the SuperNode's local Runtime API port (default: next free from 9101)")
    p.add_argument("--ledger-key", default=None, metavar="SIGNING_KEY_PUB",
                   help="the public half of the ledger key the school made itself (`fedfer deploy school-key`); "
                        "with --state-dir, its folder on the school's machine. Without it the key is made here")
    p.add_argument("--node-key", default=None, metavar="SUPERNODE_PUB",
                   help="the public half of the SuperNode key the school made itself (`fedfer deploy school-key`, "
                        "in --state-dir). Without it the key is made here, in the node folder")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_add_school))

    p = dsub.add_parser("school-key", help="at the school: make its ledger signing key and SuperNode key (they never "
                                           "leave the school; only their public halves go to the coordinator)")
    p.add_argument("--state-dir", required=True, help="the school's state folder (the node-config's state-dir)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--new-node-key", action="store_true",
                       help="replace the SuperNode key (then the coordinator runs `fedfer deploy rotate NAME --node-key`)")
    which.add_argument("--new-ledger-key", action="store_true",
                       help="replace the ledger signing key while it is at hand (compromised or retired; a lost "
                            "one: --recover-ledger-key): the ledger records a key transition signed by the old key, "
                            "so its lifetime ε goes on; then the coordinator runs "
                            "`fedfer deploy rotate NAME --ledger-key signing_key.pub`")
    which.add_argument("--recover-ledger-key", action="store_true",
                       help="the ledger signing key is LOST (signing_key.pem gone): a new key continues the ledger "
                            "by a key recovery it signs, so its lifetime ε goes on; then the coordinator runs "
                            "`fedfer deploy rotate NAME --ledger-key signing_key.pub --recovered`")
    p.add_argument("--lost-key", default=None, metavar="PUB",
                   help="with --recover-ledger-key: the lost key's public half (default: signing_key.pub in "
                        "--state-dir; else the coordinator's keys/NAME.pub)")
    p.set_defaults(func=_wrap(_cmd_school_key))

    p = dsub.add_parser("restore-ledger", help="at the school: rebuild a LOST ledger.jsonl from the coordinator's "
                                               "run copies and anchor, verified with the school's own key")
    p.add_argument("--state-dir", required=True, help="the school's state folder (the node-config's state-dir)")
    p.add_argument("--school", required=True, help="the school's name (its node-config's school-id)")
    p.add_argument("--from", dest="runs", required=True, metavar="RUNS",
                   help="the coordinator's runs folder as it sent it: anchors/<school>.json and "
                        "<run id>/ledger/<school>.jsonl of every run the anchor lists")
    p.set_defaults(func=_wrap(_cmd_restore_ledger))

    p = dsub.add_parser("evaluator", help="the evaluation node (public benchmarks)")
    p.add_argument("--name", default="evaluator")
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH", required=True,
                   help="a benchmark spec, repeat for several (see `fedfer evaluate --help`)")
    p.add_argument("--data-dir", default=None, help="root for synthetic benchmarks (optional)")
    p.add_argument("--runtime-port", type=int, default=None)
    _common(p)
    p.set_defaults(func=_wrap(_cmd_evaluator))


def _add_maintenance_steps(dsub: argparse._SubParsersAction) -> None:
    """The steps on an existing deployment: certificates, node registration, status, a local start."""
    p = dsub.add_parser("renew-cert", help="re-issue the SuperLink certificate from the CA (more --san, or expiry)")
    p.add_argument("--san", action="append", default=[], metavar="NAME")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_renew_cert))

    for name, help_text, handler in (
            ("register", "register a node created while the SuperLink was not running", _cmd_register),
            ("revoke", "unregister a node: the SuperLink refuses its key", _cmd_revoke),
            ("rotate", "new node key: register it, unregister the old one", _cmd_rotate)):
        p = dsub.add_parser(name, help=help_text)
        p.add_argument("name")
        if name == "rotate":
            keys = p.add_mutually_exclusive_group()
            keys.add_argument("--node-key", default=None, metavar="SUPERNODE_PUB",
                              help="a school that holds its own key: the public half of its new one "
                                   "(`fedfer deploy school-key --new-node-key`)")
            keys.add_argument("--ledger-key", default=None, metavar="SIGNING_KEY_PUB",
                              help="the school's new ledger key (`fedfer deploy school-key --new-ledger-key`): "
                                   "replaces keys/NAME.pub; the SuperNode key is left as it is")
            p.add_argument("--recovered", action="store_true",
                           help="with --ledger-key: the school LOST its old key (`school-key --recover-ledger-key`): "
                                "approve the new key as its recovery key, which the server and the audit require")
        _common(p)
        p.set_defaults(func=_wrap(handler))

    p = dsub.add_parser("scripts", help="write the start scripts again with the fedfer installed now (after an upgrade)")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_scripts))

    p = dsub.add_parser("set-budget", help="record a school's new lifetime ε budget (the school sets the same in its "
                                           "node-config.toml); the audit reads it")
    p.add_argument("name")
    p.add_argument("budget", type=float, metavar="EPSILON")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_set_budget))

    p = dsub.add_parser("status", help="check credentials and show every node (and Flower's online view)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_status))

    p = dsub.add_parser("up", help="start the SuperLink and all nodes on this machine (one-machine trial)")
    _common(p)
    p.set_defaults(func=_wrap(_cmd_up))
