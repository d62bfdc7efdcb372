"""Run directories named as the tutorial names them. Runtime: well under a second."""
from cbam_jax.logbook import latest_run_dir, next_run_dir


def test_run_dirs_are_suffixed_1_2_when_taken(tmp_path):
    base = str(tmp_path / "runs" / "CBAM_CNN_experiment")
    assert latest_run_dir(base) is None
    assert str(next_run_dir(base)) == base
    for expected in (base, f"{base}_1", f"{base}_2"):
        run_dir = next_run_dir(base)
        assert str(run_dir) == expected
        run_dir.mkdir(parents=True)
        assert latest_run_dir(base) == run_dir
