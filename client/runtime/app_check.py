"""The school runs the fedfer it installed: a FAB the coordinator ships is checked file by file
against this installation before any of its code is imported.

Why: in Flower 1.41 every ClientApp task installs the FAB (the app zip the coordinator submitted with
`flwr run`) and imports the ClientApp from it. A coordinator who ships a modified `client/` could send
un-noised weights; the school's privacy policy would be enforced by the very code it does not control.
Flower's own app verification (SuperNode `--trusted-entities`) accepts only FABs signed through the
Flower platform, which an offline district does not have. So the school's warm executor
(client/runtime/warm_executor.py) calls :func:`check_fab` in each task's process before Flower installs
and loads the FAB; a FAB that differs is refused and the task ends with that one-line reason.

What must match: every `.py` and `.yaml` file of fedfer's packages, byte for byte; no Python or YAML
file outside them except under `tests/`, `scripts/` and `configs/` (never imported or read by the app);
and the ClientApp the FAB's pyproject.toml names must be fedfer's `client.app:app`. Everything else in a FAB (README,
result JSON, the run-config defaults in pyproject.toml) is data the school's policy does not trust.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tomllib
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

APP_PACKAGES = ("client", "server", "shared_models", "privacy", "fedfer", "simulations")
NEVER_IMPORTED = ("tests", "scripts", "configs")   # configs/: YAML for `fedfer simulate --config`, never read by an app
CLIENTAPP = "client.app:app"
CHECKED_SUFFIXES = (".py", ".yaml", ".yml")


class UntrustedAppError(RuntimeError):
    """The shipped app is not the fedfer installed here; the message names the first file that differs."""


def installed_root() -> Path:
    """The folder holding this installation's fedfer packages (site-packages, or the checkout)."""
    spec = importlib.util.find_spec("shared_models")
    if spec is None or not spec.submodule_search_locations:
        raise UntrustedAppError("fedfer's packages are not installed here; cannot check the shipped app")
    return Path(list(spec.submodule_search_locations)[0]).resolve().parent


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, as :func:`check_fab` compares them."""
    return _digest(path.read_bytes())


def fab_holds_files(fab: bytes, files: Mapping[str, str]) -> bool:
    """True if the FAB has every file in `files` ({POSIX path: sha256}) with exactly that content."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = set(archive.namelist())
            return all(name in names and _digest(archive.read(name)) == digest for name, digest in files.items())
    except zipfile.BadZipFile:
        return False


def fab_differences(fab: bytes, root: Path) -> list[str]:
    """Every way the FAB differs from the installation at `root`, one line each ([] = the same app)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
    except zipfile.BadZipFile:
        return ["the shipped app is not a valid FAB (zip)"]
    problems: list[str] = []
    with archive:
        names = {info.filename for info in archive.infolist() if not info.is_dir()}
        for name in sorted(names):
            path = PurePosixPath(name)
            if path.is_absolute() or ".." in path.parts:
                problems.append(f"{name}: a path outside the app")
                continue
            top = path.parts[0]
            if path.suffix not in CHECKED_SUFFIXES or top in NEVER_IMPORTED:
                continue
            if top not in APP_PACKAGES:
                problems.append(f"{name}: code that is not part of fedfer")
                continue
            installed = root / Path(*path.parts)
            if not installed.is_file():
                problems.append(f"{name}: not in the fedfer installed here")
            elif _digest(archive.read(name)) != _digest(installed.read_bytes()):
                problems.append(f"{name}: differs from the fedfer installed here")
        for package in APP_PACKAGES:   # a file the installation has and the FAB dropped
            for installed in sorted((root / package).rglob("*.py")) if (root / package).is_dir() else []:
                name = installed.relative_to(root).as_posix()
                if "__pycache__" not in name and name not in names:
                    problems.append(f"{name}: missing from the shipped app")
        problems.extend(_component_problems(archive, names))
    return problems


def _component_problems(archive: zipfile.ZipFile, names: set[str]) -> list[str]:
    if "pyproject.toml" not in names:
        return ["pyproject.toml: missing from the shipped app"]
    try:
        project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [f"pyproject.toml: unreadable ({exc})"]
    component = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {}).get("clientapp")
    if component != CLIENTAPP:
        return [f"pyproject.toml: the ClientApp is {component!r}, not fedfer's {CLIENTAPP!r}"]
    return []


def check_fab(fab: bytes, root: Path | None = None) -> None:
    """Raise UntrustedAppError (naming the first difference and how many there are) unless `fab` is
    the fedfer installed at `root`."""
    problems = fab_differences(fab, root or installed_root())
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UntrustedAppError(f"refused the coordinator's app: {problems[0]}{more}; this school runs only "
                                "the fedfer it installed")


def guard_fab_install(run_clientapp_module: object, root: Path | None = None,
                      preloaded: Mapping[str, str] | None = None,
                      drop_preloaded: Callable[[], None] | None = None) -> None:
    """Make Flower's `run_clientapp` check every FAB before it installs (and later imports) it.

    `run_clientapp` calls its module's `install_from_fab(fab.content, …)` right after pulling the task;
    the check goes in front of that call, in the task's own process. `preloaded` ({file: sha256}) are
    the fedfer modules this process already imported (the warm executor's parent did): unless the FAB
    holds exactly those files, `drop_preloaded()` is called so the app is imported from the FAB."""
    original = run_clientapp_module.install_from_fab  # type: ignore[attr-defined]

    def install_checked(fab_content: bytes, *args: object, **kwargs: object) -> object:
        check_fab(fab_content, root)
        if preloaded and drop_preloaded is not None and not fab_holds_files(fab_content, preloaded):
            drop_preloaded()
        if not args and not kwargs.get("install_dir"):
            installed = installed_fab_dir(fab_content)
            if installed is not None:
                return installed
        return original(fab_content, *args, **kwargs)

    run_clientapp_module.install_from_fab = install_checked  # type: ignore[attr-defined]


def installed_fab_dir(fab: bytes) -> Path | None:
    """The folder where Flower already installed this FAB (FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>),
    or None if it is not installed yet.

    Why: Flower's `install_from_fab` extracts the whole FAB to a temp folder and re-hashes every file for
    each message (~0.13-0.3 s here), then, finding the folder already there, returns it without copying
    anything. Returning that folder directly is the same outcome without the extraction. The FAB's code
    was just compared file by file with this installation (`check_fab`)."""
    from flwr.common.config import get_metadata_from_config
    from flwr.common.constant import APP_DIR, FAB_HASH_TRUNCATION
    from flwr.supercore.utils import get_flwr_home

    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            config = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))
        fab_id, version = get_metadata_from_config(config)
        publisher, name = fab_id.split("/")
    except Exception:  # noqa: BLE001 - anything odd: let Flower's own install handle (and report) it
        return None
    folder = get_flwr_home() / APP_DIR / f"{publisher}.{name}.{version}.{_digest(fab)[:FAB_HASH_TRUNCATION]}"
    return folder if (folder / "pyproject.toml").is_file() else None
