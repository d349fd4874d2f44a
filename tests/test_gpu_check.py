"""bench/gpu_check.sh, cheaply: its syntax, and that its step caps fit the device call its header gives. The dry
run itself (DRY_RUN=1 bash bench/gpu_check.sh DIR, a minute or more) is too slow for CI and is run by hand."""

import os
import re
import shutil
import subprocess

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, 'bench', 'gpu_check.sh')


@pytest.mark.skipif(shutil.which('bash') is None, reason='no bash')
def test_script_parses():
    p = subprocess.run(['bash', '-n', SCRIPT], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_step_caps_fit_the_device_call():
    """The caps are what bounds the script's wall time; with their 5 s kill grace and the summaries between
    steps (about a second each, some 15 of them) they must end inside the timeout_s the header tells the
    device tool (at most 600 s a command)."""
    with open(SCRIPT) as f:
        text = f.read()
    caps = {name: int(v) for name, v in re.findall(r'^(CAP_\w+)="\$\{CAP_\w+:-(\d+)\}"$', text, re.M)}
    assert set(caps) == {'CAP_ENV', 'CAP_TESTS', 'CAP_BENCH', 'CAP_TRAIN', 'CAP_COMPARE'}, caps
    timeout_s = int(re.search(r'^#\s+timeout_s:\s+(\d+)$', text, re.M).group(1))
    assert timeout_s <= 600
    assert sum(caps.values()) + 5 * len(caps) + 20 <= timeout_s, (caps, timeout_s)
    assert f'add up to {sum(caps.values())} s' in text                  # the header says what the caps add up to
    carry = re.search(r'^#\s+carry:\s+(\[.*\])$', text, re.M).group(1)
    assert '"data/tinystories/train.bin"' in carry and '"data/tinystories/val.bin"' in carry
