"""``fedfer classroom``: from a classroom camera to a lesson report, on the school's own machine.

    fedfer classroom ingest FRAMES_DIR|VIDEO --out DIR [--seat-map F] [--labels F] [--empty-frame F]
    fedfer classroom report LESSON --checkpoint CKPT [--out DIR] [--policy F] [--state-dir DIR]
    fedfer classroom scene OUT [--students N --seconds S]      (a synthetic lesson to try them on)

Nothing here opens a network connection. Heavy imports (cv2, torch) happen inside the handlers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedfer.commands import UsageError

EPILOG = """\
examples:
  fedfer classroom scene /tmp/lesson --students 24 --seconds 300
  fedfer classroom ingest /tmp/lesson/frames --out /tmp/lesson/ingested \\
      --seat-map /tmp/lesson/seat_map.json --empty-frame /tmp/lesson/empty_room.png
  fedfer classroom report /tmp/lesson/ingested --checkpoint runs/demo/checkpoints/round-0010.pt
formats: frames: a folder of .png/.jpg/.jpeg/.bmp (name order, one sample each at --fps);
  video: any file OpenCV's bundled FFmpeg decodes (MP4/H.264, AVI/MJPEG, MKV, MOV, WebM), sampled at --fps.
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser("classroom", help="classroom camera -> faces -> lesson report (inside the school)",
                           description="Turn a classroom camera's frames into a school folder of normalised faces and "
                                       "a teacher's lesson report; everything runs locally.",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    cmds = group.add_subparsers(dest="classroom_command", metavar="SUBCOMMAND", required=True)
    ing = cmds.add_parser("ingest", help="detect, align, crop and track the faces of a lesson",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ing.add_argument("source", type=Path, help="a folder of frames or a video file")
    ing.add_argument("--out", type=Path, required=True, help="the school folder to write")
    _ingest_options(ing)
    ing.set_defaults(func=cmd_ingest)
    rep = cmds.add_parser("report", help="run a checkpoint over a lesson and write the teacher's report",
                          epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rep.add_argument("lesson", type=Path, help="an ingested lesson folder (or frames / a video: ingested first)")
    rep.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file or a run directory (its latest round; "
                     "RUN/checkpoints/best.pt: the round that scored best on the public benchmarks)")
    rep.add_argument("--out", type=Path, default=None, help="report folder (default: LESSON/report; for frames or a video: LESSON-report next to them)")
    rep.add_argument("--policy", type=Path, default=None,
                     help="the school's policy.json (or its state dir): report-min-students, per-student-figures")
    rep.add_argument("--state-dir", type=Path, default=None,
                     help="the school's state folder (its node-config's state-dir): its policy.json when it has one "
                          "(else fedfer's defaults, said in the report), and the record of the reports already "
                          "given, which stops two reports of one lesson being subtracted (docs/classroom.md)")
    _ingest_options(rep)
    rep.set_defaults(func=cmd_report)
    scene = cmds.add_parser("scene", help="write a synthetic classroom lesson (frames, seat map, ground truth)")
    scene.add_argument("out", type=Path)
    scene.add_argument("--students", type=int, default=24)
    scene.add_argument("--seconds", type=float, default=120.0)
    scene.add_argument("--fps", type=float, default=1.0)
    scene.add_argument("--seed", type=int, default=0)
    scene.add_argument("--format", choices=("png", "jpg"), default="png")
    scene.set_defaults(func=cmd_scene)


def _ingest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seat-map", type=Path, default=None, help="seat boxes -> student ids (JSON; docs/classroom.md)")
    p.add_argument("--labels", type=Path, default=None, help="frame,student_id,label CSV: makes the folder trainable")
    p.add_argument("--empty-frame", type=Path, default=None,
                   help="a frame of the empty room: tells absent, bowed and turned students apart")
    p.add_argument("--fps", type=float, default=1.0, help="samples per second (default 1)")
    p.add_argument("--size", type=int, default=None, help="crop side in pixels (default: the model preset's input size)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (defaults: shared_models/defaults.yaml)")
    p.add_argument("--workers", type=int, default=2,
                   help="processes analysing a frame folder (default 2; the result does not depend on it)")


def _model_input_size(cfg: dict) -> int:
    from shared_models.models import registry

    return int(registry.presets(str(cfg["model.name"]))[str(cfg["model.preset"])].input_size)


def _check_sizes(args: argparse.Namespace, size: int) -> None:
    from client.classroom.ingest import IngestError

    if not 16 <= size <= 512:
        raise IngestError(f"--size must be in 16..512, got {size}")
    if not 1 <= args.workers <= 64:
        raise IngestError(f"--workers must be in 1..64, got {args.workers}")


def _run_ingest(args: argparse.Namespace, source: Path, out: Path, size: int) -> int:
    from client.classroom.ingest import ingest

    _check_sizes(args, size)
    report = ingest(source, out, seat_map=args.seat_map, labels=args.labels, empty_frame=args.empty_frame, size=size,
                    fps=args.fps, echo=lambda line: print(f"fedfer classroom: {line}", flush=True), workers=args.workers)
    print(f"{out}: {report.samples} samples, {report.faces} faces ({report.without_faces} samples without a face, "
          f"{report.unreadable} unreadable), {report.labelled} labelled")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from shared_models.config import load_config

    cfg = load_config(args.config)
    return _run_ingest(args, args.source, args.out, args.size or _model_input_size(cfg))


def _classifier(checkpoint_path: Path):
    """(classify(uint8 (N, S, S) grey crops) -> FER7 indices, a model description) from a checkpoint."""
    import torch

    from fedfer.commands.results import _input_size, build_model, load_checkpoint
    from shared_models.evaluation import logits_of
    from shared_models.labels import FER7
    from shared_models.models import registry
    from shared_models.transforms import eval_transform

    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint).eval()
    if registry.clip_frames(model):   # its input is (B, 3, T, S, S): it would fail on the first batch of faces
        raise UsageError(f"{checkpoint['_path']}: {checkpoint['model']['name']}/{checkpoint['model']['preset']} is a "
                         f"clip model; the report classifies single faces: give an image model's checkpoint "
                         f"({', '.join(n for n in registry.available() if not _is_clip_model(n))})")
    if int(checkpoint["model"]["num_classes"]) != len(FER7):
        raise UsageError(f"{checkpoint['_path']}: the report needs a {len(FER7)}-class FER7 model, "
                         f"got {checkpoint['model']['num_classes']} classes")
    transform = eval_transform(_input_size(model, checkpoint, None))

    def classify(crops):
        with torch.no_grad():
            batch = torch.from_numpy(crops).unsqueeze(1).expand(-1, 3, -1, -1)
            return logits_of(model(transform(batch))).argmax(dim=1).numpy()

    info = checkpoint["model"]
    # the round too: "best.pt" alone would not tell the teacher's report which of the run's models it used
    where = Path(checkpoint["_path"]).name + (f", round {checkpoint['round']}" if "round" in checkpoint else "")
    return classify, f"{info['name']}/{info['preset']} ({where})"


def _is_clip_model(name: str) -> bool:
    from shared_models.models import registry

    return any(preset.clip_frames for preset in registry.presets(name).values())


def cmd_report(args: argparse.Namespace) -> int:
    import torch

    from client.classroom.report import classify_lesson, load_lesson, series_of, write_report
    from client.classroom.report_record import RECORD_FILE
    from privacy.policy import read_report_policy
    from shared_models.config import load_config

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    policy = read_report_policy(args.policy, cfg, state_dir=args.state_dir)
    print(policy.describe(), flush=True)
    classify, described = _classifier(args.checkpoint)
    if (args.lesson / "lesson.json").is_file():         # an ingested lesson folder
        _say_what_ingest_fixed(args)
        lesson = load_lesson(args.lesson)
        series = series_of(lesson, classify_lesson(lesson, classify))
        out = args.out or args.lesson / "report"
    else:                                               # frames or a video: analysed and classified in memory
        lesson, labels = _lesson_in_memory(args, cfg, classify)
        series = series_of(lesson, labels)
        out = args.out or args.lesson.with_name(args.lesson.name + "-report")
    record = args.state_dir / RECORD_FILE if args.state_dir is not None else None
    path = write_report(out, lesson, series, policy.min_students, policy.per_student_figures, described,
                        policy_applied=policy.describe(), record=record)
    print(f"lesson report: {path}")
    return 0


def _say_what_ingest_fixed(args: argparse.Namespace) -> None:
    """One line naming the analysis options given with an ingested lesson: its seat map, empty-room frame,
    rate and crop size were fixed at ingest, and a report silently made with the old seat map is not what
    the user asked for (to use new ones, report on the frames or ingest again)."""
    given = [flag for flag, value, default in (("--seat-map", args.seat_map, None), ("--empty-frame", args.empty_frame, None),
                                               ("--labels", args.labels, None), ("--fps", args.fps, 1.0),
                                               ("--size", args.size, None)) if value != default]
    if given:
        print(f"fedfer classroom: {args.lesson} is an ingested lesson: {', '.join(given)} were fixed when it was "
              f"ingested and are ignored here (report on its frames, or ingest it again, to change them)", flush=True)


def _lesson_in_memory(args: argparse.Namespace, cfg: dict, classify):  # type: ignore[no-untyped-def]
    """Frames or a video straight to (Lesson, labels): no crops written (client/classroom/lesson.py)."""
    from client.classroom.ingest import _inputs, _Warner
    from client.classroom.lesson import lesson_from_source

    size = args.size or _model_input_size(cfg)
    _check_sizes(args, size)
    warn = _Warner(lambda line: print(f"fedfer classroom: {line}", flush=True))
    if args.labels is not None:
        warn(f"{args.labels}: labels are for `fedfer classroom ingest` (training); the report ignores them")
    seats, _, empty = _inputs(args.seat_map, None, args.empty_frame, warn, args.lesson)
    return lesson_from_source(args.lesson, seats=seats, empty=empty, size=size, classify=classify, fps=args.fps,
                              workers=args.workers, warn=warn)


def _check_scene(args: argparse.Namespace) -> None:
    """One line for a scene the generator cannot make: NaN seconds, a negative seed and the like reached numpy
    as ValueErrors ("internal error"), and 10^7 seconds ran until the memory ran out."""
    import math

    from simulations.classroom_scenes import MAX_FRAMES, MAX_STUDENTS

    if not 1 <= args.students <= MAX_STUDENTS:
        raise UsageError(f"--students must be in 1..{MAX_STUDENTS}, got {args.students}")
    for flag, value in (("--seconds", args.seconds), ("--fps", args.fps)):
        if not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a number > 0, got {value}")
    if args.seconds * args.fps > MAX_FRAMES:
        raise UsageError(f"--seconds {args.seconds:g} at --fps {args.fps:g} is {args.seconds * args.fps:,.0f} frames; "
                         f"a synthetic lesson has at most {MAX_FRAMES:,}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")


def cmd_scene(args: argparse.Namespace) -> int:
    from simulations import classroom_scenes as scenes

    _check_scene(args)
    room = scenes.make_room(args.seed, args.students)
    script = scenes.script_lesson(room, args.seconds, args.fps, seed=args.seed)
    out = scenes.write_lesson(args.out, room, script, args.format)
    print(f"synthetic lesson: {out} ({script.steps} frames, {len(room.seats)} seats; frames/, seat_map.json, "
          f"empty_room.png, labels.csv, truth/)")
    return 0
