"""A school runs the fedfer it installed (issue 12): the warm executor refuses a shipped FAB that
differs from the installation, before any of its code is imported."""

from __future__ import annotations

import io
import zipfile

import pytest

from client.runtime.app_check import (APP_PACKAGES, UntrustedAppError, check_fab, fab_differences,
                                      guard_fab_install, installed_root)

ROOT = installed_root()


def _fab(change: dict[str, bytes | None] | None = None) -> bytes:
    """A FAB of this installation (what `flwr run .` ships), with `change`: path -> new bytes (None drops it)."""
    files = {p.relative_to(ROOT).as_posix(): p.read_bytes()
             for pkg in APP_PACKAGES for p in (ROOT / pkg).rglob("*")
             if p.is_file() and p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts}
    files["pyproject.toml"] = (ROOT / "pyproject.toml").read_bytes()
    files["README.md"] = b"# anything"
    for name, data in (change or {}).items():
        if data is None:
            files.pop(name, None)
        else:
            files[name] = data
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(files.items()):
            archive.writestr(name, data)
    return buffer.getvalue()


def test_the_installed_app_passes():
    assert fab_differences(_fab(), ROOT) == []
    check_fab(_fab(), ROOT)


def test_flowers_own_fab_of_this_checkout_passes():
    from flwr.cli.build import build_fab_from_disk

    assert fab_differences(build_fab_from_disk(ROOT), ROOT) == []


@pytest.mark.parametrize("change, named", [
    ({"client/school_round.py": b"# sends un-noised weights\n"}, "client/school_round.py: differs"),
    ({"privacy/engine.py": None}, "privacy/engine.py: missing from the shipped app"),
    ({"shared_models/defaults.yaml": b"privacy:\n  budget: 1000\n"}, "shared_models/defaults.yaml: differs"),
    ({"client/extra.py": b"print('hi')\n"}, "client/extra.py: not in the fedfer installed here"),
    ({"tomli_w.py": b"import os\n"}, "tomli_w.py: code that is not part of fedfer"),
    ({"pyproject.toml": (ROOT / "pyproject.toml").read_bytes().replace(b'"client.app:app"', b'"evil:app"')},
     "the ClientApp is 'evil:app'"),
    ({"../escape.py": b"x = 1\n"}, "a path outside the app"),
])
def test_a_changed_app_is_refused_naming_the_file(change, named):
    with pytest.raises(UntrustedAppError, match="refused the coordinator's app") as caught:
        check_fab(_fab(change), ROOT)
    assert named in "\n".join(fab_differences(_fab(change), ROOT))
    assert "\n" not in str(caught.value)


def test_files_that_are_never_imported_are_not_checked():
    assert fab_differences(_fab({"tests/test_x.py": b"anything", "benchmarks/x.json": b"{}", "configs/district.yaml": b"a: 1"}), ROOT) == []


def test_not_a_zip_is_refused():
    assert fab_differences(b"not a zip", ROOT) == ["the shipped app is not a valid FAB (zip)"]


def test_the_guard_checks_before_flower_installs():
    class FakeRuntime:
        installed: list[bytes] = []

        @staticmethod
        def install_from_fab(content, skip_prompt=False):
            FakeRuntime.installed.append(content)

    guard_fab_install(FakeRuntime, ROOT)
    bad = _fab({"client/app.py": b"# changed\n"})
    with pytest.raises(UntrustedAppError):
        FakeRuntime.install_from_fab(bad, skip_prompt=True)
    assert FakeRuntime.installed == []          # nothing of the shipped app reached the disk
    good = _fab()
    FakeRuntime.install_from_fab(good, skip_prompt=True)
    assert FakeRuntime.installed == [good]


def test_preloaded_modules_are_kept_only_for_a_fab_of_exactly_their_files():
    from client.runtime.app_check import fab_holds_files, sha256_file

    preloaded = {name: sha256_file(ROOT / name) for name in ("client/app.py", "privacy/engine.py")}
    assert fab_holds_files(_fab(), preloaded)
    assert not fab_holds_files(_fab({"privacy/engine.py": None}), preloaded)
    assert not fab_holds_files(b"not a zip", preloaded)

    class FakeRuntime:
        @staticmethod
        def install_from_fab(content, skip_prompt=False):
            return content

    dropped: list[bool] = []
    guard_fab_install(FakeRuntime, ROOT, preloaded=preloaded, drop_preloaded=lambda: dropped.append(True))
    FakeRuntime.install_from_fab(_fab(), skip_prompt=True)
    assert dropped == []                        # the FAB is the code the parent preloaded: kept
    # the installation changed after the executor preloaded it: the FAB (= the disk) is not that code
    stale = {**preloaded, "client/app.py": "0" * 64}
    guard_fab_install(FakeRuntime, ROOT, preloaded=stale, drop_preloaded=lambda: dropped.append(True))
    FakeRuntime.install_from_fab(_fab(), skip_prompt=True)
    assert dropped == [True]
