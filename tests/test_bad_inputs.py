"""Catalogue of bad (and unusual but valid) inputs for every command.

Each bad case asserts: the exit status, a one-line message naming the file or key, no
traceback, the inputs unchanged (hash of every input file) and no partial output.  Commands
run in-process (``main(argv)``) for speed; signals and hangs are tested with subprocesses in
tests/test_faults.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qsmflow.sims.bids import write_bids_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPE = (16, 16, 16)
TE = (0.004, 0.008)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _hashes(root: Path) -> dict:
    if root.is_file():
        return {str(root): hashlib.sha256(root.read_bytes()).hexdigest()}
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _call(main, argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _assert_clean(rc, text, expect_rc, needles):
    assert rc == expect_rc, text
    assert "Traceback" not in text, text
    for n in needles:
        assert n in text, f"{n!r} not in:\n{text}"


@pytest.fixture(scope="module")
def bids_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    return write_bids_dataset(
        root / "bids", subjects=("01",), shape=SHAPE, voxel_size=(4.0, 4.0, 4.0), te_s=TE, snr=50.0
    )


def _anat(bids):
    return bids / "sub-01" / "anat"


def _img(bids, part, echo):
    return _anat(bids) / f"sub-01_echo-{echo}_part-{part}_MEGRE.nii.gz"


def _side(bids, part, echo):
    return _anat(bids) / f"sub-01_echo-{echo}_part-{part}_MEGRE.json"


def _set_meta(key, value, part="phase", echo=1):
    def mutate(bids, tmp):
        p = _side(bids, part, echo)
        meta = json.loads(p.read_text())
        if value is _DELETE:
            del meta[key]
        else:
            meta[key] = value
        p.write_text(json.dumps(meta))
        return [p.name, key]

    return mutate


_DELETE = object()


def _write_text(rel, text):
    def mutate(bids, tmp):
        p = bids / rel if not callable(rel) else rel(bids)
        p.write_text(text)
        return [p.name]

    return mutate


def _truncate(part, echo):
    def mutate(bids, tmp):
        p = _img(bids, part, echo)
        raw = p.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return [p.name, "truncated"]

    return mutate


def _replace_data(part, echo, fn, *, dtype=np.float32):
    def mutate(bids, tmp):
        p = _img(bids, part, echo)
        img = nib.load(p)
        data = fn(np.asarray(img.dataobj, dtype=np.float64), bids)
        nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), img.affine), p)
        return [p.name]

    return mutate


def _swap(bids, tmp):
    for e in (1, 2):
        a, b = _img(bids, "phase", e), _img(bids, "mag", e)
        tmpf = a.with_suffix(".tmp")
        a.rename(tmpf)
        b.rename(a)
        tmpf.rename(b)
    return ["swapped"]


def _nan_block(d, bids):
    d = d.copy()
    d[6:10, 6:10, 6:10] = np.nan
    return d


def _inf(d, bids):
    d = d.copy()
    d[8, 8, 8] = np.inf
    return d


def _drop(part, echo):
    def mutate(bids, tmp):
        _img(bids, part, echo).unlink()
        _side(bids, part, echo).unlink()
        return []

    return mutate


def _noop(bids, tmp):
    return []


# (case id, mutation of the copied dataset, extra argv (may use {tmp}/{bids}), exit status,
#  expected message parts; mutation returns further expected parts)
QSMFLOW_CASES = [
    ("b0-millitesla", _set_meta("MagneticFieldStrength", 3000), [], 2, ["millitesla"]),
    ("b0-string", _set_meta("MagneticFieldStrength", "3T"), [], 2, ["not a number"]),
    ("b0-zero", _set_meta("MagneticFieldStrength", 0), [], 2, ["must be positive"]),
    ("b0-missing", _set_meta("MagneticFieldStrength", _DELETE), [], 2, ["missing"]),
    ("te-milliseconds", _set_meta("EchoTime", 4.0), [], 2, ["milliseconds"]),
    ("te-string", _set_meta("EchoTime", "4ms"), [], 2, ["not a number"]),
    ("te-negative", _set_meta("EchoTime", -0.004), [], 2, ["not an echo time"]),
    ("te-list", _set_meta("EchoTime", [0.004, 0.008]), [], 2, ["one number per echo"]),
    (
        "te-not-increasing",
        lambda b, t: _set_meta("EchoTime", 0.02)(b, t)[1:],
        [],
        2,
        ["do not increase"],
    ),
    ("te-missing", _set_meta("EchoTime", _DELETE), [], 2, ["EchoTime missing"]),
    (
        "sidecar-invalid-json",
        _write_text(lambda b: _side(b, "phase", 2), "{EchoTime: 0.008"),
        [],
        2,
        ["not valid JSON"],
    ),
    (
        "sidecar-json-array",
        _write_text(lambda b: _side(b, "mag", 1), "[1, 2]"),
        [],
        2,
        ["must be an object"],
    ),
    (
        "description-invalid-json",
        _write_text("dataset_description.json", "{"),
        [],
        2,
        ["dataset_description.json", "not valid JSON"],
    ),
    ("phase-truncated-gz", _truncate("phase", 1), [], 2, []),
    ("magnitude-truncated-gz", _truncate("mag", 2), [], 2, []),
    (
        "phase-not-nifti",
        _write_text(lambda b: _img(b, "phase", 2), "hello"),
        [],
        2,
        ["cannot read phase"],
    ),
    ("magnitude-all-zero", _replace_data("mag", 1, lambda d, b: 0 * d), [], 2, ["all zero"]),
    ("phase-magnitude-swapped", _swap, [], 2, ["swapped?"]),
    ("phase-nan-block", _replace_data("phase", 1, _nan_block), [], 2, ["NaN or infinite"]),
    ("magnitude-inf", _replace_data("mag", 2, _inf), [], 2, ["NaN or infinite"]),
    (
        "phase-all-nan",
        _replace_data("phase", 2, lambda d, b: d * np.nan),
        [],
        2,
        ["NaN or infinite"],
    ),
    (
        "phase-not-radians",
        _replace_data("phase", 1, lambda d, b: d + 100.5),
        [],
        2,
        ["neither radians"],
    ),
    (
        "phase-shape-mismatch",
        _replace_data("phase", 2, lambda d, b: d[:8]),
        [],
        2,
        ["does not match"],
    ),
    (
        "magnitude-4d",
        _replace_data("mag", 1, lambda d, b: np.stack([d, d], -1)),
        [],
        2,
        ["must be 3D"],
    ),
    ("phase-echo-missing", _drop("phase", 1), [], 2, ["missing"]),
    ("magnitude-echo-missing", _drop("mag", 2), [], 2, ["do not match phase echoes"]),
    ("participant-bad-label", _noop, ["--participant-label", "!!"], 2, ["invalid label"]),
    ("participant-not-found", _noop, ["--participant-label", "09"], 2, ["sub-09 not found"]),
    ("session-not-found", _noop, ["--session-label", "pre"], 2, ["no *_MEGRE"]),
    (
        "no-dataset-description",
        lambda b, t: (b / "dataset_description.json").unlink() or [],
        [],
        2,
        ["not a BIDS dataset"],
    ),
    ("no-megre-images", lambda b, t: shutil.rmtree(b / "sub-01") or [], [], 2, ["no *_MEGRE"]),
    ("mem-bad", _noop, ["--mem", "lots"], 2, ["invalid memory"]),
    ("nprocs-zero", _noop, ["--nprocs", "0"], 2, ["positive integer"]),
    ("unknown-preset", _noop, ["--preset", "nope"], 2, ["unknown preset"]),
    ("unknown-method", _noop, ["--inversion", "magic"], 2, ["unknown method 'magic'"]),
]


def _file(tmp, name, text):
    p = tmp / name
    p.write_text(text)
    return p


# argv-level cases: (id, function tmp -> (argv after bids_dir, expected parts)), exit 2
def _argv_cases():
    def out_is_file(tmp):
        f = _file(tmp, "out.txt", "x")
        return [f, "participant"], ["output_dir is a file"]

    def out_under_file(tmp):
        f = _file(tmp, "out.txt", "x")
        return [f / "deriv", "participant"], ["out.txt is a file"]

    def work_is_file(tmp):
        f = _file(tmp, "work.txt", "x")
        return [tmp / "out", "participant", "-w", f], ["work directory (-w) is a file"]

    def work_under_file(tmp):
        f = _file(tmp, "work.txt", "x")
        return [tmp / "out", "participant", "-w", f / "w"], ["work.txt is a file"]

    def cfg(text, needles):
        def make(tmp):
            return (
                [tmp / "out", "participant", "--config-file", _file(tmp, "c.toml", text)],
                ["c.toml", *needles],
            )

        return make

    def plugin(text, needles):
        def make(tmp):
            return (
                [tmp / "out", "participant", "--use-plugin", _file(tmp, "p.yml", text)],
                ["p.yml", *needles],
            )

        return make

    return [
        ("output-dir-is-file", out_is_file),
        ("output-dir-under-file", out_under_file),
        ("work-dir-is-file", work_is_file),
        ("work-dir-under-file", work_under_file),
        (
            "config-setting-wrong-type",
            cfg(
                '[invert]\nmethod = "rts"\n[invert.rts]\ndelta = "big"\n',
                ["delta", "expected a number"],
            ),
        ),
        ("config-seed-wrong-type", cfg('[execution]\nseed = "zero"\n', ["seed", "integer"])),
        ("config-device-unknown", cfg('[execution]\ndevice = "tpu"\n', ["device"])),
        ("config-unknown-execution-key", cfg("[execution]\nthreads = 2\n", ["threads"])),
        ("config-invalid-toml", cfg("[invert\nmethod = rts\n", ["not valid TOML"])),
        ("config-method-not-string", cfg("[invert]\nmethod = 3\n", ["expected a method"])),
        (
            "config-unknown-setting",
            cfg(
                '[bfr]\nmethod = "vsharp"\n[bfr.vsharp]\nradius = 3\n',
                ["unknown parameter 'radius'"],
            ),
        ),
        (
            "config-missing",
            lambda tmp: (
                [tmp / "out", "participant", "--config-file", tmp / "none.toml"],
                ["not found"],
            ),
        ),
        ("plugin-unknown", plugin("plugin: Turbo\n", ["not a Nipype plugin"])),
        ("plugin-invalid-yaml", plugin("plugin: [MultiProc\n", ["not valid YAML"])),
        ("plugin-no-plugin-key", plugin("plugin_args: {}\n", ["needs a 'plugin:' key"])),
        (
            "plugin-nprocs-zero",
            plugin("plugin: MultiProc\nplugin_args:\n  n_procs: 0\n", ["n_procs"]),
        ),
        (
            "plugin-args-not-mapping",
            plugin("plugin: MultiProc\nplugin_args: [1]\n", ["must be a mapping"]),
        ),
        (
            "plugin-missing",
            lambda tmp: (
                [tmp / "out", "participant", "--use-plugin", tmp / "none.yml"],
                ["plugin file not found"],
            ),
        ),
    ]


ARGV_CASES = _argv_cases()


def _copy_bids(bids_base, tmp_path):
    bids = tmp_path / "bids"
    shutil.copytree(bids_base, bids)
    return bids


@pytest.mark.parametrize("case", QSMFLOW_CASES, ids=[c[0] for c in QSMFLOW_CASES])
def test_qsmflow_bad_dataset(case, bids_base, tmp_path, capsys):
    from qsmflow.cli.run import main

    _, mutate, extra, expect_rc, needles = case
    bids = _copy_bids(bids_base, tmp_path)
    needles = list(needles) + list(mutate(bids, tmp_path) or [])
    before = _hashes(bids)
    out, work = tmp_path / "out", tmp_path / "work"
    rc, text = _call(main, [bids, out, "participant", "-w", work, *extra], capsys)
    _assert_clean(rc, text, expect_rc, needles)
    assert _hashes(bids) == before  # the input dataset is never modified
    assert not out.exists() and not work.exists()  # nothing was run or written


@pytest.mark.parametrize("case", ARGV_CASES, ids=[c[0] for c in ARGV_CASES])
def test_qsmflow_bad_arguments(case, bids_base, tmp_path, capsys):
    from qsmflow.cli.run import main

    bids = _copy_bids(bids_base, tmp_path)
    argv, needles = case[1](tmp_path)
    before = _hashes(tmp_path)
    rc, text = _call(
        main, [bids, *argv, *(["-w", tmp_path / "w"] if "-w" not in argv else [])], capsys
    )
    _assert_clean(rc, text, 2, needles)
    assert _hashes(tmp_path) == before  # nothing written anywhere, no input changed
    assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()


def test_qsmflow_bids_dir_problems(tmp_path, capsys):
    from qsmflow.cli.run import main

    f = _file(tmp_path, "bids.txt", "x")
    rc, text = _call(main, [f, tmp_path / "o", "participant"], capsys)
    _assert_clean(rc, text, 2, ["bids_dir is a file"])
    rc, text = _call(main, [tmp_path / "nope", tmp_path / "o", "participant"], capsys)
    _assert_clean(rc, text, 2, ["bids_dir not found"])
    assert not (tmp_path / "o").exists()


def test_slurm_plugin_without_logname(bids_base, tmp_path, capsys, monkeypatch):
    """The SLURM plugin names jobs after $LOGNAME: without it, one line and exit 2 (whether
    or not SLURM is installed here)."""
    from qsmflow.cli.run import main

    bids = _copy_bids(bids_base, tmp_path)
    monkeypatch.delenv("LOGNAME", raising=False)
    p = _file(tmp_path, "slurm.yml", "plugin: SLURM\nplugin_args:\n  sbatch_args: ''\n")
    rc, text = _call(
        main, [bids, tmp_path / "o", "participant", "-w", tmp_path / "w", "--use-plugin", p], capsys
    )
    needle = "LOGNAME" if shutil.which("sbatch") else "needs 'sbatch'"
    _assert_clean(rc, text, 2, [needle])
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def four_two_broken(tmp_path_factory):
    """Four subjects: sub-02's first magnitude all zero, a sidecar of sub-04 not JSON."""
    root = tmp_path_factory.mktemp("per_subject")
    bids = write_bids_dataset(
        root / "bids",
        subjects=("01", "02", "03", "04"),
        shape=SHAPE,
        voxel_size=(4.0, 4.0, 4.0),
        te_s=TE,
        snr=50.0,
    )
    p = bids / "sub-02" / "anat" / "sub-02_echo-1_part-mag_MEGRE.nii.gz"
    img = nib.load(p)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.float32), img.affine), p)
    (bids / "sub-04" / "anat" / "sub-04_echo-2_part-phase_MEGRE.json").write_text("{EchoTime")
    return bids, p


def test_subject_failing_the_input_checks_is_skipped_the_others_run(
    four_two_broken, tmp_path, capsys
):
    """One subject's bad input does not stop the dataset: it is reported (file and reason),
    skipped and listed as failed in the summary; the others complete; exit 1."""
    from qsmflow.cli.run import main

    bids, bad = four_two_broken
    before = _hashes(bids)
    out, work = tmp_path / "out", tmp_path / "work"
    rc, text = _call(main, [bids, out, "participant", "-w", work, "--nprocs", "2"], capsys)
    _assert_clean(
        rc,
        text,
        1,
        [
            "sub-02: 1 problem(s) with the input data; this subject is skipped",
            f"{bad}: magnitude is all zero",
            "sub-01: ok",
            "sub-03: ok",
            "sub-02: FAILED at the input check:",
            "sub-04: 1 problem(s) with the input data; this subject is skipped",
            "sub-04_echo-2_part-phase_MEGRE.json: not valid JSON",
            "sub-04: FAILED at the input check:",
            "2 of 4 subject(s) failed",
        ],
    )
    assert "nothing was run" not in text
    for s in ("01", "03"):
        assert (out / f"sub-{s}" / "anat" / f"sub-{s}_Chimap.nii.gz").is_file()
    assert not (out / "sub-02" / "anat").exists() and not (out / "sub-04" / "anat").exists()
    assert "all zero" in (out / "sub-02.html").read_text()  # the index shows the failure
    assert _hashes(bids) == before


@pytest.fixture(scope="module")
def eight_one_broken(tmp_path_factory):
    """Eight subjects, sub-05's magnitude file truncated (the issue's case)."""
    root = tmp_path_factory.mktemp("eight_subjects")
    subjects = tuple(f"{i:02d}" for i in range(1, 9))
    bids = write_bids_dataset(
        root / "bids", subjects=subjects, shape=SHAPE, voxel_size=(4.0, 4.0, 4.0), te_s=TE
    )
    p = bids / "sub-05" / "anat" / "sub-05_echo-1_part-mag_MEGRE.nii.gz"
    p.write_bytes(p.read_bytes()[:200])
    return bids, p, subjects


def test_eight_subjects_one_broken_seven_complete(eight_one_broken, tmp_path, capsys):
    from qsmflow.cli.run import main

    bids, bad, subjects = eight_one_broken
    out, work = tmp_path / "out", tmp_path / "work"
    rc, text = _call(main, [bids, out, "participant", "-w", work, "--nprocs", "2"], capsys)
    _assert_clean(rc, text, 1, ["sub-05: FAILED at the input check:", "1 of 8 subject(s) failed"])
    assert bad.name in text
    done = [s for s in subjects if (out / f"sub-{s}" / "anat" / f"sub-{s}_Chimap.nii.gz").is_file()]
    assert done == [s for s in subjects if s != "05"]  # 7 complete


def test_stop_on_first_crash_keeps_all_or_nothing_input_checks(four_two_broken, tmp_path, capsys):
    from qsmflow.cli.run import main

    bids, bad = four_two_broken
    out, work = tmp_path / "out", tmp_path / "work"
    argv = [bids, out, "participant", "-w", work, "--stop-on-first-crash"]
    rc, text = _call(main, argv, capsys)
    _assert_clean(rc, text, 2, ["2 problem(s) with the input data; nothing was run", bad.name])
    assert not out.exists() and not work.exists()


# --------------------------------------------------------------------------------------------
# valid but unusual inputs: accepted, with the right result
# --------------------------------------------------------------------------------------------
def test_phase_zero_to_two_pi_is_accepted_as_the_same_angles(bids_base, tmp_path):
    from qsmflow.bids_input import collect_runs

    bids = _copy_bids(bids_base, tmp_path)
    for e in (1, 2):
        _replace_data("phase", e, lambda d, b: np.mod(d, 2 * np.pi))(bids, tmp_path)
    runs = collect_runs(bids)
    assert "[0, 2pi) wrapped" in runs[0].phase_scaling
    from qsmflow.algorithms.phase import scale_phase_to_radians

    orig = np.asarray(nib.load(_img(bids_base, "phase", 1)).dataobj, dtype=np.float64)
    shifted = np.asarray(nib.load(_img(bids, "phase", 1)).dataobj)
    rad, _ = scale_phase_to_radians(shifted)
    assert np.abs(np.angle(np.exp(1j * (rad - orig)))).max() < 1e-5


@pytest.mark.parametrize("parents", ["sub-study/bids", "run-2/bids", "ses-x/acq-y/bids"])
def test_dataset_under_folders_named_like_entities(tmp_path, parents):
    """Entities come from paths inside the dataset only (pybids alone takes parent folders)."""
    from qsmflow.bids_input import collect_runs

    bids = write_bids_dataset(
        tmp_path / parents,
        subjects=("01", "02"),
        shape=(12, 12, 12),
        voxel_size=(4.0,) * 3,
        te_s=TE,
    )
    runs = collect_runs(bids)
    assert [r.bids_prefix for r in runs] == ["sub-01", "sub-02"]
    assert all(r.te_s == TE and r.n_echoes == 2 for r in runs)


# --------------------------------------------------------------------------------------------
# qsmflow-stage
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stage_files(tmp_path_factory):
    """A small 2-echo phase/magnitude set, mask, local field and params.json."""
    root = tmp_path_factory.mktemp("stage_inputs")
    rng = np.random.default_rng(0)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:12, 4:12, 4:12] = 1
    field = rng.normal(0, 0.01, SHAPE).astype(np.float32) * mask
    mag = (rng.uniform(50, 100, SHAPE + (2,)) * (0.2 + mask[..., None])).astype(np.float32)
    phase = np.angle(np.exp(1j * rng.uniform(-3, 3, SHAPE + (2,)))).astype(np.float32)
    files = {}
    for name, arr in (("mask", mask), ("localfield", field), ("magnitude", mag), ("phase", phase)):
        files[name] = root / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), files[name])
    files["params"] = root / "params.json"
    files["params"].write_text(json.dumps({"TE": list(TE), "B0": 3.0}))
    return files


def _stage_dir(stage_files, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return {k: Path(shutil.copy(v, d / v.name)) for k, v in stage_files.items()}


def _nifti_like(ref, arr, path):
    img = nib.load(ref)
    nib.save(nib.Nifti1Image(arr, img.affine), path)
    return path


def _stage_cases():
    def c(args, needles, rc=2, make=None):
        return args, needles, rc, make

    def trunc(f, t):
        raw = f["localfield"].read_bytes()
        f["localfield"].write_bytes(raw[: len(raw) // 2])

    def nan_field(f, t):
        d = np.asarray(nib.load(f["localfield"]).dataobj).copy()
        d[5, 5, 5] = np.nan
        _nifti_like(f["mask"], d, f["localfield"])

    def empty_mask(f, t):
        _nifti_like(f["mask"], np.zeros(SHAPE, np.uint8), f["mask"])

    def small_mask(f, t):
        _nifti_like(f["mask"], np.ones((8, 8, 8), np.uint8), f["mask"])

    def zero_mag(f, t):
        _nifti_like(f["mask"], np.zeros(SHAPE + (2,), np.float32), f["magnitude"])

    def params(obj):
        def make(f, t):
            f["params"].write_text(obj if isinstance(obj, str) else json.dumps(obj))

        return make

    inv = ["invert", "--method", "tkd", "--localfield", "{localfield}", "--mask", "{mask}"]
    comb = ["combine", "--method", "wls", "--phase", "{phase}", "--magnitude", "{magnitude}"]
    return {
        "output-overwrites-input": c(inv + ["-o", "{localfield}"], ["overwrite the input"]),
        "output-overwrites-mask": c(inv + ["-o", "{mask}"], ["overwrite the input"]),
        "output-under-file": c(inv + ["-o", "{params}/chi.nii.gz"], ["params.json is a file"]),
        "params-invalid-json": c(
            comb + ["--params", "{params}"], ["not valid JSON"], make=params("{TE: 1")
        ),
        "params-te-string": c(
            comb + ["--params", "{params}"],
            ["TE", "not a number"],
            make=params({"TE": ["a", "b"], "B0": 3}),
        ),
        "params-b0-millitesla": c(
            comb + ["--params", "{params}"],
            ["B0", "millitesla"],
            make=params({"TE": list(TE), "B0": 3000}),
        ),
        "params-b0-string": c(
            comb + ["--params", "{params}"],
            ["B0", "not a number"],
            make=params({"TE": list(TE), "B0": "3T"}),
        ),
        "params-b0dir-length": c(
            inv + ["--params", "{params}"], ["B0_dir"], make=params({"B0_dir": [0, 1]})
        ),
        "params-voxel-negative": c(
            inv + ["--params", "{params}"], ["voxel_size"], make=params({"voxel_size": [1, -1, 1]})
        ),
        "params-not-object": c(
            comb + ["--params", "{params}"], ["must be an object"], make=params("[0.004]")
        ),
        "set-wrong-type": c(
            [
                "invert",
                "--method",
                "tv",
                "--localfield",
                "{localfield}",
                "--mask",
                "{mask}",
                "--set",
                "alpha=fast",
            ],
            ["alpha", "expected a number"],
        ),
        "set-unknown": c(inv + ["--set", "radius=3"], ["unknown parameter 'radius'"]),
        "set-no-equals": c(inv + ["--set", "threshold"], ["NAME=VALUE"]),
        "localfield-truncated": c(inv, ["localfield.nii.gz", "truncated"], make=trunc),
        "localfield-nan": c(inv, ["NaN"], make=nan_field),
        "mask-empty": c(inv, ["mask is empty"], make=empty_mask),
        "mask-shape-mismatch": c(inv, ["does not match"], make=small_mask),
        "te-milliseconds": c(comb + ["--te", "4", "8", "--b0", "3"], ["milliseconds"]),
        "b0-zero": c(comb + ["--te", "0.004", "0.008", "--b0", "0"], ["must be positive"]),
        "magnitude-all-zero": c(
            ["mask", "--method", "bet", "--magnitude", "{magnitude}"], ["all zero"], make=zero_mag
        ),
        "phase-magnitude-swapped": c(
            [
                "combine",
                "--method",
                "wls",
                "--phase",
                "{magnitude}",
                "--magnitude",
                "{phase}",
                "--te",
                "0.004",
                "0.008",
                "--b0",
                "3",
            ],
            ["swapped?"],
        ),
        "unknown-method": c(["invert", "--method", "magic"], ["unknown invert method"]),
        "missing-input": c(
            ["invert", "--method", "tkd", "--mask", "{mask}"], ["needs --localfield"]
        ),
        "input-not-found": c(
            ["invert", "--method", "tkd", "--localfield", "{tmp}/nope.nii", "--mask", "{mask}"],
            ["file not found"],
        ),
        "input-is-folder": c(
            ["invert", "--method", "tkd", "--localfield", "{tmp}", "--mask", "{mask}"],
            ["is a folder"],
        ),
    }


STAGE_CASES = _stage_cases()


@pytest.mark.parametrize("name", list(STAGE_CASES))
def test_stage_bad_input(name, stage_files, tmp_path, capsys, monkeypatch):
    from qsmflow.cli.stage import main

    args, needles, expect_rc, make = STAGE_CASES[name]
    files = _stage_dir(stage_files, tmp_path)
    if make:
        make(files, tmp_path)
    monkeypatch.chdir(tmp_path)  # default outputs would land here
    before = _hashes(tmp_path)
    subst = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    argv = [a.format(**subst) for a in args]
    rc, text = _call(main, argv, capsys)
    _assert_clean(rc, text, expect_rc, needles)
    assert _hashes(tmp_path) == before  # inputs unchanged, no output (complete or partial)


def test_stage_phase_zero_to_two_pi_gives_the_same_field(stage_files, tmp_path, capsys):
    from qsmflow.cli.stage import main

    files = _stage_dir(stage_files, tmp_path)
    ph = np.asarray(nib.load(files["phase"]).dataobj)
    shifted = _nifti_like(
        files["phase"], np.mod(ph, 2 * np.pi).astype(np.float32), tmp_path / "phase_2pi.nii.gz"
    )
    outs = []
    for p in (files["phase"], shifted):
        out = tmp_path / f"field_{len(outs)}.nii.gz"
        rc, text = _call(
            main,
            [
                "combine",
                "--method",
                "wls",
                "--phase",
                p,
                "--magnitude",
                files["magnitude"],
                "--te",
                *map(str, TE),
                "--b0",
                "3",
                "-o",
                out,
            ],
            capsys,
        )
        assert rc == 0, text
        outs.append(np.asarray(nib.load(out).dataobj))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


# --------------------------------------------------------------------------------------------
# qsmflow-convert
# --------------------------------------------------------------------------------------------
def _dicom_series(d: Path):
    pytest.importorskip("pydicom")
    from dicom_synth import write_series

    rng = np.random.default_rng(0)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    shape = (12, 12, 4, 2)
    write_series(
        d / "mag",
        rng.uniform(1, 100, shape),
        aff,
        te_s=TE,
        part="mag",
        series_number=5,
        description="gre_qsm",
        study_uid="1.2.3.4",
    )
    write_series(
        d / "pha",
        rng.uniform(-3, 3, shape),
        aff,
        te_s=TE,
        part="phase",
        series_number=6,
        description="gre_qsm",
        study_uid="1.2.3.4",
    )


def _damage_header(dicom):
    victim = sorted((dicom / "pha").glob("*.dcm"))[2]
    raw = bytearray(victim.read_bytes())
    raw[128:132] = b"XXXX"  # the DICM magic and the meta group length garbled
    raw[132:140] = b"\xff" * 8
    victim.write_bytes(bytes(raw))
    return victim


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QA_ME = SHARED / "dcm_qa_me" / "In"


def _siemens_header_cut(tmp: Path) -> Path:
    """The real Siemens export (dcm_qa_me) copied to ``tmp``, one phase-difference file cut to
    half its header (the bytes before the pixel data element); returns the damaged file."""
    if not QA_ME.is_dir():
        pytest.skip(f"shared test data not found at {QA_ME}")
    dst = tmp / "dicom"
    shutil.copytree(QA_ME, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)  # the shared copy is read-only
    victim = sorted((dst / "3_me_FieldMap_GRE").glob("*.dcm"))[4]
    raw = victim.read_bytes()
    header = raw.rfind(b"\xe0\x7f\x10\x00")  # (7FE0,0010) PixelData
    assert header > 1000
    victim.write_bytes(raw[: header // 2])
    return victim


def _convert_cases():
    def damaged(tmp):
        _dicom_series(tmp / "dicom")
        v = _damage_header(tmp / "dicom")
        return [tmp / "dicom", tmp / "bids"], ["damaged DICOM header", v.name]

    def truncated(tmp):
        _dicom_series(tmp / "dicom")
        v = sorted((tmp / "dicom" / "mag").glob("*.dcm"))[1]
        v.write_bytes(v.read_bytes()[:-100])
        return [tmp / "dicom", tmp / "bids"], ["truncated", v.name]

    def missing(tmp):
        return [tmp / "nope", tmp / "bids"], ["nope"]

    def bids_is_file(tmp):
        _dicom_series(tmp / "dicom")
        _file(tmp, "bids", "x")
        return [tmp / "dicom", tmp / "bids"], ["bids"]

    def heuristic_invalid(tmp):
        _dicom_series(tmp / "dicom")
        h = _file(tmp, "h.json", "{")
        return [tmp / "dicom", tmp / "bids", "--heuristic", h], ["h.json"]

    def label(value, needle):
        def make(tmp):
            _dicom_series(tmp / "dicom")
            return [tmp / "dicom", tmp / "bids", *value], [needle]

        return make

    def siemens_header_cut(tmp):
        v = _siemens_header_cut(tmp)
        return [tmp / "dicom", tmp / "bids", "--participant-label", "01"], [
            "damaged or truncated DICOM file",
            str(v),
            "series 3 'me_FieldMap_GRE'",
            "--skip-damaged",
        ]

    def meta_cut(tmp):
        _dicom_series(tmp / "dicom")
        v = sorted((tmp / "dicom" / "pha").glob("*.dcm"))[1]
        v.write_bytes(v.read_bytes()[:150])  # inside the File Meta header, after 'DICM'
        return [tmp / "dicom", tmp / "bids"], ["damaged DICOM header", v.name]

    def gzip_cut(tmp):
        import gzip

        _dicom_series(tmp / "dicom")
        v = sorted((tmp / "dicom" / "mag").glob("*.dcm"))[2]
        gz = Path(f"{v}.gz")
        raw = gzip.compress(v.read_bytes())
        gz.write_bytes(raw[: len(raw) // 2])
        v.unlink()
        return [tmp / "dicom", tmp / "bids"], ["damaged gzip-compressed file", gz.name]

    return {
        "gzip-dicom-cut": gzip_cut,
        "siemens-phasediff-header-cut-in-half": siemens_header_cut,
        "file-meta-cut": meta_cut,
        "participant-label-invalid": label(["--participant-label", "!!"], "invalid label '!!'"),
        "participant-label-empty": label(["--participant-label", ""], "invalid label ''"),
        "session-label-invalid": label(["--session-label", "a_b"], "invalid label 'a_b'"),
        "damaged-header": damaged,
        "truncated-file": truncated,
        "dicom-dir-missing": missing,
        "bids-dir-is-file": bids_is_file,
        "heuristic-invalid-json": heuristic_invalid,
    }


CONVERT_CASES = _convert_cases()


@pytest.mark.parametrize("name", list(CONVERT_CASES))
def test_convert_bad_input(name, tmp_path, capsys):
    pytest.importorskip("dcm2niix")
    from qsmflow.cli.convert import main

    argv, needles = CONVERT_CASES[name](tmp_path)
    before = _hashes(tmp_path)
    rc, text = _call(main, argv, capsys)
    _assert_clean(rc, text, 2, needles)
    assert _hashes(tmp_path) == before
    assert not (tmp_path / "bids").is_dir()


def test_convert_skip_damaged_names_them_and_converts_the_rest(tmp_path, capsys):
    """--skip-damaged: exit 0, the damaged file named in a warning, its series (now
    incomplete) kept aside, the other series converted; the input folder unchanged."""
    pytest.importorskip("dcm2niix")
    from qsmflow.cli.convert import main

    victim = _siemens_header_cut(tmp_path)
    before = _hashes(tmp_path / "dicom")
    argv = [tmp_path / "dicom", tmp_path / "bids", "--participant-label", "01"]
    rc, text = _call(main, [*argv, "--skip-damaged"], capsys)
    _assert_clean(
        rc,
        text,
        0,
        [
            "warning: left out",
            str(victim),
            "series 3 'me_FieldMap_GRE' (35 files): kept aside: incomplete: 1 damaged file(s)",
        ],
    )
    assert _hashes(tmp_path / "dicom") == before
    fmap = tmp_path / "bids" / "sub-01" / "ses-20180502" / "fmap"
    assert (fmap / "sub-01_ses-20180502_magnitude2.nii.gz").is_file()
    assert not list(fmap.glob("*phasediff*"))
    rc, text = _call(main, [*argv, "--skip-damaged", "-q"], capsys)  # a re-run: warns again
    assert rc == 0 and str(victim) in text and "kept aside" not in text


# --------------------------------------------------------------------------------------------
# qsmflow-demo
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--size", "0"], "--size 0"),
        (["--size", "8"], "--size 8"),
        (["--nprocs", "0"], "--nprocs 0"),
        (["--preset", "nope"], "unknown"),
        (["--size", "ten"], "invalid int"),
    ],
)
def test_demo_bad_arguments(argv, needle, tmp_path, capsys):
    from qsmflow.cli.demo import main

    rc, text = _call(main, [tmp_path / "demo", *argv], capsys)
    _assert_clean(rc, text, 2, [needle])
    assert not (tmp_path / "demo").exists()


def test_demo_directory_is_a_file(tmp_path, capsys):
    from qsmflow.cli.demo import main

    f = _file(tmp_path, "demo", "x")
    rc, text = _call(main, [f], capsys)
    _assert_clean(rc, text, 2, ["is a file"])
    assert f.read_text() == "x"
