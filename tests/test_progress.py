from fedpsg.io.progress import Progress


def test_progress_lines_are_throttled_and_carry_step_elapsed_and_eta():
    now = [0.0]
    lines: list[str] = []
    progress = Progress("[party 1] psg stage 2", 10, interval=5.0, write=lines.append, clock=lambda: now[0])
    for _ in range(4):  # 4 steps, one per second: nothing yet (interval 5 s)
        now[0] += 1.0
        progress.step()
    assert lines == []
    now[0] += 1.0
    progress.step()  # 5 s since the start: one line, 5 of 10 done, 5 s to go
    assert lines == ["[party 1] psg stage 2: step 5/10 (50%), 5 s elapsed, ETA 5 s"]
    for _ in range(5):
        now[0] += 0.25
        progress.step()
    assert lines[-1] == "[party 1] psg stage 2: step 10/10 (100%), 6 s elapsed, done"  # the last step always prints
    assert len(lines) == 2
