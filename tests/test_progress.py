"""Progress bars in logs: plain lines, not every in-place redraw."""

import io

from dd3d.progress import tqdm


def test_a_bar_in_a_log_writes_lines_not_redraws():
    log = io.StringIO()
    progress = tqdm(range(1000), desc="learn", file=log)
    for step in progress:
        progress.set_postfix(loss=f"{step:.4f}")  # the training loops set one every step
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("learn: 100%") and "1000/1000" in lines[-1]
