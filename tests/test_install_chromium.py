"""scripts/install_chromium.sh (run by `scripts/install.sh --dev`) against stub commands on a private PATH: it
installs with apt-get as root or through passwordless sudo, does nothing when Chromium is there, and otherwise
says how to install it without failing."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install_chromium.sh"
TOOLS = ("env",)  # the real commands the script needs besides the stubs


def stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.unlink(missing_ok=True)  # never write through a link to a real command
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


@pytest.fixture
def sandbox(tmp_path):
    """A PATH holding only a copy of `env` and the stubs a test adds; apt-get's stub logs its arguments and, on install,
    puts chromium and chromedriver stubs on that PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        shutil.copy(shutil.which(tool), bin_dir / tool)
    log = tmp_path / "calls.log"
    install = f'printf "#!/bin/bash\\n" > {bin_dir}/chromium; printf "#!/bin/bash\\n" > {bin_dir}/chromedriver; ' \
              f'/bin/chmod +x {bin_dir}/chromium {bin_dir}/chromedriver'
    stub(bin_dir, "apt-get", f'echo "apt-get $*" >> {log}; case " $* " in *" install "*) {install};; esac')
    return bin_dir, log


def run(bin_dir: Path, uid: int) -> subprocess.CompletedProcess:
    stub(bin_dir, "id", f"echo {uid}")  # the script asks `id -u`
    env = {"PATH": str(bin_dir), "HOME": str(bin_dir.parent)}
    return subprocess.run(["/bin/bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_root_installs_both_packages_once(sandbox):
    bin_dir, log = sandbox
    first = run(bin_dir, uid=0)
    assert first.returncode == 0, first.stderr
    assert calls(log) == ["apt-get -qq update",
                          "apt-get -qq install -y --no-install-recommends chromium chromium-driver"]
    assert os.access(bin_dir / "chromium", os.X_OK) and os.access(bin_dir / "chromedriver", os.X_OK)
    again = run(bin_dir, uid=0)  # idempotent: both present now, so apt-get is not called again
    assert again.returncode == 0 and again.stdout == again.stderr == ""
    assert len(calls(log)) == 2


def test_passwordless_sudo_is_used_when_not_root(sandbox):
    bin_dir, log = sandbox
    stub(bin_dir, "sudo", f'echo "sudo $*" >> {log}; [ "$1" = -n ] && shift; [ "$1" = true ] && exit 0; exec "$@"')
    done = run(bin_dir, uid=1000)
    assert done.returncode == 0, done.stderr
    assert calls(log) == ["sudo -n true",
                          "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -qq update",
                          "apt-get -qq update",
                          "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get -qq install -y --no-install-recommends "
                          "chromium chromium-driver",
                          "apt-get -qq install -y --no-install-recommends chromium chromium-driver"]


def test_without_root_it_says_how_and_succeeds(sandbox):
    bin_dir, log = sandbox
    stub(bin_dir, "sudo", "exit 1")  # sudo that would ask for a password
    done = run(bin_dir, uid=1000)
    assert done.returncode == 0
    assert calls(log) == []
    assert "apt-get install chromium chromium-driver" in done.stderr and "needs root" in done.stderr


def test_failed_apt_get_fails_loudly(sandbox):
    bin_dir, log = sandbox
    stub(bin_dir, "apt-get", 'echo "E: no network" >&2; exit 100')
    done = run(bin_dir, uid=0)
    assert done.returncode == 1
    assert "E: no network" in done.stderr and "could not install chromium chromium-driver" in done.stderr
