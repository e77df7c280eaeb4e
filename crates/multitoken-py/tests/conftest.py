"""Paths the tests share: the repository's committed demo model and samples, the
parity fixtures, and the `multitoken` CLI binary the parity tests compare with."""

import os
import pathlib
import shutil

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo-model"
SHAPES = ROOT / "examples" / "shapes"
FIXTURES = ROOT / "tests" / "fixtures"


def cli_binary():
    """`$MULTITOKEN_CLI`, else the debug binary in the workspace's target dir."""
    given = os.environ.get("MULTITOKEN_CLI")
    if given:
        return given
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    built = target / "debug" / "multitoken"
    if built.is_file():
        return str(built)
    return shutil.which("multitoken")


@pytest.fixture(scope="session")
def cli():
    binary = cli_binary()
    if binary is None:
        # CI sets MULTITOKEN_REQUIRE_CLI after `cargo test --workspace` built it.
        if os.environ.get("MULTITOKEN_REQUIRE_CLI"):
            pytest.fail("no multitoken CLI binary (set MULTITOKEN_CLI or build it with cargo build -p multitoken)")
        pytest.skip("no multitoken CLI binary to compare with (cargo build -p multitoken)")
    return binary


@pytest.fixture(scope="session")
def demo():
    import multitoken

    return multitoken.Model.load(DEMO)
