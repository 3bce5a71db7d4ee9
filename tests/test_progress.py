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


def test_the_eta_leaves_out_setup_before_the_first_step():
    now = [0.0]
    lines: list[str] = []
    progress = Progress("dpmepf", 101, interval=0.0, write=lines.append, clock=lambda: now[0])
    now[0] = 100.0  # a feature network trained before any step
    progress.step()
    now[0] += 10.0  # then 10 steps in 10 s: 90 to go at 1 s each
    progress.step(10)
    assert lines[-1] == "dpmepf: step 11/101 (11%), 110 s elapsed, ETA 90 s"


def test_work_done_again_extends_the_total_and_a_note_carries_the_label():
    now = [0.0]
    lines: list[str] = []
    progress = Progress("[party 3] dpmerf stage 1", 4, interval=0.0, write=lines.append, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 1.0
        progress.step()
    assert lines[-1].endswith("step 4/4 (100%), 4 s elapsed, done")
    progress.note("fitting it again")
    progress.extend(4)
    now[0] += 1.0
    progress.step()
    assert lines[-2:] == [
        "[party 3] dpmerf stage 1: fitting it again",
        "[party 3] dpmerf stage 1: step 5/8 (62%), 5 s elapsed, ETA 3 s",
    ]
