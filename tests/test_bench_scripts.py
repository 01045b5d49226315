"""The bench/*.sh entry points: valid bash, a usage text (exit 2) that lists exactly the stages each script handles,
a clear line when the QS-2 shards are missing, and nothing tied to one particular machine."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from conftest import REPO

SCRIPTS = ["perf.sh", "fa4.sh", "quant.sh", "frontier.sh"]


def bash(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=env or dict(os.environ))


@pytest.mark.parametrize("name", SCRIPTS)
def test_usage_lists_exactly_the_stages_the_script_handles(name, tmp_path):
    script = REPO / "bench" / name
    assert bash("-n", script).returncode == 0
    r = bash(script, env=dict(os.environ, RESULTS=str(tmp_path)))
    assert r.returncode == 2
    listed = set(re.findall(rf"bash bench/{re.escape(name)} ([a-z][a-z0-9-]*)", r.stdout))
    labels = re.findall(r"^  ([a-z][a-z0-9|-]*)\)(?: +#.*)?$", script.read_text(), re.M)
    handled = {stage for label in labels for stage in label.split("|")}
    assert listed and listed == handled, (listed, handled)


@pytest.mark.parametrize("cmd", [("quant.sh", "short"), ("frontier.sh", "pair", "1")])
def test_missing_qs2_shards_are_one_line(cmd, tmp_path):
    r = bash(REPO / "bench" / cmd[0], *cmd[1:], env={"PATH": "/usr/bin:/bin", "QS2_DATA": str(tmp_path / "none"),
                                                          "RESULTS": str(tmp_path)})
    assert r.returncode == 1 and r.stderr.strip() == (f"no QS-2 shards in {tmp_path / 'none'}: build them with python "
                                                      f"data/build_qs2.py {tmp_path / 'none'}, or set QS2_DATA")


def test_bench_speaks_of_a_users_machine_only():
    text = "\n".join(p.read_text() for p in sorted((REPO / "bench").iterdir()) if p.is_file())
    for word in (r"\.carry", r"\$OUT\b", r"\blent\b", r"\bsessions?\b"):
        assert not re.search(word, text), word
