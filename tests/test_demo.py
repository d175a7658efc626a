"""The README's demo command: simulate, run the pipeline, report chi accuracy."""

import re

import nibabel as nib

from qsmflow.cli.demo import main


def test_demo_runs_and_reports_accuracy(tmp_path, capsys):
    assert main([str(tmp_path / "demo"), "--size", "64"]) == 0
    out = capsys.readouterr().out
    chis = sorted((tmp_path / "demo" / "derivatives" / "qsmflow").rglob("*_Chimap.nii.gz"))
    assert [p.name for p in chis] == ["sub-01_Chimap.nii.gz", "sub-02_Chimap.nii.gz"]
    for p in chis:
        assert str(p) in out and nib.load(p).shape == (64, 64, 64)
    # it ends by printing the report pages, which exist
    tail = out.rsplit("QC reports", 1)[-1]
    pages = re.findall(r"(\S+\.html)", tail)
    assert [p.rsplit("/", 1)[-1] for p in pages] == ["sub-01.html", "sub-02.html", "index.html"]
    assert all(
        (tmp_path / "demo" / "derivatives" / "qsmflow" / p.rsplit("/", 1)[-1]).is_file()
        for p in pages
    )
    scores = [float(x) for x in re.findall(r"NRMSE ([0-9.]+) %", out)]
    corrs = [float(x) for x in re.findall(r"correlation ([0-9.]+)", out)]
    assert len(scores) == 2 and len(corrs) == 2
    # a full-size head at 2.5 mm: measured NRMSE 69.8 / 79.8 %, r 0.725 / 0.660 (at the
    # README's default 1.67 mm: 61.9 / 60.1 %)
    assert max(scores) < 85 and min(corrs) > 0.62, (scores, corrs)
