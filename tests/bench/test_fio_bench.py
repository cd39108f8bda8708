"""Unit tests for bench/fio_bench.py: the parts that need no mount (default run)."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

MiB = 1 << 20


def fio_json(read_bytes: int = 0, write_bytes: int = 0, *, error: int = 0, sync_n: int = 0) -> str:
    def side(n: int) -> dict:
        return {
            "io_bytes": n,
            "bw_bytes": n // 2,  # as if it took 2 s
            "iops": n / 4096 / 2,
            "runtime": 2000 if n else 0,
            "total_ios": n // 4096,
            "clat_ns": {"mean": 50_000.0, "percentile": {"99.000000": 120_000}},
        }

    job = {"jobname": "x", "error": error, "read": side(read_bytes), "write": side(write_bytes)}
    if sync_n:
        job["sync"] = {"lat_ns": {"N": sync_n, "mean": 2_000_000.0}}
    # fio prints notes before the JSON object sometimes
    return "fio: note: something\n" + json.dumps({"fio version": "fio-3.33", "jobs": [job]})


def test_parse_fio_read_bandwidth(fb: ModuleType) -> None:
    out = fb.parse_fio(fio_json(read_bytes=64 * MiB), "MiB/s")
    assert out["value"] == pytest.approx(32.0)
    assert out["ops"] == 64 * MiB // 4096
    assert out["lat_mean_us"] == pytest.approx(50.0)
    assert out["lat_p99_us"] == pytest.approx(120.0)


def test_parse_fio_write_iops_and_sync(fb: ModuleType) -> None:
    out = fb.parse_fio(fio_json(write_bytes=8 * MiB, sync_n=64), "IOPS")
    assert out["value"] == pytest.approx(8 * MiB / 4096 / 2)
    assert out["sync_mean_us"] == pytest.approx(2000.0)


@pytest.mark.parametrize(
    "text", ["no json at all", fio_json(read_bytes=MiB, error=5), fio_json(), '{"jobs": []}']
)
def test_parse_fio_errors(fb: ModuleType, text: str) -> None:
    with pytest.raises(ValueError):
        fb.parse_fio(text, "IOPS")


def test_job_table_covers_the_issue(fb: ModuleType) -> None:
    jobs = fb.build_jobs(512 * MiB, quick=False)
    names = {j.name for j in jobs}
    assert {"seqwrite-buf", "seqread-buf", "seqwrite-direct", "seqread-direct", "randread-nj1",
            "randread-nj4", "randwrite-buf", "randwrite-direct", "randwrite-fsync32"} <= names  # fmt: skip
    for layout in ("flat", "tree"):
        for phase in ("create", "stat_warm", "stat_cold", "readdir", "unlink"):
            assert f"{phase}-{layout}" in names
    for j in jobs:
        if j.is_fio:
            o = dict(j.fio)
            assert o["fallocate"] == "none"
            assert o["ioengine"] == "psync"
            assert len(o) == len(j.fio), f"{j.name}: an option given twice"
    by = {j.name: dict(j.fio) for j in jobs}
    assert by["seqwrite-buf"]["end_fsync"] == "1" and by["seqwrite-buf"]["bs"] == "1M"
    assert by["seqwrite-buf"]["size"] == str(512 * MiB)
    assert by["randread-nj4"]["numjobs"] == "4"
    assert by["randwrite-fsync32"]["fsync"] == "32"
    assert by["randwrite-direct"]["direct"] == "1"
    # random reads: a quarter of the file, 1 MiB aligned, inside it
    off, size = int(by["randread-nj1"]["offset"]), int(by["randread-nj1"]["size"])
    assert size == 128 * MiB and off % MiB == 0 and off + size <= 512 * MiB
    assert by["randread-nj1"]["offset"] == by["randread-nj4"]["offset"]
    targets = {j.name: j.target_ratio for j in jobs}
    assert targets["randread-nj4"] == 2.0 and targets["create-flat"] == 2.0 and targets["create-tree"] == 2.0
    assert targets["seqread-buf"] == 1.5
    assert all(r >= 1.0 for r in targets.values())


def test_same_fio_options_on_every_target(fb: ModuleType) -> None:
    for quick in (False, True):
        for j in fb.build_jobs(64 * MiB if quick else 512 * MiB, quick=quick):
            if not j.is_fio:
                continue
            lines = {t: fb.fio_args(j, f"/var/tmp/x/{t}/mnt") for t in fb.TARGETS}
            stripped = {
                t: tuple(a for a in args if not a.startswith("--directory=")) for t, args in lines.items()
            }
            assert len(set(stripped.values())) == 1, j.name
            for args in lines.values():
                # fio resolves --filename against the --directory seen so far
                assert args.index(next(a for a in args if a.startswith("--directory="))) < args.index(
                    f"--filename={fb.DATAFILE}"
                )


def test_quarter_offset_is_seeded(fb: ModuleType) -> None:
    assert fb.quarter_offset(512 * MiB, 1) == fb.quarter_offset(512 * MiB, 1)
    offs = {fb.quarter_offset(512 * MiB, s) for s in range(20)}
    assert len(offs) > 1 and all(o % MiB == 0 and o <= 384 * MiB for o in offs)


def test_parse_size(fb: ModuleType) -> None:
    assert fb.parse_size("512M") == 512 * MiB
    assert fb.parse_size("1.5G") == 3 * 512 * MiB
    assert fb.parse_size("4096") == 4096
    with pytest.raises(ValueError):
        fb.parse_size("lots")


def test_replace_section_keeps_the_rest(fb: ModuleType) -> None:
    doc = (
        "# Benchmarks\n\n<!-- ledger:begin -->\nL\n<!-- ledger:end -->\n\n"
        "<!-- fio:begin -->\nold\n<!-- fio:end -->\ntail\n"
    )
    out = fb.replace_section(doc, "new table\n")
    assert out == doc.replace("old", "new table")
    assert fb.replace_section(out, "new table") == out  # idempotent


def test_replace_section_appends_when_missing(fb: ModuleType) -> None:
    out = fb.replace_section("# B\ntext\n", "S")
    assert out == "# B\ntext\n\n<!-- fio:begin -->\nS\n<!-- fio:end -->\n"
    assert fb.replace_section("", "S") == "<!-- fio:begin -->\nS\n<!-- fio:end -->\n"


def _run(fb: ModuleType, values: dict[tuple[str, str], list[float]]) -> object:
    run = fb.Run()
    for (job, target), vals in values.items():
        for i, v in enumerate(vals):
            run.results.append(fb.Result(job, target, i, value=v))
    return run


def test_summary_line(fb: ModuleType) -> None:
    jobs = fb.build_jobs(64 * MiB, quick=True)
    vals: dict[tuple[str, str], list[float]] = {}
    for j in jobs:
        vals[(j.name, "fuse2fs")] = [100.0, 90.0, 110.0]
        vals[(j.name, "sovfs")] = [150.0, 140.0, 160.0]  # 1.5x everywhere ...
    vals[("randread-nj4", "sovfs")] = [250.0, 10.0, 300.0]  # median 250 -> 2.5
    vals[("create-flat", "sovfs")] = [120.0, 130.0, 110.0]  # 1.2
    vals[("create-tree", "sovfs")] = [300.0, 300.0, 300.0]  # 3.0
    vals[("unlink-tree", "sovfs")] = [80.0, 70.0, 75.0]  # 0.75: the minimum
    run = _run(fb, vals)
    assert (
        fb.summary_line(run, jobs)
        == "fio-vs-fuse2fs min_ratio=0.75 randread_nj4_ratio=2.50 create_ratio=1.20"
    )


def test_summary_line_without_sovfs(fb: ModuleType) -> None:
    jobs = fb.build_jobs(64 * MiB, quick=True)
    run = _run(fb, {(j.name, "fuse2fs"): [1.0] for j in jobs})
    assert (
        fb.summary_line(run, jobs) == "fio-vs-fuse2fs min_ratio=nan randread_nj4_ratio=nan create_ratio=nan"
    )


def test_median_spread_and_failed_reps(fb: ModuleType) -> None:
    run = _run(fb, {("j", "sovfs"): [3.0, 1.0, 2.0]})
    run.results.append(fb.Result("j", "sovfs", 3, error="boom"))
    assert fb.median_spread(run.values("j", "sovfs")) == (2.0, 1.0, 3.0)
    assert fb.median_spread([]) is None


def test_meta_phases_on_a_directory(fb: ModuleType, tmp_path: Path) -> None:
    for layout in ("flat", "tree"):
        dirs, files = fb.meta_paths(tmp_path, 300, layout)
        assert len(files) == 300 and len(set(files)) == 300
        secs, ops = fb.meta_phase("create", tmp_path, 300, layout)
        assert ops == 300 and secs > 0
        assert all(f.stat().st_size == fb.META_FILE_BYTES for f in files)
        assert fb.meta_phase("stat_warm", tmp_path, 300, layout)[1] == 300
        assert fb.meta_phase("readdir", tmp_path, 300, layout)[1] == 300 + len(dirs) - 1
        assert fb.meta_phase("unlink", tmp_path, 300, layout)[1] == 300
        assert not (tmp_path / f"meta-{layout}").exists()
    _, files = fb.meta_paths(tmp_path, 10_000, "tree")
    assert len({f.parent for f in files}) == 100 and all(
        len(f.relative_to(tmp_path).parts) == 4 for f in files
    )


def test_render_markdown_and_plots(fb: ModuleType, tmp_path: Path) -> None:
    args = fb.parse_args(["--quick", "--targets", "sovfs,fuse2fs,host"])
    jobs = fb.build_jobs(args.size_bytes, quick=True)
    run = _run(fb, {(j.name, t): [10.0, 12.0] for j in jobs for t in ("sovfs", "fuse2fs", "host")})
    run.mount_times = {"cold_s": 9.0, "warm_s": 0.8, "warm_all": [0.8]}
    run.failed_targets["host"] = "setup/mount failed: test"
    plots = fb.make_plots(run, jobs, args.targets, tmp_path)
    assert len(plots) == 4 and all(Path(p).stat().st_size > 1000 for p in plots)
    summary = fb.summary_line(run, jobs)
    md = fb.render_markdown(run, jobs, args, plots, summary)
    assert summary in md and "host failed" in md and "warm 0.80 s" in md
    assert md.count("| 1.00 | ≥") == len(jobs)


def test_cli_usage_errors(fb: ModuleType) -> None:
    with pytest.raises(SystemExit):
        fb.parse_args(["--targets", "zfs"])
    a = fb.parse_args([])
    assert (a.reps, a.files, a.size_bytes, a.image_size) == (3, 10_000, 512 * MiB, 1536 * MiB)
    q = fb.parse_args(["--quick"])
    assert (q.reps, q.files, q.size_bytes) == (1, 1000, 64 * MiB)


def test_missing_tool_message(
    fb: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(fb.shutil, "which", lambda name: None if name == "fuse2fs" else "/usr/bin/" + name)
    assert fb.main(["--quick", "--targets", "fuse2fs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fuse2fs" in err[0]


def test_summarize_profile(fb: ModuleType, tmp_path: Path) -> None:
    p = tmp_path / "job.txt"
    p.write_text(
        'process 1:"python";main (sovfs/mount.py:10);read (/x/sovfs/fuse_ops.py:200) 30\n'
        "thread (0x1);run (ledger/device.py:5);_poll (/x/ledger/device.py:77) 60\n"
        "thread (0x1);run (ledger/device.py:5);_poll (/x/ledger/device.py:78) 10\n"
        "garbage line\n"
    )
    top = fb.summarize_profile(p)
    assert top[0] == ("_poll (device.py)", pytest.approx(70.0))
    assert top[1] == ("read (fuse_ops.py)", pytest.approx(30.0))


def test_job_blocks_keep_metadata_phases_together(fb: ModuleType) -> None:
    jobs = fb.build_jobs(64 * MiB, quick=True)
    blocks = fb.job_blocks(jobs)
    assert [b[0] for b in blocks] == [j for j in jobs if j.is_fio or j.meta[0] == "create"]
    meta = [[j.name for j in b] for b in blocks if b[0].meta]
    assert meta == [[f"{p}-{layout}" for p in fb.META_PHASES] for layout in fb.META_LAYOUTS]
    assert sum(len(b) for b in blocks) == len(jobs)


def test_schedule_rotates_the_targets_so_each_takes_each_place(fb: ModuleType) -> None:
    jobs = fb.build_jobs(64 * MiB, quick=True)
    blocks = fb.job_blocks(jobs)
    order = list(fb.schedule(blocks, ["sovfs", "fuse2fs", "host"], 3))
    assert len(order) == len(jobs) * 3 * 3
    # every (job, repetition, target) exactly once
    assert len({(j.name, rep, t) for rep, j, t in order}) == len(order)
    first = blocks[0][0]
    per_rep = [[t for rep, j, t in order if j is first and rep == r] for r in range(3)]
    assert per_rep == [
        ["sovfs", "fuse2fs", "host"],
        ["fuse2fs", "host", "sovfs"],
        ["host", "sovfs", "fuse2fs"],
    ]
    # a metadata block keeps its phases in order within a repetition, for every target
    meta = next(b for b in blocks if b[0].meta)
    for r in range(3):
        names = [j.name for rep, j, t in order if rep == r and j in meta and t == "host"]
        assert names == [j.name for j in meta]
