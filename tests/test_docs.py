"""README.md, docs/ and the studies' write-ups: every relative link and image path points at a file of the repo, and
README stays the short front page it is meant to be."""

import glob
import os
import re

from conftest import REPO

PAGES = sorted([os.path.join(REPO, 'README.md')] + glob.glob(os.path.join(REPO, 'docs', '*.md'))
               + glob.glob(os.path.join(REPO, 'results', '*', 'README.md')) + [os.path.join(REPO, 'bench/RESULTS.md')])
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')          # [text](target) and ![alt](image)


def relative_targets(text: str) -> list[str]:
    """The link and image targets of a markdown text that point into the repo (not web addresses or anchors)."""
    return [t.split('#')[0] for t in LINK.findall(text) if not re.match(r'[a-z]+:', t) and not t.startswith('#')]


def test_relative_targets_by_hand():
    text = "[a](docs/x.md) ![f](results/cpu/val_loss.png) [w](https://x.org/a.md) [s](#top) [b](../y.md#part)"
    assert relative_targets(text) == ['docs/x.md', 'results/cpu/val_loss.png', '../y.md']


def test_every_relative_link_and_image_exists():
    assert len(PAGES) > 10
    missing = []
    for page in PAGES:
        with open(page) as f:
            for target in relative_targets(f.read()):
                if not os.path.exists(os.path.normpath(os.path.join(os.path.dirname(page), target))):
                    missing.append(f"{os.path.relpath(page, REPO)} -> {target}")
    assert not missing, missing


def test_readme_is_at_most_15000_characters():
    with open(os.path.join(REPO, 'README.md')) as f:
        assert len(f.read()) <= 15_000
